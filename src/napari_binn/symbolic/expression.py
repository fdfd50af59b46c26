"""Closed-form expressions of one density variable u: sympy handling, constant refits, snapping, rounding, units,
the restricted parser that reads them back from text, and the rules for showing equations to people.

An :class:`Expression` is what a biologist reads (text, LaTeX), what ``napari_binn.pde.simulate`` calls (a
vectorised numpy function of u, µm²/h for D and 1/h for G) and what ``fit_mechanistic`` re-estimates (its
constants turned into free symbols).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import sympy as sp
from scipy.optimize import least_squares

from ..errors import InputError

__all__ = [
    "U",
    "Constant",
    "Expression",
    "ExtrapolationWarning",
    "ExpressionError",
    "parse_expression",
    "DEFAULT_UNITS",
    "readable",
    "equation_text",
    "equation_latex",
    "complexity",
    "canonicalize",
    "refit_constants",
    "snap_constants",
    "constant_units",
    "parameter_units",
    "round_significant",
]

#: The density symbol every expression is written in (densities are non-negative; positive lets sympy split logs).
U = sp.Symbol("u", positive=True)


class ExtrapolationWarning(UserWarning):
    """A discovered closed form was evaluated outside the density range it was fitted on."""


class ExpressionError(InputError):
    """Text that is not a closed form napari-binn reads (the message says why)."""


# -- the restricted parser ---------------------------------------------------------------------------------------

_FUNCTIONS = frozenset({"exp", "log", "sqrt", "Abs", "sign", "tanh", "Max", "Min", "pi", "E"})
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|[-+*/^(),]))")
_PARAMETER = re.compile(r"[A-Za-z]\w{0,15}")


def _literal_digits(literal: str) -> int:
    """Significant digits of a decimal literal, trailing zeros included (``1100.00`` -> 6, ``4.399e-5`` -> 4)."""
    mantissa = re.split("[eE]", literal)[0].replace(".", "")
    return max(len(mantissa.lstrip("0")) or len(mantissa), 1)


def parse_expression(text: str, *, parameters: bool = False, precision: int | None = 15) -> sp.Expr:
    """Read a closed form written as text, refusing anything but arithmetic; nothing in ``text`` is executed.

    Allowed: numbers, ``u`` (the density, :data:`U`), ``t``, + - * / ** ^, parentheses and exp, log, sqrt, Abs, Max, Min,
    sign, tanh, pi, E; with ``parameters`` also names such as ``D_0`` or ``r`` (real symbols). Decimal numbers
    become sympy Floats of ``precision`` significant digits (15, sympy's default); ``precision=None`` keeps the
    digits each number is written with (``840.4`` -> 4), so that text napari-binn printed reads back to an
    expression that prints the same text. Raises :class:`ExpressionError` naming what is not allowed.
    """
    text = str(text)
    local: dict[str, sp.Basic] = {}
    pieces: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ExpressionError(f"expression {text!r}: unexpected character {text[pos]!r}")
        number, name, op = m.groups()
        if number is not None:
            key = f"_n{len(local)}"
            exact = not any(c in number for c in ".eE")
            local[key] = sp.Integer(number) if exact else sp.Float(
                number, _literal_digits(number) if precision is None else precision)
            pieces.append(key)
        elif name is not None:
            if name in _FUNCTIONS:
                pieces.append(name)
            elif name in ("u", "t") or (parameters and _PARAMETER.fullmatch(name)):
                key = f"_s{len(local)}"
                local[key] = U if name == "u" else sp.Symbol(name, real=True)
                pieces.append(key)
            else:
                raise ExpressionError(f"expression {text!r} uses a name that is not allowed: {name!r}")
        else:
            pieces.append("**" if op == "^" else op)
        pos = m.end()
    if not pieces:
        raise ExpressionError("the expression is empty")
    if len(text) > MAX_TEXT:
        raise ExpressionError(f"expression of {len(text)} characters: closed forms napari-binn reads have at most "
                              f"{MAX_TEXT}")
    try:
        # unevaluated first: a number to a huge power (9**9**9**9) would take forever to evaluate
        unevaluated = sp.sympify(" ".join(pieces), locals=local, rational=False, evaluate=False)
        _check_sizes(unevaluated, text)
        expr = sp.sympify(" ".join(pieces), locals=local, rational=False)
    except (sp.SympifyError, SyntaxError, TypeError, ValueError) as exc:
        if isinstance(exc, ExpressionError):
            raise
        raise ExpressionError(f"expression {text!r} could not be parsed ({type(exc).__name__})") from None
    if not isinstance(expr, sp.Expr):
        raise ExpressionError(f"expression {text!r} is not a closed form")
    if expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
        raise ExpressionError(f"expression {text!r} is not finite")
    return expr


#: the longest expression text, the largest exponent and the largest number the parser accepts
MAX_TEXT, MAX_EXPONENT, MAX_NUMBER = 2000, 64.0, 1e300


def _at_most(value, limit: float) -> bool:
    try:
        return abs(complex(value)) <= limit
    except (TypeError, ValueError, OverflowError):
        return False


def _check_sizes(expr: sp.Basic, text: str) -> None:
    """Refuse exponents beyond ±MAX_EXPONENT and numbers beyond MAX_NUMBER (no closed form of a density needs
    them; evaluating them could hang or overflow)."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Number) and not _at_most(node, MAX_NUMBER):
            raise ExpressionError(f"expression {text!r}: the number {node} is too large (at most {MAX_NUMBER:g})")
        if isinstance(node, sp.Pow) and not node.exp.free_symbols:
            if not _at_most(sp.N(node.exp, 15), MAX_EXPONENT):
                raise ExpressionError(f"expression {text!r}: the exponent {sp.sstr(node.exp)} is too large "
                                      f"(at most ±{MAX_EXPONENT:g})")


# -- equations for people ----------------------------------------------------------------------------------------

#: Units of D(u) and G(u) when a closed form does not carry its own.
DEFAULT_UNITS = {"D": "µm²/h", "G": "1/h"}

_DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+(?:[eE][-+]?\d+)?)")


