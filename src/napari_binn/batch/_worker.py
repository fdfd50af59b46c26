"""What every dask worker of a batch sets up (imported on workers and only when dask.distributed is installed)."""

from __future__ import annotations

import ctypes
import os
import sys

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["TorchOneThread", "IgnoreCtrlC"]


class TorchOneThread(WorkerPlugin):
    """torch (and the BLAS libraries) on one thread in each worker: a worker runs one task per core, and torch's
    default of one thread per core in every worker would oversubscribe the machine several times over."""

    def setup(self, worker) -> None:  # noqa: D401 - dask's API
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = "1"
        _malloc_for_training()
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return
        torch.set_num_threads(1)
        import napari_binn.pipeline  # noqa: F401 - imported once at start, not in the first item's time


class IgnoreCtrlC(WorkerPlugin):
    """A local cluster's workers ignore SIGINT: Ctrl-C in the terminal reaches the whole process group, and is the
    client's to handle (it cancels the batch cooperatively), not a reason for every worker to die mid-task. (Not
    for a cluster started elsewhere, whose workers' Ctrl-C is their owner's.)"""

    def setup(self, worker) -> None:  # noqa: D401 - dask's API
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _malloc_for_training() -> None:
    """Undo, in a running worker, what dask's MALLOC_TRIM_THRESHOLD_ does to glibc: it also freezes the mmap
    threshold at 128 KiB, so every batch-sized tensor of a training loop is mmap'd, zeroed and unmapped again
    (about half of a task's time in the kernel). Fixed thresholds of 32 MiB (mmap) and 128 MiB (trim) instead;
    nothing outside glibc (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2 ** 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 2 ** 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
