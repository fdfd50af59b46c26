"""Reading and writing time-lapse stacks (TIFF, OME-TIFF, ImageJ hyperstacks, folders of frames).

``read_stack`` turns any of these into a single-channel ``(T, Y, X)`` :class:`Stack` with its calibration
(pixel size in µm, frame times in hours). Large files are opened lazily (memory map, else tifffile's zarr
store) so that ``stack.data[t]`` reads one frame. Everything the reader decided (channel, projection, where
the calibration came from) and every problem it found is recorded in ``stack.metadata``.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from .errors import InputError

__all__ = [
    "LAZY_THRESHOLD_MB",
    "Stack",
    "StackWarning",
    "load_scratch_phase_contrast",
    "read_stack",
    "write_stack_tiff",
]

#: Stacks whose decoded size exceeds this many MiB are opened lazily by default (see ``read_stack(lazy=)``).
LAZY_THRESHOLD_MB = 128.0

_TIFF_SUFFIXES = (".tif", ".tiff")
_FRAME_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_REC709 = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
_TIMES_KEY = "napari_binn_times_h="
_AXIS_NAMES = {"T": "time", "C": "channel", "Z": "depth", "S": "RGB samples", "Y": "y", "X": "x"}


class StackWarning(UserWarning):
    """A problem with a stack that does not stop reading it (also recorded in ``metadata['warnings']``)."""


@dataclass
class Stack:
    """A single-channel time-lapse image stack with its physical calibration.

    Attributes
    ----------
    data : array-like (T, Y, X)
        Frames; may be lazy (a memory map or zarr array): index one frame at a time with ``data[t]``.
    pixel_size_um : float or None
        Pixel size in µm; None when unknown (downstream steps refuse to guess unless told).
    times_h : (T,) float64
        Frame times in hours (regular or not). When the file has no frame interval and none was given these are
        frame indices and ``metadata['time_units'] == 'frames'``.
    name : str
        Display name (file stem).
    metadata : dict
        Source path, channel chosen, warnings, raw calibration found in the file.
    """

    data: Any
    pixel_size_um: float | None
    times_h: np.ndarray
    name: str = "stack"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.times_h = np.asarray(self.times_h, dtype=np.float64)
        shape = tuple(self.data.shape)
        if len(shape) != 3:
            raise InputError(f"Stack.data must be (T, Y, X); got shape {shape}")
        if 0 in shape:
            raise InputError(f"the stack is empty (shape {shape}): it needs frames of at least one pixel")
        if self.times_h.shape != (shape[0],):
            raise InputError(f"{self.times_h.size} frame times for {shape[0]} frames")
        if not np.all(np.isfinite(self.times_h)):
            raise InputError("frame times (times_h) must be finite numbers of hours")
        px = self.pixel_size_um
        if px is not None and not (isinstance(px, (int, float, np.number)) and np.isfinite(px) and px > 0):
            raise InputError(f"pixel_size_um must be a positive number of micrometres (or None if unknown); got {px!r}",
                             key="pixel_size_um")
        if shape[0] > 1 and not np.all(np.diff(self.times_h) > 0):
            raise InputError("frame times must be strictly increasing")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def n_frames(self) -> int:
        return int(self.data.shape[0])

    @property
    def frame_interval_h(self) -> float | None:
        """The frame interval in hours when the frames are evenly spaced, else None."""
        if self.times_h.size < 2:
            return None
        d = np.diff(self.times_h)
        return float(d[0]) if np.allclose(d, d[0], rtol=1e-6) else None

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t`` as an in-memory array (reads only that frame of a lazy stack)."""
        return np.asarray(self.data[t])

    def __repr__(self) -> str:
        T, Y, X = self.shape
        px = f"{self.pixel_size_um:g} µm/px" if self.pixel_size_um else "pixel size unknown"
        unit = "frames" if self.metadata.get("time_units") == "frames" else "h"
        return f"Stack({self.name!r}, {T} frames of {Y}x{X}, {px}, t {self.times_h[0]:g}-{self.times_h[-1]:g} {unit})"


# ----------------------------------------------------------------------------------------------------------------
# Lazy frame arrays


