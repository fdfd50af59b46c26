"""Batches on dask.distributed: a local cluster or an existing one, items and ensemble members as tasks.

Only imported when a batch runs on a cluster; dask is an optional dependency (``napari-binn[distributed]``), so
everything that needs it imports it here, inside functions, and says which extra to install when it is missing.

What runs where:

- :func:`connect` gives a ``distributed.Client``: a ``LocalCluster`` of worker *processes* (``n_workers`` = the
  cores, one thread each, torch pinned to one thread in every worker) or an existing scheduler by address
  (``tcp://host:8786``, or the ``DASK_SCHEDULER_ADDRESS`` environment variable). An address that cannot be
  reached is an error within ``timeout_s`` (5 s), not a hang.
- :func:`run_on_cluster` submits one task per item (:func:`run_remote_item`, the same :func:`run_item_job` as a
  serial run); items are sent as they are (a path stays a path: the worker reads the file). Each task reports
  its progress on a dask event topic; the client turns those into the serial run's ``Progress`` events.
- A worker that dies while running an item: the scheduler runs the item once more elsewhere (a local cluster
  allows one failure per task), then the item is reported failed; the others are not affected.
- :class:`DaskMembers` trains the ensemble members of one BINN as tasks (``train_member``), used when there are
  fewer items than worker threads; the fit is the one a serial run gives (same seeds).
- Cancel sets a dask ``Event`` that running items and members check (at most twice a second), and cancels the
  tasks not started; bundles are written whole (temporary folder, then a rename), so every bundle stays valid.
"""

from __future__ import annotations

import os
import queue
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError
from ..jobs import CancelToken, Progress, is_cancelled
from .items import BATCH_RUN_KEY, BatchItem, ItemOutcome, run_item_job

__all__ = ["connect", "run_on_cluster", "run_remote_item", "DaskMembers", "RemoteCancel", "require_distributed",
           "EXTRA", "CONNECT_TIMEOUT_S"]

#: The extra that installs dask.distributed.
EXTRA = "napari-binn[distributed]"
#: Seconds to wait for a scheduler given by address.
CONNECT_TIMEOUT_S = 5.0
#: dask settings of a local cluster: one retry for a task whose worker died (dask allows three); no statistical
#: profiler in the workers (it samples every thread's stack every 10 ms, and the training loop, many small torch
#: calls that hold the GIL, then ran slower); a calmer memory monitor; quiet logs. (glibc's malloc thresholds, which
#: dask's MALLOC_TRIM_THRESHOLD_ freezes, are set by the worker plugin, on any cluster: ``_worker.py``.)
LOCAL_CONFIG = {"distributed.scheduler.allowed-failures": 1, "distributed.worker.profile.enabled": False,
                "distributed.worker.memory.monitor-interval": "1s", "distributed.admin.tick.interval": "1s",
                "distributed.admin.system-monitor.interval": "5s", "logging.distributed": "error"}
_POLL_S = 0.5  # how often a task asks whether the batch was cancelled
_EVENT_S = 0.5  # at most this often a task reports progress (and at every stage change)


def require_distributed():
    """The ``distributed`` module, or BackendUnavailableError (an ImportError) naming the extra to install."""
    try:
        import distributed
    except ImportError as exc:
        raise BackendUnavailableError(f"running a batch on dask needs dask.distributed, which is not installed here: "
                          f"pip install '{EXTRA}' (or 'dask[distributed]')") from exc
    return distributed


def _check_address(address: str) -> str:
    address = address.strip()
    if "://" not in address or not address.split("://", 1)[1]:
        raise InputError(f"scheduler address {address!r} is not a dask address: give it as tcp://host:port "
                         "(e.g. tcp://10.0.0.5:8786), the address the dask scheduler prints when it starts")
    return address