def _short(match: re.Match, digits: int) -> str:
    text = f"{float(match.group(1)):.{digits}g}"
    return re.sub(r"e([-+])0*(\d)", lambda e: f"e{'-' if e.group(1) == '-' else ''}{e.group(2)}", text)


_SMALL_POWER = re.compile(r"(?<![\w.])(\d+)(?:\.(\d*))?[eE]\+?0*([0-4])(?![\w.])")


def _plain(match: re.Match) -> str:
    """8.4e+2 -> 840 (the digits the mantissa shows, no more)."""
    whole, frac, power = match.group(1), match.group(2) or "", int(match.group(3))
    shown = len((whole + frac).lstrip("0")) or 1
    return f"{float(match.group(0)):.{max(shown, len(whole) + power)}g}"


def readable(text: str, digits: int | None = None) -> str:
    """sympy text for people: u**2 -> u^2, 2*u -> 2·u, 8.4e+2 -> 840 (powers of ten up to 4 written out); with
    ``digits``, decimals keep at most that many significant digits and no padding (1512. -> 1512,
    1100.00 -> 1100, 3.5e-05 -> 3.5e-5)."""
    if digits is not None:
        text = _DECIMAL.sub(lambda m: _short(m, digits), text)
    text = _SMALL_POWER.sub(_plain, text)
    return text.replace("**", "^").replace("*", "·")


def equation_text(key: str, f, *, pretty: bool = False, digits: int | None = None) -> str:
    """``'D(u) = <closed form>   [<units>]'`` for the selected form ``f`` (a DiscoveredFunction or an Expression);
    ``pretty``: the :func:`readable` text (with ``digits``) rather than sympy's."""
    text = readable(f.text, digits) if pretty else f.text
    return f"{key}(u) = {text}   [{f.units or DEFAULT_UNITS.get(key, '')}]"