class _FrameArray:
    """Read-only array-like of shape (T, ...) that materialises one frame at a time via ``_read(t)``."""

    def __init__(self, n_frames: int, frame_shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = (int(n_frames), *map(int, frame_shape))
        self.dtype = np.dtype(dtype)

    def _read(self, t: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:i] + fill + key[i + 1 :]
        if not key:
            key = (slice(None),)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            t = int(first)
            if not -self.shape[0] <= t < self.shape[0]:
                raise IndexError(f"frame {t} out of range for {self.shape[0]} frames")
            return self._read(t % self.shape[0])[rest]
        ts = np.arange(self.shape[0])[first]
        frames = [self._read(int(t)) for t in np.atleast_1d(ts)]
        out = np.stack(frames) if frames else np.empty((0, *self.shape[1:]), self.dtype)
        return out[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} shape={self.shape} dtype={self.dtype} (reads frame by frame)>"


class _ConvertedFrames(_FrameArray):
    """(T, Y, X) frames computed on demand (channel choice, luminance, projection) from a lazy source."""

    def __init__(self, read_frame: Callable[[int], np.ndarray], n_frames: int, frame0: np.ndarray) -> None:
        super().__init__(n_frames, frame0.shape, frame0.dtype)
        self._read_frame = read_frame

    def _read(self, t: int) -> np.ndarray:
        return self._read_frame(t)


class _FileFrames(_FrameArray):
    """One frame per image file (TIFF/PNG/JPEG); shape (T, Y, X) or (T, Y, X, S)."""

    def __init__(self, files: Sequence[Path], frame0: np.ndarray) -> None:
        super().__init__(len(files), frame0.shape, frame0.dtype)
        self.files = list(files)

    def _read(self, t: int) -> np.ndarray:
        frame = _read_frame_file(self.files[t])
        if frame.shape != self.shape[1:]:
            raise InputError(
                f"{self.files[t]}: frame shape {frame.shape} differs from the first frame's {self.shape[1:]}; "
                "all frames of a time-lapse must have the same size and colour mode."
            )
        return frame.astype(self.dtype, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# Units and calibration


def _length_um(unit: str | None) -> float | None:
    """Micrometres per ``unit``; None when the unit is missing or means 'pixel'."""
    if unit is None:
        return None
    u = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").replace("μ", "µ").lower()
    table = {
        "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
        "micrometers": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "å": 1e-4, "angstrom": 1e-4,
        "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6,
    }  # fmt: skip
    return table.get(u)


def _time_h(unit: str | None, default: str = "s") -> float | None:
    """Hours per time ``unit`` (None if unknown)."""
    u = (str(unit).strip().lower() if unit else default).rstrip(".")
    table = {
        "ms": 1 / 3.6e6, "s": 1 / 3600, "sec": 1 / 3600, "second": 1 / 3600, "seconds": 1 / 3600,
        "min": 1 / 60, "mins": 1 / 60, "minute": 1 / 60, "minutes": 1 / 60, "h": 1.0, "hr": 1.0, "hrs": 1.0,
        "hour": 1.0, "hours": 1.0, "d": 24.0, "day": 24.0, "days": 24.0,
    }  # fmt: skip
    return table.get(u)


@dataclass
class _Calibration:
    """Calibration found in a file (all optional)."""

    pixel_size_um: float | None = None
    pixel_source: str = ""
    times_h: np.ndarray | None = None
    frame_interval_h: float | None = None
    time_source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _round_rational(value: float) -> float:
    """Round a size computed from a TIFF rational to 9 significant digits (the tag's own precision)."""
    return float(f"{value:.9g}")


def _resolution(page: Any, tag: str) -> float | None:
    """Pixels per resolution unit from an X/YResolution tag, or None."""
    t = page.tags.get(tag)
    if t is None:
        return None
    value = t.value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    return float(num) / float(den) if num and den else None


def _ome_calibration(xml: str, cal: _Calibration) -> None:
    root = ET.fromstring(xml)
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return
    a = pixels.attrib
    cal.raw.update({k: v for k, v in a.items() if k.startswith(("PhysicalSize", "TimeIncrement"))})
    if "PhysicalSizeX" in a:
        scale = _length_um(a.get("PhysicalSizeXUnit", "µm"))
        if scale is None:
            cal.warnings.append(f"OME PhysicalSizeX unit {a.get('PhysicalSizeXUnit')!r} is not a length; ignored.")
        else:
            cal.pixel_size_um = float(a["PhysicalSizeX"]) * scale
            cal.pixel_source = f"OME metadata (PhysicalSizeX={a['PhysicalSizeX']} {a.get('PhysicalSizeXUnit', 'µm')})"
            if "PhysicalSizeY" in a:
                sy = _length_um(a.get("PhysicalSizeYUnit", "µm"))
                if sy and not np.isclose(float(a["PhysicalSizeY"]) * sy, cal.pixel_size_um, rtol=1e-3):
                    cal.warnings.append(
                        f"non-square pixels (PhysicalSizeX={a['PhysicalSizeX']}, Y={a['PhysicalSizeY']}); "
                        "using the X size for both axes."
                    )
    size_t = int(a.get("SizeT", "1"))
    delta: dict[int, float] = {}
    for plane in pixels:
        if plane.tag.rsplit("}", 1)[-1] != "Plane" or "DeltaT" not in plane.attrib:
            continue
        p = plane.attrib
        if int(p.get("TheZ", 0)) == 0 and int(p.get("TheC", 0)) == 0:
            scale = _time_h(p.get("DeltaTUnit"), "s")
            if scale is not None:
                delta[int(p.get("TheT", 0))] = float(p["DeltaT"]) * scale
    if delta and len(delta) == size_t and size_t > 1:
        times = np.array([delta[t] for t in sorted(delta)])
        if np.all(np.diff(times) > 0):
            cal.times_h = times
            cal.time_source = "OME metadata (Plane DeltaT)"
            return
        cal.warnings.append("OME Plane DeltaT values are not strictly increasing; ignored.")
    if "TimeIncrement" in a:
        scale = _time_h(a.get("TimeIncrementUnit"), "s")
        value = float(a["TimeIncrement"]) * scale if scale else 0.0
        if value > 0:
            cal.frame_interval_h = value
            cal.time_source = f"OME metadata (TimeIncrement={a['TimeIncrement']} {a.get('TimeIncrementUnit', 's')})"


def _imagej_calibration(ij: dict[str, Any], page: Any, cal: _Calibration) -> None:
    keep = ("unit", "spacing", "finterval", "tunit", "frames", "slices", "channels")
    cal.raw.update({k: ij[k] for k in keep if k in ij})
    info = str(ij.get("Info", ""))
    xres = _resolution(page, "XResolution")
    scale = _length_um(ij.get("unit"))
    if xres is not None:
        cal.raw["XResolution_px_per_unit"] = xres
    if scale is not None and xres:
        cal.pixel_size_um = _round_rational(scale / xres)
        cal.pixel_source = f"ImageJ metadata (XResolution {xres:g} px per {ij.get('unit')})"
        yres = _resolution(page, "YResolution")
        if yres and not np.isclose(yres, xres, rtol=1e-3):
            cal.warnings.append("non-square pixels (XResolution != YResolution); using the X size for both axes.")
    for line in info.splitlines():
        if line.startswith(_TIMES_KEY):
            times = np.array([float(v) for v in line[len(_TIMES_KEY) :].split(",") if v.strip()])
            if times.size > 1 and np.all(np.diff(times) > 0):
                cal.times_h = times
                cal.time_source = "ImageJ Info (frame times written by napari-binn)"
                return
    finterval = float(ij.get("finterval", 0) or 0)
    tscale = _time_h(ij.get("tunit"), "sec")
    if finterval > 0 and tscale:
        cal.frame_interval_h = finterval * tscale
        cal.time_source = f"ImageJ metadata (finterval={finterval:g} {ij.get('tunit', 'sec')})"


def _tiff_calibration(tif: Any) -> _Calibration:
    """Pixel size and frame times from OME, ImageJ or plain TIFF resolution tags."""
    cal = _Calibration()
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        try:
            _ome_calibration(tif.ome_metadata, cal)
        except (ET.ParseError, ValueError) as exc:
            cal.warnings.append(f"OME metadata could not be parsed ({exc}); calibration ignored.")
        return cal
    if tif.is_imagej and tif.imagej_metadata is not None:
        _imagej_calibration(tif.imagej_metadata, page, cal)
        return cal
    xres = _resolution(page, "XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2
    per_unit_um = {3: 1e4, 4: 1e3, 5: 1.0}.get(unit)  # centimetre, millimetre, micrometre
    if xres:
        cal.raw.update(XResolution=xres, ResolutionUnit=unit)
        if per_unit_um is not None:
            cal.pixel_size_um = _round_rational(per_unit_um / xres)
            cal.pixel_source = f"TIFF resolution tags ({xres:g} px per {({3: 'cm', 4: 'mm', 5: 'µm'})[unit]})"
        else:
            cal.raw["ignored"] = "resolution in dots per inch or unitless: not a microscope calibration"
    return cal


# ----------------------------------------------------------------------------------------------------------------
# Opening files


@dataclass
class _Source:
    """A raw array-like with its axes letters (tifffile convention) and calibration."""

    array: Any
    axes: str
    calibration: _Calibration
    lazy: bool
    backend: str


def _natural_key(path: Path) -> list[Any]:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", path.name)]


def _threshold_bytes() -> float:
    return LAZY_THRESHOLD_MB * 2**20


def _corrupt(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path}: cannot read the image data ({type(exc).__name__}: {exc}). The file looks truncated or corrupt: "
        "copy or export it again (e.g. re-save from Fiji as TIFF) and retry."
    )


def _open_tiff(path: Path, lazy: bool | None) -> _Source:
    import tifffile

    with _TifffileErrors() as logged:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # noqa: BLE001 - any parser failure means an unreadable file
            raise InputError(
                f"{path}: not a readable TIFF ({exc}). The file may be truncated, corrupt or not a TIFF: "
                "export it again as TIFF (or OME-TIFF) and retry."
            ) from exc
        try:
            series = tif.series[0]
        except Exception as exc:  # noqa: BLE001
            tif.close()
            raise _corrupt(path, exc) from exc
    try:
        axes, shape = series.axes, tuple(series.shape)
        _check_complete(tif, series, logged)
        cal = _tiff_calibration(tif)
        cal.warnings.extend(f"tifffile reported: {m}" for m in logged)
        use_lazy = series.nbytes > _threshold_bytes() if lazy is None else lazy
        if not use_lazy:
            array = series.asarray()
            tif.close()
            return _Source(array, axes, cal, False, "in-memory")
        if series.dataoffset is not None:
            if series.dataoffset + series.nbytes > os.path.getsize(path):
                raise EOFError(f"the file ends before its last frame ({os.path.getsize(path)} bytes)")
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            array = np.memmap(path, dtype=dtype, mode="r", offset=series.dataoffset, shape=shape)
            tif.close()
            return _Source(array, axes, cal, True, "memmap")
        import zarr

        array = zarr.open(series.aszarr(), mode="r")  # the store keeps the file open
        return _Source(array, axes, cal, True, "zarr")
    except ValueError as exc:
        tif.close()
        if str(path) in str(exc):
            raise
        raise _corrupt(path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - decoder/IO errors from a damaged file
        tif.close()
        raise _corrupt(path, exc) from exc


class _TifffileErrors(logging.Handler):
    """Collect the error messages tifffile logs (in this thread) while a file is opened."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logging.getLogger("tifffile").addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self)


def _check_complete(tif: Any, series: Any, logged: list[str]) -> None:
    """Raise if the file is cut short: missing pages or an IFD chain pointing past the end of the file."""
    planes = int(np.prod([n for a, n in zip(series.axes, series.shape) if a not in "YXS"]))
    if tif.is_imagej and tif.imagej_metadata is not None:
        expected = int(tif.imagej_metadata.get("images", planes) or planes)
        if expected > planes:
            raise EOFError(f"ImageJ metadata lists {expected} images but only {planes} could be read")
    broken = [m for m in logged if "invalid page offset" in m or "corrupted" in m]
    if broken:
        raise EOFError("; ".join(broken))


def _read_frame_file(path: Path) -> np.ndarray:
    """One 2D (or 2D RGB) frame from a TIFF/PNG/JPEG file."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            frame = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as img:
                if img.mode in ("P", "1", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
                    img = img.convert("RGB" if img.mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "LAB") else "L")
                frame = np.asarray(img)
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, exc) from exc
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        return frame
    if frame.ndim != 2:
        raise InputError(
            f"{path}: holds an image of shape {frame.shape}, not a single 2D frame. In a folder of frames each "
            "file must be one frame; open a multi-frame file on its own with read_stack(file)."
        )
    return frame


def _open_frames(files: list[Path], lazy: bool | None) -> _Source:
    frame0 = _read_frame_file(files[0])
    shapes = {}
    for f in files[1:]:
        shapes[f] = _frame_size(f)
    for f, size in shapes.items():
        if size is not None and size != frame0.shape[:2]:
            raise InputError(
                f"{f}: frame size {size[1]}x{size[0]} differs from {files[0].name} "
                f"({frame0.shape[1]}x{frame0.shape[0]}); all frames must have the same size."
            )
    frames = _FileFrames(files, frame0)
    axes = "TYXS" if frame0.ndim == 3 else "TYX"
    cal = _Calibration()
    if files[0].suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(files[0]) as tif:
            cal = _tiff_calibration(tif)
        cal.times_h, cal.frame_interval_h = None, None  # per-file time metadata does not describe the sequence
    use_lazy = frames.nbytes > _threshold_bytes() if lazy is None else lazy
    if use_lazy:
        return _Source(frames, axes, cal, True, "files")
    return _Source(frames[:], axes, cal, False, "in-memory")


def _frame_size(path: Path) -> tuple[int, int] | None:
    """(Y, X) of an image file read from its header only (None if it cannot be told cheaply)."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tuple(tif.pages[0].shape[:2])  # type: ignore[return-value]
        from PIL import Image

        with Image.open(path) as img:
            return (img.size[1], img.size[0])
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, exc) from exc


def _resolve(path: Any) -> tuple[list[Path], str, str]:
    """Files to read (naturally sorted), a display name, and a description of where they came from."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise InputError("read_stack: empty list of files; give a file, a folder or a glob pattern.")
        files = sorted((Path(p).expanduser() for p in path), key=_natural_key)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InputError(f"read_stack: file(s) not found: {', '.join(missing[:5])}")
        return files, files[0].parent.name or "stack", f"{len(files)} files in {files[0].parent}"
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _FRAME_SUFFIXES]
        files = [f for f in files if not f.name.startswith(".")]
        if not files:
            raise InputError(
                f"{p}: the folder contains no image frames ({', '.join(_FRAME_SUFFIXES)}); "
                "point read_stack at the folder holding the frames, or at a multi-page TIFF."
            )
        return sorted(files, key=_natural_key), p.name, str(p)
    if p.is_file():
        return [p], _stem(p), str(p)
    if any(c in text for c in "*?["):
        files = [Path(f) for f in glob.glob(os.path.expanduser(text)) if Path(f).is_file()]
        files = [f for f in files if f.suffix.lower() in _FRAME_SUFFIXES]
        if not files:
            raise InputError(
                f"{text}: no image files (.tif/.tiff/.png/.jpg/.jpeg) match this pattern; check the folder and the "
                "pattern (e.g. 'frames/*.tif')."
            )
        files = sorted(files, key=_natural_key)
        return files, files[0].parent.name or "stack", text
    raise InputError(f"{text}: no such file or folder.")


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpeg", ".jpg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


# ----------------------------------------------------------------------------------------------------------------
# Axes: which is time, which channel, what to project


@dataclass
class _Plan:
    time_axis: int
    select: dict[int, int]
    luminance_axis: int | None
    project_axes: tuple[int, ...]
    projection: str | None
    y_axis: int
    x_axis: int
    notes: list[str]
    warnings: list[str]
    channel_record: str
    rgb_axis_auto: int | None = None


def _describe(axes: str, shape: Sequence[int]) -> str:
    return ", ".join(f"{a}={n}" + (f" ({_AXIS_NAMES[a]})" if a in _AXIS_NAMES else "") for a, n in zip(axes, shape))


def _plan_axes(axes: str, shape: Sequence[int], channel: Any, projection: str | None, where: str) -> _Plan:
    desc = _describe(axes, shape)
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{where}: cannot find the image plane (axes {desc}); save the stack as a TIFF with Y and X.")
    y_axis, x_axis = axes.index("Y"), axes.index("X")
    select = {i: 0 for i, (a, n) in enumerate(zip(axes, shape)) if n == 1 and a not in "YX"}
    others = [i for i, (a, n) in enumerate(zip(axes, shape)) if n > 1 and a not in "YX"]
    notes: list[str] = []
    warns: list[str] = []

    time = [i for i in others if axes[i] == "T"]
    if not time:
        time = [i for i in others if axes[i] not in "CS"]
        if time and axes[time[0]] not in "IQ":
            notes.append(f"no time axis in the file; axis {axes[time[0]]} (size {shape[time[0]]}) read as time")
    if not time:
        hint = ""
        if any(axes[i] == "S" and shape[i] in (3, 4) for i in others):
            hint = (
                " It is stored as a single RGB(A) image; if these are 3-4 grey frames, re-save them with "
                "photometric='minisblack' (tifffile) or as an ImageJ stack."
            )
        elif any(axes[i] == "C" for i in others):
            hint = (
                " Its only extra axis is labelled channels; if they are time points, relabel them as frames "
                "(Fiji: Image > Hyperstacks > Re-order Hyperstack) and save again."
            )
        if any(axes[i] == "T" for i in select):
            raise InputError(
                f"{where}: only 1 frame (axes {desc}); napari-binn needs a time-lapse of at least 3 frames."
            )
        raise InputError(
            f"{where}: a single 2D image (axes {desc}) has no time axis. napari-binn needs a time-lapse: a "
            f"multi-page TIFF, an ImageJ/OME hyperstack with T >= 3, or a folder/glob of frames.{hint}"
        )
    t_axis = time[0]
    rest = [i for i in others if i != t_axis]
    chan_axes = [i for i in rest if axes[i] == "C"]
    rgb_axes = [i for i in rest if axes[i] == "S"]
    extra = [i for i in rest if axes[i] not in "CS"]

    luminance_axis = None
    rgb_auto = None
    channel_record = "single channel"
    if channel is not None and not isinstance(channel, (int, np.integer)) and channel != "luminance":
        raise InputError(f"channel must be an integer index or 'luminance'; got {channel!r}")
    if chan_axes:
        c = chan_axes[0]
        if len(chan_axes) > 1:
            raise InputError(f"{where}: several channel axes ({desc}); split the channels in Fiji and retry.")
        if channel is None or channel == "luminance":
            raise InputError(
                f"{where}: the stack has several channels (axes {desc}). Choose one with "
                f"channel=0..{shape[c] - 1} (e.g. the nuclear or phase-contrast channel)."
            )
        _check_index(int(channel), shape[c], where, desc)
        select[c] = int(channel)
        channel_record = f"channel {int(channel)} of {shape[c]} (C axis)"
    for s in rgb_axes:
        if not chan_axes and isinstance(channel, (int, np.integer)):
            _check_index(int(channel), shape[s], where, desc)
            select[s] = int(channel)
            channel_record = f"RGB component {int(channel)} of {shape[s]}"
        elif channel is None and not chan_axes:
            rgb_auto = s
            luminance_axis = s
            channel_record = "luminance (Rec. 709 weights)"
        else:
            luminance_axis = s
            if channel == "luminance":
                channel_record = "luminance (Rec. 709 weights)"
            else:
                warns.append("RGB samples converted to luminance (Rec. 709 weights).")
    if channel is not None and not chan_axes and not rgb_axes:
        notes.append(f"channel={channel!r} ignored: the stack has a single channel")

    if extra:
        if projection not in ("max", "mean"):
            names = ", ".join(f"{axes[i]} (size {shape[i]})" for i in extra)
            raise InputError(
                f"{where}: the stack has more than time, y and x (axes {desc}). Reduce the extra axis {names} "
                "with projection='max' or projection='mean', or pick the data you want in Fiji and save it as T,Y,X."
            )
        notes.append(f"{projection} projection over " + ", ".join(axes[i] for i in extra))
    elif projection is not None:
        if projection not in ("max", "mean"):
            raise InputError(f"projection must be 'max' or 'mean'; got {projection!r}")
        notes.append(f"projection={projection!r} ignored: nothing to project (axes {desc})")
    return _Plan(
        time_axis=t_axis,
        select=select,
        luminance_axis=luminance_axis,
        project_axes=tuple(extra),
        projection=projection if extra else None,
        y_axis=y_axis,
        x_axis=x_axis,
        notes=notes,
        warnings=warns,
        channel_record=channel_record,
        rgb_axis_auto=rgb_auto,
    )


def _check_index(index: int, size: int, where: str, desc: str) -> None:
    if not 0 <= index < size:
        raise InputError(f"{where}: channel={index} out of range; the stack (axes {desc}) has channels 0..{size - 1}.")


def _frame_reader(array: Any, plan: _Plan) -> Callable[[int], np.ndarray]:
    """A function t -> (Y, X) frame applying the plan's selection, luminance and projection."""
    ndim = len(array.shape)

    def read(t: int) -> np.ndarray:
        index: list[Any] = [slice(None)] * ndim
        index[plan.time_axis] = t
        for i, v in plan.select.items():
            index[i] = v
        frame = np.asarray(array[tuple(index)])
        kept = [i for i in range(ndim) if i != plan.time_axis and i not in plan.select]
        if plan.luminance_axis is not None:
            pos = kept.index(plan.luminance_axis)
            frame = np.moveaxis(frame, pos, -1)[..., :3].astype(np.float32) @ _REC709
            kept.remove(plan.luminance_axis)
        if plan.project_axes:
            pos = tuple(kept.index(i) for i in plan.project_axes)
            frame = frame.max(axis=pos) if plan.projection == "max" else frame.mean(axis=pos, dtype=np.float32)
            kept = [i for i in kept if i not in plan.project_axes]
        return frame.T if kept.index(plan.y_axis) > kept.index(plan.x_axis) else frame

    return read


def _build_data(source: _Source, plan: _Plan) -> Any:
    """(T, Y, X) data: a memory-mapped view, a lazy array, or an in-memory array."""
    array = source.array
    n_frames = int(array.shape[plan.time_axis])
    read = _frame_reader(array, plan)
    frame0 = read(0)
    simple = plan.luminance_axis is None and not plan.project_axes
    if simple and isinstance(array, np.ndarray):
        index = tuple(plan.select.get(i, slice(None)) for i in range(array.ndim))
        kept = [i for i in range(array.ndim) if i not in plan.select]
        order = [kept.index(plan.time_axis), kept.index(plan.y_axis), kept.index(plan.x_axis)]
        view = np.transpose(array[index], order)
        return view if source.lazy else np.ascontiguousarray(view)
    if source.lazy:
        if simple and source.backend == "zarr" and array.ndim == 3 and (plan.y_axis, plan.x_axis) == (1, 2):
            return array
        return _ConvertedFrames(read, n_frames, frame0)
    return np.stack([frame0] + [read(t) for t in range(1, n_frames)])


# ----------------------------------------------------------------------------------------------------------------
# Checks on values


def _value_warnings(data: Any, lazy: bool, metadata: dict[str, Any]) -> list[str]:
    """Warnings about NaN/inf pixels and constant (blank) frames."""
    n = int(data.shape[0])
    frames = list(range(n)) if not lazy else sorted({0, n // 2, n - 1})
    if not lazy:
        metadata["value_check"] = "all frames"
    else:
        metadata["value_check"] = f"frames {frames} only (lazy stack: not every frame was scanned)"
    bad_values, constant = [], []
    nonfinite_total = 0
    for t in frames:
        frame = np.asarray(data[t])
        if np.issubdtype(frame.dtype, np.floating):
            finite = np.isfinite(frame)
            count = int(frame.size - np.count_nonzero(finite))
            if count:
                bad_values.append(t)
                nonfinite_total += count
            values = frame[finite]
        else:
            values = frame
        if values.size == 0 or values.min() == values.max():
            constant.append(t)
    out = []
    if bad_values:
        out.append(
            f"{nonfinite_total} NaN/inf pixels in frame(s) {_short(bad_values)}: kept; density extraction treats them "
            "as unobserved."
        )
    if constant:
        out.append(
            f"frame(s) {_short(constant)} are constant (blank?): they carry no density information; check the "
            "acquisition, or drop them and give times_h for the frames you keep."
        )
    return out


def _short(items: list[int], limit: int = 10) -> str:
    text = ", ".join(map(str, items[:limit]))
    return f"{text}, ... ({len(items)} in all)" if len(items) > limit else text


# ----------------------------------------------------------------------------------------------------------------
# Public functions


#: the metadata keys saying where a stack's pixel size and frame times came from (density fields keep them)
CALIBRATION_KEYS = ("pixel_size_source", "times_source")
_GIVEN = {"user": "given", "user (times_h)": "given (times)", "user (frame_interval_h)": "given (frame interval)"}


def calibration_sources(metadata: dict[str, Any] | None) -> list[str]:
    """Where a stack's pixel size and frame times came from, from its metadata (or a density field's, which keeps
    them): e.g. ``['pixel size: from ImageJ metadata (XResolution 0.5 px per um)', 'frame times: given (frame
    interval)']``; empty when not recorded."""
    md = metadata or {}
    return [f"{what}: {_GIVEN.get(md[key], md[key])}"
            for key, what in zip(CALIBRATION_KEYS, ("pixel size", "frame times")) if md.get(key)]


def read_stack(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    pixel_size_um: float | None = None,
    frame_interval_h: float | None = None,
    channel: int | str | None = None,
    times_h: Sequence[float] | None = None,
    projection: str | None = None,
    lazy: bool | None = None,
) -> Stack:
    """Read a time-lapse as a single-channel ``(T, Y, X)`` :class:`Stack` with its calibration.

    Parameters
    ----------
    path
        A multi-page TIFF, ImageJ hyperstack or OME-TIFF; a folder of single frames (TIFF/PNG/JPEG, natural
        order: ``t2`` before ``t10``); a glob pattern such as ``"frames/*.png"``; or a list of frame files.
    pixel_size_um
        Pixel size in µm; overrides the file's calibration. When neither exists, ``pixel_size_um`` is None and a
        warning is recorded (never assumed to be 1 µm).
    frame_interval_h
        Frame interval in hours; overrides the file's. Without it (and without ``times_h`` or file metadata) the
        times are frame indices and ``metadata['time_units'] == 'frames'``.
    channel
        Channel index for multi-channel stacks (C axis) or RGB component; ``'luminance'`` for RGB. RGB without it
        is converted to luminance with a warning (or channel 0 when R = G = B).
    times_h
        Explicit, possibly irregular, frame times in hours (one per frame, strictly increasing).
    projection
        ``'max'`` or ``'mean'`` over extra axes (e.g. Z in a T,Z,Y,X stack).
    lazy
        Open without loading all frames (memory map, else zarr store; frame files read on demand). Default:
        lazy when the decoded stack exceeds ``LAZY_THRESHOLD_MB``.

    Raises
    ------
    ValueError
        Naming the file and the remedy: no time axis, fewer than 3 frames, several channels or Z without
        ``channel``/``projection``, truncated or corrupt files, empty folders, bad arguments.
    """
    if frame_interval_h is not None and times_h is not None:
        raise InputError("give either frame_interval_h or times_h, not both")
    if pixel_size_um is not None and not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise InputError(f"pixel_size_um must be a positive number of micrometres; got {pixel_size_um!r}")
    if frame_interval_h is not None and not (np.isfinite(frame_interval_h) and frame_interval_h > 0):
        raise InputError(f"frame_interval_h must be a positive number of hours; got {frame_interval_h!r}")

    files, name, where = _resolve(path)
    if len(files) == 1:
        f = files[0]
        if f.suffix.lower() in _TIFF_SUFFIXES:
            source = _open_tiff(f, lazy)
        elif f.suffix.lower() in _FRAME_SUFFIXES:
            frame = _read_frame_file(f)
            raise InputError(
                f"{f}: a single 2D image ({'x'.join(map(str, frame.shape))}) has no time axis. Give the folder of "
                "frames or a glob pattern (e.g. 'frames/*.png'), or a multi-page TIFF."
            )
        else:
            raise InputError(
                f"{f}: unsupported file type {f.suffix!r}; read_stack reads TIFF/OME-TIFF stacks and folders of "
                "TIFF/PNG/JPEG frames. Export the movie as TIFF (e.g. with Fiji/Bio-Formats)."
            )
    else:
        source = _open_frames(files, lazy)

    plan = _plan_axes(source.axes, source.array.shape, channel, projection, where)
    if plan.rgb_axis_auto is not None:
        index: list[Any] = [slice(None)] * len(source.array.shape)
        index[plan.time_axis] = 0
        for i, v in plan.select.items():
            index[i] = v
        raw0 = np.asarray(source.array[tuple(index)])
        kept = [i for i in range(len(source.array.shape)) if i != plan.time_axis and i not in plan.select]
        rgb = np.moveaxis(raw0, kept.index(plan.rgb_axis_auto), -1)[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            plan.select[plan.rgb_axis_auto] = 0
            plan.luminance_axis = None
            plan.channel_record = "greyscale stored as RGB (R = G = B in frame 0): channel 0"
        else:
            plan.warnings.append(
                "RGB image converted to luminance (Rec. 709 weights); pass channel=0/1/2 to use one colour "
                "channel instead, or channel='luminance' to silence this warning."
            )
    try:
        data = _build_data(source, plan)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoding errors of a damaged file
        raise _corrupt(files[0], exc) from exc

    n_frames = int(data.shape[0])
    if n_frames < 3:
        raise InputError(
            f"{where}: only {n_frames} frame(s); napari-binn needs a time-lapse of at least 3 frames to learn "
            "dynamics."
        )

    cal = source.calibration
    warn_list: list[str] = list(cal.warnings) + plan.warnings
    metadata: dict[str, Any] = {
        "source": where,
        "axes": _describe(source.axes, source.array.shape),
        "channel": plan.channel_record,
        "projection": plan.projection,
        "lazy": source.lazy,
        "backend": source.backend,
        "file_calibration": dict(cal.raw),
        "notes": list(plan.notes),
    }
    if len(files) > 1:
        metadata["files"] = [str(f) for f in files]

    # pixel size
    if pixel_size_um is not None:
        px: float | None = float(pixel_size_um)
        metadata["pixel_size_source"] = "user"
        if cal.pixel_size_um is not None and not np.isclose(cal.pixel_size_um, px, rtol=1e-3):
            metadata["notes"].append(f"pixel size {cal.pixel_size_um:g} µm from {cal.pixel_source} overridden")
    elif cal.pixel_size_um is not None:
        px = float(cal.pixel_size_um)
        metadata["pixel_size_source"] = f"from {cal.pixel_source}"
    else:
        px = None
        metadata["pixel_size_source"] = "unknown"
        warn_list.append(
            "PIXEL SIZE UNKNOWN: the file has no spatial calibration and none was given. Distances and densities "
            "cannot be expressed in µm (not assumed to be 1 µm); pass pixel_size_um=... (µm per pixel)."
        )

    # frame times
    metadata["time_units"] = "h"
    if times_h is not None:
        times = np.asarray(times_h, dtype=np.float64).ravel()
        if times.shape != (n_frames,):
            raise InputError(f"{where}: times_h has {times.size} values for {n_frames} frames; give one per frame.")
        if not np.all(np.isfinite(times)) or not np.all(np.diff(times) > 0):
            raise InputError(f"{where}: times_h must be finite and strictly increasing (hours).")
        metadata["times_source"] = "user (times_h)"
    elif frame_interval_h is not None:
        times = np.arange(n_frames) * float(frame_interval_h)
        metadata["times_source"] = "user (frame_interval_h)"
    elif cal.times_h is not None and cal.times_h.size == n_frames:
        times = cal.times_h
        metadata["times_source"] = f"from {cal.time_source}"
    elif cal.frame_interval_h is not None:
        times = np.arange(n_frames) * cal.frame_interval_h
        metadata["times_source"] = f"from {cal.time_source}"
    else:
        if cal.times_h is not None:
            warn_list.append(f"{cal.time_source} lists {cal.times_h.size} times for {n_frames} frames; ignored.")
        times = np.arange(n_frames, dtype=np.float64)
        metadata["times_source"] = "unknown"
        metadata["time_units"] = "frames"
        warn_list.append(
            "FRAME INTERVAL UNKNOWN: times are frame indices (units 'frames'), so rates come out per frame, not per "
            "hour; pass frame_interval_h=... or times_h=[...] (hours)."
        )

    warn_list.extend(_value_warnings(data, source.lazy, metadata))
    metadata["warnings"] = warn_list
    for message in warn_list:
        warnings.warn(f"{name}: {message}", StackWarning, stacklevel=2)
    return Stack(data=data, pixel_size_um=px, times_h=times, name=name, metadata=metadata)


def _imagej_dtype(dtype: np.dtype, data: Any) -> np.dtype:
    """The closest dtype ImageJ can open (uint8, uint16, float32)."""
    if dtype in (np.uint8, np.uint16, np.float32):
        return dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(dtype, np.integer) and isinstance(data, np.ndarray) and data.size:
        if data.min() >= 0 and data.max() <= np.iinfo(np.uint16).max:
            return np.dtype(np.uint16)
    return np.dtype(np.float32)


def write_stack_tiff(
    path: str | os.PathLike,
    data: Any,
    pixel_size_um: float | None,
    times_h: Sequence[float] | None,
    *,
    compression: str | None = None,
) -> Path:
    """Write a ``(T, Y, X)`` stack as an ImageJ hyperstack TIFF with its calibration.

    The pixel size (µm) goes into the resolution tags with ``unit=um``; the frame interval into ImageJ's
    ``finterval`` (seconds, the first interval when frames are irregular) and the exact frame times (hours)
    into the ImageJ Info text, which :func:`read_stack` reads back. Data are written as uint8, uint16 or
    float32 (what ImageJ opens; other types are converted). ``data`` may be lazy: frames are written one by one.
    ``compression`` is passed to tifffile (e.g. ``'zlib'``).
    """
    import tifffile

    path = Path(path)
    shape = tuple(int(n) for n in data.shape)
    if len(shape) != 3:
        raise InputError(f"write_stack_tiff: data must be (T, Y, X); got shape {shape}")
    in_memory = isinstance(data, np.ndarray) and not isinstance(data, np.memmap)
    dtype = _imagej_dtype(np.dtype(data.dtype), data if in_memory else None)
    metadata: dict[str, Any] = {"axes": "TYX"}
    kwargs: dict[str, Any] = {}
    if pixel_size_um is not None:
        if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise InputError(f"pixel_size_um must be positive (µm); got {pixel_size_um!r}")
        kwargs["resolution"] = (1.0 / pixel_size_um, 1.0 / pixel_size_um)
        metadata["unit"] = "um"
    if times_h is not None:
        times = np.asarray(times_h, dtype=np.float64).ravel()
        if times.shape != (shape[0],) or (shape[0] > 1 and not np.all(np.diff(times) > 0)):
            raise InputError(f"write_stack_tiff: need {shape[0]} strictly increasing times_h; got {times.size}")
        if shape[0] > 1:
            metadata["finterval"] = float(times[1] - times[0]) * 3600.0
        metadata["Info"] = _TIMES_KEY + ",".join(repr(float(t)) for t in times)
    if in_memory:
        payload: Any = np.ascontiguousarray(data, dtype=dtype)
    else:
        payload = (np.asarray(data[t]).astype(dtype, copy=False) for t in range(shape[0]))
        kwargs.update(shape=shape, dtype=dtype)
    tifffile.imwrite(
        path, payload, imagej=True, photometric="minisblack", metadata=metadata, compression=compression, **kwargs
    )
    return path


def load_scratch_phase_contrast() -> Stack:
    """The shipped real phase-contrast scratch assay: 11 frames of 382x382 px, uint8, at 0..10 h.

    Downsampled 4x (4x4 block mean) from the 1531x1531 originals of the ScratchAnalySEG repository (MIT licence,
    (c) 2024 Daniyar Kakimbekov; see ``data/LICENSE_scratch_phase_contrast.txt`` and ``data/SOURCE.md``). The
    pixel size is not documented, so ``pixel_size_um`` is None (give it to ``read_stack`` if you know it).
    """
    resource = resources.files("napari_binn").joinpath("data", "scratch_phase_contrast.tif")
    with resources.as_file(resource) as file, warnings.catch_warnings():
        warnings.simplefilter("ignore", StackWarning)
        stack = read_stack(file, lazy=False)
    stack.name = "scratch_phase_contrast"
    stack.metadata["attribution"] = (
        "ScratchAnalySEG (github.com/everypidigit/ScratchAnalySEG), MIT licence, (c) 2024 Daniyar Kakimbekov; "
        "downsampled 4x by napari-binn"
    )
    return stack
