"""A differentiable (torch) twin of the masked finite-volume solver, for fitting D(u) and G(u) through the PDE.

Same discretisation as :mod:`napari_binn.pde.solver` (the faces and weights of
:class:`~napari_binn.pde.grid.MaskedGrid`: face diffusivity the mean of its two boxes, zero flux at the mask edge; D
and G evaluated at max(u, 0), reaction G(u+) u+), but with a fixed-step Heun (explicit second-order Runge–Kutta)
time stepper whose result is a torch tensor differentiable with respect to D, G and the initial state (for the
gradient of a data misfit). By default the steps run outside torch and the gradient is their discrete adjoint,
written out by hand (the states of every step are kept, 16 bytes per box and step): compiled loops
(:mod:`napari_binn.pde._kernels`, numba) where numba is available, else numpy, with the same numbers to the last
bit; ``method="autograd"`` runs the same steps as torch operations and lets autograd record them (about 500 bytes
per box and step, and 4 times slower on the discovery benchmark's 1600 boxes: per-operation overhead dominates at
this size). The two agree to round-off (tests/test_torch_solver.py).

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
from functools import partial

import numpy as np
import torch

from ._kernels import available as _compiled
from ._kernels import heun_adjoint_interval, heun_interval, lookup_scale_top
from .grid import MaskedGrid

__all__ = ["TorchGrid", "interp_table", "simulate_tables", "simulate_tables_batch", "MAX_GROWTH_STEP"]

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


def _check(tg: TorchGrid, u0: torch.Tensor, t_h: np.ndarray, D: torch.Tensor, G: torch.Tensor,
           cfl: float) -> np.ndarray:
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
    return t


def _substeps(tg: TorchGrid, t: np.ndarray, k: int, u_top: float, D: torch.Tensor, G: torch.Tensor, cfl: float,
              u_max: float, done: int, max_steps: int) -> tuple[int, float]:
    """Steps and step size for output interval k: set from the densities present (20% margin above them)."""
    h_max = step_size(tg, D, G, cfl, 1.2 * u_top, u_max)
    n_sub = max(1, math.ceil((t[k + 1] - t[k]) / h_max * (1 + 1e-12)))
    if done + n_sub > max_steps:
        raise ValueError(f"the simulation would need more than max_steps = {max_steps} steps: D up to "
                         f"{float(D.detach().max()):.4g} µm²/h on {1 / math.sqrt(tg.inv_dx2):g} µm boxes; "
                         "raise max_steps or bound D")
    return n_sub, (t[k + 1] - t[k]) / n_sub


def simulate_tables(tg: TorchGrid, u0: torch.Tensor, t_h: np.ndarray, u_max: float, D: torch.Tensor,
                    G: torch.Tensor, *, cfl: float = 0.8, max_steps: int = 20000,
                    time_factor: Callable[[float], float] | None = None, method: str = "adjoint") -> torch.Tensor:
    """Solve u_t = T(t) [div(D(u) grad u) + G(u) u] from ``u0`` (n,) on the mask and return (len(t_h), n).

    D (µm²/h) and G (1/h): tables on evenly spaced nodes over [0, u_max] (density units). t_h: output times
    in hours, strictly increasing, ``t_h[0]`` the time of u0. Differentiable in u0, D and G.

    method: ``"adjoint"`` (default; float64 CPU tensors) steps outside torch (compiled loops, else numpy) and gives
    the gradient by the discrete adjoint of the same Heun steps, written out by hand (same numbers as autograd to
    round-off, several times faster: per-step torch overhead dominates on fields of a few thousand boxes);
    ``"autograd"`` steps in torch and lets autograd record every step (any device or dtype). Tensors on another
    device or dtype use ``"autograd"``.
    Raises ValueError for bad input and when more than ``max_steps`` steps would be needed.
    """
    if method not in ("adjoint", "autograd"):
        raise ValueError(f"method must be 'adjoint' or 'autograd'; got {method!r}")
    t = _check(tg, u0, t_h, D, G, cfl)
    cpu64 = all(x.device.type == "cpu" and x.dtype == torch.float64 for x in (u0, D, G))
    if method == "adjoint" and cpu64:
        return _HeunAdjoint.apply(u0, D, G, tg, t, float(u_max), float(cfl), int(max_steps), time_factor)
    out = [u0]
    u = u0
    tf = time_factor or (lambda _t: 1.0)
    rhs = partial(_rhs, tg, u_max=u_max, D=D, G=G)
    done = 0
    for k in range(t.size - 1):
        n_sub, h = _substeps(tg, t, k, float(u.detach().max()), D, G, cfl, u_max, done, max_steps)
        done += n_sub
        tk = t[k]
        for s in range(n_sub):
            _, u = _heun_step(rhs, u, h, tf(tk + s * h), tf(tk + (s + 1) * h))
        out.append(u)
    return torch.stack(out)


def simulate_tables_batch(tg: TorchGrid, u0: torch.Tensor, t_h: np.ndarray, u_max: float, D: np.ndarray,
                          G: np.ndarray, *, cfl: float = 0.8, max_steps: int = 20000,
                          time_factor: Callable[[float], float] | None = None) -> np.ndarray:
    """:func:`simulate_tables` for B pairs of tables at once, forward only (no gradient): D, G are (B, m) float64
    arrays, all from the one initial state ``u0``; returns (B, len(t_h), n).

    For finite-difference Jacobians (many slightly different tables). With the compiled loops each member steps
    on its own. In numpy, whose per-operation overhead dominates one simulation on a few thousand boxes, the
    members whose step schedule agrees in an output interval (the same number of steps of the same size; it
    depends on each member's tables and state) step together, paying that overhead once per step for the batch.
    Either way every member gets exactly the numbers that :func:`simulate_tables` gives it alone (each operation
    is elementwise, or sums per box in the same order).
    """
    D = np.asarray(D, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    if D.ndim != 2 or D.shape != G.shape:
        raise ValueError(f"D and G must be (B, m) arrays of the same shape; got {D.shape} and {G.shape}")
    Dt = [torch.as_tensor(d) for d in D]
    Gt = [torch.as_tensor(g) for g in G]
    t = _check(tg, u0, t_h, Dt[0], Gt[0], cfl)
    for d, g in zip(Dt[1:], Gt[1:]):
        _check(tg, u0, t, d, g, cfl)
    B = D.shape[0]
    tf = time_factor or (lambda _t: 1.0)
    u = np.repeat(u0.detach().numpy().astype(np.float64)[None, :], B, axis=0)
    out = np.empty((B, t.size, tg.n))
    out[:, 0] = u
    if _compiled():  # member by member: the compiled steps have no per-operation overhead to share
        with np.errstate(over="ignore", invalid="ignore"):
            for b in range(B):
                rhs = _NumpyRhs(tg, float(u_max), D[b], G[b])
                out[b] = _integrate(rhs, tg, t, u[b], Dt[b], Gt[b], cfl, float(u_max), max_steps, tf)[0]
        return out
    rhs = _NumpyRhs(tg, float(u_max), D, G)
    done = [0] * B
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(t.size - 1):
            groups: dict[tuple[int, float], list[int]] = {}
            for b in range(B):
                n_sub, h = _substeps(tg, t, k, float(u[b].max()), Dt[b], Gt[b], cfl, u_max, done[b], max_steps)
                groups.setdefault((n_sub, h), []).append(b)
            for (n_sub, h), members in groups.items():
                rows = np.asarray(members)
                ub = u[rows]
                f = partial(rhs, rows=rows)
                for s in range(n_sub):
                    _, ub = _heun_step(f, ub, h, tf(t[k] + s * h), tf(t[k] + (s + 1) * h))
                u[rows] = ub
                for b in members:
                    done[b] += n_sub
            out[:, k + 1] = u
    return out


def _integrate(rhs: "_NumpyRhs", tg: TorchGrid, t: np.ndarray, u: np.ndarray, D: torch.Tensor, G: torch.Tensor,
               cfl: float, u_max: float, max_steps: int, tf: Callable[[float], float], keep: bool = False
               ) -> tuple[np.ndarray, list[tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """Heun steps (:meth:`_NumpyRhs.steps`) from u through every output interval of t: the states at t (len(t), n)
    and, with ``keep``, per interval (h, tf0, tf1, U, U1) for the adjoint (else an empty list)."""
    out = [u]
    intervals = []
    done = 0
    for k in range(t.size - 1):
        n_sub, h = _substeps(tg, t, k, float(u.max()), D, G, cfl, u_max, done, max_steps)
        done += n_sub
        tf0, tf1 = _time_factors(tf, t[k], h, n_sub)
        states = (np.empty((n_sub, u.size)), np.empty((n_sub, u.size))) if keep else None
        u = rhs.steps(u, h, tf0, tf1, states)
        if keep:
            intervals.append((h, tf0, tf1, *states))
        out.append(u)
    return np.stack(out), intervals


def _time_factors(tf: Callable[[float], float], t0: float, h: float, n_sub: int) -> tuple[np.ndarray, np.ndarray]:
    """The time factor at the start and at the end of each of ``n_sub`` steps of size h from t0."""
    return (np.array([tf(t0 + s * h) for s in range(n_sub)], dtype=np.float64),
            np.array([tf(t0 + (s + 1) * h) for s in range(n_sub)], dtype=np.float64))


def _heun_step(rhs: Callable, u, h: float, tf0: float, tf1: float):
    """One Heun step of size h from u, numpy array or torch tensor (time factors tf0, tf1 at its two ends):
    (the predictor, the new state)."""
    f0 = rhs(u) * tf0
    u1 = u + h * f0
    f1 = rhs(u1) * tf1
    return u1, u + 0.5 * h * (f0 + f1)


class _NumpyRhs:
    """The right-hand side div(D(u+) grad u) + G(u+) u+ and its vector-Jacobian product, in numpy; the Heun steps
    and their adjoint (:meth:`steps`, :meth:`adjoint_steps`), compiled where numba is available.

    D, G: tables (m,) for states (n,); or (B, m), one pair per member, for a batch of states (b, n) whose members
    ``rows`` name (forward only: the vector-Jacobian product is for one pair of tables)."""

    def __init__(self, tg: TorchGrid, u_max: float, D: np.ndarray, G: np.ndarray) -> None:
        self.i = tg.grid.face_i
        self.j = tg.grid.face_j
        self.n = tg.n
        self.half_inv_dx2 = 0.5 * tg.inv_dx2
        self.m = D.shape[-1]
        self.scale, self.top = lookup_scale_top(self.m, u_max)
        self.D, self.G = D.reshape(-1), G.reshape(-1)  # a batch's tables end to end
        if D.ndim == 1:
            self.dD = np.diff(D) * self.scale  # slope of each table segment, per density unit
            self.dG = np.diff(G) * self.scale
        self._faces: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._none = np.empty((0, self.n))  # no states kept

    def _interp(self, u: np.ndarray, rows: np.ndarray | None = None):
        up = np.maximum(u, 0.0)
        raw = up * self.scale
        pos = np.minimum(raw, self.top)
        k = pos.astype(np.int64)
        w = pos - k
        if rows is not None:
            k += (rows * self.m)[:, None]  # each member's own tables
        k1 = k + 1
        w0 = 1.0 - w
        d = self.D[k] * w0 + self.D[k1] * w
        g = self.G[k] * w0 + self.G[k1] * w
        return up, raw, k, k1, w, w0, d, g

    def _face_index(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Face ends of b stacked states, as indices into their (b * n) flattened boxes."""
        if b not in self._faces:
            off = (np.arange(b) * self.n)[:, None]
            self._faces[b] = ((self.i + off).reshape(-1), (self.j + off).reshape(-1))
        return self._faces[b]

    def __call__(self, u: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        up, _, _, _, _, _, d, g = self._interp(u, rows)
        i, j = self.i, self.j
        if rows is None:  # (indexing with d[..., i] would cost this hot path a third more)
            flux = (d[i] + d[j]) * (u[j] - u[i]) * self.half_inv_dx2
            return np.bincount(i, flux, self.n) - np.bincount(j, flux, self.n) + g * up
        b = u.shape[0]
        fi, fj = self._face_index(b)
        flux = ((d[:, i] + d[:, j]) * (u[:, j] - u[:, i]) * self.half_inv_dx2).reshape(-1)
        div = np.bincount(fi, flux, b * self.n) - np.bincount(fj, flux, b * self.n)
        return div.reshape(b, self.n) + g * up

    def steps(self, u: np.ndarray, h: float, tf0: np.ndarray, tf1: np.ndarray,
              keep: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """``tf0.size`` Heun steps of size h from u (one pair of tables), compiled where numba is available (the
        same numbers as :func:`_heun_step`); ``keep``: two (steps, n) arrays that receive each step's start state
        and predictor. Returns the new state."""
        if not _compiled():
            for s in range(tf0.size):
                u1, u_next = _heun_step(self, u, h, float(tf0[s]), float(tf1[s]))
                if keep is not None:
                    keep[0][s], keep[1][s] = u, u1
                u = u_next
            return u
        U, U1 = keep if keep is not None else (self._none, self._none)
        return heun_interval(u, h, tf0, tf1, self.D, self.G, self.i, self.j, self.scale, self.top,
                             self.half_inv_dx2, U, U1)

    def adjoint_steps(self, a: np.ndarray, h: float, tf0: np.ndarray, tf1: np.ndarray, U: np.ndarray,
                      U1: np.ndarray, aD: np.ndarray, aG: np.ndarray) -> np.ndarray:
        """The discrete adjoint of :meth:`steps` (states kept in U, U1), last step first: returns the adjoint
        state at the first step's start and adds the tables' gradients into aD, aG."""
        if not _compiled():
            for s in range(tf0.size - 1, -1, -1):
                a_u1 = self.vjp(U1[s], (0.5 * h * float(tf1[s])) * a, aD, aG)
                a = a + a_u1 + self.vjp(U[s], float(tf0[s]) * (0.5 * h * a + h * a_u1), aD, aG)
            return a
        return heun_adjoint_interval(a, h, tf0, tf1, U, U1, self.D, self.G, self.dD, self.dG, self.i, self.j,
                                     self.scale, self.top, self.half_inv_dx2, aD, aG)

    def vjp(self, u: np.ndarray, a: np.ndarray, aD: np.ndarray, aG: np.ndarray) -> np.ndarray:
        """a^T d rhs / du at u; adds a^T d rhs / dD and / dG into aD, aG (the clamps pass the gradient at their
        bounds, as torch.clamp does)."""
        up, raw, k, k1, w, w0, d, g = self._interp(u)
        i, j, n = self.i, self.j, self.n
        a_flux = (a[i] - a[j]) * self.half_inv_dx2
        a_grad = a_flux * (d[i] + d[j])
        a_u = np.bincount(j, a_grad, n) - np.bincount(i, a_grad, n)
        a_c = a_flux * (u[j] - u[i])
        a_d = np.bincount(i, a_c, n) + np.bincount(j, a_c, n)
        a_g = a * up
        # k <= m - 2 (the position is clamped below m - 1), so k + 1 is a node
        a_up = a * g + np.where(raw <= self.top, a_d * self.dD[k] + a_g * self.dG[k], 0.0)
        aD += np.bincount(k, a_d * w0, self.m) + np.bincount(k1, a_d * w, self.m)
        aG += np.bincount(k, a_g * w0, self.m) + np.bincount(k1, a_g * w, self.m)
        return a_u + np.where(u >= 0.0, a_up, 0.0)


class _HeunAdjoint(torch.autograd.Function):
    """The Heun stepper outside torch (:meth:`_NumpyRhs.steps`); backward is its discrete adjoint (stored states: u and
    the predictor u1 of every step, 16 bytes per box and step).

    Overflow is not warned about but returned: where the tables are steep the linearised steps can grow even when
    the simulation stays bounded (the step size bounds D, not D'(u) grad u), so the gradient can be infinite or
    NaN (as autograd's is then); the refinement's optimiser stops that fit there (seen on MDCK xy2)."""

    @staticmethod
    def forward(ctx, u0, D, G, tg, t, u_max, cfl, max_steps, time_factor):
        with np.errstate(over="ignore", invalid="ignore"):
            return _HeunAdjoint._forward(ctx, u0, D, G, tg, t, u_max, cfl, max_steps, time_factor)

    @staticmethod
    def _forward(ctx, u0, D, G, tg, t, u_max, cfl, max_steps, time_factor):
        need = any(ctx.needs_input_grad[:3])
        rhs = _NumpyRhs(tg, u_max, D.detach().numpy(), G.detach().numpy())
        tf = time_factor or (lambda _t: 1.0)
        u = u0.detach().numpy().astype(np.float64, copy=True)  # no step changes a state in place: no copies below
        out, intervals = _integrate(rhs, tg, t, u, D, G, cfl, u_max, max_steps, tf, keep=need)
        if need:
            ctx.rhs, ctx.intervals = rhs, intervals
        return torch.as_tensor(out)

    @staticmethod
    def backward(ctx, grad_out):
        with np.errstate(over="ignore", invalid="ignore"):
            return _HeunAdjoint._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        g_out = grad_out.detach().numpy()
        rhs, intervals = ctx.rhs, ctx.intervals
        aD = np.zeros(rhs.m)
        aG = np.zeros(rhs.m)
        a = g_out[-1].copy()
        for k in range(len(intervals) - 1, -1, -1):
            h, tf0, tf1, U, U1 = intervals[k]
            a = rhs.adjoint_steps(a, h, tf0, tf1, U, U1, aD, aG)
            a = a + g_out[k]
        return (torch.as_tensor(a), torch.as_tensor(aD), torch.as_tensor(aG), None, None, None, None, None, None)
