"""The whole chain on a tiny field: stages, cancel, bad input, the refit's choice by BIC (bundles:
test_results.py)."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from napari_binn.jobs import CancelToken, run_job
from napari_binn.pipeline import PipelineConfig, PipelineResult, run_pipeline
from napari_binn.symbolic.expression import free_floats, parse_expression


def test_no_delay_is_reported_where_there_is_none(pipeline_run):
    """The refit stage's delay check on data without a delay: it ran, and the BIC did not fall enough to warn."""
    result, _ = pipeline_run
    check = result.metadata["delay_check"]
    assert check["bic_drop"] < result.config.refit.delay_check
    assert not [w for w in result.metadata["warnings"] if "Learn a delay" in w]


def test_all_stages_ran(pipeline_run, fkpp_field):
    result, events = pipeline_run
    field = fkpp_field
    assert result.field is field
    assert result.fit is not None and result.equations is not None
    assert {"BINN surrogate", "learned D, G", "fisher_kpp"} <= set(result.simulations)
    for arr in result.simulations.values():
        assert arr.shape == field.u.shape
    assert result.qc is not None and "fisher_kpp" in result.qc.table()
    stages = {e.stage for e in events}
    assert {"binn", "symbolic", "simulate", "refit", "qc"} <= stages
    assert not result.cancelled


def test_cancelled_pipeline_returns_result(fkpp_field, pipeline_config):
    token = CancelToken()
    cfg = pipeline_config()
    cfg.binn = cfg.binn.replace(steps=5000)

    def on_event(ev):
        if ev.stage == "binn" and ev.step >= 20:
            token.cancel()

    res = run_job(run_pipeline(fkpp_field, cfg, cancel=token), on_event)
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


def test_refit_reselects_the_true_forms_by_bic(pipeline_config):
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
    cfg = pipeline_config()
    cfg.refit.max_evals = 100
    cfg.refit.reference_model = ""
    cfg.refit.holdout_frames = 0  # the BIC choice (the held-out choice is tested below)
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

    # the refitted constants in the chosen forms (what the GUI shows for an opened bundle), rounded to what their
    # intervals support; a form picked after the refit keeps its own constants
    shown = res.refitted_equations()
    assert shown is not res.equations and shown.D.selected_index == res.equations.D.selected_index
    # (to the digits the intervals support: at least 2)
    assert float(shown.D.sympy) == pytest.approx(refit["D_0"], rel=0.05) and float(shown.D.sympy) != 700.0
    (u,) = shown.G.sympy.free_symbols
    assert float(shown.G.sympy.subs(u, 0)) == pytest.approx(refit["G_0"], rel=0.05)
    assert float(shown.G.sympy.diff(u)) == pytest.approx(refit["G_1"], rel=0.05)
    other = (res.equations.G.selected_index + 1) % len(res.equations.G.rows)
    picked = dataclasses.replace(res, equations=dataclasses.replace(res.equations, G=res.equations.G.pick(other)))
    assert picked.refitted_equations() is picked.equations
    assert dataclasses.replace(res, mechanistic={}).refitted_equations() is res.equations


def test_the_closed_form_simulation_follows_the_refits_choice(pipeline_config):
    """The simulate stage runs before the refit, so its 'closed form' simulation is of the symbolic selection; when
    the refit's choice changes the forms, the refit simulates the chosen ones, so the QC row and the overlay show
    the equations the result holds (on Jin 2016 the symbolic selection was a nested form whose simulation failed,
    and the row was missing though the chosen D0 u simulates)."""
    from napari_binn.symbolic.discover import Equations
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(10, 12),
                              dx_um=50.0, times_h=np.linspace(0, 24, 5), noise=0.05, seed=0)
    eq = Equations.from_forms(D=["700.0", "600.0 + 0.1*u", "700.0*exp(-0.0002*u) + 0.1*u"],
                              G=["0.05", "0.075 - 3.5e-5*u", "0.08*exp(-0.0005*u) - 0.002"], u_range=(0.0, 2000.0))
    cfg = pipeline_config()
    cfg.refit.max_evals = 100
    cfg.refit.reference_model = ""
    cfg.refit.holdout_frames = 0
    before = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("simulate",)))
    assert before.metadata["closed_form_simulated"] == {"D": str(eq.D.sympy), "G": str(eq.G.sympy)}
    events = []
    res = run_job(run_pipeline(before, cfg, stages=("refit", "qc")), events.append)
    chosen = {"D": str(res.equations.D.sympy), "G": str(res.equations.G.sympy)}
    assert chosen != before.metadata["closed_form_simulated"]  # the refit changed the forms (D constant, G linear)
    assert res.metadata["closed_form_simulated"] == chosen
    fresh = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=res.equations), cfg, stages=("simulate",)))
    np.testing.assert_array_equal(res.simulations["closed form"], fresh.simulations["closed form"])
    assert not np.array_equal(res.simulations["closed form"], before.simulations["closed form"])
    assert any(e.stage == "refit" and e.data.get("inner_stage") == "simulate" for e in events)
    assert "closed form" in res.qc.table()
    # a refit that keeps the forms leaves the simulation alone; one that was never tried is not started
    again = run_job(run_pipeline(res, cfg, stages=("refit",)))
    assert again.simulations["closed form"] is res.simulations["closed form"]
    plain = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
    assert "closed form" not in plain.simulations and "closed_form_simulated" not in plain.metadata


