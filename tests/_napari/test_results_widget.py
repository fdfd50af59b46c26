"""Results dock on its own and the whole path: preview -> extract -> train -> discover -> simulate -> export ->
re-open (dock and File > Open reader), on the tiny synthetic stack."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_binn._napari._density_widget import DensityWidget
from napari_binn._napari._reader import napari_get_reader
from napari_binn._napari._results_widget import ResultsWidget
from napari_binn._napari._state import LAYER_NAMES, get_state
from napari_binn._napari._training_widget import TrainingWidget
from napari_binn._napari._writer import write_bundle
from napari_binn.symbolic.expression import readable


def _idle(qtbot, dock, timeout=60000):
    qtbot.waitUntil(lambda: dock.job is not None and not dock.job.running, timeout=timeout)
    qtbot.wait(20)


def test_results_dock_needs_inputs(make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    w = ResultsWidget(viewer)
    shown = []
    monkeypatch.setattr("napari_binn._napari._workers.show_error", lambda m: shown.append(m))
    assert w.discover() is None and "No trained BINN" in shown[-1]
    assert w.simulate() is None and "No density" in shown[-1]
    assert w.export() is None and "bundle folder" in shown[-1]
    assert "extract the density" in w.input_label.text()


def test_whole_path(viewer_with_stack, qtbot, tmp_path, tiny_config):
    viewer = viewer_with_stack
    dens, train, res = DensityWidget(viewer), TrainingWidget(viewer), ResultsWidget(viewer)
    for w in (dens, train, res):
        viewer.window.add_dock_widget(w)
    state = get_state(viewer)

    # density: draw an ROI (left 100 px), extract all frames
    dens.new_roi_layer().add_rectangles(np.array([[0.0, 0.0], [119.0, 99.0]]))
    dens.extract()
    qtbot.waitUntil(lambda: state.field is not None, timeout=30000)
    layer = viewer.layers[LAYER_NAMES["density"]]
    assert tuple(layer.translate) == pytest.approx((0.0, 23.75, 23.75))
    assert "5 frames" in train.field_label.text()  # shared state reached the training dock

    # training: ~30 steps of a tiny net, then a tiny refinement through the solver
    from napari_binn.binn.refine import RefineConfig

    state.update(config=dataclasses.replace(state.config, refine=RefineConfig(
        iterations=10, smoothness=[1.0], initial="surrogate", joint=False, distill_steps=20, bands=False)))
    train.train(tiny_config())
    qtbot.waitUntil(lambda: state.fit is not None, timeout=60000)

    # discovery with the fast term-library backend
    res.backend.value = "library"
    res.discover()
    _idle(qtbot, res)
    eq = state.equations
    assert eq is not None and eq.D is not None
    assert res.tables["D"].rowCount() == len(eq.D.rows)  # the front, then the library forms
    star_row = [r for r in range(res.tables["D"].rowCount()) if res.tables["D"].item(r, 0).text() == "★"]
    assert star_row == [eq.D.selected_index]
    assert not res.latex_labels["D"].pixmap().isNull()
    overlay = viewer.canvas.overlays.text
    assert overlay.visible and f"D(u) = {readable(eq.D.text)}" in overlay.text

    # the user picks another D(u) on the front
    if res.tables["D"].rowCount() > 1:
        other = (eq.D.selected_index + 1) % res.tables["D"].rowCount()
        res.choose("D", other)
        assert state.equations.D.selected_index == other
        assert res.tables["D"].item(other, 0).text() == "★"
        assert f"D(u) = {readable(state.equations.D.text)}" in overlay.text

    # forward simulation: layers aligned with the density layer, residual diverging, QC table
    res.simulate()
    _idle(qtbot, res)
    sim = viewer.layers[LAYER_NAMES["simulated"]]
    resid = viewer.layers[LAYER_NAMES["residual"]]
    assert sim.data.shape == state.field.u.shape
    assert tuple(sim.scale) == pytest.approx(tuple(layer.scale))
    assert tuple(sim.translate) == pytest.approx(tuple(layer.translate))
    assert resid.colormap.name == "bwr"
    assert resid.contrast_limits[0] == pytest.approx(-resid.contrast_limits[1])
    assert LAYER_NAMES["contour"] in viewer.layers
    # the pipeline's simulate stage: the chosen model, and the BINN surrogate (not a simulation) for comparison
    assert [res.qc_table.item(i, 0).text() for i in range(res.qc_table.rowCount())] == ["BINN surrogate",
                                                                                         "closed form"]
    assert viewer.layers[LAYER_NAMES["simulated"]].metadata["model"] == "closed form"
    qtbot.waitUntil(lambda: res.figure.draws >= 1 and not res.figure.busy, timeout=20000)

    # export the bundle
    out = tmp_path / "bundle"
    res.bundle_path.value = str(out)
    res.export()
    _idle(qtbot, res)
    for name in ("manifest.json", "field.npz", "equations.json", "equations.txt", "simulations.npz", "binn",
                 "metrics.json", "report.html"):
        assert (out / name).exists(), name
    assert f"D(u) = {state.equations.D.text}" in (out / "equations.txt").read_text()
    assert "steps = 30" in (out / "config.toml").read_text()  # the training dock's settings
    # the writer contribution writes the same result from the layers' metadata
    written = write_bundle(str(tmp_path / "via_writer"), [layer.as_layer_data_tuple()])
    assert (tmp_path / "via_writer" / "manifest.json").is_file() and written

    # re-open in a fresh viewer with File > Open (reader) + the Results dock
    text = state.equations.D.text
    viewer2 = type(viewer)(show=False)
    try:
        assert napari_get_reader(str(out)) is not None
        res2 = ResultsWidget(viewer2)
        viewer2.open(str(out), plugin="napari-binn")
        qtbot.waitUntil(lambda: get_state(viewer2).equations is not None, timeout=30000)
        s2 = get_state(viewer2)
        assert s2.equations is not None and s2.equations.D.text == text
        assert s2.fit is not None and "closed form" in s2.simulations
        d2 = viewer2.layers[LAYER_NAMES["density"]]
        assert tuple(d2.scale) == pytest.approx(tuple(layer.scale))
        assert tuple(d2.translate) == pytest.approx(tuple(layer.translate))
        assert LAYER_NAMES["simulated"] in viewer2.layers
        assert f"D(u) = {readable(text)}" in viewer2.canvas.overlays.text.text
        assert res2.tables["G"].rowCount() >= 1
        # the dock's own "Open bundle" (worker) restores the same
        s2.update(equations=None)
        res2.open_bundle(str(out))
        _idle(qtbot, res2)
        assert s2.equations is not None and s2.equations.D.text == text
        res2.shutdown()
    finally:
        viewer2.close()


def test_refit_against_the_data(make_napari_viewer, qtbot):
    """'Closed form refitted to the data': the BIC keeps the true forms of hand-written candidates, the refitted
    constants replace the symbolic ones in the tables, and the refitted simulation is overlaid next to
    Fisher-KPP in the QC table."""
    from napari_binn.symbolic import Equations
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(8, 10),
                              dx_um=50.0, times_h=np.linspace(0, 24, 5), noise=0.05, seed=0)
    viewer = make_napari_viewer()
    res = ResultsWidget(viewer)
    state = get_state(viewer)
    state.update(field=field, equations=Equations.from_forms(D=["700.0", "700.0*exp(-0.0002*u) + 0.1*u"],
                                                             G=["0.075 - 3.5e-5*u", "0.08*exp(-0.0005*u) - 0.002"],
                                                             u_range=(0.0, 2000.0)))
    res.sim_model.value = "closed form refitted to the data"
    res.simulate()
    _idle(qtbot, res, timeout=120000)
    eq = state.equations
    assert eq.D.selected_index == 0 and eq.G.selected_index == 0
    assert float(eq.D.sympy) == pytest.approx(800.0, rel=0.1)
    assert res.tables["D"].item(0, 0).text() == "★"
    names = [res.qc_table.item(i, 0).text() for i in range(res.qc_table.rowCount())]
    assert "closed form (refitted)" in names and "fisher_kpp" in names
    assert viewer.layers[LAYER_NAMES["simulated"]].metadata["model"] == "closed form (refitted)"
    # 5 frames: one held out; the status says so, and the forms it cannot tell apart are listed under the tables
    assert "forms chosen on the last 1 frame(s) held out" in res.status.text()
    from napari_binn._napari._results_widget import alternatives_display
    from napari_binn.pipeline import alternatives_text

    lines = alternatives_text(eq)
    assert lines and res.alternatives.text() == alternatives_display(lines) and not res.alternatives.isHidden()
    shown = res.alternatives.text().splitlines()
    assert shown[0] == "D(u): the data cannot tell apart:" and shown[1].startswith(f"   ★ {eq.D.selected.text} (headline")
    # a row the user picks instead is not the headline those lines compare against: D's lines go
    res.choose("D", 1)
    assert not res.alternatives.text().startswith("D(u)")
    assert res.alternatives.text() == alternatives_display(alternatives_text(state.equations))
    # the refitted constants with their intervals and units: D_0 µm²/h, G_1 1/h per density unit
    assert "µm²/h" in res.status.text() and f"1/h·({field.units})^-1" in res.status.text()
    res.shutdown()


def test_reopened_bundle_is_refitted_simulated_and_exported_as_the_cli_does(make_napari_viewer, qtbot, tmp_path):
    """A bundle opened in the results dock is refitted (its own configuration), simulated again and exported; the
    export holds the mechanistic refits, with intervals equal to those of 'napari-binn simulate' on that bundle."""
    import json

    from napari_binn.cli import main
    from napari_binn.pipeline import PipelineConfig, PipelineResult
    from napari_binn.results import load_results, save_results
    from napari_binn.symbolic import Equations
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(6, 8),
                              dx_um=50.0, times_h=np.linspace(0, 24, 4), noise=0.05, seed=1)
    cfg = PipelineConfig()
    cfg.refit.candidates, cfg.refit.intervals, cfg.refit.max_evals = 1, "wald", 60
    eq = Equations.from_forms(D=["700.0"], G=["0.075 - 3.5e-5*u"], u_range=(0.0, 2000.0))
    bundle = save_results(PipelineResult(cfg, field=field, equations=eq), tmp_path / "bundle", figures=False)
    assert main(["simulate", str(bundle), "--out", str(tmp_path / "cli"), "--quiet"]) == 0

    viewer = make_napari_viewer()
    res = ResultsWidget(viewer)
    state = get_state(viewer)
    res.open_bundle(bundle)
    _idle(qtbot, res)
    assert state.config.refit.intervals == "wald"
    res.sim_model.value = "closed form refitted to the data"
    res.simulate()
    _idle(qtbot, res, timeout=120000)
    assert "closed form (refitted)" in state.mechanistic
    res.sim_model.value = "closed-form equations"
    res.simulate()
    _idle(qtbot, res)
    assert "closed form" in state.simulations
    res.bundle_path.value = str(tmp_path / "gui")
    res.export()
    _idle(qtbot, res)

    cli = json.loads((tmp_path / "cli" / "mechanistic.json").read_text())
    gui = json.loads((tmp_path / "gui" / "mechanistic.json").read_text())
    assert set(gui) == set(cli) == {"closed form (refitted)", "fisher_kpp"}
    for name in cli:
        assert gui[name]["ci95"] == cli[name]["ci95"] and gui[name]["params"] == cli[name]["params"]
        assert all(lo is not None and lo < hi for lo, hi in gui[name]["ci95"].values())
    again = load_results(tmp_path / "gui")
    assert again.mechanistic["closed form (refitted)"].ci95 == state.mechanistic["closed form (refitted)"].ci95
    assert {"closed form", "closed form (refitted)", "fisher_kpp"} <= set(again.simulations)

    # the CLI's bundle (refitted there) opens with the refitted constants in the table, the LaTeX and the canvas,
    # not the symbolic fit's 700
    res.open_bundle(tmp_path / "cli")
    _idle(qtbot, res)
    D0 = cli["closed form (refitted)"]["params"]["D_0"]
    assert float(state.equations.D.sympy) == pytest.approx(D0, rel=0.05) and float(state.equations.D.sympy) != 700
    assert res.tables["D"].item(state.equations.D.selected_index, 3).text() == state.equations.D.text
    assert f"D(u) = {readable(state.equations.D.text)}" in viewer.canvas.overlays.text.text
    # and says the refitted constants with their intervals and units
    assert f"D_0 = {D0:.4g} [" in res.status.text() and "µm²/h" in res.status.text()
    res.shutdown()


def test_the_forms_the_data_cannot_tell_apart_are_listed_one_per_line():
    from napari_binn._napari._results_widget import alternatives_display

    lines = ["D(u): the held-out frames cannot tell apart: 1500*u/(u + 600) [rising_saturating] (headline, training-"
             "frame BIC 60 below the fewest-constant form 30*sqrt(u), held-out error no higher); 29.0*sqrt(u) "
             "(refitted; symbolic fit 30.8*sqrt(u)); 0.8*u + 220 [linear]",
             "G(u): also consistent, but the same curve as the headline on the observed densities (within 1%): "
             "0.05 - 2.5e-5*u**1.01 [richards]"]
    assert alternatives_display(lines).splitlines() == [
        "D(u): the held-out frames cannot tell apart:",
        "   ★ 1500*u/(u + 600) [rising_saturating] (headline, training-frame BIC 60 below the fewest-constant form "
        "30*sqrt(u), held-out error no higher)",
        "   • 29.0*sqrt(u) (refitted; symbolic fit 30.8*sqrt(u))",
        "   • 0.8*u + 220 [linear]",
        "G(u): also consistent, but the same curve as the headline on the observed densities (within 1%):",
        "   • 0.05 - 2.5e-5*u**1.01 [richards]"]
    assert alternatives_display([]) == ""


def test_the_results_plot_shows_a_learned_delay_in_a_row_below():
    """With a learned T(t) the results figure draws it in a row below D(u), G(u) and N(t), with the refitted closed
    form's own T(t) dashed when there is one (refit.delay); without one it has three panels."""
    from matplotlib.figure import Figure

    from napari_binn._napari._results_widget import _plot_results

    u = np.linspace(0.0, 2000.0, 11)
    rates = {"learned": (u, np.full(11, 800.0), 0.05 * (1 - u / 2000.0))}
    counts = {"observed": (np.linspace(0, 48, 5), np.linspace(100, 300, 5))}
    t = np.linspace(0.0, 48.0, 21)
    fig = Figure()
    _plot_results(fig, rates, counts, "cells/mm²", None, {"learned": (t, 1 - np.exp(-t / 6.0))})
    assert len(fig.axes) == 4 and fig.axes[3].get_title() == "T(t), the delay"
    assert len(fig.axes[3].lines) == 1
    np.testing.assert_allclose(fig.axes[3].lines[0].get_ydata(), 1 - np.exp(-t / 6.0))
    fig = Figure()
    _plot_results(fig, rates, counts, "cells/mm²", None,
                  {"learned": (t, 0.5 + 0.5 * (1 - np.exp(-t / 6.0))), "refitted": (t, 1 - np.exp(-t / 5.0))})
    learned, refitted = fig.axes[3].lines
    assert learned.get_linestyle() == "-" and refitted.get_linestyle() == "--"
    np.testing.assert_allclose(refitted.get_ydata(), 1 - np.exp(-t / 5.0))
    fig = Figure()
    _plot_results(fig, rates, counts, "cells/mm²")
    assert len(fig.axes) == 3


