"""The batch engine (GUI-free): per-item isolation, bundles written as items finish, cancel, plain items."""

import pickle

import numpy as np
import pytest

from napari_binn.batch import BatchItem, ItemOutcome, check_outputs, run_batch, run_item
from napari_binn.jobs import CancelToken, run_job
from napari_binn.results import load_results


def _items(tmp_path, field, config, names=("a", "missing", "b")):
    data = {"a": field, "b": field, "missing": str(tmp_path / "no-such-stack.tif")}
    return [BatchItem(n, data[n], config, tmp_path / "out" / n, metadata={"which": n}) for n in names]


def test_a_failing_item_is_reported_and_the_others_are_written(tmp_path, fkpp_field, pipeline_config):
    cfg = pipeline_config()
    cfg.refit.candidates = 1
    events = []
    outcomes = run_job(run_batch(_items(tmp_path, fkpp_field, cfg)), events.append)
    assert [o.status for o in outcomes] == ["done", "failed", "done"]
    assert outcomes[1].name == "missing" and "no-such-stack" in outcomes[1].message
    for o in (outcomes[0], outcomes[2]):
        result = load_results(o.out)
        assert result.metadata["which"] == o.name and result.equations is not None
        assert o.D and o.G and o.nt_model and o.seconds > 0
    assert not (tmp_path / "out" / "missing").exists()
    rows = [e for e in events if e.stage == "batch"]
    assert [(e.data["item"], e.data["outcome"].status) for e in rows] == [
        (0, "running"), (0, "done"), (1, "running"), (1, "failed"), (2, "running"), (2, "done")]
    fractions = [e.data["batch_fraction"] for e in events if "batch_fraction" in e.data]
    assert all(0 <= f <= 1 for f in fractions) and fractions[0] < 0.1 and fractions[-1] > 0.9


def test_cancel_keeps_written_bundles_and_writes_nothing_else(tmp_path, fkpp_field, pipeline_config):
    items = _items(tmp_path, fkpp_field, pipeline_config(), names=("a", "b"))
    token = CancelToken()

    def cancel_in_second_item(ev):
        if ev.data.get("item") == 1 and ev.data.get("pipeline_stage") == "binn":
            token.cancel()

    outcomes = run_job(run_batch(items, cancel=token), cancel_in_second_item)
    assert [o.status for o in outcomes] == ["done", "stopped"]
    assert "BINN training" in outcomes[1].message
    assert load_results(outcomes[0].out).fit is not None and not outcomes[1].out.exists()
    token = CancelToken()
    token.cancel()
    assert [o.status for o in run_job(run_batch(items, cancel=token))] == ["not run", "not run"]


def test_items_and_outcomes_are_plain_and_outputs_are_checked(tmp_path, fkpp_field, pipeline_config):
    item = BatchItem("x", str(tmp_path / "stack.tif"), pipeline_config(), tmp_path / "x", roi=np.ones((4, 4), bool),
                     read={"pixel_size_um": 2.0})
    again = pickle.loads(pickle.dumps(item))
    assert again.name == "x" and again.read == {"pixel_size_um": 2.0}
    outcome = run_item(again)  # what a worker process would run
    assert isinstance(outcome, ItemOutcome) and outcome.status == "failed"
    assert pickle.loads(pickle.dumps(outcome)).message == outcome.message
    (tmp_path / "x").mkdir()
    check_outputs([item])  # empty: used
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        check_outputs([item])
    item.overwrite = True
    check_outputs([item])
