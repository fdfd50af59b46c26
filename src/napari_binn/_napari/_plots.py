"""Matplotlib figures in the docks, rendered off the GUI thread so the event loop never waits on a draw.

A matplotlib draw of a few log-scaled axes takes 0.2-0.5 s on a busy CPU; done in the GUI thread while a
training thread competes for the cores, it stalls the viewer. :class:`AsyncFigure` draws each figure with the
Agg backend in one background thread and shows the finished image in a QLabel (the GUI thread only copies
pixels). Plot functions receive a fresh ``Figure`` and copies of the data, so nothing is shared across threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QSizePolicy

__all__ = ["AsyncFigure", "style_axes", "latex_pixmap", "rate_bands", "draw_band", "fit_ylim", "FG", "BG"]

FG = "#d0d4da"
BG = "#262930"


def style_axes(ax: Any, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """Dark-theme styling matching napari's panels."""
    ax.set_facecolor(BG)
    ax.tick_params(colors=FG, labelsize=8)
    for spine in ax.spines.values():
        spine.set_color(FG)
    ax.set_title(title, color=FG, fontsize=9)
    ax.set_xlabel(xlabel, color=FG, fontsize=8)
    ax.set_ylabel(ylabel, color=FG, fontsize=8)


def legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, labelcolor=FG)


def rate_bands(fit: Any, u: np.ndarray, tolerance: float = 0.25) -> dict[str, tuple[Any, Any]]:
    """{'D': (sd or None, determined range or None), 'G': ...} of a BinnFit at densities ``u`` (GUI thread: cheap
    network evaluations; the plot thread only draws)."""
    out = {}
    for key in ("D", "G"):
        try:
            out[key] = (fit.band_sd(key, u), fit.determined_range(key, tolerance))
        except (AttributeError, ValueError):
            out[key] = (None, None)
    return out


def draw_band(ax: Any, u: np.ndarray, mean: np.ndarray, sd: Any, determined: Any, color: str = "tab:orange",
              *, grey: str = "#8a8f98") -> None:
    """The learned curve's band (mean ± 2 sd) and, greyed, the densities outside its determined range."""
    u, mean = np.asarray(u, float), np.asarray(mean, float)
    if sd is not None:
        sd = np.asarray(sd, float)
        ax.fill_between(u, mean - 2 * sd, mean + 2 * sd, color=color, alpha=0.3, lw=0, label="± 2 sd")
    lo, hi = (determined if determined is not None else (np.nan, np.nan))
    spans = [(u[0], u[-1])] if determined is None else [(u[0], lo), (hi, u[-1])]
    labelled = False
    for a, b in spans:
        if b > a:
            ax.axvspan(a, b, color=grey, alpha=0.35, lw=0, zorder=0,
                       label=None if labelled else "undetermined")
            labelled = True


def fit_ylim(ax: Any, curves: list[np.ndarray], nonnegative: bool = False) -> None:
    """y-limits from the curves (not from a band that may be far wider): their range with a margin, so a wide
    band is cut at the frame rather than flattening the curves."""
    vals = np.concatenate([np.ravel(np.asarray(c, float)) for c in curves]) if curves else np.array([])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(0.3 * (hi - lo), 0.15 * max(abs(lo), abs(hi)), 1e-12)
    low = lo - pad
    if nonnegative and lo >= 0:
        low = max(low, 0.0)
    ax.set_ylim(low, hi + pad)


