"""Finite-volume operators on a regular grid restricted to a mask (the ROI).

Unknowns are the mask's boxes only, numbered in C order (``MaskedGrid.index``). Each pair of neighbouring
mask boxes shares one face; the face diffusivity is the arithmetic mean of the two boxes' D values, and the
flux through it is ``D_face (u_j - u_i) / dx``. Faces to boxes outside the mask or off the grid carry no
flux (zero-flux boundary). The same flux is added to one box and subtracted from the other, so the total
mass is conserved to round-off for pure diffusion, on any mask (disconnected pieces included). For a
smooth D this is the standard second-order scheme for div(D(u) grad u).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._kernels import available as _compiled
from ._kernels import grid_divergence

__all__ = ["MaskedGrid"]


class MaskedGrid:
    """The masked grid: index map, neighbour faces, and the operators used by the solvers.

    mask : (Ny, Nx) bool, boxes of the domain; dx_um : box size in µm.
    """

    def __init__(self, mask: np.ndarray, dx_um: float) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (Ny, Nx); got shape {mask.shape}")
        self.mask = mask
        self.shape = mask.shape
        self.dx_um = float(dx_um)
        self.flat = np.flatnonzero(mask)
        self.n = int(self.flat.size)
        self.full = self.n == mask.size
        index = np.full(mask.shape, -1, dtype=np.int64)
        index[mask] = np.arange(self.n)
        self.index = index
        inv_dx2 = 1.0 / self.dx_um**2
        open_x = mask[:, 1:] & mask[:, :-1]
        open_y = mask[1:, :] & mask[:-1, :]
        # 0.5 (face mean of D) / dx², zero on closed faces
        self._wx = open_x * (0.5 * inv_dx2)
        self._wy = open_y * (0.5 * inv_dx2)
        # face list for Jacobians: face f joins boxes left[f] (i) and right[f] (j)
        self.face_i = np.concatenate([index[:, :-1][open_x], index[:-1, :][open_y]])
        self.face_j = np.concatenate([index[:, 1:][open_x], index[1:, :][open_y]])
        self.n_faces = int(self.face_i.size)
        # number of open faces per box (for spectral-radius bounds)
        n_open = np.zeros(mask.shape)
        n_open[:, :-1] += open_x
        n_open[:, 1:] += open_x
        n_open[:-1, :] += open_y
        n_open[1:, :] += open_y
        self.max_open_faces = int(n_open[mask].max()) if self.n else 0
        # flat-layout face weights: x-face k joins flat cells k and k+1, y-face k joins k and k+Nx
        # (x-faces that wrap across rows are closed: weight 0)
        ny, nx = mask.shape
        wx = np.zeros(mask.size - 1)
        full_x = np.zeros((ny, nx))
        full_x[:, :-1] = self._wx
        wx[:] = full_x.reshape(-1)[:-1]
        self._wx_flat = wx
        self._wy_flat = np.ascontiguousarray(self._wy.reshape(-1))
        self._nx = nx
        self._buf_u = np.zeros(mask.size)
        self._buf_d = np.zeros(mask.size)
        self._buf_acc = np.empty(mask.size)
        self._buf_fx = np.empty(mask.size - 1)
        self._buf_tx = np.empty(mask.size - 1)
        self._buf_fy = np.empty(max(mask.size - nx, 0))
        self._buf_ty = np.empty(max(mask.size - nx, 0))
        self._no_d = np.empty(0)

    # -- scatter / gather ------------------------------------------------------------------------------
    def to_grid(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """(n,) mask values -> new (Ny, Nx) array with ``fill`` outside the mask."""
        out = np.full(self.shape, fill, dtype=np.float64)
        out.reshape(-1)[self.flat] = values
        return out

    def from_grid(self, grid: np.ndarray) -> np.ndarray:
        """(Ny, Nx) array -> (n,) values of the mask boxes (a copy)."""
        return np.asarray(grid, dtype=np.float64).reshape(-1)[self.flat].copy()

    def _scatter(self, values: np.ndarray, buf: np.ndarray) -> np.ndarray:
        if self.full:
            return values
        buf[self.flat] = values
        return buf

    # -- operators -------------------------------------------------------------------------------------
    def divergence(self, u: np.ndarray, d: np.ndarray | float, out: np.ndarray | None = None) -> np.ndarray:
        """div(D grad u) per box in [u]/h for u on the mask (n,) and D per box (n,) in µm²/h (or a number).

        ``out``: optional (n,) array to write into (returned).
        """
        if _compiled():  # the same numbers, compiled (napari_binn.pde._kernels)
            const = np.ndim(d) == 0
            d_arr = self._no_d if const else np.ascontiguousarray(d, dtype=np.float64)
            return grid_divergence(np.ascontiguousarray(u, dtype=np.float64), d_arr, const,
                                   float(d) if const else 0.0, self.flat, self._wx_flat, self._wy_flat, self._nx,
                                   self.mask.size, self._buf_u, self._buf_d,
                                   out if out is not None else np.empty(self.n))
        nx = self._nx
        ug = self._scatter(u, self._buf_u)
        if self.full:
            acc = out if out is not None else np.empty(self.mask.size)
        else:  # scratch space: only the mask's boxes of it are handed back, as a copy
            acc = self._buf_acc
        fx, tx, fy, ty = self._buf_fx, self._buf_tx, self._buf_fy, self._buf_ty
        np.subtract(ug[1:], ug[:-1], out=fx)
        np.subtract(ug[nx:], ug[:-nx], out=fy)
        if np.ndim(d) == 0:
            fx *= self._wx_flat
            fx *= 2.0 * float(d)
            fy *= self._wy_flat
            fy *= 2.0 * float(d)
        else:
            dg = self._scatter(d, self._buf_d)
            np.add(dg[1:], dg[:-1], out=tx)
            tx *= self._wx_flat
            fx *= tx
            np.add(dg[nx:], dg[:-nx], out=ty)
            ty *= self._wy_flat
            fy *= ty
        acc[:-1] = fx
        acc[-1] = 0.0
        acc[1:] -= fx
        acc[:-nx] += fy
        acc[nx:] -= fy
        if self.full:
            return acc
        if out is None:
            return acc[self.flat]
        acc.take(self.flat, out=out)
        return out

    def jacobian(self, u: np.ndarray, d: np.ndarray, dd: np.ndarray, reaction_diag: np.ndarray,
                 scale: float = 1.0) -> sp.csc_matrix:
        """Sparse Jacobian of ``scale * (div(D(u) grad u) + reaction(u))`` for face-averaged D.

        d, dd: D(u) and dD/du per box; reaction_diag: d(reaction)/du per box (reaction is local).
        Columns of the diffusion part sum to zero, so Newton iterations keep the mass too.
        """
        i, j = self.face_i, self.face_j
        inv_dx2 = 1.0 / self.dx_um**2
        dface = 0.5 * (d[i] + d[j])
        g = u[j] - u[i]
        # flux into box i through face f: F = dface * g / dx²  (and -F into box j)
        dF_di = (-dface + 0.5 * dd[i] * g) * inv_dx2
        dF_dj = (dface + 0.5 * dd[j] * g) * inv_dx2
        rows = np.concatenate([i, i, j, j, np.arange(self.n)])
        cols = np.concatenate([i, j, i, j, np.arange(self.n)])
        vals = np.concatenate([dF_di, dF_dj, -dF_di, -dF_dj, reaction_diag]) * scale
        return sp.csc_matrix((vals, (rows, cols)), shape=(self.n, self.n))

    def diffusion_radius(self, d: np.ndarray | float) -> float:
        """Upper bound (Gershgorin) on the spectral radius of div(D grad .) for frozen D, in 1/h."""
        dmax = float(np.max(d)) if np.ndim(d) else float(d)
        return 2.0 * self.max_open_faces * dmax / self.dx_um**2