def test_a_refit_that_finds_the_data_delayed_says_so(make_napari_viewer, qtbot, monkeypatch):
    """No delay learned, data made with one: the refit's delay check warns in the GUI, naming the setting."""
    from napari_binn._napari import _results_widget
    from napari_binn.symbolic import Equations
    from napari_binn.synthetic.models import make_synthetic

    def delay(th):
        return 1.0 - np.exp(-np.asarray(th, float) / 6.0)

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0, "T": delay}, domain="scratch",
                              grid=(10, 12), dx_um=50.0, times_h=np.linspace(0, 24, 7), seed=0)
    shown = []
    monkeypatch.setattr(_results_widget, "show_warning", shown.append)
    viewer = make_napari_viewer()
    res = ResultsWidget(viewer)
    get_state(viewer).update(field=field, equations=Equations.from_forms(D=["700.0"], G=["0.07 - 3e-5*u"],
                                                                         u_range=(0.0, 2000.0)))
    res.sim_model.value = "closed form refitted to the data"
    res.simulate()
    _idle(qtbot, res, timeout=120000)
    assert len(shown) == 1 and "Learn a delay T(t)" in shown[0] and shown[0].startswith("The closed form"), shown
    res.shutdown()


def test_the_docks_scroll_instead_of_stretching_the_window(make_napari_viewer, qtbot):
    """Each dock's content sits in a vertical scroll area: the results dock needs about 1200 pixels, and without
    one it stretched napari's window past a laptop screen's bottom edge. The results plot grows a row for T(t)."""
    from qtpy.QtWidgets import QLabel, QScrollArea

    from napari_binn._napari._batch_widget import BatchWidget
    from napari_binn._napari._density_widget import DensityWidget
    from napari_binn._napari._results_widget import DELAY_PLOT_HEIGHT, PLOT_HEIGHT, ResultsWidget
    from napari_binn._napari._training_widget import TrainingWidget

    viewer = make_napari_viewer()
    docks = [cls(viewer) for cls in (DensityWidget, TrainingWidget, ResultsWidget, BatchWidget)]
    for dock in docks:
        area = dock.findChild(QScrollArea)
        assert area is not None and area.widget().minimumSizeHint().height() > 500, type(dock).__name__
        assert dock.minimumSizeHint().height() < 200, type(dock).__name__
        # never narrower than its content: no horizontal scroll bar, the forms keep their width
        assert dock.minimumSizeHint().width() >= area.widget().minimumSizeHint().width()
    # content that grows wider later (a long status line) widens the dock, rather than being cut off
    train = docks[1]
    viewer.window.add_dock_widget(train, area="right")
    viewer.window._qt_window.show()
    inner = train.findChild(QScrollArea).widget()
    before = train.minimumSizeHint().width()
    inner.layout().addWidget(QLabel("a status line longer than the dock is wide " * 3))
    qtbot.waitUntil(lambda: inner.minimumSizeHint().width() > before + 100, timeout=5000)
    qtbot.waitUntil(lambda: train.minimumSizeHint().width() >= inner.minimumSizeHint().width(), timeout=5000)
    res = docks[2]
    assert res.findChild(QScrollArea).widget().minimumSizeHint().height() > 1000
    assert res.figure.minimumHeight() == PLOT_HEIGHT
    res.figure.set_height(DELAY_PLOT_HEIGHT)
    assert res.figure.minimumHeight() == DELAY_PLOT_HEIGHT
    for dock in docks:
        getattr(dock, "shutdown", lambda: None)()
