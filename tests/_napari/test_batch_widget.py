"""Per-shape batch dock: one pipeline run and one bundle per closed shape, with the density dock's settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_binn._napari._batch_widget import BatchWidget
from napari_binn._napari._density_widget import DensityWidget
from napari_binn._napari._state import get_state
from napari_binn.pipeline import PipelineConfig


@pytest.fixture
def fast_config(tiny_config):
    """A PipelineConfig of a few seconds per shape: tiny BINN, term-library discovery, a short refit."""
    cfg = PipelineConfig()
    cfg.binn = tiny_config()
    cfg.refine.enabled = False  # the refinement has its own tests (tests/binn/test_refine.py)
    cfg.symbolic.backend = "library"
    cfg.refit.max_evals = 8
    cfg.refit.intervals = "none"
    cfg.refit.candidates = 1
    return cfg


def _two_rectangles(dens: DensityWidget):
    """Left and right part of the tiny stack (pixels), on the density dock's ROI layer."""
    layer = dens.new_roi_layer()
    layer.add_rectangles(np.array([[[0.0, 0.0], [119.0, 79.0]], [[0.0, 80.0], [119.0, 159.0]]]))
    layer.mode = "pan_zoom"
    return layer


def _preview_idle(qtbot, dens: DensityWidget) -> None:
    qtbot.waitUntil(lambda: dens._preview_job is not None and not dens._preview_job.running
                    and not dens._timer.isActive() and not dens._preview_pending, timeout=20000)


def _errors(monkeypatch) -> list[str]:
    shown: list[str] = []
    monkeypatch.setattr("napari_binn._napari._workers.show_error", lambda m: shown.append(m))
    return shown


def test_one_run_and_bundle_per_shape(viewer_with_stack, qtbot, tmp_path, fast_config, monkeypatch):
    viewer = viewer_with_stack
    errors = _errors(monkeypatch)
    dens, batch = DensityWidget(viewer), BatchWidget(viewer)
    for w in (dens, batch):
        viewer.window.add_dock_widget(w)
    _two_rectangles(dens)
    dens.refresh_preview()
    _preview_idle(qtbot, dens)
    qtbot.waitUntil(lambda: "2 closed shapes" in batch.inputs_label.text(), timeout=5000)
    assert "Image 'nuclei'" in batch.inputs_label.text() and "2.5 µm/px" in batch.inputs_label.text()
    state = get_state(viewer)
    layers = [(ly.name, ly.data.shape if hasattr(ly.data, "shape") else len(ly.data)) for ly in viewer.layers]

    out = tmp_path / "out"
    batch.folder.value = str(out)
    batch.steps.value = 30
    job = batch.run(fast_config)
    assert job is not None
    qtbot.waitUntil(lambda: not job.running, timeout=60000)
    assert not errors, errors

    for n in (1, 2):
        bundle = out / f"shape_{n}"
        for name in ("manifest.json", "config.toml", "field.npz", "binn", "equations.txt", "metrics.json",
                     "report.html"):
            assert (bundle / name).exists(), (bundle, name)
        meta = json.loads((bundle / "metadata.json").read_text())
        assert meta["roi_shape"]["number"] == n and meta["source_layer"] == "nuclei"
        assert "steps = 30" in (bundle / "config.toml").read_text()
    # each bundle has the density of its own half of the image (4 boxes of 20 px across 80 px)
    with np.load(out / "shape_1" / "field.npz") as z1, np.load(out / "shape_2" / "field.npz") as z2:
        assert z1["x_um"].max() < 200.0 < z2["x_um"].min()

    assert batch.table.rowCount() == 2
    for r, n in enumerate((1, 2)):
        assert batch.table.item(r, 0).text() == str(n)
        assert batch.table.item(r, 1).text() and "[µm²/h]" in batch.table.item(r, 1).toolTip()
        assert batch.table.item(r, 2).text()
        assert batch.table.item(r, 3).text().endswith("%")
        assert batch.table.item(r, 4).text() == f"shape_{n}"
    assert "Done" in batch.status.text() and "2 bundles written" in batch.status.text()
    assert batch.progress.value() == 100 and batch.run_btn.enabled and not batch.cancel_btn.enabled

    # nothing else changed: same layers, empty shared state
    assert [(ly.name, ly.data.shape if hasattr(ly.data, "shape") else len(ly.data)) for ly in viewer.layers] \
        == layers
    assert state.field is None and state.fit is None and state.equations is None and not state.bundle

    # a second run into the same folder is refused
    assert batch.run(fast_config) is None and "nothing was overwritten" in errors[-1]
    errors.clear()

    # open shape 2 in the results dock (opened by the batch dock)
    batch.table.selectRow(1)
    opened = batch.open_selected()
    assert opened is not None
    qtbot.waitUntil(lambda: state.equations is not None, timeout=30000)
    assert state.bundle.endswith("shape_2") and state.field is not None
    assert viewer.layers["napari-binn ROI"].selected_data == {1}  # the row's shape is selected on the canvas
    assert batch.detail.text().startswith("Shape 2") and "D(u) = " in batch.detail.text()
    assert any("Equations and results" in name for name in viewer.window.dock_widgets)
    qtbot.waitUntil(lambda: not opened.running, timeout=10000)
    assert not errors, errors