def test_a_learned_delay_is_held_in_the_closed_forms_refit_and_simulation(pipeline_config):
    """With ``binn.use_delay`` the BINN learns T(t); the closed forms are D(u) and G(u) under that same T(t): the
    refit and the closed-form simulation hold it fixed (they ignored it, and a delayed start was taken for a
    density-dependent D and an Allee G). Here T is given exactly, so the refit finds the true constants."""

    from napari_binn.pipeline import _closed_form_run, learned_delay
    from napari_binn.symbolic.discover import Equations
    from napari_binn.synthetic.models import make_synthetic

    def delay(th):
        return 1.0 - np.exp(-np.asarray(th, float) / 6.0)

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0, "T": delay}, domain="scratch",
                              grid=(10, 12), dx_um=50.0, times_h=np.linspace(0, 24, 7), seed=0)
    eq = Equations.from_forms(D=["700.0"], G=["0.07 - 3e-5*u"], u_range=(0.0, 2000.0))
    cfg = pipeline_config()
    cfg.refit.max_evals = 100
    cfg.refit.reference_model = ""
    cfg.refit.holdout_frames = 0
    found = {}
    for use_delay in (True, False):
        fit = SimpleNamespace(config=SimpleNamespace(use_delay=use_delay), T=delay)
        res = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq, fit=fit), cfg, stages=("refit",)))
        assert (learned_delay(res) is delay) == use_delay
        assert (_closed_form_run(res, eq)[3] is delay) == use_delay
        mech = res.mechanistic["closed form (refitted)"]
        assert mech.metadata["time_factor"] == ("given" if use_delay else None)
        found[use_delay] = res.equations.with_params(mech)
        # without a learned delay the refit stage checks for one: these data are delayed, and it says so
        warned = [w for w in res.metadata["warnings"] if "Learn a delay T(t)" in w]
        if use_delay:
            assert "delay_check" not in res.metadata and not warned
        else:
            check = res.metadata["delay_check"]
            assert check["bic_drop"] > 100 and check["tau_h"] == pytest.approx(6.0, rel=0.25), check
            assert len(warned) == 1 and "tau = " in warned[0]
    d_true, g_true = 800.0, lambda u: 0.08 * (1 - u / 2000.0)
    u = np.linspace(200.0, 1800.0, 50)
    assert float(found[True].D(u).mean()) == pytest.approx(d_true, rel=0.02)
    np.testing.assert_allclose(found[True].G(u), g_true(u), rtol=0.03, atol=1e-3)
    assert float(found[False].D(u).mean()) < 0.8 * d_true  # blind to the delay: D about 550 here


