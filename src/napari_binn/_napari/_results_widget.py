"""Dock 3: discover closed-form equations, simulate them, compare with the data, export and re-open bundles."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, PushButton
from qtpy.QtCore import Qt
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..symbolic.expression import equation_latex, equation_text
from ._forms import align_labels, fmt_seconds, form, ispin, row, scrolling_layout, section, wrap_label
from ._layers import density_layer_kwargs, show_density, upsert_image
from ._plots import AsyncFigure, draw_band, fit_ylim, legend, rate_bands, style_axes
from ._state import LAYER_NAMES, get_state, register_dock, register_state_id, unregister_dock
from ._workers import CloseGuard, JobHandle, notify_exception, show_info, show_warning

__all__ = ["ResultsWidget"]

_SIM_CLOSED = "closed-form equations"
_SIM_LEARNED = "learned BINN D(u), G(u)"
_SIM_REFIT = "closed form refitted to the data"
_REFITTED = "closed form (refitted)"
#: the results plot's height in pixels: D(u), G(u) and N(t) in a row; with a delay, T(t) in a second row
PLOT_HEIGHT = 250
DELAY_PLOT_HEIGHT = 370


class ResultsWidget(QWidget):
    """Symbolic regression with Pareto tables, forward simulation and QC, the equation on the canvas, bundles.

    The options are magicgui containers (``discover_form``, ``simulate_form``, ``bundle_form``); the Pareto and QC
    tables, the equations' LaTeX images, the plots and the progress bar stay plain Qt.
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        register_state_id(self.state)
        self.job: JobHandle | None = None
        layout = scrolling_layout(self)
        self.input_label = wrap_label()
        layout.addWidget(self.input_label)

        # --- discovery
        self.backend = ComboBox(label="Backend", choices=["operon", "library", "pysr"], value="operon",
                                tooltip="operon: genetic programming (default); library: fast sparse regression over "
                                        "biologically common terms; pysr: optional, needs Julia.")
        self.max_complexity = ispin(20, 3, 60, label="Max. complexity",
                                    tooltip="Largest expression size (number of nodes) searched.")
        self.selection = ComboBox(label="Selection rule", choices=["best", "accuracy", "score"], value="best",
                                  tooltip="Which form of each Pareto front is chosen first (click a table row to "
                                          "choose another).")
        self.discover_btn = PushButton(text="Discover equations")
        self.discover_form = form(self.backend, self.max_complexity, self.selection, self.discover_btn)
        layout.addWidget(section("1. Discover closed forms of the learned D(u), G(u)", self.discover_form))

        self.tables: dict[str, QTableWidget] = {}
        self.latex_labels: dict[str, QLabel] = {}
        for key, title in (("D", "Diffusivity D(u): Pareto front (click a row to choose)"),
                           ("G", "Growth rate G(u): Pareto front (click a row to choose)")):
            layout.addWidget(QLabel(title))
            table = QTableWidget(0, 4)
            table.setHorizontalHeaderLabels(["", "complexity", "loss", "expression"])
            table.verticalHeader().setVisible(False)
            table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
            table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
            table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
            table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
            table.setMinimumHeight(120)
            table.setMaximumHeight(150)
            table.cellClicked.connect(lambda row, _col, k=key: self.choose(k, row))
            layout.addWidget(table)
            self.tables[key] = table
            lab = QLabel()
            lab.setAlignment(Qt.AlignmentFlag.AlignLeft)
            layout.addWidget(lab)
            self.latex_labels[key] = lab
        # after a refit: the forms the data cannot tell apart from each headline, and why the headline was chosen
        self.alternatives = wrap_label("", lines=2)
        self.alternatives.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.alternatives.setVisible(False)
        layout.addWidget(self.alternatives)

        # --- simulation
        self.sim_model = ComboBox(
            label="Model", choices=[_SIM_CLOSED, _SIM_REFIT, _SIM_LEARNED], value=_SIM_CLOSED,
            tooltip=f"{_SIM_CLOSED}: the chosen forms with the constants of the symbolic fit.\n"
                    f"{_SIM_REFIT}: candidate forms from both Pareto fronts and the form library are refitted "
                    "against the density itself and chosen on the held-out last frames (the fewest constants they "
                    "cannot exclude, unless another fits the earlier frames decisively better), with its constants "
                    "and 95% intervals (slower: one simulation per optimiser step); the forms the data cannot tell "
                    "apart are listed under the tables, and a Fisher-KPP fit is added for comparison.\n"
                    f"{_SIM_LEARNED}: the BINN's networks as they are.")
        self.contour = CheckBox(text="Draw the simulated front (line at half the maximum density)", value=True)
        self.simulate_btn = PushButton(text="Simulate")
        self.simulate_form = form(self.sim_model, self.contour, self.simulate_btn)
        layout.addWidget(section("2. Simulate and compare with the data", self.simulate_form))

        run = QHBoxLayout()
        self.progress = QProgressBar()
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        run.addWidget(self.progress)
        run.addWidget(self.cancel_btn.native)
        layout.addLayout(run)
        self.status = wrap_label("")
        layout.addWidget(self.status)

        self.figure = AsyncFigure(PLOT_HEIGHT, min_interval_ms=200, duty=0.5)
        layout.addWidget(self.figure)
        self.qc_table = QTableWidget(0, 4)
        self.qc_table.setHorizontalHeaderLabels(["model", "rel. error", "N(t) error", "max N(t) err."])
        self.qc_table.setToolTip("rel. error: mean over frames of ||simulated - observed|| / ||observed|| in the "
                                 "ROI; N(t) error: mean |%| difference of the total cell number (max: worst frame).")
        self.qc_table.verticalHeader().setVisible(False)
        self.qc_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.qc_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.qc_table.setMaximumHeight(150)
        layout.addWidget(self.qc_table)

        # --- bundles
        self.bundle_path = FileEdit(mode="d", nullable=True, label="Folder",
                                    tooltip="The bundle folder: written by Export (a new folder, or an existing one "
                                            "with Overwrite), read by Open.")
        self.bundle_path.line_edit.native.setPlaceholderText("folder to write / read")
        self.bundle_path.choose_btn.text = "Browse…"
        self.overwrite = CheckBox(text="Overwrite an existing folder", value=False)
        self.export_btn = PushButton(text="Export bundle")
        self.open_btn = PushButton(text="Open bundle")
        self.bundle_form = form(self.bundle_path, self.overwrite, row(self.export_btn, self.open_btn))
        layout.addWidget(section("3. Results bundle (folder with data, networks, equations, report)",
                                 self.bundle_form))
        layout.addStretch(1)

        self.discover_btn.changed.connect(self.discover)
        self.simulate_btn.changed.connect(self.simulate)
        self.cancel_btn.changed.connect(self.cancel)
        self.export_btn.changed.connect(self.export)
        self.open_btn.changed.connect(self._open_clicked)

        self.state.events.result.connect(self._state_changed)
        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        self._guard = CloseGuard(self, self.shutdown)
        register_dock(self.viewer, "results", self)
        self._state_changed()
        self.show_equations()
        for layer in list(self.viewer.layers):  # a bundle opened with File > Open before this dock
            self._adopt_bundle_layer(layer)

    # ------------------------------------------------------------------------------------------ state
    def _state_changed(self, *args: Any) -> None:
        s = self.state
        parts = [("density", s.field), ("trained BINN", s.fit), ("equations", s.equations)]
        have = ", ".join(n for n, v in parts if v is not None) or "nothing yet"
        nxt = ("extract the density (density dock)" if s.field is None else
               "train a BINN (training dock)" if s.fit is None else
               "discover equations below" if s.equations is None else
               "simulate and compare" if not s.simulations else "export the bundle")
        self.input_label.setText(f"Available: {have}. Next: {nxt}.")

    # ------------------------------------------------------------------------------------------ jobs
    def _start(self, factory: Any, what: str, on_result: Any) -> JobHandle | None:
        if self.job is not None and self.job.running:
            show_info(f"Wait for the running job to finish (or Cancel it) before: {what}.")
            return None
        self.progress.setValue(0)
        self.status.setText(f"{what}…")
        self.cancel_btn.enabled = True
        for b in (self.discover_btn, self.simulate_btn, self.export_btn, self.open_btn):
            b.enabled = False
        self.job = JobHandle(factory, what=what, on_event=self._event, on_result=on_result,
                             on_finished=self._finished)
        return self.job

    def _event(self, ev: Any) -> None:
        if ev.fraction is not None:
            self.progress.setValue(int(100 * ev.fraction))
        self.status.setText(f"{ev.message} — ETA {fmt_seconds(ev.eta_s)}")

    def _finished(self) -> None:
        self.cancel_btn.enabled = False
        for b in (self.discover_btn, self.simulate_btn, self.export_btn, self.open_btn):
            b.enabled = True

    def cancel(self) -> None:
        if self.job is not None and self.job.running:
            self.job.token.cancel()
            self.status.setText("Cancelling…")

    # ------------------------------------------------------------------------------------------ discovery
    def symbolic_config(self):
        """The discovery settings of the form (backend, max. complexity, selection rule) as a SymbolicConfig."""
        from ..pipeline import SymbolicConfig

        return SymbolicConfig(backend=self.backend.value, max_complexity=self.max_complexity.value,
                              selection=self.selection.value)

    def discover(self) -> JobHandle | None:
        """Symbolic regression of the current BINN's D(u) and G(u) in a worker."""
        fit = self.state.fit
        if fit is None:
            notify_exception(ValueError("No trained BINN: train one in the training dock first (or open a results "
                                        "bundle)."), "Equation discovery")
            return None
        sc = self.symbolic_config()

        def job(token):
            from ..symbolic import discover_equations_job

            return discover_equations_job(fit, backend=sc.backend, max_complexity=sc.max_complexity,
                                          selection=sc.selection, cancel=token)

        return self._start(job, "Equation discovery", lambda eq: self._discovered(eq, sc))

    def _discovered(self, eq: Any, sc: Any) -> None:
        self.state.update(equations=eq, config=dataclasses.replace(self.state.config, symbolic=sc))
        self.progress.setValue(100)
        self.status.setText(f"Equations found with {eq.backend}. Click a table row to choose another form; "
                            "then Simulate.")
        self.show_equations()

    def choose(self, key: str, row: int) -> None:
        """The user picked row ``row`` of the ``key`` ('D' or 'G') Pareto front."""
        eq = self.state.equations
        f = getattr(eq, key, None) if eq is not None else None
        if f is None or row == f.selected_index:
            return
        self.state.update(equations=dataclasses.replace(eq, **{key: f.pick(row)}))
        self.show_equations()
        show_info(f"{key}(u) = {getattr(self.state.equations, key).text}: simulate again to compare it.")

    def show_equations(self) -> None:
        """Fill the Pareto tables (selected row starred and bold), the LaTeX labels and the canvas text."""
        eq = self.state.equations
        backend = getattr(eq, "backend", "")
        if backend and backend in self.backend.choices:
            self.backend.value = backend
        lines = []
        for key in ("D", "G"):
            table, label = self.tables[key], self.latex_labels[key]
            f = getattr(eq, key, None) if eq is not None else None
            table.setRowCount(0)
            if f is None:
                label.clear()
                continue
            table.setRowCount(len(f.rows))  # the Pareto front, then the library forms (named)
            for i, r in enumerate(f.rows):
                chosen = i == f.selected_index
                text = r.expression.text + (f"   [{r.form}]" if r.form else "")
                cells = ("★" if chosen else "", str(r.complexity), f"{r.loss:.3g}", text)
                for j, val in enumerate(cells):
                    item = QTableWidgetItem(val)
                    if chosen:
                        font = QFont()
                        font.setBold(True)
                        item.setFont(font)
                    table.setItem(i, j, item)
            table.selectRow(f.selected_index)
            table.scrollToItem(table.item(f.selected_index, 0))
            table.resizeColumnsToContents()
            table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
            label.setPixmap(_latex(equation_latex(key, f)))
            label.setToolTip(equation_text(key, f))
            lines.append(equation_text(key, f, pretty=True))
        from ..pipeline import alternatives_text

        alt = alternatives_text(eq) if eq is not None else []
        self.alternatives.setText(alternatives_display(alt))
        self.alternatives.setVisible(bool(alt))
        delay = []
        if lines:
            from ..pipeline import delay_text

            fld = self.state.field
            delay = delay_text(self.state.fit, fld.t_h if fld is not None else None, short=True,
                               metadata=self.state.metadata)
        self._canvas_text("\n".join(lines + delay), delay=bool(delay))
        self._plot()

    def _canvas_text(self, text: str, delay: bool = False) -> None:
        overlay = _text_overlay(self.viewer)
        if overlay is None:
            return
        pde = "∂u/∂t = T(t)·[∇·(D(u)∇u) + G(u)·u]" if delay else "∂u/∂t = ∇·(D(u)∇u) + G(u)·u"
        overlay.text = (pde + "\n" + text) if text else ""
        overlay.visible = bool(text)
        overlay.font_size = 10
        overlay.color = "white"
        overlay.position = "top_left"
        overlay.box = True

    # ------------------------------------------------------------------------------------------ simulation
    def simulate(self) -> JobHandle | None:
        """Forward simulation of the chosen model from the data's initial state, in a worker: the pipeline's
        'simulate' and 'qc' stages on the shared result; then layers, N(t) and QC."""
        s = self.state
        if s.field is None:
            notify_exception(ValueError("No density field: extract one in the density dock (or open a bundle)."),
                             "Simulation")
            return None
        model = self.sim_model.value
        if model == _SIM_REFIT:
            return self.refit()
        if model == _SIM_CLOSED:
            eq = s.equations
            if eq is None or eq.D is None or eq.G is None:
                notify_exception(ValueError("No equations: click 'Discover equations' first, or simulate the "
                                            "learned BINN."), "Simulation")
                return None
            name, which = "closed form", {"learned": False, "closed_form": True}
        else:
            if s.fit is None:
                notify_exception(ValueError("No trained BINN: train one in the training dock first."), "Simulation")
                return None
            name, which = "learned D, G", {"learned": True, "closed_form": False}
        start = s.result
        config = dataclasses.replace(start.config, simulation=dataclasses.replace(start.config.simulation, **which))
        return self._run_stages(("simulate", "qc"), start, config, "Simulation",
                                lambda res: self._simulated(res, name))

    def refit(self) -> JobHandle | None:
        """Refit candidate closed forms against the density in a worker (the pipeline's 'refit' and 'qc' stages on
        the shared result, with its configuration), keep the BIC's choice with its refitted constants, and show its
        simulation next to the reference model's."""
        s = self.state
        eq = s.equations
        if s.field is None:
            notify_exception(ValueError("No density field: extract one in the density dock (or open a bundle)."),
                             "Refit")
            return None
        if eq is None or eq.D is None or eq.G is None:
            notify_exception(ValueError("No equations: click 'Discover equations' first."), "Refit")
            return None
        start = s.result
        return self._run_stages(("refit", "qc"), start, start.config, "Refit against the data",
                                lambda res: self._refitted(res, start))

    def _run_stages(self, stages: tuple[str, ...], start: Any, config: Any, what: str, on_result: Any):
        def job(token):
            from ..pipeline import run_pipeline

            return run_pipeline(start, config, stages=stages, cancel=token)

        return self._start(job, what, on_result)

    def _keep(self, res: Any, **parts: Any) -> None:
        """Put what a pipeline run of this dock made into the shared result (the run's configuration stays this
        dock's choice of model, not the shared one)."""
        s = self.state
        s.update(simulations=res.simulations, mechanistic=res.mechanistic, qc=res.qc,
                 metadata={**s.metadata, **res.metadata}, **parts)

    def _refitted(self, res: Any, start: Any) -> None:
        fit = res.mechanistic.get(_REFITTED)
        if fit is None or fit is start.mechanistic.get(_REFITTED) or _REFITTED not in res.simulations:
            show_warning("The refit did not finish (cancelled, or no candidate could be simulated); the equations "
                         "are unchanged.")
            return
        self._keep(res, equations=res.equations.with_refit(fit))
        self.progress.setValue(100)
        self.show_equations()
        self.show_simulation(_REFITTED)
        n = len(res.metadata.get("refit_candidates", [])) or 1
        consts = _refit_constants_line(res)
        held = (res.metadata.get("holdout") or {}).get("frames")
        how = (f"{n} candidate fit(s); forms chosen on the last {held} frame(s) held out" if held else
               f"{n} candidate form(s) compared by BIC")
        self.status.setText(f"Refitted against the data ({how}): {consts}. Next: export the bundle.")
        before = set(start.metadata.get("warnings", []))
        for w in res.metadata.get("warnings", []):
            if w not in before and "Learn a delay T(t)" in w:  # the refit's delay check (refit.delay_check)
                show_warning(w[0].upper() + w[1:])

    def _simulated(self, res: Any, name: str) -> None:
        if name not in res.simulations:
            failed = [w for w in res.metadata.get("warnings", []) if f"'{name}' failed" in w]
            show_warning(f"Simulation: {failed[-1] if failed else 'cancelled'}")
            return
        self._keep(res)
        self.progress.setValue(100)
        self.show_simulation(name)
        self.status.setText(f"Simulated '{name}': layers '{LAYER_NAMES['simulated']}' and "
                            f"'{LAYER_NAMES['residual']}' added. Next: export the bundle.")

    def _layer_frame(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(scale, translate) for (T, Ny, Nx) arrays of the field: those of the density layer, else from the grid."""
        if LAYER_NAMES["density"] in self.viewer.layers:
            ly = self.viewer.layers[LAYER_NAMES["density"]]
            return tuple(ly.scale), tuple(ly.translate)
        kwargs = density_layer_kwargs(self.state.field)
        return kwargs["scale"], kwargs["translate"]

    def show_simulation(self, name: str | None = None) -> None:
        """Simulated, residual and contour layers over the data; QC table; plots."""
        from ..qc import residual_maps

        s = self.state
        if s.field is None or not s.simulations:
            return
        name = name if name in s.simulations else next(iter(s.simulations))
        sim = s.simulations[name]
        scale, translate = self._layer_frame()
        finite = s.field.u[np.isfinite(s.field.u)]
        hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        meta = {"napari_binn_output": "simulation", "model": name, "units": s.field.units,
                "napari_binn_state": id(s)}
        upsert_image(self.viewer, LAYER_NAMES["simulated"], sim, scale=scale, translate=translate,
                     colormap="viridis", opacity=0.6, contrast_limits=(0.0, hi), metadata=meta)
        res = residual_maps(s.field, sim)
        rmax = float(np.nanmax(np.abs(res))) if np.any(np.isfinite(res)) else 1.0
        resid = upsert_image(
            self.viewer, LAYER_NAMES["residual"], res, scale=scale, translate=translate, colormap="bwr",
            contrast_limits=(-rmax or -1.0, rmax or 1.0), opacity=0.7, visible=False,
            metadata={**meta, "napari_binn_output": "residual",
                      "meaning": "observed minus simulated; red: model too low, blue: too high"})
        resid.colorbar.visible = True
        if LAYER_NAMES["contour"] in self.viewer.layers:
            self.viewer.layers.remove(LAYER_NAMES["contour"])
        if self.contour.value:
            paths = _front_paths(sim, s.field.mask, scale, translate)
            if paths:
                self.viewer.add_shapes(paths, shape_type="path", name=LAYER_NAMES["contour"], edge_color="orange",
                                       edge_width=0.15 * scale[-1], ndim=3,
                                       metadata={**meta, "napari_binn_output": "contour"})
        self.show_qc()
        self._plot()

    def show_qc(self) -> None:
        qc = self.state.qc
        models = list(qc.models) if qc is not None else []
        self.qc_table.setRowCount(len(models))
        for i, m in enumerate(models):
            for j, val in enumerate((m.name, f"{100 * m.mean_rel_l2:.1f} %", f"{m.mean_abs_count_error_pct:.2f} %",
                                     f"{m.max_abs_count_error_pct:.2f} %")):
                self.qc_table.setItem(i, j, QTableWidgetItem(val))

    def _plot(self) -> None:
        """D(u), G(u) (learned vs closed form) and N(t) (observed vs simulated), drawn off the GUI thread."""
        from ..qc import total_count

        s = self.state
        rates: dict[str, Any] = {}
        u = None
        bands: dict[str, Any] = {}
        delay = None
        if s.fit is not None:
            u = s.fit.u_grid(101)
            rates["learned"] = (u, s.fit.D(u), s.fit.G(u))
            bands = rate_bands(s.fit, u)
            from ..pipeline import learned_delay, refitted_delay

            T = learned_delay(s)
            if T is not None and s.field is not None:  # the learned T(t) (and the refit's own, refit.delay)
                t = np.linspace(float(s.field.t_h[0]), float(s.field.t_h[-1]), 101)
                delay = {"learned": (t, T(t))}
                T_refit = refitted_delay(s)
                if T_refit is not None:
                    delay["refitted"] = (t, T_refit(t))
        eq = s.equations
        if eq is not None and eq.D is not None and eq.G is not None:
            if u is None:
                lo, hi = eq.D.u_range
                u = np.linspace(lo, hi, 101) if np.all(np.isfinite([lo, hi])) else np.linspace(0, 1, 101)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rates["closed form"] = (u, np.broadcast_to(eq.D(u), u.shape), np.broadcast_to(eq.G(u), u.shape))
        counts: dict[str, Any] = {}
        units = ""
        if s.field is not None:
            fld = s.field
            counts["observed"] = (fld.t_h, total_count(fld.u, fld.mask, fld.dx_um, fld.units))
            for name, sim in s.simulations.items():
                counts[name] = (fld.t_h, total_count(sim, fld.mask, fld.dx_um, fld.units))
            units = fld.units
        if rates or counts:
            self.figure.set_height(DELAY_PLOT_HEIGHT if delay else PLOT_HEIGHT)
            self.figure.render(_plot_results, rates, counts, units, bands, delay)

    # ------------------------------------------------------------------------------------------ bundles
    def _bundle_dir(self) -> Path | None:
        text = self.bundle_path.line_edit.value.strip()
        if not text:
            notify_exception(ValueError("Enter the bundle folder (or use Browse…)."), "Results bundle")
            return None
        return Path(text).expanduser()

    def export(self) -> JobHandle | None:
        """Write the shared result as a bundle (data, networks, equations, simulations, refits, QC, figures,
        report) in a worker."""
        target = self._bundle_dir()
        if target is None:
            return None
        if self.state.field is None and self.state.fit is None:
            notify_exception(ValueError("Nothing to export yet: extract a density and train a BINN first."),
                             "Export")
            return None
        result, overwrite = self.state.result, self.overwrite.value

        def job(token):
            from ..results import save_results

            return save_results(result, target, overwrite=overwrite)

        return self._start(job, "Export", self._exported)

    def _exported(self, path: Path) -> None:
        self.state.bundle = str(path)
        self.progress.setValue(100)
        self.status.setText(f"Bundle written to {path} (open report.html in a browser).")
        show_info(f"Results bundle written: {path}")

    def _open_clicked(self) -> None:
        self.open_bundle()

    def open_bundle(self, path: str | Path | None = None) -> JobHandle | None:
        """Read a bundle in a worker and restore the layers, equations, tables and plots."""
        target = Path(path) if path else self._bundle_dir()
        if target is None:
            return None

        def job(token):
            from ..results import load_results

            return load_results(target)

        return self._start(job, "Open bundle", lambda result: self.restore(result, str(target)))

    def restore(self, result: Any, bundle: str = "") -> None:
        """Put a loaded PipelineResult into the shared state and show it (layers aligned in µm)."""
        s = self.state
        s.bundle = bundle
        if result.qc is None and result.field is not None and result.simulations:
            from ..qc import compare

            result = dataclasses.replace(result, qc=compare(result.field, result.simulations))
        constants = _refit_constants_line(result)
        refitted = result.refitted_equations()  # show the constants the data support, as after a refit here
        if refitted is not result.equations:
            result = dataclasses.replace(result, equations=refitted)
        s.result = result
        fld = s.field
        if fld is not None:
            source = fld.metadata.get("source", "")
            image = self.viewer.layers[source] if source and source in self.viewer.layers else None
            show_density(self.viewer, fld, image, napari_binn_bundle=bundle, napari_binn_state=id(s))
            if image is None:
                show_warning(f"The image this result was computed from ({source or 'unknown'!r}) is not open: the "
                             "layers are placed in µm; open that image to see them over it.")
        self.show_equations()
        if s.simulations:
            preferred = next((n for n in (_REFITTED, "closed form") if n in s.simulations), None)
            self.show_simulation(preferred)
        self.status.setToolTip(str(bundle))
        self.status.setText(f"Opened {Path(bundle).name if bundle else 'the result'}: " + ", ".join(
            n for n, v in (("density", s.field), ("BINN", s.fit), ("equations", s.equations),
                           ("simulations", s.simulations or None)) if v is not None) + "."
                            + (f" Constants refitted against the data (95% intervals): {constants}." if constants else ""))

    def _layer_inserted(self, event: Any) -> None:
        self._adopt_bundle_layer(event.value)

    def _adopt_bundle_layer(self, layer: Any) -> None:
        """A layer opened by the bundle reader (File > Open on a bundle folder): load the rest of the bundle."""
        meta = layer.metadata or {}
        bundle = meta.get("napari_binn_bundle")
        if not bundle or bundle == self.state.bundle or (self.job is not None and self.job.running):
            return
        self.state.bundle = bundle
        result = meta.get("napari_binn_result")
        if result is not None:
            self.restore(result, bundle)
        else:
            self.open_bundle(bundle)

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Stop the running job and the plot thread: the dock or the viewer is closing."""
        unregister_dock(self.viewer, "results", self)
        if self.job is not None:
            self.job.stop(detach=True)
        self.figure.shutdown()
        try:
            self.viewer.layers.events.inserted.disconnect(self._layer_inserted)
            self.state.events.result.disconnect(self._state_changed)
        except (TypeError, ValueError, RuntimeError):
            pass

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        align_labels(self.discover_form, self.simulate_form, self.bundle_form)
        super().showEvent(event)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)