def connect(cluster: Any = "local", workers: int | None = None, *, timeout_s: float = CONNECT_TIMEOUT_S):
    """(client, close): a ``distributed.Client`` for ``cluster`` and a function that releases what was started.

    cluster: 'local' (a new LocalCluster of ``workers`` processes, default the number of cores, one thread each),
    a scheduler address ('tcp://host:port'), or a ``distributed.Client`` to use as it is (not closed).
    InputError when an address cannot be reached within ``timeout_s``; ImportError without dask.distributed.
    """
    distributed = require_distributed()
    if isinstance(cluster, distributed.Client):
        _register_plugin(cluster)
        return cluster, lambda: None
    if cluster in (None, "", "local"):
        import dask

        n = int(workers or os.cpu_count() or 1)
        if n < 1:
            raise InputError(f"workers must be at least 1 (got {workers})")
        with dask.config.set(LOCAL_CONFIG):
            local = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                             dashboard_address=None, silence_logs=40)
            client = distributed.Client(local, set_as_default=False)
        _register_plugin(client)
        from ._worker import IgnoreCtrlC

        client.register_plugin(IgnoreCtrlC(), name="napari-binn-ignore-ctrl-c")

        def close() -> None:
            client.close()
            local.close()

        return client, close
    address = _check_address(str(cluster))
    try:
        client = distributed.Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot reach the dask scheduler at {address} within {timeout_s:g} s ({exc}); check the "
                         "address and that the scheduler is running and reachable from here") from None
    _register_plugin(client)
    return client, client.close


def _register_plugin(client) -> None:
    from ._worker import TorchOneThread

    client.register_plugin(TorchOneThread(), name="napari-binn-torch-threads")