def test_bad_inputs_are_notifications(viewer_with_stack, qtbot, tmp_path, monkeypatch):
    viewer = viewer_with_stack
    errors = _errors(monkeypatch)
    batch = BatchWidget(viewer)
    assert batch.run() is None and "Density extraction dock" in errors[-1]
    assert "Open the Density extraction dock" in batch.inputs_label.text()

    dens = DensityWidget(viewer)  # opened after the batch dock: followed from then on
    qtbot.waitUntil(lambda: "Image 'nuclei'" in batch.inputs_label.text(), timeout=5000)
    assert batch.run() is None and "No ROI layer" in errors[-1]
    layer = _two_rectangles(dens)
    assert batch.run() is None and "output folder" in errors[-1]

    out = tmp_path / "out"
    (out / "shape_2").mkdir(parents=True)
    (out / "shape_2" / "notes.txt").write_text("mine")
    (out / "shape_1").mkdir()  # empty: would be used
    batch.folder.value = str(out)
    assert batch.run() is None
    assert "shape_2" in errors[-1] and "shape_1" not in errors[-1] and "nothing was overwritten" in errors[-1]
    assert (out / "shape_2" / "notes.txt").read_text() == "mine" and batch.job is None

    layer.selected_data = set(range(len(layer.data)))
    layer.remove_selected()
    layer.add_lines(np.array([[0.0, 0.0], [50.0, 50.0]]))
    assert batch.run() is None and "no closed shape" in errors[-1]
    dens.shutdown()
    qtbot.waitUntil(lambda: "Open the Density extraction dock" in batch.inputs_label.text(), timeout=5000)
    batch.shutdown()


def test_cancel_right_after_start(viewer_with_stack, qtbot, tmp_path, fast_config, monkeypatch):
    viewer = viewer_with_stack
    errors = _errors(monkeypatch)
    dens, batch = DensityWidget(viewer), BatchWidget(viewer)
    _two_rectangles(dens)
    out = tmp_path / "out"
    batch.folder.value = str(out)
    job = batch.run(fast_config)
    batch.cancel()
    qtbot.waitUntil(lambda: not job.running, timeout=30000)
    assert not errors, errors
    assert batch.status.text().startswith("Cancelled: no bundle written")
    assert [r.status for r in batch.runs] in (["stopped", "not run"], ["not run", "not run"])
    assert not list(out.glob("shape_*/manifest.json"))
    assert batch.run_btn.enabled and not batch.cancel_btn.enabled
    assert batch.open_selected() is None and "Select a row" in errors[-1]
    dens.shutdown()
    batch.shutdown()


def test_closing_the_dock_while_running_stops_the_worker(viewer_with_stack, qtbot, tmp_path, fast_config):
    viewer = viewer_with_stack
    dens, batch = DensityWidget(viewer), BatchWidget(viewer)
    dock = viewer.window.add_dock_widget(batch)
    _two_rectangles(dens)
    batch.folder.value = str(tmp_path / "out")
    job = batch.run(fast_config)
    qtbot.waitUntil(lambda: batch.runs[0].status == "running", timeout=20000)
    viewer.window.remove_dock_widget(dock)
    assert job.token.cancelled and not job.thread_alive
    dens.shutdown()


def test_run_on_choices_and_per_shape_progress(viewer_with_stack, qtbot, tmp_path, monkeypatch):
    from napari_binn._napari._batch_widget import RUN_ON
    from napari_binn.batch import ItemOutcome
    from napari_binn.jobs import Progress

    viewer = viewer_with_stack
    errors = _errors(monkeypatch)
    dens, batch = DensityWidget(viewer), BatchWidget(viewer)
    _two_rectangles(dens)
    batch.folder.value = str(tmp_path / "out")
    labels = list(RUN_ON)
    assert batch.where()[0] is None and not batch.address.enabled
    batch.run_on.value = labels[1]
    assert batch.where()[0] == "local"
    batch.run_on.value = labels[2]
    assert batch.address.enabled
    assert batch.run() is None and "scheduler's address" in errors[-1]
    batch.address.value = "10.0.0.5:8786"
    assert batch.run() is None and "tcp://host:port" in errors[-1]
    batch.address.value = "tcp://10.0.0.5:8786"
    assert batch.where() == ("tcp://10.0.0.5:8786", "on the dask cluster at tcp://10.0.0.5:8786")

    # rows show each running shape's own progress (several run at once on a cluster)
    batch.runs = [ItemOutcome(f"shape_{n}", tmp_path / f"shape_{n}", status="running") for n in (1, 2)]
    batch.numbers = [1, 2]
    batch._fill_table()
    batch.job = type("Job", (), {"token": type("T", (), {"cancelled": False})()})()
    for k, (frac, stage) in enumerate(((0.4, "binn"), (0.9, "refit"))):
        batch._event(Progress(stage, 0, None, "…", data={"item": k, "n_items": 2, "pipeline_stage": stage,
                                                          "item_fraction": frac, "batch_fraction": 0.5}))
    assert batch.table.item(0, 1).text() == "running… 40% (BINN training)"
    assert batch.table.item(1, 1).text() == "running… 90% (refit against the data)"
    batch.job = None
    dens.shutdown()
    batch.shutdown()