def alternatives_display(lines: list[str]) -> str:
    """The report's 'cannot tell apart' lines (``pipeline.alternatives_text``) one form per line: the headline starred
    (with the reason it was chosen), the others bulleted."""
    import re

    out = []
    for line in lines:
        title, sep, rest = line.partition("apart: ") if "apart: " in line else line.partition("%): ")
        if not sep:
            out.append(line)
            continue
        items = re.split(r"; (?!symbolic fit)", rest)  # '(refitted; symbolic fit ...)' stays with its form
        out.append(title + sep.rstrip())
        first = "★" if "apart" in sep else "•"
        out += [f"   {first} {items[0]}"] + [f"   • {x}" for x in items[1:]]
    return "\n".join(out)


def _front_paths(sim: np.ndarray, mask: np.ndarray, scale: tuple, translate: tuple) -> list[np.ndarray]:
    """Iso-lines of each simulated frame at half its 95th-percentile density (the front), as (t, y, x) world
    paths for a Shapes layer; contours are traced inside the ROI mask only."""
    from skimage.measure import find_contours

    finite = sim[np.isfinite(sim)]
    if not finite.size:
        return []
    level = 0.5 * float(np.percentile(finite, 95))
    st, sy, sx = (float(v) for v in scale)
    tt, ty, tx = (float(v) for v in translate)
    paths = []
    for t, frame in enumerate(sim):
        for c in find_contours(np.nan_to_num(frame), level, mask=mask):
            if len(c) >= 2:
                paths.append(np.column_stack([np.full(len(c), tt + st * t), ty + sy * c[:, 0], tx + sx * c[:, 1]]))
    return paths


