"""Forward solver for u_t = T(t) [div(D(u) grad u) + G(u) u] on a masked grid (zero flux at the mask edge).

Units: x in µm, t in hours, D in µm²/h, G in 1/h, T dimensionless, u in the caller's density units.

Methods
-------
``'rkc'``
    Runge–Kutta–Chebyshev (second order, damped, Sommeijer–Shampine–Verwer 1997) with embedded error control
    and a stage count chosen from a bound on the spectral radius. Explicit: no linear solves, so it is the
    fastest choice for the moderate stiffness of diffusion on microscopy grids (cost grows like sqrt(stiffness)).
``'bdf'`` / ``'radau'``
    scipy's implicit integrators with the exact sparse Jacobian (D'(u) by a finite difference of the callable).
    For very stiff problems (fine grids, large D, long spans).
``'auto'``
    ``'rkc'`` unless the estimated stage count per step is large, then ``'bdf'``.

D and G are evaluated at max(u, 0) and the reaction is G(u+) u+, so a tiny negative overshoot can neither make
a power-law D undefined nor grow; the fluxes use u itself so that mass is conserved exactly. Returned frames
have tiny negatives clipped to 0; a negative value below -1e-3 x max(u0) raises :class:`SimulationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from ..errors import InputError
from ..jobs import CancelToken, Progress, ProgressClock, is_cancelled, run_job
from ._kernels import available as _compiled
from ._kernels import lookup_scale_top, rkc_stage, table_rhs
from .callables import as_numpy_function, as_time_function, is_constant
from .grid import MaskedGrid

__all__ = ["simulate", "simulate_job", "simulate_field", "SimulationError", "METHODS"]

METHODS = ("auto", "rkc", "bdf", "radau")
_AUTO_MAX_RKC_STAGES = 60  # above this many stages per (typical) step, implicit BDF is cheaper
_MAX_RKC_STAGES = 2000
_NEGATIVE_FAIL = 1e-3  # relative to max(u0): negatives beyond this are an error, smaller ones are clipped


#: evaluations of the PDE's right-hand side one simulation may take (a few hundred are usual: 160-864 on the
#: discovery benchmark's fields); beyond it the simulation fails rather than run on. A safety net: a held-out refit
#: candidate on the polygon case (seed 2, 5 December) once spent over 30 minutes inside RKC steps. A likely cause,
#: seen 6 December: trials of a growth form with a pole inside the densities (G_2 u / (G_3 u + exp(G_4 u)), G_3 < 0)
#: took 87-115 s per simulation; a refit now gives its trials a budget from its first simulation
#: (``mechanistic._TRIAL_RHS_FACTOR``)
_MAX_RHS = 200_000

#: nodes of the tables of D(u), G(u) that ``simulate_job(tabulate_to=...)`` interpolates linearly (the refits'
#: simulations); on [0, 3000] cells/mm² a node every 0.73: the interpolation error is below h²/8 |f''|, some 1e-5
#: of D = c u² at u = 100 (tests/test_pde_solver.py checks simulations against the closed forms evaluated exactly)
_TABLE_NODES = 4097


class SimulationError(RuntimeError):
    """The solver could not continue; ``t_reached_h`` is the last time (h) it reached."""

    def __init__(self, message: str, t_reached_h: float) -> None:
        super().__init__(f"{message} (simulation reached t = {t_reached_h:.6g} h)")
        self.t_reached_h = float(t_reached_h)


class _Problem:
    """Right-hand side, Jacobian and spectral-radius bound of the semi-discrete system on the mask."""

    def __init__(self, D: Any, G: Any, T: Any, grid: MaskedGrid, scale: float,
                 tabulate_to: float | None = None, max_rhs: int | None = None) -> None:
        self.grid = grid
        self.max_rhs = int(max_rhs) if max_rhs else _MAX_RHS
        self.D = as_numpy_function(D, "D(u)")
        self.G = as_numpy_function(G, "G(u)")
        self.T = as_time_function(T)
        self.d_const = self.D.value if is_constant(self.D) else None  # type: ignore[attr-defined]
        if self.d_const is not None and not (np.isfinite(self.d_const) and self.d_const >= 0):
            raise InputError(f"D must be finite and >= 0 µm²/h; got {self.d_const}")
        self.scale = scale
        self.n_rhs = 0
        self.t_now = 0.0
        self._up = np.empty(grid.n)
        # the compiled right-hand side's arguments after the state, and the density up to which they hold
        self._table = self._tabulate(tabulate_to) if tabulate_to else None
        self._table_top = float(tabulate_to) if self._table is not None else -np.inf

    def _tabulate(self, u_top: float) -> tuple | None:
        """``table_rhs``'s arguments after the state (tables of D and G on ``_TABLE_NODES`` nodes over [0, u_top],
        the faces, the lookup's scale and top, 1 / 2dx²), or None (compiled loops unavailable, or D or G not
        finite, or D < 0, at some node: the right-hand side then evaluates D and G at every box, which names the
        offending density and box if a state reaches it)."""
        if not (_compiled() and np.isfinite(u_top) and u_top > 0):
            return None
        nodes = np.linspace(0.0, float(u_top), _TABLE_NODES)
        with np.errstate(all="ignore"):
            d = np.full(nodes.size, self.d_const) if self.d_const is not None else np.asarray(self.D(nodes), float)
            g = np.asarray(self.G(nodes), float)
        if d.shape != nodes.shape or g.shape != nodes.shape or not (np.all(d >= 0) and np.isfinite(d.max())
                                                                    and np.isfinite(g.sum())):
            return None
        fi = np.ascontiguousarray(self.grid.face_i, dtype=np.int64)
        fj = np.ascontiguousarray(self.grid.face_j, dtype=np.int64)
        return d, g, fi, fj, *lookup_scale_top(_TABLE_NODES, u_top), 0.5 / self.grid.dx_um ** 2

    # -- checked evaluations ---------------------------------------------------------------------------
    def _where(self, k: int) -> str:
        y, x = np.unravel_index(self.grid.flat[k], self.grid.shape)
        return f"box (y={y}, x={x})"

    def eval_d(self, up: np.ndarray) -> np.ndarray | float:
        if self.d_const is not None:
            return self.d_const
        d = self.D(up)
        if not d.min() >= 0.0:  # also catches NaN
            k = int(np.flatnonzero(~(d >= 0.0))[0])
            raise ValueError(f"D(u) returned {d[k]:.6g} at density u = {up[k]:.6g} ({self._where(k)}, "
                             f"t = {self.t_now:.6g} h); D must be finite and >= 0 µm²/h for every density")
        if not np.isfinite(d.max()):
            k = int(np.flatnonzero(~np.isfinite(d))[0])
            raise ValueError(f"D(u) returned {d[k]} at density u = {up[k]:.6g} ({self._where(k)}, "
                             f"t = {self.t_now:.6g} h); D must be finite")
        return d

    def eval_g(self, up: np.ndarray) -> np.ndarray:
        g = self.G(up)
        if not np.isfinite(g.sum()):
            k = int(np.flatnonzero(~np.isfinite(g))[0])
            raise ValueError(f"G(u) returned {g[k]} at density u = {up[k]:.6g} ({self._where(k)}, "
                             f"t = {self.t_now:.6g} h); G must be finite")
        return g

    def time_factor(self, t: float) -> float:
        if self.T is None:
            return 1.0
        tv = self.T(t)
        if not (np.isfinite(tv) and tv >= 0.0):
            raise ValueError(f"T(t) returned {tv} at t = {t:.6g} h; the delay factor must be finite and >= 0 "
                             "(normally in (0, 1])")
        return tv

    # -- system ----------------------------------------------------------------------------------------
    def rhs(self, t: float, u: np.ndarray) -> np.ndarray:
        self.n_rhs += 1
        if self.n_rhs > self.max_rhs:
            raise SimulationError(f"more than {self.max_rhs} evaluations of the right-hand side (a few hundred is "
                                  "usual): the step size collapsed, so these D(u), G(u) are too stiff to simulate or "
                                  "blow up", t)
        self.t_now = t
        if self._table is not None and u.size and u.max() <= self._table_top:  # NaN fails: the checked path says so
            f = table_rhs(np.ascontiguousarray(u, dtype=np.float64), *self._table)
        else:
            up = np.maximum(u, 0.0, out=self._up)
            f = self.grid.divergence(u, self.eval_d(up), out=np.empty_like(u))
            g = self.eval_g(up)
            if g is up:
                g = g.copy()
            g *= up
            f += g
        tf = self.time_factor(t)
        if tf != 1.0:
            f *= tf
        return f

    def _derivative(self, fn: Callable, up: np.ndarray, base: np.ndarray) -> np.ndarray:
        step = 1e-7 * self.scale
        return (fn(up + step) - base) / step

    def jacobian(self, t: float, u: np.ndarray):
        self.t_now = t
        up = np.maximum(u, 0.0)
        d = self.eval_d(up)
        if np.ndim(d) == 0:
            d_arr = np.full(u.shape, float(d))
            dd = np.zeros(u.shape)
        else:
            d_arr = d
            dd = self._derivative(self.D, up, d)
        g = self.eval_g(up)
        dg = self._derivative(self.G, up, g)
        positive = u > 0
        reaction_diag = np.where(positive, g + up * dg, 0.0)
        return self.grid.jacobian(u, d_arr, dd, reaction_diag, self.time_factor(t))

    def spectral_radius(self, t: float, u: np.ndarray) -> float:
        """Upper estimate of the Jacobian's spectral radius in 1/h (Gershgorin, with a 20% margin)."""
        up = np.maximum(u, 0.0)
        d = self.eval_d(up)
        rho = self.grid.diffusion_radius(d)
        if np.ndim(d):
            dd = np.abs(self._derivative(self.D, up, d))
            spread = float(up.max() - up.min()) if up.size else 0.0
            rho += self.grid.max_open_faces * float(dd.max()) * spread / self.grid.dx_um**2
        g = self.eval_g(up)
        dg = self._derivative(self.G, up, g)
        rho += float(np.max(np.abs(g + up * dg)))
        tmax = self.time_factor(t)
        return 1.2 * max(tmax, 1e-12) * rho + 1e-12