def test_the_refit_fits_its_own_delay_when_the_learned_one_is_off(pipeline_config):
    """``refit.delay``: a learned T(t) that is off (here it starts at 0.5, as the BINN's did on a delayed scratch)
    is made up for by the closed form's constants when held fixed; 'auto' also refits with T(t) = 1 - exp(-t/tau)
    and keeps it when its BIC is lower, with tau's unit and interval, outside D's and G's constants; 'learned'
    holds the learned T(t) as before."""

    from napari_binn.pipeline import delay_text, refit_constants_text, refitted_delay
    from napari_binn.symbolic.discover import Equations
    from napari_binn.synthetic.models import make_synthetic

    def truth(th):
        return 1.0 - np.exp(-np.asarray(th, float) / 6.0)

    def learned(th):  # the right time scale, but half-way at the start
        return 0.5 + 0.5 * truth(th)

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0, "T": truth}, domain="scratch",
                              grid=(10, 12), dx_um=50.0, times_h=np.linspace(0, 24, 7), seed=0)
    eq = Equations.from_forms(D=["700.0"], G=["0.07 - 3e-5*u"], u_range=(0.0, 2000.0))
    fit = SimpleNamespace(config=SimpleNamespace(use_delay=True), T=learned)
    out = {}
    for choice in ("learned", "auto"):
        cfg = pipeline_config()
        cfg.refit.max_evals, cfg.refit.reference_model, cfg.refit.holdout_frames = 100, "", 0
        cfg.refit.intervals, cfg.refit.delay = "wald", choice
        out[choice] = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq, fit=fit), cfg,
                                           stages=("refit",)))
    held = out["learned"]
    assert held.metadata["refit_delay"] is None and refitted_delay(held) is None
    assert held.mechanistic["closed form (refitted)"].metadata["time_factor"] == "given"
    res = out["auto"]
    info = res.metadata["refit_delay"]
    assert info["used"] and info["bic_fitted"] < info["bic_learned"] - 10, info
    assert info["tau_h"] == pytest.approx(6.0, rel=0.1) and info["tau_ci95"][0] < info["tau_h"] < info["tau_ci95"][1]
    mech = res.mechanistic["closed form (refitted)"]
    assert mech.units["tau"] == "h" and "tau" in res.metadata["closed_form_refitted"]
    t = np.linspace(0.0, 24.0, 5)
    np.testing.assert_allclose(refitted_delay(res)(t), 1.0 - np.exp(-t / info["tau_h"]))
    u = np.linspace(200.0, 1800.0, 50)
    found = {k: r.refitted_equations() for k, r in out.items()}  # tau is left out of D's and G's constants
    assert float(found["auto"].D(u).mean()) == pytest.approx(800.0, rel=0.03)
    np.testing.assert_allclose(found["auto"].G(u), 0.08 * (1 - u / 2000.0), rtol=0.05, atol=1e-3)
    errors = {k: abs(float(f.D(u).mean()) / 800.0 - 1.0) for k, f in found.items()}
    assert errors["auto"] < errors["learned"]  # the held T(t), off at the start, moved D
    assert any(line.startswith("tau = ") and line.endswith(" h") for line in refit_constants_text(res))
    lines = delay_text(fit, field.t_h, metadata=res.metadata)
    assert len(lines) == 2 and "T(t) of the refitted closed form: 1 - exp(-t/tau), tau = " in lines[1]
    assert "BIC is lower by" in lines[1]
    assert len(delay_text(fit, field.t_h, short=True, metadata=res.metadata)) == 2
    with pytest.raises(ValueError, match="Unknown parameter"):  # a name of neither D, G nor the fit's T
        eq.with_refit(SimpleNamespace(params={"D_0": 1.0, "x": 2.0}, ci95={}, expressions={}))
    cfg = pipeline_config()
    cfg.refit.delay = "parametric"
    with pytest.raises(ValueError, match=r"refit\.delay = 'parametric'.*'auto', 'learned', 'fit'"):
        run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq, fit=fit), cfg, stages=("refit",)))


def _noisy_fkpp(frames=5):
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(10, 12),
                              dx_um=50.0, times_h=np.linspace(0, 24, frames), noise=0.05, seed=0)
    return field


