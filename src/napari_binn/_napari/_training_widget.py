"""Dock 2: train a BINN on the density field in the background, with live loss and D(u), G(u) plots."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Label, PushButton
from matplotlib.ticker import NullFormatter
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QProgressBar, QWidget

from ._forms import (align_labels, fmt_seconds, form, fspin, ispin,
                     row, scrolling_layout, section, set_clamped, wrap_label)
from ._plots import BG, AsyncFigure, draw_band, fit_ylim, legend, rate_bands, style_axes
from ._state import get_state, register_dock, unregister_dock
from ._workers import CloseGuard, JobHandle, notify_exception, show_info, show_warning

__all__ = ["TrainingWidget"]


class TrainingWidget(QWidget):
    """BinnConfig form, Train / Pause / Stop, progress with ETA, live loss and D(u), G(u) plots.

    The settings are two magicgui containers (``training_form``, ``advanced_form``, the latter shown by the
    ``advanced_toggle`` check box); the progress bar, status text and the plots stay plain Qt.
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        from ..binn import BinnConfig

        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.job: JobHandle | None = None
        defaults = BinnConfig()

        self.field_label = wrap_label()

        # --- training
        self.steps = ispin(defaults.steps, 1, 1_000_000, label="Steps",
                           tooltip="Adam steps per network (more = better fit, slower). The warm-up (advanced "
                                   "settings) keeps its share of the steps when they change.")
        self.n_models = ispin(defaults.n_models, 1, 20, label="Ensemble size",
                              tooltip="Ensemble size: several networks give uncertainty bands.")
        self.width = ispin(defaults.hidden[0], 4, 512, label="Network width",
                           tooltip="Neurons per hidden layer of the density network.")
        self.depth = ispin(len(defaults.hidden), 1, 8, label="Network depth",
                           tooltip="Hidden layers of the density network.")
        self.lr = fspin(defaults.lr, 1e-5, 1.0, None, label="Learning rate", decimals=5,  # adaptive step
                        tooltip="Initial learning rate (decays to the final one).")
        self.pde_weight = fspin(defaults.pde_weight, 0.0, 1e4, 1.0, label="PDE weight", decimals=3,
                                tooltip="Weight of the PDE residual vs the data fit.")
        self.seed = ispin(defaults.seed, 0, 2**31 - 1, label="Seed",
                          tooltip="Random seed (same seed + data = same result).")
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto",
                               tooltip="Where the networks are trained; auto: a CUDA or Apple MPS GPU when "
                                       "available, else the CPU.")
        self.device_label = Label(label="", value=self._device_text())
        self.training_form = form(self.steps, self.n_models, self.width, self.depth, self.lr, self.pde_weight,
                                  self.seed, self.device, self.device_label)

        # --- advanced
        self.advanced_toggle = CheckBox(text="Show advanced settings", value=False)
        self.warmup = ispin(defaults.warmup_steps, 0, 1_000_000, label="Warm-up steps",
                            tooltip="Data-only steps before the PDE term starts (part of the steps; at most "
                                    "steps - 1 are used).")
        self.n_colloc = ispin(defaults.n_collocation, 1, 10_000_000, label="Collocation points",
                              tooltip="PDE collocation points per step.")
        self.batch = ispin(defaults.batch_size, 1, 10_000_000, label="Batch size", tooltip="Observed points per step.")
        self.collocation = ComboBox(label="Collocation", choices=["front", "adaptive", "uniform"], value="front",
                                    tooltip="Where the PDE is enforced each step: front (where the density "
                                            "changes), uniform, or adaptive (half of the points where the "
                                            "residual is large).")
        self.validation = ComboBox(label="Validation", choices=["random", "frames"], value="random",
                                   tooltip="Held-out data: random observed points, or frames (every 5th interior "
                                           "frame).")
        self.patience = ispin(defaults.patience, 0, 1_000_000, label="Patience",
                              tooltip="Stop after this many steps without a better validation loss (0 = never).")
        self.residual = ComboBox(label="Residual", choices=["fast", "autograd"], value="fast",
                                 tooltip="How the PDE residual is computed: fast (forward Laplacian) or autograd.")
        self.dtype = ComboBox(label="Precision", choices=["float32", "float64"], value="float32",
                              tooltip="Floating-point precision of the networks (float64: slower).")
        self.K = fspin(0.0, 0.0, 1e9, 1.0, label="Carrying capacity K", decimals=3, special="auto",
                       tooltip="Carrying capacity in density units (auto: from the data).")  # unit: _field_changed
        self.D_max = fspin(0.0, 0.0, 1e9, 1.0, label="D max", decimals=2, suffix=" µm²/h", special="auto",
                           tooltip="Largest diffusivity allowed, µm²/h (auto: from the data).")
        self.noflux = fspin(defaults.noflux_weight, 0.0, 1e4, 1.0, label="No-flux weight", decimals=3,
                            tooltip="Weight of no-flux at the ROI edge (0 = off).")
        self.monotone_D = CheckBox(text="D(u) monotone", value=False)
        self.monotone_G = CheckBox(text="G(u) monotone", value=False)
        self.use_delay = CheckBox(text="Learn a delay T(t)", value=False)
        self.log_every = ispin(defaults.log_every, 1, 100_000, label="Log every",
                               tooltip="Steps between loss points / progress updates.")
        self.snapshot_every = ispin(defaults.snapshot_every, 1, 1_000_000, label="Plot D, G every",
                                    tooltip="Steps between D(u), G(u) plot updates.")
        self.advanced_form = form(self.warmup, self.n_colloc, self.batch, self.collocation, self.validation,
                                  self.patience, self.residual, self.dtype, self.K, self.D_max, self.noflux,
                                  self.monotone_D, self.monotone_G, self.use_delay, self.log_every,
                                  self.snapshot_every)

        # --- run
        self.train_btn = PushButton(text="Train")
        self.pause_btn = PushButton(text="Pause", enabled=False)
        self.stop_btn = PushButton(text="Stop (keep best)", enabled=False)
        self.progress = QProgressBar()
        self.status = wrap_label("")
        self.figure = AsyncFigure(430, min_interval_ms=700)

        layout = scrolling_layout(self)
        layout.addWidget(self.field_label)
        layout.addWidget(section("Training", self.training_form))
        layout.addWidget(self.advanced_toggle.native)
        self.advanced = section("Advanced", self.advanced_form)
        self.advanced.setVisible(False)
        layout.addWidget(self.advanced)
        layout.addWidget(row(self.train_btn, self.pause_btn, self.stop_btn).native)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.figure)

        self._steps_before = self.steps.value
        self.steps.changed.connect(self._steps_changed)
        self.advanced_toggle.changed.connect(self._show_advanced)
        self.train_btn.changed.connect(self.train)
        self.pause_btn.changed.connect(self.toggle_pause)
        self.stop_btn.changed.connect(self.stop)

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

        self._shown_field: Any = None
        self.state.events.result.connect(self._result_changed)
        self._result_changed(self.state.result)
        self._guard = CloseGuard(self, self.shutdown)
        register_dock(self.viewer, "training", self)

    @property
    def worker_threads(self) -> int | None:
        """torch's thread count the last training's worker thread started with (None before any)."""
        return self.job.worker_threads if self.job is not None else None

    # ------------------------------------------------------------------------------------------ inputs
    def _show_advanced(self, show: bool) -> None:
        self.advanced.setVisible(bool(show))

    def _steps_changed(self, steps: int) -> None:
        """The step budget changed: the warm-up keeps its share of it (``BinnConfig.with_steps``)."""
        from ..binn import BinnConfig

        before = BinnConfig(steps=max(self._steps_before, 1), warmup_steps=self.warmup.value)
        self._steps_before = steps
        set_clamped(self.warmup, before.with_steps(max(int(steps), 1)).warmup_steps)

    @staticmethod
    def _device_text() -> str:
        try:
            from ..binn import resolve_device

            dev, note = resolve_device("auto")
            return f"found: {dev.type}" + (f" ({note.replace('auto: ', '')})" if note else "")
        except Exception as exc:  # pragma: no cover - informational only
            return f"device check failed: {exc}"

    def _result_changed(self, result: Any) -> None:
        """The shared result changed: follow its density field."""
        if result.field is not self._shown_field or self._shown_field is None:
            self._shown_field = result.field
            self._field_changed(result.field)

    def _field_changed(self, fld: Any) -> None:
        self.K.native.setSuffix(f" {fld.units}" if fld is not None and fld.units else "")
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
            hidden=(self.width.value,) * self.depth.value, steps=self.steps.value,
            n_models=self.n_models.value, lr=self.lr.value, lr_final=min(1e-4, self.lr.value),
            pde_weight=self.pde_weight.value, seed=self.seed.value, device=self.device.value,
            warmup_steps=self.warmup.value,
            n_collocation=self.n_colloc.value, batch_size=self.batch.value,
            collocation=self.collocation.value, validation=self.validation.value,
            patience=self.patience.value, residual=self.residual.value, dtype=self.dtype.value,
            K=self.K.value or None, D_max=self.D_max.value or None, noflux_weight=self.noflux.value,
            monotone_D=self.monotone_D.value, monotone_G=self.monotone_G.value,
            use_delay=self.use_delay.value, log_every=self.log_every.value,
            snapshot_every=self.snapshot_every.value, val_every=min(50, self.log_every.value),
        )

    def set_config(self, cfg: Any) -> None:
        """Fill the form from a BinnConfig (e.g. one read from a bundle); values are clipped to the fields' ranges
        and a device this form does not offer is left as it is."""
        for widget, value in ((self.steps, cfg.steps), (self.n_models, cfg.n_models), (self.width, cfg.hidden[0]),
                              (self.depth, len(cfg.hidden)), (self.lr, cfg.lr), (self.pde_weight, cfg.pde_weight),
                              (self.seed, cfg.seed), (self.warmup, cfg.warmup_steps),
                              (self.n_colloc, cfg.n_collocation), (self.batch, cfg.batch_size),
                              (self.log_every, cfg.log_every), (self.snapshot_every, cfg.snapshot_every)):
            set_clamped(widget, value)
        if cfg.device in self.device.choices:
            self.device.value = cfg.device

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
        def job(token):
            from ..pipeline import train_job

            # training, then the refinement of D(u), G(u) through the solver when the configuration asks for it
            return train_job(fld, dataclasses.replace(self.state.config, binn=cfg), cancel=token)

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
                             on_finished=lambda: self._set_running(False), torch_threads=True)
        return self.job

    def _set_running(self, running: bool) -> None:
        self.train_btn.enabled = not running
        self.pause_btn.enabled = running
        self.stop_btn.enabled = running
        self.pause_btn.text = "Pause"

    def toggle_pause(self) -> None:
        if self.job is None or not self.job.running:
            return
        if self.job.token.paused:
            self.job.token.resume()
            self.pause_btn.text = "Pause"
            self.status.setText("Resumed.")
        else:
            self.job.token.pause()
            self.pause_btn.text = "Resume"
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
            self.device_label.value = f"running on {d['device']}" + (f" ({d['device_note']})"
                                                                      if d.get("device_note") else "")
        if "divergence" in d:
            show_warning(f"Training: {ev.message}")
        if "warmup_restored" in d:
            show_info(f"Training: {ev.message}")
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
        self.state.update(fit=fit, config=dataclasses.replace(self.state.config, binn=self._cfg))
        self.progress.setValue(100)
        self.status.setText(("Stopped: kept the best model so far. " if cancelled else "Training done. ")
                            + f"{fit.n_models} network(s) in {fmt_seconds(time.perf_counter() - self._t0)}. "
                            "Next: the Results dock (discover equations).")
        for warning in fit.metadata.get("warnings", []):
            show_warning(f"Training: {warning}")
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
        final = (u, fit.D_ensemble(u), fit.G_ensemble(u), rate_bands(fit, u))
        history = {k: np.asarray(v, float) for k, v in self._history.items()}
        self.figure.render(_plot_training, history, None, [], self._u_label(), final)

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Stop training (keeping nothing) and wait for the worker thread: the dock or viewer is closing."""
        unregister_dock(self.viewer, "training", self)
        self._redraw_timer.stop()
        if self.job is not None:
            self.job.stop(detach=True)
        self.figure.shutdown()
        try:
            self.state.events.result.disconnect(self._result_changed)
        except (TypeError, ValueError, RuntimeError):
            pass

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        align_labels(self.training_form, self.advanced_form)
        super().showEvent(event)

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
    (mean, ± 2 sd band, undetermined densities greyed). Runs in the plot thread."""
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
            band = final[3].get("D" if idx == 1 else "G") if len(final) > 3 else None
            if band is not None:  # mean ± 2 sd of the networks, the densities the data leave open greyed
                draw_band(ax, u, ens.mean(0), band[0], band[1])
            ax.plot(u, ens.mean(0), color="tab:orange", lw=1.8, label=f"learned (mean of {ens.shape[0]})")
            fit_ylim(ax, [ens.mean(0)], nonnegative=idx == 1)
        else:
            for member in finished:
                ax.plot(member[0], member[idx], color="0.6", lw=1.0)
            if snapshot is not None:
                ax.plot(snapshot[0], snapshot[idx], color="tab:orange", lw=1.6,
                        label=f"network {snapshot[3] + 1} (training)")
        legend(ax)
    fig.set_facecolor(BG)