def equation_latex(key: str, f) -> str:
    """The equation as matplotlib mathtext: ``$D(u) = <LaTeX>$   [$<units>$]``."""
    units = (f.units or DEFAULT_UNITS.get(key, "")).replace("µm²", r"\mu m^2")
    return f"${key}(u) = {f.latex or f.text}$   [${units}$]"


def as_float(value) -> float:
    """A number read from JSON: None (how non-finite numbers are written) is NaN."""
    return math.nan if value is None else float(value)


def complexity(expr: sp.Expr) -> int:
    """Size of the expression tree, binary-operator style (PySR-like: a + b + c counts 5), where a fitted (Float)
    constant counts 2 (PySR's complexity_of_constants=2), so an extra free constant is never free."""
    if not expr.args:
        return 2 if isinstance(expr, sp.Float) else 1
    own = len(expr.args) - 1 if isinstance(expr, (sp.Add, sp.Mul)) else 1
    if isinstance(expr, sp.Mul) and expr.args[0] == -1:  # unary minus
        return complexity(sp.Mul(*expr.args[1:])) + 1
    return own + sum(complexity(a) for a in expr.args)


def free_floats(expr: sp.Expr) -> list[sp.Float]:
    """Numeric (Float) constants of ``expr`` in a deterministic order (the fitted constants)."""
    seen: list[sp.Float] = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Float) and node not in seen:
            seen.append(node)
    return seen


def _shape_constants(expr: sp.Expr) -> set:
    """Floats that set a shape (exponents, arguments of exp/log) rather than a scale or an offset."""
    out = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Pow):
            out |= node.exp.atoms(sp.Float)
        elif isinstance(node, (sp.exp, sp.log)):
            out |= node.args[0].atoms(sp.Float)
    return out


def _integerize(expr: sp.Expr) -> sp.Expr:
    """Turn Floats that are exactly 0 or +-1 (anywhere) or small integers in shape positions (exponents, exp/log
    arguments) into Integers, so that they stop counting as fitted constants (operon writes 1.0*x, x^2.0)."""
    shape = _shape_constants(expr)
    reps = {
        f: sp.Integer(round(float(f)))
        for f in expr.atoms(sp.Float)
        if math.isfinite(float(f)) and abs(float(f)) <= 4 and float(f) == round(float(f))
        and (abs(float(f)) <= 1 or f in shape)
    }
    return expr.xreplace(reps) if reps else expr


def canonicalize(expr: sp.Expr, *, simplify: bool = True) -> sp.Expr:
    """A tidy, equivalent form: exact-integer Floats become integers, logs are split, small trees simplified."""
    expr = _integerize(sp.sympify(expr))
    expr = sp.expand_log(expr, force=True)
    if simplify and sp.count_ops(expr) <= 40:
        try:
            expr = sp.simplify(expr)
        except Exception:  # sympy occasionally fails on exotic trees; the unsimplified form is still valid
            pass
        expr = _integerize(expr)
    if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise ValueError(f"expression {expr} is not finite")
    return expr


def _lambdify(expr: sp.Expr, symbols: list[sp.Symbol]):
    return sp.lambdify([U, *symbols], expr, modules="numpy")


def _evaluate(fn, u: np.ndarray, *params) -> np.ndarray:
    with np.errstate(all="ignore"):
        out = np.asarray(fn(u, *params), dtype=float)
    return np.broadcast_to(out, u.shape)


