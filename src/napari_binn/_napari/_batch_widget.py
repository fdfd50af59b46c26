"""Dock 4: one analysis per shape: the whole pipeline on each closed shape of the ROI layer, one bundle each.

The image, calibration, ROI layer and density method are those of the Density extraction dock's current form
(read through :meth:`DensityWidget.analysis_inputs`, never copied into a form of its own); the BINN settings are
the training dock's (or the defaults) with this dock's steps and ensemble size; the equation discovery settings
are the results dock's (or the defaults). Every shape is one item of the core's batch engine
(:mod:`napari_binn.batch`, the same as ``napari-binn batch``), run from one background worker (here, one shape
after another; on a local dask cluster, one shape per core; or on an existing dask cluster: "Run on") and saved to
``<folder>/shape_<n>``, with ``<folder>/summary.csv`` at the end.
"""

from __future__ import annotations

import copy
import time
import weakref
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, FileEdit, LineEdit, PushButton
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QHeaderView, QProgressBar, QTableWidget, QTableWidgetItem, QWidget

from ..batch import STAGE_NAMES, BatchItem, ItemOutcome, check_outputs
from ..roi import closed_shapes
from ._forms import align_labels, fmt_seconds, form, ispin, row, scrolling_layout, section, wrap_label
from ._layers import shapes_to_roi
from ._state import find_dock, get_docks
from ._workers import CloseGuard, JobHandle, notify_exception, show_info

__all__ = ["BatchWidget"]

_WHAT = "Per-shape batch"
#: "Run on" choices: (label, cluster argument of run_batch; "address" = the address field).
RUN_ON = {"this computer, one shape at a time": None,
          "this computer, every core (local dask cluster)": "local",
          "a dask cluster (scheduler address)": "address"}