def test_refit_chooses_by_held_out_frames_and_keeps_the_alternatives(pipeline_config):
    """Wrong symbolic selections plus library-style candidates: the held-out choice keeps the simplest form the
    late frames cannot exclude (D constant, G linear), excludes the ones that predict clearly worse, and writes the
    rest as alternatives."""
    from napari_binn.pipeline import alternatives_text
    from napari_binn.symbolic.discover import Equations

    field = _noisy_fkpp(frames=7)
    eq = Equations.from_forms(D=["700.0", "600.0 + 0.1*u", "700.0*exp(-0.0002*u) + 0.1*u", "700.0/(1.0e-20*u + 1)"],
                              G=["0.05", "0.075 - 3.5e-5*u", "0.08*exp(-0.0005*u) - 0.002"],
                              u_range=(0.0, 2000.0))
    cfg = pipeline_config()
    cfg.refit.max_evals, cfg.refit.reference_model, cfg.refit.holdout_frames = 60, "", 2
    res = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit", "qc")))
    out = res.equations
    assert out.D.selection == "held-out"
    assert out.D.text == "700.000000000000" and out.G.text == "0.075 - 3.5e-5*u"
    hold = res.metadata["holdout"]
    assert hold["frames"] == 2 and hold["n_blocks"] >= 6
    g = {c["form"]: c for c in hold["G"]["candidates"]}
    assert [c["excluded"] for c in g.values() if c["n_constants"] == 1] == [True]  # constant growth: clearly worse
    assert not g["0.075 - 3.5e-5*u"]["excluded"] and hold["G"]["headline"] == "0.075 - 3.5e-5*u"
    assert hold["G"]["headline_reason"] == "fewest constants" == out.metadata["headline_reason"]["D"]
    # every candidate records its training-frame BIC and the block test against the fewest-constant headline
    head = g["0.075 - 3.5e-5*u"]
    assert np.isfinite(head["train_bic"]) and head["p_train_better"] == 1.0  # d = 0 in every block
    assert all(0.0 <= c["p_train_better"] <= 1.0 for c in g.values())
    assert set(out.metadata["alternatives"]["G"]) | set(out.metadata["same_as_headline"]["G"]) == {
        c for c, v in g.items() if not v["excluded"]} - {"0.075 - 3.5e-5*u"}
    # a saturating D with a vanishing saturation constant (the constant D in another guise as the symbolic stage
    # fitted it) is judged as refitted against the data, where it bends: a different curve, so an alternative
    d = {c["form"]: c for c in hold["D"]["candidates"]}
    guise = next(c for c in d if "1.0e-20" in c)
    assert not d[guise]["excluded"]
    refitted = out.metadata["alternatives_refitted"]["D"]
    assert "1.0e-20" not in refitted[guise] and refitted[guise] != refitted[hold["D"]["headline"]]
    # written with its constants only (the 1 stays an integer): read back, it is a two-constant saturating form
    assert len(free_floats(parse_expression(refitted[guise]))) == 2, refitted[guise]
    assert guise in out.metadata["alternatives"]["D"] and guise not in out.metadata["same_as_headline"]["D"]
    assert res.metadata["closed_form_refitted"]["D_0"] == pytest.approx(800.0, rel=0.1)
    assert "closed form (refitted)" in [m.name for m in res.qc.models]
    lines = alternatives_text(out)
    assert any(line.startswith("D(u): the data cannot tell apart")
               and f"{refitted[guise]} (refitted; symbolic fit {guise})" in line for line in lines)
    assert all("cannot tell apart" in line or "same curve" in line for line in lines)


def test_held_out_candidates_get_their_own_simulation_budget(monkeypatch, pipeline_config):
    """refit.holdout_max_evals bounds each held-out candidate's fit (the other refits keep refit.max_evals); a
    candidate stopped by it is still compared at the best state it reached, and the record says it did not
    converge."""
    import napari_binn.pipeline as pl
    from napari_binn.symbolic.discover import Equations

    field = _noisy_fkpp(frames=5)
    eq = Equations.from_forms(D=["700.0", "600.0 + 0.1*u"], G=["0.05", "0.075 - 3.5e-5*u"], u_range=(0.0, 2000.0))
    budgets = []
    real = pl.fit_mechanistic_job

    def recording(fld, model, **kw):
        budgets.append((fld.n_frames, kw["max_evals"]))
        return (yield from real(fld, model, **kw))

    monkeypatch.setattr(pl, "fit_mechanistic_job", recording)
    cfg = pipeline_config()
    cfg.refit.max_evals, cfg.refit.holdout_max_evals, cfg.refit.holdout_frames, cfg.refit.initial = 40, 5, 1, "data"
    res = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
    cands = res.metadata["refit_candidates"]
    assert res.metadata["holdout"]["max_evals"] == 5
    held_out = [b for n, b in budgets if n == 4]  # fitted on the frames before the held-out one
    assert len(held_out) == len(cands) >= 3 and set(held_out) == {5}
    assert {b for n, b in budgets if n == 5} == {40}  # the reference model and the final refit
    assert all(c["simulations"] <= 5 for c in cands)
    stopped = [c for c in cands if not c["converged"]]
    assert stopped and all(c["heldout_sse"] is not None and np.isfinite(c["heldout_sse"]) for c in stopped)
    for bad in (0, 2.5, "100", True):
        cfg.refit.holdout_max_evals = bad
        with pytest.raises(ValueError, match=r"refit\.holdout_max_evals must be a whole number >= 1"):
            cfg.validate()


