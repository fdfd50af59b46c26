"""Results bundles: what they hold, that a loaded bundle is the same result as the one saved (same types, same
files when saved again), safety against foreign or hostile bundles, and reading older schemas."""

import json
from pathlib import Path

import numpy as np
import pytest

from napari_binn.jobs import run_job
from napari_binn.pde.mechanistic import MechanisticFit
from napari_binn.pipeline import run_pipeline
from napari_binn.results import SCHEMA_VERSION, BundleError, load_results, save_results
from napari_binn.symbolic import Equations

DATA = Path(__file__).parent / "data"


@pytest.fixture
def result(pipeline_run):
    return pipeline_run[0]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_bundle_roundtrip_and_resume(result, tmp_path):
    out = save_results(result, tmp_path / "bundle")
    for name in ("manifest.json", "config.toml", "field.npz", "density.tif", "simulations.npz", "binn",
                 "equations.json", "equations.txt", "equations.tex", "metrics.json", "report.html",
                 "figures/rates.png", "figures/counts.png", "mechanistic.json"):
        assert (out / name).exists(), name
    # the plain-text equations: u's unit, and the refitted constants with their intervals and units
    text = (out / "equations.txt").read_text(encoding="utf-8")
    assert f"u: density in {result.field.units}" in text
    mech = result.mechanistic["closed form (refitted)"]
    for name, value in result.metadata["closed_form_refitted"].items():
        lo, hi = mech.ci95[name]
        assert f"{name} = {value:.4g}  [{lo:.4g}, {hi:.4g}]  {mech.units[name]}".rstrip() in text
    loaded = load_results(out)
    assert np.array_equal(loaded.field.u, result.field.u, equal_nan=True)
    assert loaded.config == result.config
    u = np.linspace(100, 1800, 7)
    assert np.allclose(loaded.fit.D(u), result.fit.D(u))
    assert loaded.equations.D.text == result.equations.D.text
    # the bundle stores the constants as printed (rounded to what the data support): equal to display precision
    assert np.allclose(loaded.equations.G(u), result.equations.G(u), rtol=1e-3, atol=1e-9)
    assert loaded.qc["fisher_kpp"].mean_rel_l2 == pytest.approx(result.qc["fisher_kpp"].mean_rel_l2)
    # resume: re-run only the symbolic stage on the saved BINN (no retraining)
    again = run_job(run_pipeline(loaded, loaded.config, stages=("symbolic",)))
    assert again.fit is loaded.fit
    assert again.equations is not None and hasattr(again.equations.D, "front")


def test_loaded_result_has_the_types_of_a_fresh_one(result, tmp_path):
    loaded = load_results(save_results(result, tmp_path / "b", figures=False))
    assert type(loaded.equations) is Equations
    for key in ("D", "G"):
        f, g = getattr(result.equations, key), getattr(loaded.equations, key)
        assert (g.selected_index, g.selection, g.backend, g.units, g.u_units) == \
            (f.selected_index, f.selection, f.backend, f.units, f.u_units)
        assert [r.expression.text for r in g.front] == [r.expression.text for r in f.front]
        assert [c.name for c in g.constants] == [c.name for c in f.constants]
    for name, fit in result.mechanistic.items():
        got = loaded.mechanistic[name]
        assert isinstance(got, MechanisticFit)
        assert got.params == fit.params
        np.testing.assert_array_equal(list(got.ci95.values()), list(fit.ci95.values()))
        assert (got.n_evals, got.expressions) == (fit.n_evals, fit.expressions)
        u = np.linspace(100.0, 1800.0, 5)
        assert np.array_equal(got.D(u), fit.D(u)) and np.array_equal(got.G(u), fit.G(u))
        np.testing.assert_array_equal(got.residuals, fit.residuals)
        assert got.summary() == fit.summary()


@pytest.mark.parametrize("source", ["fresh run", "schema-1 bundle with intervals"])
def test_save_load_save_writes_identical_files(result, tmp_path, source):
    if source != "fresh run":
        result = load_results(DATA / "bundle_schema1")
    first = save_results(result, tmp_path / "first")
    second = save_results(load_results(first), tmp_path / "second")
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert "figures/snapshots.png" in a and "mechanistic.json" in a


def test_loaded_bundle_can_be_refitted_and_simulated(result, tmp_path, pipeline_config):
    loaded = load_results(save_results(result, tmp_path / "b", figures=False))
    cfg = pipeline_config()
    cfg.refit.candidates = 1
    again = run_job(run_pipeline(loaded, cfg, stages=("simulate", "refit", "qc")))
    assert {"closed form", "closed form (refitted)", "fisher_kpp"} <= set(again.simulations)
    assert again.mechanistic["closed form (refitted)"].params.keys() == loaded.equations.parameters()[1].keys()
    save_results(again, tmp_path / "again", figures=False)


