"""The command line on small files: help, each bad-input path, ROI files and a stage run."""

import csv
import json

import numpy as np
import pytest

from napari_binn.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main


def test_help_explains_units(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "µm²/h" in out and "hours" in out
    for cmd in ("demo", "extract", "fit", "discover", "simulate", "report", "batch"):
        assert cmd in out


def test_missing_pixel_size_asks_for_it(tmp_path, capsys):
    import tifffile

    path = tmp_path / "s.tif"
    tifffile.imwrite(path, np.zeros((6, 64, 64), np.uint16))
    code = main(["extract", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == EXIT_USAGE
    assert "--pixel-size-um" in capsys.readouterr().err


def test_extract_writes_a_bundle_and_refuses_to_overwrite(tmp_path, capsys):
    from napari_binn.io import write_stack_tiff
    from napari_binn.synthetic.models import make_synthetic
    from napari_binn.synthetic.render import render_microscopy

    fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(6, 6),
                            dx_um=50.0, times_h=np.linspace(0, 12, 3), seed=0)
    rendered = render_microscopy(fld, pixel_size_um=2.5, seed=0)
    path = write_stack_tiff(tmp_path / "nuclei.tif", rendered.stack.data, 2.5, rendered.stack.times_h)
    roi = tmp_path / "roi.json"
    roi.write_text(json.dumps([[[0, 0], [0, 119], [119, 119], [119, 0]]]))
    out = tmp_path / "bundle"
    assert main(["extract", str(path), "--roi", str(roi), "--out", str(out), "--quiet"]) == EXIT_OK
    assert (out / "field.npz").is_file() and (out / "density.tif").is_file()
    assert main(["extract", str(path), "--out", str(out), "--quiet"]) == EXIT_USAGE
    assert "exists" in capsys.readouterr().err
    assert main(["report", str(out), "--quiet"]) == EXIT_OK


def test_extract_says_how_it_counted_and_its_warnings(tmp_path, capsys):
    """Nuclei larger than the default diameter range: extract names the scale and prints the warning."""
    from napari_binn.io import write_stack_tiff
    from napari_binn.synthetic.models import make_synthetic
    from napari_binn.synthetic.render import render_microscopy

    fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 600.0}, domain="scratch", grid=(8, 8),
                            dx_um=50.0, times_h=np.linspace(0, 12, 3), seed=0)
    rendered = render_microscopy(fld, pixel_size_um=1.0, seed=0, nucleus_diameter_um=22.0)
    path = write_stack_tiff(tmp_path / "big.tif", rendered.stack.data, 1.0, rendered.stack.times_h)
    assert main(["extract", str(path), "--out", str(tmp_path / "bundle")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "nuclei found at the scale of 16 µm nuclei, threshold" in out
    assert "note: nuclei were counted at the largest diameter of the range 6-16 µm" in out
    assert "stack: Stack('big', 3 frames of 400x400, 1 µm/px, t 0-12 h)" in out  # and where the calibration came from
    assert "  pixel size: from ImageJ metadata (XResolution 1 px per" in out
    assert "  frame times: from ImageJ Info (frame times written by napari-binn)" in out


def test_fit_from_a_stack_says_what_it_read_counted_and_learned(tmp_path, pipeline_config, capsys):
    """fit on images runs the density stage too: it prints the stack and its calibration's source, the field and
    how the cells were counted, then the BINN (calibration given on the command line here)."""
    import tifffile

    from napari_binn.synthetic.models import make_synthetic
    from napari_binn.synthetic.render import render_microscopy

    fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(6, 6),
                            dx_um=50.0, times_h=np.linspace(0, 12, 3), seed=0)
    rendered = render_microscopy(fld, pixel_size_um=2.5, seed=0)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rendered.stack.data, photometric="minisblack")  # no calibration in the file
    cfg = pipeline_config()
    cfg.refine.enabled = False
    cfg.to_toml(tmp_path / "tiny.toml")
    code = main(["fit", str(path), "--pixel-size-um", "2.5", "--frame-interval-h", "6", "--config",
                 str(tmp_path / "tiny.toml"), "--steps", "60", "--out", str(tmp_path / "fit")])
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "stack: Stack('plain', 3 frames of 120x120, 2.5 µm/px, t 0-12 h)" in out
    assert "  pixel size: given\n" in out and "  frame times: given (frame interval)\n" in out
    assert "DensityField(" in out and "nuclei found at the scale of" in out
    assert "BinnFit(" in out


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[binn]\nstepz = 3\n")
    code = main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == EXIT_USAGE
    assert "stepz" in capsys.readouterr().err


