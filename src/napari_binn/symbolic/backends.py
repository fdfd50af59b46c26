"""Symbolic-regression backends. Each turns samples (u, y, w) into candidate closed forms (sympy, symbol u).

The common post-processing (constant refits, snapping, Pareto front, selection) lives in ``discover``; a backend
only has to propose good candidates of many complexities. Densities arrive rescaled to order one (u / u_scale)
and candidates are returned in the original u.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import sympy as sp
from scipy.optimize import minimize_scalar

from ..errors import BackendUnavailableError
from .expression import U

__all__ = ["BACKENDS", "OPERATOR_NAMES", "DEFAULT_OPERATORS", "check_operators", "propose"]

#: Operator names accepted by ``discover_equations(operators=...)``.
OPERATOR_NAMES = ("+", "-", "*", "/", "exp", "log", "sqrt", "pow", "square")
DEFAULT_OPERATORS = ("+", "-", "*", "/", "exp", "log", "pow")

_OPERON_SYMBOLS = {
    "+": "add", "-": "sub", "*": "mul", "/": "div", "exp": "exp", "log": "log",
    "sqrt": "sqrt", "pow": "pow", "square": "square",
}
_PYSR_BINARY = {"+": "+", "-": "-", "*": "*", "/": "/", "pow": "^"}
_PYSR_UNARY = {"exp": "exp", "log": "log", "sqrt": "sqrt", "square": "square"}

#: Operators each backend can use ('library' ignores the operator set except that it drops terms needing
#: exp or log when they are not allowed).
SUPPORTED = {
    "operon": set(_OPERON_SYMBOLS),
    "pysr": set(_PYSR_BINARY) | set(_PYSR_UNARY),
    "library": set(OPERATOR_NAMES),
}

#: Default search settings of the operon backend (tuned with benchmarks/sr_bench.py).
OPERON_DEFAULTS = dict(
    population_size=300,
    generations=30,
    optimizer_iterations=5,
    max_evaluations=1_000_000,
    tournament_size=5,
)


def check_operators(backend: str, operators: Sequence[str] | None) -> tuple[str, ...]:
    """Validated operator tuple for ``backend`` (ValueError naming any unsupported operator)."""
    ops = tuple(DEFAULT_OPERATORS if operators is None else operators)
    bad = [o for o in ops if o not in SUPPORTED[backend]]
    if bad:
        raise ValueError(
            f"Operator(s) {', '.join(map(repr, bad))} not supported by the {backend!r} backend; "
            f"supported: {', '.join(sorted(SUPPORTED[backend]))}."
        )
    if not {"+", "*"} <= set(ops):
        raise ValueError("operators must include at least '+' and '*'.")
    return ops


# -- operon -----------------------------------------------------------------------------------------------------


def _operon_to_sympy(model: str, u_scale: float) -> sp.Expr:
    expr = sp.sympify(model.replace("^", "**"), locals={"X1": U / u_scale})
    return expr


def _replicate_by_weight(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows repeated in proportion to their weight (operon's sklearn interface has no sample weights)."""
    if np.allclose(w, w[0]):
        return x, y
    reps = np.maximum(np.rint(2 * w / w.mean()).astype(int), 1)
    return np.repeat(x, reps), np.repeat(y, reps)