def weighted_mse(pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted mean squared error; inf when the prediction is not finite."""
    r = pred - y
    if not np.all(np.isfinite(r)):
        return math.inf
    return float(np.sum(w * r * r) / np.sum(w))


@dataclass
class FitResult:
    expr: sp.Expr
    loss: float
    values: np.ndarray  # fitted constant values, in free_floats(expr) order
    stderr: np.ndarray  # their standard errors from the Jacobian (nan if unidentifiable)


def refit_constants(expr: sp.Expr, u: np.ndarray, y: np.ndarray, w: np.ndarray, *, max_nfev: int = 50) -> FitResult:
    """Re-estimate all Float constants of ``expr`` by weighted least squares (scipy), starting from their values.

    ``max_nfev`` bounds the Levenberg-Marquardt iterations (each costs one evaluation per constant).
    """
    floats = free_floats(expr)
    if not floats:
        fn = _lambdify(expr, [])
        loss = weighted_mse(_evaluate(fn, u), y, w)
        return FitResult(expr, loss, np.zeros(0), np.zeros(0))
    syms = sp.symbols(f"_c0:{len(floats)}")
    templ = expr.xreplace(dict(zip(floats, syms)))
    fn = _lambdify(templ, list(syms))
    sw = np.sqrt(w / np.sum(w))
    x0 = np.array([float(f) for f in floats])

    def resid(p):
        r = sw * (_evaluate(fn, u, *p) - y)
        return np.where(np.isfinite(r), r, 1e6)

    r0 = resid(x0)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            method = "lm" if u.size > len(x0) else "trf"
            sol = least_squares(resid, x0, method=method, max_nfev=max_nfev * (len(x0) + 1), x_scale="jac")
            p = sol.x if np.sum(sol.fun**2) <= np.sum(r0**2) else x0
        jac = sol.jac
    except Exception:  # a diverging refit keeps the starting constants
        p, jac = x0, None
    pred = _evaluate(fn, u, *p)
    loss = weighted_mse(pred, y, w)
    stderr = np.full(len(p), np.nan)
    if jac is not None and np.isfinite(loss):
        # residuals are sqrt(w/sum w)-scaled, so sum(r**2) is the weighted MSE L and Cov = L/(n-p) (J^T J)^-1
        dof = max(u.size - len(p), 1)
        with np.errstate(all="ignore"):
            try:
                cov = np.linalg.pinv(jac.T @ jac) * loss / dof
                stderr = np.sqrt(np.clip(np.diag(cov), 0, None))
            except (np.linalg.LinAlgError, ValueError):
                pass
    new = templ.xreplace({s: sp.Float(float(v), 15) for s, v in zip(syms, p)})
    return FitResult(new, loss, np.asarray(p, dtype=float), stderr)


def _snap_targets(value: float, shape: bool) -> list[float]:
    targets = [0.0]
    for step in (1.0, 0.5) if shape else ():
        n = round(value / step) * step
        if n != 0 and abs(n) <= 4 and abs(value - n) <= 0.1 and n not in targets:
            targets.append(n)
    return [t for t in targets if t != value]


def _as_number(v: float) -> sp.Expr:
    return sp.Integer(int(v)) if v == int(v) else sp.Rational(int(round(2 * v)), 2)


def snap_constants(
    fit: FitResult, u: np.ndarray, y: np.ndarray, w: np.ndarray, *, rel_tol: float = 0.02, max_constants: int = 6
) -> FitResult:
    """Drop constants (1e-6 + f -> f) and snap shape constants (exponents, exp/log arguments) to small integers
    or halves (u**2.003 -> u**2, exp(0.998*u) -> exp(u)) while the loss allows.

    A snap is kept when the refitted weighted MSE grows by less than ``rel_tol`` (relative) plus 1e-10 of the
    target's variance, so that exact data still snap and noisy data do not lose real terms.
    """
    floor = 1e-10 * float(np.average((y - np.average(y, weights=w)) ** 2, weights=w)) + 1e-300
    best = fit
    if len(fit.values) > max_constants:
        return fit
    changed = True
    while changed:
        changed = False
        shape = _shape_constants(best.expr)
        for f in free_floats(best.expr):
            for target in _snap_targets(float(f), f in shape):
                try:
                    trial_expr = canonicalize(best.expr.xreplace({f: _as_number(target)}), simplify=False)
                except (ValueError, TypeError):
                    continue
                trial = refit_constants(trial_expr, u, y, w)
                if trial.loss <= best.loss * (1 + rel_tol) + floor:
                    best = trial
                    changed = True
                    break
            if changed:
                break
    if best is not fit:
        simplified = canonicalize(best.expr)
        if simplified != best.expr:
            best = refit_constants(simplified, u, y, w)
    return best


def round_significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def supported_digits(value: float, spread: float, *, max_digits: int = 6) -> int:
    """Significant digits of ``value`` that an uncertainty ``spread`` supports (1 .. max_digits)."""
    if not math.isfinite(spread) or spread <= 0 or value == 0:
        return max_digits if spread == 0 or value == 0 else 2
    return int(np.clip(math.ceil(math.log10(abs(value) / spread)) + 1, 1, max_digits))


# -- units -------------------------------------------------------------------------------------------------------
# A unit is a pair (power of the output unit, power of the density unit).


def _unit_of(expr, unknown: dict, values: dict, constraints: list) -> tuple:
    """The unit of ``expr`` as a pair of expressions linear in the constants' unknown unit powers (``unknown``: a
    pair of symbols per constant, a Float or a Symbol), adding to ``constraints`` what dimensional consistency
    requires: the terms of a sum share one unit; arguments of exp, log and the like, and non-numeric exponents,
    are dimensionless; an exponent that is a number or a constant (its value in ``values``) is dimensionless and
    scales its base's unit."""
    zero = (sp.Integer(0), sp.Integer(0))
    if expr in unknown:
        return unknown[expr]
    if expr == U:
        return (sp.Integer(0), sp.Integer(1))
    if expr.is_Number or not expr.args:
        return zero
    if isinstance(expr, sp.Add):
        units = [_unit_of(a, unknown, values, constraints) for a in expr.args]
        for other in units[1:]:
            constraints.extend((other[0] - units[0][0], other[1] - units[0][1]))
        return units[0]
    if isinstance(expr, sp.Mul):
        total = zero
        for a in expr.args:
            ua = _unit_of(a, unknown, values, constraints)
            total = (total[0] + ua[0], total[1] + ua[1])
        return total
    if isinstance(expr, sp.Pow):
        base, ex = expr.args
        if ex in unknown or ex.is_Number:
            if ex in unknown:
                constraints.extend(unknown[ex])
            value = values.get(ex, ex)
            power = sp.Rational(str(float(value))) if not isinstance(value, (sp.Integer, sp.Rational)) else value
            ub = _unit_of(base, unknown, values, constraints)
            return (ub[0] * power, ub[1] * power)
        constraints.extend(_unit_of(ex, unknown, values, constraints))
        constraints.extend(_unit_of(base, unknown, values, constraints))
        return zero
    if isinstance(expr, (sp.Max, sp.Min, sp.Abs)):  # the unit of its (non-numeric) arguments
        units = [_unit_of(a, unknown, values, constraints) for a in expr.args if not a.is_Number]
        for other in units[1:]:
            constraints.extend((other[0] - units[0][0], other[1] - units[0][1]))
        return units[0] if units else zero
    for a in expr.args:  # exp, log, sqrt-like functions: dimensionless argument and value
        # (a density alone, as in log(u), is read as the number it is in its unit: no constraint)
        constraints.extend(c for c in _unit_of(a, unknown, values, constraints) if not sp.sympify(c).is_Number)
    return zero


