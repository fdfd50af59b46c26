"""Bad and edge inputs get the project's own errors, with messages that name the problem; the command line turns
them into one line and exit code 2 (never a traceback), and writes nothing; every command works on every bundle
the product writes; two runs cannot both write one output folder; Ctrl-C leaves no bundle or a partial one."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_binn.cli import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from napari_binn.errors import BundleError, ConfigError, InputError, NapariBinnError, OutputError
from napari_binn.results import claim_output, load_results, save_results

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bundle(pipeline_run, tmp_path_factory):
    """A bundle of every stage (the shared tiny run), without figures: copied and damaged by the bundle cases."""
    return save_results(pipeline_run[0], tmp_path_factory.mktemp("bundle") / "run", figures=False)


@pytest.fixture(scope="module")
def tiny_toml(pipeline_run, tmp_path_factory):
    """The tiny configuration of the shared run (conftest), as a TOML file."""
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    pipeline_run[0].config.to_toml(path)
    return path


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    """A calibrated nuclei stack of 3 frames, 120 x 120 pixels of 2.5 µm."""
    from napari_binn.io import write_stack_tiff
    from napari_binn.synthetic.models import make_synthetic
    from napari_binn.synthetic.render import render_microscopy

    fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(6, 6),
                            dx_um=50.0, times_h=np.linspace(0, 12, 3), seed=0)
    rendered = render_microscopy(fld, pixel_size_um=2.5, seed=0)
    return write_stack_tiff(tmp_path_factory.mktemp("stack") / "nuclei.tif", rendered.stack.data, 2.5,
                            rendered.stack.times_h)


def _run_cli(capsys, argv):
    """(exit code, stderr) of ``napari-binn argv``."""
    code = main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- bundles
def _json_edit(name, fn):
    def edit(d: Path) -> None:
        p = d / name
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return edit


def _write(name, content):
    def edit(d: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def _remove(name):
    def edit(d: Path) -> None:
        p = d / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return edit


def _selected_text(text):
    def fn(d):
        rows = d["D"]["front"] + d["D"].get("library", [])  # the selected row counts over front, then library
        rows[d["D"]["selected"]]["expression"]["text"] = text
        return d
    return fn


def _torch_save(d: Path) -> None:
    import torch

    torch.save({"m0.w": torch.zeros(3)}, d / "binn" / "binn_weights.safetensors")


BUNDLE_CASES = {
    # name: (edit, words the message must contain)
    "manifest is a list": (_write("manifest.json", "[1, 2]"), ["manifest.json", "list"]),
    "manifest not JSON": (_write("manifest.json", "{"), ["manifest.json", "not valid JSON"]),
    "manifest missing": (_remove("manifest.json"), ["manifest.json"]),
    "manifest without format": (_json_edit("manifest.json", lambda m: {k: v for k, v in m.items() if k != "format"}),
                                ["manifest.json", "format"]),
    "newer schema": (_json_edit("manifest.json", lambda m: {**m, "schema_version": 99}), ["schema_version", "upgrade"]),
    "schema version as text": (_json_edit("manifest.json", lambda m: {**m, "schema_version": "2"}),
                               ["manifest.json", "schema_version"]),
    "equation is a number": (_json_edit("equations.json", lambda d: {**d, "D": 3}), ["equations.json", "D", "int"]),
    "equations are a list": (_write("equations.json", "[1]"), ["equations.json", "list"]),
    "equation text is a number": (_json_edit("equations.json", _selected_text(3)), ["equations.json", "text"]),
    "equation text is a list": (_json_edit("equations.json", _selected_text([1])), ["equations.json", "text"]),
    "equation not finite": (_json_edit("equations.json", _selected_text("inf")), ["equations.json", "inf"]),
    "equation NaN": (_json_edit("equations.json", _selected_text("nan*u")), ["equations.json", "nan"]),
    "huge exponent": (_json_edit("equations.json", _selected_text("u**99999999")), ["equations.json", "exponent"]),
    "tower of powers": (_json_edit("equations.json", _selected_text("9**9**9**9")), ["equations.json", "exponent"]),
    "huge number": (_json_edit("equations.json", _selected_text("1e999*u")), ["equations.json", "too large"]),
    "attribute access": (_json_edit("equations.json", _selected_text("u.__class__")), ["equations.json", "'.'"]),
    "import call": (_json_edit("equations.json", _selected_text("__import__('os').system('touch x')")),
                    ["equations.json", "not allowed"]),
    "lambda": (_json_edit("equations.json", _selected_text("(lambda: 1)()")), ["equations.json", "lambda"]),
    "eval": (_json_edit("equations.json", _selected_text("eval('1')")), ["equations.json", "eval"]),
    "dunder name": (_json_edit("equations.json", _selected_text("__builtins__")), ["__builtins__"]),
    "front missing": (_json_edit("equations.json", lambda d: {**d, "D": {k: v for k, v in d["D"].items()
                                                                          if k != "front"}}),
                      ["equations.json", "front"]),
    "selected row outside the front": (_json_edit("equations.json", lambda d: {**d, "D": {**d["D"], "selected": 99}}),
                                       ["equations.json", "selected"]),
    "binn.json without n_models": (_json_edit("binn/binn_fit.json",
                                              lambda d: {k: v for k, v in d.items() if k != "n_models"}),
                                   ["binn_fit.json", "n_models"]),
    "n_models mismatching the weights": (_json_edit("binn/binn_fit.json", lambda d: {**d, "n_models": 3}),
                                         ["binn_fit.json", "n_models"]),
    "binn.json is a list": (_write("binn/binn_fit.json", "[]"), ["binn_fit.json"]),
    "binn config with a wrong type": (_json_edit("binn/binn_fit.json",
                                                 lambda d: {**d, "config": {**d["config"], "hidden": "x"}}),
                                      ["binn_fit.json", "hidden"]),
    "weights are a pickle": (_write("binn/binn_weights.safetensors", pickle.dumps({"a": 1})),
                             ["not a safetensors file", "pickle"]),
    "weights are a torch.save file": (_torch_save, ["not a safetensors file", "torch.save"]),
    "weights missing": (_remove("binn/binn_weights.safetensors"), ["binn_weights.safetensors", "missing"]),
    "binn.json missing": (_remove("binn/binn_fit.json"), ["binn_fit.json", "missing"]),
    "metrics is a list": (_write("metrics.json", "[]"), ["metrics.json", "list"]),
    "metrics qc is a number": (_json_edit("metrics.json", lambda d: {**d, "qc": 3}), ["metrics.json", "qc"]),
    "metrics not JSON": (_write("metrics.json", "{{"), ["metrics.json", "not valid JSON"]),
    "metadata is a list": (_write("metadata.json", "[]"), ["metadata.json"]),
    "field file missing": (_remove("field.npz"), ["field.npz", "missing"]),
    "field file corrupt": (_write("field.npz", b"PK\x03\x04garbage"), ["field.npz"]),
    "field file with pickled objects": (lambda d: np.savez(d / "field.npz", u=np.array([object()], dtype=object)),
                                        ["field.npz", "pickle"]),
    "field.json is a list": (_write("field.json", "[]"), ["field.json"]),
    "simulation names missing": (_remove("simulations.json"), ["simulations.json"]),
    "mechanistic is a list": (_write("mechanistic.json", "[]"), ["mechanistic.json"]),
    "mechanistic fit is a number": (_json_edit("mechanistic.json", lambda d: {k: 3 for k in d}),
                                    ["mechanistic.json", "fit"]),
    "mechanistic expression runs code": (_json_edit("mechanistic.json", lambda d: {
        k: {**v, "expressions": {"D": "__import__('os')", "G": "r"}} for k, v in d.items()}),
        ["mechanistic.json", "not allowed"]),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_damaged_bundle_is_a_bundle_error_naming_file_and_key(bundle, tmp_path, case):
    edit, words = BUNDLE_CASES[case]
    damaged = tmp_path / "b"
    shutil.copytree(bundle, damaged)
    edit(damaged)
    with pytest.raises(BundleError) as info:
        load_results(damaged)
    for word in words:
        assert word in str(info.value), (case, str(info.value))
    assert not Path("x").exists()


# ------------------------------------------------------------------------------------------------- configs
CONFIG_CASES = {
    "unknown key": ("[binn]\nstepz = 3\n", ["stepz", "valid keys"]),
    "unknown section": ("[nonsense]\na = 1\n", ["nonsense", "valid keys"]),
    "steps as text": ("[binn]\nsteps = 'abc'\n", ["binn.steps", "whole number"]),
    "box size as text": ("[density]\nbox_um = '50'\n", ["density.box_um", "number"]),
    "nested table for a value": ("[binn]\nsteps = {a = 1}\n", ["binn.steps", "table"]),
    "nested table for a text": ("[simulation]\nmethod = {x = 1}\n", ["simulation.method", "table"]),
    "section as a value": ("density = 3\n", ["density", "table"]),
    "negative box": ("[density]\nbox_um = -5\n", ["density.box_um", "> 0"]),
    "zero box": ("[density]\nbox_um = 0\n", ["density.box_um", "> 0"]),
    "NaN box": ("[density]\nbox_um = nan\n", ["density.box_um", "finite"]),
    "NaN rate": ("[binn]\nlr = nan\n", ["binn.lr", "finite"]),
    "zero steps": ("[binn]\nsteps = 0\n", ["steps", ">= 1"]),
    "unknown backend": ("[symbolic]\nbackend = 'foo'\n", ["symbolic.backend", "operon"]),
    "unknown method": ("[density]\nmethod = 'x'\n", ["density.method", "nuclei"]),
    "zero max_evals": ("[refit]\nmax_evals = 0\n", ["refit.max_evals", ">= 1"]),
    "fractional n_models": ("[binn]\nn_models = 1.5\n", ["binn.n_models", "whole number"]),
    "text in a list of widths": ("[binn]\nhidden = [16, 'a']\n", ["binn.hidden", "whole numbers"]),
    "quantiles reversed": ("[symbolic]\nquantiles = [0.9, 0.1]\n", ["symbolic.quantiles", "low < high"]),
    "unparsable TOML": ("[[[\n", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_a_config_error_naming_the_key(tmp_path, case):
    from napari_binn.pipeline import PipelineConfig

    text, words = CONFIG_CASES[case]
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_toml(path)
    for word in [*words, "c.toml"]:
        assert word in str(info.value), (case, str(info.value))


# ------------------------------------------------------------------------------------------------- stacks
def _stack_cases(d: Path, rng) -> dict:
    good = (rng.random((4, 60, 60)) * 1000).astype(np.uint16)

    def cal(name, arr):
        from napari_binn.io import write_stack_tiff

        return write_stack_tiff(d / name, arr, 2.5, np.arange(arr.shape[0]) * 1.0)

    def raw(name, arr, **kw):
        tifffile.imwrite(d / name, arr, **kw)
        return d / name

    (d / "mixed").mkdir()
    tifffile.imwrite(d / "mixed" / "a.tif", good[0])
    tifffile.imwrite(d / "mixed" / "b.tif", good[0, :50])
    (d / "empty.tif").write_bytes(b"")
    (d / "corrupt.tif").write_bytes(b"II*\x00garbage" * 10)
    (d / "folder").mkdir()
    return {
        "empty file": (d / "empty.tif", {}, ["empty.tif", "TIFF"]),
        "corrupt file": (d / "corrupt.tif", {}, ["corrupt.tif", "corrupt"]),
        "2D image": (raw("2d.tif", good[0]), {}, ["2d.tif", "time"]),
        "one frame": (cal("one.tif", good[:1]), {}, ["one.tif", "time"]),
        "5D": (raw("5d.tif", np.zeros((2, 2, 2, 30, 30), np.uint16)), {}, ["5d.tif", "axis"]),
        "RGB with a channel it lacks": (raw("rgb.tif", (rng.random((3, 40, 40, 3)) * 255).astype(np.uint8),
                                            photometric="rgb"),
                                        {"pixel_size_um": 1.0, "frame_interval_h": 1.0, "channel": 5}, ["channel"]),
        "all zero": (cal("zero.tif", np.zeros((4, 60, 60), np.uint16)), {}, ["blank"]),
        "all NaN": (cal("nan.tif", np.full((4, 60, 60), np.nan, np.float32)), {}, ["blank"]),
        "mixed frame sizes": (d / "mixed", {}, ["b.tif", "same size"]),
        "no calibration": (raw("nocal.tif", good, photometric="minisblack"), {}, ["pixel size"]),
        "zero pixel size": (raw("nocal0.tif", good, photometric="minisblack"),
                            {"pixel_size_um": 0.0, "frame_interval_h": 1.0}, ["pixel_size_um", "positive"]),
        "negative pixel size": (raw("nocal1.tif", good, photometric="minisblack"),
                                {"pixel_size_um": -1.0, "frame_interval_h": 1.0}, ["pixel_size_um", "positive"]),
        "negative frame interval": (raw("nocal2.tif", good, photometric="minisblack"),
                                    {"pixel_size_um": 1.0, "frame_interval_h": -1.0}, ["frame_interval_h"]),
        "missing file": (d / "nothere.tif", {}, ["nothere.tif"]),
        "empty folder": (d / "folder", {}, ["folder", "no image frames"]),
    }


def test_bad_stacks_are_input_errors(tmp_path):
    """Each bad stack, read and extracted as the command line does, raises InputError (or FileNotFoundError for a
    missing file) whose message names the file or the problem."""
    from napari_binn.batch import load_input
    from napari_binn.density import extract_density

    cases = _stack_cases(tmp_path, np.random.default_rng(0))
    for case, (path, options, words) in cases.items():
        opts = {"pixel_size_um": None, "frame_interval_h": None, "channel": None, **options}
        with pytest.raises((InputError, FileNotFoundError)) as info:
            extract_density(load_input(str(path), **opts), box_um=50.0)
        for word in words:
            assert word in str(info.value), (case, str(info.value))
    assert len(cases) >= 15


# ------------------------------------------------------------------------------------------------- ROIs
ROI_CASES = {
    "empty list": ("e.json", "[]", ["empty"]),
    "not JSON": ("b.json", "{", ["b.json", "not valid JSON"]),
    "wrong key": ("k.json", json.dumps({"polygonz": [[0, 0], [0, 10], [10, 10]]}), ["k.json", "polygons"]),
    "outside the image": ("o.json", json.dumps([[[1000, 1000], [1000, 1100], [1100, 1100]]]), ["outside"]),
    "self-intersecting": ("s.json", json.dumps([[[0, 0], [50, 50], [0, 50], [50, 0]]]), ["crosses itself"]),
    "a point": ("p.json", json.dumps([[[5, 5]]]), ["N >= 3"]),
    "a line": ("l.json", json.dumps([[[5, 5], [40, 40]]]), ["N >= 3"]),
    "corrupt PNG mask": ("c.png", b"\x89PNG\r\n\x1a\ngarbage", ["c.png", "cannot be read"]),
    "empty mask": ("m.tif", None, ["empty"]),
    "unknown file type": ("r.xyz", "x", ["r.xyz", ".json"]),
    "CSV of lines": ("l.csv", "index,shape-type,vertex-index,axis-0,axis-1\n0,line,0,1,1\n0,line,1,9,9\n",
                     ["l.csv", "line"]),
}


@pytest.mark.parametrize("case", list(ROI_CASES))
def test_bad_roi_is_an_input_error(tmp_path, case):
    from napari_binn.roi import read_roi, roi_to_mask

    name, content, words = ROI_CASES[case]
    path = tmp_path / name
    if content is None:
        tifffile.imwrite(path, np.zeros((60, 60), np.uint8))
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as info:
        roi_to_mask(read_roi(path), (60, 60))
    for word in words:
        assert word in str(info.value), (case, str(info.value))


# ------------------------------------------------------------------------------------------------- the API
def test_api_refuses_bad_arrays_with_clear_errors(fkpp_field):
    from napari_binn import DensityField, Stack, fit_mechanistic, simulate

    f = fkpp_field
    with pytest.raises(InputError, match="mask is all False"):
        DensityField(f.u, np.zeros(f.mask.shape, bool), f.x_um, f.y_um, f.t_h)
    with pytest.raises(InputError, match="does not match the grid"):
        DensityField(f.u, np.ones((3, 3), bool), f.x_um, f.y_um, f.t_h)
    with pytest.raises(InputError, match="D must be finite and >= 0"):
        simulate(-5.0, 0.0, f)
    with pytest.raises(InputError, match="u0 has shape .* but mask has shape"):
        simulate(1.0, 0.0, f.u[0], mask=np.ones((3, 3), bool), dx_um=50.0, t_h=[0.0, 1.0])
    constant = DensityField(np.full_like(f.u, 1000.0), f.mask, f.x_um, f.y_um, f.t_h)
    with pytest.raises(InputError, match="constant data"):
        fit_mechanistic(constant, "fisher_kpp", max_evals=2, intervals=None)
    with pytest.raises(InputError, match="unknown mechanistic model 'nope'"):
        fit_mechanistic(f, "nope")
    with pytest.raises(InputError, match="pixel_size_um"):
        Stack(np.zeros((3, 8, 8)), -1.0, [0.0, 1.0, 2.0])
    with pytest.raises(InputError, match="empty"):
        Stack(np.zeros((0, 8, 8)), 1.0, [])


def test_the_error_types_are_value_errors_and_exported():
    import napari_binn

    for cls in (BundleError, ConfigError, InputError, OutputError):
        assert issubclass(cls, NapariBinnError) and issubclass(cls, ValueError)
        assert getattr(napari_binn, cls.__name__) is cls
    err = BundleError("is damaged", file="b/manifest.json", key="format")
    assert str(err) == "in b/manifest.json: format: is damaged"


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(bundle, stack_file, tmp_path, capsys):
    bad_bundle = tmp_path / "bad"
    shutil.copytree(bundle, bad_bundle)
    (bad_bundle / "binn" / "binn_weights.safetensors").write_bytes(pickle.dumps({"a": 1}))
    config = tmp_path / "c.toml"
    config.write_text("[binn]\nsteps = 'abc'\n")
    roi = tmp_path / "r.json"
    roi.write_text("{")
    blank = tmp_path / "blank.tif"
    from napari_binn.io import write_stack_tiff

    write_stack_tiff(blank, np.zeros((3, 40, 40), np.uint16), 2.5, [0.0, 1.0, 2.0])
    runs = [
        (["report", str(bad_bundle)], "not a safetensors file"),
        (["simulate", str(bad_bundle)], "not a safetensors file"),
        (["fit", str(stack_file), "--config", str(config)], "binn.steps"),
        (["extract", str(stack_file), "--roi", str(roi)], "r.json"),
        (["extract", str(blank)], "blank"),
        (["extract", str(tmp_path / "missing.tif")], "missing.tif"),
        (["discover", str(bundle), "--config", str(config)], "binn.steps"),
        (["report", str(tmp_path)], "manifest.json"),
    ]
    for n, (argv, words) in enumerate(runs):
        out = tmp_path / "out" / f"o{n}"
        if argv[0] != "report":
            argv = [*argv, "--out", str(out), "--quiet"]
        code, err = _run_cli(capsys, argv)
        assert code == EXIT_USAGE, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("napari-binn: ") and words in lines[0], (argv, err)
        assert "Traceback" not in err
        assert not out.exists() and not (tmp_path / "out").exists(), argv  # no partial bundle, no empty folder
    assert not list(tmp_path.glob(".*lock"))


def test_cli_debug_shows_the_traceback_and_bugs_ask_for_a_report(bundle, tmp_path, capsys, monkeypatch):
    damaged = tmp_path / "b"
    shutil.copytree(bundle, damaged)
    (damaged / "metrics.json").write_text("[]")
    code, err = _run_cli(capsys, ["--debug", "report", str(damaged)])
    assert code == EXIT_USAGE and "Traceback" in err and "metrics.json" in err.splitlines()[-1]
    code, err = _run_cli(capsys, ["report", str(damaged), "--debug"])
    assert code == EXIT_USAGE and "Traceback" in err

    import napari_binn.cli as cli

    def broken(args):
        raise RuntimeError("an internal mistake")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_report", broken)
    code, err = _run_cli(capsys, ["report", str(bundle)])
    assert code == EXIT_ERROR and "Traceback" in err and "an internal mistake" in err and "bug" in err
    monkeypatch.setattr(cli, "cmd_report", interrupted)
    code, err = _run_cli(capsys, ["report", str(bundle)])
    assert code == EXIT_CANCELLED and "aborted" in err and "Traceback" not in err


def test_pysr_without_julia_is_a_clear_error(monkeypatch):
    import builtins

    from napari_binn.errors import BackendUnavailableError
    from napari_binn.symbolic.backends import _pysr

    real_import = builtins.__import__

    def no_pysr(name, *args, **kwargs):
        if name == "pysr":
            raise ImportError("no Julia")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pysr)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'napari-binn\[pysr\]'") as info:
        _pysr(np.ones(3), np.ones(3), np.ones(3), seed=0, operators=["+", "*"], max_complexity=5, options={})
    assert isinstance(info.value, ImportError)


# ------------------------------------------------------------------------------------------------- every bundle
def test_every_command_works_on_every_bundle_the_product_writes(bundle, stack_file, tiny_toml, tmp_path, capsys):
    """Bundles written by the whole pipeline, by `extract`, by `fit` on an extract bundle and by the napari writer:
    report, simulate, discover and fit run on each (or refuse with one line when the bundle lacks what they
    need), and the napari reader opens each."""
    from napari_binn._napari._reader import napari_get_reader

    full = tmp_path / "full"
    assert main(["report", str(bundle), "--out", str(full), "--quiet"]) == EXIT_OK  # with figures
    extracted = tmp_path / "extracted"
    assert main(["extract", str(stack_file), "--config", str(tiny_toml), "--out", str(extracted), "--quiet"]) == EXIT_OK
    fitted = tmp_path / "fitted"
    assert main(["fit", str(extracted), "--config", str(tiny_toml), "--out", str(fitted), "--quiet"]) == EXIT_OK
    written = tmp_path / "napari"
    _napari_writer(load_results(fitted), written)
    capsys.readouterr()

    def run(*argv):
        code, err = _run_cli(capsys, [*argv, "--quiet"])
        assert "Traceback" not in err, (argv, err)
        return code, err

    for b in (full, fitted):
        assert run("simulate", str(b), "--out", str(tmp_path / f"sim_{b.name}"))[0] == EXIT_OK
        assert run("discover", str(b), "--config", str(tiny_toml), "--out", str(tmp_path / f"disc_{b.name}"))[0] \
            == EXIT_OK
    assert run("fit", str(full), "--config", str(tiny_toml), "--steps", "20", "--out", str(tmp_path / "refit"))[0] \
        == EXIT_OK
    for b in (full, extracted, fitted, written, tmp_path / "sim_fitted"):
        assert run("report", str(b))[0] == EXIT_OK
    code, err = run("discover", str(extracted), "--out", str(tmp_path / "nothing"))
    assert code == EXIT_USAGE and "BINN" in err and not (tmp_path / "nothing").exists()
    for b in (full, extracted, fitted, written, tmp_path / "sim_full", tmp_path / "disc_fitted"):
        reader = napari_get_reader(str(b))
        [(data, kwargs, kind)] = reader(str(b))
        assert kind == "image" and data.ndim == 3


def _napari_writer(result, target: Path) -> None:
    """What the napari writer does with the docks' shared result (File > Save Selected Layers)."""
    pytest.importorskip("napari")
    from napari_binn._napari._state import BinnState, register_state_id
    from napari_binn._napari._writer import write_bundle

    state = BinnState()
    state.update(**{k: getattr(result, k) for k in ("field", "fit", "equations")})
    layer = (result.field.u, {"metadata": {"napari_binn_state": register_state_id(state)}}, "image")
    assert write_bundle(str(target), [layer]) == [str(target)]


