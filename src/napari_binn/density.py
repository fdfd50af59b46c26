"""Image stack + region of interest -> :class:`DensityField` on a grid of square boxes.

Methods
-------
``nuclei``      fluorescent nuclei: blob filter (Laplacian of Gaussian, at the scale within the nucleus diameter
                range that the stack's nuclei answer most) + local maxima -> counts per box (or a Gaussian
                kernel density) in cells/mm².
``confluence``  any channel (phase contrast): local standard deviation texture, normalised per frame
                (intensity drift), thresholded -> foreground fraction per box in [0, 1].
``labels``      an integer label stack from any segmentation tool -> centroids -> cells/mm².
``points``      existing centroids, an (N, 3) array of (t, row, col) -> cells/mm².

Grid and ROI rule
-----------------
Boxes are ``round(box_um / pixel_size_um)`` pixels wide, tiled from the top-left corner of the ROI's bounding box
so that they cover it. A box belongs to ``field.mask`` when at least half of its pixel area lies inside the ROI.
Box values are computed from the ROI pixels of the box only (a box half in the ROI counts the cells in that half
and divides by that half's area). Box centres ``x_um``/``y_um`` are in µm in the image frame, where the centre of
pixel (0, 0) is at (0, 0) µm, so a napari layer with ``field_layer_transform(field)`` overlays the image exactly.

Frames are read one at a time (``stack.data[t]``): a lazy (memory-mapped) stack is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .field import DensityField
from .io import CALIBRATION_KEYS, Stack
from .jobs import CancelToken, JobCancelled, Progress, ProgressClock, is_cancelled, run_job
from .roi import roi_to_mask

__all__ = [
    "extract_density",
    "extract_density_job",
    "preview_frame",
    "FramePreview",
    "field_layer_transform",
    "METHODS",
]

METHODS = ("nuclei", "confluence", "labels", "points")
_COUNT_UNITS = "cells/mm²"
_MIN_FRAMES = 3
_MIN_BOXES = 3  # the ROI must span at least 3 x 3 boxes


# ----------------------------------------------------------------------------------------------------------
# Grid (ROIs: napari_binn.roi)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """Box grid over an image: box (i, j) covers rows r0 + i*b ... r0 + (i+1)*b - 1 (same for columns)."""

    r0: int
    c0: int
    b: int
    ny: int
    nx: int
    pixel_size_um: float
    roi: np.ndarray  # (Y, X) bool pixel mask
    roi_px: np.ndarray  # (ny, nx) ROI pixels per box
    mask: np.ndarray  # (ny, nx) boxes with >= 50 % of their area in the ROI

    @property
    def y_um(self) -> np.ndarray:
        return (self.r0 + self.b * np.arange(self.ny) + (self.b - 1) / 2) * self.pixel_size_um

    @property
    def x_um(self) -> np.ndarray:
        return (self.c0 + self.b * np.arange(self.nx) + (self.b - 1) / 2) * self.pixel_size_um

    @property
    def box_area_mm2(self) -> float:
        return (self.b * self.pixel_size_um) ** 2 * 1e-6

    def box_sum(self, image: np.ndarray) -> np.ndarray:
        """Sum of a (Y, X) image over each box (pixels beyond the image count as 0) -> (ny, nx) float64."""
        Y, X = image.shape
        b = self.b
        r1, c1 = min(Y, self.r0 + self.ny * b), min(X, self.c0 + self.nx * b)
        region = np.asarray(image[self.r0:r1, self.c0:c1], dtype=np.float64)
        if region.shape != (self.ny * b, self.nx * b):
            padded = np.zeros((self.ny * b, self.nx * b))
            padded[: region.shape[0], : region.shape[1]] = region
            region = padded
        return region.reshape(self.ny, b, self.nx, b).sum(axis=(1, 3))

    def count_points(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Number of points (pixel coordinates, pixel centres at integers) inside the ROI, per box."""
        Y, X = self.roi.shape
        ri, ci = np.rint(rows).astype(np.intp), np.rint(cols).astype(np.intp)
        ok = (ri >= 0) & (ri < Y) & (ci >= 0) & (ci < X)
        ri, ci, rows, cols = ri[ok], ci[ok], rows[ok], cols[ok]
        inside = self.roi[ri, ci]
        bi = np.floor((rows[inside] - self.r0 + 0.5) / self.b).astype(np.intp)
        bj = np.floor((cols[inside] - self.c0 + 0.5) / self.b).astype(np.intp)
        ok = (bi >= 0) & (bi < self.ny) & (bj >= 0) & (bj < self.nx)
        flat = bi[ok] * self.nx + bj[ok]
        return np.bincount(flat, minlength=self.ny * self.nx).reshape(self.ny, self.nx).astype(np.float64)


