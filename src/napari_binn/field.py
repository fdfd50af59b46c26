"""DensityField: a cell density u(x, y, t) on a regular coarse grid inside an ROI, with its units."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from .errors import InputError

__all__ = ["DensityField", "initial_state", "noise_variance"]


def initial_state(frame: np.ndarray, mask: np.ndarray, *, denoise: bool = False) -> np.ndarray:
    """The (Ny, Nx) density a simulation starts from, given a field's first frame: the one rule of napari-binn.

    Boxes outside ``mask`` and unobserved (NaN) boxes start at 0, as empty space; negative values (noise) start at
    0. ``denoise`` also sets to 0 the boxes of empty space that hold only noise: local mean (Gaussian, s.d. 1 box,
    normalised on the mask) below 3 x its noise s.d., the noise s.d. a robust (MAD) estimate from the frame minus
    its local mean (noise specks otherwise grow like real cells; see ``fit_mechanistic(initial='denoised')``).
    """
    mask = np.asarray(mask, dtype=bool)
    u0 = np.array(frame, dtype=np.float64)
    u0[~np.isfinite(u0) | ~mask] = 0.0
    if denoise:
        u0 = _denoise_empty_space(u0, mask)
    if (u0 < 0).any():
        u0 = np.maximum(u0, 0.0)
    return u0


def _denoise_empty_space(u0: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero the boxes of empty space that hold only noise: local mean (Gaussian, s.d. 1 box, normalised on the
    mask) below 3 x its noise s.d.; the noise s.d. is a robust (MAD) estimate from u0 minus its local mean."""
    from scipy.ndimage import gaussian_filter

    w = mask.astype(np.float64)
    local = gaussian_filter(np.where(mask, u0, 0.0), 1.0, mode="constant") / np.maximum(
        gaussian_filter(w, 1.0, mode="constant"), 1e-12)
    detail = (u0 - local)[mask]
    # white noise of s.d. s: u - G*u has s.d. ~0.87 s, and G*u (G a 1-box Gaussian) has s.d. s / (2 sqrt(pi))
    noise_sd = 1.4826 * float(np.median(np.abs(detail - np.median(detail)))) / 0.87
    threshold = 3.0 * noise_sd / (2.0 * math.sqrt(math.pi))
    return np.where(mask & (local > threshold), np.maximum(u0, 0.0), 0.0)


def noise_variance(u: np.ndarray, residuals: np.ndarray) -> tuple[float, float]:
    """(a, b) of a noise variance a + b u, fitted by least squares to the squared ``residuals`` of a model whose
    predicted densities are ``u`` (negative ones taken as 0), each clipped to >= 0: b > 0 for counts (Poisson:
    variance proportional to u, none in empty boxes), b = 0 for noise of one size."""
    u = np.asarray(u, np.float64).ravel()
    A = np.stack([np.ones(u.size), np.maximum(u, 0.0)], axis=1)
    coef = np.linalg.lstsq(A, np.asarray(residuals, np.float64).ravel() ** 2, rcond=None)[0]
    return max(float(coef[0]), 0.0), max(float(coef[1]), 0.0)


