"""The whole chain on a tiny field: stages, resume from a bundle, cancel, and the results bundle's safety."""

import json

import numpy as np
import pytest

from napari_binn.jobs import CancelToken, run_job
from napari_binn.pipeline import PipelineConfig, PipelineResult, run_pipeline
from napari_binn.results import BundleError, load_results, save_results


@pytest.fixture(scope="module")
def field():
    from napari_binn.synthetic.models import make_synthetic

    fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(10, 12),
                            dx_um=50.0, times_h=np.linspace(0, 24, 5), seed=0)
    return fld


def tiny_config() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.binn = cfg.binn.replace(steps=40, warmup_steps=10, hidden=(16, 16), rate_hidden=(8,), n_collocation=128,
                                batch_size=128, log_every=10, snapshot_every=20, val_every=10, device="cpu")
    cfg.symbolic.backend = "library"
    cfg.symbolic.seeds = [0]
    cfg.refit.max_evals = 8
    cfg.refit.intervals = "none"
    return cfg


@pytest.fixture(scope="module")
def result(field):
    events = []
    res = run_job(run_pipeline(field, tiny_config()), events.append)
    res.metadata["_events"] = events
    return res


def test_all_stages_ran(result, field):
    assert result.field is field
    assert result.fit is not None and result.equations is not None
    assert {"BINN surrogate", "learned D, G", "fisher_kpp"} <= set(result.simulations)
    for arr in result.simulations.values():
        assert arr.shape == field.u.shape
    assert result.qc is not None and "fisher_kpp" in result.qc.table()
    stages = {e.stage for e in result.metadata["_events"]}
    assert {"binn", "symbolic", "simulate", "refit", "qc"} <= stages
    assert not result.cancelled


def test_bundle_roundtrip_and_resume(result, tmp_path):
    result.metadata.pop("_events", None)
    out = save_results(result, tmp_path / "bundle")
    for name in ("manifest.json", "config.toml", "field.npz", "density.tif", "simulations.npz", "binn",
                 "equations.json", "equations.txt", "equations.tex", "metrics.json", "report.html",
                 "figures/rates.png", "figures/counts.png", "mechanistic.json"):
        assert (out / name).exists(), name
    loaded = load_results(out)
    assert np.array_equal(loaded.field.u, result.field.u, equal_nan=True)
    assert loaded.config == result.config
    u = np.linspace(100, 1800, 7)
    assert np.allclose(loaded.fit.D(u), result.fit.D(u))
    assert loaded.equations.D.text == result.equations.D.text
    import sympy as sp

    u_sym = next(iter(result.equations.G.sympy.free_symbols), sp.Symbol("u"))
    original_G = np.vectorize(lambda v: float(result.equations.G.sympy.subs(u_sym, v)))
    # the bundle stores the constants as printed (rounded to what the data support): equal to display precision
    assert np.allclose(loaded.equations.G(u), original_G(u), rtol=1e-3, atol=1e-9)
    assert loaded.qc["fisher_kpp"].mean_rel_l2 == pytest.approx(result.qc["fisher_kpp"].mean_rel_l2)
    # a loaded bundle can be written again unchanged
    again_dir = save_results(loaded, tmp_path / "again", figures=False)
    assert load_results(again_dir).equations.D.text == loaded.equations.D.text
    # resume: re-run only the symbolic stage on the saved BINN (no retraining)
    again = run_job(run_pipeline(loaded, loaded.config, stages=("symbolic",)))
    assert again.fit is loaded.fit
    assert again.equations is not None and hasattr(again.equations.D, "front")


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


def test_cancelled_pipeline_returns_result(field):
    token = CancelToken()
    cfg = tiny_config()
    cfg.binn = cfg.binn.replace(steps=5000)

    def on_event(ev):
        if ev.stage == "binn" and ev.step >= 20:
            token.cancel()

    res = run_job(run_pipeline(field, cfg, cancel=token), on_event)
    assert res.cancelled and res.metadata["cancelled_in"] == "binn"
    assert res.fit is not None and np.all(np.isfinite(res.fit.D(np.linspace(0, 2000, 5))))
    assert res.equations is None


def test_bad_input():
    with pytest.raises(TypeError, match="Stack"):
        run_job(run_pipeline(np.zeros((3, 4, 4)), PipelineConfig()))
    with pytest.raises(ValueError, match="stage"):
        run_job(run_pipeline(PipelineResult(PipelineConfig()), PipelineConfig(), stages=("nope",)))
    with pytest.raises(ValueError, match="density field"):
        run_job(run_pipeline(PipelineResult(PipelineConfig()), PipelineConfig(), stages=("binn",)))


def test_refit_reselects_the_true_forms_by_bic():
    """Fronts whose symbolic selection is a wrong, complex form: refitting the candidates against the data and
    keeping the simplest within the BIC margin recovers D constant and G linear with the true constants."""
    from napari_binn.pipeline import _candidate_indices
    from napari_binn.symbolic.discover import Equations
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(10, 12),
                              dx_um=50.0, times_h=np.linspace(0, 24, 5), noise=0.05, seed=0)

    eq = Equations.from_forms(D=["700.0", "600.0 + 0.1*u", "700.0*exp(-0.0002*u) + 0.1*u"],
                              G=["0.05", "0.075 - 3.5e-5*u", "0.08*exp(-0.0005*u) - 0.002"], u_range=(0.0, 2000.0))
    D = eq.D
    assert _candidate_indices(D, 6) == [0, 1, 2] and _candidate_indices(D, 2) == [0, 2]
    assert _candidate_indices(D, 1) == [2]
    cfg = tiny_config()
    cfg.refit.max_evals = 100
    cfg.refit.reference_model = ""
    res = PipelineResult(cfg, field=field, equations=eq)
    res = run_job(run_pipeline(res, cfg, stages=("refit",)))
    assert res.equations.D.selection == "bic"
    assert res.equations.D.text == "700.000000000000" and res.equations.G.text == "0.075 - 3.5e-5*u"
    refit = res.metadata["closed_form_refitted"]
    assert refit["D_0"] == pytest.approx(800.0, rel=0.1)
    assert refit["G_0"] == pytest.approx(0.08, rel=0.1)
    cands = res.metadata["refit_candidates"]
    assert len(cands) >= 4 and all("bic" in c for c in cands)
    # one candidate only: the symbolic selection is refitted as it is
    cfg.refit.candidates = 1
    res1 = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
    assert res1.equations.D.selected_index == 2 and "refit_candidates" not in res1.metadata
