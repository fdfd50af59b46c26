"""Regions of interest: read from files or from napari-style shapes, and rasterised onto an image.

An ROI, as :func:`napari_binn.density.extract_density` takes it, is None (the whole image), a boolean mask (Y, X),
one polygon (N, 2) of (row, col) vertices in pixels, or a list of polygons and/or masks (their union).

- :func:`read_roi`: a mask image (TIFF/PNG), polygons in JSON, or a CSV of vertices (napari's Shapes export with
  its shape types, or plain row, col columns) -> an ROI. The command line uses it.
- :func:`shapes_to_roi`: shapes as a napari Shapes layer holds them (one vertex array and one shape type per shape)
  -> ROI polygons in image pixels; ellipses become polygons, lines and paths (no area) are left out with a note.
  The napari docks pass a layer's ``data`` and ``shape_type`` (no napari import here).
- :func:`roi_to_mask`: an ROI -> the (Y, X) pixel mask the density is measured in.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from .errors import InputError

__all__ = ["read_roi", "shapes_to_roi", "closed_shapes", "ellipse_polygon", "roi_to_mask", "CLOSED_SHAPES"]

#: napari shape types that enclose an area (lines and paths do not).
CLOSED_SHAPES = ("rectangle", "polygon", "ellipse")


def closed_shapes(shape_types: Sequence[str]) -> list[int]:
    """Indices of the shapes that enclose an area (every type but 'line' and 'path')."""
    return [i for i, kind in enumerate(shape_types) if kind not in ("line", "path")]


def ellipse_polygon(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """Polygon (n, 2) of an axis-aligned or rotated ellipse given by napari's 4 bounding-box corners (row, col)."""
    corners = np.asarray(corners, dtype=float)
    c = corners.mean(0)
    a = (corners[1] - corners[0]) / 2.0
    b = (corners[3] - corners[0]) / 2.0
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return c + np.cos(ang) * a + np.sin(ang) * b


def shapes_to_roi(data: Sequence[Any], shape_types: Sequence[str], *, only: Any = None,
                  scale: Sequence[float] = (1.0, 1.0), offset: Sequence[float] = (0.0, 0.0),
                  ) -> tuple[list[np.ndarray] | None, list[str]]:
    """ROI polygons in image pixels (row, col) from napari-style shapes; returns (polygons, notes).

    data: one (N, D) vertex array per shape whose last two columns are (row, col) in the shapes' coordinates,
    mapped to pixels as ``vertex * scale + offset``. shape_types: one per shape: 'rectangle', 'polygon',
    'ellipse' (its 4 bounding-box corners, as napari stores it) or 'line' / 'path' (no area: left out, with a
    note). only: indices of the shapes to use (default all). (None, notes) when no closed shape remains: the
    whole image is analysed.
    """
    if len(data) != len(shape_types):
        raise InputError(f"{len(data)} shapes but {len(shape_types)} shape types")
    scale, offset = np.asarray(scale, float), np.asarray(offset, float)
    keep = set(range(len(data))) if only is None else {int(i) for i in only}
    polys: list[np.ndarray] = []
    notes: list[str] = []
    for i, (verts, kind) in enumerate(zip(data, shape_types)):
        if i not in keep:
            continue
        v = np.asarray(verts, float)[:, -2:]
        if kind in ("line", "path"):
            notes.append(f"a {kind} encloses no area and was ignored")
            continue
        if kind not in CLOSED_SHAPES:
            raise InputError(f"shape {i + 1} has an unknown shape type {kind!r}; use one of {', '.join(CLOSED_SHAPES)}")
        if kind == "ellipse":
            v = ellipse_polygon(v)
        polys.append(v * scale + offset)
    if not polys:
        return None, notes + ["no closed shape in the ROI: the whole image is analysed"]
    return polys, notes


