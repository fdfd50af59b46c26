"""Refinement of a trained BINN's D(u) and G(u) through the forward solver.

The residual BINN fits D and G to the surrogate's derivatives, which carry the surrogate's errors (an
errors-in-variables bias). This stage fits D and G instead by the misfit between the data and a simulation of
the PDE (the differentiable solver of :mod:`napari_binn.pde.torch_solver`) on every frame, starting from the
BINN's curves, and then writes the refined curves back into the networks, so that ``fit.D(u)``/``fit.G(u)`` (what
the plots show and the symbolic stage samples) are the refined curves.

Curves: tables on ``nodes`` evenly spaced densities over [0, 1.3 x max observed u], parametrised by value, slope
and scaled second differences (``f = a + b x + double cumulative sum of c``) so that the smoothness prior
(lambda / 2) |c|² is the integral of f''² and equally scaled for every node. D = D_scale softplus(f_D) with
D_scale the mean BINN D over the observed range; G = G_scale f_G with G_scale = max |BINN G| (floored at
1 / (time span)). The prior strength is chosen over ``smoothness`` (a ladder, strongest first, each fit
warm-started from the previous one) by the Laplace evidence, or (``holdout_frames``) by forward prediction: the
ladder is fitted again to all but the last frames and the strongest prior whose fit predicts them not
significantly worse than the best one's is kept (a paired test over blocks of boxes, as the refit's held-out
choice); or it is fixed by giving one value. (The evidence assumes independent residuals, and the first frame's
noise carried forward makes them correlated; on the discovery benchmark the held-out choice was better in 9 runs
of 32 and worse in 8, so it is not the default: docs/discovery-benchmark.md.) Optimiser: L-BFGS with a
strong-Wolfe line search.

Initial state (``initial``): ``"surrogate"`` (the BINN surrogate at the first frame), ``"data"`` (the first frame
itself) or ``"denoised"`` (the first frame with empty space that holds only noise set to 0: noise specks in empty
space would otherwise grow like cells), fixed while the ladder runs, or ``"auto"`` (default: both "denoised" and
"surrogate" are tried and the one with the lower final misfit is kept); with ``joint`` the initial state is then
fitted too, with a total-variation penalty, and kept only when its misfit is below the best misfit of every initial
state held fixed by more than half the misfit that the first frame's noise is expected to add
(:func:`_keep_joint_fits`). The first frame of data is the field's first frame, or with ``initial_frames`` = n
the mean of its first n frames, each moved back to the first frame's time by the surrogate's change
(:func:`_first_frame`; an option), and frames 2..n are then left out of the misfit, whose noise that mean holds.
From a first frame of data ('denoised', 'data') the chosen curves are corrected for the bias that the first
frame's noise, carried forward by the simulation, gives them (``noise_draws``; :func:`_noise_corrected`). An
initial state whose refined curves fit worse than the BINN's own from it, by more than the misfit's noise, is
discarded; when every one is, the BINN's curves are kept (``metadata['refine']['failed']``).

Bands: a Laplace approximation (Gauss–Newton Hessian from a finite-difference Jacobian of the simulation) gives
D_sd, G_sd at the nodes with the initial state held as known. From a first frame of data held fixed (not one
fitted jointly), the spread its noise gives the curves is added in quadrature (D_noise_sd, G_noise_sd:
``noise_draws`` draws of that noise, each re-fitted to first order; :func:`_bands`). With more than one initial
state tried (``"auto"``), half the largest difference between the kept curves and those refined from the other
initial state is added in quadrature too (also stored as D_initial_sd, G_initial_sd), so the ± 2 sd band reaches
the other curves: the initial state is the largest error source, and the Laplace band alone ignores it. Both
initial states can still be wrong the same way.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field as dc_field
from typing import Any

import numpy as np
import torch

from ..field import DensityField, initial_state, noise_variance
from ..jobs import CancelToken, Progress, ProgressClock, is_cancelled, run_job
from ..pde.grid import MaskedGrid
from ..pde.torch_solver import TorchGrid, simulate_tables, simulate_tables_batch
from ..symbolic.selection import block_errors, heldout_choice
from .fit import BinnFit

__all__ = ["RefineConfig", "refine_binn", "refine_binn_job", "check_frames", "INITIAL_STATES"]

INITIAL_STATES = ("auto", "surrogate", "data", "denoised")
_AUTO = ("denoised", "surrogate")  # tried by initial = "auto"
_STAGE = "refine"
_JACOBIAN_BATCH = 26  # simulations per batch in _jacobian (bounds its memory: 3 states x batch x boxes)
# a joint fit is kept only when its misfit is below the best held fixed by this share of the misfit that the first
# frame's noise is expected to add to a fit from that frame held fixed (_keep_joint_fits)
_JOINT_NOISE_SHARE = 0.5
_EXCESS_DRAWS = 16  # draws for that expected misfit when noise_draws = 0 (the correction off)
_BAND_DRAW_SEED = 1  # the first frame's noise drawn for the bands: other draws than the bias correction's (seed 0)
_HOLDOUT_BLOCK = 4  # boxes per side of the blocks whose held-out errors pair the prior strengths
_HOLDOUT_LEVEL = 0.05  # a weaker prior is kept only when the stronger ones predict worse at this level
_DISTILL_RETRY = 0.01  # a network further than this (relative L2) from its refined table is fitted again afresh


@dataclass
class RefineConfig:
    """Refinement of the BINN's D(u), G(u) by the misfit of a simulation of the PDE (see
    :mod:`napari_binn.binn.refine`). enabled: run it after training. iterations: L-BFGS iterations per prior
    strength. nodes: table nodes over [0, 1.3 x max observed u]. smoothness: prior strengths on f'' tried
    strongest first, the one with the highest Laplace evidence kept (one value = fixed). initial: the initial
    state, 'auto' (both 'denoised' and 'surrogate', the lower final misfit kept) | 'surrogate' (the BINN
    surrogate at the first frame) | 'data' (the first frame) | 'denoised' (the first
    frame with the boxes of empty space that hold only noise set to 0). joint: then fit the initial state too
    (kept only when its misfit is below the best of the initial states held fixed by more than half the misfit
    the first frame's noise is expected to add to a fit from it held fixed, see :func:`_keep_joint_fits`; never from
    'surrogate', whose smooth first frame puts cells into gaps and wounds that growth alone can then fill, so
    D falls towards 0), with
    total-variation weight tv_weight (relative to
    the misfit at the noise level). cfl: step size as a fraction of the stable step, in (0, 1).
    distill_steps: L-BFGS iterations fitting the networks to the refined tables. bands: compute the bands D_sd,
    G_sd (Laplace, widened by the spread the first frame's noise gives the curves and by the spread between
    initial states). noise_draws: draws of the first frame's noise for the first-order correction of the bias it
    gives the curves (see :func:`_noise_corrected`) and, other draws, for the bands' share of it (0: both off).
    affine_start: also start the first prior strength from the best affine curves (see :func:`_affine_start`) and
    go on from whichever start ends it with the lower penalised misfit.
    holdout_frames: 0 (default): the prior strength is the one with the highest Laplace evidence; n > 0: the last
    n frames are held out, the ladder is fitted again to the earlier frames and the strongest prior whose fit
    predicts the held-out ones not worse than the best fit's (one-sided paired t test over 4 x 4-box blocks at
    0.05) is kept; None (``"none"`` in TOML): min(3, (frames - 2) // 2) frames while at least 3 stay to fit,
    else the evidence. Measured on the discovery benchmark: better than the evidence in 9 runs of 32 and worse
    in 8, so not the default.
    initial_frames: 1 (default): the first frame of data ('data', 'denoised') is the field's first frame; n > 1:
    the mean of the first n frames, each moved back to the first frame's time by the BINN surrogate's change
    (u_t - (s_t - s_0)), before the empty-space denoising, with the noise variance of the correction's and the
    bands' draws divided by n; frames 2..n are then left out of the misfit (that mean holds their noise; fitted,
    they pulled D down). It halves the first frame's noise variance at n = 2, at the cost of the surrogate's error
    in that change and of n - 1 fitted frames. Measured (n = 2, docs/discovery-benchmark.md; 6 December, before
    the noise correction took its mean-shift term): on the discovery
    benchmark the BINN's D within 15% in 8 of 8 cases and G within 10% in 7 (7 and 6 at n = 1), the structure in
    22 of 24 runs as at n = 1; Allee growth and curves that were already close a few points worse; on Jin 2016's
    5 frames, 12 h apart, the learned curves' simulation fits worse (N(t) 6.9 -> 10.3%), so not the default.
    min_frames: fewest frames refinement accepts (>= 3). max_steps: time steps per simulation before refusing.
    max_memory_gb: the memory the states one simulation keeps for its gradient may hold; on large fields it
    lowers max_steps to max_memory_gb / (TAPE_BYTES_PER_BOX_STEP x boxes in the ROI) (see
    :func:`steps_within_memory`)."""

    enabled: bool = True
    iterations: int = 50
    nodes: int = 25
    smoothness: list[float] = dc_field(default_factory=lambda: [10.0, 1.0, 0.1, 0.01])
    initial: str = "auto"
    joint: bool = True
    tv_weight: float = 0.05
    cfl: float = 0.8
    distill_steps: int = 200
    bands: bool = True
    noise_draws: int = 16
    affine_start: bool = True
    min_frames: int = 3
    max_steps: int = 5000
    max_memory_gb: float = 6.0
    holdout_frames: int | None = 0
    initial_frames: int = 1

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"refine.{key}: {msg}")

        need(isinstance(self.enabled, bool), "enabled", f"must be true or false; got {self.enabled!r}")
        need(isinstance(self.joint, bool), "joint", f"must be true or false; got {self.joint!r}")
        need(self.initial in INITIAL_STATES, "initial",
             f"must be one of {', '.join(map(repr, INITIAL_STATES))}; got {self.initial!r}")
        need(int(self.iterations) >= 1, "iterations", f"must be >= 1; got {self.iterations}")
        need(int(self.nodes) >= 4, "nodes", f"must be >= 4 (value, slope and curvature per node); got {self.nodes}")
        sm = list(self.smoothness) if isinstance(self.smoothness, (list, tuple)) else None
        need(sm is not None and len(sm) >= 1 and all(np.isfinite(float(s)) and float(s) > 0 for s in sm),
             "smoothness", f"must be a list of one or more positive numbers (e.g. [10, 1, 0.1, 0.01]); got "
             f"{self.smoothness!r}")
        need(0.0 < float(self.cfl) < 1.0, "cfl", f"must be in (0, 1); got {self.cfl}")
        need(float(self.tv_weight) >= 0, "tv_weight", f"must be >= 0; got {self.tv_weight}")
        need(int(self.distill_steps) >= 0, "distill_steps", f"must be >= 0; got {self.distill_steps}")
        need(isinstance(self.noise_draws, (int, np.integer)) and not isinstance(self.noise_draws, bool)
             and int(self.noise_draws) >= 0, "noise_draws",
             f"must be a whole number >= 0 (0 switches the correction off); got {self.noise_draws!r}")
        need(isinstance(self.affine_start, bool), "affine_start", f"must be true or false; got {self.affine_start!r}")
        need(self.holdout_frames is None or (isinstance(self.holdout_frames, (int, np.integer))
                                             and not isinstance(self.holdout_frames, bool)
                                             and int(self.holdout_frames) >= 0), "holdout_frames",
             f"must be unset or a whole number >= 0 (0 chooses the prior strength by the evidence); got "
             f"{self.holdout_frames!r}")
        need(isinstance(self.initial_frames, (int, np.integer)) and not isinstance(self.initial_frames, bool)
             and int(self.initial_frames) >= 1, "initial_frames",
             f"must be a whole number >= 1 (1: the first frame alone); got {self.initial_frames!r}")
        need(int(self.min_frames) >= 3, "min_frames", f"must be >= 3; got {self.min_frames}")
        need(int(self.max_steps) >= 10, "max_steps", f"must be >= 10; got {self.max_steps}")
        need(np.isfinite(float(self.max_memory_gb)) and float(self.max_memory_gb) > 0, "max_memory_gb",
             f"must be a positive number of GB; got {self.max_memory_gb}")

    def __post_init__(self) -> None:
        self.smoothness = [float(s) for s in self.smoothness] if isinstance(self.smoothness, (list, tuple)) \
            else self.smoothness
        self.validate()


def check_frames(cfg: RefineConfig, n_frames: int) -> int:
    """A ValueError naming the key when a field of ``n_frames`` frames is too short for ``cfg``: fewer than
    ``min_frames``, too few left to fit beside ``holdout_frames``, or no fitted frame after the ``initial_frames``
    averaged into the first; else the frames held out (:func:`holdout_count`). (The pipeline checks before
    training.)"""
    if n_frames < cfg.min_frames:
        raise ValueError(f"refinement through the solver needs at least refine.min_frames = {cfg.min_frames} "
                         f"frames; the field has {n_frames}. Use more frames, or switch it off "
                         "(refine.enabled = false)")
    held = holdout_count(cfg, n_frames)
    n = int(cfg.initial_frames)
    if n >= n_frames - held:
        raise ValueError(f"refine.initial_frames = {n} averages {n} of the {n_frames - held} frames the refinement "
                         f"fits (the field has {n_frames}" + (f", {held} held out" if held else "") + "); at least "
                         f"one fitted frame must follow them: use at most {max(n_frames - held - 1, 1)} (1: the "
                         "first frame alone)")
    return held


def holdout_count(cfg: RefineConfig, n_frames: int) -> int:
    """Frames held out to choose the prior strength on a field of ``n_frames`` frames (0: by the evidence); a
    ValueError naming the key when ``cfg.holdout_frames`` leaves fewer than 3 frames to fit."""
    if cfg.holdout_frames is None:
        h = min(3, (n_frames - 2) // 2)
        h = h if n_frames - h >= 3 else 0
    else:
        h = int(cfg.holdout_frames)
        if h and n_frames - h < 3:
            raise ValueError(f"refine.holdout_frames = {h} leaves {n_frames - h} of the field's {n_frames} frames to "
                             f"fit; at least 3 must stay: use at most {max(n_frames - 3, 0)} (0 chooses the prior "
                             "strength by the evidence)")
    return h if len(cfg.smoothness) > 1 else 0  # one strength: nothing to choose


#: memory one Heun step of the solver keeps per box of the ROI for the gradient (the adjoint's two float64 states:
#: measured 17.5 bytes; autograd's tape, used before, held 340-480)
TAPE_BYTES_PER_BOX_STEP = 24


def steps_within_memory(cfg: RefineConfig, n_boxes: int) -> int:
    """Time steps per simulation: ``cfg.max_steps``, or fewer where the states kept for the gradient on
    ``n_boxes`` boxes would exceed ``cfg.max_memory_gb`` (at 24 bytes per box and step, from about 50 000 boxes
    at the defaults), never fewer than 10."""
    by_memory = int(float(cfg.max_memory_gb) * 1e9 / (TAPE_BYTES_PER_BOX_STEP * max(int(n_boxes), 1)))
    return max(10, min(int(cfg.max_steps), by_memory))


class _Curves:
    """Whitened parametrisation of one table: f = a + b x + sum of scaled second differences."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.h = 1.0 / (m - 1)

    def to_values(self, z: torch.Tensor) -> torch.Tensor:
        a, b, c = z[0], z[1], z[2:]
        h = self.h
        second = c * h ** 1.5  # f_{j+1} - 2 f_j + f_{j-1} = h² f'' with f'' = c / sqrt(h)
        slope = b * h + torch.cat([second.new_zeros(1), torch.cumsum(second, 0)])  # (m - 1,) first differences
        return a + torch.cat([slope.new_zeros(1), torch.cumsum(slope, 0)])

    def from_values(self, f: np.ndarray) -> np.ndarray:
        h = self.h
        return np.concatenate([[f[0], (f[1] - f[0]) / h], (f[2:] - 2 * f[1:-1] + f[:-2]) / h ** 1.5])


