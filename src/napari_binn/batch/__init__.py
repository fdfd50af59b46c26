"""Batches: the whole pipeline on many inputs (stacks x ROIs), one results bundle each, with one failure policy,
here one after another or as tasks on dask.distributed.

- :mod:`.items`: the items (plain, picklable), their names and folders, bundle completeness (``--resume``) and the
  one per-item run (:func:`run_item_job`) with the failure policy;
- :mod:`.cluster`: a local dask cluster or an existing one; items and ensemble members as tasks (optional
  dependency: ``napari-binn[distributed]``);
- :mod:`.summary`: ``summary.csv``, the plate heat map and ``summary.html`` of a batch folder.

The command line (``napari-binn batch``) and the per-shape batch dock both drive :func:`run_batch`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from ..jobs import CancelToken, Progress, is_cancelled
from .items import (STAGE_NAMES, SUMMARY_FILES, BatchItem, ItemOutcome, bundle_complete, check_batch_folder,
                    check_outputs, item_names, load_input, outcome_of_bundle, run_item, run_item_job)

__all__ = ["BatchItem", "ItemOutcome", "load_input", "check_outputs", "check_batch_folder", "item_names",
           "bundle_complete", "outcome_of_bundle", "run_item", "run_item_job", "run_batch", "STAGE_NAMES",
           "SUMMARY_FILES"]

#: Rough share of one item's run time per stage, for one progress fraction over the whole batch.
_STAGE_SHARE = {"density": 0.08, "binn": 0.62, "symbolic": 0.1, "simulate": 0.05, "refit": 0.14, "qc": 0.01}


def run_batch(items: Sequence[BatchItem], *, cancel: CancelToken | None = None, cluster: Any = None,
              workers: int | None = None, resume: bool = False, members: Any = "auto", task: Any = None
              ) -> Generator[Progress, None, list[ItemOutcome]]:
    """Run the items; returns their outcomes, in order.

    cluster: None runs them here, one after another; 'local' on a new local dask cluster of ``workers`` processes
    (default: one per core); a scheduler address ('tcp://host:8786') on that cluster; or a ``distributed.Client``.
    The results are the same wherever they run (same seeds). resume: items whose bundle is complete are not run
    (their outcome is read back from the bundle). members (cluster only): train each BINN's ensemble members as
    tasks: 'auto' (when there are fewer items than worker threads), True or False. task: the function per item
    (``task(item, cancel, members)``, a job generator or a plain outcome; default :func:`run_item_job`).

    Yields each item's pipeline events with ``data`` holding ``item`` (its index), ``n_items``, ``item_name``,
    ``batch_fraction`` (of the whole batch, from rough stage shares) and ``batch_eta_s`` (on a cluster also
    ``item_fraction``, and events come from several items at a time); and, whenever an item starts or ends, a
    ``Progress(stage='batch')`` whose ``data['outcome']`` is a copy of its outcome. Cancel: pending items are not
    run, running ones stop at their next step without writing; written bundles stay valid.
    """
    n = len(items)
    outcomes = [ItemOutcome(it.name, Path(it.out)) for it in items]
    t0 = time.perf_counter()

    def report(k: int, done: int) -> Progress:
        o = outcomes[k]
        text = f"{o.name}: {o.status}" + (f" ({o.message})" if o.message else "")
        return Progress("batch", done, n, text, time.perf_counter() - t0,
                        data={"item": k, "n_items": n, "outcome": dataclasses.replace(o)})

    todo = []
    for k, item in enumerate(items):
        if resume and bundle_complete(item.out):
            outcomes[k] = outcome_of_bundle(item)
            yield report(k, k)
        else:
            todo.append(k)
    if cluster is not None and todo:
        from .cluster import run_on_cluster

        yield from run_on_cluster(items, todo, outcomes, report, cancel, cluster, workers, members, task,
                                  _STAGE_SHARE)
    else:
        yield from _run_here(items, todo, outcomes, report, cancel, task, t0)
    for outcome in outcomes:
        if outcome.status in ("waiting", "running"):
            outcome.status = "not run"
    return outcomes


def _run_here(items: Sequence[BatchItem], todo: Sequence[int], outcomes: list[ItemOutcome], report: Any,
              cancel: CancelToken | None, task: Any, t0: float) -> Generator[Progress, None, None]:
    """The items in turn, in this process."""
    n = len(items)
    for k in todo:
        item = items[k]
        if is_cancelled(cancel):
            break
        outcomes[k].status = "running"
        yield report(k, k)
        job = (task or run_item_job)(item, cancel, None)
        if isinstance(job, ItemOutcome):
            outcomes[k] = job
            yield report(k, k + 1)
            continue
        while True:
            try:
                ev = next(job)
            except StopIteration as stop:
                outcomes[k] = stop.value
                break
            stage = ev.data.get("pipeline_stage", ev.stage)
            share = 0.0
            for name, weight in _STAGE_SHARE.items():
                if name == stage:
                    share += weight * (ev.fraction or 0.0)
                    break
                share += weight
            fraction = min(1.0, (k + share) / n)
            elapsed = time.perf_counter() - t0
            eta = elapsed * (1.0 - fraction) / fraction if fraction > 0.02 else None
            yield Progress(ev.stage, ev.step, ev.total, ev.message, ev.elapsed_s, ev.eta_s,
                           {**ev.data, "item": k, "n_items": n, "item_name": item.name, "batch_fraction": fraction,
                            "item_fraction": min(1.0, share), "batch_eta_s": eta})
        yield report(k, k + 1)
