"""The napari reader contribution: stacks as calibrated image layers, and results bundles as the density layer
the docks would make (no Qt involved)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from napari_binn.io import StackWarning, read_stack, write_stack_tiff

STACK = np.random.default_rng(0).integers(10, 1000, size=(4, 12, 10)).astype(np.uint16)


def test_napari_reader_layer_data(tmp_path):
    from napari_binn._napari._reader import napari_get_reader

    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    path = write_stack_tiff(tmp_path / "cal.tif", STACK, 0.65, [0, 1, 2, 3])
    reader = napari_get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image" and data.shape == (4, 12, 10)
    assert kwargs["name"] == "cal" and kwargs["scale"] == (1.0, 0.65, 0.65)
    np.testing.assert_array_equal(kwargs["metadata"]["times_h"], [0, 1, 2, 3])
    assert kwargs["metadata"]["pixel_size_um"] == 0.65


def test_napari_reader_unknown_pixel_size_and_channels(tmp_path):
    from napari_binn._napari._reader import napari_get_reader

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, STACK, photometric="minisblack")
    [(_, kwargs, _)] = napari_get_reader(str(plain))(str(plain))
    assert kwargs["scale"] == (1.0, 1.0, 1.0)
    assert any("scale is 1 per pixel" in w for w in kwargs["metadata"]["warnings"])
    tc = tmp_path / "tc.tif"
    data = np.random.default_rng(6).integers(0, 500, (4, 2, 6, 5), dtype=np.uint16)
    tifffile.imwrite(tc, data, imagej=True, metadata={"axes": "TCYX"})
    layers = napari_get_reader([str(tc)])([str(tc)])
    assert [layer[1]["name"] for layer in layers] == ["tc [channel 0]", "tc [channel 1]"]
    np.testing.assert_array_equal(np.asarray(layers[1][0]), data[:, 1])
    with pytest.raises(ValueError, match="no time axis"):
        flat = tmp_path / "flat.tif"
        tifffile.imwrite(flat, np.zeros((5, 5), np.uint8))
        napari_get_reader(str(flat))(str(flat))


def test_lazy_stack_displays_in_napari_model(tmp_path):
    pytest.importorskip("napari")
    from napari.components import ViewerModel
    from napari.layers import Layer

    from napari_binn._napari._reader import stack_to_layer_data

    data = np.random.default_rng(7).integers(0, 500, (5, 2, 16, 12), dtype=np.uint16)
    path = tmp_path / "tc.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"}, compression="zlib", resolution=(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackWarning)
        stack = read_stack(path, channel=1, lazy=True)
    viewer = ViewerModel()
    layer = viewer.add_layer(Layer.create(*stack_to_layer_data(stack)))
    viewer.dims.set_point(0, 3)
    np.testing.assert_array_equal(np.asarray(layer._slice.image.raw), data[3, 1])
    assert tuple(layer.scale) == (1.0, 1.0, 1.0)  # no unit in the file: 1 per pixel


def test_bundle_opens_as_the_density_layer_the_docks_make(tmp_path):
    from napari_binn._napari._layers import density_layer_kwargs
    from napari_binn._napari._reader import napari_get_reader
    from napari_binn.field import DensityField
    from napari_binn.pipeline import PipelineConfig, PipelineResult
    from napari_binn.results import save_results

    u = np.arange(3 * 4 * 5, dtype=float).reshape(3, 4, 5)
    field = DensityField(u, np.ones((4, 5), bool), 12.5 + 25.0 * np.arange(5), 12.5 + 25.0 * np.arange(4),
                         np.array([0.0, 1.0, 2.0]))
    bundle = save_results(PipelineResult(PipelineConfig(), field=field), tmp_path / "b", figures=False)
    reader = napari_get_reader(str(bundle))
    [(data, kwargs, kind)] = reader(str(bundle))
    assert kind == "image" and np.array_equal(data, u)
    expected = density_layer_kwargs(field)
    for key in ("name", "scale", "translate", "colormap", "opacity", "contrast_limits"):
        assert kwargs[key] == expected[key], key
    assert kwargs["scale"] == (1.0, 25.0, 25.0) and kwargs["translate"] == (0.0, 12.5, 12.5)
    meta = kwargs["metadata"]
    assert meta["napari_binn_bundle"] == str(bundle) and meta["napari_binn_result"].field.shape == u.shape
    assert meta["units"] == "cells/mm²" and meta["times_h"] == [0.0, 1.0, 2.0]