def test_demo_compares_density_on_coarser_grids():
    """The demo's accuracy line sums the drawn cells over the extraction grid's boxes (100 µm = 2 x 2 sample
    boxes), and gives up (None) on grids that are not whole blocks of them."""
    from types import SimpleNamespace

    from napari_binn.cli import _drawn_density
    from napari_binn.field import DensityField

    counts = np.arange(2 * 4 * 6).reshape(2, 4, 6)
    rendered = SimpleNamespace(counts=counts, box_area_mm2=0.05 ** 2, mask=np.ones((4, 6), bool))

    def fld(box, shape):
        ny, nx = shape
        return DensityField(np.zeros((2, ny, nx)), np.ones((ny, nx), bool), np.arange(nx) * box,
                            np.arange(ny) * box, np.array([0.0, 1.0]), "cells/mm²")

    same = _drawn_density(rendered, fld(50.0, (4, 6)))
    assert np.allclose(same, counts / 0.0025)
    coarse = _drawn_density(rendered, fld(100.0, (2, 3)))
    assert coarse.shape == (2, 2, 3)
    assert coarse[1, 1, 2] == pytest.approx(counts[1, 2:4, 4:6].sum() / 0.01)
    assert _drawn_density(rendered, fld(75.0, (2, 4))) is None


def test_existing_output_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    code = main(["demo", "--out", str(out), "--quiet"])
    assert code == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err


def test_qc_printout_names_failed_simulations(capsys):
    """A closed form that cannot be simulated (e.g. D infinite at u = 0) leaves its QC row out: say why."""
    from types import SimpleNamespace

    from napari_binn.cli import _print_qc

    result = SimpleNamespace(qc=None, metadata={"warnings": ["simulation 'closed form' failed: D(u) is not finite"]})
    _print_qc(SimpleNamespace(quiet=False), result)
    assert "note: simulation 'closed form' failed" in capsys.readouterr().out


def test_fit_steps_keep_the_warmup_share_so_the_pde_term_trains(tmp_path, fkpp_field):
    """--steps 2000 with the default 16000-step warm-up of 18000 steps: the warm-up keeps its share (1778 steps),
    so the PDE term trains for the rest (it used to be clipped to 1999 data-only steps)."""
    from napari_binn.pipeline import PipelineConfig, PipelineResult
    from napari_binn.results import load_results, save_results

    cfg = PipelineConfig()
    cfg.binn = cfg.binn.replace(hidden=(8, 8), rate_hidden=(4,), n_collocation=64, batch_size=64, device="cpu",
                                weak_weight=0.0)
    cfg.refine.enabled = False  # the refinement has its own tests (tests/binn/test_refine.py)
    assert (cfg.binn.steps, cfg.binn.warmup_steps) == (18000, 16000)
    cfg.to_toml(tmp_path / "tiny.toml")
    save_results(PipelineResult(cfg, field=fkpp_field), tmp_path / "density", figures=False)
    out = tmp_path / "fit"
    code = main(["fit", str(tmp_path / "density"), "--config", str(tmp_path / "tiny.toml"), "--steps", "2000",
                 "--out", str(out), "--quiet"])
    assert code == EXIT_OK
    fit = load_results(out).fit
    assert (fit.config.steps, fit.config.warmup_steps) == (2000, 1778)
    pde_steps = [rec["step"] for rec in fit.history[0] if "pde" in rec]
    assert pde_steps and min(pde_steps) <= 1800 and len(pde_steps) >= 4


