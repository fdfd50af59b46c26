"""Weak (integral) form of the PDE on the observed density: an estimate of D and G that needs no derivative of u.

The strong residual u_t - div(D(u) grad u) - G(u) u of a BINN takes second derivatives of the surrogate network.
On noisy data the surrogate carries some of the noise, its Laplacian is noisy, and a D fitted to it is biased
towards zero (errors-in-variables attenuation). Multiplying the PDE by a smooth test function phi(x, y, t) that
vanishes on the edge of a space-time window and integrating by parts moves every derivative onto phi:

    - sum phi_t u  =  T(t) [ sum (phi_xx + phi_yy) F(u)  +  sum phi G(u) u ],      F(u) = int_0^u D(s) ds

(div(D(u) grad u) = Laplacian of the Kirchhoff transform F). The sums run over the observed grid points of the
window, so the data enter only through u itself, where their noise averages out. Each window gives one equation
in D and G; the loss is the mean squared window residual, normalised by the mean squared left-hand side.
Windows must lie wholly inside the ROI and be fully observed (the boundary terms then vanish).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["WeakForm", "build_weak_form", "weak_loss"]

_P = 4  # bump exponent: phi = prod (1 - s^2)^P; phi and its first derivatives vanish on the window edge


def _bump(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """psi(s) = (1 - s^2)^P on |s| < 1 and its first and second derivatives (d/ds)."""
    inside = np.abs(s) < 1
    q = np.where(inside, 1 - s**2, 0.0)
    psi = q**_P
    d1 = -2 * _P * s * q ** (_P - 1)
    d2 = -2 * _P * q ** (_P - 1) + 4 * _P * (_P - 1) * s**2 * q ** (_P - 2)
    return psi * inside, d1 * inside, d2 * inside


_N_GRID = 257  # nodes of the density grid on which D, G are evaluated and F is integrated


@dataclass
class WeakForm:
    """Window equations reduced to the density grid (W windows, F frames per window, N grid nodes).

    Linear interpolation on the grid makes each window's right-hand side linear in the grid values:
    Σ_p T(t_p) [Δφ_p F(û_p) + φ_p û_p G(û_p)] = Σ_f T_f (A[w, f] · F + B[w, f] · G + c[w, f] D(0)),
    where c carries points with û < 0 (noise about zero; F(û) = D(0) û there). lhs: (W,) -Σ φ_t û.
    t: (W, F) scaled times of the window's frames. top: the grid's upper end (scaled density).
    """

    A: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor
    t: torch.Tensor
    lhs: torch.Tensor
    scale: float
    top: float

    @property
    def n_windows(self) -> int:
        return int(self.lhs.shape[0])


def _hat_weights(u: np.ndarray, top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower node index, weight of the lower node and of the upper node, for linear interpolation."""
    step = top / (_N_GRID - 1)
    pos = np.clip(u, 0.0, top) / step
    k = np.minimum(np.floor(pos).astype(int), _N_GRID - 2)
    frac = pos - k
    return k, 1.0 - frac, frac