def test_the_insample_switch_only_acts_on_named_library_forms():
    """switch_bics keeps the headline's BIC and those of library forms ([saturating], ...), not the symbolic
    front's other expressions (which gain in-sample BIC by making up for a wrong partner function)."""

    from napari_binn.pipeline import switch_bics

    f = SimpleNamespace(rows=[SimpleNamespace(form=form) for form in ("", "saturating", "", "linear", "")])
    rows, bics = [4, 1, 2, 3], [10.0, 11.0, 12.0, 13.0]  # candidate k is front row rows[k]
    assert switch_bics(f, rows, 0, bics) == [10.0, 11.0, None, 13.0]  # the headline (row 4) keeps its BIC
    assert switch_bics(f, rows, 2, bics) == [None, 11.0, 12.0, 13.0]

    # the report's line names the reason, and that only the held-out frames could not tell the forms apart
    from napari_binn.pipeline import alternatives_text

    row = SimpleNamespace(text="2000.0/(0.0005*u + 1)")
    d = SimpleNamespace(selected=row, selected_row=SimpleNamespace(form="saturating"))
    reason = "training-frame BIC 508 below the fewest-constant form 1.58e+3, held-out error no higher"
    eq = SimpleNamespace(D=d, G=None, metadata={"alternatives": {"D": ["1.58e+3"]}, "headline_reason": {"D": reason}})
    (line,) = alternatives_text(eq)
    assert line.startswith("D(u): the held-out frames cannot tell apart: 2000.0/(0.0005*u + 1) [saturating] "
                           f"(headline, {reason}); 1.58e+3")
    eq.metadata["headline_reason"] = {"D": "fewest constants"}
    assert alternatives_text(eq)[0].startswith("D(u): the data cannot tell apart:")


def test_holdout_frames_errors(pipeline_config):
    field = _noisy_fkpp(frames=4)
    from napari_binn.symbolic.discover import Equations

    eq = Equations.from_forms(D=["700.0", "600.0 + 0.1*u"], G=["0.05", "0.075 - 3.5e-5*u"], u_range=(0.0, 2000.0))
    for bad in (3, 7, -1, 1.5):
        cfg = pipeline_config()
        cfg.refit.holdout_frames = bad
        with pytest.raises(ValueError, match=r"refit\.holdout_frames.*0 \(choose by BIC\) to 2"):
            run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
    cfg = pipeline_config()
    cfg.refit.holdout_frames, cfg.refit.holdout_level = 1, 0.0
    with pytest.raises(ValueError, match=r"refit\.holdout_level"):
        run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
    # each key with its bad values and the message; the delay check is checked with one candidate too
    for key, bads, message, preset in (
            ("holdout_bic_switch", (-1.0, float("inf"), "100", True), r"finite number >= 0", {"holdout_frames": 1}),
            ("holdout_switch_level", (0.0, 1.0, "0.01", True, None), r"in \(0, 1\)", {"holdout_frames": 1}),
            ("holdout_tested_switch", (-1.0, float("inf"), "10", True), r"finite number >= 0", {"holdout_frames": 1}),
            ("delay_check", (-5.0, float("nan"), "often", True), r"finite number >= 0", {"candidates": 1})):
        for bad in bads:
            cfg = pipeline_config()
            for name, value in {**preset, key: bad}.items():
                setattr(cfg.refit, name, value)
            with pytest.raises(ValueError, match=rf"refit\.{key}.*{message}"):
                run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
    # checked before training, as soon as the field is known
    cfg = pipeline_config()
    cfg.refit.holdout_frames = 3
    with pytest.raises(ValueError, match=r"refit\.holdout_frames"):
        run_job(run_pipeline(field, cfg))
    cfg = pipeline_config()
    cfg.symbolic.forms_D, cfg.refit.holdout_frames = ["gompertz"], 1
    with pytest.raises(ValueError, match=r"symbolic\.forms_D.*'gompertz'"):
        run_job(run_pipeline(field, cfg, stages=("binn", "symbolic")), lambda ev: pytest.fail(
            "a bad form name must be refused before training"))