# ---------------------------------------------------------------------------------------------------------
# Runge–Kutta–Chebyshev
# ---------------------------------------------------------------------------------------------------------

_RKC_CACHE: dict[int, tuple] = {}


def _rkc_coefficients(s: int) -> tuple:
    """Coefficients of the damped second-order RKC method with s stages (damping eps = 2/13)."""
    if s in _RKC_CACHE:
        return _RKC_CACHE[s]
    w0 = 1.0 + (2.0 / 13.0) / s**2
    T = np.zeros(s + 1)
    dT = np.zeros(s + 1)
    ddT = np.zeros(s + 1)
    T[0], T[1], dT[1] = 1.0, w0, 1.0
    for j in range(2, s + 1):
        T[j] = 2 * w0 * T[j - 1] - T[j - 2]
        dT[j] = 2 * T[j - 1] + 2 * w0 * dT[j - 1] - dT[j - 2]
        ddT[j] = 4 * dT[j - 1] + 2 * w0 * ddT[j - 1] - ddT[j - 2]
    w1 = dT[s] / ddT[s]
    b = np.zeros(s + 1)
    b[2:] = ddT[2:] / dT[2:] ** 2
    b[0] = b[1] = b[2]
    a = 1.0 - b * T
    c = np.zeros(s + 1)
    c[2:] = w1 * ddT[2:] / dT[2:]
    c[1] = c[2] / dT[2]
    mu = np.zeros(s + 1)
    nu = np.zeros(s + 1)
    mut = np.zeros(s + 1)
    gt = np.zeros(s + 1)
    mut[1] = b[1] * w1
    for j in range(2, s + 1):
        mu[j] = 2 * w0 * b[j] / b[j - 1]
        nu[j] = -b[j] / b[j - 2]
        mut[j] = 2 * w1 * b[j] / b[j - 1]
        gt[j] = -a[j - 1] * mut[j]
    coeffs = (mu, nu, mut, gt, c)
    _RKC_CACHE[s] = coeffs
    return coeffs


