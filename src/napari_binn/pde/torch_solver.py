"""A differentiable (torch) twin of the masked finite-volume solver, for fitting D(u) and G(u) through the PDE.

Same discretisation as :mod:`napari_binn.pde.solver` (the faces and weights of :class:`~napari_binn.pde.grid.MaskedGrid`:
face diffusivity the mean of its two boxes, zero flux at the mask edge; D and G evaluated at max(u, 0), reaction
G(u+) u+), but with a fixed-step Heun (explicit second-order Runge–Kutta) time stepper written in torch, so that
autograd gives the gradient of a data misfit with respect to D, G and the initial state.

D and G are given as tables on evenly spaced density nodes (linear interpolation between nodes, constant beyond
the last node), which is what :mod:`napari_binn.binn.refine` fits.

Step size: h = cfl dx² / (max open faces per box x max D) (max D over the table's nodes up to 1.2 x the largest
density at the start of each output interval) keeps the diffusion part inside Heun's stability
interval (cfl < 1), and h x max|G| <= 0.1 keeps the reaction accurate; each output interval is split into equal
steps no longer than that. A ``max_steps`` guard raises ValueError instead of running (and storing autograd
history for) an enormous number of steps when D is huge.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .grid import MaskedGrid

__all__ = ["TorchGrid", "interp_table", "simulate_tables", "MAX_GROWTH_STEP"]

#: largest h x max|G| per step
MAX_GROWTH_STEP = 0.1


class TorchGrid:
    """The face list of a :class:`MaskedGrid` as torch tensors, with the divergence operator."""

    def __init__(self, grid: MaskedGrid, dtype: torch.dtype = torch.float64) -> None:
        self.grid = grid
        self.n = grid.n
        self.dtype = dtype
        self.face_i = torch.as_tensor(grid.face_i, dtype=torch.long)
        self.face_j = torch.as_tensor(grid.face_j, dtype=torch.long)
        self.inv_dx2 = 1.0 / grid.dx_um ** 2
        self.max_open_faces = max(grid.max_open_faces, 1)

    def divergence(self, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """div(D grad u) per box for u and D per box (n,): the flux 0.5 (D_i + D_j) (u_j - u_i) / dx² through
        every open face, added to box i and taken from box j."""
        i, j = self.face_i, self.face_j
        flux = 0.5 * (d[i] + d[j]) * (u[j] - u[i]) * self.inv_dx2
        out = torch.zeros_like(u)
        out = out.index_add(0, i, flux)
        return out.index_add(0, j, -flux)


def interp_table(u: torch.Tensor, u_max: float, values: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` given on ``len(values)`` evenly spaced nodes over [0, u_max];
    constant beyond the end nodes."""
    m = values.shape[0]
    pos = torch.clamp(u / u_max * (m - 1), 0.0, m - 1 - 1e-9)
    k = torch.floor(pos).long()
    w = pos - k
    return values[k] * (1.0 - w) + values[k + 1] * w


def _rhs(tg: TorchGrid, u: torch.Tensor, u_max: float, D: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    up = torch.clamp(u, min=0.0)
    return tg.divergence(u, interp_table(up, u_max, D)) + interp_table(up, u_max, G) * up


def step_size(tg: TorchGrid, D: torch.Tensor, G: torch.Tensor, cfl: float, u_hi: float | None = None,
              u_max: float | None = None) -> float:
    """The stable step (h) for tables D, G (see the module docstring); with ``u_hi`` and ``u_max`` only the nodes
    up to the first one at or above ``u_hi`` count (the densities the solution can reach)."""
    if u_hi is not None and u_max is not None:
        m = D.shape[0]
        top = min(m, int(math.ceil(max(u_hi, 0.0) / u_max * (m - 1))) + 2)
        D, G = D[:top], G[:top]
    dmax = float(torch.max(D.detach()).clamp_min(1e-30))
    gmax = float(torch.max(G.detach().abs()))
    h = cfl / (tg.max_open_faces * dmax * tg.inv_dx2)
    if gmax > 0:
        h = min(h, MAX_GROWTH_STEP / gmax)
    return h


def simulate_tables(tg: TorchGrid, u0: torch.Tensor, t_h: np.ndarray, u_max: float, D: torch.Tensor,
                    G: torch.Tensor, *, cfl: float = 0.8, max_steps: int = 20000,
                    time_factor: Callable[[float], float] | None = None) -> torch.Tensor:
    """Solve u_t = T(t) [div(D(u) grad u) + G(u) u] from ``u0`` (n,) on the mask and return (len(t_h), n).

    D (µm²/h) and G (1/h): tables on evenly spaced nodes over [0, u_max] (density units). t_h: output times
    in hours, strictly increasing, ``t_h[0]`` the time of u0. Differentiable in u0, D and G.
    Raises ValueError for bad input and when more than ``max_steps`` steps would be needed.
    """
    t = np.asarray(t_h, dtype=np.float64).reshape(-1)
    if t.size < 1 or not np.all(np.isfinite(t)) or (t.size > 1 and not np.all(np.diff(t) > 0)):
        raise ValueError("t_h must be finite and strictly increasing")
    if not (0.0 < cfl < 1.0):
        raise ValueError(f"cfl must be in (0, 1) for a stable Heun step; got {cfl}")
    if D.ndim != 1 or G.ndim != 1 or D.shape[0] < 2 or G.shape[0] < 2:
        raise ValueError("D and G must be 1-D tables with at least 2 nodes")
    if not bool(torch.isfinite(D).all()) or float(D.detach().min()) < 0:
        raise ValueError("the D table must be finite and >= 0 µm²/h")
    if not bool(torch.isfinite(G).all()):
        raise ValueError("the G table must be finite")
    if u0.shape != (tg.n,):
        raise ValueError(f"u0 must have one value per mask box ({tg.n}); got shape {tuple(u0.shape)}")
    out = [u0]
    u = u0
    tf = time_factor or (lambda _t: 1.0)
    done = 0
    for k in range(t.size - 1):
        # the step is set per output interval from the densities present (with a 20% margin above them)
        h_max = step_size(tg, D, G, cfl, 1.2 * float(u.detach().max()), u_max)
        n_sub = max(1, math.ceil((t[k + 1] - t[k]) / h_max * (1 + 1e-12)))
        done += n_sub
        if done > max_steps:
            raise ValueError(f"the simulation would need more than max_steps = {max_steps} steps: D up to "
                             f"{float(D.detach().max()):.4g} µm²/h on {1 / math.sqrt(tg.inv_dx2):g} µm boxes; "
                             "raise max_steps or bound D")
        h = (t[k + 1] - t[k]) / n_sub
        tk = t[k]
        for s in range(n_sub):
            f0 = _rhs(tg, u, u_max, D, G) * tf(tk + s * h)
            u1 = u + h * f0
            f1 = _rhs(tg, u1, u_max, D, G) * tf(tk + (s + 1) * h)
            u = u + 0.5 * h * (f0 + f1)
        out.append(u)
    return torch.stack(out)