def _solve_units(expr, constants: list, values: dict, y_units: str, u_units: str) -> list[str]:
    """Unit strings of ``constants`` (atoms of ``expr``) for ``expr`` in ``y_units`` with u in ``u_units``; "" where
    the constraints leave a unit free or contradict each other."""
    unknown = {c: (sp.Dummy(f"p{i}"), sp.Dummy(f"q{i}")) for i, c in enumerate(constants)}
    constraints: list = []
    whole = _unit_of(expr, unknown, values, constraints)
    constraints.extend((whole[0] - 1, whole[1]))
    constraints = [c for c in (sp.expand(c) for c in constraints) if c != 0]
    symbols = [s for pair in unknown.values() for s in pair]
    solution: dict = {}
    if symbols:
        solved = sp.linsolve(constraints, symbols) if constraints else sp.FiniteSet(tuple(symbols))
        if solved:
            solution = dict(zip(symbols, next(iter(solved))))
    out = []
    for p, q in unknown.values():
        unit = (solution.get(p), solution.get(q))
        out.append(_format_unit(unit, y_units, u_units) if all(v is not None and v.is_Number for v in unit) else "")
    return out


def _format_unit(unit, y_units: str, u_units: str) -> str:
    parts = []
    for power, name in zip(unit, (y_units, u_units)):
        power = sp.nsimplify(power)
        if power == 0 or not name:
            continue
        label = name if "/" not in name and "·" not in name and " " not in name else f"({name})"
        if power == 1:
            parts.append(name)
        else:
            p = float(power)
            parts.append(f"{label}^{int(p) if p == int(p) else round(p, 3)}")
    return "·".join(parts) if parts else "1"


