"""napari reader contribution for time-lapse stacks (TIFF, OME-TIFF, ImageJ, folders of frames) and for
napari-binn results bundles (a folder with a ``manifest.json``).

No napari or Qt import here: the reader returns plain layer-data tuples built by the GUI-free ``read_stack``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_binn.io import Stack, StackWarning, read_stack

__all__ = ["napari_get_reader", "stack_to_layer_data", "read_bundle_layers", "is_bundle"]

_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

LayerData = tuple[Any, dict[str, Any], str]


def _readable(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        return any(f.suffix.lower() in _SUFFIXES for f in p.iterdir() if f.is_file())
    return p.suffix.lower() in _SUFFIXES


def is_bundle(path: str | os.PathLike) -> bool:
    """True for a folder holding a napari-binn results bundle (``manifest.json`` with the bundle format)."""
    import json

    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == "napari-binn results bundle"
    except (OSError, ValueError):
        return False


def napari_get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]) -> Callable[..., list[LayerData]] | None:
    """Return a reader for a stack file, a folder of frames, a list of frame files or a results bundle folder;
    None if not ours."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir() and is_bundle(paths[0]):
        return read_bundle_layers
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_stack_layers


def read_stack_layers(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerData]:
    """Read a stack as napari image layers.

    A stack that needs a choice opens anyway, with the choice noted in each layer's metadata: one layer per
    channel of a T,C,Y,X stack, a max projection over extra axes (e.g. Z). Other problems raise ValueError.
    """
    target: Any = path if isinstance(path, (str, os.PathLike)) else list(path)
    if isinstance(target, list) and len(target) == 1:
        target = target[0]
    options: dict[str, Any] = {}
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackWarning)  # recorded in the layer metadata instead
        for _ in range(3):
            try:
                stack = read_stack(target, **options)
                break
            except ValueError as exc:
                message = str(exc)
                if "channel=" in message and "channel" not in options:
                    options["channel"] = 0
                elif "projection=" in message and "projection" not in options:
                    options["projection"] = "max"
                else:
                    raise
                notes.append(f"opened by the napari reader with {options}: {message}")
        else:  # pragma: no cover - each retry adds one option, so three tries always settle
            raise ValueError(f"{target}: could not open the stack")
        stacks = [stack]
        while "channel" in options:
            options["channel"] += 1
            try:
                stacks.append(read_stack(target, **options))
            except ValueError as exc:
                if "out of range" not in str(exc):
                    raise
                break
    layers = []
    for s in stacks:
        s.metadata["notes"] = list(s.metadata.get("notes", [])) + notes
        if "channel" in options:
            s.name = f"{s.name} [{s.metadata['channel'].split(' of ')[0]}]"
        layers.append(stack_to_layer_data(s))
    return layers


def stack_to_layer_data(stack: Stack) -> LayerData:
    """napari image layer data for a stack: physical scale (1 frame, µm, µm); 1 per pixel if size unknown.

    The time axis is scaled by 1 (frame index); the frame times in hours are in ``metadata['times_h']``.
    """
    metadata = dict(stack.metadata)
    warn = list(metadata.get("warnings", []))
    px = stack.pixel_size_um
    if px is None:
        warn.append("layer scale is 1 per pixel because the pixel size is unknown (not µm).")
        px = 1.0
    metadata.update(
        warnings=warn,
        pixel_size_um=stack.pixel_size_um,
        times_h=stack.times_h,
        time_units=metadata.get("time_units", "h"),
        napari_binn_stack=True,
    )
    kwargs = {
        "name": stack.name,
        "scale": (1.0, px, px),
        "metadata": metadata,
    }
    return (stack.data, kwargs, "image")


def read_bundle_layers(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerData]:
    """Layers of a results bundle: the density and every simulation, placed in µm over the source image.

    The time axis is scaled by 1 (frame index), as for stacks. Each layer's ``metadata['napari_binn_bundle']``
    holds the bundle path: the napari-binn Results dock then restores the equations, tables and plots.
    """
    from ..errors import BundleError
    from ..results import load_results
    from ._layers import density_layer_kwargs

    target = Path(path if isinstance(path, (str, os.PathLike)) else list(path)[0])
    result = load_results(target)
    if result.field is None:
        raise BundleError(f"{target}: the bundle has no density field to show (field.npz is missing)", file=target)
    # the loaded result rides along so that the Results dock does not read the bundle a second time
    kwargs = density_layer_kwargs(result.field, napari_binn_bundle=str(target), napari_binn_result=result)
    return [(result.field.u, kwargs, "image")]