def test_singular_candidate_never_costs_the_closed_form_row(pipeline_run, pipeline_config):
    """G samples that 5/u fits best: discovery drops it (a/u's reaction does not vanish at u = 0), so the closed form
    simulates and its QC row is there."""
    from napari_binn.symbolic import FunctionSamples, discover_equations

    result = pipeline_run[0]
    u = np.linspace(200.0, 1900.0, 60)
    samples = {"D": FunctionSamples(u, np.full_like(u, 800.0), name="D", u_max=2000.0),
               "G": FunctionSamples(u, 0.03 + 5.0 / u, name="G", u_max=2000.0)}
    eq = discover_equations(samples, backend="library")
    assert "/u" not in eq.G.text.replace(" ", "") and any("not admissible" in n for n in eq.G.notes)
    cfg = pipeline_config()
    res = run_job(run_pipeline(PipelineResult(cfg, field=result.field, fit=result.fit, equations=eq), cfg,
                               stages=("simulate", "qc")))
    assert "closed form" in [m.name for m in res.qc.models]


def test_refit_starts_from_the_denoised_first_frame_when_it_fits_better():
    """Noise in a scratch's empty space, clipped at 0, is spurious cells that grow and fill the scratch: refitted
    from the first frame as observed, D comes out too small. refit.initial = 'auto' compares both starts on the
    first fit and keeps the one that fits the data better (here the denoised one), which brings D closer."""
    from napari_binn.symbolic.discover import Equations
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.05, "K": 2000.0}, domain="scratch", grid=(12, 16),
                              dx_um=50.0, times_h=np.linspace(0, 48, 7), noise=0.05, noise_model="gaussian_k",
                              u0_fraction=0.4, seed=0)
    eq = Equations.from_forms(D=["700.0"], G=["0.05 - 2.5e-5*u"], u_range=(0.0, 2000.0))
    D = {}
    for initial in ("auto", "data"):
        cfg = PipelineConfig()
        cfg.refit.candidates, cfg.refit.reference_model, cfg.refit.intervals = 1, "", "none"
        cfg.refit.initial = initial
        res = run_job(run_pipeline(PipelineResult(cfg, field=field, equations=eq), cfg, stages=("refit",)))
        D[initial] = res.metadata["closed_form_refitted"]["D_0"]
        if initial == "auto":
            chosen = res.metadata["refit_initial"]
            assert chosen["initial"] == "denoised"
            assert chosen["loglik"]["denoised"] > chosen["loglik"]["data"]
    assert abs(D["auto"] - 800.0) < abs(D["data"] - 800.0)


def test_refit_initial_must_be_known():
    cfg = PipelineConfig()
    cfg.refit.initial = "smoothed"
    with pytest.raises(ValueError, match=r"refit\.initial must be one of 'auto', 'data', 'denoised'"):
        cfg.validate()


def test_comparing_forms_on_the_observed_densities_does_not_warn_of_extrapolation():
    """The held-out choice compares each form with the headline on the observed 5th-95th percentile, which may lie
    a little outside a form's fitting range: an internal check, so no ExtrapolationWarning reaches the user."""
    import warnings

    from napari_binn.pipeline import _same_curve
    from napari_binn.symbolic import ExtrapolationWarning
    from napari_binn.symbolic.expression import Expression, parse_expression

    def form(text):
        return Expression(parse_expression(text), (100.0, 1000.0), 0.0, 1, name="D")

    a, b = form("700.0"), form("700.0/(1.0e-20*u + 1)")
    u = np.linspace(50.0, 1500.0, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)
        assert _same_curve(a, b, u)
        assert not _same_curve(a, form("0.7*u"), u)
    with pytest.warns(ExtrapolationWarning):  # the forms themselves still warn when a user extrapolates
        a(u)


