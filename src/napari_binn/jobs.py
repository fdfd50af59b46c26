"""The long-job protocol shared by every stage (CLI, GUI and tests alike).

A long stage is a generator that yields :class:`Progress` events and *returns* its result::

    def extract_density_job(stack, ..., cancel=None) -> Generator[Progress, None, DensityField]

Drive it with :func:`run_job` (blocking), a ``for`` loop, or napari's ``thread_worker``.
Cancellation is cooperative: the stage checks a :class:`CancelToken` between steps and then returns the
best valid (partial) result it has, flagged as cancelled, rather than raising.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Progress", "CancelToken", "JobCancelled", "run_job", "ProgressClock", "is_cancelled"]

R = TypeVar("R")


@dataclass(frozen=True)
class Progress:
    """One progress event of a long job.

    stage: short name of the stage ("density", "train", "symbolic", "simulate", ...).
    step, total: steps done and steps expected (total None when unknown).
    message: one human-readable line.
    elapsed_s, eta_s: wall-clock seconds since the job started and estimated seconds left (None if unknown).
    data: stage-specific payload (losses, a snapshot of D(u), the current frame's density, ...).
    """

    stage: str
    step: int
    total: int | None = None
    message: str = ""
    elapsed_s: float = 0.0
    eta_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """Fraction done in [0, 1], or None when the total is unknown."""
        if not self.total:
            return None
        return min(1.0, max(0.0, self.step / self.total))


class JobCancelled(Exception):
    """Raised only where a stage cannot return a valid partial result (the message says why)."""


class CancelToken:
    """Cooperative cancel and pause flag, safe to set from another thread (e.g. a GUI button)."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def cancel(self) -> None:
        """Ask the job to stop at its next check; also releases a paused job."""
        self._cancel.set()
        self._running.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def pause(self) -> None:
        """Ask the job to wait at its next check until :meth:`resume` or :meth:`cancel`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_if_paused(self, poll_s: float = 0.1) -> None:
        """Block while paused (returns at once when running or cancelled)."""
        while not self._running.wait(poll_s):
            if self._cancel.is_set():
                return


def is_cancelled(cancel: CancelToken | None) -> bool:
    """True when ``cancel`` is set; waits first while it is paused."""
    if cancel is None:
        return False
    cancel.wait_if_paused()
    return cancel.cancelled


class ProgressClock:
    """Elapsed time and a simple linear ETA for progress events."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.start = time.perf_counter()

    def event(self, stage: str, step: int, message: str = "", **data: Any) -> Progress:
        elapsed = time.perf_counter() - self.start
        eta = None
        if self.total and step > 0:
            eta = elapsed / step * max(0, self.total - step)
        return Progress(stage, step, self.total, message, elapsed, eta, data)


def run_job(
    job: Generator[Progress, None, R], callback: Callable[[Progress], None] | None = None
) -> R:
    """Drive a job generator to completion and return its result, passing each event to ``callback``."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
