"""The batch engine (GUI-free): per-item isolation, bundles written as items finish, cancel, plain items."""

import pickle

import numpy as np
import pytest

from napari_binn.batch import BatchItem, ItemOutcome, check_outputs, run_batch, run_item
from napari_binn.errors import BackendUnavailableError, InputError, OutputError
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
    with pytest.raises(OutputError, match="nothing was overwritten"):
        check_outputs([item])
    item.overwrite = True
    check_outputs([item])


def test_names_folders_and_the_plate_summary(tmp_path):
    import csv
    import json

    from napari_binn.batch import bundle_complete, check_batch_folder, item_names
    from napari_binn.batch.summary import well_of, write_summary, write_summary_html

    assert item_names(["x/A01.tif", "y/A02.tif", "z/stack/"]) == ["A01", "A02", "stack"]
    with pytest.raises(InputError, match="same name.*A01.*x/A01.tif, y/A01.tif"):
        item_names(["x/A01.tif", "y/A01.tif"])
    assert [well_of(n) for n in ("plate1_B03_roi1", "B3", "C12-left", "shape_1", "Exp1a", "Q01", "A25", "xB03")] \
        == ["B03", "B03", "C12", "", "", "", "", ""]

    folder = tmp_path / "run"
    items = [BatchItem(n, None, None, folder / n) for n in ("B03", "C04")]
    assert check_batch_folder(folder, items) == [False, False]  # no folder yet
    (folder / "B03").mkdir(parents=True)
    (folder / "B03" / "manifest.json").write_text(json.dumps({"files": {"field.npz": ""}, "cancelled_in": None}))
    (folder / "B03" / "field.npz").write_text("")
    (folder / "C04").mkdir()
    (folder / "C04" / "manifest.json").write_text(json.dumps({"files": {}, "cancelled_in": "binn"}))
    (folder / ".C04.partial-abc").mkdir()
    assert bundle_complete(folder / "B03") and not bundle_complete(folder / "C04")
    with pytest.raises(OutputError, match="already holds files.*--overwrite.*--resume"):
        check_batch_folder(folder, items)
    assert check_batch_folder(folder, items, resume=True) == [True, False]
    assert items[1].overwrite and not items[0].overwrite  # the cancelled bundle is written again
    assert not (folder / ".C04.partial-abc").exists()
    (folder / "C04" / "manifest.json").unlink()
    (folder / "C04" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a results bundle"):
        check_batch_folder(folder, items, resume=True)

    outcomes = [
        ItemOutcome("plate1_B03_roi1", folder / "B03", status="done", D="420", G="0.08 - 4e-5*u", refitted=True,
                    nt_error=2.5, nt_model="closed form (refitted)", seconds=3.0,
                    constants={"D_0": [420.0, 400.0, 440.0, "µm²/h"], "G_0": [0.08, 0.07, 0.09, "1/h"]}),
        ItemOutcome("plate1_B03_roi2", folder / "B03b", status="done", D="380", G="0.07", nt_error=3.5,
                    constants={"D_0": [380.0, None, None, ""]}),
        ItemOutcome("plate1_C04", folder / "C04", status="failed", message="no pixel size"),
    ]
    files = write_summary(folder, outcomes)
    assert [f.name for f in files] == ["summary.csv", "plate.png"] and (folder / "plate.png").stat().st_size > 1000
    with open(folder / "summary.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["well"], r["status"]) for r in rows] == [
        ("plate1_B03_roi1", "B03", "done"), ("plate1_B03_roi2", "B03", "done"), ("plate1_C04", "C04", "failed")]
    assert (rows[0]["D_0"], rows[0]["D_0_ci95_lo"], rows[0]["D_0_ci95_hi"], rows[0]["D_0_units"]) == \
        ("420", "400", "440", "µm²/h")
    assert rows[1]["D_0_ci95_lo"] == "" and rows[1]["G_0"] == "" and rows[2]["error"] == "no pixel size"
    assert rows[0]["constants_from"] == "refit to the data" and rows[1]["constants_from"] == "symbolic regression"
    page = write_summary_html(folder).read_text(encoding="utf-8")
    assert "plate.png" in page and "no pixel size" in page and "2 of 3 items written" in page


def test_an_items_row_says_the_calibration_its_stack_was_read_with(tmp_path):
    """summary.csv's pixel_size_um, frame_interval_h and calibration come from the stack the item's density was
    extracted from (a plate whose files carry other calibrations shows it in these columns)."""
    from napari_binn.batch.items import _describe
    from napari_binn.batch.summary import summary_rows
    from napari_binn.density import extract_density
    from napari_binn.io import read_stack, write_stack_tiff
    from napari_binn.pipeline import PipelineConfig, PipelineResult

    frames = np.zeros((3, 60, 60), np.uint16)
    frames[:, 20:24, 20:24] = 500
    path = write_stack_tiff(tmp_path / "B03.tif", frames, 2.0, np.array([0.0, 0.5, 1.0]))
    fld = extract_density(read_stack(path), method="nuclei", box_um=40.0)
    outcome = ItemOutcome("B03", tmp_path / "B03", status="done")
    _describe(outcome, PipelineResult(PipelineConfig(), field=fld))
    assert (outcome.pixel_size_um, outcome.frame_interval_h) == (2.0, 0.5)
    assert outcome.calibration == ("pixel size: from ImageJ metadata (XResolution 0.5 px per um); "
                                   "frame times: from ImageJ Info (frame times written by napari-binn)")
    columns, rows = summary_rows([outcome])
    assert columns[-3:] == ["pixel_size_um", "frame_interval_h", "calibration"]
    assert (rows[0]["pixel_size_um"], rows[0]["frame_interval_h"]) == ("2", "0.5")


def test_without_dask_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    from napari_binn.cli import EXIT_USAGE, main

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask.distributed were not installed
    items = [BatchItem("a", None, None, tmp_path / "a")]
    with pytest.raises(BackendUnavailableError, match=r"napari-binn\[distributed\]"):
        run_job(run_batch(items, cluster="local"))
    assert main(["batch", str(tmp_path / "x.tif"), "--out", str(tmp_path / "out"), "--workers", "2"]) == EXIT_USAGE
    assert "napari-binn[distributed]" in capsys.readouterr().err