def _rkc_stages_for(h_rho: float) -> int:
    # stability interval of damped RKC: beta(s) ~ 0.653 s^2
    return max(2, 1 + int(np.sqrt(1.54 * h_rho + 1.0)))


def _rkc_step(problem: _Problem, t: float, y: np.ndarray, f0: np.ndarray, h: float, s: int) -> np.ndarray:
    mu, nu, mut, gt, c = _rkc_coefficients(s)
    hf0 = h * f0
    y_prev2 = y
    y_prev = y + mut[1] * hf0
    for j in range(2, s + 1):
        fj = problem.rhs(t + c[j - 1] * h, y_prev)
        if _compiled():  # the same numbers, compiled
            y_new = rkc_stage(y, y_prev, y_prev2, fj, hf0, float(1.0 - mu[j] - nu[j]), float(mu[j]), float(nu[j]),
                              float(mut[j] * h), float(gt[j]))
        else:
            y_new = (1.0 - mu[j] - nu[j]) * y
            y_new += mu[j] * y_prev
            y_new += nu[j] * y_prev2
            fj *= mut[j] * h
            y_new += fj
            y_new += gt[j] * hf0
        y_prev2, y_prev = y_prev, y_new
    return y_prev


def _integrate_rkc(problem: _Problem, y0: np.ndarray, t_out: np.ndarray, rtol: float, atol: float,
                   max_step: float, stats: dict) -> Generator[tuple[int, np.ndarray], None, None]:
    t = float(t_out[0])
    span = float(t_out[-1] - t_out[0])
    y = y0.copy()
    f0 = problem.rhs(t, y)
    rho = problem.spectral_radius(t, y)
    w = atol + rtol * np.abs(y)
    d0 = float(np.sqrt(np.mean((y / w) ** 2)))
    d1 = float(np.sqrt(np.mean((f0 / w) ** 2)))
    h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-3 * span
    h = min(max(h, 1e-6 * span), max_step, span)
    h_min = 1e-12 * max(span, 1.0)
    err_old, h_old = None, None
    since_rho = 0
    for k in range(1, len(t_out)):
        t_end = float(t_out[k])
        while t < t_end:
            h_try = min(h, max_step)
            if t + 1.05 * h_try >= t_end:
                h_try = t_end - t
            s = _rkc_stages_for(h_try * rho)
            if s > _MAX_RKC_STAGES:
                s = _MAX_RKC_STAGES
                h_try = 0.65 * (s * s - 1) / rho
            y1 = _rkc_step(problem, t, y, f0, h_try, s)
            f1 = problem.rhs(t + h_try, y1)
            est = 12.0 * (y - y1)
            est += 6.0 * h_try * (f0 + f1)
            est /= 15.0
            w = atol + rtol * np.maximum(np.abs(y), np.abs(y1))
            est /= w
            err = float(np.sqrt(np.mean(est * est)))
            if not np.isfinite(err):
                raise SimulationError(f"the solution became non-finite at step size {h_try:.3g} h", t)
            if err <= 1.0:
                t = t_end if t_end - (t + h_try) < 1e-12 * max(abs(t_end), 1.0) else t + h_try
                y, f0 = y1, f1
                stats["steps"] += 1
                stats["max_stages"] = max(stats["max_stages"], s)
                if err == 0.0:
                    fac = 10.0
                elif err_old is not None and h_old:
                    fac = 0.8 * (h_try / h_old) * err_old ** (1 / 3) / err ** (2 / 3)
                else:
                    fac = 0.8 * err ** (-1 / 3)
                fac = min(10.0, max(0.1, fac))
                if h_try >= h or h_try < t_end - t:  # not shortened to hit an output time
                    h = h_try * fac
                else:
                    h = max(h, h_try * fac)
                err_old, h_old = err, h_try
                since_rho += 1
                if since_rho >= 10:
                    rho = problem.spectral_radius(t, y)
                    since_rho = 0
            else:
                stats["rejected"] += 1
                h = h_try * min(1.0, max(0.1, 0.8 * err ** (-1 / 3)))
                err_old = None
                rho = problem.spectral_radius(t, y)
                since_rho = 0
            if h < h_min:
                raise SimulationError(f"step size fell below {h_min:.3g} h (the equation may blow up)", t)
        yield k, y


