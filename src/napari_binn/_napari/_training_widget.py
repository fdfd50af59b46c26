"""Dock 2: train a BINN on the density field in the background, with live loss and D(u), G(u) plots."""

from __future__ import annotations

import time
from typing import Any

import napari
import numpy as np
from matplotlib.ticker import NullFormatter
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import CloseGuard, JobHandle, fmt_seconds, notify_exception, show_info, show_warning, wrap_label
from ._plots import BG, AsyncFigure, legend, style_axes
from ._state import get_state

__all__ = ["TrainingWidget", "headless_torch_threads"]

_HEADLESS_THREADS: int | None = None


def headless_torch_threads() -> int:
    """torch's intra-op thread count as seen from the main thread (what a headless run uses)."""
    global _HEADLESS_THREADS
    if _HEADLESS_THREADS is None:
        import torch

        _HEADLESS_THREADS = int(torch.get_num_threads())
    return _HEADLESS_THREADS


def _ispin(lo: int, hi: int, value: int, tip: str = "") -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setValue(value)
    w.setToolTip(tip)
    return w


def _fspin(lo: float, hi: float, value: float, decimals: int, tip: str = "", special: str = "") -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setDecimals(decimals)
    w.setValue(value)
    w.setToolTip(tip)
    if special:
        w.setSpecialValueText(special)
    return w


