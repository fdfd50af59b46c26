"""Density dock on its own: prefilled calibration, ROI layer, live preview, extraction aligned with the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from napari_binn._napari._density_widget import DensityWidget
from napari_binn._napari._state import LAYER_NAMES, get_state


def _wait_idle(qtbot, widget, timeout=20000):
    qtbot.waitUntil(lambda: widget._preview_job is not None and not widget._preview_job.running
                    and not widget._timer.isActive() and not widget._preview_pending, timeout=timeout)


def test_prefill_preview_and_extract(viewer_with_stack, qtbot):
    viewer = viewer_with_stack
    w = DensityWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.layer_combo.value == "nuclei"
    assert w.pixel_size.value == pytest.approx(2.5)
    assert w.interval.value == pytest.approx(6.0)

    # ROI: a rectangle in the left 2/3 of the image (pixels), drawn on a Shapes layer made by the button.
    roi = w.new_roi_layer()
    assert roi.scale[-1] == pytest.approx(2.5)
    roi.add_rectangles(np.array([[0.0, 0.0], [119.0, 99.0]]))
    w.refresh_preview()
    _wait_idle(qtbot, w)
    qtbot.waitUntil(lambda: LAYER_NAMES["preview"] in viewer.layers, timeout=20000)
    pts = viewer.layers[LAYER_NAMES["nuclei"]]
    assert len(pts.data) > 10
    assert pts.scale[-1] == pytest.approx(2.5)
    prev = viewer.layers[LAYER_NAMES["preview"]]
    assert "nuclei (found at the scale of " in w.preview_label.text()  # the blob filter's scale, chosen
    assert prev.data.shape == (6, 5)  # 120 px / 20 px boxes, 100 px wide ROI -> 5 boxes
    assert prev.scale[-1] == pytest.approx(50.0)

    # changing the frame refreshes the preview (debounced)
    viewer.dims.set_current_step(0, 4)
    qtbot.waitUntil(lambda: prev.metadata.get("frame") == 4, timeout=20000)

    job = w.extract()
    assert job is not None
    qtbot.waitUntil(lambda: get_state(viewer).field is not None, timeout=30000)
    dens = viewer.layers[LAYER_NAMES["density"]]
    fld = get_state(viewer).field
    assert dens.data.shape == fld.u.shape == (5, 6, 5)
    assert tuple(dens.scale) == pytest.approx((1.0, 50.0, 50.0))
    # box (0, 0) covers pixels 0..19: centre at 9.5 px = 23.75 µm
    assert tuple(dens.translate) == pytest.approx((0.0, 23.75, 23.75))
    assert fld.t_h[-1] == pytest.approx(24.0)
    assert "(nuclei found at the scale of " in w.status.text()
    # re-running reuses the same layer
    n_layers = len(viewer.layers)
    w.extract()
    qtbot.waitUntil(lambda: not w._extract_job.running, timeout=30000)
    qtbot.wait(50)
    assert len(viewer.layers) == n_layers


def test_bad_input_is_a_notification(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    w = DensityWidget(viewer)
    shown = []
    monkeypatch.setattr("napari_binn._napari._workers.show_error", lambda m: shown.append(m))
    assert w.extract() is None  # no image layer
    assert shown and "No image layer" in shown[-1]
    viewer.add_image(np.zeros((32, 32)), name="single")
    assert w.extract() is None  # no time axis / unknown pixel size
    assert "pixel size" in shown[-1] or "time-lapse" in shown[-1]
    w.pixel_size.value = 1.0
    assert w.extract() is None
    assert "time-lapse" in shown[-1]
    w.shutdown()


def test_roi_from_shapes_with_another_scale():
    from types import SimpleNamespace

    from napari_binn._napari._layers import shapes_to_roi

    image = SimpleNamespace(scale=(1.0, 2.5, 2.5), translate=(0.0, 0.0, 0.0))
    # a Shapes layer in µm (scale 1): a rectangle 0..100 µm and an ellipse; a line is ignored
    shapes = SimpleNamespace(
        scale=(1.0, 1.0), translate=(0.0, 0.0),
        data=[np.array([[0, 0], [0, 100], [100, 100], [100, 0]], float),
              np.array([[0, 0], [0, 50], [50, 50], [50, 0]], float), np.array([[0, 0], [10, 10]], float)],
        shape_type=["rectangle", "ellipse", "line"])
    polys, notes = shapes_to_roi(shapes, image)
    assert len(polys) == 2
    assert polys[0].max(0) == pytest.approx([40.0, 40.0])  # 100 µm / 2.5 µm per px
    assert polys[1].mean(0) == pytest.approx([10.0, 10.0])  # ellipse centre 25 µm = 10 px
    assert np.ptp(polys[1][:, 0]) == pytest.approx(20.0, abs=0.1)
    assert any("differs" in n for n in notes) and any("line" in n for n in notes)
    assert shapes_to_roi(None, image)[0] is None
    only, _ = shapes_to_roi(shapes, image, only=[1])
    assert len(only) == 1 and only[0].mean(0) == pytest.approx([10.0, 10.0])


def test_one_analysis_per_shape(viewer_with_stack, qtbot):
    """'Selected shapes only' extracts the selected shape's boxes; with nothing selected it says what to do."""
    viewer = viewer_with_stack
    w = DensityWidget(viewer)
    layer = w.new_roi_layer()
    layer.add_rectangles(np.array([[[0.0, 0.0], [119.0, 99.0]], [[0.0, 100.0], [119.0, 159.0]]]))
    w.roi_mode.value = "Selected shapes only"
    image = viewer.layers["nuclei"]
    layer.selected_data = set()
    with pytest.raises(ValueError, match="no shape is selected"):
        w.current_roi(image)
    layer.selected_data = {1}
    roi, notes = w.current_roi(image)
    assert len(roi) == 1 and roi[0][:, 1].min() == pytest.approx(100.0, abs=0.5)  # pixels
    assert "shape(s) 2 of 2" in notes[0]
    w.roi_mode.value = "Union of all shapes"
    assert len(w.current_roi(image)[0]) == 2