def build_weak_form(u_hat: np.ndarray, mask: np.ndarray, x_hat: np.ndarray, y_hat: np.ndarray, t_hat: np.ndarray,
                    *, half_boxes: int, half_frames: int, device: torch.device, dtype: torch.dtype
                    ) -> WeakForm | None:
    """Windows of (2 half_boxes + 1)² boxes x (2 half_frames + 1) frames, centres every half_boxes boxes and
    every half_frames frames (half-overlapping), kept when every point is inside the mask and observed. None if there is none.

    u_hat: (T, Ny, Nx) scaled density (NaN = not observed); x_hat, y_hat, t_hat: scaled grid coordinates.
    """
    T, ny, nx = u_hat.shape
    hb, hf = int(half_boxes), int(half_frames)
    if hb < 1 or hf < 1 or nx < 2 * hb + 1 or ny < 2 * hb + 1 or T < 2 * hf + 1:
        return None
    ok = mask[None] & np.isfinite(u_hat)
    if not ok.any():
        return None
    top = float(np.nanmax(np.where(ok, u_hat, np.nan))) * 1.02 or 1e-6
    dx = abs(float(x_hat[1] - x_hat[0])) if nx > 1 else 1.0
    dy = abs(float(y_hat[1] - y_hat[0])) if ny > 1 else 1.0
    # the bump spans hb + 1 grid steps each way, so the window's outermost points still carry weight
    s_xy = np.arange(-hb, hb + 1) / (hb + 1)
    hx, hy = (hb + 1) * dx, (hb + 1) * dy
    px, _, px2 = _bump(s_xy)
    nf = 2 * hf + 1
    As, Bs, cs, ts, lhss = [], [], [], [], []
    for c in range(hf, T - hf, hf):
        frames = np.arange(c - hf, c + hf + 1)
        tt = t_hat[frames]
        ht = max(float(tt[-1] - tt[0]) / 2 * (hf + 1) / hf, 1e-12)
        pt, pt1, _ = _bump((tt - t_hat[c]) / ht)
        phi = pt[:, None, None] * px[None, :, None] * px[None, None, :]
        phi_t = (pt1 / ht)[:, None, None] * px[None, :, None] * px[None, None, :]
        lap = pt[:, None, None] * (px[None, :, None] * (px2 / hx**2)[None, None, :]
                                   + (px2 / hy**2)[None, :, None] * px[None, None, :])
        for j in range(hb, ny - hb, hb):
            for i in range(hb, nx - hb, hb):
                if not ok[frames][:, j - hb:j + hb + 1, i - hb:i + hb + 1].all():
                    continue
                u = u_hat[frames][:, j - hb:j + hb + 1, i - hb:i + hb + 1].reshape(nf, -1)
                k, w0, w1 = _hat_weights(u, top)
                A = np.zeros((nf, _N_GRID))
                B = np.zeros((nf, _N_GRID))
                lp, ph = lap.reshape(nf, -1), phi.reshape(nf, -1)
                pos = u >= 0
                rows = np.broadcast_to(np.arange(nf)[:, None], u.shape)
                for (kk, ww) in ((k, w0), (k + 1, w1)):
                    np.add.at(B, (rows, kk), ww * ph * u)
                    np.add.at(A, (rows[pos], kk[pos]), (ww * lp)[pos])
                # F on the grid is needed at û >= 0; below zero F(û) = D(0) û (A gets nothing there)
                c_neg = np.sum(np.where(pos, 0.0, lp * u), axis=1)
                As.append(A)
                Bs.append(B)
                cs.append(c_neg)
                ts.append(tt)
                lhss.append(-float(np.sum(phi_t.reshape(nf, -1) * u)))
    if not lhss:
        return None
    lhs = np.asarray(lhss)
    scale = float(np.mean(lhs**2))
    if not np.isfinite(scale) or scale <= 0:
        return None

    def t_(a):
        return torch.as_tensor(np.asarray(a)).to(device=device, dtype=dtype)

    return WeakForm(t_(np.stack(As)), t_(np.stack(Bs)), t_(np.stack(cs)), t_(np.stack(ts)), t_(lhs), scale, top)


def weak_loss(model, wf: WeakForm, n_windows: int, generator: torch.Generator) -> torch.Tensor:
    """Mean squared residual of ``n_windows`` random windows (all when fewer), normalised by ``wf.scale``.

    D and G are evaluated on the density grid only (N network evaluations per step, whatever the data size);
    F = ∫ D is integrated there by the trapezoid rule."""
    if n_windows < wf.n_windows:
        pick = torch.randint(0, wf.n_windows, (n_windows,), generator=generator).to(wf.lhs.device)
        A, B, c, t, lhs = wf.A[pick], wf.B[pick], wf.c[pick], wf.t[pick], wf.lhs[pick]
    else:
        A, B, c, t, lhs = wf.A, wf.B, wf.c, wf.t, wf.lhs
    grid = torch.linspace(0.0, wf.top, _N_GRID, dtype=A.dtype, device=A.device)
    D = model.dnet(grid)
    G = model.gnet(grid)
    step = wf.top / (_N_GRID - 1)
    F = torch.cat([D.new_zeros(1), torch.cumsum((D[1:] + D[:-1]) * (step / 2), 0)])
    per_frame = A @ F + B @ G + c * D[0]  # (W, frames)
    delay = model.delay(t.reshape(-1)).reshape(t.shape)
    rhs = torch.sum(delay * per_frame, dim=1)
    return torch.mean((lhs - rhs) ** 2) / wf.scale