def test_held_out_candidates_keep_library_forms_that_share_a_structure():
    """One candidate per structure (the refit re-estimates the constants), but an Allee G (threshold >= 0) and a
    weak Allee G (threshold <= 0) are different forms of one structure, each refitted within its own bounds: a
    weak Allee row had dropped the Allee row, and with it every strong Allee threshold (the third stress set's
    vanishing growth). A symbolic row still stands for the library form of its structure found after it."""
    from napari_binn.pipeline import _holdout_candidates
    from napari_binn.symbolic.discover import DiscoveredFunction, FrontRow
    from napari_binn.symbolic.expression import Expression, parse_expression

    def row(text, size, form=""):
        return FrontRow(size, 0.0, 0.0, Expression(parse_expression(text), (0.0, 2000.0), 0.0, size, name="G"), form)

    front = (row("0", 1), row("2.3e-5*u + 0.0068", 5), row("(5.8e-5 - 2.5e-8*u)*(u + 66.0)", 9, "weak_allee"))
    library = (row("0.0149 - 2.1e-10*u", 5, "logistic"), row("(6.7e-5 - 3.1e-8*u)*(u - 1.0e-17)", 9, "allee"),
               row("(5.8e-5 - 2.5e-8*u)*(u + 66.0)", 9, "weak_allee"))
    f = DiscoveredFunction("G", front, 2, "score", "operon", (0.0, 2000.0), library=library)
    picked = [f.rows[i].form or f.rows[i].expression.text for i in _holdout_candidates(f, 3)]
    assert sorted(picked) == sorted(["0", "2.3e-5*u + 0.0068", "weak_allee", "allee"])


def test_refitted_constants_are_matched_to_forms_that_name_them_in_another_order():
    """A closed form's constants are named (G_0, G_1, ...) in the order sympy keeps its numbers, which can change
    with their values: a weak Allee G's factors swapped places once its constants were rounded for a bundle and
    read back, the reloaded forms no longer printed like the refit, and the refitted constants were dropped. The
    refit's names are matched to the forms' by the renaming that makes the expressions equal."""
    import sympy as sp

    from napari_binn.pipeline import refit_names
    from napari_binn.symbolic.expression import U

    d0, g0, g1, g2 = (sp.Symbol(n, real=True) for n in ("D_0", "G_0", "G_1", "G_2"))
    model = {"D": d0, "G": (g0 + g1 * U) * (g2 + U)}
    same = SimpleNamespace(expressions={k: str(v) for k, v in model.items()})
    assert refit_names(model, same) == {"D_0": "D_0", "G_0": "G_0", "G_1": "G_1", "G_2": "G_2"}
    swapped = SimpleNamespace(expressions={"D": "D_0", "G": "(G_1 + G_2*u)*(G_0 + u)"})
    assert refit_names(model, swapped) == {"D_0": "D_0", "G_1": "G_0", "G_2": "G_1", "G_0": "G_2"}
    other = SimpleNamespace(expressions={"D": "D_0", "G": "G_0 + G_1*u + G_2*u**2"})
    assert refit_names(model, other) is None


