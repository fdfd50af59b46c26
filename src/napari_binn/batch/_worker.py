"""What every dask worker of a batch sets up (imported on workers and only when dask.distributed is installed)."""

from __future__ import annotations

import os

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["TorchOneThread"]


class TorchOneThread(WorkerPlugin):
    """torch (and the BLAS libraries) on one thread in each worker: a worker runs one task per core, and torch's
    default of one thread per core in every worker would oversubscribe the machine several times over."""

    def setup(self, worker) -> None:  # noqa: D401 - dask's API
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = "1"
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return
        torch.set_num_threads(1)
        import napari_binn.pipeline  # noqa: F401 - imported once at start, not in the first item's time