def _first_frame(frames: np.ndarray, surrogate: list[np.ndarray]) -> np.ndarray:
    """The (Ny, Nx) first frame of data the initial states 'data' and 'denoised' start from, given the field's
    first n ``frames`` and the BINN surrogate on the same boxes at the same times: the first frame itself (n = 1),
    or the mean of the n frames, each moved back to the first frame's time by the surrogate's change since then
    (u_t - (s_t - s_0)); a box unobserved in all n frames is NaN."""
    if len(surrogate) <= 1:
        return frames[0]
    moved = np.stack([frames[k] - (surrogate[k] - surrogate[0]) for k in range(len(surrogate))])
    seen = np.isfinite(moved).sum(axis=0)
    return np.where(seen > 0, np.nansum(moved, axis=0) / np.maximum(seen, 1), np.nan)


def _softplus_inv(y: np.ndarray) -> np.ndarray:
    y = np.maximum(y, 1e-6)
    return np.where(y > 30, y, np.log(np.expm1(np.minimum(y, 30))))


class _Problem:
    """Everything one refinement needs: data on the mask, scales, the initial states, the loss."""

    def __init__(self, field: DensityField, fit: BinnFit, cfg: RefineConfig) -> None:
        self.cfg = cfg
        self.grid = MaskedGrid(field.mask, field.dx_um)
        self.tg = TorchGrid(self.grid)
        self.t = np.asarray(field.t_h, float)
        obs = np.stack([self.grid.from_grid(o.astype(float)) > 0.5 for o in field.observed])
        data = np.stack([self.grid.from_grid(np.nan_to_num(f)) for f in field.u])
        # the fitted boxes: every observed box but those of frames 1 .. initial_frames - 1, which went into the first
        # frame of data (a fit to them would match the noise they share with it; the scales and the noise level
        # below still use every observed box)
        fitted = obs.copy()
        fitted[1:int(cfg.initial_frames)] = False
        self.obs = torch.as_tensor(fitted)
        self.data = torch.as_tensor(np.where(fitted, data, 0.0))
        self.n_obs = int(fitted.sum())
        K = fit.scales.K
        vals = data[obs]
        self.u_max = 1.3 * float(vals.max())
        self.nodes = np.linspace(0.0, self.u_max, cfg.nodes)
        lo, hi = fit.u_range["min"], fit.u_range["max"]
        self.observed_range = (float(lo), float(hi))
        u_obs = np.linspace(lo, hi, 64)
        d_start = np.maximum(fit.D(self.nodes), 1e-9)
        g_start = fit.G(self.nodes)
        self.D_scale = float(max(np.mean(fit.D(u_obs)), 1e-6 * fit.bounds["D_max"], 1e-12))
        span_h = float(self.t[-1] - self.t[0])
        self.G_scale = float(max(np.max(np.abs(fit.G(u_obs))), 1.0 / span_h))
        # D is capped where a simulation would take half of max_steps (bounds the cost of a line-search trial)
        # and never below 10x the BINN's D (a BINN's D can be far too small)
        self.max_steps = steps_within_memory(cfg, self.tg.n)
        h_min = span_h / (0.5 * self.max_steps)
        d_lim = cfg.cfl * field.dx_um ** 2 / (self.tg.max_open_faces * h_min)
        self.D_cap = max(d_lim, 10.0 * max(self.D_scale, float(d_start.max())))
        self.curves = _Curves(cfg.nodes)
        self.z0 = np.concatenate([self.curves.from_values(_softplus_inv(d_start / self.D_scale)),
                                  self.curves.from_values(g_start / self.G_scale)])
        # initial states on the mask
        yy, xx = np.meshgrid(field.y_um, field.x_um, indexing="ij")
        # the surrogate on the grid at the first frames: the first for its initial state, initial_frames of them
        # for the first frame of data
        sur_first = [fit.u(xx, yy, np.full(xx.shape, th)) for th in self.t[:int(cfg.initial_frames)]]
        self.ic_surrogate = torch.as_tensor(np.maximum(self.grid.from_grid(sur_first[0]), 0.0))
        first = _first_frame(field.u, sur_first)
        self.ic_data = torch.as_tensor(self.grid.from_grid(initial_state(first, field.mask)))
        self.ic_denoised = torch.as_tensor(self.grid.from_grid(initial_state(first, field.mask, denoise=True)))
        # the noise level: the surrogate's misfit to the data (it fits the data to about the noise)
        tt, yy3, xx3 = np.meshgrid(self.t, field.y_um, field.x_um, indexing="ij")
        sur = np.stack([self.grid.from_grid(s) for s in fit.u(xx3, yy3, tt)])
        res = (sur - data)[obs]
        self.sigma = float(max(np.sqrt(np.mean(res ** 2)), 1e-3 * K))
        # the noise variance as a + b u (u the surrogate's value; b > 0 for counts): for the first frame's draws
        # (a mean of initial_frames frames: that variance / initial_frames)
        a, b = noise_variance(sur[obs], res)
        self.noise_ab = (a / int(cfg.initial_frames), b / int(cfg.initial_frames))
        self.time_factor = None
        if fit.config.use_delay:
            self.time_factor = lambda th: float(fit.T(np.asarray([th]))[0])
        self.K = K

    def truncated(self, frames: int) -> "_Problem":
        """The same problem (tables, scales, noise level, initial states) observed on its first ``frames`` frames
        only: the fits whose prediction of the later frames chooses the prior strength."""
        part = copy.copy(self)
        part.t = self.t[:frames]
        part.obs, part.data = self.obs[:frames], self.data[:frames]
        part.n_obs = int(part.obs.sum())
        return part

    def heldout_errors(self, z: np.ndarray, u0: torch.Tensor, frames: int) -> np.ndarray:
        """Squared misfits (noise-variance units) of the simulation from ``u0`` on the frames from ``frames`` on,
        summed over the observed boxes of each spatial block of _HOLDOUT_BLOCK x _HOLDOUT_BLOCK boxes (the refit's
        held-out test pairs its candidates the same way): the blocks in a fixed order, so two fits pair."""
        with torch.no_grad():
            sim = self.simulate(torch.as_tensor(z), u0)[frames:].numpy()
        obs, data = self.obs[frames:].numpy(), self.data[frames:].numpy()
        pred = np.stack([self.grid.to_grid(s) for s in sim]) / self.sigma
        observed = np.stack([self.grid.to_grid(np.where(o, d, np.nan)) for o, d in zip(obs, data)]) / self.sigma
        return block_errors(pred, observed, self.grid.mask, _HOLDOUT_BLOCK)

    def tables(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.nodes
        fD = self.curves.to_values(z[:m])
        fG = self.curves.to_values(z[m:2 * m])
        D = torch.clamp(self.D_scale * torch.nn.functional.softplus(fD), max=self.D_cap)
        G = self.G_scale * torch.clamp(fG, -50.0, 50.0)
        return D, G

    def simulate(self, z: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
        D, G = self.tables(z)
        return simulate_tables(self.tg, u0, self.t, self.u_max, D, G, cfl=self.cfg.cfl,
                               max_steps=self.max_steps, time_factor=self.time_factor)

    def chi2(self, sim: torch.Tensor) -> torch.Tensor:
        """Sum of squared misfits over the observed boxes of every fitted frame, in units of the noise variance."""
        r = torch.where(self.obs, sim - self.data, torch.zeros_like(sim)) / self.sigma
        return (r * r).sum()

    def _penalised_slices(self) -> tuple[slice, slice]:
        """Where in z the smoothness prior acts: each table's scaled second differences (not its value and slope)."""
        m = self.cfg.nodes
        return slice(2, m), slice(m + 2, 2 * m)

    def penalised(self) -> np.ndarray:
        """1 for the parameters the smoothness prior penalises, 0 for each table's value and slope."""
        P = np.zeros(2 * self.cfg.nodes)
        for part in self._penalised_slices():
            P[part] = 1.0
        return P

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        """Sum of squares of the penalised parameters."""
        d, g = self._penalised_slices()
        return (z[d] ** 2).sum() + (z[g] ** 2).sum()

    def penalised_misfit(self, z: torch.Tensor, u0: torch.Tensor, lam: float) -> torch.Tensor:
        """0.5 chi² of the simulation from ``u0`` + 0.5 ``lam`` x prior: the loss every fit here minimises (/ n_obs),
        the joint fit and the noise correction with one term more."""
        return 0.5 * self.chi2(self.simulate(z, u0)) + 0.5 * lam * self.prior(z)

    def tv(self, u0: torch.Tensor) -> torch.Tensor:
        i, j = self.tg.face_i, self.tg.face_j
        eps = 1e-3 * self.K
        return torch.sqrt((u0[i] - u0[j]) ** 2 + eps * eps).sum() / self.sigma


def _lbfgs(params: list[torch.Tensor], loss_fn, iterations: int, cancel: CancelToken | None) -> float:
    """Minimise ``loss_fn`` over ``params`` in place (L-BFGS, strong-Wolfe line search, ``iterations`` function
    evaluations at most in bursts of 10) and leave ``params`` at the lowest loss evaluated, never worse than the
    start (torch's L-BFGS leaves them at its last iterate, which after a line search through curves the solver
    refuses, an infinite loss without a gradient, need not be its best). Returns that loss."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=10, history_size=20, line_search_fn="strong_wolfe")
    best = {"loss": math.inf, "params": [p.detach().clone() for p in params]}

    def closure():
        opt.zero_grad(set_to_none=True)
        try:
            loss = loss_fn()
        except ValueError:  # the line search tried curves that would need too many steps
            return torch.tensor(math.inf, dtype=torch.float64)
        val = float(loss.detach())
        if math.isfinite(val) and val < best["loss"]:
            best.update(loss=val, params=[p.detach().clone() for p in params])
        loss.backward()
        return loss

    previous = math.inf
    for _ in range(max(1, iterations // 10)):
        if is_cancelled(cancel):
            break
        opt.step(closure)
        if not all(bool(torch.isfinite(p).all()) for p in params) or best["loss"] > previous - 1e-7 * abs(previous):
            break
        previous = best["loss"]
    with torch.no_grad():
        for p, b in zip(params, best["params"]):
            p.copy_(b)
    return best["loss"]


def _jacobian(prob: _Problem, z: np.ndarray, u0: torch.Tensor) -> np.ndarray:
    """Finite-difference Jacobian of the noise-scaled residuals on observed boxes with respect to z (the
    simulations batched, _JACOBIAN_BATCH at a time: the same numbers as one at a time, several times faster)."""
    obs = prob.obs.numpy()
    steps = [1e-4 * max(1.0, abs(z[k])) for k in range(z.size)]
    points = [z]
    for k, step in enumerate(steps):
        zk = z.copy()
        zk[k] += step
        points.append(zk)
    resid = []
    with torch.no_grad():
        for start in range(0, len(points), _JACOBIAN_BATCH):
            tables = [prob.tables(torch.as_tensor(p)) for p in points[start:start + _JACOBIAN_BATCH]]
            D = np.stack([d.numpy() for d, _ in tables])
            G = np.stack([g.numpy() for _, g in tables])
            sims = simulate_tables_batch(prob.tg, u0, prob.t, prob.u_max, D, G, cfl=prob.cfg.cfl,
                                         max_steps=prob.max_steps, time_factor=prob.time_factor)
            resid.extend(sim[obs] / prob.sigma for sim in sims)
    base = resid[0]
    J = np.empty((base.size, z.size))
    for k, step in enumerate(steps):
        J[:, k] = (resid[k + 1] - base) / step
    return J


def _log_evidence(chi2: float, z: np.ndarray, J: np.ndarray, lam: float, P: np.ndarray, sigma2_ratio: float) -> float:
    """Laplace log evidence (up to a constant) of prior strength ``lam`` on the parameters where ``P`` is 1;
    residuals rescaled by ``sigma2_ratio``."""
    H = J.T @ J / sigma2_ratio + lam * np.diag(P)
    sign, logdet = np.linalg.slogdet(H + 1e-9 * np.eye(z.size))
    k = int(P.sum())
    return float(-0.5 * chi2 / sigma2_ratio - 0.5 * lam * np.sum(P * z * z) + 0.5 * k * math.log(lam)
                 - 0.5 * logdet)


def _closest_lines(prob: _Problem) -> np.ndarray:
    """z of the straight lines (each table's value and slope, second differences 0) closest in least squares to the
    BINN's curves, in the tables' own scales, over the nodes within the observed densities."""
    m = prob.cfg.nodes
    x = np.linspace(0.0, 1.0, m)
    inside = (prob.nodes >= prob.observed_range[0]) & (prob.nodes <= prob.observed_range[1])
    if inside.sum() < 2:
        inside[:] = True
    z = np.zeros(2 * m)
    for k in (0, m):
        f = prob.curves.to_values(torch.as_tensor(prob.z0[k:k + m])).numpy()
        slope, value = np.polyfit(x[inside], f[inside], 1)
        z[k:k + 2] = value, slope
    return z


def _affine_start(prob: _Problem, u0: torch.Tensor, cfg: RefineConfig, cancel: CancelToken | None) -> np.ndarray:
    """The best affine curves: D affine in its softplus scale and G affine in u (each table's value and slope
    free, its second differences 0, so the smoothness prior is 0: the limit of an infinitely strong prior), fitted
    by L-BFGS through the solver from the straight lines closest to the BINN's curves over the observed densities.
    Four constants: a BINN whose curves are far off can leave the fit of the whole tables in a worse local minimum
    than this simple start leads to (the discovery benchmark's Poisson wound, seed 2, from the clean first frame:
    misfit 1.030 from the BINN's curves, 1.019 from the true ones). Returns the parameter vector z."""
    m, n = cfg.nodes, prob.n_obs
    lines = _closest_lines(prob)
    p = torch.tensor(np.concatenate([lines[:2], lines[m:m + 2]]), requires_grad=True)
    zeros = torch.zeros(m - 2, dtype=p.dtype)

    def z_of(q: torch.Tensor) -> torch.Tensor:
        return torch.cat([q[:2], zeros, q[2:], zeros])

    def loss_fn():
        return 0.5 * prob.chi2(prob.simulate(z_of(p), u0)) / n

    _lbfgs([p], loss_fn, cfg.iterations, cancel)
    return z_of(p.detach()).numpy().copy()


def _ladder(prob: _Problem, cfg: RefineConfig, u0: torch.Tensor,
            cancel: CancelToken | None) -> Generator[dict[str, Any], None, None]:
    """The fits over ``cfg.smoothness`` from the initial state ``u0``, strongest prior first, each warm-started from
    the one before (the first also from the affine start, the better kept): yields each fit's record (smoothness,
    z, chi2, start) when it is done; stops early on cancel."""
    z = torch.tensor(prob.z0, requires_grad=True)
    start = "BINN"

    def fit_at(zt: torch.Tensor, lam: float) -> float:  # L-BFGS on zt in place; its lowest loss
        return _lbfgs([zt], lambda: prob.penalised_misfit(zt, u0, lam) / prob.n_obs, cfg.iterations, cancel)

    for step, lam in enumerate(cfg.smoothness, 1):
        loss = fit_at(z, lam)
        if step == 1 and cfg.affine_start and not is_cancelled(cancel):
            za = torch.tensor(_affine_start(prob, u0, cfg, cancel), requires_grad=True)
            loss_aff = fit_at(za, lam)
            if loss_aff < loss or not math.isfinite(loss):
                z, start = za, "affine"
        if is_cancelled(cancel):
            return
        with torch.no_grad():
            chi2 = float(prob.chi2(prob.simulate(z, u0)))
        yield {"smoothness": lam, "z": z.detach().numpy().copy(), "chi2": chi2, "start": start}


def _strategy(prob: _Problem, cfg: RefineConfig, initial: str, held: int, cancel: CancelToken | None,
              clock: ProgressClock, offset: int, label: str) -> Generator[Progress, None, dict[str, Any] | None]:
    """The ladder from the fixed initial state ``initial``, its prior strength chosen (by the last ``held`` frames,
    :func:`holdout_count`, or with 0 by the evidence), then (``cfg.joint``) the joint initial state; None on
    cancel."""
    n = prob.n_obs
    u0_fixed = {"data": prob.ic_data, "denoised": prob.ic_denoised, "surrogate": prob.ic_surrogate}[initial]
    with torch.no_grad():
        chi2_start = float(prob.chi2(prob.simulate(torch.as_tensor(prob.z0), u0_fixed)))
    fits: list[dict[str, Any]] = []
    for f in _ladder(prob, cfg, u0_fixed, cancel):
        fits.append(f)
        yield clock.event(_STAGE, offset + len(fits), f"{label}initial state '{initial}', smoothness "
                          f"{f['smoothness']:g}: misfit {f['chi2'] / n:.4g} (start {chi2_start / n:.4g}, noise "
                          "variance units" + (f"; from the {f['start']} curves)" if len(fits) == 1
                                              and cfg.affine_start else ")"),
                          smoothness=f["smoothness"], misfit=f["chi2"] / n, initial=initial)
    if is_cancelled(cancel) or len(fits) < len(cfg.smoothness):
        return None
    start = fits[-1]["start"]
    steps = len(cfg.smoothness)
    # the noise variance re-estimated from the best misfit (the evidence and the bands)
    s2 = max(min(f["chi2"] for f in fits) / n, 1e-12)
    jac: dict[int, np.ndarray] = {}
    best = 0
    if held:  # forward prediction (never with one strength: holdout_count is then 0): the ladder again on the
        # earlier frames predicts the later
        keep = len(prob.t) - held
        trial = list(_ladder(prob.truncated(keep), cfg, u0_fixed, cancel))
        if is_cancelled(cancel) or len(trial) < len(fits):
            return None
        errors = [prob.heldout_errors(ft["z"], u0_fixed, keep) for ft in trial]
        best, excluded, _, totals = heldout_choice(errors, list(range(len(fits))), level=_HOLDOUT_LEVEL, margin=0.0)
        n_held = int(prob.obs[keep:].sum())
        for f, total, out in zip(fits, totals, excluded):
            f["holdout_misfit"], f["holdout_excluded"] = total / max(n_held, 1), bool(out)
        best = 0 if best is None else best
        steps += 1
        yield clock.event(_STAGE, offset + steps, f"{label}initial state '{initial}': smoothness "
                          f"{fits[best]['smoothness']:g} chosen by predicting the last {held} frame(s) from fits to "
                          "the earlier ones: the strongest prior not predicting significantly worse than the best "
                          "(misfit " + ", ".join(f"{f['smoothness']:g}: {f['holdout_misfit']:.4g}"
                                                                for f in fits) + ")")
    elif len(fits) > 1:  # the Laplace evidence
        for i, f in enumerate(fits):
            jac[i] = _jacobian(prob, f["z"], u0_fixed)
            f["log_evidence"] = _log_evidence(f["chi2"], f["z"], jac[i], f["smoothness"], prob.penalised(), s2)
        best = max(range(len(fits)), key=lambda i: fits[i]["log_evidence"])
    out = {"initial": initial, "base": initial, "start": start, "fits": fits, "chosen": fits[best],
           "z": fits[best]["z"], "u0": u0_fixed, "chi2": fits[best]["chi2"], "chi2_start": chi2_start,
           "jacobian": jac.get(best), "s2": s2, "notes": [], "joint": None, "noise_correction": None}
    if _corrects_noise(cfg, initial) and not is_cancelled(cancel):
        zc, chi2c, info = _noise_corrected(prob, out["z"], out["chi2"], u0_fixed, out["chosen"]["smoothness"], cfg,
                                           cancel)
        if is_cancelled(cancel):
            return None
        # the Jacobian (for the bands) stays the one at the uncorrected curves, which the correction moves a little
        out.update(z=zc, chi2=chi2c, noise_correction=info)
        yield clock.event(_STAGE, offset + steps + 1, f"{label}initial state '{initial}': first "
                          f"frame's noise bias corrected ({info['draws']} draws): misfit {chi2c / n:.4g}")
    if _joint_from(cfg, initial) and not is_cancelled(cancel):
        zj = torch.tensor(out["z"], requires_grad=True)
        wj = torch.zeros_like(u0_fixed, requires_grad=True)  # the change of the initial state / noise s.d.
        lam = out["chosen"]["smoothness"]

        def joint_loss():
            u0j = u0_fixed + prob.sigma * wj
            return (prob.penalised_misfit(zj, u0j, lam) + cfg.tv_weight * prob.tv(u0j)) / n

        _lbfgs([zj, wj], joint_loss, cfg.iterations, cancel)
        with torch.no_grad():
            u0c = torch.clamp(u0_fixed + prob.sigma * wj.detach(), min=0.0)
            chi2_joint = float(prob.chi2(prob.simulate(zj.detach(), u0c)))
        out["joint"] = {"z": zj.detach().numpy().copy(), "u0": u0c, "chi2": chi2_joint,
                        "noise_excess": _noise_excess(prob, out["chosen"]["z"], u0_fixed, out["noise_correction"])}
        yield clock.event(_STAGE, offset + steps + 1 + _corrects_noise(cfg, initial),
                          f"{label}joint initial state: misfit "
                          f"{chi2_joint / n:.4g} (held fixed: {out['chi2'] / n:.4g})")
    return out


#: a refined simulation that leaves less than this share of the surrogate's residual variance shows a surrogate that
#: does not fit the data (a healthy surrogate fits it to about the noise: misfits of 0.9-1.0)
_POOR_SURROGATE_MISFIT = 0.5


def _corrects_noise(cfg: RefineConfig, initial: str) -> bool:
    """Whether the first frame's noise is corrected for: with ``cfg.noise_draws``, for the initial states that are
    the data's first frame ('data', 'denoised'); the surrogate's first frame carries its own smooth error instead."""
    return int(cfg.noise_draws) > 0 and initial != "surrogate"


def _noise_draws(prob: _Problem, u0: torch.Tensor, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` draws of the first frame's noise e on the mask: mean 0, variance a + b u0 (``prob.noise_ab``),
    gamma-distributed so that u0 + e stays >= 0, and 0 where u0 is 0 (boxes set to 0 as empty space hold no
    noise). Empty when there is no noise to draw. A fixed ``seed``: a run is reproducible."""
    u0n = u0.detach().numpy()
    a, b = prob.noise_ab
    var = a + b * u0n
    keep = (u0n > 0) & (var > 0)
    if not keep.any():
        return []
    rng = np.random.default_rng(seed)
    shape = np.where(keep, u0n ** 2 / np.where(keep, var, 1.0), 1.0)
    scale = np.where(keep, var / np.where(keep, u0n, 1.0), 0.0)
    return [torch.as_tensor(np.where(keep, rng.gamma(shape, scale) - u0n, 0.0)) for _ in range(int(count))]


def _noise_spread(prob: _Problem, z: torch.Tensor, u0: torch.Tensor, draws: list[torch.Tensor], *,
                  hold_base: bool = False) -> torch.Tensor:
    """B(z): the mean over ``draws`` of |S(z, u0 + e) - S(z, u0)|² on the observed boxes, in noise-variance units
    (differentiable in z): the first frame's noise as the simulation carries it forward. ``hold_base``: the same
    value with S(z, u0) held fixed in the gradient, which is then 2 E[J_e^T (S(z, u0 + e) - S(z, u0))] (J_e the
    simulation's Jacobian in z from u0 + e): twice the mean that the first frame's noise gives the misfit's
    gradient at the curves z (:func:`_noise_corrected`)."""
    base = prob.simulate(z, u0)
    if hold_base:
        base = base.detach()
    spread = torch.zeros((), dtype=base.dtype)
    for e in draws:
        r = torch.where(prob.obs, prob.simulate(z, u0 + e) - base, torch.zeros_like(base)) / prob.sigma
        spread = spread + (r * r).sum() / len(draws)
    return spread


def _noise_corrected(prob: _Problem, z: np.ndarray, chi2_before: float, u0: torch.Tensor, lam: float,
                     cfg: RefineConfig, cancel: CancelToken | None) -> tuple[np.ndarray, float, dict[str, Any]]:
    """First-order correction of the bias that the first frame's noise gives the curves.

    The simulation starts from the noisy first frame u0 + e, so at the true curves the misfit's gradient in z does
    not have mean 0: half the misfit's gradient has mean E[J_e^T (S(z, u0 + e) - S(z, u0))] (J_e the simulation's
    Jacobian in z from u0 + e). That is half the gradient of B(z), the expected size of the noise carried forward
    (:func:`_noise_spread`), which shrinks as D grows and so pulls the misfit's minimum towards a larger D (and a
    growth that damps the noise), plus J^T E[S(z, u0 + e) - S(z, u0)]: the mean shift the noise gives a simulation
    that is not linear in its initial state (low densities growing, D vanishing with u), of the same order in the
    noise variance. (A correction by B's gradient alone leaves that term out: docs/discovery-benchmark.md, "Lab
    checks on what the noise correction leaves".) That mean is estimated at the chosen curves from
    ``cfg.noise_draws`` draws of the first frame's noise (:func:`_noise_draws`) about the first frame, held fixed,
    and the misfit minus the linear term is minimised again from the chosen curves at the chosen prior strength:
    the bias-corrected estimating equation, to first order. (Subtracting B(z) itself is not bounded below where the
    curves amplify the noise, D near 0; a frozen gradient is.) ``chi2_before``: the misfit at ``z`` (the ladder
    has it)."""
    n = prob.n_obs
    a, b = prob.noise_ab
    info: dict[str, Any] = {"draws": int(cfg.noise_draws), "noise_variance": [a, b]}
    draws = _noise_draws(prob, u0, int(cfg.noise_draws))
    if not draws:
        info.update(note="no noise to correct for (noise variance 0 or an empty first frame)")
        return z, chi2_before, info
    zt = torch.tensor(z, requires_grad=True)
    spread = _noise_spread(prob, zt, u0, draws, hold_base=True)  # its value is B(z); its gradient twice the mean
    twice_bias = torch.autograd.grad(spread, zt)[0].detach()
    zc = torch.tensor(z, requires_grad=True)

    def loss_fn():
        return (prob.penalised_misfit(zc, u0, lam) - 0.5 * (twice_bias * zc).sum()) / n

    _lbfgs([zc], loss_fn, cfg.iterations, cancel)
    zv = zc.detach().numpy().copy()
    with torch.no_grad():
        chi2_after = float(prob.chi2(prob.simulate(zc, u0)))
    info.update(noise_spread=float(spread.detach()) / n, misfit_before=chi2_before / n, misfit_after=chi2_after / n,
                shift=float(np.linalg.norm(zv - z)))
    return zv, chi2_after, info


def _noise_excess(prob: _Problem, z: np.ndarray, u0: torch.Tensor, correction: dict[str, Any] | None) -> float:
    """B(z) n: the misfit that the first frame's noise, carried forward, is expected to add to a fit from ``u0``
    held fixed (:func:`_noise_spread`, in noise-variance units), at the curves ``z``. The noise correction has it
    (``correction``; 0 where there was no noise to draw); with the correction off (noise_draws = 0) it is estimated
    from _EXCESS_DRAWS draws."""
    if correction is not None:
        return float(correction.get("noise_spread", 0.0)) * prob.n_obs
    draws = _noise_draws(prob, u0, _EXCESS_DRAWS)
    if not draws:
        return 0.0
    with torch.no_grad():
        return float(_noise_spread(prob, torch.as_tensor(z), u0, draws))


def _joint_from(cfg: RefineConfig, initial: str) -> bool:
    """Whether the initial state ``initial`` is also fitted jointly: with ``cfg.joint``, from every state but the
    surrogate's (its smooth first frame puts cells into gaps and wounds that growth alone can fill, and a joint fit
    from it took D towards 0 on the demo sample, a Poisson wound, Allee islands and a Richards wound)."""
    return bool(cfg.joint) and initial != "surrogate"


def _keep_joint_fits(runs: list[dict[str, Any]], n: int) -> None:
    """A joint fit (the initial state fitted too: one more unknown per box) replaces its run's result only when its
    misfit is below the best misfit of every initial state held fixed, not just its own, by more than
    _JOINT_NOISE_SHARE of B n, the misfit that the first frame's noise is expected to add to a fit from that frame
    held fixed (:func:`_noise_excess`). For a simulation linear in its initial state, a joint fit without a penalty
    lowers the misfit by B n on average when the frame held fixed is the true state plus its noise, and by more when
    that frame is wrong in other ways; one that removes less than half of it is not trusted over the fixed frame,
    whose noise the correction handles. The threshold is in the noise's own unit, so it scales with the number of
    frames and the noise level (Jin 2016's 5 frames: B = 0.26-0.30 per observation; the discovery benchmark's
    7-17 frames: 0.017-0.11), as the earlier rule, a fixed fraction of the misfit (2%), did not. On the discovery
    benchmark's 40 lab runs every share from 0.42 to 0.60 keeps the same joint fits (docs/discovery-benchmark.md,
    "A keep rule for the joint fit in the noise's unit")."""
    best_fixed = min(r["chi2"] for r in runs)
    for r in runs:
        joint = r.pop("joint", None)
        if joint is None:
            continue
        need = _JOINT_NOISE_SHARE * joint["noise_excess"]
        if joint["chi2"] < best_fixed - need:
            r.update(z=joint["z"], u0=joint["u0"], initial=f"{r['base']}+joint", chi2=joint["chi2"], jacobian=None)
        else:
            r["notes"].append(f"initial state '{r['base']}' fitted jointly: misfit {joint['chi2'] / n:.4g}, not "
                              f"{need / n:.3g} below the best with an initial state held fixed ({best_fixed / n:.4g}; "
                              f"{_JOINT_NOISE_SHARE:g} x the misfit the first frame's noise is expected to add, "
                              f"{joint['noise_excess'] / n:.3g}); not kept")


def _fits_worse(run: dict[str, Any], n: int) -> bool:
    """Whether a run's refined curves fit the data worse than the BINN's own from the same initial state by more
    than the misfit's own noise: 2 sd of a chi-square with n observations, 2 sqrt(2 n) in noise-variance units. A
    smoothness prior may cost a regularised fit a little misfit (the demo's surrogate state: 1.009 -> 1.018 per
    observation, within 0.028); a refinement stuck at the tables' bounds costs far more (1.034 -> 2.56)."""
    return not run["chi2"] <= run["chi2_start"] + 2.0 * math.sqrt(2.0 * n)


def refine_binn_job(field: DensityField, fit: BinnFit, config: RefineConfig | None = None, *,
                    cancel: CancelToken | None = None) -> Generator[Progress, None, BinnFit]:
    """Refine ``fit``'s D(u), G(u) against ``field`` through the forward solver; a job generator (stage
    ``"refine"``). Returns ``fit`` with its networks set to the refined curves and
    ``fit.metadata['refine']`` describing the result (tables, bands, misfits, the chosen smoothness, the
    initial state, the distillation error, notes). On cancel the fit is returned unchanged.
    """
    cfg = config or RefineConfig()
    cfg.validate()
    if not isinstance(field, DensityField):
        raise ValueError(f"refinement needs a DensityField; got {type(field).__name__}")
    held = check_frames(cfg, field.n_frames)
    t_start = time.perf_counter()
    prob = _Problem(field, fit, cfg)
    n = prob.n_obs
    initials = list(_AUTO) if cfg.initial == "auto" else [cfg.initial]
    steps = [len(cfg.smoothness) + (held > 0) + _corrects_noise(cfg, initial) + _joint_from(cfg, initial)
             for initial in initials]
    total = sum(steps) + 1
    clock = ProgressClock(total)
    yield clock.event(_STAGE, 0, f"refining D(u), G(u) through the solver ({n} observed values, "
                      f"{len(cfg.smoothness)} prior strength(s), initial state {' / '.join(initials)})")
    runs = []
    for k, initial in enumerate(initials):
        label = f"[{k + 1}/{len(initials)}] " if len(initials) > 1 else ""
        offset = sum(steps[:k])
        run = yield from _strategy(prob, cfg, initial, held, cancel, clock, offset, label)
        if run is None:
            yield clock.event(_STAGE, offset, "refinement cancelled: the BINN's own curves are kept", cancelled=True)
            return fit
        runs.append(run)
    _keep_joint_fits(runs, n)
    notes = [note for r in runs for note in r["notes"]]
    worse = [r for r in runs if _fits_worse(r, n)]
    for r in worse:
        notes.append(f"initial state '{r['initial']}': the refined curves fit worse than the BINN's own (misfit "
                     f"{r['chi2_start'] / n:.4g} -> {r['chi2'] / n:.4g}, beyond the misfit's own noise); discarded")
    runs = [r for r in runs if not any(r is w for w in worse)]
    if not runs:  # no initial state improved on the BINN: keep its curves, say so
        fit.metadata["refine"] = {"failed": True, "misfit_start": min(r["chi2_start"] for r in worse) / n,
                                  "misfit": min(r["chi2"] for r in worse) / n, "noise_sd": prob.sigma,
                                  "seconds": time.perf_counter() - t_start,
                                  "notes": notes + ["the refinement did not lower the misfit from any initial state "
                                                    "tried: the BINN's own curves are kept"]}
        yield clock.event(_STAGE, total, "refinement did not improve on the BINN's curves from any initial state: "
                          "they are kept", done=True, refine=fit.metadata["refine"])
        return fit
    win = min(runs, key=lambda r: r["chi2"])
    if prob.max_steps < cfg.max_steps:
        notes.append(f"time steps per simulation capped at {prob.max_steps} (refine.max_steps {cfg.max_steps}) to "
                     f"keep the autograd memory under refine.max_memory_gb = {cfg.max_memory_gb:g} GB on "
                     f"{prob.tg.n} boxes; D above {prob.D_cap:.4g} µm²/h is not tried")
    nc = win.get("noise_correction")
    if nc is not None and "misfit_after" in nc and "+joint" not in win["initial"]:
        notes.append(f"the first frame's noise corrected for to first order ({nc['draws']} draws of noise variance "
                     f"{nc['noise_variance'][0]:.3g} + {nc['noise_variance'][1]:.3g} u): misfit "
                     f"{nc['misfit_before']:.4g} -> {nc['misfit_after']:.4g}")
    if int(cfg.initial_frames) > 1:
        k = int(cfg.initial_frames) - 1
        later = "the second frame is not fitted (that mean holds its noise)" if k == 1 else \
            f"frames 2-{k + 1} are not fitted (that mean holds their noise)"
        notes.append(f"the first frame of data is the mean of the first {k + 1} frames, each moved back to the first "
                     f"frame's time by the BINN surrogate's change since then; {later} (refine.initial_frames)")
    if win.get("start") == "affine":
        notes.append("started from the best affine curves: from them the first prior strength ended with a lower "
                     "penalised misfit than from the BINN's curves")
    if len(runs) > 1:
        notes.append("initial state chosen by the lower final misfit: " + ", ".join(
            f"'{r['initial']}' {r['chi2'] / n:.4g}" for r in runs))
    best_fixed = min(f["chi2"] for r in runs for f in r["fits"]) / n
    if best_fixed < _POOR_SURROGATE_MISFIT:
        notes.append(f"the BINN's surrogate fits the data poorly: a simulation fits it with {best_fixed:.2g} of the "
                     "surrogate's residual variance, so the noise level taken from the surrogate is too large, and "
                     "with it the first frame's noise correction (see the training's warnings)")
    chosen, z_best = win["chosen"], win["z"]
    with torch.no_grad():
        D_tab, G_tab = (v.numpy().copy() for v in prob.tables(torch.as_tensor(z_best)))
    D_sd = G_sd = None
    spread = None
    noise_share = None
    if cfg.bands:
        J = win["jacobian"] if win["jacobian"] is not None else _jacobian(prob, z_best, win["u0"])
        # the first frame's noise, drawn about the first frame the curves were refined from: not about the
        # surrogate's frame (smooth, its error is not this noise), nor about one fitted jointly (an estimate the
        # later frames constrain; drawing the whole noise about it greyed every density of the Allee islands)
        draws = (_noise_draws(prob, win["u0"], int(cfg.noise_draws), seed=_BAND_DRAW_SEED)
                 if _corrects_noise(cfg, win["base"]) and "+joint" not in win["initial"] else [])
        D_sd, G_sd, noise_share = _bands(prob, z_best, J, chosen["smoothness"], win["s2"], win["u0"], draws)
        if noise_share is not None:
            D_sd, G_sd = np.hypot(D_sd, noise_share["D"]), np.hypot(G_sd, noise_share["G"])
        if len(runs) > 1:  # the initial state's share: the ± 2 sd band reaches every other initial state's curves
            with torch.no_grad():
                other = [[v.numpy() for v in prob.tables(torch.as_tensor(r["z"]))] for r in runs if r is not win]
            spread = {"D": np.max([np.abs(d - D_tab) for d, _ in other], axis=0) / 2.0,
                      "G": np.max([np.abs(g - G_tab) for _, g in other], axis=0) / 2.0}
            D_sd, G_sd = np.hypot(D_sd, spread["D"]), np.hypot(G_sd, spread["G"])
    # write the refined curves into the networks
    err = _distill(fit, prob.nodes, D_tab, G_tab, prob.observed_range, cfg.distill_steps)
    fit.metadata["refine"] = {
        "u_nodes": prob.nodes.tolist(), "D": D_tab.tolist(), "G": G_tab.tolist(),
        "D_sd": None if D_sd is None else D_sd.tolist(), "G_sd": None if G_sd is None else G_sd.tolist(),
        "D_initial_sd": None if spread is None else spread["D"].tolist(),
        "G_initial_sd": None if spread is None else spread["G"].tolist(),
        "D_noise_sd": None if noise_share is None else noise_share["D"].tolist(),
        "G_noise_sd": None if noise_share is None else noise_share["G"].tolist(),
        "misfit_start": win["chi2_start"] / n, "misfit": win["chi2"] / n, "noise_sd": prob.sigma,
        "smoothness": chosen["smoothness"],
        "ladder": [{"initial": r["base"], "smoothness": f["smoothness"], "misfit": f["chi2"] / n,
                    "log_evidence": f.get("log_evidence"), "holdout_misfit": f.get("holdout_misfit"),
                    "holdout_excluded": f.get("holdout_excluded")}
                   for r in runs for f in r["fits"]],
        "smoothness_chosen_by": (f"prediction of the last {held} frame(s)" if held else "Laplace evidence")
        if len(cfg.smoothness) > 1 else "fixed",
        "initial": win["initial"], "initial_frames": int(cfg.initial_frames), "start": win.get("start"),
        "distill_rel_err": err,
        "seconds": time.perf_counter() - t_start,
        "noise_correction": win.get("noise_correction"),
        "notes": notes + ["misfit: mean squared (simulation - data) over the observed boxes of every fitted frame, "
                          "in units of the surrogate's noise variance",
                          _band_note(noise_share is not None, spread is not None)],
    }
    yield clock.event(_STAGE, total, f"refinement done: misfit {win['chi2_start'] / n:.4g} -> {win['chi2'] / n:.4g}, "
                      f"smoothness {chosen['smoothness']:g}, initial state '{win['initial']}', networks match the "
                      f"tables to {100 * max(err.values()):.1f}%", done=True, refine=fit.metadata["refine"])
    return fit


def _band_note(noise: bool, initial: bool) -> str:
    """The note that says what the bands D_sd, G_sd hold."""
    widened = ([" the spread the first frame's noise gives the curves (D_noise_sd, G_noise_sd)"] if noise else []) + (
        [" half the largest difference from the curves refined from the other initial state(s) (D_initial_sd, "
         "G_initial_sd)"] if initial else [])
    text = "D_sd, G_sd: Laplace bands (the initial state held exact)"
    if widened:
        text += ", widened in quadrature by" + " and by".join(widened)
    return text + ("" if initial else "; too narrow when the initial state is wrong")


def _bands(prob: _Problem, z: np.ndarray, J: np.ndarray, lam: float, s2: float, u0: torch.Tensor,
           draws: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """(D_sd, G_sd, noise share) at the nodes. D_sd, G_sd: the Laplace band, the initial state ``u0`` held exact
    (Gauss-Newton Hessian J^T J / s2 + lam P). Noise share: the s.d. the first frame's noise gives the curves
    (None without ``draws``): each draw e of that noise moves the estimate by one step (:func:`_noise_steps`),
    as the mechanistic fits' '+ic' intervals re-fit each draw by one Gauss-Newton step; the sample covariance of
    those steps, mapped onto the tables. The Laplace band counts only the later frames'
    noise, and a first frame's noise moves the curves too: on count data and at a steep front it moves them
    more (docs/method.md, "Bands")."""
    m = prob.cfg.nodes
    P = prob.penalised()
    H = J.T @ J / s2 + lam * np.diag(P)
    cov = np.linalg.pinv(H)
    eps = 1e-5
    with torch.no_grad():
        D0, G0 = (v.numpy() for v in prob.tables(torch.as_tensor(z)))
        JD = np.empty((m, z.size))
        JG = np.empty((m, z.size))
        for k in range(z.size):
            zk = z.copy()
            zk[k] += eps
            Dk, Gk = (v.numpy() for v in prob.tables(torch.as_tensor(zk)))
            JD[:, k] = (Dk - D0) / eps
            JG[:, k] = (Gk - G0) / eps

    def sd(Jt: np.ndarray, C: np.ndarray) -> np.ndarray:  # s.d. of a table's nodes for a covariance C of z
        return np.sqrt(np.maximum(np.einsum("ik,kl,il->i", Jt, C, Jt), 0.0))

    D_sd, G_sd = sd(JD, cov), sd(JG, cov)
    if len(draws) < 2:
        return D_sd, G_sd, None
    C = np.cov(_noise_steps(prob, z, cov, s2, u0, draws), rowvar=False)
    return D_sd, G_sd, {"D": sd(JD, C), "G": sd(JG, C)}


def _noise_steps(prob: _Problem, z: np.ndarray, cov: np.ndarray, s2: float, u0: torch.Tensor,
                 draws: list[torch.Tensor]) -> np.ndarray:
    """(len(draws), z.size): for each draw e of the first frame's noise, the step that re-fits the curves from
    u0 + e to first order, -cov (g(u0 + e) - g(u0)), g the gradient in z of half the misfit over s2 (autograd
    through the solver; the prior's gradient cancels) and cov the inverse Gauss-Newton Hessian of :func:`_bands`.
    (With J^T (S(z, u0 + e) - S(z, u0)) in place of the gradient difference, the residuals' share of it,
    J(u0 + e) - J(u0) times them, is lost: on a 10 x 10 count field that moved the step by half its length.)"""

    def grad(state: torch.Tensor) -> np.ndarray:
        zt = torch.tensor(z, requires_grad=True)
        return torch.autograd.grad(0.5 * prob.chi2(prob.simulate(zt, state)) / s2, zt)[0].numpy()

    g0 = grad(u0)
    return np.stack([-cov @ (grad(u0 + e) - g0) for e in draws])


def _distill(fit: BinnFit, nodes: np.ndarray, D_tab: np.ndarray, G_tab: np.ndarray,
             observed: tuple[float, float], steps: int) -> dict[str, float]:
    """Fit every member's D- and G-network to the tables over the observed range (L-BFGS, ``steps`` iterations); returns the relative
    L2 misfit of the ensemble mean to each table there. A network that stays more than _DISTILL_RETRY from its
    table is started again from fresh weights and fitted once more, the better of the two kept: a BINN's network
    whose hidden units saturated in training (contact islands: a D constant to 1e-6 over u, gradients below
    L-BFGS's tolerance) cannot take the refined curve's shape, and the curves the plots show would not be the
    refined ones."""
    u = np.linspace(observed[0], observed[1], 128)
    D_t = np.interp(u, nodes, D_tab)
    G_t = np.interp(u, nodes, G_tab)
    K, d_unit, g_unit = fit.scales.K, fit.scales.D_unit, fit.scales.G_unit
    for m in fit.members:
        dtype = next(m.parameters()).dtype
        uh = torch.as_tensor(u / K, dtype=dtype)
        for net, target, unit in ((m.dnet, D_t, d_unit), (m.gnet, G_t, g_unit)):
            y = torch.as_tensor(target / unit, dtype=dtype)
            err = _fit_net(net, uh, y, steps)
            if err > _DISTILL_RETRY:
                before = [p.detach().clone() for p in net.parameters()]
                lo, hi = float(net.lo), float(net.hi)
                net.reinitialise((float(y.mean()) - lo) / (hi - lo) if hi > lo else 0.5)
                if not _fit_net(net, uh, y, steps) < err:
                    with torch.no_grad():
                        for p, b in zip(net.parameters(), before):
                            p.copy_(b)
    rel = {"D": float(np.linalg.norm(fit.D(u) - D_t) / max(np.linalg.norm(D_t), 1e-30)),
           "G": float(np.linalg.norm(fit.G(u) - G_t) / max(np.linalg.norm(G_t), 1e-30))}
    return rel


def _fit_net(net: torch.nn.Module, uh: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Fit ``net``(uh) to ``y`` in place (L-BFGS, ``steps`` iterations in bursts of 20; parameters restored if they
    go non-finite); returns the relative L2 misfit."""
    scale = float(y.abs().max()) or 1.0
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean(((net(uh) - y) / scale) ** 2)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    for _ in range(max(1, steps // 20)):
        opt.step(closure)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        return float(torch.linalg.norm(net(uh) - y) / max(float(torch.linalg.norm(y)), 1e-30))


def refine_binn(field: DensityField, fit: BinnFit, config: RefineConfig | None = None, *,
                cancel: CancelToken | None = None, callback=None) -> BinnFit:
    """Blocking form of :func:`refine_binn_job`."""
    return run_job(refine_binn_job(field, fit, config, cancel=cancel), callback)


def config_dict(cfg: RefineConfig) -> dict[str, Any]:
    return asdict(cfg)
