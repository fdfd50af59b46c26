"""Compiled loops (numba) for the hot paths of the differentiable solver (:mod:`napari_binn.pde.torch_solver`).

On the fields of microscopy (a few hundred to a few thousand boxes) one right-hand side in numpy is some 25
array operations of about a microsecond each, so numpy's per-operation overhead, not arithmetic, sets the
refinement's pace. These loops do the same arithmetic, operation by operation and in the same order (sums per
box in face order, as ``np.bincount`` adds them), so they return the same numbers as the numpy code to the last
bit (tests/test_kernels.py checks that); they only remove the overhead.

numba is a dependency; where it cannot be imported, or with the environment variable ``NAPARI_BINN_NO_JIT=1``,
:data:`AVAILABLE` is False and the solver runs its numpy code instead (same results, slower).

One difference from the numpy code: a non-finite density (NaN) in a state raises ``ValueError`` here, where the
numpy code's table lookup would raise ``IndexError`` (the refinement's optimiser treats a ValueError as a step to
refuse).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["AVAILABLE", "available", "grid_divergence", "heun_interval", "heun_adjoint_interval", "rkc_stage",
           "table_rhs", "table_vjp"]

try:  # pragma: no cover - import guard
    if os.environ.get("NAPARI_BINN_NO_JIT", "").strip() not in ("", "0"):
        raise ImportError("switched off by NAPARI_BINN_NO_JIT")
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

AVAILABLE = numba is not None


def available() -> bool:
    """Whether the compiled loops are in use (read at each call: tests switch :data:`AVAILABLE` off)."""
    return AVAILABLE


def _jit(fn):
    """Compile ``fn`` on first call, cached on disk (next to this file, else in the user's cache directory) so that
    later processes skip the few seconds of compiling; uncached where neither is writable."""
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # pragma: no cover - "no locator available": nowhere to write the cache
        return numba.njit(nogil=True)(fn)


def lookup_scale_top(m: int, u_max: float) -> tuple[float, float]:
    """The lookup's (scale, top) for a table of ``m`` evenly spaced nodes over [0, u_max]: a density u sits at
    position min(u * scale, top) in node units, top just below the last node so that a segment's upper node
    k + 1 stays inside the table. (The torch lookup of ``torch_solver.interp_table`` writes it out in torch.)"""
    return (int(m) - 1) / float(u_max), int(m) - 1 - 1e-9


@_jit
def _lookup(u, D, G, scale, top):
    """Table lookup at max(u, 0), as ``_NumpyRhs._interp``: (up, raw, kk, w, w0, d, g), each (n,)."""
    n = u.size
    up = np.empty(n)
    raw = np.empty(n)
    kk = np.empty(n, np.int64)
    w = np.empty(n)
    w0 = np.empty(n)
    d = np.empty(n)
    g = np.empty(n)
    for b in range(n):
        x = u[b]
        if x < 0.0:  # np.maximum(u, 0): NaN stays NaN, -0.0 stays -0.0
            x = 0.0
        up[b] = x
        r = x * scale
        if not (r >= 0.0):
            raise ValueError("a simulated density became NaN")
        raw[b] = r
        pos = r if r <= top else top
        k = int(pos)
        kk[b] = k
        wv = pos - k
        w[b] = wv
        w0[b] = 1.0 - wv
        d[b] = D[k] * w0[b] + D[k + 1] * wv
        g[b] = G[k] * w0[b] + G[k + 1] * wv
    return up, raw, kk, w, w0, d, g


@_jit
def table_rhs(u, D, G, fi, fj, scale, top, half_inv_dx2):
    """div(D(u+) grad u) + G(u+) u+ for tables D, G on nodes 0, 1/scale, ... (as ``_NumpyRhs.__call__``)."""
    n = u.size
    up, _raw, _kk, _w, _w0, d, g = _lookup(u, D, G, scale, top)
    acc_i = np.zeros(n)
    acc_j = np.zeros(n)
    for f in range(fi.size):
        i = fi[f]
        j = fj[f]
        flux = (d[i] + d[j]) * (u[j] - u[i]) * half_inv_dx2
        acc_i[i] += flux
        acc_j[j] += flux
    out = np.empty(n)
    for b in range(n):
        out[b] = (acc_i[b] - acc_j[b]) + g[b] * up[b]
    return out


@_jit
def table_vjp(u, a, D, G, dD, dG, fi, fj, scale, top, half_inv_dx2, aD, aG):
    """a^T d rhs / du at u, adding a^T d rhs / dD and / dG into aD, aG (as ``_NumpyRhs.vjp``)."""
    n = u.size
    m = D.size
    up, raw, kk, w, w0, d, g = _lookup(u, D, G, scale, top)
    au_j = np.zeros(n)  # bincount(j, a_grad)
    au_i = np.zeros(n)  # bincount(i, a_grad)
    ad_i = np.zeros(n)  # bincount(i, a_c)
    ad_j = np.zeros(n)  # bincount(j, a_c)
    for f in range(fi.size):
        i = fi[f]
        j = fj[f]
        a_flux = (a[i] - a[j]) * half_inv_dx2
        a_grad = a_flux * (d[i] + d[j])
        au_j[j] += a_grad
        au_i[i] += a_grad
        a_c = a_flux * (u[j] - u[i])
        ad_i[i] += a_c
        ad_j[j] += a_c
    bD0 = np.zeros(m)
    bD1 = np.zeros(m)
    bG0 = np.zeros(m)
    bG1 = np.zeros(m)
    out = np.empty(n)
    for b in range(n):
        a_d = ad_i[b] + ad_j[b]
        a_g = a[b] * up[b]
        k = kk[b]
        if raw[b] <= top:
            extra = a_d * dD[k] + a_g * dG[k]
        else:
            extra = 0.0
        a_up = a[b] * g[b] + extra
        bD0[k] += a_d * w0[b]
        bD1[k + 1] += a_d * w[b]
        bG0[k] += a_g * w0[b]
        bG1[k + 1] += a_g * w[b]
        a_u = au_j[b] - au_i[b]
        out[b] = a_u + (a_up if u[b] >= 0.0 else 0.0)
    for q in range(m):
        aD[q] += bD0[q] + bD1[q]
        aG[q] += bG0[q] + bG1[q]
    return out


@_jit
def heun_interval(u, h, tf0, tf1, D, G, fi, fj, scale, top, half_inv_dx2, U, U1):
    """``tf0.size`` Heun steps of size h from u (as ``_heun_step`` with ``_NumpyRhs``): returns the new state;
    stores each step's start state and predictor in rows of U, U1 when they have a row per step (else 0 rows)."""
    store = U.shape[0] > 0
    n = u.size
    half_h = 0.5 * h
    for s in range(tf0.size):
        r0 = table_rhs(u, D, G, fi, fj, scale, top, half_inv_dx2)
        f0 = np.empty(n)
        u1 = np.empty(n)
        for b in range(n):
            f0[b] = r0[b] * tf0[s]
            u1[b] = u[b] + h * f0[b]
        r1 = table_rhs(u1, D, G, fi, fj, scale, top, half_inv_dx2)
        un = np.empty(n)
        for b in range(n):
            un[b] = u[b] + half_h * (f0[b] + r1[b] * tf1[s])
        if store:
            U[s] = u
            U1[s] = u1
        u = un
    return u


@_jit
def heun_adjoint_interval(a, h, tf0, tf1, U, U1, D, G, dD, dG, fi, fj, scale, top, half_inv_dx2, aD, aG):
    """The discrete adjoint of :func:`heun_interval`'s steps, last step first (as ``_HeunAdjoint._backward``):
    returns the adjoint state at the interval's start; adds into aD, aG."""
    n = a.size
    half_h = 0.5 * h
    for s in range(tf0.size - 1, -1, -1):
        c1 = half_h * tf1[s]
        a1 = np.empty(n)
        for b in range(n):
            a1[b] = c1 * a[b]
        a_u1 = table_vjp(U1[s], a1, D, G, dD, dG, fi, fj, scale, top, half_inv_dx2, aD, aG)
        a0 = np.empty(n)
        for b in range(n):
            a0[b] = tf0[s] * (half_h * a[b] + h * a_u1[b])
        v = table_vjp(U[s], a0, D, G, dD, dG, fi, fj, scale, top, half_inv_dx2, aD, aG)
        an = np.empty(n)
        for b in range(n):
            an[b] = (a[b] + a_u1[b]) + v[b]
        a = an
    return a


# ---------------------------------------------------------------------------------------------------------
# the numpy solver (:mod:`napari_binn.pde.solver`, :class:`napari_binn.pde.grid.MaskedGrid`)


@_jit
def grid_divergence(u, d, const, d_const, flat, wx, wy, nx, size, ug, dg, out):
    """``MaskedGrid.divergence`` on the mask boxes ``flat`` of a flat grid of ``size`` boxes, nx per row: u, d per
    mask box (with ``const``, d is unused and D = d_const everywhere); ug, dg: full-grid buffers that hold 0
    outside the mask. The same face fluxes summed in the same order as the numpy code: each box's
    ((x-flux out - x-flux in) + y-flux out) - y-flux in."""
    n = flat.size
    two_d = 2.0 * d_const
    for b in range(n):
        ug[flat[b]] = u[b]
        if not const:
            dg[flat[b]] = d[b]
    for b in range(n):
        p = flat[b]
        if p < size - 1:
            if const:
                acc = ((ug[p + 1] - ug[p]) * wx[p]) * two_d
            else:
                acc = (ug[p + 1] - ug[p]) * ((dg[p + 1] + dg[p]) * wx[p])
        else:
            acc = 0.0
        if p >= 1:
            q = p - 1
            if const:
                acc -= ((ug[q + 1] - ug[q]) * wx[q]) * two_d
            else:
                acc -= (ug[q + 1] - ug[q]) * ((dg[q + 1] + dg[q]) * wx[q])
        if p < size - nx:
            if const:
                acc += ((ug[p + nx] - ug[p]) * wy[p]) * two_d
            else:
                acc += (ug[p + nx] - ug[p]) * ((dg[p + nx] + dg[p]) * wy[p])
        if p >= nx:
            q = p - nx
            if const:
                acc -= ((ug[q + nx] - ug[q]) * wy[q]) * two_d
            else:
                acc -= (ug[q + nx] - ug[q]) * ((dg[q + nx] + dg[q]) * wy[q])
        out[b] = acc
    return out


@_jit
def rkc_stage(y, y_prev, y_prev2, fj, hf0, c0, mu, nu, mut_h, gt):
    """One RKC stage, as ``solver._rkc_step`` combines it: (((c0 y + mu y_prev) + nu y_prev2) + mut_h fj) +
    gt hf0."""
    out = np.empty(y.size)
    for b in range(y.size):
        out[b] = (((c0 * y[b] + mu * y_prev[b]) + nu * y_prev2[b]) + fj[b] * mut_h) + gt * hf0[b]
    return out