def test_existing_directory_is_refused_and_overwrite_is_atomic(result, tmp_path):
    out = tmp_path / "b"
    save_results(result, out, figures=False)
    with pytest.raises(FileExistsError):
        save_results(result, out, figures=False)
    save_results(result, out, figures=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary or backup left behind


def test_newer_or_foreign_bundles_are_refused(result, tmp_path):
    out = save_results(result, tmp_path / "b", figures=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="upgrade"):
        load_results(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest"):
        load_results(tmp_path / "empty")


@pytest.mark.parametrize("file, key", [("equations.json", "equations"), ("mechanistic.json", "mechanistic")])
def test_expressions_in_a_bundle_cannot_run_code(result, tmp_path, file, key):
    out = save_results(result, tmp_path / "b", figures=False)
    data = json.loads((out / file).read_text())
    evil = "__import__('os').system('touch hacked')"
    if key == "equations":
        data["D"]["front"][0]["expression"]["text"] = evil
    else:
        data["closed form (refitted)"]["expressions"]["D"] = evil
    (out / file).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not allowed"):
        load_results(out)
    assert not (tmp_path / "hacked").exists() and not Path("hacked").exists()


def test_schema1_bundle_loads(tmp_path):
    """A bundle of schema 1 (tests/data/make_bundle_schema1.py, written by napari-binn at commit c946738)."""
    assert SCHEMA_VERSION > 1
    result = load_results(DATA / "bundle_schema1")
    assert result.field.u.shape == (4, 6, 8) and result.field.units == "cells/mm²"
    eq = result.equations
    assert type(eq) is Equations
    assert eq.D.text == "308.344" and eq.G.text == "-0.01633*exp(-9.306e-5*u)"
    assert eq.G.selected_index == 2 and eq.G.selection == "bic" and len(eq.G.front) == 3
    assert [c.name for c in eq.G.constants] == ["G_0", "G_1"] and eq.G.constants[0].units == "1/h"
    fkpp = result.mechanistic["fisher_kpp"]
    assert isinstance(fkpp, MechanisticFit)
    assert fkpp.params["D"] == pytest.approx(800.964874552193)
    assert fkpp.ci95["D"] == pytest.approx((800.8350927300748, 801.0946774065079))
    assert fkpp.D(np.array([10.0, 1000.0])) == pytest.approx([800.964874552193] * 2)
    refit = result.mechanistic["closed form (refitted)"]
    assert refit.ci95["G_1"] == pytest.approx((-0.0012991513218561168, -0.001261418422078681))
    assert refit.G(np.array([0.0]))[0] == pytest.approx(refit.params["G_0"])
    assert np.all(np.isfinite(result.fit.D(np.linspace(200, 1600, 5))))
    assert {"closed form (refitted)", "fisher_kpp", "BINN surrogate"} <= set(result.simulations)
    assert result.qc["fisher_kpp"].mean_rel_l2 < 0.01
    assert result.metadata["bundle"]["schema_version"] == 1
    # written again in the current schema, it reads back the same
    again = load_results(save_results(result, tmp_path / "again", figures=False))
    assert again.equations.G.text == eq.G.text and again.mechanistic["fisher_kpp"].ci95 == fkpp.ci95
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert "bundle" not in json.loads((tmp_path / "again" / "metadata.json").read_text())


def test_schema1_fixture_is_unchanged():
    """The fixture must stay as napari-binn wrote it (regenerating it would write the current schema)."""
    manifest = json.loads((DATA / "bundle_schema1" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert not (DATA / "bundle_schema1" / "figures").exists()  # written with figures=False


def test_alternatives_and_library_rows_survive_a_bundle(result, tmp_path):
    """The held-out choice's alternatives (equations metadata), its table (run metadata) and the library rows are
    written and read back unchanged."""
    eq = result.equations
    assert eq.D.library or eq.G.library
    alts = {"D": ["800.0 [constant]"], "G": ["0.08 - 4e-5*u [logistic]", "0.3 - 0.04*log(u) [gompertz]"]}
    from dataclasses import replace

    from napari_binn.pipeline import PipelineResult

    res = PipelineResult(result.config, result.field, result.fit, replace(eq, metadata={**eq.metadata,
                         "alternatives": alts}), dict(result.simulations), dict(result.mechanistic), result.qc,
                         dict(result.metadata))
    first = save_results(res, tmp_path / "first", figures=False)
    loaded = load_results(first)
    assert loaded.equations.metadata["alternatives"] == alts
    assert loaded.metadata["holdout"] == json.loads(json.dumps(result.metadata["holdout"]))
    for key in ("D", "G"):
        assert [r.form for r in getattr(loaded.equations, key).rows] == [r.form for r in getattr(eq, key).rows]
    second = save_results(loaded, tmp_path / "second", figures=False)
    a, b = _files(first), _files(second)
    assert [name for name in a if a[name] != b.get(name)] == []
    from napari_binn.report import write_report

    write_report(loaded, tmp_path, {})
    assert "cannot tell apart" in (tmp_path / "report.html").read_text(encoding="utf-8")