# ------------------------------------------------------------------------------------------------- output safety
def _hold_claim(out: str, ready, release) -> None:
    with claim_output(out):
        ready.set()
        release.wait(30)


def test_two_processes_cannot_claim_one_output(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    out = tmp_path / "out"
    holder = ctx.Process(target=_hold_claim, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(OutputError, match="another napari-binn run is writing"):
            with claim_output(out):
                pass
    finally:
        release.set()
        holder.join(30)
    with claim_output(out):  # released: free again
        pass
    assert not out.exists() and not list(tmp_path.glob(".*lock"))


def test_a_stale_claim_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.napari-binn-lock").write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    with claim_output(out):
        pass


def _cli(*argv) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-W", "ignore", "-m", "napari_binn.cli", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_cli_runs_on_one_out_and_ctrl_c_mid_training(bundle, tiny_toml, tmp_path):
    """Two `fit` runs on the same --out: one is refused (exit 2). Ctrl-C during training: exit 130 and a complete,
    loadable bundle marked partial."""
    out = tmp_path / "out"
    first = _cli("fit", str(bundle), "--config", str(tiny_toml), "--steps", "1000000", "--out", str(out))
    try:
        for line in first.stderr:  # progress lines: training has started, --out is claimed
            if line.startswith("binn"):
                break
        second = _cli("fit", str(bundle), "--config", str(tiny_toml), "--out", str(out), "--quiet")
        _, err = second.communicate(timeout=120)
        assert second.returncode == EXIT_USAGE and "another napari-binn run is writing" in err, err
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == EXIT_CANCELLED, err
    assert json.loads((out / "manifest.json").read_text())["partial"] is True
    result = load_results(out)
    assert result.fit is not None and result.metadata["bundle"]["partial"] is True
    assert not list(tmp_path.glob(".*")), "no temporary folder or lock is left"