class RemoteCancel:
    """A cancel flag that tasks on any worker can read: a named dask ``Event``, asked at most every 0.5 s (so a
    training loop that checks it every step costs nothing). Duck-types :class:`~napari_binn.jobs.CancelToken`
    (no pause on a cluster)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._event: Any = None
        self._last = 0.0
        self._set = False

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])

    def _ev(self, client: Any = None):
        if self._event is None:
            from distributed import Event

            self._event = Event(self.name, client=client)
        return self._event

    def cancel(self, client: Any = None) -> None:
        self._ev(client).set()
        self._set = True

    @property
    def cancelled(self) -> bool:
        if self._set:
            return True
        now = time.monotonic()
        if now - self._last >= _POLL_S:
            self._last = now
            try:
                self._set = bool(self._ev().is_set())
            except Exception:  # noqa: BLE001 - no scheduler to ask: keep running
                return False
        return self._set

    @property
    def paused(self) -> bool:
        return False

    def pause(self) -> None:
        raise ValueError("a batch on a dask cluster cannot be paused, only cancelled")

    def resume(self) -> None:
        pass

    def wait_if_paused(self, poll_s: float = 0.1) -> None:
        pass


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


class DaskMembers:
    """Trains the ensemble members of one BINN as dask tasks (``train_binn(..., members=DaskMembers())``).

    client: the client to submit with; None inside a task (the worker's own client: the item's task steps out
    of the worker's thread pool while its members run, so they can use that thread too) or the default client.
    The density field is sent once (scattered); each member gets its seed (``config.seed + index``).
    """

    def __init__(self, client: Any = None) -> None:
        self.client = client

    def __getstate__(self) -> dict[str, Any]:
        return {"client": None}

    def run(self, field: Any, config: Any, indices: Sequence[int], cancel: Any = None):
        """Yield each member's :class:`~napari_binn.binn.train.MemberResult` as it finishes (any order)."""
        from contextlib import nullcontext

        distributed = require_distributed()
        if self.client is None and _in_worker():
            context = distributed.worker_client()
        else:
            context = nullcontext(self.client or distributed.get_client())
        with context as client:
            remote = cancel if isinstance(cancel, RemoteCancel) else RemoteCancel(f"napari-binn-members-{uuid.uuid4()}")
            yield from self._collect(client, field, config, indices, cancel, remote)

    @staticmethod
    def _collect(client, field, config, indices, cancel, remote):
        import distributed

        from ..binn.train import train_member

        field_future = client.scatter(field, hash=False)
        futures = [client.submit(train_member, field_future, config, int(i), cancel=remote, pure=False, retries=1,
                                 key=f"napari-binn-member-{i}-{uuid.uuid4().hex[:8]}") for i in indices]
        pending = distributed.as_completed(futures, loop=client.loop)
        told = False
        try:
            while not pending.is_empty():
                if not told and not isinstance(cancel, RemoteCancel) and is_cancelled(cancel):
                    remote.cancel(client)  # members return their best model so far
                    told = True
                for future in pending.next_batch(block=False):
                    yield future.result()  # a member that raised fails the fit, as in a serial run
                time.sleep(0.05)
        finally:
            client.cancel([f for f in futures if not f.done()])


def run_remote_item(item: BatchItem, index: int, topic: str, stop: str, members: bool = False,
                    task: Any = None) -> ItemOutcome:
    """One item's task on a worker: :func:`run_item_job` (or ``task(item, cancel, members)``), its progress sent on
    ``topic`` (``{"item", "stage", "fraction", "message"}``, at most twice a second and at each stage change),
    the batch's cancel read from the dask Event ``stop``."""
    from distributed import get_worker

    worker = get_worker()
    cancel = RemoteCancel(stop)

    def send(**msg: Any) -> None:
        try:
            worker.log_event(topic, {"item": index, **msg})
        except Exception:  # noqa: BLE001 - progress only
            pass

    send(stage="start", fraction=0.0, message=f"started on {worker.address}")
    runner = DaskMembers() if members else None
    job = (task or run_item_job)(item, cancel, runner)
    if not isinstance(job, Generator):
        return job
    last, stage = 0.0, None
    while True:
        try:
            ev = next(job)
        except StopIteration as stopped:
            return stopped.value
        now = time.monotonic()
        name = ev.data.get("pipeline_stage", ev.stage)
        if name != stage or now - last >= _EVENT_S:
            stage, last = name, now
            send(stage=str(name), fraction=ev.fraction, message=str(ev.message)[:200])


def run_on_cluster(items: Sequence[BatchItem], todo: Sequence[int], outcomes: list[ItemOutcome], report: Any,
                   cancel: CancelToken | None, cluster: Any, workers: int | None, members: Any, task: Any,
                   shares: dict[str, float]) -> Generator[Progress, None, None]:
    """Run ``items[k]`` for k in ``todo`` as tasks; fills ``outcomes`` and yields the batch's events (the same as a
    serial run's: ``report(k, done)`` when an item starts or ends, pipeline events with ``item`` and
    ``batch_fraction`` between). ``members``: 'auto' (members as tasks when there are fewer items than worker
    threads), True or False."""
    distributed = require_distributed()
    client, close = connect(cluster, workers)
    n, t0 = len(items), time.perf_counter()
    batch = uuid.uuid4().hex[:12]
    topic, stop = f"napari-binn-batch-{batch}", f"napari-binn-batch-{batch}-stop"
    inbox: queue.Queue = queue.Queue()
    fractions = {k: 0.0 for k in todo}
    try:
        client.subscribe_topic(topic, lambda event: inbox.put(event[1]))
        threads = _threads(client)
        if members == "auto":
            members = len(todo) < threads and any(items[k].config.binn.n_models > 1 for k in todo)
        waiting = list(todo)
        futures: dict[Any, int] = {}  # the tasks in flight; a task leaves as soon as its outcome is read
        # with_results: each result is fetched the moment its task finishes. Reading it later (status, then
        # result) lost results: a finished item's outcome sits on its worker, and when that worker dies (the
        # retried dying item ran there next) dask recomputes it, so it was neither 'finished' nor an error.
        pending = distributed.as_completed([], loop=client.loop, with_results=True, raise_errors=False)
        finished = set(range(n)) - set(todo)
        told = False

        def submit_more() -> None:
            # no more items in flight than worker threads: an item waits here, not in a worker's queue, so a worker
            # that dies takes only the item it was running with it
            while waiting and len(futures) < threads:
                k = waiting.pop(0)
                # the run's id goes into the bundle: a retry (its worker lost after the bundle was written) keeps it
                item = replace(items[k], metadata={**items[k].metadata, BATCH_RUN_KEY: batch})
                future = client.submit(run_remote_item, item, k, topic, stop, bool(members), task,
                                       key=f"napari-binn-item-{k}-{batch}", pure=False, retries=1)
                futures[future] = k
                pending.add(future)

        submit_more()
        asked = time.monotonic()
        while not pending.is_empty():
            if not told and is_cancelled(cancel):
                told = True
                waiting.clear()  # never sent: 'not run'
                RemoteCancel(stop).cancel(client)  # running items stop at their next step, writing nothing
                client.cancel([f for f, k in futures.items() if outcomes[k].status == "waiting"])
            try:
                msg = inbox.get(timeout=0.1)
            except queue.Empty:
                msg = None
            while msg is not None:
                k = int(msg["item"])
                if msg.get("stage") == "start" and outcomes[k].status == "waiting":
                    outcomes[k].status = "running"
                    yield report(k, len(finished))
                elif k not in finished and msg.get("stage") != "start":
                    stage, frac = msg["stage"], msg.get("fraction") or 0.0
                    share = 0.0
                    for name, weight in shares.items():
                        if name == stage:
                            share += weight * frac
                            break
                        share += weight
                    fractions[k] = min(1.0, share)
                    fraction = (len(finished - set(fractions)) + sum(fractions.values())) / n
                    elapsed = time.perf_counter() - t0
                    eta = elapsed * (1.0 - fraction) / fraction if fraction > 0.02 else None
                    yield Progress(stage, 0, None, msg.get("message", ""), elapsed, None,
                                   {"item": k, "n_items": n, "item_name": items[k].name, "pipeline_stage": stage,
                                    "item_fraction": fractions[k], "batch_fraction": fraction, "batch_eta_s": eta})
                try:
                    msg = inbox.get_nowait()
                except queue.Empty:
                    msg = None
            for future, result in pending.next_batch(block=False):
                k = futures.pop(future)
                outcomes[k] = _outcome_of(future, result, items[k], outcomes[k])
                future.release()  # read: the scheduler may forget it (never recomputed if its worker dies later)
                fractions[k] = 1.0
                finished.add(k)
                yield report(k, len(finished))
            if waiting and not told:
                if time.monotonic() - asked > 2.0:  # the cluster may grow or shrink (adaptive clusters)
                    threads, asked = _threads(client), time.monotonic()
                submit_more()
    finally:
        try:
            client.unsubscribe_topic(topic)
        except Exception:  # noqa: BLE001
            pass
        close()


def _threads(client) -> int:
    """Worker threads of the cluster now (at least 1: an adaptive cluster may start with none)."""
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001
        return 1


def _outcome_of(future: Any, result: Any, item: BatchItem, before: ItemOutcome) -> ItemOutcome:
    """The outcome a task returned (``result``, fetched by as_completed); a task that erred (its worker died twice,
    say) or was cancelled before it started becomes a 'failed' or 'not run' outcome."""
    if isinstance(result, ItemOutcome):
        return result
    if future.cancelled() or isinstance(result, BaseException) and type(result).__name__ == "CancelledError":
        return ItemOutcome(item.name, Path(item.out), status="not run" if before.status == "waiting" else "stopped",
                           message="" if before.status == "waiting" else "cancelled; nothing written")
    exc = result[1] if isinstance(result, tuple) and len(result) == 3 else result
    name = type(exc).__name__
    if name == "KilledWorker":
        why = "the worker running it died, and died again when it was retried (out of memory?)"
    elif isinstance(exc, BaseException):
        why = f"{name}: {exc}"
    else:  # not an outcome and not an error: a bug in the task function
        why = f"the task returned {type(result).__name__}, not an ItemOutcome"
    return ItemOutcome(item.name, Path(item.out), status="failed", message=why)