def _integrate_scipy(problem: _Problem, y0: np.ndarray, t_out: np.ndarray, rtol: float, atol: float,
                     max_step: float, stats: dict, method: str) -> Generator[tuple[int, np.ndarray], None, None]:
    from scipy.integrate import BDF, Radau

    cls = BDF if method == "bdf" else Radau
    solver = cls(problem.rhs, float(t_out[0]), y0.copy(), float(t_out[-1]), rtol=rtol, atol=atol,
                 jac=problem.jacobian, max_step=max_step)
    for k in range(1, len(t_out)):
        t_end = float(t_out[k])
        while solver.t < t_end:
            message = solver.step()
            if solver.status == "failed":
                raise SimulationError(f"scipy {method.upper()} failed: {message}", solver.t_old or solver.t)
            stats["steps"] += 1
        if solver.t == t_end:
            y = solver.y.copy()
        else:
            y = solver.dense_output()(t_end)
        yield k, y
    stats["jacobians"] = solver.njev
    stats["lu"] = solver.nlu


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------

def _validate(u0: Any, mask: Any, dx_um: Any, t_h: Any, rtol: float, atol: float | None, method: str):
    mask_arr = np.asarray(mask)
    if mask_arr.ndim != 2:
        raise InputError(f"mask must be a 2-D (Ny, Nx) boolean array; got shape {mask_arr.shape}")
    mask_arr = mask_arr.astype(bool)
    if not mask_arr.any():
        raise InputError("mask has no boxes inside the domain; draw or choose a non-empty ROI")
    u0_arr = np.asarray(u0, dtype=np.float64)
    if u0_arr.shape != mask_arr.shape:
        raise InputError(f"u0 has shape {u0_arr.shape} but mask has shape {mask_arr.shape}; they must match")
    inside = u0_arr[mask_arr]
    bad = ~np.isfinite(inside)
    if bad.any():
        ys, xs = np.nonzero(mask_arr)
        k = int(np.flatnonzero(bad)[0])
        raise InputError(f"u0 has {int(bad.sum())} NaN/inf values inside the mask (first at box y={ys[k]}, "
                         f"x={xs[k]}); the solver refuses them: fill them (e.g. interpolate or np.nan_to_num) "
                         "or remove those boxes from the mask")
    if inside.min() < 0:
        k = int(np.argmin(inside))
        raise InputError(f"u0 has negative densities inside the mask (min {inside[k]:.6g}); densities must be >= 0")
    dx = float(dx_um)
    if not (np.isfinite(dx) and dx > 0):
        raise InputError(f"dx_um must be a positive box size in µm; got {dx_um}")
    t = np.asarray(t_h, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise InputError("t_h is empty; give the output times in hours, the first being the time of u0")
    if not np.all(np.isfinite(t)):
        raise InputError("t_h contains NaN/inf")
    if t.size > 1 and not np.all(np.diff(t) > 0):
        k = int(np.flatnonzero(~(np.diff(t) > 0))[0])
        raise InputError(f"t_h must be strictly increasing; t_h[{k}] = {t[k]:g} h, t_h[{k + 1}] = {t[k + 1]:g} h")
    if not (rtol > 0):
        raise InputError(f"rtol must be > 0; got {rtol}")
    if atol is not None and not (atol > 0):
        raise InputError(f"atol must be > 0; got {atol}")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}; got {method!r}")
    return u0_arr, mask_arr, dx, t