def read_roi(path: str | Path) -> Any:
    """An ROI from a file: a mask image (TIFF/PNG; nonzero = inside), polygons in JSON (``[[[row, col], ...], ...]``
    in pixels, or ``{"polygons": [...]}``), or a CSV of vertices: napari's Shapes export (columns index,
    shape-type, vertex-index, axis-0, axis-1[, axis-2]; rectangles, polygons and ellipses) or two columns row, col
    (one polygon). Lines and paths enclose no area: a file with one is refused (ValueError naming it)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"ROI file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff", ".png"):
        return _read_mask(path, suffix)
    if suffix == ".json":
        return _read_json_polygons(path)
    if suffix == ".csv":
        try:
            return _read_csv(path)
        except (IndexError, ValueError, UnicodeDecodeError, csv.Error) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"ROI file {path} is not a vertex table napari-binn reads ({exc}): export the Shapes "
                             "layer from napari (File > Save Selected Layer > .csv), or write two columns row, col",
                             file=path) from None
    raise InputError(f"ROI file {path}: use a mask image (.tif/.png), polygons (.json) or vertices (.csv)", file=path)


def _read_mask(path: Path, suffix: str) -> np.ndarray:
    import tifffile
    from PIL import Image, UnidentifiedImageError

    try:
        mask = tifffile.imread(path) if suffix.startswith(".tif") else np.asarray(Image.open(path))
    except (OSError, ValueError, IndexError, UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise InputError(f"ROI mask {path} cannot be read as an image ({type(exc).__name__}: {exc}): save the mask "
                         "again as a TIFF or PNG (nonzero = inside)", file=path) from None
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=0) if mask.shape[0] < mask.shape[-1] else mask.max(axis=-1)
    if mask.ndim != 2:
        raise InputError(f"ROI mask {path} has shape {mask.shape}; a mask is one 2D image (nonzero = inside)",
                         file=path)
    return mask != 0


_JSON_FORM = 'a list of polygons [[[row, col], ...], ...] in pixels, or {"polygons": [...]}'


def _read_json_polygons(path: Path) -> list[np.ndarray]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"ROI file {path} is not valid JSON ({exc}); it must hold {_JSON_FORM}", file=path) from None
    if isinstance(data, dict):
        if "polygons" not in data:
            raise InputError(f"ROI file {path} has keys {sorted(data)} but no 'polygons'; it must hold {_JSON_FORM}",
                             file=path, key="polygons")
        data = data["polygons"]
    if not isinstance(data, list):
        raise InputError(f"ROI file {path} holds {type(data).__name__}; it must hold {_JSON_FORM}", file=path)
    try:
        arrays = [np.asarray(p, dtype=float) for p in data]
        if arrays and arrays[0].ndim == 1:
            arrays = [np.asarray(data, dtype=float)]
    except (TypeError, ValueError) as exc:
        raise InputError(f"ROI file {path}: the polygons are not lists of numbers ({exc}); it must hold {_JSON_FORM}",
                         file=path) from None
    return arrays


def roi_to_mask(roi: Any, image_shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """Rasterise an ROI to a (Y, X) boolean pixel mask; returns (mask, warnings).

    ``roi``: None (whole image), a boolean mask (Y, X), one polygon (N, 2) of (row, col) vertices in pixels
    (napari order; extra leading columns such as time are ignored), or a list of polygons and/or masks (union).
    A pixel is inside a polygon when its centre is.
    """
    from skimage.draw import polygon2mask

    shape = tuple(int(s) for s in image_shape)
    warnings: list[str] = []
    if roi is None:
        return np.ones(shape, bool), warnings
    if isinstance(roi, np.ndarray) and (roi.dtype == bool or roi.shape == shape):
        parts = [roi]
    elif isinstance(roi, np.ndarray) and roi.ndim == 2:
        parts = [roi]
    elif isinstance(roi, (list, tuple)):
        if len(roi) == 0:
            raise InputError("The ROI is empty (an empty list of shapes): draw a region or pass roi=None.")
        parts = [np.asarray(p) for p in roi]
    else:
        raise InputError(f"Unsupported ROI of type {type(roi).__name__}: pass a boolean mask (Y, X), "
                         "a polygon (N, 2) of (row, col) pixel vertices, or a list of polygons.")
    mask = np.zeros(shape, bool)
    for part in parts:
        part = np.asarray(part)
        if part.dtype == bool or part.shape == shape:
            if part.shape != shape:
                raise InputError(f"ROI mask shape {part.shape} does not match the image shape {shape}.")
            mask |= part.astype(bool)
            continue
        if part.ndim != 2 or part.shape[1] < 2 or part.shape[0] < 3:
            raise InputError(f"An ROI polygon must be an (N >= 3, 2) array of (row, col) vertices; got shape "
                             f"{part.shape}.")
        verts = np.asarray(part[:, -2:], float)
        if not np.all(np.isfinite(verts)):
            raise InputError("An ROI polygon has NaN or infinite vertices.")
        lo, hi = verts.min(0), verts.max(0)
        if hi[0] < -0.5 or hi[1] < -0.5 or lo[0] > shape[0] - 0.5 or lo[1] > shape[1] - 0.5:
            raise InputError(f"The ROI polygon (rows {lo[0]:.0f}..{hi[0]:.0f}, cols {lo[1]:.0f}..{hi[1]:.0f}) "
                             f"lies outside the image ({shape[0]} x {shape[1]} pixels): draw it on the image.")
        crossing = _self_crossing(verts)
        if crossing is not None:
            i, j = crossing
            raise InputError(f"The ROI polygon crosses itself (its edges from vertex {i} and from vertex {j} "
                             "intersect): draw it again without crossing lines, or split it into several shapes.")
        if lo[0] < -0.5 or lo[1] < -0.5 or hi[0] > shape[0] - 0.5 or hi[1] > shape[1] - 0.5:
            warnings.append("The ROI extends beyond the image; it was clipped to the image.")
        mask |= polygon2mask(shape, verts)
    if not mask.any():
        raise InputError("The ROI is empty (it contains no pixel centre): draw a larger region or pass roi=None.")
    return mask, warnings


def _self_crossing(verts: np.ndarray) -> tuple[int, int] | None:
    """The first two non-adjacent edges of the closed polygon ``verts`` that properly cross, or None."""
    a = verts
    b = np.roll(verts, -1, axis=0)
    n = len(a)
    if n < 4:
        return None

    def orient(p, q, r):
        cross = (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        return np.sign(cross)

    for i in range(n - 2):
        j = np.arange(i + 2, n if i > 0 else n - 1)  # skip the edge itself and its neighbours
        if j.size == 0:
            continue
        o1, o2 = orient(a[i], b[i], a[j]), orient(a[i], b[i], b[j])
        o3, o4 = orient(a[j], b[j], a[i]), orient(a[j], b[j], b[i])
        hit = (o1 * o2 < 0) & (o3 * o4 < 0)
        if hit.any():
            return i, int(j[np.argmax(hit)])
    return None


def _read_csv(path: Path) -> list[np.ndarray]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise InputError(f"ROI file {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    if "axis-0" not in header:  # two columns: one polygon of (row, col) vertices
        start = 0 if _is_number(rows[0][0]) else 1
        return [np.asarray([[float(r[0]), float(r[1])] for r in rows[start:]], dtype=float)]
    index = header.index("index")
    kind = header.index("shape-type") if "shape-type" in header else None
    axes = [i for i, h in enumerate(header) if h.startswith("axis-")]
    ycol, xcol = axes[-2], axes[-1]  # the last two axes are (row, col)
    shapes: dict[str, list[tuple[float, float]]] = {}
    types: dict[str, str] = {}
    for r in rows[1:]:
        shapes.setdefault(r[index], []).append((float(r[ycol]), float(r[xcol])))
        types.setdefault(r[index], r[kind].strip().lower() if kind is not None else "polygon")
    shape_types = list(types.values())
    for number, t in enumerate(shape_types, start=1):
        if t in ("line", "path"):
            raise InputError(f"ROI file {path}: shape {number} is a {t}, which encloses no area; remove it or draw a "
                             "rectangle, polygon or ellipse")
    polys, _ = shapes_to_roi([np.asarray(v) for v in shapes.values()], shape_types)
    return polys


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
