"""Dock 4: one analysis per shape: the whole pipeline on each closed shape of the ROI layer, one bundle each.

The image, calibration, ROI layer and density method are those of the Density extraction dock's current form
(read through :meth:`DensityWidget.analysis_inputs`, never copied into a form of its own); the BINN settings are
the training dock's (or the defaults) with this dock's steps and ensemble size; the equation discovery settings
are the results dock's (or the defaults). Every shape runs :func:`napari_binn.pipeline.run_pipeline` in turn, in
one background worker, and is saved with :func:`napari_binn.results.save_results` to ``<folder>/shape_<n>``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import FileEdit, PushButton
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QHeaderView, QProgressBar, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..roi import closed_shapes
from ..symbolic.expression import readable
from ._common import (
    CloseGuard,
    JobHandle,
    align_labels,
    fmt_seconds,
    form,
    ispin,
    notify_exception,
    row,
    section,
    shapes_to_roi,
    show_info,
    wrap_label,
)
from ._state import find_dock, get_docks

__all__ = ["BatchWidget", "ShapeRun", "run_shapes_job"]

_WHAT = "Per-shape batch"

#: Rough share of one shape's run time per pipeline stage: one progress bar over every shape.
_STAGE_WEIGHT = {"density": 0.08, "binn": 0.62, "symbolic": 0.1, "simulate": 0.05, "refit": 0.14, "qc": 0.01}
_STAGE_NAME = {"density": "density extraction", "binn": "BINN training", "symbolic": "equation discovery",
               "simulate": "simulation", "refit": "refit against the data", "qc": "QC"}
#: QC models whose N(t) error the table shows, first found first.
_NT_MODELS = ("closed form (refitted)", "closed form", "learned D, G", "BINN surrogate")


@dataclass
class ShapeRun:
    """One shape of the ROI layer and what its run gave (one table row).

    number: the shape's number in the ROI layer (1-based, as its bundle folder ``shape_<number>``).
    status: 'waiting' | 'running' | 'done' | 'failed' | 'stopped' (cancelled during its run, nothing written) |
    'not run' (cancelled before it). D, G: the chosen equations as readable text, in ``D_units``, ``G_units``;
    ``refitted``: with the constants refitted to the shape's density (else the symbolic regression's). nt_error:
    mean |%| error of the total cell number N(t) of ``nt_model`` in the QC table. message: why it failed or
    stopped.
    """

    number: int
    folder: Path
    status: str = "waiting"
    D: str = ""
    G: str = ""
    D_units: str = "µm²/h"
    G_units: str = "1/h"
    refitted: bool = False
    nt_error: float | None = None
    nt_model: str = ""
    message: str = ""

    @property
    def written(self) -> bool:
        return self.status == "done"


@dataclass
class _ShapeEvent:
    """What the worker hands to the GUI: a pipeline Progress event of run ``index``, or its updated row."""

    index: int
    progress: Any = None
    run: ShapeRun | None = None


def _nt_error(qc: Any) -> tuple[float | None, str]:
    names = [m.name for m in qc.models] if qc is not None else []
    for name in _NT_MODELS:
        if name in names:
            value = qc[name].mean_abs_count_error_pct
            return (float(value) if np.isfinite(value) else None), name
    return None, ""


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ValueError, FileExistsError, FileNotFoundError)) else \
        f"{type(exc).__name__}: {exc}"


def _describe(run: ShapeRun, result: Any) -> None:
    """Fill a written shape's table text: the chosen equations (refitted constants when the refit ran) and the
    N(t) error. A problem here only leaves the text empty: the bundle is written."""
    try:
        eq = result.equations
        refit = result.mechanistic.get("closed form (refitted)")
        if eq is not None and refit is not None and result.metadata.get("closed_form_refitted"):
            eq, run.refitted = eq.with_refit(refit), True  # the constants the data support
        for key in ("D", "G"):
            f = getattr(eq, key, None) if eq is not None else None
            setattr(run, key, readable(f.text, 4) if f is not None else "-")
            if f is not None and f.units:
                setattr(run, f"{key}_units", f.units)
        run.nt_error, run.nt_model = _nt_error(result.qc)
    except Exception as exc:  # noqa: BLE001 - display only
        run.refitted = False
        run.D = run.D or "?"
        run.G = run.G or "?"
        run.message = f"equations not shown ({_why(exc)}); see the bundle"


def run_shapes_job(stack: Any, config: Any, rois: list[Any], runs: list[ShapeRun], *, cancel: Any = None,
                   metadata: dict[str, Any] | None = None) -> Generator[_ShapeEvent, None, list[ShapeRun]]:
    """Run the whole pipeline on ``stack`` once per ROI in ``rois`` and save each result to its run's folder.

    Yields :class:`_ShapeEvent` (each pipeline event, and each row when it changes); returns the rows. A shape that
    fails is recorded as failed and the next one runs; on cancel the current shape stops without writing and the
    remaining ones are not run (bundles already written are kept).
    """
    from ..jobs import JobCancelled, is_cancelled
    from ..pipeline import run_pipeline
    from ..results import save_results

    runs = [dataclasses.replace(r) for r in runs]
    for k, (run, roi) in enumerate(zip(runs, rois)):
        if is_cancelled(cancel):
            break
        run.status = "running"
        yield _ShapeEvent(k, run=dataclasses.replace(run))
        try:
            job = run_pipeline(stack, config, roi=roi, cancel=cancel)
            while True:
                try:
                    ev = next(job)
                except StopIteration as stop:
                    result = stop.value
                    break
                yield _ShapeEvent(k, progress=ev)
            if result.cancelled:
                run.status = "stopped"
                run.message = f"cancelled during {_STAGE_NAME.get(result.metadata['cancelled_in'], 'the run')}"
            else:
                result.metadata.update(metadata or {})
                result.metadata["roi_shape"] = {"number": run.number,
                                                "polygons_px": [np.asarray(p).tolist() for p in roi]}
                if run.folder.is_dir() and not any(run.folder.iterdir()):
                    run.folder.rmdir()  # an empty folder is replaced; a non-empty one is refused by save_results
                save_results(result, run.folder)
                run.status = "done"
                _describe(run, result)
        except JobCancelled as exc:
            run.status, run.message = "stopped", f"cancelled ({exc})"
        except Exception as exc:  # one shape failing must not stop the others
            run.status, run.message = "failed", _why(exc)
        yield _ShapeEvent(k, run=dataclasses.replace(run))
    for run in runs:
        if run.status == "waiting":
            run.status = "not run"
    return runs


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
        self.runs: list[ShapeRun] = []
        self._out: Path | None = None
        self._roi_layer = ""
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
        self.run_form = form(self.folder, self.steps, self.n_models)
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

        layout = QVBoxLayout(self)
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

    def _plan(self, base: Any) -> tuple[Any, Any, list[Any], list[ShapeRun], dict[str, Any], list[str]]:
        """(stack, config, ROIs, rows, metadata, notes) of a run; ValueError/FileExistsError says what to fix."""
        density = find_dock(self.viewer, "density")
        if density is None:
            raise ValueError("Open the Density extraction dock first (Plugins > napari-binn > Density extraction) "
                             "and choose the image, the ROI layer and the density method there: this dock runs "
                             "each shape with those settings.")
        stack, image, dc, shapes = density.analysis_inputs()
        if shapes is None:
            raise ValueError("No ROI layer is chosen in the density dock: choose a Shapes layer in its 'ROI layer' "
                             "(or draw one with 'New ROI layer'); each closed shape is one analysis.")
        numbers = closed_shapes(shapes.shape_type)
        if not numbers:
            raise ValueError(f"The ROI layer '{shapes.name}' has no closed shape: draw a rectangle, polygon or "
                             "ellipse around each region to analyse (lines and paths enclose no area).")
        text = self.folder.line_edit.value.strip()
        if not text:
            raise ValueError("Choose the output folder (Browse…): each shape's bundle is written to "
                             "<folder>/shape_<n>.")
        out = Path(text).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file, not a folder: choose a folder for the bundles.")
        folders = [out / f"shape_{i + 1}" for i in numbers]
        taken = [f for f in folders if f.exists() and (not f.is_dir() or any(f.iterdir()))]
        if taken:
            raise FileExistsError(f"{', '.join(f.name for f in taken)} already exist{'s' if len(taken) == 1 else ''}"
                                  f" in {out} and {'is' if len(taken) == 1 else 'are'} not empty; nothing was "
                                  "overwritten. Choose another output folder, or move those folders away.")
        cfg = self.pipeline_config(dc, base)
        rois, notes = [], []
        for i in numbers:
            roi, shape_notes = shapes_to_roi(shapes, image, only=[i])
            rois.append(roi)
            notes += [n for n in shape_notes if n not in notes]
        runs = [ShapeRun(i + 1, f) for i, f in zip(numbers, folders)]
        meta = {"source_layer": image.name, "roi_layer": shapes.name}
        return stack, cfg, rois, runs, meta, notes

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
            stack, cfg, rois, runs, meta, notes = self._plan(config if not isinstance(config, bool) else None)
        except (ValueError, FileExistsError) as exc:
            notify_exception(exc, _WHAT)
            return None
        for note in notes:
            show_info(f"ROI: {note}.")
        if stack.metadata.get("time_units") == "frames":
            show_info("Frame interval unknown: times are frame indices, so rates are per frame, not per hour.")
        from ._training_widget import headless_torch_threads

        threads = headless_torch_threads()

        def job(token):
            import torch

            if int(torch.get_num_threads()) != threads:  # torch may start with fewer threads in a Qt worker
                torch.set_num_threads(threads)
            return run_shapes_job(stack, cfg, rois, runs, cancel=token, metadata=meta)

        self.runs = runs
        self._out = runs[0].folder.parent
        self._roi_layer = meta["roi_layer"]
        self._shown_result = False
        self._fill_table()
        self.progress.setValue(0)
        self.status.setText(f"Starting {len(runs)} run{'s' if len(runs) != 1 else ''}…")
        self._t0 = time.perf_counter()
        self._set_running(True)
        self.job = JobHandle(job, what=_WHAT, on_event=self._event, on_result=self._done,
                             on_finished=self._finished)
        return self.job

    def _set_running(self, running: bool) -> None:
        self.run_btn.enabled = not running
        self.cancel_btn.enabled = running

    def cancel(self) -> None:
        """Stop: the current shape stops at its next step without writing; bundles already written are kept."""
        if self.job is not None and self.job.running:
            self.job.token.cancel()
            self.status.setText("Cancelling: the current shape stops at its next step (bundles already written "
                                "are kept)…")

    def _event(self, ev: _ShapeEvent) -> None:
        n = max(len(self.runs), 1)
        if ev.run is not None:
            self.runs[ev.index] = ev.run
            self._set_row(ev.index)
            if ev.run.status in ("done", "failed", "stopped"):
                self.progress.setValue(int(100 * (ev.index + 1) / n))
        p = ev.progress
        if p is None or self.job is None or self.job.token.cancelled:
            return
        stage = p.data.get("pipeline_stage", p.stage)
        done = 0.0
        for name, weight in _STAGE_WEIGHT.items():
            if name == stage:
                done += weight * (p.fraction or 0.0)
                break
            done += weight
        fraction = min(1.0, (ev.index + done) / n)
        self.progress.setValue(int(100 * fraction))
        elapsed = time.perf_counter() - self._t0
        eta = elapsed * (1.0 - fraction) / fraction if fraction > 0.02 else None
        run = self.runs[ev.index]
        label = f" (shape {run.number} of the layer)" if run.number != ev.index + 1 else ""
        self.status.setText(f"Shape {ev.index + 1} of {n}{label}: {_STAGE_NAME.get(stage, stage)}: {p.message} "
                            f"— ETA {fmt_seconds(eta)}")

    def _done(self, runs: list[ShapeRun]) -> None:
        self.runs = list(runs)
        self._shown_result = True
        self._fill_table()
        self._row_selected()
        written = [r for r in self.runs if r.written]
        failed = [r for r in self.runs if r.status == "failed"]
        stopped = [r for r in self.runs if r.status == "stopped"]
        skipped = [r for r in self.runs if r.status == "not run"]
        where = f" in {self._out}" if self._out is not None else ""
        kept = (f"{len(written)} bundle{'s' if len(written) != 1 else ''} written{where} "
                f"({', '.join(r.folder.name for r in written)})" if written else "no bundle written")
        elapsed = fmt_seconds(time.perf_counter() - self._t0)
        if stopped or skipped or (self.job is not None and self.job.token.cancelled):
            parts = [f"Cancelled: {kept}"]
            parts += [f"shape {r.number} stopped before it finished (nothing written)" for r in stopped]
            if skipped:
                parts.append(f"shape{'s' if len(skipped) != 1 else ''} {_numbers(skipped)} not run")
            self.status.setText("; ".join(parts) + ".")
            show_info(self.status.text())
            return
        self.progress.setValue(100)
        text = f"Done in {elapsed}: {kept}."
        if failed:
            text += (f" Shape{'s' if len(failed) != 1 else ''} {_numbers(failed)} failed (see the table; the "
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
        run = self.runs[i]
        if self.table.columnSpan(i, 1) > 1:
            self.table.setSpan(i, 1, 1, 1)
        cells = [str(run.number)]
        tips = [f"shape {run.number} of the ROI layer"]
        if run.written:
            nt = f"{run.nt_error:.2f} %" if run.nt_error is not None else "-"
            cells += [run.D, run.G, nt, run.folder.name]
            tips += [f"D(u) = {run.D}   [{run.D_units}]", f"G(u) = {run.G}   [{run.G_units}]",
                     f"N(t) error of '{run.nt_model}'" if run.nt_model else "no simulation to compare",
                     str(run.folder)]
        else:
            text = {"waiting": "waiting", "running": "running…", "failed": f"failed: {run.message}",
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
        run = self.runs[rows[0]]
        if run.written:
            nt = (f"N(t) error of the {run.nt_model}: {run.nt_error:.2f} %." if run.nt_error is not None else
                  "No simulation to compare N(t) with.")
            how = " (constants refitted to the data)" if run.refitted else ""
            self.detail.setText(f"Shape {run.number}{how}: D(u) = {run.D} {run.D_units};  G(u) = {run.G} "
                                f"{run.G_units}. {nt} Bundle: {run.folder}")
        else:
            self.detail.setText(f"Shape {run.number}: {self.table.item(rows[0], 1).text()}")
        layer = self.viewer.layers[self._roi_layer] if self._roi_layer in self.viewer.layers else None
        if layer is not None and hasattr(layer, "selected_data") and run.number <= len(layer.data):
            layer.selected_data = {run.number - 1}
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
            why = f"shape {run.number} has no bundle ({run.status})" if run is not None else "no such row"
            notify_exception(ValueError(f"{why}: choose a row with a bundle folder."), "Opening a shape's bundle")
            return None
        return self.open_bundle(run.folder)

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


def _numbers(runs: list[ShapeRun]) -> str:
    nums = [str(r.number) for r in runs]
    return nums[0] if len(nums) == 1 else ", ".join(nums[:-1]) + " and " + nums[-1]
