"""Dock 1: image stack + ROI -> density field, with a live preview of the current frame."""

from __future__ import annotations

import dataclasses
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Label, PushButton
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QProgressBar, QWidget

from ._forms import (align_labels, fmt_seconds, form, fspin, ispin,
                     row, scrolling_layout, section, set_clamped, wrap_label)
from ._layers import (
    image_layers,
    layer_to_stack,
    shapes_layers,
    shapes_to_roi,
    show_density,
    upsert_image,
    upsert_points,
)
from ._state import LAYER_NAMES, get_state, register_dock, unregister_dock
from ._workers import CloseGuard, JobHandle, notify_exception, show_info, show_warning

__all__ = ["DensityWidget"]

_WHOLE_IMAGE = "(whole image)"

ROI_UNION = "Union of all shapes"
ROI_SELECTED = "Selected shapes only"


class DensityWidget(QWidget):
    """Choose an image layer, its calibration, an ROI and a method; preview one frame; extract all frames.

    The three parameter sections are magicgui containers (``data_form``, ``roi_form``, ``method_form``) of magicgui
    value widgets; the preview text, progress bar and status stay plain Qt. Other docks read the current form with
    :meth:`analysis_inputs` (the per-shape batch dock runs with it); ``settings_changed`` tells them it changed.
    """

    #: emitted (debounced by the receivers) whenever the form, the chosen layers, a shape or the frame changes
    settings_changed = Signal()

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self._preview_job: JobHandle | None = None
        self._extract_job: JobHandle | None = None
        self._preview_pending = False
        self._prefilled: tuple[float, float] = (0.0, 0.0)

        # --- 1. data
        self.layer_combo = ComboBox(label="Image layer", choices=self._image_choices,
                                    tooltip="The time-lapse image layer (T, Y, X) or (T, C, Y, X).")
        self.channel = ispin(0, 0, 0, label="Channel", tooltip="Channel for (T, C, Y, X) layers (0 = first).")
        self.pixel_size = fspin(0.0, 0.0, 1000.0, 0.1, label="Pixel size", decimals=4, suffix=" µm/px",
                                special="unknown: enter µm per pixel",
                                tooltip="Pixel size in µm, read from the file when known; edit to correct it.")
        self.interval = fspin(0.0, 0.0, 1000.0, 0.25, label="Frame interval", decimals=4, suffix=" h",
                              special="unknown: frame indices",
                              tooltip="Time between frames in hours (from the file when known).")
        self.data_form = form(self.layer_combo, self.channel, self.pixel_size, self.interval)

        # --- 2. region of interest
        self.roi_combo = ComboBox(label="ROI layer", choices=self._roi_choices,
                                  tooltip="Shapes layer whose rectangles/polygons/ellipses bound the analysis.")
        self.roi_mode = ComboBox(label="Shapes", choices=[ROI_UNION, ROI_SELECTED], value=ROI_UNION,
                                 tooltip="Union: all closed shapes of the layer together bound one analysis. "
                                         "Selected: only the shapes selected in the layer.\n"
                                         "One analysis per shape: open the 'Per-shape batch' dock (Plugins > "
                                         "napari-binn), which runs every shape of this ROI layer in turn with "
                                         "these settings and saves one results bundle per shape.")
        self.new_roi_btn = PushButton(text="New ROI layer (draw a polygon)")
        self.roi_form = form(self.roi_combo, self.roi_mode, self.new_roi_btn)

        # --- 3. density method
        self.method = ComboBox(label="Method", choices=["nuclei", "confluence"], value="nuclei",
                               tooltip="nuclei: count fluorescent nuclei (cells/mm²); confluence: covered fraction "
                                       "of any channel, e.g. phase contrast (0..1).")
        self.box_um = fspin(50.0, 5.0, 5000.0, 5.0, label="Box size", decimals=1, suffix=" µm",
                            tooltip="Side of the square grid boxes the density is averaged over.")
        self.d_min = fspin(6.0, 0.5, 500.0, 0.5, label="smallest", decimals=1, suffix=" µm")
        self.d_max = fspin(16.0, 0.5, 500.0, 0.5, label="largest", decimals=1, suffix=" µm")
        self._diameter = row(self.d_min, Label(value="to"), self.d_max, label="Nucleus diameter",
                             tooltip="Smallest and largest nucleus diameter to detect. The blob filter's scale "
                                     "is chosen within this range from the images (the preview says which); "
                                     "the same min and max fixes it.")
        self.threshold = ComboBox(label="Threshold", choices=["otsu", "li", "manual"], value="otsu",
                                  tooltip="Automatic (otsu, li) or manual threshold (the value on the right).")
        self.threshold_value = fspin(8.0, 0.0, 1e6, 0.5, label="value", decimals=3,
                                     tooltip="Manual threshold: SNR for nuclei, texture level for confluence.")
        self._threshold_row = row(self.threshold, self.threshold_value, label="Threshold")
        self.min_snr = fspin(5.0, 0.0, 1000.0, 0.5, label="Min. SNR", decimals=1)
        self.texture = fspin(6.0, 0.5, 500.0, 0.5, label="Texture window", decimals=1, suffix=" µm")
        self.spatial_sigma = fspin(0.0, 0.0, 20.0, 0.5, label="Smooth in space", decimals=1, suffix=" boxes")
        self.temporal_sigma = fspin(0.0, 0.0, 20.0, 0.5, label="Smooth in time", decimals=1, suffix=" frames")
        self.method_form = form(self.method, self.box_um, self._diameter, self._threshold_row, self.min_snr,
                                self.texture, self.spatial_sigma, self.temporal_sigma)

        # --- 4. preview and extract
        self.preview_label = wrap_label("Preview: choose an image layer.")
        self.extract_btn = PushButton(text="Extract all frames")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = QProgressBar()
        self.progress.setFormat("%p%")
        self.status = wrap_label("")

        layout = scrolling_layout(self)
        layout.addWidget(section("1. Data", self.data_form))
        layout.addWidget(section("2. Region of interest", self.roi_form))
        layout.addWidget(section("3. Density method", self.method_form))
        layout.addWidget(section("4. Preview and extract", self.preview_label, row(self.extract_btn, self.cancel_btn),
                                 self.progress, self.status))
        layout.addStretch(1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.refresh_preview)

        self.new_roi_btn.changed.connect(self.new_roi_layer)
        self.extract_btn.changed.connect(self.extract)
        self.cancel_btn.changed.connect(self.cancel)
        self.layer_combo.changed.connect(self._layer_changed)
        for w in (self.channel, self.pixel_size, self.interval, self.box_um, self.d_min, self.d_max,
                  self.threshold_value, self.min_snr, self.texture, self.method, self.threshold, self.roi_combo,
                  self.roi_mode):
            w.changed.connect(self.schedule_preview)
        self.method.changed.connect(self._method_changed)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.renamed):
            event.connect(self._refresh_layer_lists)
        self.viewer.dims.events.current_step.connect(self.schedule_preview)
        self._shape_layer_hooked: set[int] = set()
        self._guard = CloseGuard(self, self.shutdown)
        register_dock(self.viewer, "density", self)
        self._refresh_layer_lists()
        if self.layer_combo.value:
            self._layer_changed(self.layer_combo.value)
        self._method_changed(self.method.value)

    # ------------------------------------------------------------------------------------------ layers
    def _image_choices(self, _widget: Any = None) -> list[str]:
        """Image layers that can be analysed (not the plugin's own outputs): the 'Image layer' choices."""
        return [ly.name for ly in image_layers(self.viewer) if ly.name not in LAYER_NAMES.values()
                and not (ly.metadata or {}).get("napari_binn_output")]

    def _roi_choices(self, _widget: Any = None) -> list[str]:
        return [_WHOLE_IMAGE, *(ly.name for ly in shapes_layers(self.viewer))]

    def _refresh_layer_lists(self, event: Any = None) -> None:
        """Layers added, removed or renamed: refresh both layer combos (``reset_choices``), keep the choices."""
        kind = getattr(event, "type", None)
        renamed = None
        if kind == "renamed":
            try:
                renamed = self.viewer.layers[event.index]
            except (IndexError, TypeError, AttributeError):
                renamed = None
        current = self.layer_combo.value
        with self.layer_combo.changed.blocked():  # one _layer_changed below, not one per intermediate state
            self.layer_combo.reset_choices()
            if current not in self.layer_combo.choices and renamed is not None \
                    and renamed.name in self.layer_combo.choices:
                self.layer_combo.value = renamed.name  # the chosen layer was renamed: follow it
        if self.layer_combo.value != current:
            self._layer_changed(self.layer_combo.value)

        current_roi = self.roi_combo.value
        with self.roi_combo.changed.blocked():
            self.roi_combo.reset_choices()
            rois = self.roi_combo.choices[1:]
            new = event.value if kind == "inserted" else renamed
            if current_roi not in rois and new is not None and getattr(new, "name", None) in rois:
                self.roi_combo.value = new.name  # a new (or the renamed) Shapes layer becomes the ROI
        if self.roi_combo.value != current_roi and current_roi != _WHOLE_IMAGE:
            self.schedule_preview()  # the ROI layer went away: preview the whole image
        for ly in shapes_layers(self.viewer):
            if id(ly) not in self._shape_layer_hooked:
                ly.events.data.connect(self.schedule_preview)
                self._shape_layer_hooked.add(id(ly))

    def image_layer(self) -> Any | None:
        name = self.layer_combo.value
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def roi_layer(self) -> Any | None:
        name = self.roi_combo.value
        return self.viewer.layers[name] if name and name != _WHOLE_IMAGE and name in self.viewer.layers else None

    def _layer_changed(self, name: str | None) -> None:
        layer = self.image_layer()
        if layer is None:
            self.preview_label.setText("Preview: open a time-lapse image (File > Open, or File > Open Sample).")
            return
        md = layer.metadata or {}
        px = md.get("pixel_size_um")
        if px is None and layer.scale[-1] != 1.0:
            px = float(layer.scale[-1])
        times = np.asarray(md.get("times_h", []), dtype=float)
        interval = float(times[1] - times[0]) if times.size > 1 and md.get("time_units", "h") == "h" else 0.0
        self.channel.max = max(0, layer.data.shape[1] - 1) if layer.data.ndim == 4 else 0
        self.channel.enabled = layer.data.ndim == 4
        set_clamped(self.pixel_size, float(px) if px else 0.0)
        set_clamped(self.interval, interval)
        self._prefilled = (self.pixel_size.value, self.interval.value)
        if not px:
            show_warning(f"The pixel size of {name!r} is unknown: enter it (µm per pixel) in the density dock.")
        self.schedule_preview()

    def _method_changed(self, method: str) -> None:
        nuclei = method == "nuclei"
        self._diameter.visible = nuclei
        self.min_snr.visible = nuclei
        self.texture.visible = not nuclei
        if not nuclei and self.threshold_value.value > 1.0:
            self.threshold_value.value = 0.05

    def new_roi_layer(self) -> Any:
        """Add an empty Shapes layer in polygon mode, on the image's scale, selected for drawing."""
        image = self.image_layer()
        kwargs: dict[str, Any] = dict(name=LAYER_NAMES["roi"], edge_color="yellow", face_color=[1, 1, 0, 0.1],
                                      edge_width=2)
        if image is not None:
            kwargs.update(scale=tuple(image.scale[-2:]), translate=tuple(image.translate[-2:]))
        if LAYER_NAMES["roi"] in self.viewer.layers:
            layer = self.viewer.layers[LAYER_NAMES["roi"]]
        else:
            layer = self.viewer.add_shapes(ndim=2, **kwargs)
        self.viewer.layers.selection.active = layer
        layer.mode = "add_polygon"
        self.roi_combo.value = layer.name
        show_info("Draw the region to analyse: click the corners, double-click to close. "
                  "Several shapes are merged (union); for one analysis per shape use the 'Per-shape batch' dock.")
        return layer

    # ------------------------------------------------------------------------------------------ inputs
    def params(self) -> dict[str, Any]:
        """The density method's keyword parameters (see ``napari_binn.density.extract_density_job``)."""
        method = self.method.value
        p: dict[str, Any] = {}
        thr = self.threshold.value
        p["threshold"] = self.threshold_value.value if thr == "manual" else thr
        if method == "nuclei":
            p["nucleus_diameter_um"] = (self.d_min.value, self.d_max.value)
            p["min_snr"] = self.min_snr.value
        else:
            p["texture_window_um"] = self.texture.value
        return p

    def density_config(self):
        """The density settings of the form as the core's DensityConfig (method, box size, method parameters)."""
        from ..pipeline import DensityConfig

        params = self.params()
        params.update(spatial_sigma=self.spatial_sigma.value, temporal_sigma=self.temporal_sigma.value)
        return DensityConfig(method=self.method.value, box_um=self.box_um.value, params=params)

    def analysis_inputs(self) -> tuple[Any, Any, Any, Any]:
        """(Stack, image layer, DensityConfig, ROI Shapes layer or None): what this form analyses.

        Used by the per-shape batch dock; ValueError (saying what to fill in) when the image or its pixel size
        is missing.
        """
        stack, image = self.current_stack()
        return stack, image, self.density_config(), self.roi_layer()

    def current_stack(self):
        """(Stack, image layer) from the chosen layer and the calibration fields; ValueError when missing."""
        layer = self.image_layer()
        if layer is None:
            raise ValueError("No image layer: open a time-lapse (File > Open) or a sample "
                             "(File > Open Sample > napari-binn), then choose it in 'Image layer'.")
        px = self.pixel_size.value or None
        if px is None:
            raise ValueError(f"The pixel size of {layer.name!r} is unknown: enter µm per pixel in 'Pixel size'.")
        stack = layer_to_stack(layer, channel=self.channel.value, pixel_size_um=px,
                               frame_interval_h=self.interval.value or None)
        return stack, layer

    def current_roi(self, image: Any) -> tuple[Any, list[str]]:
        layer = self.roi_layer()
        if self.roi_mode.value == ROI_SELECTED and layer is not None and len(layer.data):
            chosen = sorted(layer.selected_data)
            if not chosen:
                raise ValueError("'Selected shapes only' is set but no shape is selected: select one in the ROI "
                                 "layer (selection tool, click its edge) or choose 'Union of all shapes'.")
            roi, notes = shapes_to_roi(layer, image, only=chosen)
            return roi, [f"shape(s) {', '.join(str(i + 1) for i in chosen)} of {len(layer.data)} analysed"] + notes
        return shapes_to_roi(layer, image)

    def current_frame(self, image: Any) -> int:
        point = self.viewer.dims.point[0] if self.viewer.dims.ndim >= 3 else 0.0
        t = int(round((point - image.translate[0]) / image.scale[0])) if image.data.ndim >= 3 else 0
        return int(np.clip(t, 0, image.data.shape[0] - 1))

    # ------------------------------------------------------------------------------------------ preview
    def schedule_preview(self, *args: Any) -> None:
        """Refresh the preview 300 ms after the last change (debounced; never blocks the UI)."""
        self._timer.start()
        self.settings_changed.emit()

    def refresh_preview(self) -> None:
        if self._preview_job is not None and self._preview_job.running:
            self._preview_pending = True
            return
        try:
            stack, image = self.current_stack()
            roi, _ = self.current_roi(image)
        except ValueError as exc:
            self.preview_label.setText(f"Preview unavailable: {exc}")
            return
        t = self.current_frame(image)
        method, box, params = self.method.value, self.box_um.value, self.params()

        def job(token):
            from ..density import preview_frame

            frame = np.asarray(stack.data[t])
            return preview_frame(frame, t, roi, method, box, pixel_size_um=stack.pixel_size_um, **params)

        when_h = None if stack.metadata.get("time_units") == "frames" else float(stack.times_h[t])
        self._preview_pending = False
        self.preview_label.setText(f"Preview: computing frame {t}…")
        self._preview_job = JobHandle(job, what="Density preview",
                                      on_result=lambda pv: self._show_preview(pv, image, t, method, when_h),
                                      on_finished=self._preview_finished)

    def _preview_finished(self) -> None:
        if self._preview_pending:
            self._preview_pending = False
            self.refresh_preview()

    def _show_preview(self, pv: Any, image: Any, t: int, method: str, stack_time: float | None = None) -> None:
        ty, tx = (float(v) for v in image.translate[-2:])
        meta = {"napari_binn_output": "preview", "frame": t}
        if method == "nuclei":
            upsert_points(self.viewer, LAYER_NAMES["nuclei"], np.asarray(pv.points, float).reshape(-1, 2),
                          scale=tuple(image.scale[-2:]), translate=(ty, tx), metadata=meta, size=6,
                          face_color="transparent", border_color="cyan", symbol="ring")
        elif LAYER_NAMES["nuclei"] in self.viewer.layers:
            self.viewer.layers.remove(LAYER_NAMES["nuclei"])
        finite = pv.density[np.isfinite(pv.density)]
        hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        upsert_image(self.viewer, LAYER_NAMES["preview"], pv.density, scale=pv.scale,
                     translate=(pv.translate[0] + ty, pv.translate[1] + tx), colormap="magma", opacity=0.45,
                     contrast_limits=(0.0, hi), metadata=meta)
        n = ""
        if method == "nuclei":
            d = pv.nucleus_diameter_um
            n = f"{len(pv.points)} nuclei" + (f" (found at the scale of {d:.3g} µm nuclei), " if d else ", ")
        when = f" ({stack_time:g} h)" if stack_time is not None else ""
        notes = "".join(f" Note: {note}." for note in pv.notes)
        self.preview_label.setText(f"Preview of frame {t}{when}: {n}mean density {np.nanmean(pv.density):.4g} "
                                   f"{pv.units} in {int(pv.mask.sum())} boxes of {pv.scale[0]:g} µm.{notes}")
        self._raise_source(image)

    def _raise_source(self, image: Any) -> None:
        """Keep the data image selected so the dims slider and contrast stay the user's."""
        if image.name in self.viewer.layers:
            self.viewer.layers.selection.active = image

    # ------------------------------------------------------------------------------------------ extract
    def extract(self) -> JobHandle | None:
        """Extract the density of every frame in a worker; adds the 'density' layer over the image."""
        if self._extract_job is not None and self._extract_job.running:
            show_info("Density extraction is already running.")
            return None
        try:
            stack, image = self.current_stack()
            roi, notes = self.current_roi(image)
        except ValueError as exc:
            notify_exception(exc, "Density extraction")
            return None
        for note in notes:
            show_info(f"ROI: {note}.")
        if stack.metadata.get("time_units") == "frames":
            show_warning("Frame interval unknown: times are frame indices, so rates will be per frame, not per "
                         "hour. Enter the frame interval to get hours.")
        dc = self.density_config()

        def job(token):
            from ..density import extract_density_job

            return extract_density_job(stack, roi, dc.method, dc.box_um, cancel=token, **dc.params)

        self.extract_btn.enabled = False
        self.cancel_btn.enabled = True
        self.progress.setValue(0)
        self.status.setText("Extracting…")
        self._extract_job = JobHandle(job, what="Density extraction", on_event=self._extract_event,
                                      on_result=lambda fld: self._extract_done(fld, stack, image, dc),
                                      on_finished=self._extract_finished)
        return self._extract_job

    def _extract_event(self, ev: Any) -> None:
        if ev.fraction is not None:
            self.progress.setValue(int(100 * ev.fraction))
        self.status.setText(f"{ev.message} — ETA {fmt_seconds(ev.eta_s)}")

    def _extract_done(self, fld: Any, stack: Any, image: Any, dc: Any) -> None:
        layer = show_density(self.viewer, fld, image, napari_binn_state=id(self.state), source_layer=image.name)
        for name in (LAYER_NAMES["preview"], LAYER_NAMES["nuclei"]):
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = False
        state = self.state
        state.source_layer = image.name
        state.stack = stack
        state.update(field=fld, config=dataclasses.replace(state.config, density=dc),
                     metadata={**state.metadata, "source_layer": image.name})
        warn = fld.metadata.get("warnings", [])
        cancelled = fld.metadata.get("cancelled")
        from ..density import counting_text

        counted = counting_text(fld.metadata)
        self.status.setText(
            f"{'Cancelled: kept ' if cancelled else 'Done: '}{fld.u.shape[0]} frames, {int(fld.mask.sum())} boxes of "
            f"{fld.dx_um:g} µm, density in {fld.units}{f' ({counted})' if counted else ''}. Layer '{layer.name}' "
            "added; next: Training dock.")
        for w in warn:
            show_warning(f"Density: {w}")
        self._raise_source(image)

    def _extract_finished(self) -> None:
        self.extract_btn.enabled = True
        self.cancel_btn.enabled = False
        if self.progress.value() < 100 and self._extract_job is not None and self._extract_job.token.cancelled:
            self.status.setText(self.status.text() or "Cancelled.")

    def cancel(self) -> None:
        if self._extract_job is not None and self._extract_job.running:
            self._extract_job.token.cancel()
            self.status.setText("Cancelling after the current frame…")

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Stop every job of this dock and wait for its thread (dock or viewer closing)."""
        self._timer.stop()
        unregister_dock(self.viewer, "density", self)
        for job in (self._preview_job, self._extract_job):
            if job is not None:
                job.stop(detach=True)
        try:
            for ly in shapes_layers(self.viewer):
                ly.events.data.disconnect(self.schedule_preview)
            self.viewer.dims.events.current_step.disconnect(self.schedule_preview)
            for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                          self.viewer.layers.events.renamed):
                event.disconnect(self._refresh_layer_lists)
        except (TypeError, RuntimeError, ValueError):
            pass

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        align_labels(self.data_form, self.roi_form, self.method_form)
        super().showEvent(event)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)
