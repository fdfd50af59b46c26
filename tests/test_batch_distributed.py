"""Batches on dask.distributed (a local cluster of 2 worker processes, shared by this module's tests): the same
results as a serial run, a dying worker, cancel, an unreachable scheduler. Skipped only without dask.distributed."""

import dataclasses
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_binn.errors import InputError

pytest.importorskip("distributed")

from napari_binn.batch import BatchItem, bundle_complete, run_batch  # noqa: E402
from napari_binn.batch.cluster import connect  # noqa: E402
from napari_binn.jobs import CancelToken, run_job  # noqa: E402
from napari_binn.results import load_results  # noqa: E402


@pytest.fixture(scope="module")
def client():
    """A local cluster of 2 worker processes (1 thread each), its workers able to import tests/_batch_tasks.py."""
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)
    c, close = connect("local", 2)
    yield c
    close()
    sys.path.remove(here)


def _config(pipeline_config, n_models=2):
    cfg = pipeline_config()
    cfg.binn = cfg.binn.replace(steps=20, warmup_steps=5, n_models=n_models)
    cfg.refit.candidates = 1
    cfg.refit.max_evals = 6
    cfg.refit.reference_model = ""
    cfg.symbolic.n_samples, cfg.symbolic.max_complexity = 50, 8
    return cfg


def test_two_workers_give_the_serial_results(tmp_path, client, fkpp_field, pipeline_config):
    cfg = _config(pipeline_config)
    fields = {"a": fkpp_field, "b": dataclasses.replace(fkpp_field, u=fkpp_field.u * 0.9)}

    def items(where):
        return [BatchItem(n, f, cfg, tmp_path / where / n) for n, f in fields.items()]

    serial = run_job(run_batch(items("serial")))
    events = []
    t0 = time.perf_counter()
    # items and (members=True) their ensemble members as tasks
    dist = run_job(run_batch(items("dask"), cluster=client, members=True), events.append)
    assert time.perf_counter() - t0 < 60
    assert [o.status for o in serial] == [o.status for o in dist] == ["done", "done"], [o.message for o in dist]
    u = np.linspace(200.0, 1800.0, 9)
    for s, d in zip(serial, dist):
        a, b = load_results(s.out), load_results(d.out)
        np.testing.assert_array_equal(a.fit.D_ensemble(u), b.fit.D_ensemble(u))
        np.testing.assert_array_equal(a.fit.G_ensemble(u), b.fit.G_ensemble(u))
        assert a.fit.metadata["seeds"] == b.fit.metadata["seeds"] == [0, 1]
        assert (s.D, s.G, s.constants, s.nt_error) == (d.D, d.G, d.constants, d.nt_error)
    rows = [(e.data["item"], e.data["outcome"].status) for e in events if e.stage == "batch"]
    assert sorted(rows) == [(0, "done"), (0, "running"), (1, "done"), (1, "running")]
    progress = [e for e in events if e.stage != "batch"]
    assert progress and all(0 <= e.data["batch_fraction"] <= 1 for e in progress)
    assert {e.data["pipeline_stage"] for e in progress} >= {"binn", "refit"}


def test_a_worker_that_dies_is_retried_once_then_reported(tmp_path, client):
    import _batch_tasks

    def run(*modes, slow_reader=False):
        items = [BatchItem(m, None, None, tmp_path / m, metadata={"mode": m, "marker": str(tmp_path / m)})
                 for m in modes]
        seen = []

        def read_slowly(ev):  # a busy GUI: the outcomes are read only after both workers have died
            if slow_reader and not seen:
                seen.append(ev)
                time.sleep(4.0)

        outcomes = run_job(run_batch(items, cluster=client, members=False, task=_batch_tasks.die_or_finish),
                           read_slowly)
        return {o.name: (o.status, o.message) for o in outcomes}

    # dies twice: reported failed; the other item is not lost, even when its worker is the one the retry kills
    # (the only worker left) before the batch reads its outcome
    status = run("die_always", "ok_slow_rerun", slow_reader=True)
    assert status["die_always"][0] == "failed" and "died" in status["die_always"][1]
    assert status["ok_slow_rerun"][0] == "done" and "finished on pid" in status["ok_slow_rerun"][1], status
    status = run("die_once", "ok")  # its worker dies; the item runs again elsewhere and finishes
    assert status["die_once"][0] == "done" and "finished" in status["die_once"][1]
    assert (tmp_path / "die_once").exists() and status["ok"][0] == "done"