def test_batch_writes_each_input_and_reports_the_failing_one(tmp_path, fkpp_field, pipeline_config, capsys):
    from napari_binn.pipeline import PipelineResult
    from napari_binn.results import load_results, save_results

    cfg = pipeline_config()
    cfg.refit.candidates = 1
    cfg.to_toml(tmp_path / "tiny.toml")
    save_results(PipelineResult(cfg, field=fkpp_field), tmp_path / "one", figures=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{}")
    out = tmp_path / "out"
    code = main(["batch", str(tmp_path / "one"), str(tmp_path / "broken"), "--config", str(tmp_path / "tiny.toml"),
                 "--out", str(out), "--workers", "1", "--quiet"])
    assert code == EXIT_ERROR
    assert "broken" in capsys.readouterr().err
    assert load_results(out / "one").equations is not None and not (out / "broken").exists()
    with open(out / "summary.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["status"]) for r in rows] == [("one", "done"), ("broken", "failed")]
    assert rows[0]["D"] and rows[0]["D_0"] and rows[0]["nt_error_pct"] and rows[1]["error"]
    # a density field as input: its frame interval (24 h in 4 intervals), no pixel size or calibration source
    assert (rows[0]["frame_interval_h"], rows[0]["pixel_size_um"], rows[0]["calibration"]) == ("6", "", "")

    # the folder holds files now: refused without --overwrite or --resume, naming both
    again = ["batch", str(tmp_path / "one"), str(tmp_path / "broken"), "--config", str(tmp_path / "tiny.toml"),
             "--out", str(out), "--workers", "1", "--quiet"]
    capsys.readouterr()
    assert main(again) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "--resume" in err
    # --resume keeps the complete bundle (not rewritten) and runs the failing input again
    stamp = (out / "one" / "manifest.json").stat().st_mtime_ns
    assert main(again + ["--resume"]) == EXIT_ERROR
    assert (out / "one" / "manifest.json").stat().st_mtime_ns == stamp
    with open(out / "summary.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["status"]) for r in rows] == [("one", "done"), ("broken", "failed")] and rows[0]["D"]

    # the batch report: the table on stdout, summary.html with a link to each bundle's report
    capsys.readouterr()
    assert main(["report", str(out)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "one" in text and "failed" in text and "summary.html" in text
    assert 'href="one/report.html"' in (out / "summary.html").read_text(encoding="utf-8")


def test_batch_refuses_duplicate_names_and_unreachable_schedulers(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code = main(["batch", str(tmp_path / "a" / "s1.tif"), str(tmp_path / "b" / "s1.tif"), "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "same name" in err and "s1" in err and str(tmp_path / "b" / "s1.tif") in err
    assert main(["batch", str(tmp_path / "x.tif"), "--out", str(tmp_path / "out"), "--scheduler", "localhost",
                 "--quiet"]) == EXIT_USAGE
    assert "tcp://host:port" in capsys.readouterr().err


def test_batch_each_shape_is_one_item_per_input_and_shape(tmp_path):
    from napari_binn.cli import batch_items, build_parser

    (tmp_path / "rois.json").write_text(json.dumps([[[0, 0], [0, 9], [9, 9]], [[10, 10], [10, 19], [19, 19]]]))
    args = build_parser().parse_args(["batch", "B03.tif", "C04.tif", "--roi", str(tmp_path / "rois.json"),
                                      "--each-shape", "--out", str(tmp_path / "out")])
    from napari_binn.roi import read_roi

    items = batch_items(args, None, read_roi(args.roi))
    assert [it.name for it in items] == ["B03_roi1", "B03_roi2", "C04_roi1", "C04_roi2"]
    assert [it.data for it in items] == ["B03.tif", "B03.tif", "C04.tif", "C04.tif"]
    assert len(items[1].roi) == 1 and items[1].roi[0][0].tolist() == [10.0, 10.0]
    assert items[3].out == tmp_path / "out" / "C04_roi2" and items[3].metadata["roi_shape"]["number"] == 2
    with pytest.raises(ValueError, match="--each-shape needs --roi with shapes"):
        batch_items(args, None, None)


def test_demo_comparison_reports_the_binns_own_curves(pipeline_run):
    """The demo prints how far the BINN's own D(u), G(u) are from the truth, before any closed form."""
    import re
    from types import SimpleNamespace

    from napari_binn.cli import demo_comparison

    result, _ = pipeline_run
    truth = SimpleNamespace(params={"D": 800.0, "r": 0.08, "K": 2000.0})
    lines = demo_comparison(result, truth)
    own = re.search(r"BINN's own curves .*D\(u\) rel\. L2 error ([\d.]+)%, G\(u\) ([\d.]+)%", lines[0])
    assert own, lines
    u = result.fit.u_grid(200)
    expected = 100 * np.linalg.norm(result.fit.D(u) - 800.0) / np.linalg.norm(np.full_like(u, 800.0))
    assert float(own.group(1)) == pytest.approx(expected, abs=0.06)
    # a truth far from the fit reads as a large error
    far = demo_comparison(result, SimpleNamespace(params={"D": 8.0, "r": 0.08, "K": 2000.0}))
    assert float(re.search(r"D\(u\) rel\. L2 error ([\d.]+)%", far[0]).group(1)) > 1000
