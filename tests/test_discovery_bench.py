"""The discovery benchmark's own machinery: the structure scorer, constant errors, the case table, the options.
(Accuracy figures come from running the benchmark, not from these tests.)"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sp = pytest.importorskip("sympy")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "discovery_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("discovery_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["discovery_bench"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("discovery_bench", None)


U = sp.Symbol("u")
GRID = np.linspace(200.0, 1800.0, 50)


def _score(bench, expr, truth, n_true, scale=None):
    vals = np.asarray(sp.lambdify(U, expr)(GRID), float) * np.ones_like(GRID)
    tv = np.asarray(sp.lambdify(U, truth)(GRID), float) * np.ones_like(GRID)
    return bench.score_function(expr, vals, truth, tv, n_true, scale)


def test_true_expressions_score_their_structure(bench):
    for name, case in bench.ALL_CASES.items():
        truth = bench.case_truth(case)
        d, g = truth.expressions()
        d_form, g_form = bench.true_forms(case, truth.forms)
        assert _score(bench, d, d, d_form.n_constants)["structure_ok"], name
        assert _score(bench, g, g, g_form.n_constants, bench.G_SCALE)["structure_ok"], name


def test_rewritten_forms_match_and_wrong_forms_do_not(bench):
    F = sp.Float
    logistic = F(0.05) - F(2.5e-5) * U
    assert _score(bench, F(0.05) * (1 - U / F(2000.0)), logistic, 2)["terms_ok"]
    assert _score(bench, F(0.38) - F(0.05) * sp.log(U), F(0.05) * sp.log(F(2000.0) / U), 2)["terms_ok"]
    assert _score(bench, F(3.0e6) / (U + F(2000.0)), F(1500.0) / (1 + U / F(2000.0)), 2)["numeric_ok"]
    rising = _score(bench, F(0.0075) + F(3.4e-6) * U, logistic, 2)
    assert not rising["structure_ok"] and rising["rel_err"] > 0.5
    assert not _score(bench, F(0.5) * U, F(800.0), 1)["structure_ok"]
    assert not _score(bench, F(800.0), F(0.5) * U, 1)["structure_ok"]
    wiggle = _score(bench, F(800.0) + F(1e-3) * U + F(1e-9) * U ** 2, F(800.0), 1)  # within 2%, 3 constants
    assert wiggle["rel_err"] < 0.02 and not wiggle["structure_ok"]
    assert not _score(bench, logistic, sp.Integer(0), 0, bench.G_SCALE)["structure_ok"]
    singular = bench.score_function(F(1.0) / U, np.full(3, np.inf), F(800.0), np.full(3, 800.0), 1)
    assert not singular["structure_ok"]


def test_count_constants_and_term_shapes(bench):
    assert bench.count_constants(sp.Float(0.5) * U ** sp.Float(2.0)) == 1
    assert bench.count_constants(sp.Float(800.0)) == 1 and bench.count_constants(U ** 2) == 0
    assert bench.term_shapes(sp.Float(0.05) - sp.Float(2.5e-5) * U) == bench.term_shapes(sp.Float(1.0) - U)
    assert bench.term_shapes(sp.Float(1.0) + U) != bench.term_shapes(sp.Float(1.0) - U)


def test_constant_errors_and_rel_err(bench):
    errs = bench.constant_errors(bench.G_FORMS["allee"], 0.33 * (1 - GRID / 2000) * (GRID / 2000 - 0.2), GRID,
                                 {"r": 0.3, "K": 2000.0, "A": 0.2})
    assert errs["r"] == pytest.approx(0.1, abs=1e-4) and abs(errs["K"]) < 1e-4 and abs(errs["A"]) < 1e-4
    assert bench.rel_err(np.full(4, 0.001), np.zeros(4), 0.05) == pytest.approx(0.02)
    assert bench.rel_err(np.full(4, 1.1), np.ones(4)) == pytest.approx(0.1)


def test_case_table_covers_the_issue(bench):
    from napari_binn.synthetic.models import make_synthetic

    forms, domains, noises = set(), set(), set()
    for name, case in bench.CASES.items():
        fld, truth = case.make(0, quick=True)
        assert fld.shape == (6, 16, 16) and fld.mask.any(), name
        forms |= {("D", truth.forms["D"]), ("G", truth.forms["G"])}
        domains.add(case.domain)
        noises.add(case.noise_model)
        if case.noise_model == "poisson":  # ~20 cells per box at K
            assert 15 <= truth.params["K"] * (case.dx_um / 1000) ** 2 <= 25, name
    assert len(bench.CASES) >= 8
    assert {("D", f) for f in ("constant", "linear", "power", "contact_inhibition")} <= forms
    assert {("G", f) for f in ("logistic", "allee", "gompertz", "none")} <= forms
    assert {"scratch", "wound", "islands", "polygon"} <= domains and {"gaussian_k", "poisson"} <= noises
    full, _ = bench.CASES["fkpp_scratch"].make(0)
    assert full.shape == (17, 40, 40)
    del make_synthetic


def test_validation_and_fresh_cases_are_other_data(bench, capsys):
    """The validation and fresh sets share no case with the eight or each other, and each case differs from every
    earlier one in form, domain, noise or frames."""
    sets = [bench.CASES, bench.VALIDATION, bench.FRESH]
    assert len(bench.VALIDATION) >= 8 and len(bench.FRESH) >= 8
    assert sum(map(len, sets)) == len(set().union(*sets)) == (len(bench.ALL_CASES) - len(bench.UNITS)
                                                               - len(bench.STRESS) - len(bench.STRESS2)
                                                               - len(bench.STRESS3))
    seen = {(c.model, c.domain, c.noise_model, c.frames) for c in bench.CASES.values()}
    for later in sets[1:]:
        for name, case in later.items():
            key = (case.model, case.domain, case.noise_model, case.frames)
            assert key not in seen, name
            fld, truth = case.make(0, quick=True)
            assert fld.shape == (6, 16, 16) and fld.mask.any(), name
            assert truth.forms["G"] in bench.G_FORMS and truth.forms["D"] in bench.D_FORMS, name
        seen |= {(c.model, c.domain, c.noise_model, c.frames) for c in later.values()}
    assert bench.main(["--validation", "--list"]) == 0
    out = capsys.readouterr().out
    assert "v_richards_triangle" in out and "fkpp_scratch " not in out and "f_contact_scratch" not in out
    assert bench.main(["--fresh", "--list"]) == 0
    out = capsys.readouterr().out
    assert "f_contact_scratch" in out and "v_richards_triangle" not in out


def test_the_units_cases_differ_from_every_earlier_case_in_units_or_shape(bench, capsys):
    """The cases in other units and shapes are a set of their own, and each differs from every earlier case in K,
    box size, grid, movie length or exponent, not only in form, domain or noise."""
    earlier = {**bench.CASES, **bench.VALIDATION, **bench.FRESH}
    assert len(bench.UNITS) >= 8 and not set(bench.UNITS) & set(earlier)
    assert len(bench.ALL_CASES) == (len(earlier) + len(bench.UNITS) + len(bench.STRESS) + len(bench.STRESS2)
                                   + len(bench.STRESS3))

    def units(c):
        return (c.params["K"], c.dx_um, c.grid, c.hours, c.params.get("m"), c.params.get("gamma"))

    seen = {units(c) for c in earlier.values()}
    for name, case in bench.UNITS.items():
        assert units(case) not in seen, name
        fld, truth = case.make(0, quick=True)
        assert fld.shape == (6, 16, 16) and fld.mask.any() and truth.params["K"] == case.params["K"], name
    assert bench.main(["--units", "--list"]) == 0
    out = capsys.readouterr().out
    assert "u_fkpp_sparse_scratch" in out and "fkpp_scratch " not in out and "f_contact_scratch" not in out


def test_the_stress_cases_reach_beyond_the_named_models_domains_and_spacing(bench, capsys):
    """The stress set: forms no named model has (as templates with their constants), ROIs in several parts or
    with a hole, uneven frame times and a delay; each builds, and the identifiability check sees each template's
    constants."""
    earlier = {**bench.CASES, **bench.VALIDATION, **bench.FRESH, **bench.UNITS}
    assert len(bench.STRESS) >= 8 and not set(bench.STRESS) & set(earlier)
    assert sum(c.model == "custom" for c in bench.STRESS.values()) >= 5
    for name in bench.STRESS_MASKS:
        mask = bench.stress_mask(name, (40, 40))
        assert mask.any() and not mask.all(), name
    ring = bench.stress_mask("annulus", (40, 40))
    assert not ring[20, 20] and ring[20, 3]  # a hole in the middle
    halves = bench.stress_mask("two_rois", (40, 40))
    assert halves[20, 5] and halves[20, 30] and not halves[20, 20].any()  # two parts, a gap between
    with pytest.raises(ValueError, match="unknown stress mask"):
        bench.stress_mask("hexagon", (8, 8))
    for name, case in bench.STRESS.items():
        fld, truth = case.make(0, quick=True)
        assert fld.mask.any() and np.isfinite(fld.u[fld.observed]).all(), name
        if case.model == "custom":  # the truth is the template with the case's constants
            d, g = truth.expressions()
            u = np.array([300.0, 1500.0])
            for key, expr, fn in (("D", d, truth.D), ("G", g, truth.G)):
                np.testing.assert_allclose(np.asarray(sp.lambdify(U, expr)(u), float) * np.ones(2), fn(u), rtol=1e-9)
    uneven = bench.STRESS["s_fkpp_uneven_lowcount"]
    fld, _ = uneven.make(0)
    assert fld.n_frames == 12 and len(set(np.round(np.diff(fld.t_h), 6))) > 1
    delayed = bench.STRESS["s_delay_fkpp_scratch"]
    res = bench.crb_case(delayed, quick=True)
    assert set(res["constants"]) == {"D0", "K", "r", "tau"}
    assert bench.main(["--stress", "--list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert names == list(bench.STRESS) and "uneven" in out


def test_the_second_stress_set_builds_its_shapes_and_missed_boxes(bench, capsys):
    """The second stress set: new cases only, a channel and a disc with pillars, boxes the counting missed (read
    0, the same ones for the same seed), and five frames."""
    earlier = {**bench.CASES, **bench.VALIDATION, **bench.FRESH, **bench.UNITS, **bench.STRESS}
    assert len(bench.STRESS2) >= 8 and not set(bench.STRESS2) & set(earlier)
    channel = bench.stress_mask("channel", (24, 60))
    assert channel.sum(axis=0).max() == 6 and channel[12, 30] and not channel[2, 30]
    pillars = bench.stress_mask("pillars", (40, 40))
    y, x = np.mgrid[:40, :40]
    disc = np.hypot(x - 19.5, y - 19.5) <= 0.47 * 40
    assert not (pillars & ~disc).any() and disc[12, 14] and not pillars[12, 14]  # a hole where a pillar stands
    for name, case in bench.STRESS2.items():
        fld, _ = case.make(0, quick=True)
        assert fld.mask.any() and np.isfinite(fld.u[fld.observed]).all(), name
    case = bench.STRESS2["s2_fkpp_dropouts"]
    clean = bench.Case(**{**case.__dict__, "extra": {}})
    (a, _), (b, _), (c, _) = case.make(0, quick=True), case.make(0, quick=True), clean.make(0, quick=True)
    missed = (a.u != c.u) & a.mask[None]
    assert missed.any() and (a.u[missed] == 0).all() and np.array_equal(a.u, b.u, equal_nan=True)
    assert 0.005 < missed.sum() / (a.mask.sum() * a.n_frames) < 0.05
    assert bench.STRESS2["s2_contact_five_frames"].make(0)[0].n_frames == 5
    assert bench.main(["--stress2", "--list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert names == list(bench.STRESS2) and "read 0" in out


def test_the_third_stress_set_builds_its_star_and_scores_a_truth_undefined_at_zero(bench, capsys):
    """The third stress set: new cases only, a five-pointed star ROI (concave between its points), and a custom
    Gompertz truth, log(K/u), that is not defined where the observed densities reach 0: those densities are left
    out of the scoring grid, the others kept."""
    earlier = {**bench.CASES, **bench.VALIDATION, **bench.FRESH, **bench.UNITS, **bench.STRESS, **bench.STRESS2}
    assert len(bench.STRESS3) >= 8 and not set(bench.STRESS3) & set(earlier)
    star = bench.stress_mask("star", (40, 40))
    assert star[20, 20] and star[20, 37] and not star[20, 3] and not star[0, 0]  # a point to the right, not left
    for name, case in bench.STRESS3.items():
        fld, _ = case.make(0, quick=True)
        assert fld.mask.any() and np.isfinite(fld.u[fld.observed]).all(), name
    truth = bench.case_truth(bench.STRESS3["s3_contact_gompertz_polygon_poisson"])
    u = np.linspace(0.0, 1800.0, 10)
    kept = bench.scored_densities(u, truth)
    assert np.array_equal(kept, u[1:]) and np.isfinite(truth.G(kept)).all()
    fkpp = bench.case_truth(bench.STRESS3["s3_fkpp_noisy_scratch"])
    assert np.array_equal(bench.scored_densities(np.linspace(-50.0, 1800.0, 10), fkpp), np.linspace(-50.0, 1800.0, 10))
    assert bench.main(["--stress3", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line and not line[0].isspace()]
    assert names == list(bench.STRESS3)


def test_options(bench, capsys):
    assert bench.parse_sets(["binn.steps=300", "refit.bic_margin=4.5", "symbolic.backend=library"]) == {
        "binn": {"steps": 300}, "refit": {"bic_margin": 4.5}, "symbolic": {"backend": "library"}}
    cfg = bench.make_config(bench.parse_sets(["binn.steps=300", "refit.candidates=2"]), quick=False)
    assert cfg.binn.steps == 300 and cfg.refit.candidates == 2
    with pytest.raises(ValueError, match="section.key"):
        bench.parse_sets(["steps=3"])
    with pytest.raises(ValueError, match="unknown section"):
        bench.make_config({"nope": {"a": 1}}, quick=False)
    with pytest.raises(ValueError, match="has no key"):
        bench.make_config({"refit": {"nope": 1}}, quick=False)
    with pytest.raises(SystemExit):
        bench.main(["--cases", "no_such_case", "--list"])
    assert bench.main(["--list"]) == 0
    assert "fkpp_scratch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0", "--list"])


def test_the_thread_count_and_images_reach_each_case(bench, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_case(case, seed, overrides, quick=False, keep=None, start=None, threads=1, images=False):
        seen.update(case=case.name, threads=threads, images=images)
        raise Stop

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    with pytest.raises(Stop):
        bench.main(["--cases", "fkpp_scratch", "--threads", "2"])
    assert seen == {"case": "fkpp_scratch", "threads": 2, "images": False}
    with pytest.raises(Stop):
        bench.main(["--cases", "fkpp_scratch", "--images"])
    assert seen["threads"] == 1 and seen["images"]  # one thread: two benchmark processes on two cores


def test_selftest_passes(bench, capsys):
    assert bench.main(["--selftest"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"selftest": "pass", "failures": []}


def test_crb_quick_sees_every_constant(bench):
    res = bench.crb_case(bench.CASES["allee_islands"], quick=True)
    assert set(res["constants"]) == {"D", "r", "K", "A"}
    assert all(v["rms_change_over_noise"] > 0 and np.isfinite(v["crb_rel_sd"]) for v in res["constants"].values())


def test_oracle_recovers_every_model_from_a_clean_field(bench):
    """The oracle's model for each synthetic model is the generator's: on a noise-free field (quick size) it finds
    the true constants and curves; its intervals are reported per free constant."""
    import dataclasses

    models = {}
    for case in bench.ALL_CASES.values():  # every named model once; every 'custom' case (its own templates)
        models.setdefault(case.name if case.model == "custom" else case.model, case)
    assert {c.model for c in models.values()} - {"custom"} <= set(bench.ORACLE_MODELS)
    for model, case in models.items():
        clean = dataclasses.replace(case, noise=0.0, noise_model="gaussian_k")
        res = bench.oracle_case(clean, seed=0, quick=True)
        assert res["converged"], model
        assert res["oracle_d_rel_err"] < 0.01 and res["oracle_g_rel_err"] < 0.01, (model, res)
        if case.model == "custom":
            free = set(case.template_constants())
        else:
            held = set(bench.ORACLE_MODELS[model][1])
            free = {k for k in case.params if k not in held and not (model == "diffusion" and k == "K")}
        assert set(res["constants"]) == free, model
        assert all(abs(c["rel_err"]) < 0.02 for c in res["constants"].values()), (model, res["constants"])


def test_summary_medians_and_targets(bench):
    rows = [{"case": "a", "binn_d_rel_err": e, "binn_g_rel_err": 0.05, "final_d_rel_err": 0.02,
             "final_g_rel_err": 0.03, "structure_ok": ok, "seconds": 100.0, "n_t_rel_err": 0.01}
            for e, ok in ((0.1, True), (0.3, True), (0.2, False))]
    s = bench.summarise(rows, ["a"])
    assert s["cases"] == 1 and s["structures_recovered"] == 1
    assert s["per_case"]["a"]["binn_d_rel_err"] == pytest.approx(0.2)
    assert not s["targets_met"]["binn_d_within_15pct"] and s["targets_met"]["binn_g_within_10pct"]


def test_pipeline_symbol_and_rescore(bench):
    up = sp.Symbol("u", positive=True)  # the symbolic stage's u carries an assumption
    assert bench.term_shapes(sp.Float(0.0464) - sp.Float(2.24e-5) * up) == bench.term_shapes(
        sp.Float(0.05) - sp.Float(2.5e-5) * U)
    row = {"case": "fkpp_scratch", "seed": 0, "u_range": [100.0, 1700.0], "binn_d_rel_err": 0.03,
           "binn_g_rel_err": 0.03, "seconds": 1.0, "n_t_rel_err": 0.01,
           "final_d": "0.179*u + 584.3", "final_g": "0.0499 - 2.49e-5*u", "structure_ok": False}
    (new,) = bench.rescore([row])
    assert new["rescored"] and new["g_structure_ok"] and new["final_g_rel_err"] < 0.02
    assert not new["d_structure_ok"] and not new["structure_ok"] and new["final_d_rel_err"] > 0.05


def test_the_true_form_among_the_alternatives_is_found(bench):
    """Contact inhibition D0/(1 + u/K) headlined as a constant D, with the saturating form an alternative whose
    held-out refit bent it: listed (scored with the refitted constants, not the flat symbolic ones)."""
    from types import SimpleNamespace

    meta = {"alternatives": {"D": ["1561.86/(8.38815e-15*u + 1) [saturating]", "1.51*u [proportional]"], "G": []},
            "alternatives_refitted": {"D": {"1561.86/(8.38815e-15*u + 1) [saturating]": "1946.0/(0.0004514*u + 1.0)",
                                            "1.51*u [proportional]": "3.86*u"}}}
    listed = bench.listed_alternatives(SimpleNamespace(equations=SimpleNamespace(metadata=meta)))
    assert [label for label, _ in listed["D"]] == meta["alternatives"]["D"] and "G" not in listed
    u = np.linspace(900.0, 2000.0, 50)
    truth = sp.Float(2000.0) / (1 + U / sp.Float(2000.0))
    hits = bench.true_form_hits(listed["D"], u, truth, 2000.0 / (1 + u / 2000.0), 2)
    assert hits == ["1561.86/(8.38815e-15*u + 1) [saturating]"]
    flat = bench.listed_alternatives(SimpleNamespace(equations=SimpleNamespace(metadata={
        "alternatives": meta["alternatives"]})))  # no refitted constants kept: the symbolic (flat) curve
    assert bench.true_form_hits(flat["D"], u, truth, 2000.0 / (1 + u / 2000.0), 2) == [
        "1561.86/(8.38815e-15*u + 1) [saturating]"]  # the same terms: the structure still counts
    rows = [{"case": "a", "binn_d_rel_err": 0.1, "binn_g_rel_err": 0.05, "final_d_rel_err": 0.2,
             "final_g_rel_err": 0.03, "structure_ok": False, "true_form_listed": True, "seconds": 1.0,
             "n_t_rel_err": 0.01}]
    s = bench.summarise(rows, ["a"])
    assert s["structures_recovered"] == 0 and s["true_form_listed"] == 1 and s["per_case"]["a"]["true_form_listed"]


def test_band_scores_measure_coverage_and_the_determined_range(bench):
    """The band scores read the fit's own band and determined range: a band that holds the truth on the left half
    only covers half the grid; the determined range (narrow band) is scored by its own error; no band, no scores."""

    class Fit:
        def __init__(self, sd):
            self.sd = sd

        def D(self, u):
            return np.full_like(u, 1000.0)

        def band_sd(self, kind, u):
            return None if self.sd is None else np.interp(u, [0.0, 1000.0, 1001.0, 2000.0], self.sd)

        def determined_range(self, kind):
            return (0.0, 1000.0) if self.sd is not None else None

    u = np.linspace(0.0, 2000.0, 201)
    truth = np.where(u <= 1000.0, 1050.0, 1500.0)  # 5% off on the left, 50% off on the right
    s = bench.band_scores(Fit([30.0, 30.0, 100.0, 100.0]), "D", u, truth)
    assert s["coverage"] == pytest.approx(101 / 201)  # inside ± 60 on the left, outside ± 200 on the right
    assert s["determined_share"] == pytest.approx(101 / 201)
    assert s["rel_err_determined"] == pytest.approx(50.0 / 1050.0)
    assert bench.band_scores(Fit(None), "D", u, truth) == {"coverage": None, "determined_share": None,
                                                           "rel_err_determined": None}


def test_images_of_a_case_are_counted_back_on_its_grid(bench):
    """--images: a case's clean field drawn as nuclei (another renderer's), counted by the density stage in the
    case's boxes; the counts line up with the cells drawn per box (the grid starts at the ROI's bounding box)."""
    from napari_binn.density import extract_density

    case = bench.ALL_CASES["u_fkpp_small_polygon_poisson"]  # a polygon ROI whose bounding box is inside the image
    field, truth = case.make(0, quick=True)
    stack, pixel_mask, drawn = bench.case_images(case, truth, field, 0)
    assert stack.data.shape[1:] == pixel_mask.shape and drawn.shape == field.u.shape
    counted = extract_density(stack, roi=pixel_mask, method="nuclei", box_um=case.dx_um)
    assert counted.u.shape[1:] != field.u.shape[1:]
    row = bench.image_counts(counted, drawn, pixel_mask, case.dx_um)
    assert abs(row["image_count_ratio"] - 1.0) < 0.03 and row["image_count_rel_err"] < 0.15
    assert 6.0 <= row["image_nucleus_diameter_used_um"] <= 16.0