def _arguments(u0: Any, mask: Any, dx_um: Any, t_h: Any) -> tuple[Any, Any, Any, Any]:
    """(u0, mask, dx_um, t_h) of a call: as given, or from a DensityField ``u0``: its initial state
    (``DensityField.initial_state``), mask, box size and frame times (``t_h`` may give other output times from its
    first frame on; ``dx_um``, if given, must be its box size)."""
    from ..field import DensityField

    if not isinstance(u0, DensityField):
        missing = [name for name, v in (("mask", mask), ("dx_um", dx_um), ("t_h", t_h)) if v is None]
        if missing:
            raise InputError(f"give {', '.join(missing)} with an array u0, or simulate a DensityField")
        return u0, mask, dx_um, t_h
    field = u0
    if mask is not None:
        raise InputError("a DensityField brings its own mask: restrict it with field.with_mask(mask) instead")
    if dx_um is not None and not np.isclose(float(dx_um), field.dx_um, rtol=1e-6):
        raise InputError(f"dx_um = {dx_um} µm does not match the field's box size {field.dx_um:g} µm")
    times = field.t_h if t_h is None else np.asarray(t_h, dtype=np.float64).reshape(-1)
    if times.size and not np.isclose(times[0], field.t_h[0]):
        raise InputError(f"t_h[0] = {times[0]:g} h must be the time of the field's first frame "
                         f"({field.t_h[0]:g} h), which the simulation starts from")
    return field.initial_state(), field.mask, field.dx_um, times


