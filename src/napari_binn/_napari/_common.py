"""Helpers shared by the docks: background jobs, notifications, layer conversion and reuse, form widgets.

The docks' parameter forms are magicgui containers (:func:`form`, :func:`row`) of magicgui value widgets
(:func:`fspin`, :func:`ispin`, ComboBox, CheckBox, ...), shown in Qt group boxes (:func:`section`) next to the
plain-Qt parts magicgui does not provide (plots, tables, progress bars).
Nothing numerical lives here: stacks, ROIs and layers are only repackaged for the core.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from magicgui.widgets import Container, FloatSpinBox, SpinBox, Widget
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QGroupBox, QLabel, QVBoxLayout, QWidget

from ..io import Stack
from ..jobs import CancelToken, JobCancelled

__all__ = ["JobHandle", "CloseGuard", "notify_exception", "layer_to_stack", "shapes_to_roi", "upsert_image",
           "upsert_points", "image_layers", "shapes_layers", "wrap_label", "show_info", "show_warning",
           "show_error", "fmt_seconds", "fspin", "ispin", "set_clamped", "form", "row", "section",
           "align_labels"]


class _Failure:
    """What a job returns to the GUI thread instead of raising (so no traceback dialog is ever shown)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def notify_exception(exc: BaseException, what: str) -> None:
    """One napari error notification that says what failed and why (ValueError messages say what to do)."""
    if isinstance(exc, JobCancelled):
        show_info(f"{what}: cancelled ({exc})")
    elif isinstance(exc, (ValueError, FileExistsError, FileNotFoundError)):
        show_error(f"{what}: {exc}")
    else:
        show_error(f"{what} failed ({type(exc).__name__}: {exc})")


class JobHandle:
    """One long core job (a Progress generator) in a napari thread worker, with cancel/pause and a clean stop.

    ``factory(token)`` is called *inside* the worker thread and returns the job generator (or a plain result).
    ``on_event(progress)`` runs in the GUI thread for every yielded event, ``on_result(result)`` once at the end;
    errors become a notification naming ``what``. :meth:`stop` cancels cooperatively and waits for the thread.
    """

    def __init__(self, factory: Callable[[CancelToken], Any], *, what: str,
                 on_event: Callable[[Any], None] | None = None,
                 on_result: Callable[[Any], None] | None = None,
                 on_finished: Callable[[], None] | None = None) -> None:
        self.token = CancelToken()
        self.what = what
        self._done = threading.Event()  # the worker thread has finished the job
        self._delivered = False  # ... and the GUI thread has handled its result and 'finished'
        self._on_event, self._on_result, self._on_finished = on_event, on_result, on_finished
        self.worker = create_worker(self._run, factory, _start_thread=False)
        self.worker.yielded.connect(self._yielded)
        self.worker.returned.connect(self._returned)
        self.worker.finished.connect(self._finished)
        self.worker.start()

    def _run(self, factory: Callable[[CancelToken], Any]) -> Generator[Any, None, Any]:
        try:
            job = factory(self.token)
            if inspect.isgenerator(job):
                job = yield from job
            return job
        except Exception as exc:  # handed to the GUI thread as a notification
            return _Failure(exc)
        finally:
            self._done.set()

    @property
    def running(self) -> bool:
        """True until the result has been handed to the GUI (not only until the thread is done)."""
        return not self._delivered

    @property
    def thread_alive(self) -> bool:
        """True while the worker thread is still running the job."""
        return not self._done.is_set()

    def _yielded(self, event: Any) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception as exc:  # a display problem must not kill the job
                notify_exception(exc, f"{self.what} (display)")

    def _returned(self, result: Any) -> None:
        if isinstance(result, _Failure):
            notify_exception(result.exc, self.what)
        elif self._on_result is not None:
            try:
                self._on_result(result)
            except Exception as exc:  # never let an exception escape a Qt slot (PyQt6 aborts the app)
                notify_exception(exc, f"{self.what} (showing the result)")

    def _finished(self) -> None:
        self._delivered = True
        if self._on_finished is not None:
            try:
                self._on_finished()
            except RuntimeError:  # the dock was deleted meanwhile: nothing left to update
                pass

    def disconnect(self) -> None:
        """Stop delivering events/results to the GUI (used when the dock or viewer goes away)."""
        self._on_event = self._on_result = self._on_finished = None

    def stop(self, wait_s: float = 30.0, *, detach: bool = False) -> bool:
        """Cancel the job (it returns its best partial result) and wait up to ``wait_s`` for the thread.

        ``detach``: also drop the GUI callbacks first (closing). Returns True when the thread finished.
        """
        if detach:
            self.disconnect()
        if self._done.is_set():
            return True
        self.token.cancel()
        deadline = time.monotonic() + wait_s
        while not self._done.wait(0.02):
            if time.monotonic() > deadline:
                return False
        if detach:
            self.worker.quit()
        return True


