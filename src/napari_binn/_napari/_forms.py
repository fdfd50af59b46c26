"""Form helpers of the docks: magicgui value widgets and containers (:func:`form`, :func:`row`) shown in Qt group
boxes (:func:`section`) next to the plain-Qt parts magicgui does not provide (plots, tables, progress bars)."""

from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import Container, FloatSpinBox, SpinBox, Widget
from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import QFrame, QGroupBox, QLabel, QScrollArea, QVBoxLayout, QWidget

__all__ = ["wrap_label", "fspin", "ispin", "set_clamped", "form", "row", "section", "align_labels", "fmt_seconds",
           "scrolling_layout"]


def scrolling_layout(dock: QWidget) -> QVBoxLayout:
    """The layout a dock fills, inside a vertical scroll area: a dock taller than the screen (the results dock
    needs about 1200 pixels) scrolls instead of stretching napari's window past the screen's bottom edge, where its
    last buttons could not be reached. The scroll area is as wide as the content needs (no horizontal bar)."""
    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _WidthScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    inner = QWidget()
    area.setWidget(inner)
    outer.addWidget(area)
    return QVBoxLayout(inner)


class _WidthScrollArea(QScrollArea):
    """A scroll area whose minimum width is its content's (plus the vertical scroll bar's), so the dock is never
    narrower than its forms and tables need."""

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        # the content's layout changed (e.g. a longer status text): its width may have grown, so ask the dock again
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def minimumSizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().minimumSizeHint()
        inner = self.widget()
        if inner is not None:
            hint.setWidth(inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width())
        return hint


def wrap_label(text: str = "", lines: int = 3) -> QLabel:
    """A word-wrapped QLabel that keeps room for ``lines`` lines (docks otherwise clip wrapped text)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setMinimumHeight(lines * label.fontMetrics().lineSpacing() + 4)
    return label


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