def simulate_job(D: Any, G: Any, u0: Any, mask: Any = None, dx_um: float | None = None, t_h: Any = None,
                 T: Any = None, *, rtol: float = 1e-4, atol: float | None = None, method: str = "auto",
                 max_step_h: float | None = None, cancel: CancelToken | None = None,
                 tabulate_to: float | None = None, max_rhs: int | None = None,
                 ) -> Generator[Progress, None, np.ndarray]:
    """Generator form of :func:`simulate`: yields ``Progress(stage='simulate')`` after each output time
    (``data``: ``frame``, ``t_h``, ``u`` (the (Ny, Nx) frame), ``method``, ``n_rhs``) and returns the array.

    ``tabulate_to``: a density; D and G are then evaluated once on a fine table over [0, tabulate_to] and the
    explicit method's (RKC's) right-hand side interpolates it in compiled code wherever the state stays below it (for
    the many simulations of a refit, where evaluating closed forms box by box was some 40% of the time; the
    numbers differ from exact evaluation by the interpolation error only). States above it, D or G invalid at a
    node, or no compiled loops: exact evaluation as without it. ``max_rhs``: the most right-hand-side evaluations
    the simulation may take before it fails (default 200000; a refit's trials get a budget from their start).

    On cancel (checked between output times) it returns the frames computed so far with the remaining
    frames all NaN; the last event's ``data['cancelled']`` is True. Nothing is raised.
    """
    u0, mask, dx_um, t_h = _arguments(u0, mask, dx_um, t_h)
    u0_arr, mask_arr, dx, t = _validate(u0, mask, dx_um, t_h, rtol, atol, method)
    grid = MaskedGrid(mask_arr, dx)
    y0 = grid.from_grid(u0_arr)
    scale = float(np.max(np.abs(y0)))
    scale = scale if scale > 0 else 1.0
    # Fisher-type fronts are pulled by their low-density leading edge, so atol must shrink with rtol
    atol_v = float(atol) if atol is not None else 1e-2 * rtol * scale
    problem = _Problem(D, G, T, grid, scale, tabulate_to, max_rhs)
    max_step = float(max_step_h) if max_step_h is not None else np.inf
    if not (max_step > 0):
        raise InputError(f"max_step_h must be > 0 hours; got {max_step_h}")

    out = np.full((t.size,) + mask_arr.shape, np.nan)
    out[0] = grid.to_grid(y0)
    clock = ProgressClock(t.size - 1)
    if t.size == 1:
        return out
    span = float(t[-1] - t[0])
    chosen = method
    if method == "auto":
        rho = problem.spectral_radius(float(t[0]), y0)
        h_typ = min(max_step, span / 20.0, float(np.min(np.diff(t))))
        chosen = "rkc" if _rkc_stages_for(h_typ * rho) <= _AUTO_MAX_RKC_STAGES else "bdf"
    if chosen != "rkc":
        # the implicit methods' Newton iterations use the exact Jacobian (D'(u) of the callable), which a table
        # would not match where D or G bends within a node interval (D ∝ u^0.05 near 0 slowed BDF some 25x)
        problem._table = None
    stats: dict[str, Any] = {"steps": 0, "rejected": 0, "max_stages": 0}
    if chosen == "rkc":
        frames = _integrate_rkc(problem, y0, t, rtol, atol_v, max_step, stats)
    else:
        frames = _integrate_scipy(problem, y0, t, rtol, atol_v, max_step, stats, chosen)
    neg_fail = -_NEGATIVE_FAIL * scale
    for k, y in frames:
        lowest = float(y.min())
        if lowest < neg_fail:
            raise SimulationError(f"the density went negative ({lowest:.4g}, below {neg_fail:.3g}); "
                                  "try a smaller rtol or method='bdf'", float(t[k]))
        out[k] = grid.to_grid(np.maximum(y, 0.0))
        yield clock.event("simulate", k, f"t = {t[k]:.4g} h ({chosen})", frame=k, t_h=float(t[k]), u=out[k],
                          method=chosen, n_rhs=problem.n_rhs, cancelled=False, **stats)
        if k < t.size - 1 and is_cancelled(cancel):
            frames.close()
            yield clock.event("simulate", k, f"cancelled at t = {t[k]:.4g} h", frame=k, t_h=float(t[k]),
                              u=out[k], method=chosen, n_rhs=problem.n_rhs, cancelled=True, **stats)
            return out
    return out


