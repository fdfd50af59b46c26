"""Background jobs of the docks: a core job generator in a napari thread worker (progress, result, errors as
notifications, cancel, a clean stop when the dock or the viewer closes), with torch's thread count of a headless
run.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget

from ..jobs import CancelToken, JobCancelled

__all__ = ["JobHandle", "CloseGuard", "notify_exception", "headless_torch_threads", "show_info", "show_warning",
           "show_error"]

_HEADLESS_THREADS: int | None = None


def headless_torch_threads() -> int:
    """torch's intra-op thread count as seen from the main thread (what a headless run uses)."""
    global _HEADLESS_THREADS
    if _HEADLESS_THREADS is None:
        import torch

        _HEADLESS_THREADS = int(torch.get_num_threads())
    return _HEADLESS_THREADS


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
    ``torch_threads``: the job trains networks: it runs with torch's thread count of a headless run (torch may start
    a Qt worker thread with fewer), and ``worker_threads`` says what the worker thread had.
    """

    def __init__(self, factory: Callable[[CancelToken], Any], *, what: str,
                 on_event: Callable[[Any], None] | None = None,
                 on_result: Callable[[Any], None] | None = None,
                 on_finished: Callable[[], None] | None = None, torch_threads: bool = False) -> None:
        self.token = CancelToken()
        self.what = what
        self._torch_threads = headless_torch_threads() if torch_threads else None  # asked in the GUI thread
        self.worker_threads: int | None = None
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
            if self._torch_threads is not None:
                import torch

                self.worker_threads = int(torch.get_num_threads())
                if self.worker_threads != self._torch_threads:
                    torch.set_num_threads(self._torch_threads)
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