def constant_units(expr: sp.Expr, y_units: str, u_units: str) -> dict[sp.Float, str]:
    """Unit string of every Float constant of ``expr``, given the units of the value and of u.

    Dimensional analysis: each constant's unit is an unknown power of the value's unit and of u's unit, fixed by
    the constraints that the whole has the value's unit, the terms of a sum share one unit, and arguments of
    exp/log and exponents are dimensionless (D0 in D0·u^2 is µm²/h·u^-2; b in D0/(1 + b·u) is u^-1). A constant
    the constraints do not fix (D0/(a + b·u) leaves a scale free), or any constant of an expression that is not
    dimensionally consistent, gets "" (unknown).
    """
    floats = free_floats(expr)
    return dict(zip(floats, _solve_units(expr, floats, {}, y_units, u_units)))


def parameter_units(expr: sp.Expr, values: dict[str, float], y_units: str, u_units: str) -> dict[str, str]:
    """:func:`constant_units` for an expression whose constants are symbols (``D_0``, ``r``...) with the values
    ``values`` (by name; a constant's unit can depend on an exponent's value, as in ``G_0*u**G_2``). u is the
    symbol named "u", whatever its assumptions."""
    expr = sp.sympify(expr)
    expr = expr.xreplace({s: U for s in expr.free_symbols if s.name == "u"})
    symbols = sorted((s for s in expr.free_symbols if s.name in values), key=lambda s: s.name)
    units = _solve_units(expr, symbols, {s: float(values[s.name]) for s in symbols}, y_units, u_units)
    return {s.name: unit for s, unit in zip(symbols, units)}


# -- the expression object ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant:
    """One fitted constant of a closed form: value (rounded), its uncertainty, the digits kept, its unit."""

    name: str
    value: float
    stderr: float
    digits: int
    units: str

    def __str__(self) -> str:
        err = "" if not math.isfinite(self.stderr) else f" ± {self.stderr:.2g}"
        return f"{self.name} = {self.value:.{self.digits}g}{err} {self.units}".rstrip()

    def to_dict(self) -> dict:
        """Plain types for JSON (a non-finite stderr stays a float: results bundles write it as null)."""
        return {"name": self.name, "value": self.value, "stderr": self.stderr, "digits": self.digits,
                "units": self.units}

    @classmethod
    def from_dict(cls, d: dict) -> Constant:
        """Inverse of :meth:`to_dict` (null numbers read as NaN)."""
        return cls(str(d["name"]), as_float(d["value"]), as_float(d.get("stderr")), int(d.get("digits", 6)),
                   str(d.get("units", "")))


