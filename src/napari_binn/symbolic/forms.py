"""A library of biological closed forms for D(u) and G(u), fitted to a learned curve, and the admissibility rule.

Each form is a sympy template in ``u`` with named constants, a rule for starting values from the sampled curve,
and bounds that keep the constants biological (a carrying capacity is positive, an exponent stays moderate).
The written form has as many free (Float) constants as the data can determine: D0·u/K is the one-constant
``a*u`` (D0 and K cannot be told apart from the curve), logistic r(1 - u/K) is ``r - (r/K)*u``.

``is_admissible`` says whether a closed form can be the D or G of the reaction-diffusion PDE on the observed
densities: D finite and >= 0 on [0, u_max]; G finite on (0, u_max] with G(u)·u -> 0 as u -> 0 (a/u, whose
reaction does not vanish in empty space, is out; Gompertz r·ln(K/u), whose reaction r·u·ln(K/u) does, is in).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp
from scipy.optimize import least_squares

from ..errors import ConfigError
from .expression import U, complexity, free_floats

__all__ = ["FORMS_D", "FORMS_G", "Form", "FormFit", "check_form_names", "constant_bounds", "fit_forms",
           "in_domain", "is_admissible", "pde_safe", "n_constants"]


@dataclass(frozen=True)
class Form:
    """One library form: ``template`` in ``u`` and the symbols ``params``; ``start(u, y)`` gives starting values
    (a list of candidate starts, each a tuple in ``params`` order); ``bounds`` (low, high) per parameter.
    ``domain``: the densities where the form is real and finite for every allowed constant: 'all', 'u >= 0'
    (a free exponent: u**m) or 'u > 0' (a logarithm). A learned curve is sampled over the observed densities,
    which noise takes below 0; the form is fitted to the samples in its domain (see :func:`in_domain`).
    ``collapsed``: see the field."""

    name: str
    kind: str
    template: sp.Expr
    params: tuple[str, ...]
    start: Callable[[np.ndarray, np.ndarray], list[tuple[float, ...]]]
    bounds: tuple[tuple[float, float], ...]
    description: str
    domain: str = "all"
    #: (fitted constants by name, the sampled densities' span) -> whether the fit collapsed onto a simpler library
    #: form (then it is not kept: that form is fitted in its own right)
    collapsed: Callable[[dict[str, float], float], bool] | None = None

    def expr(self, values: Sequence[float]) -> sp.Expr:
        """The template with its constants set (as Floats: the free constants of a later refit)."""
        reps = {sp.Symbol(p): sp.Float(float(v), 15) for p, v in zip(self.params, values)}
        return self.template.xreplace(reps)


@dataclass(frozen=True)
class FormFit:
    """A library form fitted to samples: the closed form, its weighted MSE and its fitted constants by name."""

    name: str
    kind: str
    expr: sp.Expr
    loss: float
    values: dict[str, float]

    @property
    def n_constants(self) -> int:
        return n_constants(self.expr)

    @property
    def complexity(self) -> int:
        return complexity(self.expr)


def n_constants(expr: sp.Expr) -> int:
    """Number of free (Float) constants of a closed form."""
    return len(free_floats(sp.sympify(expr)))


def _s(*names: str) -> tuple[sp.Symbol, ...]:
    return tuple(sp.Symbol(n) for n in names)


def _span(u: np.ndarray) -> float:
    return float(max(np.max(np.abs(u)), 1e-300))


def _mean(y):
    return float(np.mean(y))


def _lin(u, y):
    b, a = np.polyfit(u, y, 1)
    return float(a), float(b)


def _d_power_start(u, y):
    pos = (u > 0) & (y > 0)
    if pos.sum() >= 3:
        m, la = np.polyfit(np.log(u[pos]), np.log(y[pos]), 1)
        return [(math.exp(la), float(np.clip(m, 0.1, 5.0))), (_mean(y) / _span(u) ** 2, 2.0)]
    return [(_mean(y) / _span(u), 1.0)]


def _exp_start(u, y):
    pos = y > 0
    if pos.sum() >= 3:
        b, la = np.polyfit(u[pos], np.log(y[pos]), 1)
        return [(math.exp(la), float(b)), (_mean(y), 0.0)]
    return [(_mean(y), 0.0)]


def _sat_start(u, y):
    return [(float(np.max(y)), 1.0 / _span(u)), (float(np.max(y)), 10.0 / _span(u)), (_mean(y), 0.1 / _span(u))]


def _rising_start(u, y):
    """(a, b) of a u/(b + u): for b at 0.1, 0.5 and 2 spans, the a that fits best (linear least squares)."""
    out = []
    for f in (0.1, 0.5, 2.0):
        b = f * _span(u)
        g = u / (b + u)
        out.append((float(np.sum(y * g) / max(float(np.sum(g * g)), 1e-300)), b))
    return out


def _logistic_start(u, y):
    a, b = _lin(u, y)
    return [(a, b)]


def _allee_start(u, y):
    K = 1.2 * _span(u)
    r = max(float(np.max(np.abs(y))), 1e-12)
    out = []
    for f in (0.1, 0.3):
        A = f * _span(u)
        out.append((r / A, r / (K * A), A))
    return out


def _weak_allee_start(u, y):
    """(a, b, c) of (a - b u)(u + c): from a quadratic fit where it bends down and is positive at 0 (b = -p2, a c = p0,
    a - b c = p1), and from linear fits of y / (u + c) at c of 1 and 3 spans (near-logistic shapes)."""
    out = []
    p2, p1, p0 = np.polyfit(u, y, 2)
    if p2 < 0 and p0 > 0:
        b = -float(p2)
        c = (-p1 + math.sqrt(p1 * p1 + 4.0 * b * p0)) / (2.0 * b)
        out.append((p1 + b * c, b, c))
    for f in (1.0, 3.0):
        c = f * _span(u)
        slope, a = np.polyfit(u, y / (u + c), 1)
        out.append((float(a), float(-slope), c))
    return out


def _gompertz_start(u, y):
    pos = u > 0
    if pos.sum() >= 3:
        b, a = np.polyfit(np.log(u[pos]), y[pos], 1)
        return [(float(a), float(-b))]
    return [(_mean(y), 0.0)]


def _richards_start(u, y):
    out = []
    for m in (1.0, 2.0, 0.5):
        slope, a = np.polyfit(np.abs(u) ** m, y, 1)
        out.append((float(a), float(-slope), m))
    return out


_a, _b, _c, _m = _s("a", "b", "c", "m")
_INF = math.inf

#: D(u) forms, µm²/h (name -> Form)
FORMS_D: dict[str, Form] = {f.name: f for f in (
    Form("constant", "D", _a, ("a",), lambda u, y: [(_mean(y),)], ((0.0, _INF),), "D0"),
    Form("linear", "D", _a + _b * U, ("a", "b"), lambda u, y: [_lin(u, y)], ((0.0, _INF), (-_INF, _INF)),
         "a + b u"),
    Form("proportional", "D", _a * U, ("a",), lambda u, y: [(_mean(y) / max(float(np.mean(u)), 1e-300),)],
         ((0.0, _INF),), "D0 u/K (one constant: D0/K)"),
    Form("power", "D", _a * U**_m, ("a", "m"), _d_power_start, ((0.0, _INF), (0.05, 6.0)),
         "D0 (u/K)^m (two constants: D0/K^m, m)", "u >= 0"),
    Form("exponential", "D", _a * sp.exp(_b * U), ("a", "b"), _exp_start, ((0.0, _INF), (-_INF, _INF)),
         "D0 exp(b u)"),
    Form("saturating", "D", _a / (1 + _b * U), ("a", "b"), _sat_start, ((0.0, _INF), (0.0, _INF)),
         "D0 / (1 + u/K)"),
    Form("rising_saturating", "D", _a * U / (_b + U), ("a", "b"), _rising_start, ((0.0, _INF), (0.0, _INF)),
         "D_max u / (B + u) (Michaelis–Menten): 0 at u = 0, rising to D_max, half of it at u = B (two constants)",
         "u >= 0", lambda v, span: v["b"] < 1e-6 * span),  # B -> 0: the constant D_max
)}

#: G(u) forms, 1/h (name -> Form)
FORMS_G: dict[str, Form] = {f.name: f for f in (
    Form("zero", "G", sp.Integer(0), (), lambda u, y: [()], (), "no growth"),
    Form("constant", "G", _a, ("a",), lambda u, y: [(_mean(y),)], ((-_INF, _INF),), "r"),
    Form("logistic", "G", _a - _b * U, ("a", "b"), _logistic_start, ((-_INF, _INF), (0.0, _INF)),
         "r (1 - u/K) (two constants: r, r/K)"),
    Form("allee", "G", (_a - _b * U) * (U - _c), ("a", "b", "c"), _allee_start,
         ((0.0, _INF), (0.0, _INF), (0.0, _INF)), "r (1 - u/K) (u/A - 1) (three constants: r/A, r/(K A), A)"),
    Form("weak_allee", "G", (_a - _b * U) * (U + _c), ("a", "b", "c"), _weak_allee_start,
         ((0.0, _INF), (0.0, _INF), (0.0, _INF)),
         "r (1 - u/K) (1 + u/B): positive at u = 0, with B < K rising to a peak at (K - B)/2 first, a weak "
         "Allee effect (three constants: r/B, r/(K B), B)"),
    Form("gompertz", "G", _a - _b * sp.log(U), ("a", "b"), _gompertz_start, ((-_INF, _INF), (0.0, _INF)),
         "r ln(K/u) (two constants: r ln K, r)", "u > 0"),
    Form("richards", "G", _a - _b * U**_m, ("a", "b", "m"), _richards_start,
         ((-_INF, _INF), (0.0, _INF), (0.05, 10.0)), "r (1 - (u/K)^nu) (three constants: r, r/K^nu, nu)",
         "u >= 0"),
)}

_LIBRARY = {"D": FORMS_D, "G": FORMS_G}


_DOMAINS = {"all": lambda u: np.ones(u.shape, bool), "u >= 0": lambda u: u >= 0, "u > 0": lambda u: u > 0}


def in_domain(kind: str, name: str, u: np.ndarray) -> np.ndarray:
    """Which of the densities ``u`` lie in the domain of library form ``name`` (kind 'D' or 'G'), where it is real
    and finite whatever its constants. A form is fitted to a learned curve there only: otherwise the samples below
    0 (noise in empty space) make a Gompertz log u infinite, so the form was lost, and lock a free exponent at the
    integer its start gave, since any other exponent is not real there (found on a polygon whose sampled range
    began at -83 cells/mm²)."""
    u = np.asarray(u, dtype=float)
    return _DOMAINS[_LIBRARY[kind][name].domain](u) & np.isfinite(u)


def check_form_names(kind: str, names: Sequence[str] | None) -> list[str]:
    """The form names for ``kind`` ('D' or 'G'); None means all. Unknown names raise ConfigError naming the config key
    (``symbolic.forms_D`` / ``symbolic.forms_G``) and the allowed values."""
    if kind not in _LIBRARY:
        raise ValueError(f"form kind must be 'D' or 'G'; got {kind!r}")
    allowed = list(_LIBRARY[kind])
    if names is None:
        return allowed
    if isinstance(names, str):
        raise ConfigError(f"symbolic.forms_{kind} must be a list of form names (allowed: {', '.join(allowed)}); "
                         f"got the string {names!r}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ConfigError(f"symbolic.forms_{kind}: unknown form(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def constant_bounds(kind: str, name: str, expr: sp.Expr) -> list[tuple[float, float]] | None:
    """The library's bounds of form ``name`` carried over to the free constants of ``expr`` (an instance of that
    form, constants in :func:`~napari_binn.symbolic.expression.free_floats` order), or None when ``expr`` is not
    recognised as one (a term dropped at a zero constant, two equal constants).

    Each written constant is one of the form's constants or its negative (logistic ``a - b u`` writes ``-b``); which
    one is found by matching the expression to the template, not by position (sympy orders the Allee factors by
    value). So the crowding constant b >= 0 of a logistic written as ``0.03 - 2e-11 u`` gives (-inf, 0] for the
    written -2e-11, and a refit can grow it, while a constant the library leaves free stays free."""
    form = _LIBRARY.get(kind, {}).get(name)
    if form is None:
        return None
    expr = sp.sympify(expr)
    floats = free_floats(expr)
    if len(floats) != len(form.params):
        return None
    slots = sp.symbols(f"_slot0:{len(floats)}")
    shape = expr.xreplace(dict(zip(floats, slots)))
    params = [sp.Symbol(p) for p in form.params]
    target = sp.expand(form.template)
    for order in itertools.permutations(range(len(params))):
        for signs in itertools.product((1, -1), repeat=len(params)):
            trial = shape.xreplace({c: s * params[j] for c, s, j in zip(slots, signs, order)})
            if sp.expand(trial - target) == 0:
                out = []
                for s, j in zip(signs, order):
                    lo, hi = form.bounds[j]
                    out.append((lo, hi) if s > 0 else (-hi, -lo))
                return out
    return None


def _fit_one(form: Form, u: np.ndarray, y: np.ndarray, w: np.ndarray) -> FormFit | None:
    keep = in_domain(form.kind, form.name, u)
    if keep.sum() < len(form.params) + 2 or not np.any(w[keep] > 0):
        return None
    u, y, w = u[keep], y[keep], w[keep]
    if not form.params:
        fn = sp.lambdify([U], form.template, modules="numpy")
        pred = np.broadcast_to(np.asarray(fn(u), dtype=float), u.shape)
        return FormFit(form.name, form.kind, form.template, float(np.sum(w * (pred - y) ** 2) / w.sum()), {})
    syms = [sp.Symbol(p) for p in form.params]
    fn = sp.lambdify([U, *syms], form.template, modules="numpy")
    sw = np.sqrt(w / w.sum())
    lo = np.array([b[0] for b in form.bounds])
    hi = np.array([b[1] for b in form.bounds])

    def resid(p):
        with np.errstate(all="ignore"):
            r = sw * (np.asarray(fn(u, *p), dtype=float) - y)
        return np.where(np.isfinite(r), r, 1e6 * (1 + np.abs(y).max()))

    best = None
    starts = []
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            starts = list(form.start(u, y))
        except (ValueError, np.linalg.LinAlgError, OverflowError, ZeroDivisionError):
            starts = []
        # robust starts: each given start, also scaled, clipped into the bounds
        for s0 in list(starts):
            starts.append(tuple(v * 0.5 if i == 0 else v for i, v in enumerate(s0)))
        for s0 in starts:
            x0 = np.clip(np.nan_to_num(np.asarray(s0, dtype=float), nan=1.0, posinf=1.0, neginf=-1.0), lo, hi)
            x0 = np.where((x0 == lo) & np.isfinite(lo), lo + 1e-6 * (1 + np.abs(lo)), x0)
            x0 = np.where((x0 == hi) & np.isfinite(hi), hi - 1e-6 * (1 + np.abs(hi)), x0)
            try:
                sol = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", max_nfev=200 * len(x0))
            except (ValueError, FloatingPointError):
                continue
            loss = float(np.sum(sol.fun**2))
            if math.isfinite(loss) and (best is None or loss < best[0]):
                best = (loss, sol.x)
    if best is None:
        return None
    if form.collapsed is not None and form.collapsed(dict(zip(form.params, map(float, best[1]))), _span(u)):
        return None
    expr = form.expr(best[1])
    if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        return None
    return FormFit(form.name, form.kind, expr, best[0], dict(zip(form.params, map(float, best[1]))))


def fit_forms(samples, names: Sequence[str] | None = None) -> list[FormFit]:
    """Fit library forms to a learned curve by weighted least squares (scipy, several starts each, bounded), each
    on the samples in its domain (:func:`in_domain`; its loss is the weighted mean there).

    samples: a :class:`~napari_binn.symbolic.samples.FunctionSamples` named 'D' or 'G' (its weights are used;
    the BINN ensemble spread, when present, down-weights poorly determined densities). names: form names of
    that kind (None: all). Returns the forms that could be fitted, in library order.
    """
    kind = samples.name
    chosen = check_form_names(kind, names)
    u, y = np.asarray(samples.u, dtype=float), np.asarray(samples.value, dtype=float)
    w = samples.fit_weights() if hasattr(samples, "fit_weights") else np.ones_like(u)
    sigma = getattr(samples, "sigma", None)
    if sigma is not None and np.any(np.asarray(sigma) > 0):
        s = np.asarray(sigma, dtype=float)
        floor = max(float(np.median(s[s > 0])) * 0.1, 1e-300) if np.any(s > 0) else 1.0
        w = w / np.maximum(s, floor) ** 2 * np.maximum(float(np.median(s)), floor) ** 2
    out = []
    for name in chosen:
        res = _fit_one(_LIBRARY[kind][name], u, y, w)
        if res is not None:
            out.append(res)
    return out


def _grid(u_max: float) -> np.ndarray:
    u_max = float(u_max) if math.isfinite(u_max) and u_max > 0 else 1.0
    return np.unique(np.concatenate([np.geomspace(1e-9 * u_max, u_max, 300), np.linspace(0, u_max, 101)[1:]]))


def is_admissible(kind: str, expr, u_max: float) -> tuple[bool, str]:
    """Whether ``expr`` (sympy, in ``u``) can be the PDE's D (kind 'D') or G (kind 'G') on [0, ``u_max``].

    D: finite and >= 0 on [0, u_max] (0 included). G: finite on (0, u_max], and the reaction G(u)·u -> 0 as
    u -> 0 (checked at densities down to 1e-9·u_max against the largest |G u| on the range). Returns
    (admissible, reason); the reason names the offending density.
    """
    expr = sp.sympify(expr)
    if expr.free_symbols - {U}:
        return False, f"has symbols other than u: {sorted(map(str, expr.free_symbols - {U}))}"
    fn = sp.lambdify([U], expr, modules="numpy")
    u = _grid(u_max)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            vals = np.broadcast_to(np.asarray(fn(u), dtype=complex), u.shape)
            at0 = complex(np.asarray(fn(np.array([0.0])), dtype=complex).ravel()[0]) if kind == "D" else 0j
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as err:
            return False, f"cannot be evaluated ({err})"
    if np.any(np.abs(vals.imag) > 1e-9 * (1 + np.abs(vals.real))):
        k = int(np.flatnonzero(np.abs(vals.imag) > 1e-9 * (1 + np.abs(vals.real)))[0])
        return False, f"is not real at u = {u[k]:.3g}"
    vals = vals.real
    bad = ~np.isfinite(vals)
    if np.any(bad):
        return False, f"is not finite at u = {u[np.flatnonzero(bad)[0]]:.3g}"
    if kind == "D":
        if not (np.isfinite(at0.real) and abs(at0.imag) <= 1e-9 * (1 + abs(at0.real))):
            return False, "is not finite at u = 0"
        scale = max(float(np.max(np.abs(vals))), abs(at0.real), 1e-300)
        neg = np.concatenate([[at0.real], vals]) < -1e-9 * scale
        if np.any(neg):
            where = 0.0 if neg[0] else u[np.flatnonzero(neg[1:])[0]]
            return False, f"is negative at u = {where:.3g}"
        return True, ""
    reaction = np.abs(vals * u)
    scale = max(float(reaction.max()), 1e-300)
    if reaction[0] > 1e-3 * scale:
        return False, "its reaction G(u)·u does not vanish as u -> 0"
    return True, ""


def pde_safe(expr, u_floor: float, values: dict | None = None):
    """For the solver, which evaluates G at empty boxes (u = 0): ``expr`` with u replaced by max(u, u_floor) when
    it is not finite at u = 0 (e.g. Gompertz's log u); unchanged otherwise. ``values``: numbers for the other
    symbols (a parametrized form's constants) for that check. The floor is written as a rational number, so it is
    never a free constant of a refit; the reaction G(u)·u keeps its limit 0 up to a term of order u_floor."""
    expr = sp.sympify(expr)
    values = values or {}
    subs = {sym: sp.Float(float(values.get(sym.name, 1.0))) for sym in expr.free_symbols if sym.name != "u"}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            v = complex(sp.N(expr.xreplace(subs).xreplace({U: sp.Integer(0)})))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            v = complex(math.nan)
    if np.isfinite(v.real) and np.isfinite(v.imag) and v.imag == 0:
        return expr
    floor = sp.Rational(f"{float(u_floor):.3g}") if u_floor > 0 else sp.Rational(1, 10**9)
    return expr.xreplace({U: sp.Max(U, floor)})