def _operon_threads() -> int:
    """Operon's default thread count: the cores this process may use, at most 4. Operon seeds each individual's
    random stream from the run's seed, so the front does not depend on the thread count (tested); 2 threads
    take ~0.78x the time of 1 on this benchmark's fits."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _operon(u, y, w, *, seed, operators, max_complexity, options):
    try:
        from pyoperon.sklearn import SymbolicRegressor
    except ImportError as exc:  # pragma: no cover - pyoperon is a base dependency
        raise BackendUnavailableError(
            "The 'operon' backend needs pyoperon: pip install pyoperon (it is a dependency of napari-binn)."
        ) from exc
    settings = dict(OPERON_DEFAULTS)
    settings.update(options)
    with_library = bool(settings.pop("library_candidates", True))
    symbols = ",".join([_OPERON_SYMBOLS[o] for o in operators] + ["constant", "variable"])
    u_scale = float(np.max(np.abs(u))) or 1.0
    x, t = _replicate_by_weight(u / u_scale, y, w)
    reg = SymbolicRegressor(
        allowed_symbols=symbols,
        objectives=["r2", "length"],
        max_length=int(max_complexity),
        max_depth=max(6, int(max_complexity) // 2),
        random_state=int(seed),
        n_threads=int(settings.pop("n_threads", _operon_threads())),
        **settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg.fit(x[:, None], t)
    out = []
    for sol in reg.pareto_front_:
        model = reg.get_model_string(sol["tree"], precision=15)
        try:
            out.append(_operon_to_sympy(model, u_scale))
        except (sp.SympifyError, TypeError, ValueError):
            continue
    if with_library:
        out.extend(_library(u, y, w, seed=seed, operators=operators, max_complexity=max_complexity, options={}))
    return out


# -- pysr -------------------------------------------------------------------------------------------------------


def _pysr(u, y, w, *, seed, operators, max_complexity, options):
    try:
        from pysr import PySRRegressor
    except Exception as exc:  # ImportError, or Julia failing to start while pysr is imported
        raise BackendUnavailableError(
            "The 'pysr' backend needs PySR and a Julia runtime: pip install 'napari-binn[pysr]' "
            "(PySR installs Julia on first use; or install Julia >= 1.10 from https://julialang.org)."
        ) from exc
    u_scale = float(np.max(np.abs(u))) or 1.0
    settings = dict(niterations=40, populations=8, population_size=40, maxsize=int(max_complexity))
    settings.update(options)
    reg = PySRRegressor(
        binary_operators=[_PYSR_BINARY[o] for o in operators if o in _PYSR_BINARY],
        unary_operators=[_PYSR_UNARY[o] for o in operators if o in _PYSR_UNARY],
        random_state=int(seed),
        deterministic=True,
        parallelism="serial",
        progress=False,
        verbosity=0,
        **settings,
    )
    reg.fit((u / u_scale)[:, None], y, weights=w)
    x0 = sp.Symbol("x0")
    return [sp.sympify(e).xreplace({x0: U / u_scale}) for e in reg.equations_["sympy_format"]]


# -- library ----------------------------------------------------------------------------------------------------
# Terms of the (rescaled) density x = u / u_scale; nonlinear ones carry one shape parameter fitted by variable
# projection (grid then bounded Brent on the linear least-squares residual).

_LINEAR_TERMS = {
    "1": lambda x: np.ones_like(x),
    "u": lambda x: x,
    "u^2": lambda x: x**2,
    "u^3": lambda x: x**3,
    "u^1.5": lambda x: x**1.5,
    "sqrt(u)": lambda x: np.sqrt(x),
    "log(u)": lambda x: np.log(x),
    "1/u": lambda x: 1.0 / x,
}
_LINEAR_SYMPY = {
    "1": sp.Integer(1), "u": U, "u^2": U**2, "u^3": U**3, "u^1.5": U ** sp.Rational(3, 2),
    "sqrt(u)": sp.sqrt(U), "log(u)": sp.log(U), "1/u": 1 / U,
}
# name: (function of x and p, sympy in x and p, bounds of p, operators needed)
_P = sp.Symbol("p")
_X = sp.Symbol("x", positive=True)
_NONLINEAR_TERMS = {
    "u^m": (lambda x, p: x**p, _X**_P, (-3.0, 4.0), {"pow"}),
    "exp(a u)": (lambda x, p: np.exp(p * x), sp.exp(_P * _X), (-8.0, 8.0), {"exp"}),
    "u exp(a u)": (lambda x, p: x * np.exp(p * x), _X * sp.exp(_P * _X), (-8.0, 8.0), {"exp"}),
    "u^2 exp(a u)": (lambda x, p: x**2 * np.exp(p * x), _X**2 * sp.exp(_P * _X), (-8.0, 8.0), {"exp"}),
    "u/(k+u)": (lambda x, p: x / (p + x), _X / (_P + _X), (1e-3, 20.0), {"/"}),
    "1/(k+u)": (lambda x, p: 1.0 / (p + x), 1 / (_P + _X), (1e-3, 20.0), {"/"}),
}
_LINEAR_NEEDS = {"log(u)": {"log"}, "1/u": {"/"}, "sqrt(u)": set(), "u^1.5": set()}


def _lstsq(A, y, sw):
    coef, *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
    r = (A @ coef - y) * sw
    return coef, float(r @ r)


def _fit_subset(cols, nonlinear, x, y, sw):
    """Least squares of y on the columns (and one nonlinear term whose parameter is profiled)."""
    if nonlinear is None:
        A = np.column_stack(cols)
        coef, sse = _lstsq(A, y, sw)
        return coef, None, sse
    f, _, (lo, hi), _ = _NONLINEAR_TERMS[nonlinear]

    def profile(p):
        with np.errstate(all="ignore"):
            col = f(x, p)
        if not np.all(np.isfinite(col)):
            return math.inf
        return _lstsq(np.column_stack([*cols, col]), y, sw)[1]

    grid = np.linspace(lo, hi, 25)
    sses = np.array([profile(p) for p in grid])
    i = int(np.argmin(sses))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(profile, bounds=(a, b), method="bounded", options={"xatol": 1e-10})
    p = float(res.x) if res.fun <= sses[i] else float(grid[i])
    coef, sse = _lstsq(np.column_stack([*cols, f(x, p)]), y, sw)
    return coef, p, sse


def _library(u, y, w, *, seed, operators, max_complexity, options):
    keep_positive = bool(np.all(u > 0))  # log, 1/u and fractional powers need u > 0
    ops = set(operators)
    u_scale = float(np.max(np.abs(u))) or 1.0
    x = u / u_scale
    sw = np.sqrt(w / w.sum())
    linear = [
        n for n in _LINEAR_TERMS
        if _LINEAR_NEEDS.get(n, set()) <= ops and (keep_positive or n not in ("log(u)", "1/u", "sqrt(u)", "u^1.5"))
    ]
    nonlinear = [n for n, spec in _NONLINEAR_TERMS.items() if spec[3] <= ops]
    if not keep_positive:
        nonlinear = [n for n in nonlinear if n != "u^m"]
    max_terms = int(options.get("max_terms", 3))
    per_size = int(options.get("keep_per_size", 8))
    results = []
    for size in range(1, max_terms + 1):
        fits = []
        for lin in itertools.combinations(linear, size):
            coef, _, sse = _fit_subset([_LINEAR_TERMS[n](x) for n in lin], None, x, y, sw)
            fits.append((sse, lin, None, coef, None))
        for lin in itertools.combinations(linear, size - 1):
            cols = [_LINEAR_TERMS[n](x) for n in lin]
            for nl in nonlinear:
                coef, p, sse = _fit_subset(cols, nl, x, y, sw)
                fits.append((sse, lin, nl, coef, p))
        fits.sort(key=lambda t: t[0])
        results.extend(fits[:per_size])
    out = []
    for _sse, lin, nl, coef, p in results:
        terms = [_LINEAR_SYMPY[n].xreplace({U: U / u_scale}) for n in lin]
        if nl is not None:
            terms.append(_NONLINEAR_TERMS[nl][1].xreplace({_P: sp.Float(p, 15), _X: U / u_scale}))
        out.append(sp.Add(*[sp.Float(float(c), 15) * t for c, t in zip(coef, terms)]))
    return out


BACKENDS = {"operon": _operon, "pysr": _pysr, "library": _library}


def propose(backend: str, u, y, w, *, seed: int, operators, max_complexity: int, options: dict) -> list[sp.Expr]:
    """Candidate closed forms (sympy in u, Float constants) proposed by ``backend`` for one seed."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    return BACKENDS[backend](
        np.asarray(u, float), np.asarray(y, float), np.asarray(w, float),
        seed=seed, operators=operators, max_complexity=max_complexity, options=dict(options),
    )
