"""Microscopy-like renderings of a density field, with the exact cells drawn (ground truth for extraction).

The rendered image is aligned with the field's grid: box (i, j) covers pixel rows ``i*b ... (i+1)*b - 1`` and
columns ``j*b ... (j+1)*b - 1`` with ``b = dx_um / pixel_size_um`` pixels. Extracting the rendered stack with
``box_um = field.dx_um`` and ``roi = rendered.pixel_mask`` therefore gives the same grid and mask (its ``x_um``/
``y_um`` are measured from the rendered image's pixel (0, 0), i.e. offset from the source field's by a constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..field import DensityField
from ..io import Stack

__all__ = ["render_microscopy", "RenderedStack", "DEFAULT_CONFLUENCE_CELLS_PER_MM2"]

#: cells/mm² at confluence used for 'fraction'/'u/K' fields (about the PC-3 scratch-assay carrying capacity,
#: 1.7e-3 cells/µm², Jin et al. 2016).
DEFAULT_CONFLUENCE_CELLS_PER_MM2 = 1700.0


@dataclass
class RenderedStack:
    """A rendered image stack and the truth it was drawn from.

    stack: the images (uint16 nuclei / uint8 phase), pixel size and times of the field.
    counts: (T, Ny, Nx) int, exact number of cells drawn in each box (0 outside the mask).
    positions: per frame, (N, 2) float pixel (row, col) of the cell centres (pixel centres at integers).
    pixel_mask: (Y, X) bool, pixels of the boxes in the field's mask (the ROI to extract with).
    coverage: (T, Ny, Nx) fraction of each box's area covered by drawn nuclei / cells.
    box_px: box size in pixels. box_area_mm2: box area in mm².
    """

    stack: Stack
    counts: np.ndarray
    positions: list[np.ndarray]
    pixel_mask: np.ndarray
    coverage: np.ndarray
    box_px: int
    box_area_mm2: float
    mask: np.ndarray
    metadata: dict[str, Any] = dc_field(default_factory=dict)

    @property
    def true_density(self) -> np.ndarray:
        """(T, Ny, Nx) drawn counts / box area, cells/mm²; NaN outside the mask."""
        return np.where(self.mask[None], self.counts / self.box_area_mm2, np.nan)


def _expected_counts(fld: DensityField, box_area_mm2: float, confluence: float) -> np.ndarray:
    u = np.where(fld.mask[None] & np.isfinite(fld.u), fld.u, 0.0)
    u = np.maximum(u, 0.0)
    if fld.units == "cells/mm²":
        dens = u
    elif fld.units == "fraction":
        dens = u * confluence
    elif fld.units == "u/K":
        dens = u * confluence
    else:
        raise ValueError(f"Cannot render a field in units {fld.units!r}: expected 'cells/mm²', 'fraction' or 'u/K'.")
    return dens * box_area_mm2


def _sample_positions(counts: np.ndarray, b: int, min_sep_px: float, rng: np.random.Generator,
                      max_rounds: int = 40) -> np.ndarray:
    """Uniform positions inside their boxes, resampling (within the same box) cells closer than ``min_sep_px``."""
    from scipy.spatial import cKDTree

    ny, nx = counts.shape
    box = np.repeat(np.arange(ny * nx), counts.ravel())
    bi, bj = box // nx, box % nx
    n = box.size
    pos = np.empty((n, 2))
    pos[:, 0] = bi * b - 0.5 + rng.random(n) * b
    pos[:, 1] = bj * b - 0.5 + rng.random(n) * b
    if n < 2 or min_sep_px <= 0:
        return pos
    for _ in range(max_rounds):
        pairs = cKDTree(pos).query_pairs(min_sep_px, output_type="ndarray")
        if len(pairs) == 0:
            break
        redo = np.unique(pairs[:, 1])
        pos[redo, 0] = bi[redo] * b - 0.5 + rng.random(redo.size) * b
        pos[redo, 1] = bj[redo] * b - 0.5 + rng.random(redo.size) * b
    return pos


def _splat(shape: tuple[int, int], pos: np.ndarray, radius: np.ndarray, weight: np.ndarray,
           halo: float = 0.0, halo_width: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Sum of anti-aliased discs (value ``weight`` inside radius) -> (image, coverage indicator image).

    With ``halo`` > 0, a bright ring of that amplitude (Gaussian of ``halo_width`` px) is added at each rim.
    """
    Y, X = shape
    img = np.zeros(Y * X)
    cov = np.zeros(Y * X)
    if len(pos) == 0:
        return img.reshape(Y, X), cov.reshape(Y, X) > 0
    h = int(np.ceil(radius.max() + 3 * halo_width + 1))
    off = np.arange(-h, h + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    dy, dx = dy.ravel(), dx.ravel()
    centre = np.rint(pos).astype(np.intp)
    rr = centre[:, :1] + dy[None]
    cc = centre[:, 1:] + dx[None]
    dist = np.hypot(rr - pos[:, :1], cc - pos[:, 1:])
    inside = np.clip(radius[:, None] - dist + 0.5, 0.0, 1.0)
    val = weight[:, None] * inside
    if halo:
        val = val + halo * np.exp(-(((dist - radius[:, None]) / halo_width) ** 2))
    ok = (rr >= 0) & (rr < Y) & (cc >= 0) & (cc < X)
    flat = (rr * X + cc)[ok]
    img += np.bincount(flat, weights=val[ok], minlength=Y * X)
    cov += np.bincount(flat, weights=inside[ok], minlength=Y * X)
    return img.reshape(Y, X), cov.reshape(Y, X) >= 0.5


def render_microscopy(
    field: DensityField,
    pixel_size_um: float = 2.0,
    kind: str = "nuclei",
    seed: int = 0,
    nucleus_diameter_um: float = 10.0,
    *,
    cell_diameter_um: float = 20.0,
    cells_per_mm2_at_confluence: float = DEFAULT_CONFLUENCE_CELLS_PER_MM2,
    size_cv: float = 0.12,
    brightness_cv: float = 0.2,
    min_separation_um: float | None = None,
    background: float = 100.0,
    amplitude: float = 1500.0,
    psf_sigma_um: float = 1.0,
    read_noise: float = 5.0,
    illumination_drift: float = 0.05,
) -> RenderedStack:
    """Draw a microscopy-like stack whose local cell numbers follow ``field``.

    Per frame and box, the number of cells is Poisson with mean ``u * box area`` (cells/mm² x mm²; fields in
    'fraction' or 'u/K' units are scaled by ``cells_per_mm2_at_confluence``); cells are placed uniformly inside
    their box (boxes in ``field.mask`` only), at least ``min_separation_um`` apart (default: one nucleus
    diameter for nuclei, 0.6 cell diameter for phase), as cells in a monolayer do not overlap.

    kind='nuclei': uint16 fluorescence; soft discs of diameter ``nucleus_diameter_um`` (lognormal size and
    brightness variation), blurred by a Gaussian PSF (``psf_sigma_um``), on a smooth uneven ``background``,
    with Poisson shot noise and Gaussian read noise (counts). kind='phase': uint8 phase-contrast-like image:
    cells of ``cell_diameter_um`` with a darker textured body and a bright halo ring on a flat noisy grey
    background whose brightness drifts by ``illumination_drift`` over time.

    ``pixel_size_um`` must divide ``field.dx_um`` (boxes are whole pixels). Deterministic for a given ``seed``.
    """
    if kind not in ("nuclei", "phase"):
        raise ValueError(f"kind must be 'nuclei' or 'phase'; got {kind!r}.")
    if not pixel_size_um or pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be positive; got {pixel_size_um!r}.")
    b_float = field.dx_um / pixel_size_um
    b = int(round(b_float))
    if b < 2 or abs(b - b_float) > 1e-6 * max(1.0, b_float):
        raise ValueError(f"The field's box size {field.dx_um:g} µm is not a whole number (>= 2) of "
                         f"{pixel_size_um:g} µm pixels: choose a pixel size that divides it.")
    rng = np.random.default_rng(seed)
    T, ny, nx = field.u.shape
    Y, X = ny * b, nx * b
    box_area_mm2 = (b * pixel_size_um) ** 2 * 1e-6
    lam = _expected_counts(field, box_area_mm2, cells_per_mm2_at_confluence)
    counts = rng.poisson(lam).astype(np.int64)
    counts[:, ~field.mask] = 0
    diameter_um = nucleus_diameter_um if kind == "nuclei" else cell_diameter_um
    if min_separation_um is None:
        min_separation_um = diameter_um if kind == "nuclei" else 0.6 * diameter_um
    r_px = 0.5 * diameter_um / pixel_size_um
    psf_px = psf_sigma_um / pixel_size_um
    dtype = np.uint16 if kind == "nuclei" else np.uint8
    data = np.empty((T, Y, X), dtype)
    coverage = np.zeros((T, ny, nx))
    positions: list[np.ndarray] = []
    yy, xx = np.mgrid[0:Y, 0:X]
    shading = 1.0 + 0.2 * np.sin(np.pi * yy / max(Y, 1)) * np.cos(0.5 * np.pi * xx / max(X, 1))
    for t in range(T):
        pos = _sample_positions(counts[t], b, min_separation_um / pixel_size_um, rng)
        n = len(pos)
        radius = r_px * rng.lognormal(0.0, size_cv, n)
        if kind == "nuclei":
            weight = amplitude * rng.lognormal(0.0, brightness_cv, n)
            img, cov = _splat((Y, X), pos, radius, weight)
            if psf_px > 0:
                img = ndi.gaussian_filter(img, psf_px)
            img = background * shading + img
            img = rng.poisson(img).astype(np.float64) + rng.normal(0.0, read_noise, img.shape)
            data[t] = np.clip(np.rint(img), 0, 65535).astype(np.uint16)
        else:
            weight = np.full(n, -0.12)
            img, cov = _splat((Y, X), pos, radius, weight, halo=0.3, halo_width=max(0.7, 0.6 / pixel_size_um))
            texture = ndi.gaussian_filter(rng.normal(0.0, 1.0, (Y, X)), 1.0)
            img = img + 0.25 * texture * cov
            if psf_px > 0:
                img = ndi.gaussian_filter(img, psf_px)
            level = 0.5 * (1.0 + illumination_drift * np.sin(2 * np.pi * t / max(T, 2)))
            img = level * (1.0 + img) + rng.normal(0.0, 0.015, (Y, X))
            data[t] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        coverage[t] = cov.reshape(ny, b, nx, b).mean(axis=(1, 3))
        positions.append(pos)
    pixel_mask = np.repeat(np.repeat(field.mask, b, axis=0), b, axis=1)
    metadata = {"kind": kind, "seed": seed, "diameter_um": diameter_um, "pixel_size_um": pixel_size_um,
                "cells_per_mm2_at_confluence": cells_per_mm2_at_confluence, "source_units": field.units,
                "source_origin_um": field.origin_um}
    stack = Stack(data, float(pixel_size_um), field.t_h.copy(), name=f"rendered {kind} (seed {seed})",
                  metadata={"synthetic": metadata})
    return RenderedStack(stack, counts, positions, pixel_mask, coverage, b, box_area_mm2, field.mask.copy(),
                         metadata)