def test_held_out_choice_alternates_until_both_choices_hold(monkeypatch):
    """D and G are chosen in turn until a round keeps its choice. Held-out errors per (D, G) pair stand in for the
    refits: with the symbolic G (3 constants) only the 2-constant D predicts well; with that D constant growth
    does as well as any G; with constant growth the constant D does as well, so D changes in the third round, and
    only a fourth round (G again) finds that with the constant D the logistic G predicts best: three fixed rounds
    (D, G, D) ended at constant growth, a G chosen for a D they no longer had."""

    import napari_binn.pipeline as pl
    from napari_binn.symbolic.discover import Equations

    field = _noisy_fkpp(frames=7)
    D = ["700.0", "600.0 + 0.1*u"]
    G = ["0.05", "0.075 - 3.5e-5*u", "0.08*exp(-0.0005*u) - 0.002"]
    eq = Equations.from_forms(D=D, G=G, u_range=(0.0, 2000.0))
    eq = dataclasses.replace(eq, D=eq.D.pick(1), G=eq.G.pick(2))
    level = {("700.0", G[2]): 100, ("600.0 + 0.1*u", G[2]): 10, ("600.0 + 0.1*u", "0.05"): 10,
             ("600.0 + 0.1*u", G[1]): 50, ("700.0", "0.05"): 10, ("700.0", G[1]): 5}
    noise = 1 + 0.01 * np.random.default_rng(0).standard_normal(12)
    fitted = []

    def fake_fit(train, model, init=None, **kw):
        cand = dict(init)
        fitted.append(cand)
        return SimpleNamespace(params=cand, bic=1.0, D=None, G=None, converged=True, n_evals=1)
        yield  # a job generator that returns at once

    def fake_simulate(*args, **kw):
        return np.zeros_like(field.u)
        yield

    def fake_errors(*args):
        pair = current_pair()
        return level[pair] * noise

    def current_pair():
        init = fitted[-1]
        sel = pl.Equations.from_forms(D=D, G=G, u_range=(0.0, 2000.0))
        for i, d in enumerate(D):
            for j, g in enumerate(G):
                cand = dataclasses.replace(sel, D=sel.D.pick(i), G=sel.G.pick(j))
                if pl.solver_model(cand, field)[1] == init:
                    return d, g
        raise AssertionError(init)

    monkeypatch.setattr(pl, "fit_mechanistic_job", fake_fit)
    monkeypatch.setattr(pl, "simulate_job", fake_simulate)
    monkeypatch.setattr(pl, "block_errors", fake_errors)
    cfg = PipelineConfig()
    res = PipelineResult(cfg, field=field, equations=eq)
    out, _ = run_job(pl._select_by_holdout(res, eq, cfg.refit, {"initial": "data"}, None, 0))
    assert (out.D.text, out.G.text) == ("700.000000000000", "0.075 - 3.5e-5*u")
    hold = res.metadata["holdout"]
    assert hold["D"]["headline"] == "700.000000000000" and hold["G"]["headline"] == "0.075 - 3.5e-5*u"
    assert len(res.metadata["refit_candidates"]) == len(level)  # every pair fitted once


def test_bic_choice_alternates_until_both_choices_hold(monkeypatch):
    """The BIC choice (refit.holdout_frames = 0) alternates D and G as the held-out choice does, until a round keeps
    its choice. A BIC per (D, G) pair stands in for the refits: the third round moves D to the constant, and only a
    fourth round finds that with it the logistic G has the lowest BIC; three fixed rounds (D, G, D) ended at
    constant growth, chosen for a D they no longer had."""

    import napari_binn.pipeline as pl
    from napari_binn.symbolic.discover import Equations

    field = _noisy_fkpp()
    D = ["700.0", "600.0 + 0.1*u"]
    G = ["0.05", "0.075 - 3.5e-5*u", "0.08*exp(-0.0005*u) - 0.002"]
    eq = Equations.from_forms(D=D, G=G, u_range=(0.0, 2000.0))
    eq = dataclasses.replace(eq, D=eq.D.pick(1), G=eq.G.pick(2))
    bic = {(D[0], G[2]): 100.0, (D[1], G[2]): 10.0, (D[1], G[0]): 10.0, (D[1], G[1]): 50.0, (D[0], G[0]): 10.0,
           (D[0], G[1]): 5.0}
    by_init = {}
    for i, d in enumerate(D):
        for j, g in enumerate(G):
            cand = dataclasses.replace(eq, D=eq.D.pick(i), G=eq.G.pick(j))
            by_init[repr(sorted(cand.parameters()[1].items()))] = (d, g)
    fitted = []

    def fake_fit(fld, model, init=None, **kw):
        pair = by_init[repr(sorted(init.items()))]
        fitted.append(pair)
        return SimpleNamespace(params=dict(init), bic=bic[pair], aic=bic[pair])
        yield  # a job generator that returns at once

    monkeypatch.setattr(pl, "fit_mechanistic_job", fake_fit)
    res = PipelineResult(PipelineConfig(), field=field, equations=eq)
    out = run_job(pl._select_by_bic(res, eq, 6, 2.0, {}, None, 0))
    assert (out.D.text, out.G.text) == ("700.000000000000", "0.075 - 3.5e-5*u")
    assert out.D.selection == "bic"
    assert len(fitted) == len(set(fitted)) == len(bic)  # every pair fitted once