class CloseGuard(QObject):
    """Calls ``on_close`` when the widget closes, its dock is removed, or the napari main window closes.

    Plain Qt event filters on the widget and each of its ancestors (public API), re-installed whenever one of
    them changes parent (the dock is wrapped in a QDockWidget, then added to the main window).
    """

    def __init__(self, widget: QWidget, on_close: Callable[[], None]) -> None:
        super().__init__(widget)
        self._widget = widget
        self._on_close = on_close
        self._rehook()

    def _rehook(self) -> None:
        obj: QObject | None = self._widget
        while obj is not None:  # installing twice is a no-op in Qt; no Python references are kept
            obj.installEventFilter(self)
            obj = obj.parent()

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        etype = event.type()
        if etype == QEvent.Type.ParentChange:
            if obj is self._widget and self._widget.parent() is None:
                self._on_close()  # napari's dock 'x' removes the dock: the widget loses its parent
            else:
                self._rehook()
        elif etype == QEvent.Type.Close and (obj is self._widget or obj is self._widget.window()):
            self._on_close()
        return False


def wrap_label(text: str = "", lines: int = 3) -> QLabel:
    """A word-wrapped QLabel that keeps room for ``lines`` lines (docks otherwise clip wrapped text)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setMinimumHeight(lines * label.fontMetrics().lineSpacing() + 4)
    return label


# ------------------------------------------------------------------------------------------------ forms
def fspin(value: float, lo: float, hi: float, step: float | None = 1.0, *, label: str, tooltip: str | None = None,
          decimals: int = 2, suffix: str = "", special: str = "") -> FloatSpinBox:
    """A magicgui FloatSpinBox with ``decimals`` digits, a unit ``suffix`` and a ``special`` text shown at ``lo``
    (e.g. "unknown" or "auto" for 0). ``step=None``: adaptive step (a tenth of the value's decade)."""
    w = FloatSpinBox(label=label, tooltip=tooltip, min=lo, max=hi, step=step)
    w.native.setDecimals(decimals)  # before the range and value: Qt rounds them to the decimals
    w.min, w.max = lo, hi
    w.value = value
    if suffix:
        w.native.setSuffix(suffix)
    if special:
        w.native.setSpecialValueText(special)
    return w


def ispin(value: int, lo: int, hi: int, *, label: str, tooltip: str | None = None) -> SpinBox:
    """A magicgui SpinBox (integer, step 1)."""
    return SpinBox(value=value, min=lo, max=hi, step=1, label=label, tooltip=tooltip)


def set_clamped(widget: Any, value: float) -> None:
    """Set a ranged magicgui widget to ``value`` clipped to its range (magicgui raises outside of it; values read
    from files or bundles are clipped, as a Qt spin box would)."""
    widget.value = min(max(value, widget.min), widget.max)


def form(*widgets: Widget, **kwargs: Any) -> Container:
    """A labelled magicgui form (one row per widget; buttons and check boxes span the row), no outer margins."""
    container = Container(labels=True, **kwargs)
    container.margins = (0, 0, 0, 0)
    container.extend(widgets)  # added after construction, so magicgui aligns the labels to the widest one
    return container


def row(*widgets: Widget, label: str = "", tooltip: str | None = None) -> Container:
    """Several magicgui widgets side by side: one row of a :func:`form` (with its ``label``)."""
    container = Container(widgets=list(widgets), layout="horizontal", labels=False, label=label, tooltip=tooltip)
    container.margins = (0, 0, 0, 0)
    return container


def align_labels(*forms: Container) -> None:
    """Size the label column of each :func:`form` from its labels as drawn.

    magicgui measures the labels with the application's font, but napari's style sheet draws them larger, so
    long labels push their fields to the right of the others. Called when a dock is shown (the style sheet is
    known then); each labelled row of a magicgui form is a widget whose layout starts with its QLabel.
    """
    for container in forms:
        labels: list[QLabel] = []
        layout = container.native.layout()
        for i in range(layout.count()):
            rowwidget = layout.itemAt(i).widget()
            inner = rowwidget.layout() if rowwidget is not None else None
            first = inner.itemAt(0).widget() if inner is not None and inner.count() else None
            if isinstance(first, QLabel):
                labels.append(first)
        for label in labels:
            label.ensurePolished()
        width = max((label.sizeHint().width() for label in labels), default=0)
        for label in labels:
            label.setMinimumWidth(width)


def section(title: str, *parts: Widget | QWidget) -> QGroupBox:
    """A titled Qt group box framing magicgui containers (``.native``) and Qt widgets, top to bottom."""
    box = QGroupBox(title)
    layout = QVBoxLayout(box)
    for part in parts:
        layout.addWidget(part.native if isinstance(part, Widget) else part)
    return box


def fmt_seconds(s: float | None) -> str:
    if s is None or not np.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------------ layers
def image_layers(viewer: Any) -> list[Any]:
    from napari.layers import Image

    return [ly for ly in viewer.layers if isinstance(ly, Image)]


def shapes_layers(viewer: Any) -> list[Any]:
    from napari.layers import Shapes

    return [ly for ly in viewer.layers if isinstance(ly, Shapes)]


def layer_to_stack(layer: Any, *, channel: int = 0, pixel_size_um: float | None,
                   frame_interval_h: float | None) -> Stack:
    """A core Stack from an image layer: (T, Y, X) or (T, C, Y, X) with ``channel`` chosen.

    Frame times: ``frame_interval_h`` if given, else the reader's ``metadata['times_h']``, else frame indices
    (flagged ``time_units='frames'``). Raises ValueError with what to do for data without a time axis.
    """
    if getattr(layer, "multiscale", False):
        raise ValueError(f"Layer {layer.name!r} is multiscale: open the full-resolution time-lapse instead.")
    if getattr(layer, "rgb", False):
        raise ValueError(f"Layer {layer.name!r} is RGB: split it into channels (Image > Split) and choose one.")
    data = layer.data
    if data.ndim == 2:
        raise ValueError(f"Layer {layer.name!r} is a single 2D image: density dynamics need a time-lapse "
                         "(T, Y, X). Open the whole stack (or a folder of frames).")
    if data.ndim == 4:
        if not 0 <= channel < data.shape[1]:
            raise ValueError(f"Channel {channel} is outside 0..{data.shape[1] - 1} of layer {layer.name!r}.")
        data = data[:, channel]
    elif data.ndim != 3:
        raise ValueError(f"Layer {layer.name!r} has {data.ndim} dimensions; expected (T, Y, X) or (T, C, Y, X).")
    T = data.shape[0]
    md = dict(layer.metadata or {})
    meta = {k: v for k, v in md.items() if k in ("source", "channel", "warnings", "notes")}
    if frame_interval_h:
        times = np.arange(T, dtype=float) * float(frame_interval_h)
        meta["time_units"] = "h"
    else:
        times = np.asarray(md.get("times_h", []), dtype=float)
        if times.shape != (T,):
            times = np.arange(T, dtype=float)
            meta["time_units"] = "frames"
        else:
            meta["time_units"] = md.get("time_units", "h")
    return Stack(data, pixel_size_um, times, layer.name, meta)


def shapes_to_roi(shapes: Any, image: Any, only: Any = None) -> tuple[list[np.ndarray] | None, list[str]]:
    """ROI polygons in the image's pixel (row, col) frame from a Shapes layer (:func:`napari_binn.roi.shapes_to_roi`
    of its data and shape types); (None, notes) when it is empty or has no closed shape. ``only``: indices of the
    shapes to use (default all).

    Shapes are mapped through world coordinates (each layer's scale and translate), so a Shapes layer drawn
    with another scale is converted correctly. Lines and paths enclose no area and are skipped with a note.
    """
    from ..roi import shapes_to_roi as core_shapes_to_roi

    if shapes is None or len(shapes.data) == 0:
        return None, ["no ROI drawn: the whole image is analysed"]
    s_scale = np.asarray(shapes.scale[-2:], float)
    s_trans = np.asarray(shapes.translate[-2:], float)
    i_scale = np.asarray(image.scale[-2:], float)
    i_trans = np.asarray(image.translate[-2:], float)
    notes: list[str] = []
    if not np.allclose(s_scale, i_scale) or not np.allclose(s_trans, i_trans):
        notes.append(f"the ROI layer's scale {tuple(s_scale)} differs from the image's {tuple(i_scale)}: "
                     "shapes were converted to image pixels through world coordinates")
    polys, more = core_shapes_to_roi(shapes.data, shapes.shape_type, only=only, scale=s_scale / i_scale,
                                     offset=(s_trans - i_trans) / i_scale)
    return polys, notes + more


def upsert_image(viewer: Any, name: str, data: Any, **kwargs: Any) -> Any:
    """Add an image layer called ``name`` or update the existing one in place (no layer spam on re-runs)."""
    from napari.layers import Image

    if name in viewer.layers:
        layer = viewer.layers[name]
        if isinstance(layer, Image) and layer.data.ndim == np.ndim(data):
            layer.data = data
            for key in ("scale", "translate", "metadata", "colormap", "contrast_limits", "opacity", "visible",
                        "blending"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        viewer.layers.remove(layer)
    return viewer.add_image(data, name=name, **kwargs)


def upsert_points(viewer: Any, name: str, data: np.ndarray, **kwargs: Any) -> Any:
    """Add a points layer called ``name`` or replace the data of the existing one."""
    from napari.layers import Points

    if name in viewer.layers:
        layer = viewer.layers[name]
        if isinstance(layer, Points) and layer.ndim == data.shape[1]:
            layer.data = data
            for key in ("scale", "translate", "metadata"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        viewer.layers.remove(layer)
    return viewer.add_points(data, name=name, **kwargs)
