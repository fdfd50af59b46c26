"""Layer conversion for the docks: napari layers to core inputs (a Stack, an ROI) and core results to layers that
are named, reused on re-runs and placed in µm. Nothing numerical here; napari is imported only inside functions,
so the reader can use this module without loading Qt."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io import Stack

__all__ = ["image_layers", "shapes_layers", "layer_to_stack", "shapes_to_roi", "upsert_image", "upsert_points",
           "density_layer_kwargs", "show_density"]


def image_layers(viewer: Any) -> list[Any]:
    from napari.layers import Image

    return [ly for ly in viewer.layers if isinstance(ly, Image)]


def shapes_layers(viewer: Any) -> list[Any]:
    from napari.layers import Shapes

    return [ly for ly in viewer.layers if isinstance(ly, Shapes)]


def layer_to_stack(layer: Any, *, channel: int = 0, pixel_size_um: float | None,
                   frame_interval_h: float | None) -> Stack:
    """A core Stack from an image layer: (T, Y, X) or (T, C, Y, X) with ``channel`` chosen.

    Frame times: ``frame_interval_h`` if given, else the reader's ``metadata['times_h']``, else frame indices
    (flagged ``time_units='frames'``). Raises ValueError with what to do for data without a time axis.
    """
    if getattr(layer, "multiscale", False):
        raise ValueError(f"Layer {layer.name!r} is multiscale: open the full-resolution time-lapse instead.")
    if getattr(layer, "rgb", False):
        raise ValueError(f"Layer {layer.name!r} is RGB: split it into channels (Image > Split) and choose one.")
    data = layer.data
    if data.ndim == 2:
        raise ValueError(f"Layer {layer.name!r} is a single 2D image: density dynamics need a time-lapse "
                         "(T, Y, X). Open the whole stack (or a folder of frames).")
    if data.ndim == 4:
        if not 0 <= channel < data.shape[1]:
            raise ValueError(f"Channel {channel} is outside 0..{data.shape[1] - 1} of layer {layer.name!r}.")
        data = data[:, channel]
    elif data.ndim != 3:
        raise ValueError(f"Layer {layer.name!r} has {data.ndim} dimensions; expected (T, Y, X) or (T, C, Y, X).")
    T = data.shape[0]
    md = dict(layer.metadata or {})
    meta = {k: v for k, v in md.items() if k in ("source", "channel", "warnings", "notes")}
    if frame_interval_h:
        times = np.arange(T, dtype=float) * float(frame_interval_h)
        meta["time_units"] = "h"
    else:
        times = np.asarray(md.get("times_h", []), dtype=float)
        if times.shape != (T,):
            times = np.arange(T, dtype=float)
            meta["time_units"] = "frames"
        else:
            meta["time_units"] = md.get("time_units", "h")
    return Stack(data, pixel_size_um, times, layer.name, meta)


def shapes_to_roi(shapes: Any, image: Any, only: Any = None) -> tuple[list[np.ndarray] | None, list[str]]:
    """ROI polygons in the image's pixel (row, col) frame from a Shapes layer (:func:`napari_binn.roi.shapes_to_roi`
    of its data and shape types); (None, notes) when it is empty or has no closed shape. ``only``: indices of the
    shapes to use (default all).

    Shapes are mapped through world coordinates (each layer's scale and translate), so a Shapes layer drawn
    with another scale is converted correctly. Lines and paths enclose no area and are skipped with a note.
    """
    from ..roi import shapes_to_roi as core_shapes_to_roi

    if shapes is None or len(shapes.data) == 0:
        return None, ["no ROI drawn: the whole image is analysed"]
    s_scale = np.asarray(shapes.scale[-2:], float)
    s_trans = np.asarray(shapes.translate[-2:], float)
    i_scale = np.asarray(image.scale[-2:], float)
    i_trans = np.asarray(image.translate[-2:], float)
    notes: list[str] = []
    if not np.allclose(s_scale, i_scale) or not np.allclose(s_trans, i_trans):
        notes.append(f"the ROI layer's scale {tuple(s_scale)} differs from the image's {tuple(i_scale)}: "
                     "shapes were converted to image pixels through world coordinates")
    polys, more = core_shapes_to_roi(shapes.data, shapes.shape_type, only=only, scale=s_scale / i_scale,
                                     offset=(s_trans - i_trans) / i_scale)
    return polys, notes + more


def upsert_image(viewer: Any, name: str, data: Any, **kwargs: Any) -> Any:
    """Add an image layer called ``name`` or update the existing one in place (no layer spam on re-runs)."""
    from napari.layers import Image

    if name in viewer.layers:
        layer = viewer.layers[name]
        if isinstance(layer, Image) and layer.data.ndim == np.ndim(data):
            layer.data = data
            for key in ("scale", "translate", "metadata", "colormap", "contrast_limits", "opacity", "visible",
                        "blending"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        viewer.layers.remove(layer)
    return viewer.add_image(data, name=name, **kwargs)


def upsert_points(viewer: Any, name: str, data: np.ndarray, **kwargs: Any) -> Any:
    """Add a points layer called ``name`` or replace the data of the existing one."""
    from napari.layers import Points

    if name in viewer.layers:
        layer = viewer.layers[name]
        if isinstance(layer, Points) and layer.ndim == data.shape[1]:
            layer.data = data
            for key in ("scale", "translate", "metadata"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        viewer.layers.remove(layer)
    return viewer.add_points(data, name=name, **kwargs)



def density_layer_kwargs(field: Any, image: Any = None, **metadata: Any) -> dict[str, Any]:
    """napari image-layer keywords of a DensityField (the one place they are made): named 'density', magma at half
    opacity, contrast 0 to the highest density, boxes placed in µm over ``image`` (the layer it was measured on:
    its time scale and translate) or, without it, at the field's own coordinates. ``metadata`` joins the layer's
    metadata (units, frame times in h, box size in µm)."""
    from ..density import field_layer_transform
    from ._state import LAYER_NAMES

    (sy, sx), (ty, tx) = field_layer_transform(field)
    st = float(image.scale[0]) if image is not None else 1.0
    it = tuple(float(v) for v in image.translate) if image is not None else (0.0, 0.0, 0.0)
    finite = field.u[np.isfinite(field.u)]
    hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return {"name": LAYER_NAMES["density"], "scale": (st, sy, sx), "translate": (it[0], ty + it[-2], tx + it[-1]),
            "colormap": "magma", "opacity": 0.5, "contrast_limits": (0.0, hi),
            "metadata": {"napari_binn_output": "density", "units": field.units, "times_h": field.t_h.tolist(),
                         "box_um": field.dx_um, **metadata}}


def show_density(viewer: Any, field: Any, image: Any = None, **metadata: Any) -> Any:
    """Add or update the density layer of ``field`` (:func:`density_layer_kwargs`) with its colour bar shown."""
    kwargs = density_layer_kwargs(field, image, **metadata)
    layer = upsert_image(viewer, kwargs.pop("name"), field.u, **kwargs)
    layer.colorbar.visible = True
    return layer