def _make_grid(roi_mask: np.ndarray, box_um: float, pixel_size_um: float) -> _Grid:
    if not np.isfinite(box_um) or box_um <= 0:
        raise InputError(f"box_um must be a positive number of micrometres; got {box_um!r}.")
    b = int(round(box_um / pixel_size_um))
    if b < 1:
        raise InputError(f"box_um={box_um:g} µm is smaller than one pixel ({pixel_size_um:g} µm): use a larger box.")
    rows = np.flatnonzero(roi_mask.any(axis=1))
    cols = np.flatnonzero(roi_mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    h_um, w_um = (r1 - r0) * pixel_size_um, (c1 - c0) * pixel_size_um
    if b > min(r1 - r0, c1 - c0):
        raise InputError(f"box_um={box_um:g} µm is larger than the ROI ({h_um:g} x {w_um:g} µm): "
                         "use a smaller box or a larger ROI.")
    ny, nx = -(-(r1 - r0) // b), -(-(c1 - c0) // b)
    grid = _Grid(r0, c0, b, ny, nx, float(pixel_size_um), roi_mask, np.zeros((ny, nx)), np.zeros((ny, nx), bool))
    grid.roi_px = grid.box_sum(roi_mask)
    grid.mask = grid.roi_px >= 0.5 * b * b
    n_in = int(grid.mask.sum())
    if ny < _MIN_BOXES or nx < _MIN_BOXES or n_in < _MIN_BOXES * _MIN_BOXES:
        raise InputError(f"The ROI ({h_um:g} x {w_um:g} µm) holds only {n_in} boxes of {b * pixel_size_um:g} µm "
                         f"(grid {ny} x {nx}); at least {_MIN_BOXES} x {_MIN_BOXES} are needed: "
                         "use a smaller box_um or a larger ROI.")
    return grid


def field_layer_transform(field: DensityField) -> tuple[tuple[float, float], tuple[float, float]]:
    """napari ``(scale, translate)`` in µm (y, x) that overlays ``field`` on an image layer of scale = pixel size.

    Box (i, j) is drawn centred at (y_um[i], x_um[j]), i.e. exactly on the pixels it was computed from.
    """
    dx = field.dx_um
    return (dx, dx), field.origin_um


# ----------------------------------------------------------------------------------------------------------
# Per-frame measurements
# ----------------------------------------------------------------------------------------------------------


def _robust_sigma(values: np.ndarray) -> float:
    """Noise level of mostly-background values: 1.4826 x median absolute deviation (strided subsample)."""
    flat = values.ravel()
    if flat.size > 200_000:
        flat = flat[:: flat.size // 200_000]
    med = np.median(flat)
    return float(1.4826 * np.median(np.abs(flat - med)))


def _threshold_value(samples: np.ndarray, method: Any) -> float:
    from skimage.filters import threshold_li, threshold_otsu

    samples = samples[np.isfinite(samples)]
    if samples.size == 0 or np.ptp(samples) == 0:
        return float("inf")
    if isinstance(method, str):
        if method == "otsu":
            return float(threshold_otsu(samples))
        if method == "li":
            return float(threshold_li(samples))
        raise InputError(f"threshold must be 'otsu', 'li' or a number; got {method!r}.")
    return float(method)


@dataclass
class _Params:
    method: str
    pixel_size_um: float
    nucleus_diameter_um: tuple[float, float]
    threshold: Any
    min_snr: float
    estimator: str
    kde_sigma_um: float
    texture_window_um: float
    spatial_sigma: float
    temporal_sigma: float
    normalise: Any
    percentile: float
    blob_sigma_px: float | None = None  # the blob filter's scale once chosen (_choose_blob_sigma); None: nominal

    @property
    def dmin_px(self) -> float:
        return self.nucleus_diameter_um[0] / self.pixel_size_um

    @property
    def dmax_px(self) -> float:
        return self.nucleus_diameter_um[1] / self.pixel_size_um


def _parse_params(method: str, pixel_size_um: float, params: dict[str, Any]) -> _Params:
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    known = {"nucleus_diameter_um", "threshold", "min_snr", "estimator", "kde_sigma_um", "texture_window_um",
             "spatial_sigma", "temporal_sigma", "normalise", "normalize", "K", "percentile", "points"}
    unknown = set(params) - known
    if unknown:
        raise InputError(f"Unknown density parameter(s) {sorted(unknown)}; known: {sorted(known)}.")
    dn = params.get("nucleus_diameter_um", (6.0, 16.0))
    if np.isscalar(dn):
        dn = (0.75 * float(dn), 1.5 * float(dn))
    dn = (float(dn[0]), float(dn[1]))
    if not (0 < dn[0] <= dn[1]):
        raise InputError(f"nucleus_diameter_um must be (min, max) with 0 < min <= max µm; got {dn}.")
    norm = params.get("normalise", params.get("normalize", params.get("K", "none")))
    if norm is None:
        norm = "none"
    if isinstance(norm, str) and norm not in ("none", "percentile"):
        raise InputError(f"normalise must be 'none', 'percentile' or a carrying capacity K > 0; got {norm!r}.")
    if not isinstance(norm, str) and not (np.isfinite(float(norm)) and float(norm) > 0):
        raise InputError(f"A carrying capacity K must be a positive number; got {norm!r}.")
    thr = params.get("threshold", "otsu")
    if isinstance(thr, str) and thr not in ("otsu", "li") or not isinstance(thr, str) and not np.isfinite(float(thr)):
        raise InputError(f"threshold must be 'otsu', 'li' or a finite number; got {thr!r}.")
    estimator = params.get("estimator", "counts")
    if estimator not in ("counts", "kde"):
        raise InputError(f"estimator must be 'counts' or 'kde'; got {estimator!r}.")
    p = _Params(method, pixel_size_um, dn, params.get("threshold", "otsu"), float(params.get("min_snr", 5.0)),
                estimator, float(params.get("kde_sigma_um", 25.0)), float(params.get("texture_window_um", 6.0)),
                float(params.get("spatial_sigma", 0.0)), float(params.get("temporal_sigma", 0.0)), norm,
                float(params.get("percentile", 99.0)))
    if p.spatial_sigma < 0 or p.temporal_sigma < 0:
        raise InputError("spatial_sigma (boxes) and temporal_sigma (frames) must be >= 0.")
    return p


def _clean(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 copy of a frame with non-finite pixels replaced by the median; returns (frame, bad mask or None)."""
    f = np.asarray(frame)
    if f.ndim != 2:
        raise InputError(f"Expected a 2D frame (Y, X); got shape {f.shape}. Choose a channel or projection first.")
    f = f.astype(np.float32, copy=True)
    bad = None
    if not np.all(np.isfinite(f)):
        bad = ~np.isfinite(f)
        fill = np.median(f[~bad]) if not bad.all() else 0.0
        f[bad] = fill
    return f, bad


def _pixel_noise(f: np.ndarray) -> float:
    """Robust per-pixel noise sigma: MAD of the separable second difference [1 -2 1] x [1 -2 1] (which cancels
    smooth structure; its gain is 6), on every 4th row triplet for speed."""
    if f.shape[0] < 3 or f.shape[1] < 3:
        return float(np.std(f))
    dx = f[:, :-2] - 2.0 * f[:, 1:-1] + f[:, 2:]
    rows = np.arange(0, f.shape[0] - 2, 4)
    res = dx[rows] - 2.0 * dx[rows + 1] + dx[rows + 2]
    return float(1.4826 * np.median(np.abs(res)) / 6.0)


_TRUNCATE = 3.0  # Gaussian kernels cut at 3 sigma


def _nominal_sigma(p: _Params) -> float:
    """The nominal blob-detector scale in pixels: d / (2 sqrt 2) for the geometric mean d of the diameter range."""
    return max(0.7, float(np.sqrt(p.dmin_px * p.dmax_px)) / (2.0 * np.sqrt(2.0)))


def _log_sigma(p: _Params) -> float:
    """Blob-detector scale in pixels: the one chosen from the images (``p.blob_sigma_px``), else the nominal one."""
    return p.blob_sigma_px if p.blob_sigma_px is not None else _nominal_sigma(p)


def _log_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """1D kernels of the Laplacian of Gaussian, ``d2 x g + g x d2``: the Gaussian ``g`` (sum 1) and its second
    derivative ``d2``, both cut at ``_TRUNCATE`` sigma. The cut leaves ``d2`` a small negative sum, so a plain
    truncated LoG answers a flat background with an offset proportional to its brightness (about 7 noise sigmas
    at a background of 300 counts with shot noise); ``d2`` is made to sum to exactly 0 by subtracting that sum
    times ``g``, so flat and linear backgrounds give 0."""
    r = int(_TRUNCATE * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    d2 = g * (x * x - sigma * sigma) / sigma ** 4
    d2 -= d2.sum() * g
    return g, d2


def _log_filter(f: np.ndarray, sigma: float, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Laplacian of Gaussian of ``f`` over ``axes`` with the zero-sum kernels of :func:`_log_kernels` (edges:
    nearest)."""
    g, d2 = _log_kernels(sigma)
    ay, ax = axes
    out = ndi.correlate1d(ndi.correlate1d(f, d2, axis=ay, mode="nearest"), g, axis=ax, mode="nearest")
    out += ndi.correlate1d(ndi.correlate1d(f, g, axis=ay, mode="nearest"), d2, axis=ax, mode="nearest")
    return out


def _log_gain(sigma: float) -> float:
    """L2 norm of the Laplacian-of-Gaussian kernel: unit white noise has this sigma after filtering."""
    g, d2 = _log_kernels(sigma)
    kernel = np.outer(d2, g) + np.outer(g, d2)
    return float(np.sqrt((kernel ** 2).sum()))


def _nuclei_snr(f: np.ndarray, p: _Params) -> np.ndarray:
    """Blob response (negative Laplacian of Gaussian at the nucleus scale; zero on flat or linear background)
    in units of its noise sigma, so thresholds do not depend on brightness or bleaching."""
    sigma = _log_sigma(p)
    response = _log_filter(f, sigma)
    response *= -1.0
    noise = _pixel_noise(f) * _log_gain(sigma)
    if not noise > 0:
        noise = float(np.std(response)) or 1.0
    response /= noise
    return response


_N_SCALES = 7  # blob-filter scales tried across the diameter range; the middle one is the nominal scale


def _scale_grid(p: _Params) -> np.ndarray:
    """Blob-filter scales (pixels) for diameters spread geometrically over ``nucleus_diameter_um``: d / (2 sqrt 2)
    from the smallest to the largest, the middle one exactly the nominal (geometric-mean) scale."""
    nominal = _nominal_sigma(p)
    lo = max(0.7, p.dmin_px / (2.0 * np.sqrt(2.0)))
    hi = max(lo, p.dmax_px / (2.0 * np.sqrt(2.0)))
    if hi <= lo * (1 + 1e-9):
        return np.array([nominal])
    half = _N_SCALES // 2
    return nominal * (hi / lo) ** (np.arange(-half, half + 1) / (2.0 * half))


_SCALE_PEAKS = 128  # nuclei per frame whose responses choose the scale (evenly spread over those found)


def _scale_profiles(f: np.ndarray, r: np.ndarray, c: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(n, scales): each nucleus's scale-normalised blob response (sigma² times the negative LoG), its largest
    value within about sigma of (r, c), at each scale of ``grid``. Computed on patches around the nuclei only: the
    patches are wide enough that the kernels and the search windows never reach their edges."""
    reach = int(np.ceil(_TRUNCATE * grid.max() + 0.5)) + int(np.ceil(grid.max())) + 1
    prof = np.empty((r.size, grid.size))
    if r.size * (2 * reach + 1) ** 2 > f.size:  # patches would outgrow the frame: filter the frame itself
        for k, sigma in enumerate(grid):
            w = 2 * int(np.ceil(sigma)) + 1
            prof[:, k] = -(sigma * sigma) * ndi.minimum_filter(_log_filter(f, float(sigma)), size=w,
                                                               mode="nearest")[r, c]
        return prof
    padded = np.pad(f, reach, mode="edge")
    offsets = np.arange(-reach, reach + 1)
    patches = padded[(r + reach)[:, None, None] + offsets[None, :, None],
                     (c + reach)[:, None, None] + offsets[None, None, :]]
    for k, sigma in enumerate(grid):
        response = _log_filter(patches, float(sigma), axes=(1, 2))
        w = int(np.ceil(sigma))
        centre = response[:, reach - w:reach + w + 1, reach - w:reach + w + 1]
        prof[:, k] = -(sigma * sigma) * centre.min(axis=(1, 2))
    return prof


def _choose_blob_sigma(frames: Sequence[np.ndarray], p: _Params) -> float:
    """The blob filter's scale (pixels) at which the nuclei of ``frames`` respond most.

    Nuclei are first found at the nominal scale (threshold as in :func:`_nuclei_threshold`, each frame on its
    own, or the manual one; up to ``_SCALE_PEAKS`` of them per frame, evenly spread). At every scale of :func:`_scale_grid`, each
    one's scale-normalised response (:func:`_scale_profiles`) is divided by its own largest over the scales, and
    these profiles are averaged; the scale of the highest average is chosen, or the smallest one next to it whose
    average is within 1% of it (:func:`_pick_scale`). A disc of diameter d answers most at
    d / (2 sqrt 2), so nuclei larger than the nominal diameter (which the nominal scale splits into several
    maxima along their rim) and smaller ones (which it merges with close neighbours) are counted at their own
    scale. The nominal scale when fewer than 3 nuclei are found.
    """
    grid = _scale_grid(p)
    if grid.size == 1:
        return float(grid[0])
    nominal = _nominal_sigma(p)
    at_nominal = replace(p, blob_sigma_px=nominal)
    profiles = []
    for frame in frames:
        f, _ = _clean(frame)
        if float(f.max()) == float(f.min()):
            continue
        snr = _nuclei_snr(f, at_nominal)
        r, c = _local_maxima(snr, 0.0, at_nominal)
        keep = snr[r, c] > _threshold_from_heights(snr[r, c], p)
        r, c = r[keep], c[keep]
        if r.size > _SCALE_PEAKS:
            pick = np.linspace(0, r.size - 1, _SCALE_PEAKS).round().astype(np.intp)
            r, c = r[pick], c[pick]
        if r.size:
            profiles.append(_scale_profiles(f, r, c, grid))
    if not profiles:
        return nominal
    prof = np.concatenate(profiles)
    top = prof.max(axis=1)
    prof = prof[top > 0] / top[top > 0, None]
    if prof.shape[0] < 3:
        return nominal
    return float(grid[_pick_scale(prof.mean(axis=0))])


_SCALE_TOLERANCE = 0.01  # scales whose mean profile is within 1% of the best count as answering equally well


def _pick_scale(mean_profile: np.ndarray) -> int:
    """Index of the scale to count at, from the nuclei's mean normalised profile over the scale grid: the peak is
    broad (neighbouring scales often within 1%), so the smallest scale contiguous with the best that answers within
    ``_SCALE_TOLERANCE`` of it; of scales the nuclei answer equally, the smaller merges fewer close neighbours."""
    k = int(np.argmax(mean_profile))
    floor = (1.0 - _SCALE_TOLERANCE) * mean_profile[k]
    while k > 0 and mean_profile[k - 1] >= floor:
        k -= 1
    return k


def _diameter_used_um(p: _Params) -> float:
    """The nucleus diameter the blob filter's scale corresponds to (µm)."""
    return float(_log_sigma(p) * 2.0 * np.sqrt(2.0) * p.pixel_size_um)


def counting_text(metadata: dict[str, Any]) -> str:
    """How a field's nuclei were counted, from its metadata ('' for other methods or fields not extracted here):
    e.g. "nuclei found at the scale of 9.8 µm nuclei, threshold 13.2 noise sd"."""
    d = metadata.get("nucleus_diameter_used_um")
    if metadata.get("method") != "nuclei" or d is None:
        return ""
    thr = metadata.get("threshold_used")
    return f"nuclei found at the scale of {d:.3g} µm nuclei" + (f", threshold {thr:.3g} noise sd" if thr else "")


def _scale_at_range_end(p: _Params) -> str | None:
    """A warning when the chosen scale is the smallest or largest the diameter range allows (the nuclei may lie
    outside the range: larger ones are split along their rims, smaller crowded ones merged); else None."""
    grid = _scale_grid(p)
    if grid.size == 1 or p.blob_sigma_px is None:
        return None
    lo, hi = p.nucleus_diameter_um
    for end, sigma, which, way in ((lo, grid[0], "smallest", "smaller"), (hi, grid[-1], "largest", "larger")):
        if np.isclose(p.blob_sigma_px, sigma, rtol=1e-9):
            return (f"nuclei were counted at the {which} diameter of the range {lo:g}-{hi:g} µm ({end:g} µm): they "
                    f"may be {way}; check the preview's rings and widen the nucleus diameter range "
                    "(nucleus_diameter_um)")
    return None


def _local_maxima(snr: np.ndarray, floor: float, p: _Params) -> tuple[np.ndarray, np.ndarray]:
    """Integer (rows, cols) of local maxima of ``snr`` above ``floor``, at least ~half a nucleus apart."""
    md = max(1, int(round(0.5 * p.dmin_px)))
    return np.nonzero((snr == ndi.maximum_filter(snr, size=2 * md + 1, mode="nearest")) & (snr > floor))


def _nuclei_peaks(snr: np.ndarray, threshold: float, p: _Params) -> np.ndarray:
    """Local maxima of ``snr`` above ``threshold`` -> (N, 2) subpixel (row, col)."""
    return _refine_peaks(snr, *_local_maxima(snr, threshold, p))


def _refine_peaks(snr: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Parabolic sub-pixel refinement of integer peaks along each axis -> (N, 2) float (row, col)."""
    if r.size == 0:
        return np.zeros((0, 2))
    Y, X = snr.shape
    rows, cols = r.astype(np.float64), c.astype(np.float64)
    # parabolic sub-pixel refinement along each axis (interior peaks)
    for axis, coord in ((0, rows), (1, cols)):
        lim = Y if axis == 0 else X
        idx = r if axis == 0 else c
        inner = (idx > 0) & (idx < lim - 1)
        ri, ci = r[inner], c[inner]
        if axis == 0:
            lo, mid, hi = snr[ri - 1, ci], snr[ri, ci], snr[ri + 1, ci]
        else:
            lo, mid, hi = snr[ri, ci - 1], snr[ri, ci], snr[ri, ci + 1]
        denom = lo - 2 * mid + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(denom < 0, 0.5 * (lo - hi) / denom, 0.0)
        coord[inner] += np.clip(off, -0.5, 0.5)
    return np.column_stack([rows, cols])


def _confluence_texture(f: np.ndarray, p: _Params) -> np.ndarray:
    """Local standard deviation over a ``texture_window_um`` window, divided by the frame's median intensity."""
    w = max(3, int(round(p.texture_window_um / p.pixel_size_um)) | 1)
    scale = float(np.median(f[:: max(1, f.shape[0] // 256), :: max(1, f.shape[1] // 256)]))
    if scale <= 0:
        scale = float(np.mean(np.abs(f))) or 1.0
    g = f / scale
    m = ndi.uniform_filter(g, w, mode="reflect")
    m2 = ndi.uniform_filter(g * g, w, mode="reflect")
    return np.sqrt(np.maximum(m2 - m * m, 0.0))


def _labels_centroids(labels: np.ndarray) -> np.ndarray:
    """(N, 2) centroids (row, col) of the positive labels of an integer image."""
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.mod(lab, 1) == 0):
            raise InputError("method='labels' needs an integer label image (0 = background).")
        lab = lab.astype(np.int64)
    flat = lab.ravel()
    pos = flat > 0
    if not pos.any():
        return np.zeros((0, 2))
    ids, inv = np.unique(flat[pos], return_inverse=True)
    idx = np.flatnonzero(pos)
    n = np.bincount(inv)
    rows = np.bincount(inv, weights=idx // lab.shape[1]) / n
    cols = np.bincount(inv, weights=idx % lab.shape[1]) / n
    return np.column_stack([rows, cols])


def _kde_density(points: np.ndarray, grid: _Grid, valid: np.ndarray, p: _Params) -> np.ndarray:
    """Gaussian kernel density (cells/mm²) averaged over each box, edge-corrected by the valid ROI area."""
    sigma_px = p.kde_sigma_um / p.pixel_size_um
    Y, X = valid.shape
    delta = np.zeros((Y, X), np.float32)
    if len(points):
        ri = np.clip(np.rint(points[:, 0]).astype(np.intp), 0, Y - 1)
        ci = np.clip(np.rint(points[:, 1]).astype(np.intp), 0, X - 1)
        keep = valid[ri, ci]
        np.add.at(delta, (ri[keep], ci[keep]), 1.0)
    num = ndi.gaussian_filter(delta, sigma_px, mode="constant")
    den = ndi.gaussian_filter(valid.astype(np.float32), sigma_px, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        dens_px = np.where(valid & (den > 1e-3), num / den, 0.0)
    px_area_mm2 = (p.pixel_size_um ** 2) * 1e-6
    return grid.box_sum(dens_px) / np.maximum(grid.box_sum(valid), 1) / px_area_mm2


@dataclass
class _FrameResult:
    value: np.ndarray  # (ny, nx) density of this frame (NaN where unobserved)
    points: np.ndarray  # (N, 2) detections in pixel (row, col) (empty for confluence)
    n_bad: int  # NaN/inf pixels masked
    blank: bool  # constant frame


def _measure_frame(frame: np.ndarray, t: int, grid: _Grid, p: _Params, threshold: float | None,
                   points_t: np.ndarray | None = None) -> _FrameResult:
    """One frame -> box values. ``threshold`` is in method units (SNR for nuclei, texture for confluence)."""
    ny, nx = grid.ny, grid.nx
    if p.method == "points":
        pts = points_t if points_t is not None else np.zeros((0, 2))
        bad = None
        f = None
    else:
        f, bad = _clean(frame)
        if f.shape != grid.roi.shape:
            raise InputError(f"Frame {t} has shape {f.shape}, expected {grid.roi.shape}.")
    valid = grid.roi if bad is None else grid.roi & ~bad
    valid_px = grid.box_sum(valid) if bad is not None else grid.roi_px
    constant = f is not None and p.method != "labels" and float(f.max()) == float(f.min())
    pts = np.zeros((0, 2)) if p.method != "points" else pts
    if p.method == "confluence":
        if constant:
            fg = np.zeros(grid.roi_px.shape)
        else:
            tex = _confluence_texture(f, p)
            thr = threshold if threshold is not None else _threshold_value(tex[::4, ::4], p.threshold)
            fg = grid.box_sum((tex > thr) & valid)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = fg / valid_px
    else:
        if p.method == "nuclei" and not constant:
            snr = _nuclei_snr(f, p)
            if threshold is None:  # preview: threshold from this frame's own peak heights (one maxima pass)
                r, c = _local_maxima(snr, 0.0, p)
                keep = snr[r, c] > _threshold_from_heights(snr[r, c], p)
                pts = _refine_peaks(snr, r[keep], c[keep])
            else:
                pts = _nuclei_peaks(snr, threshold, p)
        elif p.method == "labels":
            pts = _labels_centroids(frame)
        if bad is not None and len(pts):
            keep = ~bad[np.clip(np.rint(pts[:, 0]).astype(np.intp), 0, bad.shape[0] - 1),
                        np.clip(np.rint(pts[:, 1]).astype(np.intp), 0, bad.shape[1] - 1)]
            pts = pts[keep]
        if p.estimator == "kde":
            value = _kde_density(pts, grid, valid, p)
        else:
            area_mm2 = valid_px * (p.pixel_size_um ** 2) * 1e-6
            with np.errstate(divide="ignore", invalid="ignore"):
                value = grid.count_points(pts[:, 0], pts[:, 1]) / area_mm2
    value = np.where(grid.mask & (valid_px > 0.5 * grid.roi_px), value, np.nan)
    return _FrameResult(value.reshape(ny, nx), pts, 0 if bad is None else int(bad.sum()), constant)


def _nuclei_threshold(snrs: Sequence[np.ndarray], p: _Params) -> float:
    """Peak threshold in SNR units: Otsu/Li on the local-maximum values of reference frames (noise maxima vs
    nuclei maxima are well separated), never below ``min_snr`` (so empty frames stay empty); a manual threshold
    as given."""
    peaks = [s[_local_maxima(s, 0.0, p)] for s in snrs]
    return _threshold_from_heights(np.concatenate(peaks) if peaks else np.zeros(0), p)


def _threshold_from_heights(values: np.ndarray, p: _Params) -> float:
    """Split peak heights (SNR) into noise maxima and nuclei; see :func:`_nuclei_threshold`. A manual threshold (a
    number) is returned as given."""
    if not isinstance(p.threshold, str):
        return float(p.threshold)
    values = values[values > 0]
    if values.size < 2:
        return p.min_snr
    # noise maxima sit at a few sigma, nuclei at tens: split the two groups on a log scale, then (Otsu) cut
    # at the midpoint of the two groups' mean log heights, far from both
    logs = np.log(np.maximum(values, 1.0))
    cut = _threshold_value(logs, p.threshold)
    if p.threshold == "otsu" and np.isfinite(cut) and (logs > cut).any() and (logs <= cut).any():
        cut = 0.5 * (logs[logs <= cut].mean() + logs[logs > cut].mean())
    return max(p.min_snr, float(np.exp(cut)))


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_stack(stack: Any, allow_unknown_pixel_size: bool) -> tuple[float, list[str]]:
    if not isinstance(stack, Stack):
        raise InputError(f"Expected a napari_binn Stack (use read_stack or Stack(data, pixel_size_um, times_h)); "
                         f"got {type(stack).__name__}.")
    warnings: list[str] = []
    T = stack.n_frames
    if T < _MIN_FRAMES:
        raise InputError(f"The stack has {T} frame(s); density dynamics need at least {_MIN_FRAMES} time points.")
    px = stack.pixel_size_um
    if px is None or not np.isfinite(px) or px <= 0:
        if not allow_unknown_pixel_size:
            raise InputError("The stack's pixel size is unknown: pass pixel_size_um (µm per pixel) to read_stack or "
                             "Stack, or allow_unknown_pixel_size=True to assume 1 µm (densities will be wrong).")
        px = 1.0
        warnings.append("WARNING: pixel size unknown; ASSUMED 1 µm/pixel. Densities (cells/mm²) and box sizes "
                        "are not physical.")
    md = stack.metadata or {}
    if md.get("time_units") == "frames":
        warnings.append("WARNING: frame times unknown; times_h are frame indices, not hours.")
    return float(px), warnings


def _check_not_blank(stack: Stack) -> None:
    """Refuse a stack whose every frame is blank (one value, or NaN/inf only): there is nothing to count. Lazy
    stacks are checked on their first, middle and last frames."""
    T = stack.n_frames
    frames = range(T) if isinstance(stack.data, np.ndarray) else sorted({0, T // 2, T - 1})
    for t in frames:
        frame = stack.frame(t)
        values = frame[np.isfinite(frame)] if np.issubdtype(frame.dtype, np.floating) else frame
        if values.size and values.min() != values.max():
            return
    raise InputError(f"every frame of the stack {stack.name!r} is blank (one value everywhere, or only NaN/inf): "
                     "there are no cells to count; check the file, or choose the channel with the nuclei "
                     "(channel= / --channel)")


def extract_density_job(
    stack: Stack,
    roi: Any = None,
    method: str = "nuclei",
    box_um: float = 50.0,
    *,
    cancel: CancelToken | None = None,
    allow_unknown_pixel_size: bool = False,
    **params: Any,
) -> Generator[Progress, None, DensityField]:
    """Density extraction as a job: yields one :class:`Progress` per frame (``data={'frame': t, 'density': u_t}``)
    and returns the :class:`DensityField`.

    Parameters (all optional, ``**params``)
    ---------------------------------------
    nucleus_diameter_um : (min, max) µm, default (6, 16); a scalar d means (0.75 d, 1.5 d). ``nuclei`` only. The
        blob filter's scale is chosen within this range from the first, middle and last frames (the diameter
        whose scale the detected nuclei answer most, one of 7 spread over the range; (d, d) fixes it), the same
        for every frame, and recorded as ``metadata['nucleus_diameter_used_um']``. Local maxima closer than half
        the smallest diameter are one nucleus.
    threshold : 'otsu' (default) | 'li' | float. Nuclei: minimum peak height of the blob filter in units of the
        frame's noise sigma (SNR); 'otsu'/'li' split the log peak heights of the first, middle and last frames
        into noise and nuclei (Otsu: cut midway between the two groups), never below ``min_snr`` (default 5).
        Confluence: local standard deviation / median intensity, Otsu/Li on the same three frames.
    estimator : 'counts' (default, cells per box / ROI area of the box) or 'kde' (Gaussian kernel density of
        width ``kde_sigma_um``, default 25 µm, averaged over the box). Counting methods only.
    texture_window_um : confluence texture window in µm (default 6).
    points : (N, 3) array of (t, row, col) centroids, for ``method='points'``.
    spatial_sigma : Gaussian smoothing in boxes (mask-aware, default 0). temporal_sigma : in frames (default 0).
    normalise : 'none' (default) | K (a carrying capacity in the method's units) | 'percentile' (K = the
        ``percentile``-th, default 99, of all observed values). When normalised, ``units='u/K'``, ``field.K`` holds
        K and ``metadata['K_units']`` its units.

    Cancel: stops between frames; returns the frames done so far (``metadata['cancelled'] = True``), or raises
    :class:`JobCancelled` when no frame was finished.
    """
    px, warnings = _check_stack(stack, allow_unknown_pixel_size)
    p = _parse_params(method, px, params)
    if method != "points":  # points come with their own coordinates; the stack only gives the grid
        _check_not_blank(stack)
    T, Y, X = stack.shape
    roi_mask, roi_warn = roi_to_mask(roi, (Y, X))
    warnings += roi_warn
    if method == "nuclei" and box_um < p.nucleus_diameter_um[1]:
        raise InputError(f"box_um={box_um:g} µm is smaller than a nucleus (max diameter "
                         f"{p.nucleus_diameter_um[1]:g} µm): use boxes several nuclei wide (e.g. 50 µm).")
    grid = _make_grid(roi_mask, box_um, px)
    pts_by_frame = _split_points(params.get("points"), T) if method == "points" else None

    threshold = None
    if method in ("nuclei", "confluence"):
        ref = sorted({0, T // 2, T - 1})
        if method == "nuclei":
            p = replace(p, blob_sigma_px=_choose_blob_sigma([stack.data[t] for t in ref], p))
            warnings += [w for w in [_scale_at_range_end(p)] if w]
        maps = []
        for t in ref:
            f, _ = _clean(stack.data[t])
            if float(f.max()) == float(f.min()):
                continue
            maps.append(_nuclei_snr(f, p) if method == "nuclei" else _confluence_texture(f, p)[::2, ::2])
        if method == "nuclei":
            threshold = _nuclei_threshold(maps, p) if maps else float("inf")
        elif not isinstance(p.threshold, str):
            threshold = float(p.threshold)
        else:
            threshold = _threshold_value(np.concatenate([m.ravel() for m in maps]), p.threshold) if maps else np.inf
        del maps

    u = np.full((T, grid.ny, grid.nx), np.nan)
    clock = ProgressClock(T)
    done = 0
    cancelled = False
    bad_frames: list[tuple[int, int]] = []
    blank_frames: list[int] = []
    for t in range(T):
        if is_cancelled(cancel):
            cancelled = True
            break
        frame = None if method == "points" else stack.data[t]
        res = _measure_frame(frame, t, grid, p, threshold, None if pts_by_frame is None else pts_by_frame[t])
        u[t] = res.value
        if res.n_bad:
            bad_frames.append((t, res.n_bad))
        if res.blank:
            blank_frames.append(t)
        done = t + 1
        yield clock.event("density", done, f"frame {done}/{T}: {len(res.points)} cells" if method != "confluence"
                          else f"frame {done}/{T}", frame=t, density=res.value)
    if done == 0:
        raise JobCancelled("Density extraction was cancelled before the first frame finished; nothing to return.")
    u = u[:done]
    if bad_frames:
        warnings.append(f"NaN/inf pixels masked in {len(bad_frames)} frame(s) (frame, pixels): {bad_frames[:10]}; "
                        "boxes with more than half of their ROI pixels bad are NaN.")
    if blank_frames:
        warnings.append(f"{len(blank_frames)} blank (constant) frame(s) {blank_frames[:10]}: density 0 there; "
                        "check the acquisition.")
    units = "fraction" if method == "confluence" else _COUNT_UNITS
    u = _smooth(u, grid.mask, p.spatial_sigma, p.temporal_sigma)
    K = None
    metadata: dict[str, Any] = {}
    if p.normalise != "none":
        obs = u[np.isfinite(u)]
        K = float(np.percentile(obs, p.percentile)) if p.normalise == "percentile" else float(p.normalise)
        if not np.isfinite(K) or K <= 0:
            raise InputError(f"The carrying capacity K={K} is not positive: the observed density is all zero; "
                             "give K explicitly or use normalise='none'.")
        u = u / K
        metadata["K_units"] = units
        metadata["K_source"] = (f"{p.percentile:g}th percentile" if p.normalise == "percentile" else "given")
        units = "u/K"
    metadata.update({
        "method": method,
        "source": stack.name,
        "box_um": grid.b * px,
        "box_um_requested": float(box_um),
        "box_px": grid.b,
        "pixel_size_um": px,
        **{k: v for k, v in (stack.metadata or {}).items() if k in CALIBRATION_KEYS and v},
        "image_shape": (Y, X),
        "roi": "whole image" if roi is None else "mask/polygons",
        "roi_pixels": int(roi_mask.sum()),
        "mask_rule": "box in mask when >= 50% of its area is inside the ROI; values use ROI pixels only",
        "params": _jsonable_params(p),
        "threshold_used": None if threshold is None else float(threshold),
        "nucleus_diameter_used_um": _diameter_used_um(p) if method == "nuclei" else None,
        "warnings": _dedupe(warnings),
        "cancelled": cancelled,
        "frames_done": done,
    })
    return DensityField(u, grid.mask.copy(), grid.x_um, grid.y_um, np.asarray(stack.times_h[:done], float),
                        units, K, metadata)


def extract_density(
    stack: Stack,
    roi: Any = None,
    method: str = "nuclei",
    box_um: float = 50.0,
    *,
    cancel: CancelToken | None = None,
    progress: Callable[[Progress], None] | None = None,
    allow_unknown_pixel_size: bool = False,
    **params: Any,
) -> DensityField:
    """Blocking form of :func:`extract_density_job`: image stack + ROI -> :class:`DensityField`.

    ``box_um``: grid box size in µm (rounded to whole pixels; the size used is ``metadata['box_um']``).
    Units: cells/mm² (``nuclei``, ``labels``, ``points``), fraction in [0, 1] (``confluence``), or ``u/K``.
    ``progress`` receives each :class:`Progress` event. See :func:`extract_density_job` for ``**params``.
    """
    job = extract_density_job(stack, roi, method, box_um, cancel=cancel,
                              allow_unknown_pixel_size=allow_unknown_pixel_size, **params)
    return run_job(job, progress)


@dataclass
class FramePreview:
    """Live feedback for one frame: detections, box densities and the layer transform (µm)."""

    points: np.ndarray  # (N, 2) detected nuclei / centroids, pixel (row, col); empty for confluence
    density: np.ndarray  # (Ny, Nx) box values (NaN outside the mask)
    mask: np.ndarray  # (Ny, Nx) bool
    scale: tuple[float, float]  # napari scale of the density layer, µm
    translate: tuple[float, float]  # napari translate of the density layer, µm
    units: str = _COUNT_UNITS
    nucleus_diameter_um: float | None = None  # nuclei: the diameter the blob filter's scale was chosen for
    notes: list[str] = dc_field(default_factory=list)  # e.g. the scale chosen at an end of the diameter range


def preview_frame(
    stack_or_frame: Any,
    t: int = 0,
    roi: Any = None,
    method: str = "nuclei",
    box_um: float = 50.0,
    *,
    pixel_size_um: float | None = None,
    allow_unknown_pixel_size: bool = False,
    **params: Any,
) -> FramePreview:
    """Density of one frame (a Stack's frame ``t`` or a 2D array), for interactive parameter tuning.

    Thresholds come from this frame alone, so they can differ slightly from a full run's pooled threshold.
    ``pixel_size_um`` is required for a bare 2D frame (or a Stack without one) unless
    ``allow_unknown_pixel_size``. Smoothing and normalisation parameters are ignored here.
    """
    if isinstance(stack_or_frame, Stack):
        if not 0 <= t < stack_or_frame.n_frames:
            raise InputError(f"Frame index {t} is outside 0..{stack_or_frame.n_frames - 1}.")
        frame = stack_or_frame.data[t]
        px = pixel_size_um or stack_or_frame.pixel_size_um
    else:
        frame = stack_or_frame
        px = pixel_size_um
    if px is None:
        if not allow_unknown_pixel_size:
            raise InputError("Pixel size unknown: pass pixel_size_um (µm per pixel).")
        px = 1.0
    p = _parse_params(method, float(px), {k: v for k, v in params.items() if k not in ("spatial_sigma",
                                                                                     "temporal_sigma")})
    frame_arr = np.asarray(frame)
    if frame_arr.ndim != 2:
        raise InputError(f"preview_frame needs a 2D frame; got shape {frame_arr.shape}.")
    roi_mask, _ = roi_to_mask(roi, frame_arr.shape)
    if method == "nuclei" and box_um < p.nucleus_diameter_um[1]:
        raise InputError(f"box_um={box_um:g} µm is smaller than a nucleus (max diameter "
                         f"{p.nucleus_diameter_um[1]:g} µm).")
    grid = _make_grid(roi_mask, box_um, float(px))
    pts_t = None
    if method == "points":
        pts_t = _split_points(params.get("points"), t + 1)[t]
    threshold = None if isinstance(p.threshold, str) else float(p.threshold)
    notes: list[str] = []
    if method == "nuclei":
        p = replace(p, blob_sigma_px=_choose_blob_sigma([frame_arr], p))
        notes = [w for w in [_scale_at_range_end(p)] if w]
    res = _measure_frame(frame_arr, t, grid, p, threshold, pts_t)
    points = np.asarray(res.points, float).reshape(-1, 2)
    if points.size:  # show only the detections that count: inside the ROI
        r = np.clip(np.rint(points[:, 0]).astype(int), 0, roi_mask.shape[0] - 1)
        c = np.clip(np.rint(points[:, 1]).astype(int), 0, roi_mask.shape[1] - 1)
        points = points[roi_mask[r, c]]
    dx = grid.b * float(px)
    return FramePreview(points, res.value, grid.mask.copy(), (dx, dx),
                        (float(grid.y_um[0]), float(grid.x_um[0])),
                        "fraction" if method == "confluence" else _COUNT_UNITS,
                        _diameter_used_um(p) if method == "nuclei" else None, notes)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _split_points(points: Any, T: int) -> list[np.ndarray]:
    if points is None:
        raise InputError("method='points' needs points=(N, 3) array of (t, row, col) centroids in pixels.")
    pts = np.asarray(points, float)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points must be an (N, 3) array of (t, row, col); got shape {pts.shape}.")
    if not np.all(np.isfinite(pts)):
        raise InputError("points contain NaN or infinite coordinates.")
    ti = np.rint(pts[:, 0]).astype(np.intp)
    return [pts[ti == t, 1:] for t in range(T)]


def _smooth(u: np.ndarray, mask: np.ndarray, spatial_sigma: float, temporal_sigma: float) -> np.ndarray:
    """Mask- and NaN-aware Gaussian smoothing (normalised convolution); unobserved boxes stay NaN."""
    if spatial_sigma <= 0 and temporal_sigma <= 0:
        return u
    obs = np.isfinite(u) & mask[None]
    w = obs.astype(np.float64)
    num = np.where(obs, u, 0.0)
    sig = (temporal_sigma, spatial_sigma, spatial_sigma)
    num = ndi.gaussian_filter(num, sig, mode="nearest")
    den = ndi.gaussian_filter(w, sig, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(obs, out, np.nan)


def _jsonable_params(p: _Params) -> dict[str, Any]:
    return {
        "nucleus_diameter_um": list(p.nucleus_diameter_um),
        "threshold": p.threshold if isinstance(p.threshold, str) else float(p.threshold),
        "min_snr": p.min_snr,
        "estimator": p.estimator,
        "kde_sigma_um": p.kde_sigma_um,
        "texture_window_um": p.texture_window_um,
        "spatial_sigma_boxes": p.spatial_sigma,
        "temporal_sigma_frames": p.temporal_sigma,
        "normalise": p.normalise if isinstance(p.normalise, str) else float(p.normalise),
        "percentile": p.percentile,
    }


def _dedupe(items: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        seen.setdefault(it, None)
    return list(seen)