def _refit_constants_line(result: Any) -> str:
    """The refitted constants with their intervals and units on one status line ("" without a refit)."""
    from ..pipeline import refit_constants_text

    return "; ".join(" ".join(line.split()) for line in refit_constants_text(result))


def _latex(text: str):
    from ._plots import latex_pixmap

    return latex_pixmap(text)


def _text_overlay(viewer: Any) -> Any:
    """napari >= 0.9: ``viewer.canvas.overlays.text``; older napari: ``viewer.text_overlay``."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "text"):
        return overlays.text
    return getattr(viewer, "text_overlay", None)


def _plot_results(fig: Any, rates: dict[str, Any], counts: dict[str, Any], units: str,
                  bands: dict[str, Any] | None = None, delay: dict[str, tuple[Any, Any]] | None = None) -> None:
    """D(u), G(u) (the learned curve's ± 2 sd band, the undetermined densities greyed) and N(t) panels, and the
    delay T(t) when there is one (plot thread): ``delay`` maps 'learned' (and 'refitted', the refitted closed
    form's) to (t, T(t)), drawn in the rate panels' styles."""
    if not delay:
        axes = fig.subplots(1, 3)
        fig.subplots_adjust(left=0.09, right=0.98, top=0.88, bottom=0.2, wspace=0.5)
    else:  # T(t) in a row of its own below, as wide as the three (the figure is taller: DELAY_PLOT_HEIGHT)
        grid = fig.add_gridspec(2, 3, height_ratios=[1.0, 0.5], left=0.09, right=0.98, top=0.92, bottom=0.11,
                                wspace=0.5, hspace=0.75)
        axes = [fig.add_subplot(grid[0, i]) for i in range(3)] + [fig.add_subplot(grid[1, :])]
    ax_d, ax_g, ax_n = axes[:3]
    if delay:
        ax_t = axes[3]
        style_axes(ax_t, "T(t), the delay", "time (h)", "")  # the canvas says which T each simulation holds
        for name, color, style in (("learned", "C0", "-"), ("refitted", "C1", "--")):
            if name in delay:
                ax_t.plot(*delay[name], style, color=color, lw=1.6, label=name)
        ax_t.set_ylim(0.0, 1.05)
        legend(ax_t)
    u_label = f"u ({units})" if units else "u"
    for ax, idx, title, unit in ((ax_d, 1, "D(u)", "µm²/h"), (ax_g, 2, "G(u)", "1/h")):
        style_axes(ax, title, u_label, unit)
        band = (bands or {}).get(title[0])
        if band is not None and "learned" in rates:
            draw_band(ax, rates["learned"][0], rates["learned"][idx], band[0], band[1], color="C0")
        for (name, vals), style in zip(rates.items(), ("-", "--")):
            ax.plot(vals[0], vals[idx], style, lw=1.6, label=name)
        fit_ylim(ax, [vals[idx] for vals in rates.values()], nonnegative=idx == 1)
        if idx == 1:  # one legend for both rate panels (they share the entries)
            legend(ax)
    n_unit = "cells" if units == "cells/mm²" else f"{units}·mm²"
    style_axes(ax_n, "N(t) in the ROI", "time (h)", n_unit)
    for name, (t, n) in counts.items():
        ax_n.plot(t, n, "o" if name == "observed" else "-", ms=3, lw=1.6, label=name)
    legend(ax_n)