@dataclass(frozen=True)
class Expression:
    """A closed form f(u) with its fit statistics, evaluable as a vectorised numpy function.

    sympy: the expression in the symbol ``u`` (constants rounded to what the data support).
    u_range: (min, max) density it was fitted on (units of u); calls outside it emit one ExtrapolationWarning.
    loss: weighted mean squared error on the samples ((value units)²); complexity: tree size.
    constants: the fitted constants with uncertainties and units; units: the value's units.
    """

    sympy: sp.Expr
    u_range: tuple[float, float]
    loss: float
    complexity: int
    constants: tuple[Constant, ...] = ()
    units: str = ""
    name: str = "f"
    _fn: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fn", sp.lambdify([U], self.sympy, modules="numpy"))

    @property
    def text(self) -> str:
        """Plain-text form, e.g. ``0.5 - 0.55*u``."""
        return sp.sstr(self.sympy)

    @property
    def latex(self) -> str:
        """LaTeX form (without $ delimiters)."""
        return sp.latex(self.sympy)

    def __call__(self, u, *, warn: bool = True) -> np.ndarray:
        """Evaluate at densities ``u`` (any shape; units of u); warns once if any u is outside ``u_range`` (not with
        ``warn=False``: for internal comparisons, without touching the process-wide warning filters)."""
        u = np.asarray(u, dtype=float)
        lo, hi = self.u_range
        tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
        with np.errstate(invalid="ignore"):
            outside = np.any((u < lo - tol) | (u > hi + tol))
        if outside and warn:
            warnings.warn(
                f"{self.name}(u) = {self.text} was fitted on u in [{lo:.4g}, {hi:.4g}]; evaluating it at "
                f"u in [{np.nanmin(u):.4g}, {np.nanmax(u):.4g}] extrapolates.",
                ExtrapolationWarning,
                stacklevel=2,
            )
        with np.errstate(all="ignore"):
            out = np.asarray(self._fn(u), dtype=float)
        return np.broadcast_to(out, u.shape).copy()

    def parametrized(self, prefix: str) -> tuple[sp.Expr, dict[str, float]]:
        """The expression with its constants replaced by symbols ``{prefix}_0, ...`` and their values by name."""
        floats = free_floats(self.sympy)
        syms = [sp.Symbol(f"{prefix}_{i}", real=True) for i in range(len(floats))]
        return self.sympy.xreplace(dict(zip(floats, syms))), {s.name: float(f) for s, f in zip(syms, floats)}

    def with_constants(self, values, digits=None) -> Expression:
        """Copy with constants (in ``constants`` order) replaced by ``values``, each kept to its ``digits``
        significant digits (a sequence in the same order; default 6), which is also how many it prints with."""
        floats = free_floats(self.sympy)
        if len(values) != len(floats):
            raise ValueError(f"{self.name}: expected {len(floats)} constant values, got {len(values)}.")
        digits = [6] * len(floats) if digits is None else [int(d) for d in digits]
        new = self.sympy.xreplace({f: sp.Float(round_significant(float(v), d), d)
                                   for f, v, d in zip(floats, values, digits)})
        consts = tuple(
            replace(c, value=float(v), digits=d, stderr=math.nan) for c, v, d in zip(self.constants, values, digits)
        )
        return replace(self, sympy=new, constants=consts)

    def to_dict(self) -> dict:
        """Plain types for JSON: the closed form as text (and LaTeX, for people), its fit statistics and constants."""
        return {"name": self.name, "text": self.text, "latex": self.latex, "units": self.units,
                "u_range": [float(v) for v in self.u_range], "loss": self.loss, "complexity": self.complexity,
                "constants": [c.to_dict() for c in self.constants]}

    @classmethod
    def from_dict(cls, d: dict) -> Expression:
        """Inverse of :meth:`to_dict`: the text is read by :func:`parse_expression` (numbers keep their written
        digits, so the expression prints the same text again); raises ExpressionError for anything else."""
        lo, hi = d.get("u_range", (math.nan, math.nan))
        if not isinstance(d["text"], str):
            raise ExpressionError(f"'text' must be the closed form as text (e.g. \"0.5 - 0.001*u\"); "
                                  f"got {type(d['text']).__name__} {d['text']!r}")
        return cls(parse_expression(d["text"], precision=None), (as_float(lo), as_float(hi)), as_float(d.get("loss")),
                   int(d["complexity"]), tuple(Constant.from_dict(c) for c in d.get("constants", ())),
                   str(d.get("units", "")), str(d.get("name", "f")))

    def __repr__(self) -> str:
        return f"{self.name}(u) = {self.text}  [{self.units}; complexity {self.complexity}, loss {self.loss:.3g}]"