def test_a_retry_keeps_the_bundle_its_first_attempt_wrote(tmp_path, client):
    """A worker lost between writing an item's bundle and returning its outcome: dask runs the item again, and the
    retry finds the bundle complete and written by this batch run, so it reports the item done instead of failing
    on the folder it cannot overwrite."""
    import _batch_tasks

    item = BatchItem("late_death", None, None, tmp_path / "late_death", metadata={"marker": str(tmp_path / "m")})
    outcomes = run_job(run_batch([item], cluster=client, members=False, task=_batch_tasks.write_then_die))
    assert outcomes[0].status == "done" and "first attempt" in outcomes[0].message, outcomes[0].message
    assert (tmp_path / "m").exists() and bundle_complete(tmp_path / "late_death")
    assert load_results(tmp_path / "late_death").metadata["batch_run"]


def test_cancel_stops_the_batch_and_leaves_written_bundles_valid(tmp_path, client, fkpp_field, pipeline_config):
    cfg = _config(pipeline_config, n_models=1)
    cfg.binn = cfg.binn.replace(steps=3000, warmup_steps=100)  # long enough to be running when cancelled
    items = [BatchItem(f"s{i}", fkpp_field, cfg, tmp_path / "out" / f"s{i}") for i in range(3)]
    token = CancelToken()

    def cancel_when_training(ev):
        if ev.data.get("pipeline_stage") == "binn":
            token.cancel()

    t0 = time.perf_counter()
    outcomes = run_job(run_batch(items, cluster=client, cancel=token), cancel_when_training)
    assert time.perf_counter() - t0 < 30
    assert {o.status for o in outcomes} <= {"stopped", "not run", "done"} and any(o.status != "done" for o in outcomes)
    for o in outcomes:
        assert bundle_complete(o.out) if o.status == "done" else not o.out.exists()
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_an_unreachable_scheduler_is_a_clear_error_within_seconds():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"cannot reach the dask scheduler at tcp://127.0.0.1:{port}"):
        connect(f"tcp://127.0.0.1:{port}", timeout_s=2.0)
    assert time.perf_counter() - t0 < 8
    with pytest.raises(InputError, match="tcp://host:port"):
        connect("127.0.0.1:8786")


def test_the_command_line_on_a_running_cluster(tmp_path, client, fkpp_field, pipeline_config, capsys):
    """napari-binn batch --scheduler ADDRESS: the same engine through an address (here the module's cluster)."""
    import csv

    from napari_binn.cli import EXIT_OK, main
    from napari_binn.pipeline import PipelineResult
    from napari_binn.results import save_results

    cfg = _config(pipeline_config, n_models=1)
    cfg.to_toml(tmp_path / "tiny.toml")
    for name in ("B03", "B04"):
        save_results(PipelineResult(cfg, field=fkpp_field), tmp_path / "in" / name, figures=False)
    out = tmp_path / "out"
    code = main(["batch", str(tmp_path / "in" / "B03"), str(tmp_path / "in" / "B04"), "--config",
                 str(tmp_path / "tiny.toml"), "--out", str(out), "--scheduler", client.scheduler.address])
    assert code == EXIT_OK
    text = capsys.readouterr().out
    assert f"running on the dask cluster at {client.scheduler.address}" in text and "2 of 2 written" in text
    with open(out / "summary.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["well"], r["status"]) for r in rows] == [("B03", "B03", "done"), ("B04", "B04", "done")]
    assert (out / "plate.png").is_file() and bundle_complete(out / "B03") and bundle_complete(out / "B04")
    assert client.status == "running"  # a cluster given by address is not closed