def simulate(D: Any, G: Any, u0: Any, mask: Any = None, dx_um: float | None = None, t_h: Any = None,
             T: Any = None, *, rtol: float = 1e-4, atol: float | None = None, method: str = "auto",
             max_step_h: float | None = None) -> np.ndarray:
    """Solve u_t = T(t) [div(D(u) grad u) + G(u) u] inside ``mask`` with zero flux at its edge.

    Parameters
    ----------
    D : diffusivity D(u) in µm²/h; G : per-capita growth rate G(u) in 1/h (reaction G(u) u).
        Each may be a number, a vectorised numpy callable, a sympy expression in one symbol (``u``), or a
        torch module / tensor callable (evaluated batched, without autograd, on (N, 1) tensors).
    u0 : (Ny, Nx) density at ``t_h[0]`` (values outside the mask are ignored; NaN inside is refused), or a
        :class:`~napari_binn.field.DensityField`: the simulation starts from its ``initial_state()`` (unobserved and
        negative boxes at 0) on its mask and grid, with its frame times unless ``t_h`` is given.
    mask : (Ny, Nx) bool domain; any shape, disconnected pieces are independent no-flux domains.
    dx_um : box size in µm.  t_h : output times in hours, strictly increasing, ``t_h[0]`` = time of u0.
    T : optional delay factor T(t), dimensionless (number, callable of hours, sympy expression in ``t``).
    rtol, atol : local error tolerances (atol defaults to 0.01 x rtol x max(u0)).
    method : 'auto' (default), 'rkc', 'bdf' or 'radau' (see the module docstring).
    max_step_h : optional cap on the internal step in hours.

    Returns
    -------
    (len(t_h), Ny, Nx) float64, NaN outside the mask.

    G may be negative (death, or growth above K). Raises ValueError for bad input (also for D < 0 or a
    non-finite D or G, naming the density) and
    :class:`SimulationError` (with ``t_reached_h``) when the integration fails.
    """
    return run_job(simulate_job(D, G, u0, mask, dx_um, t_h, T, rtol=rtol, atol=atol, method=method,
                                max_step_h=max_step_h))


def simulate_field(D: Any, G: Any, field: Any, t_h: Any = None, T: Any = None, *, dx_um: float | None = None,
                   **options: Any):
    """:func:`simulate` of a :class:`~napari_binn.field.DensityField`, returned as a new DensityField with the
    same grid, units and K (``metadata['simulated'] = True``).

    ``t_h`` defaults to the field's frame times (``t_h[0]`` must equal ``field.t_h[0]``); ``dx_um``, if given,
    must match the field's box size. Other keyword options go to :func:`simulate`.
    """
    from ..field import DensityField

    if not isinstance(field, DensityField):
        raise TypeError(f"field must be a DensityField; got {type(field).__name__}")
    times = field.t_h if t_h is None else np.asarray(t_h, dtype=np.float64)
    u = simulate(D, G, field, dx_um=dx_um, t_h=times, T=T, **options)
    meta = {"simulated": True, "source": field.metadata.get("source", field.metadata.get("name"))}
    return DensityField(u, field.mask.copy(), field.x_um.copy(), field.y_um.copy(), np.asarray(times, float),
                        field.units, field.K, meta)
