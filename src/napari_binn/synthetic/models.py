"""Ground-truth density fields from reaction–diffusion models with a known D(u) and G(u).

Units: densities in cells/mm², lengths in µm, times in hours, D in µm²/h, G and r in 1/h.

Models and default parameters (chosen so that a 48 h run on a 64 x 64 grid of 50 µm boxes shows both
spreading and growth; K is about a confluent epithelial monolayer):

======================== ======================================= ==============================================
``'fisher_kpp'``         D = D, G = r (1 - u/K)                  D 700 µm²/h, r 0.15 /h, K 2000 cells/mm²
``'porous_fisher'``      D = D0 (u/K)^m, G = r (1 - u/K)         D0 1500 µm²/h, m 1, r 0.15 /h, K 2000
``'allee'``              D = D, G = r (1 - u/K)(u/K - A)         D 700 µm²/h, r 0.4 /h, K 2000, A 0.1
``'richards'``           D = D, G = r (1 - (u/K)^gamma)          D 700 µm²/h, r 0.15 /h, K 2000, gamma 2
``'contact_inhibition'`` D = D0 / (1 + u/K), G = r (1 - u/K)     D0 1500 µm²/h, r 0.15 /h, K 2000
``'gompertz'``           D = D, G = r ln(K/u)                    D 700 µm²/h, r 0.05 /h, K 2000
``'diffusion'``          D = D, G = 0 (growth switched off)      D 700 µm²/h, K 2000
``'custom'``             params {'D': ..., 'G': ..., 'K': ...}   any number / callable / sympy expression / torch net
======================== ======================================= ==============================================

Allee growth is negative below A K (A is a fraction of K, dimensionless). Porous–Fisher with m = 1 is the linear
D(u) = D0 u/K, m = 2 the power law D0 (u/K)^2. Gompertz G(u) = r ln(K/u) is evaluated at max(u, 1e-6 K), so it is
finite at u = 0 (the reaction G(u) u still goes to 0 there).

Domains (``domain=``): ``'scratch'`` (a cell-free gap between two sheets, full grid), ``'disc'`` / ``'triangle'``
(a tissue patch expanding inside a larger ROI), ``'islands'`` (five seeded blobs), ``'wound'`` (a disc-shaped ROI
covered with cells except a central circular wound that closes), ``'polygon'`` (an irregular, seeded 7-gon ROI
with a tissue patch off its centre), or a (Ny, Nx) boolean mask. ``u0_fraction`` sets the initial tissue density
as a fraction of K (defaults: scratch 0.6, islands 0.7, the others 0.8).

Every model also accepts ``params['T']``, a delay factor T(t) (hours -> dimensionless, default 1).

Noise (added to the clean field inside the mask; values are *not* clipped, so the noisy field stays unbiased
and may hold small negative densities where the clean one is ~0):

- ``'gaussian'``: u + noise x max(u_clean) x N(0, 1) (e.g. noise=0.05: sd is 5% of the field's maximum);
- ``'gaussian_k'``: u + noise x K x N(0, 1) (sd is a fraction of the carrying capacity K);
- ``'proportional'``: u + noise x u x N(0, 1) (sd is a fraction of each value);
- ``'poisson'``: Poisson(u x box area) cell counts per box, divided by the box area (``noise`` is not used).
  At K = 2000 cells/mm², 100 µm boxes hold ~20 cells at K (50 µm boxes: 5).

:class:`Truth` records the model machine-readably: ``forms`` ({'D': 'constant' | 'linear' | 'power' |
'contact_inhibition', 'G': 'logistic' | 'allee' | 'richards' | 'gompertz' | 'none'}), ``constants`` (the numeric
parameters, e.g. {'D': 700.0, 'r': 0.15, 'K': 2000.0}), ``model_functions()`` (numpy D(u), G(u)) and
``expressions()`` (sympy D(u), G(u) with the constants as numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field as dc_field
from typing import Any

import numpy as np

from ..field import DensityField
from ..pde.callables import as_numpy_function, as_time_function
from ..pde.solver import simulate

__all__ = ["make_synthetic", "Truth", "MODELS", "DEFAULT_PARAMS", "DOMAINS", "NOISE_MODELS"]

DEFAULT_K = 2000.0  # cells/mm²
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "fisher_kpp": {"D": 700.0, "r": 0.15, "K": DEFAULT_K},
    "porous_fisher": {"D0": 1500.0, "m": 1.0, "r": 0.15, "K": DEFAULT_K},
    "allee": {"D": 700.0, "r": 0.4, "K": DEFAULT_K, "A": 0.1},
    "richards": {"D": 700.0, "r": 0.15, "K": DEFAULT_K, "gamma": 2.0},
    "contact_inhibition": {"D0": 1500.0, "r": 0.15, "K": DEFAULT_K},
    "gompertz": {"D": 700.0, "r": 0.05, "K": DEFAULT_K},
    "diffusion": {"D": 700.0, "K": DEFAULT_K},
    "custom": {"K": DEFAULT_K},
}
MODELS = tuple(DEFAULT_PARAMS)
DOMAINS = ("scratch", "disc", "triangle", "islands", "wound", "polygon")
NOISE_MODELS = ("gaussian", "gaussian_k", "proportional", "poisson")
#: Initial tissue density of each named domain as a fraction of K (``u0_fraction`` overrides it).
DOMAIN_U0_FRACTION = {"scratch": 0.6, "disc": 0.8, "triangle": 0.8, "islands": 0.7, "wound": 0.8, "polygon": 0.8}
GOMPERTZ_FLOOR = 1e-6  # Gompertz G(u) = r ln(K / max(u, GOMPERTZ_FLOOR K))


@dataclass
class Truth:
    """The exact model behind a synthetic field.

    model: model name; params: parameter values (D in µm²/h, r in 1/h, K in cells/mm², dimensionless m, A, gamma);
    D(u) µm²/h, G(u) 1/h, T(t) dimensionless: numpy callables; u_clean: (T, Ny, Nx) noise-free density,
    NaN outside the mask.
    """

    model: str
    params: dict[str, Any]
    D: Callable[[np.ndarray], np.ndarray]
    G: Callable[[np.ndarray], np.ndarray]
    T: Callable[[np.ndarray], np.ndarray]
    u_clean: np.ndarray
    metadata: dict[str, Any] = dc_field(default_factory=dict)
    forms: dict[str, str] = dc_field(default_factory=dict)
    constants: dict[str, float] = dc_field(default_factory=dict)

    def model_functions(self) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
        """(D, G): numpy callables D(u) in µm²/h and G(u) in 1/h at densities u in cells/mm²."""
        return self.D, self.G

    def expressions(self) -> tuple[Any, Any]:
        """(D, G) as sympy expressions in the symbol ``u`` with the constants as numbers (None for 'custom'
        models given as callables)."""
        import sympy as sp

        return _model_expressions(self.model, self.params, sp.Symbol("u"))

    def describe(self) -> str:
        """The equation and its parameter values as text."""
        p = self.params
        K = p.get("K")
        head = "u_t = T(t) [div(D(u) grad u) + G(u) u]" if "T" in p else "u_t = div(D(u) grad u) + G(u) u"
        if self.model == "fisher_kpp":
            eq = f"Fisher–KPP: {head}, D = {p['D']:g} µm²/h, G(u) = r (1 - u/K), r = {p['r']:g} /h"
        elif self.model == "porous_fisher":
            eq = (f"Porous–Fisher: {head}, D(u) = D0 (u/K)^m, D0 = {p['D0']:g} µm²/h, m = {p['m']:g}, "
                  f"G(u) = r (1 - u/K), r = {p['r']:g} /h")
        elif self.model == "allee":
            eq = (f"Allee: {head}, D = {p['D']:g} µm²/h, G(u) = r (1 - u/K)(u/K - A), r = {p['r']:g} /h, "
                  f"A = {p['A']:g}")
        elif self.model == "richards":
            eq = (f"Richards (generalised logistic): {head}, D = {p['D']:g} µm²/h, G(u) = r (1 - (u/K)^gamma), "
                  f"r = {p['r']:g} /h, gamma = {p['gamma']:g}")
        elif self.model == "contact_inhibition":
            eq = (f"Contact inhibition: {head}, D(u) = D0 / (1 + u/K), D0 = {p['D0']:g} µm²/h, "
                  f"G(u) = r (1 - u/K), r = {p['r']:g} /h")
        elif self.model == "gompertz":
            eq = f"Gompertz: {head}, D = {p['D']:g} µm²/h, G(u) = r ln(K/u), r = {p['r']:g} /h"
        elif self.model == "diffusion":
            eq = f"Diffusion (growth off): {head}, D = {p['D']:g} µm²/h, G(u) = 0"
        else:
            eq = f"custom: {head}, D(u) = {p.get('D')!r} µm²/h, G(u) = {p.get('G')!r} /h"
        return eq + (f", K = {K:g} cells/mm²" if K is not None else "")


def _model_functions(model: str, p: dict[str, Any]) -> tuple[Callable, Callable]:
    K = float(p["K"])
    if model == "fisher_kpp":
        D, r = float(p["D"]), float(p["r"])
        return (lambda u: np.full(np.shape(u), D)), (lambda u: r * (1.0 - u / K))
    if model == "porous_fisher":
        D0, m, r = float(p["D0"]), float(p["m"]), float(p["r"])
        return (lambda u: D0 * np.maximum(u / K, 0.0) ** m), (lambda u: r * (1.0 - u / K))
    if model == "allee":
        D, r, A = float(p["D"]), float(p["r"]), float(p["A"])
        return (lambda u: np.full(np.shape(u), D)), (lambda u: r * (1.0 - u / K) * (u / K - A))
    if model == "richards":
        D, r, gamma = float(p["D"]), float(p["r"]), float(p["gamma"])
        return (lambda u: np.full(np.shape(u), D)), (lambda u: r * (1.0 - np.maximum(u / K, 0.0) ** gamma))
    if model == "contact_inhibition":
        D0, r = float(p["D0"]), float(p["r"])
        return (lambda u: D0 / (1.0 + np.maximum(u, 0.0) / K)), (lambda u: r * (1.0 - u / K))
    if model == "gompertz":
        D, r = float(p["D"]), float(p["r"])
        return ((lambda u: np.full(np.shape(u), D)),
                (lambda u: r * np.log(K / np.maximum(u, GOMPERTZ_FLOOR * K))))
    if model == "diffusion":
        D = float(p["D"])
        return (lambda u: np.full(np.shape(u), D)), (lambda u: np.zeros(np.shape(u)))
    if "D" not in p or "G" not in p:
        raise ValueError("model 'custom' needs params {'D': ..., 'G': ...} (numbers, callables, sympy "
                         "expressions in u, or torch modules) and optionally 'K' and 'T'")
    return as_numpy_function(p["D"], "D(u)"), as_numpy_function(p["G"], "G(u)")


def _model_forms(model: str, p: dict[str, Any]) -> dict[str, str]:
    """Machine-readable names of the true D and G forms ('' for what a custom model does not say)."""
    if model == "porous_fisher":
        m = float(p["m"])
        d = "constant" if m == 0 else "linear" if m == 1 else "power"
    elif model == "contact_inhibition":
        d = "contact_inhibition"
    elif model == "custom":
        d = ""
    else:
        d = "constant"
    g = {"fisher_kpp": "logistic", "porous_fisher": "logistic", "contact_inhibition": "logistic",
         "allee": "allee", "richards": "richards", "gompertz": "gompertz", "diffusion": "none"}.get(model, "")
    return {"D": d, "G": g}


def _model_expressions(model: str, p: dict[str, Any], u: Any) -> tuple[Any, Any]:
    """Sympy D(u), G(u) of a built-in model with its constants as floats (custom: sympy params or None)."""
    import sympy as sp

    f = {k: sp.Float(float(v)) for k, v in p.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if model == "custom":
        return tuple(sp.sympify(p[k]).subs(sp.Symbol("u"), u) if isinstance(p.get(k), sp.Basic) else
                     (sp.Float(float(p[k])) if isinstance(p.get(k), (int, float)) else None) for k in ("D", "G"))
    K = f["K"]
    D = {"porous_fisher": lambda: f["D0"] * (u / K) ** sp.Integer(int(p["m"])) if float(p["m"]).is_integer()
         else f["D0"] * (u / K) ** f["m"],
         "contact_inhibition": lambda: f["D0"] / (1 + u / K)}.get(model, lambda: f["D"])()
    G = {"fisher_kpp": lambda: f["r"] * (1 - u / K), "porous_fisher": lambda: f["r"] * (1 - u / K),
         "contact_inhibition": lambda: f["r"] * (1 - u / K),
         "allee": lambda: f["r"] * (1 - u / K) * (u / K - f["A"]),
         "richards": lambda: f["r"] * (1 - (u / K) ** f["gamma"]),
         "gompertz": lambda: f["r"] * sp.log(K / u), "diffusion": lambda: sp.Integer(0)}[model]()
    return D, G


def _soft(d: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Smooth indicator of d > 0 with an edge of about ``width`` boxes."""
    return 0.5 * (1.0 + np.tanh(d / width))


