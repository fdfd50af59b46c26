"""Task functions for tests/test_batch_distributed.py, in a module of their own so that dask workers can import them
(the test adds this folder to sys.path before its cluster starts; workers inherit it)."""

import os
import time
from pathlib import Path

from napari_binn.batch import ItemOutcome


def die_or_finish(item, cancel=None, members=None):
    """Per ``item.metadata["mode"]``: "die_once" kills its worker process the first time (a marker file says it
    already died) and finishes the second time; 'die_always' kills its worker every time, after 1 s; 'ok' finishes; 'ok_slow_rerun'
    finishes at once the first time and slowly when run again (dask recomputes a result lost with its worker)."""
    mode = item.metadata["mode"]
    marker = Path(item.metadata["marker"])
    if mode == "die_always" or (mode == "die_once" and not marker.exists()):
        marker.write_text("died")
        if mode == "die_always":
            time.sleep(1.0)  # the other items have finished when it dies
        os._exit(1)
    if mode == "ok_slow_rerun":
        if marker.exists():
            time.sleep(6.0)
            return ItemOutcome(item.name, Path(item.out), status="done", message="finished again")
        marker.write_text("ran")
    return ItemOutcome(item.name, Path(item.out), status="done", message=f"finished on pid {os.getpid()}")


def write_then_die(item, cancel=None, members=None):
    """The first time: write the item's bundle whole (as run_item_job does, with the item's metadata), then kill the
    worker before the outcome is returned; when dask retries it, the real run_item_job runs (item.data is None, so
    anything but keeping the bundle fails)."""
    from napari_binn.batch import run_item_job
    from napari_binn.pipeline import PipelineConfig, PipelineResult
    from napari_binn.results import save_results

    marker = Path(item.metadata["marker"])
    if not marker.exists():
        marker.write_text("wrote its bundle, then died")
        result = PipelineResult(PipelineConfig())
        result.metadata.update(item.metadata)
        save_results(result, item.out, figures=False)
        os._exit(1)
    return (yield from run_item_job(item, cancel, members))