class TrainingWidget(QWidget):
    """BinnConfig form, Train / Pause / Stop, progress with ETA, live loss and D(u), G(u) plots."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        from ..binn import BinnConfig

        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: JobHandle | None = None
        self.worker_threads: int | None = None  # torch threads seen inside the last worker
        defaults = BinnConfig()
        headless_torch_threads()

        layout = QVBoxLayout(self)
        self.field_label = wrap_label()
        layout.addWidget(self.field_label)

        box = QGroupBox("Training")
        form = QFormLayout(box)
        self.steps = _ispin(1, 1_000_000, defaults.steps, "Adam steps per network (more = better fit, slower).")
        self.n_models = _ispin(1, 20, defaults.n_models, "Ensemble size: several networks give uncertainty bands.")
        self.width = _ispin(4, 512, defaults.hidden[0], "Neurons per hidden layer of the density network.")
        self.depth = _ispin(1, 8, len(defaults.hidden), "Hidden layers of the density network.")
        self.lr = _fspin(1e-5, 1.0, defaults.lr, 5, "Initial learning rate (decays to the final one).")
        self.pde_weight = _fspin(0.0, 1e4, defaults.pde_weight, 3, "Weight of the PDE residual vs the data fit.")
        self.seed = _ispin(0, 2**31 - 1, defaults.seed, "Random seed (same seed + data = same result).")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_label = QLabel(self._device_text())
        form.addRow("Steps", self.steps)
        form.addRow("Ensemble size", self.n_models)
        form.addRow("Network width", self.width)
        form.addRow("Network depth", self.depth)
        form.addRow("Learning rate", self.lr)
        form.addRow("PDE weight", self.pde_weight)
        form.addRow("Seed", self.seed)
        form.addRow("Device", self.device)
        form.addRow("", self.device_label)
        layout.addWidget(box)

        self.advanced_toggle = QCheckBox("Show advanced settings")
        layout.addWidget(self.advanced_toggle)
        self.advanced = QGroupBox("Advanced")
        adv = QFormLayout(self.advanced)
        self.warmup = _ispin(0, 1_000_000, defaults.warmup_steps, "Data-only steps before the PDE term starts.")
        self.n_colloc = _ispin(1, 10_000_000, defaults.n_collocation, "PDE collocation points per step.")
        self.batch = _ispin(1, 10_000_000, defaults.batch_size, "Observed points per step.")
        self.collocation = QComboBox()
        self.collocation.addItems(["front", "adaptive", "uniform"])
        self.validation = QComboBox()
        self.validation.addItems(["random", "frames"])
        self.patience = _ispin(0, 1_000_000, defaults.patience, "Stop after this many steps without a better "
                                                                "validation loss (0 = never).")
        self.residual = QComboBox()
        self.residual.addItems(["fast", "autograd"])
        self.dtype = QComboBox()
        self.dtype.addItems(["float32", "float64"])
        self.K = _fspin(0.0, 1e9, 0.0, 3, "Carrying capacity in density units (auto: from the data).", "auto")
        self.D_max = _fspin(0.0, 1e9, 0.0, 2, "Largest diffusivity allowed, µm²/h (auto: from the data).", "auto")
        self.noflux = _fspin(0.0, 1e4, defaults.noflux_weight, 3, "Weight of no-flux at the ROI edge (0 = off).")
        self.monotone_D = QCheckBox("D(u) monotone")
        self.monotone_G = QCheckBox("G(u) monotone")
        self.use_delay = QCheckBox("Learn a delay T(t)")
        self.log_every = _ispin(1, 100_000, defaults.log_every, "Steps between loss points / progress updates.")
        self.snapshot_every = _ispin(1, 1_000_000, defaults.snapshot_every, "Steps between D(u), G(u) plot updates.")
        for label, w in (("Warm-up steps", self.warmup), ("Collocation points", self.n_colloc),
                         ("Batch size", self.batch), ("Collocation", self.collocation),
                         ("Validation", self.validation), ("Patience", self.patience), ("Residual", self.residual),
                         ("Precision", self.dtype), ("Carrying capacity K", self.K), ("D max", self.D_max),
                         ("No-flux weight", self.noflux), ("", self.monotone_D), ("", self.monotone_G),
                         ("", self.use_delay), ("Log every", self.log_every), ("Plot D, G every", self.snapshot_every)):
            adv.addRow(label, w)
        self.advanced.setVisible(False)
        self.advanced_toggle.toggled.connect(self.advanced.setVisible)
        layout.addWidget(self.advanced)

        buttons = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.pause_btn = QPushButton("Pause")
        self.stop_btn = QPushButton("Stop (keep best)")
        self.pause_btn.setEnabled(False)
        self.stop_btn.setEnabled(False)
        self.train_btn.clicked.connect(self.train)
        self.pause_btn.clicked.connect(self.toggle_pause)
        self.stop_btn.clicked.connect(self.stop)
        for b in (self.train_btn, self.pause_btn, self.stop_btn):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.status = wrap_label("")
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

        self.figure = AsyncFigure(430, min_interval_ms=700)
        layout.addWidget(self.figure)
        self._reset_plots()
        self._history: dict[str, list[tuple[int, float]]] = {}
        self._finished_members: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._last_snapshot: tuple[np.ndarray, np.ndarray, np.ndarray, int] | None = None
        self._dirty_losses = self._dirty_rates = False
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(700)
        self._redraw_timer.timeout.connect(self._redraw)
        self._u_label()

        self.state.events.field.connect(self._field_changed)
        self._field_changed(self.state.field)
        self._guard = CloseGuard(self, self.shutdown)

    # ------------------------------------------------------------------------------------------ inputs
    @staticmethod
    def _device_text() -> str:
        try:
            from ..binn import resolve_device

            dev, note = resolve_device("auto")
            return f"found: {dev.type}" + (f" ({note.replace('auto: ', '')})" if note else "")
        except Exception as exc:  # pragma: no cover - informational only
            return f"device check failed: {exc}"

    def _field_changed(self, fld: Any) -> None:
        if fld is None:
            self.field_label.setText("No density yet: run 'Extract all frames' in the density dock "
                                     "(or open a results bundle).")
        else:
            T, ny, nx = fld.u.shape
            self.field_label.setText(f"Density: {T} frames over {fld.t_h[-1] - fld.t_h[0]:g} h, "
                                     f"{int(fld.mask.sum())} boxes of {fld.dx_um:g} µm, in {fld.units}.")

    def config(self):
        """The BinnConfig of the form (ValueError names a bad setting)."""
        from ..binn import BinnConfig

        return BinnConfig(
            hidden=(self.width.value(),) * self.depth.value(), steps=self.steps.value(),
            n_models=self.n_models.value(), lr=self.lr.value(), lr_final=min(1e-4, self.lr.value()),
            pde_weight=self.pde_weight.value(), seed=self.seed.value(), device=self.device.currentText(),
            warmup_steps=min(self.warmup.value(), max(0, self.steps.value() - 1)),
            n_collocation=self.n_colloc.value(), batch_size=self.batch.value(),
            collocation=self.collocation.currentText(), validation=self.validation.currentText(),
            patience=self.patience.value(), residual=self.residual.currentText(), dtype=self.dtype.currentText(),
            K=self.K.value() or None, D_max=self.D_max.value() or None, noflux_weight=self.noflux.value(),
            monotone_D=self.monotone_D.isChecked(), monotone_G=self.monotone_G.isChecked(),
            use_delay=self.use_delay.isChecked(), log_every=self.log_every.value(),
            snapshot_every=self.snapshot_every.value(), val_every=min(50, self.log_every.value()),
        )

    def set_config(self, cfg: Any) -> None:
        """Fill the form from a BinnConfig (e.g. one read from a bundle)."""
        self.steps.setValue(cfg.steps)
        self.n_models.setValue(cfg.n_models)
        self.width.setValue(cfg.hidden[0])
        self.depth.setValue(len(cfg.hidden))
        self.lr.setValue(cfg.lr)
        self.pde_weight.setValue(cfg.pde_weight)
        self.seed.setValue(cfg.seed)
        self.device.setCurrentText(cfg.device)
        self.warmup.setValue(cfg.warmup_steps)
        self.n_colloc.setValue(cfg.n_collocation)
        self.batch.setValue(cfg.batch_size)
        self.log_every.setValue(cfg.log_every)
        self.snapshot_every.setValue(cfg.snapshot_every)

    # ------------------------------------------------------------------------------------------ run
    def train(self, config: Any = None) -> JobHandle | None:
        """Start training in a worker (``config`` overrides the form). Returns the job, or None on bad input."""
        if self.job is not None and self.job.running:
            show_info("Training is already running: Stop it first.")
            return None
        fld = self.state.field
        if fld is None:
            notify_exception(ValueError("No density to train on: run 'Extract all frames' in the density dock "
                                        "first (or open a results bundle)."), "Training")
            return None
        try:
            cfg = config if config is not None and not isinstance(config, bool) else self.config()
            cfg.validate()
        except ValueError as exc:
            notify_exception(exc, "Training settings")
            return None
        threads = headless_torch_threads()

        def job(token):
            import torch

            from ..binn import train_binn

            self.worker_threads = int(torch.get_num_threads())
            if self.worker_threads != threads:  # torch may start with fewer threads in a Qt worker thread
                torch.set_num_threads(threads)
            return train_binn(fld, cfg, cancel=token)

        self._cfg = cfg
        self._history = {}
        self._finished_members = []
        self._last_snapshot = None
        self._t0 = time.perf_counter()
        self._reset_plots()
        self.progress.setValue(0)
        self.status.setText("Starting…")
        self._set_running(True)
        self.job = JobHandle(job, what="Training", on_event=self._event, on_result=self._done,
                             on_finished=lambda: self._set_running(False))
        return self.job

    def _set_running(self, running: bool) -> None:
        self.train_btn.setEnabled(not running)
        self.pause_btn.setEnabled(running)
        self.stop_btn.setEnabled(running)
        self.pause_btn.setText("Pause")

    def toggle_pause(self) -> None:
        if self.job is None or not self.job.running:
            return
        if self.job.token.paused:
            self.job.token.resume()
            self.pause_btn.setText("Pause")
            self.status.setText("Resumed.")
        else:
            self.job.token.pause()
            self.pause_btn.setText("Resume")
            self.status.setText("Paused (the current step finishes first).")

    def stop(self) -> None:
        """Stop early; the best model so far is kept and handed to the results dock."""
        if self.job is not None and self.job.running:
            self.job.token.cancel()
            self.status.setText("Stopping: keeping the best model so far…")

    def _event(self, ev: Any) -> None:
        d = ev.data
        if ev.fraction is not None:
            self.progress.setValue(int(100 * ev.fraction))
        if "device" in d:
            self.device_label.setText(f"running on {d['device']}" + (f" ({d['device_note']})"
                                                                      if d.get("device_note") else ""))
        if "divergence" in d:
            show_warning(f"Training: {ev.message}")
        if not d.get("paused"):
            self.status.setText(f"{ev.message} — elapsed {fmt_seconds(ev.elapsed_s)}, ETA {fmt_seconds(ev.eta_s)}")
        if "losses" in d:  # cheap bookkeeping only; the throttled timer redraws
            step = ev.step
            for k, v in d["losses"].items():
                self._history.setdefault(k, []).append((step, float(v)))
            if d.get("val") is not None:
                self._history.setdefault("validation", []).append((step, float(d["val"])))
            self._dirty_losses = True
        if "snapshot" in d:
            model = int(d.get("model", 0))
            if model >= len(self._finished_members) + 1 and self._last_snapshot is not None:
                self._finished_members.append(self._last_snapshot[:3])
            self._last_snapshot = (*(np.asarray(d["snapshot"][k], float) for k in ("u_grid", "D", "G")), model)
            self._dirty_rates = True
        if (self._dirty_losses or self._dirty_rates) and not self._redraw_timer.isActive():
            self._redraw_timer.start()


    def _done(self, fit: Any) -> None:
        self._redraw_timer.stop()
        self._dirty_losses = self._dirty_rates = False
        cancelled = bool(fit.metadata.get("cancelled"))
        self.state.fit = fit
        self.progress.setValue(100)
        self.status.setText(("Stopped: kept the best model so far. " if cancelled else "Training done. ")
                            + f"{fit.n_models} network(s) in {fmt_seconds(time.perf_counter() - self._t0)}. "
                            "Next: the Results dock (discover equations).")
        self._plot_fit(fit)

    # ------------------------------------------------------------------------------------------ plots
    def _reset_plots(self) -> None:
        self.figure.render(_plot_training, {}, None, [], self._u_label())

    def _u_label(self) -> str:
        fld = self.state.field
        return f"density u ({fld.units})" if fld is not None else "density u"

    def _redraw(self) -> None:
        """Hand copies of the latest losses and D, G snapshots to the plot thread (throttled there)."""
        history = {k: _thin(np.asarray(v, float)) for k, v in self._history.items()}
        self.figure.render(_plot_training, history, self._last_snapshot, list(self._finished_members),
                           self._u_label())
        self._dirty_losses = self._dirty_rates = False

    def _plot_fit(self, fit: Any) -> None:
        u = fit.u_grid(101)
        final = (u, fit.D_ensemble(u), fit.G_ensemble(u))
        history = {k: np.asarray(v, float) for k, v in self._history.items()}
        self.figure.render(_plot_training, history, None, [], self._u_label(), final)

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Stop training (keeping nothing) and wait for the worker thread: the dock or viewer is closing."""
        self._redraw_timer.stop()
        if self.job is not None:
            self.job.stop(detach=True)
        self.figure.shutdown()
        try:
            self.state.events.field.disconnect(self._field_changed)
        except (TypeError, ValueError, RuntimeError):
            pass

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)