def _polygon_mask(grid: tuple[int, int], rng: np.random.Generator, n_vertices: int = 7) -> np.ndarray:
    """An irregular star-shaped polygon (seeded radii and angles) filling most of the grid."""
    from matplotlib.path import Path as _MplPath

    ny, nx = grid
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    step = 2 * np.pi / n_vertices
    angles = np.arange(n_vertices) * step + rng.uniform(-0.3, 0.3, n_vertices) * step
    radii = rng.uniform(0.30, 0.48, n_vertices)
    verts = np.column_stack([cx + radii * nx * np.cos(angles), cy + radii * ny * np.sin(angles)])
    y, x = np.mgrid[:ny, :nx]
    inside = _MplPath(verts).contains_points(np.column_stack([x.ravel(), y.ravel()]))
    return inside.reshape(grid)


def _domain(domain: Any, grid: tuple[int, int], rng: np.random.Generator,
            u0_fraction: float | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, mask, initial density as a fraction of K) for a named domain or a user mask."""
    ny, nx = grid
    y, x = np.mgrid[:ny, :nx].astype(float)
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    if isinstance(domain, str):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS} or a (Ny, Nx) boolean mask; got {domain!r}")
        level = DOMAIN_U0_FRACTION[domain] if u0_fraction is None else float(u0_fraction)
        if domain == "scratch":
            mask = np.ones(grid, bool)
            half_gap = 0.175 * nx  # a gap 35% of the width, empty, between two sheets
            u0 = level * _soft(np.abs(x - cx) - half_gap)
        elif domain == "disc":
            mask = np.hypot(x - cx, y - cy) <= 0.47 * min(ny, nx)
            u0 = level * _soft(0.2 * min(ny, nx) - np.hypot(x - cx, y - cy))
        elif domain == "triangle":
            top, bottom = 0.05 * ny, 0.95 * ny
            half_width = 0.47 * nx * (y - top) / (bottom - top)
            mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
            gy = top + 2 / 3 * (bottom - top)  # centroid
            u0 = level * _soft(0.14 * min(ny, nx) - np.hypot(x - cx, y - gy))
        elif domain == "islands":
            mask = np.ones(grid, bool)
            u0 = np.zeros(grid)
            radius = 0.08 * min(ny, nx)
            for _ in range(5):
                by, bx = rng.uniform(0.15, 0.85) * ny, rng.uniform(0.15, 0.85) * nx
                u0 = np.maximum(u0, level * _soft(radius - np.hypot(x - bx, y - by)))
        elif domain == "wound":
            mask = np.hypot(x - cx, y - cy) <= 0.47 * min(ny, nx)
            u0 = level * _soft(np.hypot(x - cx, y - cy) - 0.2 * min(ny, nx))  # a cell-free hole of radius 20%
        else:  # polygon
            mask = _polygon_mask(grid, rng)
            my, mx = y[mask].mean(), x[mask].mean()
            # a patch off the centroid, towards the polygon's left, so the front crosses most of the ROI
            u0 = level * _soft(0.15 * min(ny, nx) - np.hypot(x - (mx - 0.12 * nx), y - my))
            if not (u0[mask] > 0.5 * level).any():
                u0 = level * _soft(0.15 * min(ny, nx) - np.hypot(x - mx, y - my))
        return domain, mask, np.where(mask, u0, 0.0)
    mask = np.asarray(domain)
    if mask.ndim != 2:
        raise ValueError(f"a mask domain must be a 2-D boolean array; got shape {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("the domain mask has no boxes inside")
    level = 0.8 if u0_fraction is None else float(u0_fraction)
    my, mx = y[mask].mean(), x[mask].mean()
    radius = 0.4 * np.sqrt(mask.sum() / np.pi)
    u0 = level * _soft(radius - np.hypot(x - mx, y - my))
    if not (u0[mask] > 0.1).any():
        u0 = np.full(mask.shape, 0.3 if u0_fraction is None else 0.375 * level)
    return "mask", mask, np.where(mask, u0, 0.0)


def make_synthetic(model: str = "fisher_kpp", params: dict[str, Any] | None = None, *,
                   domain: Any = "scratch", grid: tuple[int, int] = (64, 64), dx_um: float = 50.0,
                   times_h: Any = None, noise: float = 0.0, noise_model: str = "gaussian",
                   K: float | None = None, seed: int = 0, rtol: float = 1e-6,
                   u0_fraction: float | None = None) -> tuple[DensityField, Truth]:
    """Simulate a model with known D(u), G(u) and return ``(noisy DensityField, Truth)``.

    model: one of :data:`MODELS`; params: overrides of :data:`DEFAULT_PARAMS` (units in the module docstring).
    domain: 'scratch' (a cell-free gap between two sheets, full grid), 'disc' / 'triangle' (a tissue patch
    expanding inside a larger ROI), 'islands' (five blobs), 'wound' (a circular wound closing in a disc-shaped
    ROI), 'polygon' (an irregular seeded polygon ROI with a patch off its centre), or a (Ny, Nx) boolean mask (a
    patch at its centroid). u0_fraction: the initial tissue density as a fraction of K, in (0, 1.5] (default:
    the domain's own, see :data:`DOMAIN_U0_FRACTION`; 0.8 for a mask).
    grid: (Ny, Nx) boxes of ``dx_um`` µm (``grid`` is taken from the mask when one is given).
    times_h: output times in hours (default 20 frames over 0-48 h). noise, noise_model: see the module
    docstring. K: carrying capacity in cells/mm² (overrides ``params['K']``). seed: seeds the noise, the
    island positions and the polygon. rtol: solver tolerance for the clean field.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}; got {model!r}")
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"noise_model must be one of {NOISE_MODELS}; got {noise_model!r}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be >= 0 (a fraction, e.g. 0.05 for 5%); got {noise}")
    if u0_fraction is not None and not (np.isfinite(u0_fraction) and 0 < u0_fraction <= 1.5):
        raise ValueError(f"u0_fraction must be in (0, 1.5] (initial density as a fraction of K); got {u0_fraction}")
    p: dict[str, Any] = dict(DEFAULT_PARAMS[model])
    if params:
        unknown = set(params) - set(p) - {"T", "D", "G"}
        if model != "custom" and unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for model {model!r}; "
                             f"expected {sorted(p)} (and optionally 'T')")
        p.update(params)
    if K is not None:
        p["K"] = float(K)
    if not (float(p["K"]) > 0):
        raise ValueError(f"K must be a positive density in cells/mm²; got {p['K']}")
    rng = np.random.default_rng(seed)
    if not isinstance(domain, str):
        grid = np.shape(domain)  # type: ignore[assignment]
    grid = (int(grid[0]), int(grid[1]))
    name, mask, u0_frac = _domain(domain, grid, rng, u0_fraction)
    times = np.linspace(0.0, 48.0, 20) if times_h is None else np.asarray(times_h, dtype=np.float64)
    D, G = _model_functions(model, p)
    T_fn = as_time_function(p.get("T"))
    u0 = u0_frac * float(p["K"])
    u_clean = simulate(D, G, u0, mask, dx_um, times, p.get("T"), rtol=rtol)

    u = u_clean.copy()
    inside = np.broadcast_to(mask, u.shape)
    if noise_model == "poisson":
        box_area_mm2 = (dx_um / 1000.0) ** 2
        u[inside] = rng.poisson(np.maximum(u_clean[inside], 0.0) * box_area_mm2) / box_area_mm2
    elif noise > 0:
        eps = rng.standard_normal(int(inside.sum()))
        if noise_model == "gaussian":
            sd = noise * np.nanmax(u_clean)
        elif noise_model == "gaussian_k":
            sd = noise * float(p["K"])
        else:
            sd = noise * np.abs(u_clean[inside])
        u[inside] = u_clean[inside] + sd * eps

    def T_numpy(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if T_fn is None:
            return np.ones_like(t)
        return np.vectorize(T_fn, otypes=[float])(t)

    x_um = np.arange(grid[1]) * float(dx_um)
    y_um = np.arange(grid[0]) * float(dx_um)
    meta = {"source": f"synthetic {model} on {name}", "synthetic": True, "model": model, "domain": name,
            "params": {k: v for k, v in p.items() if isinstance(v, (int, float))},
            "noise": float(noise), "noise_model": noise_model, "seed": int(seed), "box_um": float(dx_um)}
    fld = DensityField(u, mask, x_um, y_um, times, "cells/mm²", float(p["K"]), meta)
    constants = {k: float(v) for k, v in p.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    truth = Truth(model, p, D, G, T_numpy, u_clean, {"domain": name, "u0": np.where(mask, u0, np.nan)},
                  forms=_model_forms(model, p), constants=constants)
    return fld, truth
