"""Dock 1: image stack + ROI -> density field, with a live preview of the current frame."""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
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

from ._common import (
    CloseGuard,
    JobHandle,
    fmt_seconds,
    image_layers,
    layer_to_stack,
    notify_exception,
    shapes_layers,
    shapes_to_roi,
    show_info,
    show_warning,
    upsert_image,
    upsert_points,
    wrap_label,
)
from ._state import LAYER_NAMES, get_state

__all__ = ["DensityWidget"]

_WHOLE_IMAGE = "(whole image)"


def _spin(lo: float, hi: float, value: float, step: float, suffix: str = "", decimals: int = 2) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setDecimals(decimals)
    w.setSingleStep(step)
    w.setValue(value)
    if suffix:
        w.setSuffix(suffix)
    return w


ROI_UNION = "Union of all shapes"
ROI_SELECTED = "Selected shapes only"


class DensityWidget(QWidget):
    """Choose an image layer, its calibration, an ROI and a method; preview one frame; extract all frames."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self._preview_job: JobHandle | None = None
        self._extract_job: JobHandle | None = None
        self._preview_pending = False
        self._prefilled: tuple[float, float] = (0.0, 0.0)

        layout = QVBoxLayout(self)
        data_box = QGroupBox("1. Data")
        form = QFormLayout(data_box)
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The time-lapse image layer (T, Y, X) or (T, C, Y, X).")
        self.channel = QSpinBox()
        self.channel.setToolTip("Channel for (T, C, Y, X) layers (0 = first).")
        self.pixel_size = _spin(0.0, 1000.0, 0.0, 0.1, " µm/px", 4)
        self.pixel_size.setSpecialValueText("unknown: enter µm per pixel")
        self.pixel_size.setToolTip("Pixel size in µm, read from the file when known; edit to correct it.")
        self.interval = _spin(0.0, 1000.0, 0.0, 0.25, " h", 4)
        self.interval.setSpecialValueText("unknown: frame indices")
        self.interval.setToolTip("Time between frames in hours (from the file when known).")
        form.addRow("Image layer", self.layer_combo)
        form.addRow("Channel", self.channel)
        form.addRow("Pixel size", self.pixel_size)
        form.addRow("Frame interval", self.interval)
        layout.addWidget(data_box)

        roi_box = QGroupBox("2. Region of interest")
        roi_form = QFormLayout(roi_box)
        self.roi_combo = QComboBox()
        self.roi_combo.setToolTip("Shapes layer whose rectangles/polygons/ellipses bound the analysis.")
        self.new_roi_btn = QPushButton("New ROI layer (draw a polygon)")
        self.new_roi_btn.clicked.connect(self.new_roi_layer)
        self.roi_mode = QComboBox()
        self.roi_mode.addItems([ROI_UNION, ROI_SELECTED])
        self.roi_mode.setToolTip("Union: every closed shape of the layer bounds one analysis. Selected: only the "
                                 "shapes selected in the layer (select one, extract, train, export; then the "
                                 "next) - one analysis per shape.")
        roi_form.addRow("ROI layer", self.roi_combo)
        roi_form.addRow("Shapes", self.roi_mode)
        roi_form.addRow(self.new_roi_btn)
        layout.addWidget(roi_box)

        method_box = QGroupBox("3. Density method")
        mform = QFormLayout(method_box)
        self.method = QComboBox()
        self.method.addItems(["nuclei", "confluence"])
        self.method.setToolTip("nuclei: count fluorescent nuclei (cells/mm²); confluence: covered fraction "
                               "of any channel, e.g. phase contrast (0..1).")
        self.box_um = _spin(5.0, 5000.0, 50.0, 5.0, " µm", 1)
        self.box_um.setToolTip("Side of the square grid boxes the density is averaged over.")
        self.d_min = _spin(0.5, 500.0, 6.0, 0.5, " µm", 1)
        self.d_max = _spin(0.5, 500.0, 16.0, 0.5, " µm", 1)
        self.threshold = QComboBox()
        self.threshold.addItems(["otsu", "li", "manual"])
        self.threshold_value = _spin(0.0, 1e6, 8.0, 0.5, "", 3)
        self.threshold_value.setToolTip("Manual threshold: SNR for nuclei, texture level for confluence.")
        self.min_snr = _spin(0.0, 1000.0, 5.0, 0.5, "", 1)
        self.texture = _spin(0.5, 500.0, 6.0, 0.5, " µm", 1)
        self.spatial_sigma = _spin(0.0, 20.0, 0.0, 0.5, " boxes", 1)
        self.temporal_sigma = _spin(0.0, 20.0, 0.0, 0.5, " frames", 1)
        dia = QHBoxLayout()
        dia.addWidget(self.d_min)
        dia.addWidget(QLabel("to"))
        dia.addWidget(self.d_max)
        thr = QHBoxLayout()
        thr.addWidget(self.threshold)
        thr.addWidget(self.threshold_value)
        mform.addRow("Method", self.method)
        mform.addRow("Box size", self.box_um)
        self._dia_label = QLabel("Nucleus diameter")
        mform.addRow(self._dia_label, dia)
        mform.addRow("Threshold", thr)
        self._snr_label = QLabel("Min. SNR")
        mform.addRow(self._snr_label, self.min_snr)
        self._tex_label = QLabel("Texture window")
        mform.addRow(self._tex_label, self.texture)
        mform.addRow("Smooth in space", self.spatial_sigma)
        mform.addRow("Smooth in time", self.temporal_sigma)
        layout.addWidget(method_box)

        run_box = QGroupBox("4. Preview and extract")
        rlay = QVBoxLayout(run_box)
        self.preview_label = wrap_label("Preview: choose an image layer.")
        self.extract_btn = QPushButton("Extract all frames")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.extract_btn.clicked.connect(self.extract)
        self.cancel_btn.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setFormat("%p%")
        self.status = wrap_label("")
        buttons = QHBoxLayout()
        buttons.addWidget(self.extract_btn)
        buttons.addWidget(self.cancel_btn)
        rlay.addWidget(self.preview_label)
        rlay.addLayout(buttons)
        rlay.addWidget(self.progress)
        rlay.addWidget(self.status)
        layout.addWidget(run_box)
        layout.addStretch(1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.refresh_preview)

        self.layer_combo.currentTextChanged.connect(self._layer_changed)
        for w in (self.channel, self.pixel_size, self.interval, self.box_um, self.d_min, self.d_max,
                  self.threshold_value, self.min_snr, self.texture):
            w.valueChanged.connect(self.schedule_preview)
        for w in (self.method, self.threshold, self.roi_combo):
            w.currentTextChanged.connect(self.schedule_preview)
        self.method.currentTextChanged.connect(self._method_changed)
        self.viewer.layers.events.inserted.connect(self._refresh_layer_lists)
        self.viewer.layers.events.removed.connect(self._refresh_layer_lists)
        self.viewer.dims.events.current_step.connect(self.schedule_preview)
        self._shape_layer_hooked: set[int] = set()
        self._guard = CloseGuard(self, self.shutdown)
        self._refresh_layer_lists()
        self._method_changed(self.method.currentText())

    # ------------------------------------------------------------------------------------------ layers
    def _refresh_layer_lists(self, event: Any = None) -> None:
        images = [ly.name for ly in image_layers(self.viewer) if ly.name not in LAYER_NAMES.values()
                  and not (ly.metadata or {}).get("napari_binn_output")]
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(images)
        if current in images:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        if self.layer_combo.currentText() != current:
            self._layer_changed(self.layer_combo.currentText())
        rois = [ly.name for ly in shapes_layers(self.viewer)]
        current_roi = self.roi_combo.currentText()
        self.roi_combo.blockSignals(True)
        self.roi_combo.clear()
        self.roi_combo.addItems([_WHOLE_IMAGE, *rois])
        if current_roi in rois:
            self.roi_combo.setCurrentText(current_roi)
        elif event is not None and getattr(event, "value", None) is not None and event.value.name in rois:
            self.roi_combo.setCurrentText(event.value.name)  # a newly added Shapes layer becomes the ROI
        self.roi_combo.blockSignals(False)
        for ly in shapes_layers(self.viewer):
            if id(ly) not in self._shape_layer_hooked:
                ly.events.data.connect(self.schedule_preview)
                self._shape_layer_hooked.add(id(ly))

    def image_layer(self) -> Any | None:
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def roi_layer(self) -> Any | None:
        name = self.roi_combo.currentText()
        return self.viewer.layers[name] if name != _WHOLE_IMAGE and name in self.viewer.layers else None

    def _layer_changed(self, name: str) -> None:
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
        self.channel.setRange(0, max(0, layer.data.shape[1] - 1) if layer.data.ndim == 4 else 0)
        self.channel.setEnabled(layer.data.ndim == 4)
        self.pixel_size.setValue(float(px) if px else 0.0)
        self.interval.setValue(interval)
        self._prefilled = (self.pixel_size.value(), interval)
        if not px:
            show_warning(f"The pixel size of {name!r} is unknown: enter it (µm per pixel) in the density dock.")
        self.schedule_preview()

    def _method_changed(self, method: str) -> None:
        nuclei = method == "nuclei"
        for w in (self.d_min, self.d_max, self._dia_label, self.min_snr, self._snr_label):
            w.setVisible(nuclei)
        self.texture.setVisible(not nuclei)
        self._tex_label.setVisible(not nuclei)
        if not nuclei and self.threshold_value.value() > 1.0:
            self.threshold_value.setValue(0.05)

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
        self.roi_combo.setCurrentText(layer.name)
        show_info("Draw the region to analyse: click the corners, double-click to close. "
                  "Several shapes are merged (union), or analysed one at a time with 'Selected shapes only'.")
        return layer

    # ------------------------------------------------------------------------------------------ inputs
    def params(self) -> dict[str, Any]:
        """The density method's keyword parameters (see ``napari_binn.density.extract_density_job``)."""
        method = self.method.currentText()
        p: dict[str, Any] = {}
        thr = self.threshold.currentText()
        p["threshold"] = self.threshold_value.value() if thr == "manual" else thr
        if method == "nuclei":
            p["nucleus_diameter_um"] = (self.d_min.value(), self.d_max.value())
            p["min_snr"] = self.min_snr.value()
        else:
            p["texture_window_um"] = self.texture.value()
        return p

    def current_stack(self):
        """(Stack, image layer) from the chosen layer and the calibration fields; ValueError when missing."""
        layer = self.image_layer()
        if layer is None:
            raise ValueError("No image layer: open a time-lapse (File > Open) or a sample "
                             "(File > Open Sample > napari-binn), then choose it in 'Image layer'.")
        px = self.pixel_size.value() or None
        if px is None:
            raise ValueError(f"The pixel size of {layer.name!r} is unknown: enter µm per pixel in 'Pixel size'.")
        stack = layer_to_stack(layer, channel=self.channel.value(), pixel_size_um=px,
                               frame_interval_h=self.interval.value() or None)
        return stack, layer

    def current_roi(self, image: Any) -> tuple[Any, list[str]]:
        layer = self.roi_layer()
        if self.roi_mode.currentText() == ROI_SELECTED and layer is not None and len(layer.data):
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
        method, box, params = self.method.currentText(), self.box_um.value(), self.params()

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
        n = f"{len(pv.points)} nuclei, " if method == "nuclei" else ""
        when = f" ({stack_time:g} h)" if stack_time is not None else ""
        self.preview_label.setText(f"Preview of frame {t}{when}: {n}mean density {np.nanmean(pv.density):.4g} "
                                   f"{pv.units} in {int(pv.mask.sum())} boxes of {pv.scale[0]:g} µm.")
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
        method, box, params = self.method.currentText(), self.box_um.value(), self.params()
        params.update(spatial_sigma=self.spatial_sigma.value(), temporal_sigma=self.temporal_sigma.value())

        def job(token):
            from ..density import extract_density_job

            return extract_density_job(stack, roi, method, box, cancel=token, **params)

        self.extract_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText("Extracting…")
        self._extract_job = JobHandle(job, what="Density extraction", on_event=self._extract_event,
                                      on_result=lambda fld: self._extract_done(fld, stack, image),
                                      on_finished=self._extract_finished)
        return self._extract_job

    def _extract_event(self, ev: Any) -> None:
        if ev.fraction is not None:
            self.progress.setValue(int(100 * ev.fraction))
        self.status.setText(f"{ev.message} — ETA {fmt_seconds(ev.eta_s)}")

    def _extract_done(self, fld: Any, stack: Any, image: Any) -> None:
        from ..density import field_layer_transform

        (sy, sx), (ty, tx) = field_layer_transform(fld)
        it = tuple(float(v) for v in image.translate)
        finite = fld.u[np.isfinite(fld.u)]
        hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        layer = upsert_image(
            self.viewer, LAYER_NAMES["density"], fld.u, scale=(float(image.scale[0]), sy, sx),
            translate=(it[0], ty + it[-2], tx + it[-1]), colormap="magma", opacity=0.5, contrast_limits=(0.0, hi),
            metadata={"napari_binn_output": "density", "units": fld.units, "times_h": fld.t_h.tolist(),
                      "napari_binn_state": id(self.state),
                      "source_layer": image.name, "box_um": fld.dx_um},
        )
        layer.colorbar.visible = True
        for name in (LAYER_NAMES["preview"], LAYER_NAMES["nuclei"]):
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = False
        self.state.source_layer = image.name
        self.state.stack = stack
        self.state.field = fld
        warn = fld.metadata.get("warnings", [])
        cancelled = fld.metadata.get("cancelled")
        self.status.setText(
            f"{'Cancelled: kept ' if cancelled else 'Done: '}{fld.u.shape[0]} frames, {int(fld.mask.sum())} boxes of "
            f"{fld.dx_um:g} µm, density in {fld.units}. Layer '{layer.name}' added; next: Training dock.")
        for w in warn:
            show_warning(f"Density: {w}")
        self._raise_source(image)

    def _extract_finished(self) -> None:
        self.extract_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
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
        for job in (self._preview_job, self._extract_job):
            if job is not None:
                job.stop(detach=True)
        try:
            for ly in shapes_layers(self.viewer):
                ly.events.data.disconnect(self.schedule_preview)
            self.viewer.dims.events.current_step.disconnect(self.schedule_preview)
            self.viewer.layers.events.inserted.disconnect(self._refresh_layer_lists)
            self.viewer.layers.events.removed.disconnect(self._refresh_layer_lists)
        except (TypeError, RuntimeError, ValueError):
            pass

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)