@dataclass
class DensityField:
    """Cell density on a regular grid of square boxes, restricted to a mask, over time.

    Attributes
    ----------
    u : (T, Ny, Nx) float64
        Density in ``units``; NaN where nothing was observed (outside the mask, or masked bad pixels).
    mask : (Ny, Nx) bool
        Grid boxes inside the region of interest (the PDE domain).
    x_um, y_um : (Nx,), (Ny,) float64
        Box centres in micrometres, in the image's physical frame (pixel (0, 0) centre at 0 µm).
    t_h : (T,) float64
        Frame times in hours, strictly increasing.
    units : str
        Density units: ``"cells/mm²"`` for counting methods, ``"fraction"`` (confluence in [0, 1]),
        or ``"u/K"`` when normalised by a carrying capacity.
    K : float or None
        Carrying capacity in ``units`` (given, or estimated from a high percentile), if known.
    metadata : dict
        Provenance: method, parameters, warnings (e.g. an assumed pixel size), source name.
    """

    u: np.ndarray
    mask: np.ndarray
    x_um: np.ndarray
    y_um: np.ndarray
    t_h: np.ndarray
    units: str = "cells/mm²"
    K: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.u = np.asarray(self.u, dtype=np.float64)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.x_um = np.asarray(self.x_um, dtype=np.float64)
        self.y_um = np.asarray(self.y_um, dtype=np.float64)
        self.t_h = np.asarray(self.t_h, dtype=np.float64)
        if self.u.ndim != 3:
            raise InputError(f"DensityField.u must be (T, Ny, Nx); got shape {self.u.shape}")
        T, ny, nx = self.u.shape
        if self.mask.shape != (ny, nx):
            raise InputError(f"mask shape {self.mask.shape} does not match the grid {(ny, nx)}")
        if not self.mask.any():
            raise InputError("the mask is all False: a density field needs at least one box inside its domain "
                             "(draw or choose a non-empty ROI)")
        if self.x_um.shape != (nx,) or self.y_um.shape != (ny,):
            raise InputError(
                f"x_um/y_um lengths {self.x_um.shape}/{self.y_um.shape} do not match the grid {(ny, nx)}"
            )
        if self.t_h.shape != (T,):
            raise InputError(f"t_h has {self.t_h.size} times for {T} frames")
        if T > 1 and not np.all(np.diff(self.t_h) > 0):
            raise InputError("frame times t_h must be strictly increasing")
        for name, c in (("x_um", self.x_um), ("y_um", self.y_um)):
            if c.size > 1 and not np.allclose(np.diff(c), np.diff(c)[0], rtol=1e-6):
                raise InputError(f"{name} must be evenly spaced (a regular grid)")

    @property
    def dx_um(self) -> float:
        """Grid spacing (box size) in µm."""
        if self.x_um.size > 1:
            return float(self.x_um[1] - self.x_um[0])
        if self.y_um.size > 1:
            return float(self.y_um[1] - self.y_um[0])
        return float(self.metadata.get("box_um", 1.0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.u.shape)  # type: ignore[return-value]

    @property
    def n_frames(self) -> int:
        return int(self.u.shape[0])

    @property
    def observed(self) -> np.ndarray:
        """(T, Ny, Nx) bool: inside the mask and a finite value."""
        return self.mask[None] & np.isfinite(self.u)

    @property
    def origin_um(self) -> tuple[float, float]:
        """(y, x) of the first box's centre in µm: the napari ``translate`` of a layer with scale ``dx_um``."""
        return float(self.y_um[0]), float(self.x_um[0])

    def initial_state(self, *, denoise: bool = False) -> np.ndarray:
        """The (Ny, Nx) density simulations start from: the first frame by :func:`initial_state` (unobserved and
        negative boxes at 0; ``denoise``: empty-space noise at 0 too)."""
        return initial_state(self.u[0], self.mask, denoise=denoise)

    def with_mask(self, mask: np.ndarray) -> "DensityField":
        """A copy restricted to ``mask`` (values outside become NaN)."""
        mask = np.asarray(mask, bool) & self.mask
        u = np.where(mask[None], self.u, np.nan)
        return DensityField(u, mask, self.x_um.copy(), self.y_um.copy(), self.t_h.copy(),
                            self.units, self.K, dict(self.metadata))

    def __repr__(self) -> str:
        T, ny, nx = self.u.shape
        return (f"DensityField({T} frames x {ny}x{nx} boxes of {self.dx_um:g} µm, "
                f"t {self.t_h[0]:g}-{self.t_h[-1]:g} h, {int(self.mask.sum())} boxes in ROI, "
                f"units {self.units!r}, K={self.K})")
