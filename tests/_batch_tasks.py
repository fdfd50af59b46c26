"""Task functions for tests/test_batch_distributed.py, in a module of their own so that dask workers can import them
(the test adds this folder to sys.path before its cluster starts; workers inherit it)."""

import os
from pathlib import Path

from napari_binn.batch import ItemOutcome


def die_or_finish(item, cancel=None, members=None):
    """Per ``item.metadata["mode"]``: "die_once" kills its worker process the first time (a marker file says it
    already died) and finishes the second time; 'die_always' kills its worker every time; 'ok' finishes."""
    mode = item.metadata["mode"]
    marker = Path(item.metadata["marker"])
    if mode == "die_always" or (mode == "die_once" and not marker.exists()):
        marker.write_text("died")
        os._exit(1)
    return ItemOutcome(item.name, Path(item.out), status="done", message=f"finished on pid {os.getpid()}")