class BatchWidget(QWidget):
    """Run the whole pipeline once per closed shape of the density dock's ROI layer; one bundle per shape.

    The run settings are a magicgui container (``run_form``: output folder, BINN steps, ensemble size); the inputs
    summary, progress bar, status and the results table stay plain Qt.
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        from ..binn import BinnConfig

        self.viewer = napari_viewer
        self.job: JobHandle | None = None
        self.runs: list[ItemOutcome] = []  # one per shape, in table order
        self.numbers: list[int] = []  # the shapes' numbers in the ROI layer (1-based)
        self._out: Path | None = None
        self._roi_layer = ""
        self._item_progress: dict[int, tuple[float, str]] = {}  # running shapes: (fraction, stage)
        self._t0 = 0.0
        self._shown_result = False
        self._density_hooked: Any = None
        training = find_dock(napari_viewer, "training")
        try:
            defaults = training.config() if training is not None else BinnConfig()
        except ValueError:
            defaults = BinnConfig()

        # --- 1. inputs (read from the other docks)
        self.inputs_label = wrap_label("", lines=5)

        # --- 2. run
        self.folder = FileEdit(mode="d", nullable=True, label="Output folder",
                               tooltip="Each shape's results bundle is written to <folder>/shape_<n>, n = the "
                                       "shape's number in the ROI layer. Existing non-empty shape_<n> folders are "
                                       "never overwritten: the run is refused before it starts.")
        self.folder.line_edit.native.setPlaceholderText("folder for shape_1, shape_2, …")
        self.folder.choose_btn.text = "Browse…"
        self.steps = ispin(defaults.steps, 1, 1_000_000, label="BINN steps",
                           tooltip="Training steps per network, for every shape. The data-only warm-up keeps its "
                                   "share of the steps; all other BINN settings are the training dock's when it "
                                   "is open, else the defaults.")
        self.n_models = ispin(defaults.n_models, 1, 20, label="Ensemble size",
                              tooltip="Networks per shape (several give uncertainty bands).")
        self.run_on = ComboBox(choices=list(RUN_ON), value=next(iter(RUN_ON)), label="Run on",
                               tooltip="Where the shapes run: here one after another; on every core of this computer "
                                       "(a local dask cluster, one shape per core; needs napari-binn[distributed]); "
                                       "or on an existing dask cluster given by its scheduler address. The results "
                                       "are the same.")
        self.address = LineEdit(value="", label="Scheduler",
                                tooltip="The dask scheduler's address, tcp://host:8786 (what the scheduler prints "
                                        "when it starts). The workers must be able to import napari-binn.")
        self.address.native.setPlaceholderText("tcp://host:8786")
        self.address.enabled = False
        self.run_on.changed.connect(lambda v: setattr(self.address, "enabled", RUN_ON[v] == "address"))
        self.run_form = form(self.folder, self.steps, self.n_models, self.run_on, self.address)
        self.run_btn = PushButton(text="Run each shape")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = QProgressBar()
        self.progress.setFormat("%p%")
        self.status = wrap_label("")

        # --- 3. results
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["shape", "D(u), µm²/h", "G(u), 1/h", "N(t) error", "bundle"])
        self.table.horizontalHeaderItem(0).setToolTip("The shape's number in the ROI layer (the order the shapes "
                                                      "were drawn); click a row to select that shape there.")
        for col in (1, 2):
            self.table.horizontalHeaderItem(col).setToolTip(
                "The closed form chosen for the shape, with its constants refitted to the shape's density (the "
                "symbolic regression's constants when there was no refit); hover a cell for the whole equation.")
        self.table.horizontalHeaderItem(3).setToolTip(
            "Mean |%| difference between the simulated and observed total cell number N(t) in the shape (closed "
            "form refitted to the data when available; hover a cell for the model).")
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(False)
        self.table.setMinimumHeight(140)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        for col in (1, 2):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.Stretch)
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.detail = wrap_label("", lines=3)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_btn = PushButton(text="Open selected in the results dock",
                                   tooltip="Open the selected shape's bundle in the 'Equations and results' dock "
                                           "(layers, equations, plots); double-clicking a row does the same.")

        layout = scrolling_layout(self)
        layout.addWidget(section("1. Inputs (from the Density extraction dock)", self.inputs_label))
        layout.addWidget(section("2. One analysis per closed shape", self.run_form,
                                 row(self.run_btn, self.cancel_btn), self.progress, self.status))
        layout.addWidget(section("3. Results (one row per shape)", self.table, self.detail, self.open_btn))
        layout.addStretch(1)

        self._summary_timer = QTimer(self)
        self._summary_timer.setSingleShot(True)
        self._summary_timer.setInterval(200)
        self._summary_timer.timeout.connect(self.update_inputs)

        self.run_btn.changed.connect(self._run_clicked)
        self.cancel_btn.changed.connect(self.cancel)
        self.open_btn.changed.connect(self.open_selected)
        self._docks = get_docks(napari_viewer)
        self._docks.changed.connect(self._docks_changed)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.renamed):
            event.connect(self._schedule_inputs)
        self._guard = CloseGuard(self, self.shutdown)
        self._hook_density()
        self.update_inputs()

    # ------------------------------------------------------------------------------------------ inputs
    def _docks_changed(self, role: str) -> None:
        if role == "density":
            self._hook_density()
        self._schedule_inputs()

    def _hook_density(self) -> None:
        """Follow the open density dock's form (its ``settings_changed``), dropping the previous one."""
        density = find_dock(self.viewer, "density")
        old = self._density_hooked() if self._density_hooked is not None else None
        if old is density:
            return
        self._unhook_density()
        if density is not None:
            density.settings_changed.connect(self._schedule_inputs)
            self._density_hooked = weakref.ref(density)

    def _unhook_density(self) -> None:
        """Stop following the density dock hooked by :meth:`_hook_density`, if any."""
        old = self._density_hooked() if self._density_hooked is not None else None
        if old is not None:
            try:
                old.settings_changed.disconnect(self._schedule_inputs)
            except (TypeError, RuntimeError):
                pass
        self._density_hooked = None

    def _schedule_inputs(self, *args: Any) -> None:
        self._summary_timer.start()

    def update_inputs(self) -> None:
        """Say what a run would use: the density dock's image, ROI layer and method; the BINN and equation settings."""
        from ..pipeline import PipelineConfig

        density = find_dock(self.viewer, "density")
        if density is None:
            self.inputs_label.setText(
                "Open the Density extraction dock (Plugins > napari-binn > Density extraction) and choose the image "
                "layer, its calibration, the ROI layer and the density method there: this dock runs each shape with "
                "those settings.")
            return
        try:
            stack, image, dc, shapes = density.analysis_inputs()
        except ValueError as exc:
            self.inputs_label.setText(f"Density dock: {exc}")
            return
        if stack.metadata.get("time_units") == "frames":
            when = "frame interval unknown (times in frames)"
        else:
            step = float(np.median(np.diff(stack.times_h))) if len(stack.times_h) > 1 else 0.0
            when = f"every {step:g} h"
        lines = [f"Image '{image.name}': {stack.data.shape[0]} frames, {stack.pixel_size_um:g} µm/px, {when}."]
        if shapes is None:
            lines.append("ROI layer: none chosen. Choose a Shapes layer in the density dock's 'ROI layer' (or draw "
                         "one with 'New ROI layer'): each closed shape is one analysis.")
        else:
            n = len(closed_shapes(shapes.shape_type))
            lines.append(f"ROI layer '{shapes.name}': {n} closed shape{'s' if n != 1 else ''} "
                         f"→ {n} analys{'e' if n != 1 else 'i'}s.")
        lines.append(f"Density: {dc.method}, {dc.box_um:g} µm boxes.")
        training = find_dock(self.viewer, "training") is not None
        results = find_dock(self.viewer, "results")
        backend = (f"{results.symbolic_config().backend} (results dock)" if results is not None else
                   f"{PipelineConfig().symbolic.backend} (default)")
        lines.append("BINN: " + ("the training dock's settings" if training else "default settings") +
                     f", steps and ensemble size below. Equations: {backend}.")
        self.inputs_label.setText("\n".join(lines))

    def pipeline_config(self, density_config: Any, base: Any = None) -> Any:
        """The PipelineConfig of every shape's run.

        ``base`` (a PipelineConfig) replaces the other docks' settings (used by tests and scripts); otherwise the
        BINN settings are the training dock's and the discovery settings the results dock's, when they are open.
        The density settings are always the density dock's; steps and ensemble size this dock's.
        """
        from ..pipeline import PipelineConfig

        cfg = copy.deepcopy(base) if base is not None else PipelineConfig()
        if base is None:
            training = find_dock(self.viewer, "training")
            if training is not None:
                cfg.binn = training.config()
            results = find_dock(self.viewer, "results")
            if results is not None:
                cfg.symbolic = results.symbolic_config()
        cfg.density = copy.deepcopy(density_config)
        cfg.binn = cfg.binn.with_steps(self.steps.value).replace(n_models=self.n_models.value)
        return cfg

    def _plan(self, base: Any) -> tuple[list[BatchItem], list[int], Any, list[str]]:
        """(batch items, shape numbers, stack, notes) of a run; ValueError/FileExistsError says what to fix."""
        density = find_dock(self.viewer, "density")
        if density is None:
            raise ValueError("Open the Density extraction dock first (Plugins > napari-binn > Density extraction) "
                             "and choose the image, the ROI layer and the density method there: this dock runs "
                             "each shape with those settings.")
        stack, image, dc, shapes = density.analysis_inputs()
        if shapes is None:
            raise ValueError("No ROI layer is chosen in the density dock: choose a Shapes layer in its 'ROI layer' "
                             "(or draw one with 'New ROI layer'); each closed shape is one analysis.")
        indices = closed_shapes(shapes.shape_type)
        if not indices:
            raise ValueError(f"The ROI layer '{shapes.name}' has no closed shape: draw a rectangle, polygon or "
                             "ellipse around each region to analyse (lines and paths enclose no area).")
        text = self.folder.line_edit.value.strip()
        if not text:
            raise ValueError("Choose the output folder (Browse…): each shape's bundle is written to "
                             "<folder>/shape_<n>.")
        out = Path(text).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file, not a folder: choose a folder for the bundles.")
        cfg = self.pipeline_config(dc, base)
        meta = {"source_layer": image.name, "roi_layer": shapes.name}
        items, notes = [], []
        for i in indices:
            roi, shape_notes = shapes_to_roi(shapes, image, only=[i])
            notes += [n for n in shape_notes if n not in notes]
            shape = {"number": i + 1, "polygons_px": [np.asarray(p).tolist() for p in roi]}
            items.append(BatchItem(f"shape_{i + 1}", stack, cfg, out / f"shape_{i + 1}", roi=roi,
                                   metadata={**meta, "roi_shape": shape}))
        check_outputs(items)
        return items, [i + 1 for i in indices], stack, notes

    def where(self) -> tuple[Any, str]:
        """(run_batch's ``cluster``, a description) of the "Run on" choice; ValueError says what is missing."""
        cluster = RUN_ON[self.run_on.value]
        if cluster is None:
            return None, "here, one shape at a time"
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ValueError("Running on a dask cluster needs dask.distributed, which is not installed: pip install "
                             "'napari-binn[distributed]', or choose 'Run on: this computer, one shape at a time'."
                             ) from None
        if cluster == "local":
            return "local", "on a local dask cluster (one worker per core)"
        address = self.address.value.strip()
        if not address:
            raise ValueError("Give the dask scheduler's address (tcp://host:8786), or choose another 'Run on'.")
        if "://" not in address:
            raise ValueError(f"'{address}' is not a dask scheduler address: give it as tcp://host:port "
                             "(e.g. tcp://10.0.0.5:8786).")
        return address, f"on the dask cluster at {address}"

    # ------------------------------------------------------------------------------------------ run
    def _run_clicked(self) -> None:
        self.run()

    def run(self, config: Any = None) -> JobHandle | None:
        """Start the per-shape runs in one worker (``config``: a PipelineConfig replacing the other docks'
        settings). Returns the job, or None after a notification saying what is missing."""
        if self.job is not None and self.job.running:
            show_info("The per-shape batch is already running: Cancel it first.")
            return None
        try:
            items, numbers, stack, notes = self._plan(config if not isinstance(config, bool) else None)
            cluster, where = self.where()
        except (ValueError, FileExistsError) as exc:
            notify_exception(exc, _WHAT)
            return None
        for note in notes:
            show_info(f"ROI: {note}.")
        if stack.metadata.get("time_units") == "frames":
            show_info("Frame interval unknown: times are frame indices, so rates are per frame, not per hour.")
        def job(token):
            from ..batch import run_batch

            return run_batch(items, cancel=token, cluster=cluster)

        self.runs = [ItemOutcome(item.name, item.out) for item in items]
        self.numbers = numbers
        self._out = items[0].out.parent
        self._roi_layer = items[0].metadata["roi_layer"]
        self._shown_result = False
        self._fill_table()
        self.progress.setValue(0)
        self._item_progress = {}
        self.status.setText(f"Starting {len(items)} run{'s' if len(items) != 1 else ''} {where}…")
        self._t0 = time.perf_counter()
        self._set_running(True)
        self.job = JobHandle(job, what=_WHAT, on_event=self._event, on_result=self._done,
                             on_finished=self._finished, torch_threads=True)
        return self.job

    def _set_running(self, running: bool) -> None:
        self.run_btn.enabled = not running
        self.cancel_btn.enabled = running

    def cancel(self) -> None:
        """Stop: the current shape stops at its next step without writing; bundles already written are kept."""
        if self.job is not None and self.job.running:
            self.job.token.cancel()
            self.status.setText("Cancelling: running shapes stop at their next step, the others are not run "
                                "(bundles already written are kept)…")

    def _event(self, ev: Any) -> None:
        """A batch event: an item's outcome changed (its row), or a pipeline step of the running item."""
        k, n = ev.data["item"], max(len(self.runs), 1)
        outcome = ev.data.get("outcome")
        if outcome is not None:
            self.runs[k] = outcome
            self._item_progress.pop(k, None)
            self._set_row(k)
            if outcome.status in ("done", "failed", "stopped"):
                ended = sum(r.status in ("done", "failed", "stopped") for r in self.runs)
                self.progress.setValue(max(self.progress.value(), int(100 * ended / n)))
            return
        if self.job is None or self.job.token.cancelled:
            return
        self.progress.setValue(int(100 * ev.data["batch_fraction"]))
        stage_now = ev.data.get("pipeline_stage", ev.stage)
        before = self._item_progress.get(k)
        self._item_progress[k] = (float(ev.data.get("item_fraction", 0.0)), STAGE_NAMES.get(stage_now, stage_now))
        if before is None or int(100 * before[0]) != int(100 * self._item_progress[k][0]) or before[1] != \
                self._item_progress[k][1]:
            self._set_row(k)
        number = self.numbers[k]
        label = f" (shape {number} of the layer)" if number != k + 1 else ""
        stage = ev.data.get("pipeline_stage", ev.stage)
        self.status.setText(f"Shape {k + 1} of {n}{label}: {STAGE_NAMES.get(stage, stage)}: {ev.message} "
                            f"— ETA {fmt_seconds(ev.data.get('batch_eta_s'))}")

    def _done(self, runs: list[ItemOutcome]) -> None:
        self.runs = list(runs)
        self._item_progress = {}
        self._shown_result = True
        if self._out is not None and any(r.written for r in self.runs):
            try:
                from ..batch.summary import write_summary

                write_summary(self._out, self.runs)
            except Exception as exc:  # noqa: BLE001 - the bundles are written; the summary is extra
                notify_exception(exc, f"{_WHAT} (summary.csv)")
        self._fill_table()
        self._row_selected()
        written = [r for r in self.runs if r.written]

        def numbers(status: str) -> list[int]:
            return [n for n, r in zip(self.numbers, self.runs) if r.status == status]

        failed, stopped, skipped = numbers("failed"), numbers("stopped"), numbers("not run")
        where = f" in {self._out}" if self._out is not None else ""
        kept = (f"{len(written)} bundle{'s' if len(written) != 1 else ''} written{where} "
                f"({', '.join(r.out.name for r in written)})" if written else "no bundle written")
        elapsed = fmt_seconds(time.perf_counter() - self._t0)
        if stopped or skipped or (self.job is not None and self.job.token.cancelled):
            parts = [f"Cancelled: {kept}"]
            parts += [f"shape {n} stopped before it finished (nothing written)" for n in stopped]
            if skipped:
                parts.append(f"shape{'s' if len(skipped) != 1 else ''} {_listed(skipped)} not run")
            self.status.setText("; ".join(parts) + ".")
            show_info(self.status.text())
            return
        self.progress.setValue(100)
        text = f"Done in {elapsed}: {kept}."
        if failed:
            text += (f" Shape{'s' if len(failed) != 1 else ''} {_listed(failed)} failed (see the table; the "
                     "others ran).")
        if written:
            text += " Select a row and open it in the results dock to see its layers and plots."
        self.status.setText(text)

    def _finished(self) -> None:
        self._set_running(False)
        if not self._shown_result:
            self.status.setText("Stopped by an error (see the notification); bundles already written are kept.")

    # ------------------------------------------------------------------------------------------ table
    def _fill_table(self) -> None:
        self.table.clearSpans()
        self.table.setRowCount(len(self.runs))
        for i in range(len(self.runs)):
            self._set_row(i)

    def _set_row(self, i: int) -> None:
        run, number = self.runs[i], self.numbers[i]
        if self.table.columnSpan(i, 1) > 1:
            self.table.setSpan(i, 1, 1, 1)
        cells = [str(number)]
        tips = [f"shape {number} of the ROI layer"]
        if run.written:
            nt = f"{run.nt_error:.2f} %" if run.nt_error is not None else "-"
            cells += [run.D, run.G, nt, run.out.name]
            tips += [f"D(u) = {run.D}   [{run.D_units}]", f"G(u) = {run.G}   [{run.G_units}]",
                     f"N(t) error of '{run.nt_model}'" if run.nt_model else "no simulation to compare",
                     str(run.out)]
        else:
            running = "running…"
            if i in self._item_progress:
                frac, stage = self._item_progress[i]
                running = f"running… {100 * frac:.0f}% ({stage})"
            text = {"waiting": "waiting", "running": running, "failed": f"failed: {run.message}",
                    "stopped": f"stopped: {run.message}; nothing written",
                    "not run": "not run (cancelled before it)"}.get(run.status, run.status)
            cells += [text, "", "", "-"]
            tips += [text, "", "", "no bundle"]
        for j, (val, tip) in enumerate(zip(cells, tips)):
            item = QTableWidgetItem(val)
            item.setToolTip(tip)
            if run.status == "failed" and j == 1:
                item.setForeground(QColor("#ff6b6b"))
            self.table.setItem(i, j, item)
        if not run.written:
            self.table.setSpan(i, 1, 1, 3)
        if i in {index.row() for index in self.table.selectedIndexes()}:
            self._row_selected()

    def _row_selected(self) -> None:
        """Show the selected row in full below the table and select its shape in the ROI layer."""
        rows = sorted({index.row() for index in self.table.selectedIndexes()})
        if not rows or rows[0] >= len(self.runs):
            self.detail.setText("Click a row to see its equations in full and select its shape in the ROI layer." if
                                self.runs else "")
            return
        run, number = self.runs[rows[0]], self.numbers[rows[0]]
        if run.written:
            nt = (f"N(t) error of the {run.nt_model}: {run.nt_error:.2f} %." if run.nt_error is not None else
                  "No simulation to compare N(t) with.")
            how = " (constants refitted to the data)" if run.refitted else ""
            self.detail.setText(f"Shape {number}{how}: D(u) = {run.D} {run.D_units};  G(u) = {run.G} "
                                f"{run.G_units}. {nt} Bundle: {run.out}")
        else:
            self.detail.setText(f"Shape {number}: {self.table.item(rows[0], 1).text()}")
        layer = self.viewer.layers[self._roi_layer] if self._roi_layer in self.viewer.layers else None
        if layer is not None and hasattr(layer, "selected_data") and number <= len(layer.data):
            layer.selected_data = {number - 1}
            layer.refresh()

    # ------------------------------------------------------------------------------------------ open
    def open_selected(self) -> JobHandle | None:
        """Open the selected row's bundle in the results dock."""
        rows = sorted({index.row() for index in self.table.selectedIndexes()})
        if not rows:
            notify_exception(ValueError("Select a row of the table (a shape with a bundle) first."),
                             "Opening a shape's bundle")
            return None
        return self.open_row(rows[0])

    def open_row(self, i: int) -> JobHandle | None:
        run = self.runs[i] if 0 <= i < len(self.runs) else None
        if run is None or not run.written:
            why = f"shape {self.numbers[i]} has no bundle ({run.status})" if run is not None else "no such row"
            notify_exception(ValueError(f"{why}: choose a row with a bundle folder."), "Opening a shape's bundle")
            return None
        return self.open_bundle(run.out)

    def open_bundle(self, path: str | Path) -> JobHandle | None:
        """Open ``path`` with the results dock's own open-bundle path (opening that dock when needed)."""
        results = find_dock(self.viewer, "results")
        try:
            if results is None:
                dock, results = self.viewer.window.add_plugin_dock_widget("napari-binn", "Equations and results")
            else:
                dock = results.parent()
            if dock is not None:
                dock.show()
                dock.raise_()
        except Exception as exc:  # no napari window (headless) or the plugin is not installed
            notify_exception(exc, "Opening the results dock")
            return None
        return results.open_bundle(str(path))

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Cancel the runs and wait for the worker (bundles already written are kept): the dock is closing."""
        self._summary_timer.stop()
        if self.job is not None:
            self.job.stop(detach=True)
        try:
            self._docks.changed.disconnect(self._docks_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._unhook_density()
        try:
            for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                          self.viewer.layers.events.renamed):
                event.disconnect(self._schedule_inputs)
        except (TypeError, ValueError, RuntimeError):
            pass

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        align_labels(self.run_form)
        self.update_inputs()
        super().showEvent(event)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)


def _listed(numbers: list[int]) -> str:
    """'2', '1 and 3', '1, 2 and 4'."""
    nums = [str(n) for n in numbers]
    return nums[0] if len(nums) == 1 else ", ".join(nums[:-1]) + " and " + nums[-1]
