"""Mechanistic model fitting: PDE-constrained least squares of u_t = T(t)[div(D(u) grad u) + G(u) u].

:func:`fit_mechanistic` simulates a model from the first observed frame of a :class:`DensityField` on its mask
(no-flux edges) and adjusts the model's parameters so that the simulation matches every later frame at the
observed boxes. It reports estimates in physical units (D in µm²/h, r in 1/h, K in the field's density units),
95% intervals, residuals, the Gaussian log-likelihood, AIC and BIC.

Models: ``'fisher_kpp'`` (D, r, K), ``'porous_fisher'`` (D0, m, r, K; D(u) = D0 (u/K)^m), ``'allee'``
(D, r, K, A; G(u) = r (1 - u/K)(u/K - A)), ``'richards'`` (D, r, K, gamma; G(u) = r (1 - (u/K)^gamma)), or a
dict ``{'D': expr, 'G': expr, 'T': expr}`` of sympy expressions (or strings) in ``u`` (and ``t`` for ``T``)
whose other free symbols are the parameters; numeric constants in the expressions stay fixed.

Intervals: ``'wald'`` is sigma² (JᵀJ)⁻¹ from the finite-difference Jacobian at the optimum in the optimiser's
coordinates (log-parameters for positive ones, so the interval is asymmetric and stays positive); it costs one
extra Jacobian (2 simulations per parameter). ``'profile'`` re-optimises the other parameters along each
parameter until the log-likelihood drops by chi²₁(0.95)/2 = 1.92; it is the more faithful interval for skewed
likelihoods but costs roughly 4-8 re-fits per parameter (on the MDCK tissues the two agree to the digits shown,
at 8x the cost). Both treat the first frame as exact, but it is data too: its noise is the initial condition
and propagates into every predicted frame, so the residuals are not independent and on noisy data the
estimates scatter well beyond these intervals (Fisher–KPP, 64x64, 20 frames, 5% noise: ~2.5x the Wald s.e.;
the truth fell inside the Wald interval of r for 5 of 20 seeds). ``'wald+ic'`` (default) and ``'profile+ic'``
add that source: a parametric bootstrap over the initial frame only (noise of variance a + b u fitted to the
residuals, so that count noise spares empty boxes, added to the initial condition, reprocessed as the data were,
re-fitted against the same later frames by one Gauss-Newton step from the MLE; ``ic_samples`` draws,
1 + n_params simulations each), whose mean-square deviation from the MLE, per parameter on the log scale, is
added to the Wald (or profile) variance, with a Student quantile for the few draws (Welch-Satterthwaite degrees
of freedom). The two sources are independent (frame 0 versus later frames), so the variances add. On the
benchmark above this brings the truth inside the 95% intervals for 19/20 (D), 17/20 (r), 18/20 (K) seeds with
12 draws (re-run on 5 December, the same with the noise model a + b u and without), at ~2x the simulations
of the fit itself (benchmarks/mechanistic_recovery.py). It assumes independent noise in frame 0 of the same kind as in
later frames; with a noise-free first frame it is merely conservative. Coverage on Poisson counts and Allee
growth: benchmarks/interval_coverage.py (docs/method.md).
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field as dc_field, replace
from typing import Any

import numpy as np
from scipy import optimize

from ..errors import InputError
from ..field import DensityField, initial_state, noise_variance
from ..jobs import CancelToken, Progress, ProgressClock, is_cancelled, run_job
from .solver import SimulationError, simulate_job

__all__ = ["MechanisticFit", "fit_mechanistic", "fit_mechanistic_job", "MODEL_NAMES"]

MODEL_NAMES = ("fisher_kpp", "porous_fisher", "allee", "richards")

_Z95 = 1.959963984540054  # sqrt of the chi-squared (1 dof) 95% quantile 3.8415
_INTERVALS = ("wald+ic", "wald", "profile", "profile+ic", None)
_POSITIVE_NAMES = frozenset({"D", "D0", "D1", "D2", "r", "K", "gamma", "lambda"})
#: a refit's simulations after its first take at most this many times the first one's right-hand-side
#: evaluations (and never fewer than _TRIAL_RHS_FLOOR): 20x allows a trial some 400x stiffer than the start under
#: RKC, whose cost grows like the square root of the stiffness. A measured case: a held-out candidate of the polygon
#: case with G = G_0 + G_1 u + G_2 u/(G_3 u + exp(G_4 u)), whose trials put a pole of G just inside the densities,
#: spent 87 s and 115 s in single simulations (the usual: 160-864 evaluations, some 10-40 ms)
_TRIAL_RHS_FACTOR = 20
_TRIAL_RHS_FLOOR = 5000


class _Stop(Exception):
    """Internal: stop the optimiser (cancelled, or the simulation budget is spent)."""


# ----------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class _Model:
    """A parameterised reaction-diffusion model: D(u, p), G(u, p), optional T(t, p)."""

    name: str
    params: tuple[str, ...]
    D: Callable[[np.ndarray, Mapping[str, float]], np.ndarray]
    G: Callable[[np.ndarray, Mapping[str, float]], np.ndarray]
    T: Callable[[np.ndarray, Mapping[str, float]], np.ndarray] | None
    positive: frozenset[str]
    text: dict[str, str]
    #: D does not depend on u: simulations pass the number, so the solver takes its constant-D path
    d_constant: bool = False
    #: (c, m) for each term c u^m with both constants parameters (a power D, a Richards G): the optimiser moves c
    #: with m so that the term keeps its value at a typical density (see :class:`_Problem`)
    pivots: tuple[tuple[str, str], ...] = ()


def _pos(u: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(u, dtype=np.float64), 0.0)


def _builtin_model(name: str) -> _Model:
    const = lambda key: (lambda u, p: np.full(np.shape(u), float(p[key])))  # noqa: E731
    logistic = lambda u, p: p["r"] * (1.0 - np.asarray(u, float) / p["K"])  # noqa: E731
    if name == "fisher_kpp":
        return _Model(name, ("D", "r", "K"), const("D"), logistic, None,
                      frozenset({"D", "r", "K"}), {"D": "D", "G": "r (1 - u/K)"}, d_constant=True)
    if name == "porous_fisher":
        return _Model(name, ("D0", "m", "r", "K"),
                      lambda u, p: p["D0"] * (_pos(u) / p["K"]) ** p["m"], logistic, None,
                      frozenset({"D0", "m", "r", "K"}), {"D": "D0 (u/K)^m", "G": "r (1 - u/K)"})
    if name == "allee":
        return _Model(name, ("D", "r", "K", "A"), const("D"),
                      lambda u, p: p["r"] * (1.0 - np.asarray(u, float) / p["K"])
                      * (np.asarray(u, float) / p["K"] - p["A"]), None,
                      frozenset({"D", "r", "K"}), {"D": "D", "G": "r (1 - u/K)(u/K - A)"}, d_constant=True)
    if name == "richards":
        return _Model(name, ("D", "r", "K", "gamma"), const("D"),
                      lambda u, p: p["r"] * (1.0 - (_pos(u) / p["K"]) ** p["gamma"]), None,
                      frozenset({"D", "r", "K", "gamma"}), {"D": "D", "G": "r (1 - (u/K)^gamma)"},
                      d_constant=True)
    raise InputError(
        f"unknown mechanistic model {name!r}; use one of {', '.join(MODEL_NAMES)} or a dict "
        "{'D': sympy_expr, 'G': sympy_expr[, 'T': sympy_expr]} in the symbol u (and t)"
    )


def _sympy_model(spec: Mapping[str, Any]) -> _Model:
    import sympy

    unknown = set(spec) - {"D", "G", "T"}
    if unknown or not {"D", "G"} <= set(spec):
        raise ValueError(
            f"a sympy model is a dict with keys 'D', 'G' and optionally 'T'; got keys {sorted(spec)}"
        )
    exprs: dict[str, Any] = {}
    for key in ("D", "G", "T"):
        if key in spec and spec[key] is not None:
            try:
                exprs[key] = sympy.sympify(spec[key])
            except (sympy.SympifyError, TypeError) as err:
                raise ValueError(f"model[{key!r}] is not a sympy expression: {err}") from err
    symbols: dict[str, Any] = {}
    for key, expr in exprs.items():
        for s in expr.free_symbols:
            if s.name == "t" and key != "T":
                raise ValueError(f"model[{key!r}] depends on t; put time dependence in model['T']")
            if s.name == "u" and key == "T":
                raise ValueError("model['T'] must depend on t only, not on u")
            symbols.setdefault(s.name, s)
    params = tuple(sorted(n for n in symbols if n not in ("u", "t")))
    positive = frozenset(n for n in params if symbols[n].is_positive or n in _POSITIVE_NAMES)
    u_sym, t_sym = sympy.Symbol("u"), sympy.Symbol("t")

    def compile_(expr: Any, var: Any) -> Callable[[np.ndarray, Mapping[str, float]], np.ndarray]:
        # rename the user's symbols (whatever their assumptions) to plain ones so lambdify binds them by name
        plain = expr.xreplace({symbols[n]: sympy.Symbol(n) for n in symbols})
        f = sympy.lambdify((var, *[sympy.Symbol(n) for n in params]), plain, modules="numpy")

        def call(x: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            y = f(x, *[p[n] for n in params])
            # a fresh float64 array of x's shape is returned as it is (the solver calls this twice per step);
            # anything else (a number, another dtype, x itself) becomes a new array of x's shape
            if (type(y) is np.ndarray and y.dtype == np.float64 and y.shape == x.shape
                    and not np.may_share_memory(y, x)):
                return y
            return np.broadcast_to(np.asarray(y, dtype=np.float64), x.shape).copy()

        return call

    T = compile_(exprs["T"], t_sym) if "T" in exprs else None
    text = {k: str(v) for k, v in exprs.items()}
    d_constant = all(s.name != "u" for s in exprs["D"].free_symbols)
    return _Model("sympy", params, compile_(exprs["D"], u_sym), compile_(exprs["G"], u_sym), T,
                  positive, text, d_constant, _power_pairs([exprs["D"], exprs["G"]], set(params)))


def _power_pairs(exprs: list[Any], params: set[str]) -> tuple[tuple[str, str], ...]:
    """(c, m) for each product c u^m (u or max(u, floor) to a parameter's power m, times the parameter c) in
    ``exprs``; a parameter is paired once."""
    import sympy

    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for expr in exprs:
        for node in sympy.preorder_traversal(expr):
            if not isinstance(node, sympy.Mul):
                continue
            factors = sympy.Mul.make_args(node)
            coeffs = [f.name for f in factors if isinstance(f, sympy.Symbol) and f.name in params]
            powers = [f.exp.name for f in factors if isinstance(f, sympy.Pow) and isinstance(f.exp, sympy.Symbol)
                      and f.exp.name in params and _is_u(f.base)]
            if len(coeffs) == 1 and len(powers) == 1 and not {coeffs[0], powers[0]} & used:
                pairs.append((coeffs[0], powers[0]))
                used.update(pairs[-1])
    return tuple(pairs)


def _is_u(base: Any) -> bool:
    """Whether ``base`` is the density u, or u held above a floor (max(u, number), as ``pde_safe`` writes it)."""
    import sympy

    if isinstance(base, sympy.Symbol):
        return base.name == "u"
    return (isinstance(base, sympy.Max) and len(base.args) == 2
            and any(isinstance(a, sympy.Symbol) and a.name == "u" for a in base.args)
            and any(a.is_number for a in base.args))


def _resolve_model(model: str | Mapping[str, Any]) -> _Model:
    if isinstance(model, str):
        return _builtin_model(model)
    if isinstance(model, Mapping):
        return _sympy_model(model)
    raise ValueError(
        f"model must be a name ({', '.join(MODEL_NAMES)}) or a dict of sympy expressions; "
        f"got {type(model).__name__}"
    )


def _param_units(name: str, density_units: str) -> str:
    if name.startswith("D"):
        return "µm²/h"
    if name in ("r", "lambda"):
        return "1/h"
    if name == "K":
        return density_units
    if name in ("m", "A", "gamma"):
        return "dimensionless"
    return ""


#: the unit of each function's value, for a sympy model's constants (its optional T(t) is dimensionless)
_OUTPUT_UNITS = {"D": "µm²/h", "G": "1/h"}


def _expression_units(text: Mapping[str, str], params: Mapping[str, float], density_units: str) -> dict[str, str]:
    """Units of a sympy model's constants from where each stands in D(u) (µm²/h) and G(u) (1/h), with u in
    ``density_units`` (:func:`~napari_binn.symbolic.expression.parameter_units`): ``G_1`` in ``G_0 + G_1*u`` is 1/h
    per density unit, ``D_0`` in ``D_0*u**2`` µm²/h per density unit squared, which names alone cannot say.
    Constants of T(t) only, or whose unit the expressions leave open, are left out."""
    from ..symbolic.expression import parameter_units

    out: dict[str, str] = {}
    for key, y_units in _OUTPUT_UNITS.items():
        if key not in text:  # text: str() of the model's own sympy expressions, so it parses
            continue
        for name, unit in parameter_units(text[key], dict(params), y_units, density_units).items():
            if unit and name not in out:
                out[name] = unit
    if "T" in text:
        for name, unit in _time_units(text["T"], params).items():
            out.setdefault(name, unit)
    return out


def _time_units(text: str, params: Mapping[str, float]) -> dict[str, str]:
    """Units of T(t)'s constants that set its time scale: 'h' for one T holds as (t - t0)/tau, '1/h' for one held
    as k (t - t0). For T = F((t - t0)/tau), (dT/dtau) / (dT/dt) = -(t - t0)/tau, affine in t with slope -1/tau;
    for F(k (t - t0)) it is (t - t0)/k, slope 1/k."""
    import sympy

    expr = sympy.sympify(text)
    t = next((s for s in expr.free_symbols if s.name == "t"), None)
    if t is None:
        return {}
    values = {s: float(params[s.name]) for s in expr.free_symbols if s.name in params}
    ts = np.array([0.7, 2.3, 5.9, 13.0])
    dt = sympy.lambdify(t, sympy.diff(expr, t).subs(values), "numpy")
    out: dict[str, str] = {}
    for c, v in values.items():
        dc = sympy.lambdify(t, sympy.diff(expr, c).subs(values), "numpy")
        with np.errstate(all="ignore"):
            ratio = np.asarray(dc(ts), dtype=float) / np.asarray(dt(ts), dtype=float)
        if not np.all(np.isfinite(ratio)) or v == 0:
            continue
        slope, icpt = np.polyfit(ts, ratio, 1)
        if not np.allclose(slope * ts + icpt, ratio, rtol=1e-7, atol=1e-9 * np.abs(ratio).max()):
            continue
        for unit, expected in (("h", -1.0 / v), ("1/h", 1.0 / v)):
            if math.isclose(slope, expected, rel_tol=1e-6):
                out[c.name] = unit
    return out


# ----------------------------------------------------------------------------------------------- result


@dataclass
class MechanisticFit:
    """Result of :func:`fit_mechanistic`.

    params: all parameter values (fitted and fixed) in physical units (see ``units``).
    ci95: 95% interval (lo, hi) per fitted parameter ((value, value) for fixed ones; NaN when not identifiable).
    residuals: (T-1, Ny, Nx) predicted minus observed density for frames 1..T-1 (unweighted; NaN unobserved).
    predicted: (T, Ny, Nx) simulated density (frame 0 is the initial condition; NaN outside the mask).
    sigma: maximum-likelihood noise s.d. of the (weighted, for GLS) residuals, in density units.
    loglik: Gaussian log-likelihood at sigma; aic = 2k - 2 loglik and bic = k ln(n_obs) - 2 loglik with
    k = n_params + 1 (sigma counts as a parameter). n_params counts the fitted (non-fixed) model parameters.
    converged: the optimiser met its tolerance; otherwise ``message`` says why and gives the last state.
    n_evals: number of forward simulations used.
    """

    model: str
    params: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    units: dict[str, str]
    residuals: np.ndarray
    sigma: float
    loglik: float
    aic: float
    bic: float
    n_obs: int
    n_params: int
    converged: bool
    message: str
    n_evals: int
    predicted: np.ndarray
    fixed: tuple[str, ...] = ()
    weighting: str = "ols"
    intervals: str | None = "wald"
    expressions: dict[str, str] = dc_field(default_factory=dict)
    metadata: dict[str, Any] = dc_field(default_factory=dict)
    _model: _Model | None = dc_field(default=None, repr=False, compare=False)

    def D(self, u: Any) -> np.ndarray:
        """Fitted diffusivity D(u) in µm²/h at density u (field units)."""
        return self._model.D(np.asarray(u, dtype=np.float64), self.params)

    def G(self, u: Any) -> np.ndarray:
        """Fitted per-capita growth G(u) in 1/h at density u (reaction term is G(u) u)."""
        return self._model.G(np.asarray(u, dtype=np.float64), self.params)

    def T(self, t_h: Any) -> np.ndarray:
        """Fitted delay factor T(t) (dimensionless; 1 when the model has none) at time t in hours."""
        t = np.asarray(t_h, dtype=np.float64)
        if self._model.T is None:
            return np.ones_like(t)
        return self._model.T(t, self.params)

    def summary(self) -> str:
        """A plain-text table of estimates, intervals, units and fit statistics."""
        lines = [
            f"Mechanistic fit: {self.model}   D(u) = {self.expressions.get('D', '?')}   "
            f"G(u) = {self.expressions.get('G', '?')}"
            + (f"   T(t) = {self.expressions['T']}" if "T" in self.expressions else ""),
            f"weighting {self.weighting.upper()}, 95% intervals: {self.intervals or 'none'}, "
            f"converged: {'yes' if self.converged else 'NO'} ({self.n_evals} simulations)",
            f"{'parameter':<12}{'estimate':>14}  {'95% interval':<30}{'units'}",
        ]
        for name, value in self.params.items():
            if name in self.fixed:
                ci = "(fixed)"
            else:
                lo, hi = self.ci95.get(name, (math.nan, math.nan))
                ci = f"[{lo:.5g}, {hi:.5g}]"
            lines.append(f"{name:<12}{value:>14.6g}  {ci:<30}{self.units.get(name, '')}")
        lines.append(
            f"n_obs {self.n_obs}   sigma {self.sigma:.5g}   log-likelihood {self.loglik:.6g}   "
            f"AIC {self.aic:.6g}   BIC {self.bic:.6g}"
        )
        lines.append(f"message: {self.message}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        est = ", ".join(f"{k}={v:.4g}" for k, v in self.params.items())
        return f"MechanisticFit({self.model}: {est}; AIC {self.aic:.5g}; converged={self.converged})"

    def to_dict(self) -> dict[str, Any]:
        """Everything but the arrays, as plain types (results bundles keep ``predicted`` with the simulations;
        ``residuals`` follow from it and the data). Intervals are [low, high] lists."""
        return {"model": self.model, "params": dict(self.params),
                "ci95": {k: [float(v[0]), float(v[1])] for k, v in self.ci95.items()}, "units": dict(self.units),
                "sigma": self.sigma, "loglik": self.loglik, "aic": self.aic, "bic": self.bic, "n_obs": self.n_obs,
                "n_params": self.n_params, "converged": self.converged, "message": self.message,
                "n_evals": self.n_evals, "fixed": list(self.fixed), "weighting": self.weighting,
                "intervals": self.intervals, "expressions": dict(self.expressions), "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], field: DensityField,
                  predicted: np.ndarray | None = None) -> MechanisticFit:
        """Rebuild a fit from :meth:`to_dict` with a working model (``D(u)``, ``G(u)``, ``T(t)``).

        field: the data it was fitted to (for the residuals). predicted: its simulated (T, Ny, Nx) density, or None
        when the fit had none (all NaN). A built-in model is found by name; a sympy model is rebuilt from its
        ``expressions`` by the restricted parser of :mod:`napari_binn.symbolic.expression` (nothing is executed).
        Raises ValueError (an ExpressionError for an expression it refuses) when ``d`` does not describe a fit.
        """
        from ..symbolic.expression import as_float, parse_expression

        expressions = {str(k): str(v) for k, v in d.get("expressions", {}).items()}
        if d["model"] in MODEL_NAMES:
            spec = _builtin_model(d["model"])
        else:
            spec = _sympy_model({k: parse_expression(v, parameters=True) for k, v in expressions.items()})
        params = {str(k): as_float(v) for k, v in d["params"].items()}
        if set(params) != set(spec.params):
            raise ValueError(f"parameters {sorted(params)} do not match the model's {sorted(spec.params)}")
        if predicted is None:
            predicted = np.full(field.u.shape, np.nan)
        predicted = np.where(field.mask[None], np.asarray(predicted, dtype=np.float64), np.nan)
        residuals = np.where(field.observed[1:], predicted[1:] - field.u[1:], np.nan)
        metadata = dict(d.get("metadata", {}))
        if "t_h" in metadata:
            metadata["t_h"] = np.asarray(metadata["t_h"], dtype=np.float64)
        return cls(
            model=str(d["model"]), params=params,
            ci95={str(k): (as_float(v[0]), as_float(v[1])) for k, v in d.get("ci95", {}).items()},
            units={str(k): str(v) for k, v in d.get("units", {}).items()}, residuals=residuals,
            sigma=as_float(d.get("sigma")), loglik=as_float(d.get("loglik")), aic=as_float(d.get("aic")),
            bic=as_float(d.get("bic")), n_obs=int(d.get("n_obs", 0)), n_params=int(d.get("n_params", 0)),
            converged=bool(d.get("converged", False)), message=str(d.get("message", "")),
            n_evals=int(d.get("n_evals", 0)), predicted=predicted, fixed=tuple(d.get("fixed", ())),
            weighting=str(d.get("weighting", "ols")), intervals=d.get("intervals"), expressions=expressions,
            metadata=metadata, _model=spec)


# ----------------------------------------------------------------------------------------------- fitting


def _default_inits(field: DensityField, u0: np.ndarray) -> dict[str, float]:
    """Data-driven starting values: K from a high percentile, D from box²/frame interval, r from N(t)."""
    obs = field.observed
    values = field.u[obs]
    K = float(field.K) if field.K else float(np.percentile(values, 98)) if values.size else 1.0
    if not np.isfinite(K) or K <= 0:
        K = float(np.nanmax(np.abs(values))) if values.size else 1.0
        K = K if K > 0 else 1.0
    dt = float(np.median(np.diff(field.t_h)))
    D = field.dx_um ** 2 / dt
    # spatial means obey dN/dt = r (N - Q/K) for Fisher-KPP with no-flux edges (Q = mean of u²)
    means = np.array([np.nanmean(np.where(obs[k], field.u[k], np.nan)) if obs[k].any() else np.nan
                      for k in range(field.n_frames)])
    sq = np.array([np.nanmean(np.where(obs[k], field.u[k] ** 2, np.nan)) if obs[k].any() else np.nan
                   for k in range(field.n_frames)])
    span = float(field.t_h[-1] - field.t_h[0])
    good = np.isfinite(means) & np.isfinite(sq)
    r = math.nan
    if good.sum() >= 2:
        m, q, t = means[good], sq[good], field.t_h[good]
        drive = m - q / K
        denom = float(np.sum(0.5 * (drive[1:] + drive[:-1]) * np.diff(t)))
        if denom > 0:
            r = float((m[-1] - m[0]) / denom)
    if not np.isfinite(r) or r <= 0:
        r = 1.0 / span
    r = float(np.clip(r, 0.01 / span, 100.0 / span))
    return {"D": D, "D0": D, "r": r, "K": K, "m": 1.0, "A": 0.1, "gamma": 1.0}


class _Problem:
    """Residuals of a model against a field, in normalised optimiser coordinates theta.

    A positive parameter p is p = p0 exp(theta); any other is p = p0 + s theta with s = max(|p0|, 1e-3).
    While the optimiser runs, a coefficient c of a term c u^m whose exponent m is fitted too (``pivots``) is
    c = c~ u_ref^(m0 - m), with c~ mapped from theta as above: c~ is the term's value at the typical density u_ref
    (the geometric mean of the observed values above 5% of their 99th percentile) divided by u_ref^m0, so moving m
    keeps the term there instead of swinging it by u^dm. In c and m the optimiser follows a narrow curved valley
    (a cubic D started from a learned square stopped at m = 2.5, its steps too small to go on, 147 BIC worse
    than from m = 3); :meth:`unpivot` returns to c itself for the intervals."""

    def __init__(self, field: DensityField, model: _Model, p0: dict[str, float], free: list[str],
                 fixed: dict[str, float], weighting: str, gls_gamma: float, rtol: float,
                 max_evals: int, cancel: CancelToken | None, on_eval: Callable | None,
                 initial: str = "data"):
        self._simulate, self._sim_error = simulate_job, SimulationError
        self.field, self.model, self.free, self.fixed = field, model, free, fixed
        self.p0 = p0
        self.log = np.array([n in model.positive for n in free], dtype=bool)
        self.weighting, self.gls_gamma, self.rtol = weighting, gls_gamma, rtol
        self.max_evals, self.cancel, self.on_eval = max_evals, cancel, on_eval
        self.initial = initial
        u0 = field.u[0].copy()
        bad = field.mask & ~np.isfinite(u0)
        if bad.any():
            warnings.warn(
                f"first frame has {int(bad.sum())} unobserved (NaN) boxes inside the mask; they start at 0 "
                "(as for empty space). Restrict the mask if they are really unknown.",
                RuntimeWarning, stacklevel=4,
            )
        u0 = self.prepare_u0(u0, warn=True)
        self.u0 = u0
        self.obs = field.observed[1:]
        self.y = field.u[1:][self.obs]
        self.n = int(self.y.size)
        self.scale_u = float(np.percentile(np.abs(self.y), 99)) or 1.0
        self.floor = 1e-2 * self.scale_u
        self.n_sims = 0
        self.last_error = ""
        self.best: tuple[float, np.ndarray, np.ndarray] | None = None  # (cost, theta, prediction)
        self._cache: dict[bytes, np.ndarray] = {}
        self.sim_method, self.rhs_budget = "auto", None  # set by the first simulation (see simulate)
        self.penalty = 10.0 * math.sqrt(float(np.mean(self.y ** 2)) + self.scale_u ** 2)
        top = max(float(np.max(self.y, initial=0.0)), float(np.max(np.where(field.mask, u0, 0.0), initial=0.0)))
        self.u_check = np.linspace(0.0, top, 65)
        self.scale = np.array([1.0 if lg else max(abs(p0[n]), self.natural_step(n)) for n, lg in zip(free, self.log)])
        typical = self.y[self.y > 0.05 * self.scale_u]
        self.u_ref = float(np.exp(np.mean(np.log(typical)))) if typical.size else 1.0
        self.pivots = [(free.index(c), free.index(m)) for c, m in model.pivots if c in free and m in free]

    def natural_step(self, name: str) -> float:
        """A change of parameter ``name`` (one that is not log-scaled) that moves D or G by about 10% of its RMS size
        on [0, the largest observed density], at the start values: the optimiser's unit for a parameter whose start
        value is near zero. A fixed floor (it was 1e-3, whatever the units) made one unit of a u² coefficient or of
        a saturation constant change G or D many-fold (every early trial failed) while the finite-difference
        steps of small constants were crude. 1e-3 when neither D nor G depends on the parameter (a delay's)."""
        p0 = dict(self.p0)
        delta = max(1e-6 * abs(p0[name]), 1e-12)
        sens = 0.0
        with np.errstate(all="ignore"):
            for fn in (self.model.D, self.model.G):
                try:
                    f0 = np.asarray(fn(self.u_check, p0), dtype=float)
                    f1 = np.asarray(fn(self.u_check, {**p0, name: p0[name] + delta}), dtype=float)
                except (ValueError, TypeError, OverflowError, ZeroDivisionError, FloatingPointError):
                    continue
                if not (np.all(np.isfinite(f0)) and np.all(np.isfinite(f1))):
                    continue
                size = float(np.sqrt(np.mean(f0 ** 2)))
                change = float(np.sqrt(np.mean((f1 - f0) ** 2))) / delta
                if size > 0 and change > 0:
                    sens = max(sens, change / size)
        return 0.1 / sens if sens > 0 and math.isfinite(sens) else 1e-3

    def invalid(self, p: Mapping[str, float]) -> str:
        """Why the model at ``p`` cannot be simulated ("" when it can): D must be finite and >= 0 and G finite on
        [0, the largest observed density]. Checked before simulating, so such a trial costs no simulation (the
        solver would refuse it only when the state reaches those densities, or crawl where D grows without bound)."""
        with np.errstate(all="ignore"):
            try:
                d = np.asarray(self.model.D(self.u_check, p), dtype=float)
                g = np.asarray(self.model.G(self.u_check, p), dtype=float)
            except (ValueError, TypeError, OverflowError, ZeroDivisionError, FloatingPointError) as err:
                return f"D or G cannot be evaluated: {type(err).__name__}: {err}"
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            return f"D is negative or not finite on [0, {self.u_check[-1]:.4g}] (the observed densities)"
        if not np.all(np.isfinite(g)):
            return f"G is not finite on [0, {self.u_check[-1]:.4g}] (the observed densities)"
        return ""

    def prepare_u0(self, u0: np.ndarray, warn: bool = False) -> np.ndarray:
        """The initial condition simulated from a first frame: the fields' rule (:func:`initial_state`),
        denoised when ``initial='denoised'``."""
        denoise = self.initial == "denoised"
        negative = 0 if denoise else int((np.where(self.field.mask & np.isfinite(u0), u0, 0.0) < 0).sum())
        if warn and negative:
            warnings.warn(f"first frame has {negative} negative boxes (noise); they start at 0",
                          RuntimeWarning, stacklevel=5)
        return initial_state(u0, self.field.mask, denoise=denoise)

    def residual_from(self, theta: np.ndarray, u0: np.ndarray) -> np.ndarray | None:
        """Weighted residuals at theta simulated from another initial condition u0 (no caching, does not touch
        the best state or the max_evals budget); None when the simulation fails."""
        if is_cancelled(self.cancel):
            raise _Stop("cancelled")
        self.n_sims += 1
        p = self.params(theta)
        if self.invalid(p):
            return None
        try:
            with np.errstate(all="ignore"):
                pred = self.simulate(p, u0)
        except (self._sim_error, FloatingPointError, ValueError, OverflowError, ZeroDivisionError):
            return None
        po = pred[1:][self.obs]
        if not np.all(np.isfinite(po)):
            return None
        res = po - self.y
        w = self.weights(po)
        return res if w is None else res * w

    def params(self, theta: np.ndarray) -> dict[str, float]:
        out = dict(self.fixed)
        for i, name in enumerate(self.free):
            v = self.p0[name] * math.exp(theta[i]) if self.log[i] else self.p0[name] + self.scale[i] * theta[i]
            out[name] = float(v)
        for i, j in self.pivots:
            c, m = self.free[i], self.free[j]
            exponent = (self.p0[m] - out[m]) * math.log(self.u_ref)
            out[c] *= math.exp(min(max(exponent, -700.0), 700.0))
        return {n: out[n] for n in self.model.params}

    def unpivot(self) -> None:
        """Leave the pivoted coordinates (see the class): the best state's theta is re-expressed in c itself, so
        the intervals and the bound checks that follow are in the plain coordinates."""
        if not self.pivots:
            return
        if self.best is not None:  # theta_of is the plain map whatever the pivots
            p = self.params(self.best[1])
            self.best = (self.best[0], np.array([self.theta_of(n, p[n]) for n in self.free]), self.best[2])
        self.pivots = []
        self._cache.clear()

    def theta_of(self, name: str, value: float) -> float:
        i = self.free.index(name)
        if self.log[i]:
            return math.log(value / self.p0[name]) if value > 0 else -math.inf
        return (value - self.p0[name]) / self.scale[i]

    def simulate(self, p: Mapping[str, float], u0: np.ndarray | None = None) -> np.ndarray:
        m = self.model
        T = None if m.T is None else (lambda t: m.T(np.asarray(t, float), p))
        u0 = self.u0 if u0 is None else u0
        D = float(m.D(np.zeros(1), p)[0]) if m.d_constant else (lambda u: m.D(u, p))
        # D, G tabulated up to twice the largest observed density (a refit's hundreds of simulations); every
        # simulation after the first uses the first one's method and at most _TRIAL_RHS_FACTOR x its right-hand
        # sides, so that a trial whose D or G is orders of magnitude stiffer (e.g. a growth term with a pole just
        # inside the density range) fails fast as a refused step instead of running for minutes
        events: list[Progress] = []
        out = run_job(self._simulate(D, lambda u: m.G(u, p), u0, self.field.mask, self.field.dx_um,
                                     self.field.t_h, T, rtol=self.rtol, method=self.sim_method,
                                     tabulate_to=2.0 * self.u_check[-1], max_rhs=self.rhs_budget), events.append)
        if self.rhs_budget is None and events:
            last = events[-1].data
            self.sim_method = last["method"]
            self.rhs_budget = max(_TRIAL_RHS_FACTOR * int(last["n_rhs"]), _TRIAL_RHS_FLOOR)
        return out

    def weights(self, pred_obs: np.ndarray) -> np.ndarray | None:
        if self.weighting == "ols":
            return None
        return np.maximum(np.abs(pred_obs), self.floor) ** (-self.gls_gamma)

    def evaluate(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        """(weighted residuals, sum of log weights) at theta; one simulation unless cached."""
        key = np.asarray(theta, float).tobytes()
        if key in self._cache:
            return self._cache[key]
        if is_cancelled(self.cancel):
            raise _Stop("cancelled")
        if self.n_sims >= self.max_evals:
            raise _Stop(f"stopped after max_evals={self.max_evals} simulations")
        p = self.params(theta)
        self.n_sims += 1
        why = self.invalid(p)
        try:
            if why:
                raise ValueError(why)
            with np.errstate(all="ignore"):
                pred = self.simulate(p)
            ok = bool(np.all(np.isfinite(pred[1:][self.obs])))
        except (self._sim_error, FloatingPointError, ValueError, OverflowError, ZeroDivisionError) as err:
            pred, ok = None, False
            self.last_error = f"{type(err).__name__}: {err}"
        if pred is not None and not ok:
            self.last_error = "the simulation returned non-finite values"
        logw = 0.0
        if ok:
            po = pred[1:][self.obs]
            res = po - self.y
            w = self.weights(po)
            if w is not None:
                res = res * w
                logw = float(np.sum(np.log(w)))
        else:  # a failed trial: a large constant residual, so the optimiser backs off
            res = np.full(self.n, self.penalty)
        cost = 0.5 * float(res @ res)
        if ok and (self.best is None or cost < self.best[0]):
            self.best = (cost, np.array(theta, float), pred)
        if self.on_eval is not None:
            self.on_eval(self.n_sims, cost, p)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = (res, logw)
        return res, logw

    def residual(self, theta: np.ndarray) -> np.ndarray:
        return self.evaluate(theta)[0]

    def loglik_at(self, theta: np.ndarray) -> float:
        res, logw = self.evaluate(theta)
        return self.loglik(float(res @ res), logw)

    def jacobian(self, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, step: float,
                 central: bool = False) -> np.ndarray:
        """Finite-difference Jacobian in theta; steps flip direction at bounds."""
        theta = np.asarray(theta, float)
        f0 = self.residual(theta)
        J = np.empty((f0.size, theta.size))
        for j in range(theta.size):
            h = step
            if theta[j] + h > hi[j]:
                h = -h
            tp = theta.copy()
            tp[j] += h
            fp = self.residual(tp)
            if central and lo[j] <= theta[j] - h <= hi[j]:
                tm = theta.copy()
                tm[j] -= h
                J[:, j] = (fp - self.residual(tm)) / (2 * h)
            else:
                J[:, j] = (fp - f0) / h
        return J

    def stats(self, pred: np.ndarray) -> tuple[float, float, float]:
        """(weighted sum of squares, sum of log weights, MLE sigma) of a prediction."""
        po = pred[1:][self.obs]
        res = po - self.y
        w = self.weights(po)
        logw = 0.0
        if w is not None:
            res = res * w
            logw = float(np.sum(np.log(w)))
        ssr = float(res @ res)
        return ssr, logw, math.sqrt(ssr / self.n)

    def loglik(self, ssr: float, logw: float) -> float:
        n = self.n
        return -0.5 * n * (math.log(2 * math.pi * max(ssr, 1e-300) / n) + 1.0) + logw


def _fmt(p: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.5g}" for k, v in p.items())


def _validate_names(kind: str, given: Mapping[str, Any] | None, model: _Model) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(model.params))
    if unknown:
        raise InputError(
            f"{kind} names unknown parameter(s) {unknown}; the {model.name} model's parameters are "
            f"{list(model.params)}"
        )
    return given


def _run_fit(field: DensityField, model: str | Mapping[str, Any], *, init, fixed, bounds, weighting,
             gls_gamma, intervals, rtol, max_evals, diff_step, initial, cancel,
             on_eval, ic_samples=12, time_factor=None) -> MechanisticFit:
    if not isinstance(field, DensityField):
        raise InputError(f"field must be a DensityField; got {type(field).__name__}")
    spec = _resolve_model(model)
    if time_factor is not None:
        if spec.T is not None:
            raise InputError("the model has its own T(t) (model['T']); give that or time_factor, not both")
        if not callable(time_factor):
            raise InputError(f"time_factor must be a callable T(t) of time in hours; got {type(time_factor).__name__}")
        given = time_factor
        spec = replace(spec, T=lambda t, p: np.broadcast_to(np.asarray(given(np.asarray(t, np.float64)),
                                                                       np.float64), np.shape(t)).copy())
    if initial not in ("data", "denoised"):
        raise InputError(f"initial must be 'data' or 'denoised'; got {initial!r}")
    if weighting not in ("ols", "gls"):
        raise InputError(f"weighting must be 'ols' or 'gls'; got {weighting!r}")
    if intervals not in _INTERVALS:
        raise InputError(f"intervals must be one of {', '.join(map(repr, _INTERVALS))}; got {intervals!r}")
    if intervals is not None and intervals.endswith("+ic") and int(ic_samples) < 2:
        raise InputError(f"ic_samples must be >= 2 for intervals={intervals!r}; got {ic_samples}")
    if field.n_frames < 2:
        raise InputError("fitting needs at least two frames (the first is the initial condition)")
    if not field.mask.any():
        raise InputError("the field's mask has no boxes: nothing to fit")
    if not field.observed[1:].any():
        raise InputError("no observed (finite, inside-mask) values after the first frame: nothing to fit")
    seen = field.u[field.observed]
    if seen.min() == seen.max():
        raise InputError(f"the density is the same ({seen[0]:g} {field.units}) in every observed box and frame: "
                         "constant data say nothing about D(u) or G(u), so nothing can be fitted; check the "
                         "density extraction (method, channel, ROI)")
    if max_evals < 1:
        raise InputError(f"max_evals must be >= 1; got {max_evals}")
    init = _validate_names("init", init, spec)
    fixed = {k: float(v) for k, v in _validate_names("fixed", fixed, spec).items()}
    bounds = _validate_names("bounds", bounds, spec)

    defaults = _default_inits(field, field.u[0])
    p0: dict[str, float] = {}
    missing = []
    for name in spec.params:
        if name in fixed:
            p0[name] = fixed[name]
        elif name in init:
            p0[name] = float(init[name])
        elif name in defaults:
            p0[name] = defaults[name]
        else:
            missing.append(name)
    if missing:
        raise InputError(
            f"no starting value for parameter(s) {missing} of the model; pass init={{{missing[0]!r}: ...}} "
            "(or fixed=... to hold them constant)"
        )
    for name, v in p0.items():
        if not np.isfinite(v):
            raise InputError(f"parameter {name} starts at a non-finite value {v}")
        if name in spec.positive and v <= 0:
            raise InputError(f"parameter {name} must be positive; got {v}")
    free = [n for n in spec.params if n not in fixed]
    prob = _Problem(field, spec, p0, free, fixed, weighting, gls_gamma, rtol, max_evals, cancel, on_eval,
                    initial)

    # bounds in theta: positive parameters within a factor 1e4 of the start unless given
    lo = np.empty(len(free))
    hi = np.empty(len(free))
    for i, name in enumerate(free):
        if name in bounds:
            b_lo, b_hi = (float(b) for b in bounds[name])
            if not b_lo < b_hi:
                raise InputError(f"bounds[{name!r}] must be (low, high) with low < high; got {bounds[name]}")
            if not b_lo <= p0[name] <= b_hi:
                raise InputError(f"start value {name}={p0[name]:g} lies outside bounds {bounds[name]}")
            lo[i], hi[i] = prob.theta_of(name, b_lo), prob.theta_of(name, b_hi)
        elif prob.log[i]:
            lo[i], hi[i] = -math.log(1e4), math.log(1e4)
        elif name == "A":
            lo[i], hi[i] = prob.theta_of(name, -1.0), prob.theta_of(name, 1.0)
        else:
            lo[i], hi[i] = -np.inf, np.inf
    theta0 = np.zeros(len(free))
    for i in range(len(free)):  # a start on a bound (a form's constant at 0) would leave the optimiser stuck there
        room = 0.05 if hi[i] - lo[i] > 0.2 else (hi[i] - lo[i]) / 4
        theta0[i] = min(max(theta0[i], lo[i] + room), hi[i] - room)

    # a pivoted coefficient's bounds must be signs only (0 or infinite), which c~ = c x (a positive factor) shares
    prob.pivots = [(i, j) for i, j in prob.pivots if all(b in (0.0, math.inf, -math.inf)
                                                         for b in bounds.get(free[i], (0.0, 0.0)))]
    converged, message = True, ""
    stopped = None
    res = None
    if free:
        try:
            res = optimize.least_squares(
                prob.residual, theta0, jac=lambda th: prob.jacobian(th, lo, hi, diff_step),
                bounds=(lo, hi), method="trf", x_scale=1.0, ftol=1e-8, xtol=1e-8, gtol=1e-8,
                max_nfev=max_evals,
            )
        except _Stop as stop:
            stopped = str(stop)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError, OverflowError) as err:
            stopped = f"optimiser failed ({type(err).__name__}: {err})"
        prob.unpivot()
    else:
        try:
            prob.residual(theta0)
        except _Stop as stop:
            stopped = str(stop)

    if prob.best is None:
        theta_hat = theta0
        pred = np.full(field.u.shape, np.nan)
        converged = False
        last = prob.params(theta0)
        message = stopped or "no simulation succeeded"
        if not message.startswith("cancelled"):
            message += f"; the simulation failed at every trial, starting from {_fmt(last)}"
            if prob.last_error:
                message += f" (last error: {prob.last_error})"
    else:
        _, theta_hat, pred = prob.best
        if stopped is not None:
            converged = False
            message = f"{stopped}; best state: {_fmt(prob.params(theta_hat))} (cost {prob.best[0]:.6g})"
        elif res is not None:
            converged = bool(res.status > 0)
            message = res.message if converged else (
                f"not converged: {res.message} after {prob.n_sims} simulations; last state: "
                f"{_fmt(prob.params(theta_hat))} (cost {prob.best[0]:.6g})")
            at_bound = [n for i, n in enumerate(free) if np.isclose(theta_hat[i], lo[i], atol=1e-6)
                        or np.isclose(theta_hat[i], hi[i], atol=1e-6)]
            if at_bound:
                message += f"; parameter(s) {at_bound} at a bound (widen bounds or fix them)"
        else:
            message = "all parameters fixed: evaluated, nothing fitted"

    params = prob.params(theta_hat)
    n = prob.n
    if prob.best is not None:
        ssr, logw, sigma = prob.stats(pred)
        ll = prob.loglik(ssr, logw)
    else:
        ssr, logw, sigma, ll = math.nan, 0.0, math.nan, math.nan
    k = len(free) + 1
    ci95: dict[str, tuple[float, float]] = {name: (v, v) for name, v in fixed.items()}
    notes = []
    ic_info: dict[str, Any] | None = None
    if free and intervals is not None and prob.best is not None and converged:
        try:
            wald, se, _ = _wald(prob, theta_hat, lo, hi, ssr, diff_step)
            ci95.update(wald)
            if intervals.startswith("profile"):
                prof, prof_notes = _profile(prob, theta_hat, lo, hi, ll, se, diff_step)
                ci95.update(prof)
                notes += prof_notes
            if intervals.endswith("+ic"):
                devs, failed, noise_ab = _ic_bootstrap(prob, theta_hat, lo, hi, ic_samples, diff_step)
                half = {}
                for i, name in enumerate(free):
                    a, b = (prob.theta_of(name, v) if np.isfinite(v) else v for v in ci95[name])
                    half[name] = (theta_hat[i] - a, b - theta_hat[i])
                ci95.update(_combine_ic(prob, theta_hat, half, devs))
                ic_info = {"samples": int(devs.shape[0]), "failed": failed, "noise_variance": list(noise_ab),
                           "rms_log_or_scaled": {n: float(np.sqrt(np.mean(devs[:, i] ** 2)))
                                                 for i, n in enumerate(free)} if devs.size else {},
                           "mean_shift": {n: float(np.mean(devs[:, i])) for i, n in enumerate(free)}
                           if devs.size else {}}
                if failed:
                    notes.append(f"{failed} of {ic_samples} initial-condition samples failed to simulate")
        except _Stop as stop:
            notes.append(f"intervals incomplete: {stop}")
            if str(stop).startswith("cancelled"):
                converged, message = False, f"cancelled while computing intervals; estimates: {_fmt(params)}"
    for name in free:
        ci95.setdefault(name, (math.nan, math.nan))
    if notes:
        message += "; " + "; ".join(notes)

    predicted = np.where(field.mask[None], pred, np.nan)
    residuals = np.full((field.n_frames - 1,) + field.mask.shape, np.nan)
    if prob.best is not None:
        residuals[prob.obs] = pred[1:][prob.obs] - prob.y
    units = {name: _param_units(name, field.units) for name in spec.params}
    if spec.name == "sympy":
        units.update(_expression_units(spec.text, params, field.units))
    return MechanisticFit(
        model=spec.name if isinstance(model, str) else "sympy",
        params=params, ci95={n: ci95[n] for n in spec.params}, units=units,
        residuals=residuals, sigma=sigma, loglik=ll,
        aic=2 * k - 2 * ll, bic=k * math.log(n) - 2 * ll, n_obs=n, n_params=len(free),
        converged=converged, message=message, n_evals=prob.n_sims, predicted=predicted,
        fixed=tuple(fixed), weighting=weighting, intervals=intervals, expressions=dict(spec.text),
        metadata={"init": {n: p0[n] for n in spec.params}, "rtol": rtol, "gls_gamma": gls_gamma,
                  "initial": initial, "t_h": field.t_h.copy(), "ic_bootstrap": ic_info,
                  "dx_um": field.dx_um, "source": field.metadata.get("source"),
                  "time_factor": "given" if time_factor is not None else None},
        _model=spec,
    )


def _to_param(prob: _Problem, i: int, theta_i: float) -> float:
    """Parameter value at theta_i; an interval end too far out for a float (a log-parameter whose s.e. is huge,
    as for a growth rate the data cannot see) is infinite, not an OverflowError that loses the whole fit."""
    name = prob.free[i]
    if prob.log[i]:
        return prob.p0[name] * (math.exp(theta_i) if theta_i < 700.0 else math.inf)
    return prob.p0[name] + prob.scale[i] * theta_i


def _wald(prob: _Problem, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, ssr: float, step: float):
    """Wald intervals sigma² (JᵀJ)⁻¹ in theta (log-parameters), mapped back to parameters."""
    J = prob.jacobian(theta, lo, hi, step, central=True)
    dof = max(prob.n - theta.size, 1)
    s2 = ssr / dof
    JtJ = J.T @ J
    out = {}
    try:
        cov = s2 * np.linalg.inv(JtJ)
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
        if np.linalg.cond(JtJ) > 1e14:
            raise np.linalg.LinAlgError("ill-conditioned")
    except np.linalg.LinAlgError:
        se = np.full(theta.size, np.nan)
    for i, name in enumerate(prob.free):
        if np.isfinite(se[i]):
            a, b = theta[i] - _Z95 * se[i], theta[i] + _Z95 * se[i]
            out[name] = (_to_param(prob, i, a), _to_param(prob, i, b))
        else:
            out[name] = (math.nan, math.nan)
    return out, se, J


def _ic_noise_sd(prob: _Problem, where: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Noise s.d. of the first frame at the boxes ``where``, from a noise variance a + b u fitted to the residuals
    of the best fit against its predicted density u (:func:`~napari_binn.field.noise_variance`); returns (s.d., (a, b)).
    b > 0 for counts (Poisson: variance proportional to u, 0 in empty boxes), b = 0 for noise of one size. (One
    s.d. for all boxes, from the SSR, put the count noise of the populated boxes into the empty ones: on the
    discovery benchmark's Poisson wound, 10 seeds, the 95% interval of D was +-74% where the estimates spread
    +-8% (1.96 s.d.); +-24% with this model.) The residuals also hold the first frame's noise carried forward, so
    a comes out somewhat too large: the intervals err wide."""
    pred = prob.best[2][1:][prob.obs]
    a, b = noise_variance(pred, pred - prob.y)
    return np.sqrt(a + b * np.maximum(prob.u0[where], 0.0)), (a, b)


def _ic_bootstrap(prob: _Problem, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  n_samples: int, step: float, seed: int = 0) -> tuple[np.ndarray, int, tuple[float, float]]:
    """Spread of the estimates due to noise in the initial condition (parametric bootstrap over frame 0 only).

    Each sample adds Gaussian noise of the fitted noise model (:func:`_ic_noise_sd`: variance a + b u, u the first
    frame's density) to the initial condition actually used at the boxes observed in frame 0, reprocesses it as
    the data's first frame was (``initial='denoised'`` denoises again, negatives to 0), and re-fits the same
    later frames from the MLE by one Gauss-Newton step with the forward-difference Jacobian at (theta_hat, u0*):
    1 + n_params simulations per sample. (Checked on the recovery benchmark: the step agrees with a full re-fit
    to 1e-4 in log D; a cheaper step reusing the Wald Jacobian misses by 0.003, because the sensitivities
    themselves depend on u0.) Returns the (B, p) deviations theta* - theta_hat in optimiser coordinates
    (log-parameters for positive ones), the number of samples that failed and the noise model (a, b).
    """
    rng = np.random.default_rng(seed)
    where = prob.field.observed[0] & prob.field.mask
    sd, ab = _ic_noise_sd(prob, where)
    devs, failed = [], 0
    for _ in range(n_samples):
        raw = prob.u0.copy()
        raw[where] += sd * rng.standard_normal(sd.size)
        u0 = prob.prepare_u0(raw)
        r0 = prob.residual_from(theta, u0)
        J = np.empty((prob.n, theta.size))
        for j in range(theta.size if r0 is not None else 0):
            h = -step if theta[j] + step > hi[j] else step
            tp = theta.copy()
            tp[j] += h
            rp = prob.residual_from(tp, u0)
            if rp is None:
                r0 = None
                break
            J[:, j] = (rp - r0) / h
        if r0 is None:
            failed += 1
            continue
        delta = np.linalg.lstsq(J, r0, rcond=None)[0]
        devs.append(np.clip(theta - delta, lo, hi) - theta)
    return np.array(devs).reshape(-1, theta.size), failed, ab


def _combine_ic(prob: _Problem, theta: np.ndarray, half: dict[str, tuple[float, float]], devs: np.ndarray
                ) -> dict[str, tuple[float, float]]:
    """Widen intervals (given as (low, high) half-widths in theta) by the initial-condition spread.

    Per side the half-width becomes sqrt(h² + (t q_ic)²) where q_ic² is the mean square of the bootstrap
    deviations about the MLE (so a shift of the estimates caused by reprocessing noisy initial conditions counts
    too), and t the Student quantile with the Welch-Satterthwaite degrees of freedom of the combined variance
    (the bootstrap variance is estimated from only B samples)."""
    from scipy import stats

    out = {}
    B = devs.shape[0]
    for i, name in enumerate(prob.free):
        v_ic = float(np.mean(devs[:, i] ** 2)) if B else math.nan
        h_lo, h_hi = half[name]
        sides = [h for h in (h_lo, h_hi) if np.isfinite(h)]
        if not (np.isfinite(v_ic) and sides) or math.isnan(h_lo) or math.isnan(h_hi):
            out[name] = (math.nan, math.nan)  # not identifiable (an open profile side stays infinite below)
            continue
        v_w = (float(np.mean(sides)) / _Z95) ** 2
        dof = (v_w + v_ic) ** 2 / max(v_ic ** 2 / B, 1e-300)
        t = float(stats.t.ppf(0.975, min(dof, 1e6)))
        a = theta[i] - math.sqrt((h_lo * t / _Z95) ** 2 + (t ** 2) * v_ic)
        b = theta[i] + math.sqrt((h_hi * t / _Z95) ** 2 + (t ** 2) * v_ic)
        out[name] = (_to_param(prob, i, a), _to_param(prob, i, b))
    return out


def _profile(prob: _Problem, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, ll_hat: float,
             se: np.ndarray, step: float):
    """Profile-likelihood 95% intervals: where the re-optimised log-likelihood drops by chi²₁(0.95)/2.

    Works on the signed root z(v) = ±sqrt(2 (ll̂ - ll_profile(v))), nearly linear in the (log-)parameter v:
    a first step of one Wald s.e., then secant steps towards z = ±1.96 (2-4 re-fits per side)."""
    out: dict[str, tuple[float, float]] = {}
    notes: list[str] = []
    for i, name in enumerate(prob.free):
        others = np.array([j for j in range(theta.size) if j != i], dtype=int)

        def refit(v: float, start: np.ndarray) -> tuple[float, np.ndarray]:
            th = start.copy()
            th[i] = v
            if others.size:
                def embed(x: np.ndarray) -> np.ndarray:
                    full = th.copy()
                    full[others] = x
                    return full

                x0 = np.clip(th[others], lo[others], hi[others])
                r = optimize.least_squares(
                    lambda x: prob.residual(embed(x)), x0,
                    jac=lambda x: prob.jacobian(embed(x), lo, hi, step)[:, others],
                    bounds=(lo[others], hi[others]), method="trf", ftol=1e-6, xtol=1e-6, max_nfev=30)
                th[others] = r.x
            return prob.loglik_at(th), th

        ends = []
        for side in (-1.0, 1.0):
            s = float(se[i]) if np.isfinite(se[i]) and se[i] > 0 else 0.1
            pts = [(0.0, float(theta[i]))]  # (signed root z, theta_i)
            start, v, end = theta.copy(), theta[i] + side * s, None
            for _ in range(6):
                v = float(np.clip(v, lo[i], hi[i]))
                ll, start = refit(v, start)
                z = side * math.sqrt(max(2.0 * (ll_hat - ll), 0.0))
                pts.append((z, v))
                if abs(abs(z) - _Z95) < 0.02:
                    end = v
                    break
                if abs(z) < _Z95 and v in (lo[i], hi[i]):
                    break
                (z1, v1), (z2, v2) = pts[-2], pts[-1]
                reach = abs(v2 - theta[i])
                v = v2 + (side * _Z95 - z2) * (v2 - v1) / (z2 - z1) if abs(z2 - z1) > 1e-9 else math.nan
                if not np.isfinite(v) or (v - theta[i]) * side <= 0 or abs(v - theta[i]) > 4 * reach:
                    v = theta[i] + side * (4 * reach if abs(z2) < _Z95 else 0.5 * reach)
            if end is None:
                zs = np.array([p[0] for p in pts]) * side
                vs = np.array([p[1] for p in pts])
                if zs.max() >= _Z95:
                    order = np.argsort(zs)
                    end = float(np.interp(_Z95, zs[order], vs[order]))
                else:
                    end = side * math.inf
                    notes.append(f"profile of {name} does not close on the {'low' if side < 0 else 'high'} "
                                 "side within the bounds")
            ends.append(_to_param(prob, i, end))
        out[name] = (ends[0], ends[1])
    return out, notes


def fit_mechanistic(
    field: DensityField,
    model: str | Mapping[str, Any],
    *,
    init: Mapping[str, float] | None = None,
    fixed: Mapping[str, float] | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    weighting: str = "ols",
    gls_gamma: float = 0.2,
    intervals: str | None = "wald+ic",
    rtol: float = 1e-4,
    max_evals: int = 400,
    diff_step: float = 1e-3,
    initial: str = "data",
    ic_samples: int = 12,
    cancel: CancelToken | None = None,
    time_factor: Callable[[np.ndarray], np.ndarray] | None = None,
) -> MechanisticFit:
    """Fit a reaction-diffusion model's parameters to a density field (blocking).

    field: the data; frame 0 is the initial condition (NaN inside the mask start at 0, with a warning), frames
        1..T-1 are fitted at their observed boxes. Simulated on ``field.mask`` with no-flux edges.
    model: 'fisher_kpp', 'porous_fisher', 'allee', 'richards', or {'D': expr, 'G': expr[, 'T': expr]} (sympy
        expressions or strings in u, and t for T; other free symbols are parameters).
    init, fixed, bounds: per-parameter start values, values held constant, and (low, high) limits, in physical
        units (D µm²/h, r 1/h, K field units). Defaults: K from the 98th percentile (or field.K), D = box²/frame
        interval, r from the growth of the mean density; m = 1, A = 0.1, gamma = 1.
    weighting: 'ols' or 'gls' (residuals scaled by max(|u_model|, 1% of the data's 99th percentile)^-gls_gamma,
        the proportional-error model of Lagergren et al. 2020).
    intervals: 'wald+ic' (default: Wald plus the spread caused by noise in the initial condition, see the module
        docstring; costs ic_samples x (1 + n_params) extra simulations), 'wald' (fast, treats frame 0 as exact,
        too narrow on noisy data), 'profile' (profile likelihood, ~4-8 re-fits per parameter), 'profile+ic',
        or None. The bootstrap's size is in ``metadata['ic_bootstrap']`` (samples, the noise variance (a, b) of
        a + b u, rms and mean deviations in the optimiser's coordinates: log-parameters for positive ones).
    ic_samples: number of initial-condition draws for the '+ic' intervals (>= 2; seeded, so reproducible).
    rtol: relative tolerance of each forward simulation. max_evals: budget of forward simulations.
    diff_step: finite-difference step in the optimiser's coordinates (relative for positive parameters).
    initial: 'data' uses the first frame as observed (negative values start at 0); 'denoised' also sets to 0
        the boxes of empty space whose local mean (Gaussian, 1 box) is below 3 noise s.d. of that mean (noise
        s.d. estimated from the frame itself). Noise specks in empty space otherwise grow like real cells and
        bias D and r low on noisy data (see benchmarks/mechanistic_recovery.py).
    cancel: a CancelToken checked before every simulation; when set the best state so far is returned with
        converged=False and a message starting with 'cancelled'.
    time_factor: a given delay T(t) (a callable of time in hours, values in (0, 1]) multiplying the whole
        right-hand side and held fixed, e.g. a BINN's learned delay (``fit.T``), for a model without a T of its
        own. The fit's ``T()`` returns it; a saved and reloaded fit keeps only ``metadata['time_factor']``.

    A fit that does not converge (budget spent, simulation failures) returns converged=False with a message
    giving the last state; bad input (unknown model or parameter names, missing start values) raises ValueError.
    """
    return _run_fit(field, model, init=init, fixed=fixed, bounds=bounds, weighting=weighting,
                    gls_gamma=gls_gamma, intervals=intervals, rtol=rtol, max_evals=max_evals,
                    diff_step=diff_step, initial=initial, ic_samples=ic_samples, cancel=cancel,
                    on_eval=None, time_factor=time_factor)


def fit_mechanistic_job(
    field: DensityField, model: str | Mapping[str, Any], *, cancel: CancelToken | None = None, **kwargs: Any
) -> Generator[Progress, None, MechanisticFit]:
    """Generator form of :func:`fit_mechanistic`: yields a Progress event per simulation, returns the fit.

    Runs the optimiser in a worker thread; closing the generator early cancels it. Same keywords as
    :func:`fit_mechanistic`."""
    token = cancel if cancel is not None else CancelToken()
    events: queue.Queue = queue.Queue()
    clock = ProgressClock(int(kwargs.get("max_evals", 400)))
    outcome: dict[str, Any] = {}

    def on_eval(n: int, cost: float, p: Mapping[str, float]) -> None:
        events.put(clock.event("mechanistic", n, f"simulation {n}: cost {cost:.5g}; {_fmt(p)}",
                               cost=cost, params=dict(p)))

    def work() -> None:
        try:
            outcome["fit"] = _run_fit(field, model, cancel=token, on_eval=on_eval,
                                      **_with_defaults(kwargs))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err
        finally:
            events.put(None)

    worker = threading.Thread(target=work, name="fit_mechanistic", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            event = events.get()
            if event is None:
                finished = True
                break
            yield event
    finally:
        # cancel only when closed before the fit finished: the worker thread is still alive for a moment after it
        # signals the end, and cancelling then cancelled the caller's token, i.e. the whole pipeline run
        if not finished:
            token.cancel()
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["fit"]


def _with_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    known = {"init": None, "fixed": None, "bounds": None, "weighting": "ols", "gls_gamma": 0.2,
             "intervals": "wald+ic", "rtol": 1e-4, "max_evals": 400, "diff_step": 1e-3,
             "initial": "data", "ic_samples": 12, "time_factor": None}
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"fit_mechanistic_job got unexpected keyword(s) {sorted(unknown)}")
    return {**known, **kwargs}