def _thin(points: np.ndarray, n: int = 300) -> np.ndarray:
    """At most ``n`` evenly spread rows of a (k, 2) history (plotting thousands of points only costs time)."""
    if len(points) <= n:
        return points
    return points[np.unique(np.linspace(0, len(points) - 1, n).astype(int))]


def _plot_training(fig: Any, history: dict[str, np.ndarray], snapshot: tuple | None, finished: list[tuple],
                   u_label: str, final: tuple | None = None) -> None:
    """Loss terms (log scale), D(u) and G(u): the current network, finished ones in grey, or the final ensemble
    (mean and min-max band). Runs in the plot thread."""
    ax_l, ax_d, ax_g = fig.subplots(3, 1)
    fig.subplots_adjust(left=0.17, right=0.97, top=0.95, bottom=0.08, hspace=0.75)
    style_axes(ax_l, "Loss terms (scaled units)", "step", "loss")
    for name, arr in history.items():
        if arr.size and np.any(arr[:, 1] > 0):
            ax_l.semilogy(arr[:, 0], np.where(arr[:, 1] > 0, arr[:, 1], np.nan), lw=1.2, label=name)
    ax_l.yaxis.set_minor_formatter(NullFormatter())  # one label per decade, not a pile of minor labels
    legend(ax_l)
    for ax, idx, title, unit in ((ax_d, 1, "Diffusivity D(u)", "D (µm²/h)"), (ax_g, 2, "Growth rate G(u)", "G (1/h)")):
        style_axes(ax, title, u_label, unit)
        if final is not None:
            u, ens = final[0], final[idx]
            if ens.shape[0] > 1:
                ax.fill_between(u, ens.min(0), ens.max(0), color="tab:orange", alpha=0.3,
                                label=f"range of {ens.shape[0]} networks")
            ax.plot(u, ens.mean(0), color="tab:orange", lw=1.8, label="learned")
        else:
            for member in finished:
                ax.plot(member[0], member[idx], color="0.6", lw=1.0)
            if snapshot is not None:
                ax.plot(snapshot[0], snapshot[idx], color="tab:orange", lw=1.6,
                        label=f"network {snapshot[3] + 1} (training)")
        legend(ax)
    fig.set_facecolor(BG)