class AsyncFigure(QLabel):
    """A QLabel showing a matplotlib figure drawn in a background thread; at most one draw in flight.

    ``render(plot_fn, *args)``: ``plot_fn(fig, *args)`` fills a fresh Figure (in the plot thread; pass copies of
    the data). Requests arriving during a draw collapse into one follow-up draw. Draws start at most every
    ``min_interval_ms`` and at most ``duty`` of the time (a draw of 0.3 s is followed by >= 0.3/duty s without
    drawing), because the plot thread competes with a training thread for the CPU and Python's GIL.
    """

    rendered = Signal(object)

    def __init__(self, height_px: int = 240, *, min_interval_ms: int = 500, dpi: int = 80,
                 duty: float = 0.1) -> None:
        super().__init__()
        self._min_interval_ms = min_interval_ms
        self._duty = duty
        self.setMinimumHeight(height_px)
        self.setMinimumWidth(280)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._height = height_px
        self._dpi = dpi
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="napari-binn-plot")
        self._busy = False
        self._pending: tuple[Callable[..., None], tuple[Any, ...]] | None = None
        self._closed = False
        self.draws = 0
        self._gate = QTimer(self)
        self._gate.setSingleShot(True)
        self._gate.setInterval(min_interval_ms)
        self._gate.timeout.connect(self._flush)
        self.rendered.connect(self._show)

    def set_height(self, height_px: int) -> None:
        """The height (pixels) of the next draws, e.g. for a figure with another row of panels."""
        if int(height_px) != self._height:
            self._height = int(height_px)
            self.setMinimumHeight(self._height)

    @property
    def busy(self) -> bool:
        """True while a draw is in flight or queued."""
        return self._busy or self._pending is not None

    def render(self, plot_fn: Callable[..., None], *args: Any) -> None:
        if self._closed:
            return
        self._pending = (plot_fn, args)
        if not self._busy and not self._gate.isActive():
            self._flush()

    def _flush(self) -> None:
        if self._pending is None or self._busy or self._closed:
            return
        fn, args = self._pending
        self._pending = None
        self._busy = True
        width = max(self.width(), 280)
        self._executor.submit(self._work, fn, args, width, self._height)

    def _work(self, fn: Callable[..., None], args: tuple[Any, ...], width: int, height: int) -> None:
        start = time.perf_counter()
        try:
            fig = Figure(figsize=(width / self._dpi, height / self._dpi), dpi=self._dpi, facecolor=BG)
            canvas = FigureCanvasAgg(fig)
            fn(fig, *args)
            canvas.draw()
            out: Any = np.asarray(canvas.buffer_rgba()).copy()
        except Exception as exc:  # shown as a notification by the GUI thread
            out = exc
        try:
            self.rendered.emit((out, time.perf_counter() - start))
        except RuntimeError:  # the widget was deleted meanwhile
            pass

    def _show(self, payload: tuple[Any, float]) -> None:
        out, seconds = payload
        self._busy = False
        if self._closed:
            return
        self._gate.setInterval(int(max(self._min_interval_ms, 1000 * seconds / self._duty)))
        self._gate.start()
        if isinstance(out, Exception):
            from napari.utils.notifications import show_warning

            show_warning(f"napari-binn could not draw a plot: {out}")
        else:
            h, w = out.shape[:2]
            image = QImage(out.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()
            self.setPixmap(QPixmap.fromImage(image))
            self.draws += 1
        if self._pending is not None and not self._gate.isActive():
            self._flush()

    def shutdown(self) -> None:
        """Stop drawing and wait for the plot thread (the dock is closing)."""
        self._closed = True
        self._gate.stop()
        self._pending = None
        self._executor.shutdown(wait=True, cancel_futures=True)


def latex_pixmap(latex: str, *, fontsize: int = 13, color: str = FG, background: str = BG) -> QPixmap:
    """A QPixmap of ``latex`` (matplotlib mathtext, no LaTeX install needed); plain text if it fails to parse."""
    from io import BytesIO

    def draw(text: str) -> bytes:
        fig = Figure(figsize=(0.01, 0.01), dpi=100, facecolor=background)
        FigureCanvasAgg(fig)
        fig.text(0, 0, text, fontsize=fontsize, color=color)
        buf = BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.06, facecolor=background)
        return buf.getvalue()

    try:
        png = draw(latex)
    except (ValueError, RuntimeError):
        png = draw(latex.replace("$", "").replace("\\", ""))
    pix = QPixmap()
    pix.loadFromData(png, "PNG")
    return pix
