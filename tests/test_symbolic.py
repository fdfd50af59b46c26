import dataclasses
import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
import sympy as sp

from napari_binn.jobs import CancelToken
from napari_binn.symbolic import (
    Equations,
    ExtrapolationWarning,
    FunctionSamples,
    discover_equations,
    discover_equations_job,
    front_scores,
    pareto_indices,
    samples_from_fit,
    select_index,
)
from napari_binn.symbolic.expression import (
    U,
    complexity,
    constant_units,
    free_floats,
    parameter_units,
    round_significant,
    supported_digits,
)
from napari_binn.symbolic.selection import significant_indices

UG = np.linspace(0.05, 1.0, 80)


def logistic(u):
    return 0.5 * (1 - u / 0.8)


@pytest.fixture(scope="module")
def logistic_eq():
    return discover_equations({"G": FunctionSamples(UG, logistic(UG), name="G")}, backend="library")


def assert_json_round_trip(eq: Equations) -> None:
    """Equations -> JSON text -> Equations gives the same fronts, text, LaTeX and constants (and the same JSON)."""
    text = json.dumps(eq.to_dict())
    again = Equations.from_dict(json.loads(text))
    assert json.dumps(again.to_dict()) == text
    for key in ("D", "G"):
        f, g = getattr(eq, key), getattr(again, key)
        if f is None:
            assert g is None
            continue
        assert [(r.expression.text, r.expression.latex, r.expression.constants) for r in g.front] == \
            [(r.expression.text, r.expression.latex, r.expression.constants) for r in f.front]
        u = np.linspace(*f.u_range, 7)
        np.testing.assert_array_equal(g(u), f(u))


# -- selection --------------------------------------------------------------------------------------------------


def test_selection_rules_on_hand_made_front():
    comps = [1, 3, 5, 7, 9]
    losses = [10.0, 1.0, 0.12, 0.11, 0.10]
    scores = front_scores(comps, losses)
    assert scores[0] == 0
    assert scores[1] == pytest.approx(math.log(10) / 2)
    assert scores[2] == pytest.approx(-math.log(0.12) / 2)
    # 'best': among losses <= 0.15 (indices 2, 3, 4) the highest score is index 2
    assert select_index(comps, losses, "best") == 2
    assert select_index(comps, losses, "score") == 1
    assert select_index(comps, losses, "accuracy") == 4
    # a tighter loss factor leaves only the most accurate member eligible
    assert select_index(comps, losses, "best", loss_factor=1.05) == 4


def test_unknown_selection_rule_raises():
    with pytest.raises(ValueError, match="selection rule"):
        select_index([1, 2], [1.0, 0.5], "shortest")
    with pytest.raises(ValueError, match="selection rule"):
        discover_equations({"G": FunctionSamples(UG, logistic(UG), name="G")}, backend="library", selection="x")


def test_pareto_indices_drop_dominated():
    comps = [3, 1, 5, 5, 7]
    losses = [1.0, 2.0, 1.5, 0.5, 0.6]
    assert pareto_indices(comps, losses) == [1, 0, 3]


def test_significance_pruning_keeps_real_gains_only():
    # 200 points: a 1 % gain for 2 extra constants is noise, a 50 % gain is real
    keep = significant_indices([1.0, 0.99, 0.5], [1, 3, 4], 200)
    assert keep == [0, 2]


# -- recovery ---------------------------------------------------------------------------------------------------


def test_library_recovers_logistic(logistic_eq):
    g = logistic_eq.G
    assert len(free_floats(g.sympy)) == 2
    np.testing.assert_allclose(g(UG), logistic(UG), rtol=1e-4, atol=1e-6)
    assert g.constants[0].units == "1/h" or g.constants[1].units == "1/h"


def test_library_recovers_michaelis_menten_with_noise():
    rng = np.random.default_rng(3)
    y = 0.45 * UG / (0.3 + UG) * (1 + 0.01 * rng.standard_normal(UG.size))
    g = discover_equations({"G": FunctionSamples(UG, y, name="G")}, backend="library").G
    assert len(free_floats(g.sympy)) == 2
    assert sp.denom(sp.together(g.sympy)).has(U)  # a saturating rational form, not a polynomial look-alike
    np.testing.assert_allclose(g(UG), 0.45 * UG / (0.3 + UG), rtol=0.02)


def test_operon_recovers_logistic_with_few_generations():
    pytest.importorskip("pyoperon")
    samples = {"G": FunctionSamples(UG, logistic(UG), name="G")}
    opts = dict(population_size=100, generations=10, library_candidates=False)
    eq = discover_equations(samples, backend="operon", seeds=(0,), backend_options=opts)
    g = eq.G
    assert len(free_floats(g.sympy)) == 2
    np.testing.assert_allclose(g(UG), logistic(UG), rtol=1e-3, atol=1e-5)
    again = discover_equations(samples, backend="operon", seeds=(0,), backend_options=opts)
    assert sp.srepr(again.G.sympy) == sp.srepr(g.sympy)  # deterministic given the seed
    # ... whatever the thread count (the default uses the available cores)
    fronts = []
    for n in (1, 2):
        e = discover_equations(samples, backend="operon", seeds=(0,), backend_options={**opts, "n_threads": n})
        fronts.append([sp.srepr(r.expression.sympy) for r in e.G.front])
    assert fronts[0] == fronts[1]
    assert_json_round_trip(eq)


# -- expression forms -------------------------------------------------------------------------------------------


def test_numpy_callable_matches_sympy_and_text(logistic_eq):
    assert_json_round_trip(logistic_eq)
    assert_json_round_trip(Equations.from_forms(D=["700.0", "600.0 + 0.1*u"], G=["0.075 - 3.5e-5*u"], u_range=(0, 1)))
    g = logistic_eq.G
    ref = [float(g.sympy.subs(U, v)) for v in UG[::10]]
    np.testing.assert_allclose(g(UG[::10]), ref, rtol=1e-12)
    reparsed = sp.lambdify(U, sp.sympify(g.text, locals={"u": U}))
    np.testing.assert_allclose(reparsed(UG), g(UG), rtol=1e-12)
    assert "u" in g.latex and "$" not in g.latex
    out = g(np.full((2, 3), 0.5))  # any shape, as simulate calls it on grids
    assert out.shape == (2, 3)
    assert "G(u)" in logistic_eq.summary() and "*" in logistic_eq.G.table()


def test_constant_expression_callable_broadcasts():
    eq = discover_equations({"D": FunctionSamples(UG, np.full(UG.size, 420.0), name="D")}, backend="library")
    assert eq.D.sympy.is_Number and float(eq.D.sympy) == pytest.approx(420.0)
    assert eq.D(np.array([0.2, 0.4])).tolist() == pytest.approx([420.0, 420.0])
    assert any("constant" in n for n in eq.D.notes)
    assert eq.D.units == "µm²/h" and eq.D.constants[0].units == "µm²/h"


def test_extrapolation_warns_once_per_call(logistic_eq):
    g = logistic_eq.G
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g(np.array([0.05, 0.5, 1.0]))  # inside the fitted range: silent
    with pytest.warns(ExtrapolationWarning, match="extrapolates") as record:
        g(np.array([0.0, 1.5, 2.0]))
    assert len([r for r in record if issubclass(r.category, ExtrapolationWarning)]) == 1


def test_constant_rounding_follows_spread():
    assert round_significant(0.123456, 2) == 0.12
    assert supported_digits(0.5, 0.001) == 4
    assert supported_digits(0.5, 0.2) == 2
    assert supported_digits(0.5, 1.0) == 1
    rng = np.random.default_rng(0)
    y = logistic(UG)
    wobbly = np.array([y * (1 + 0.3 * rng.standard_normal()) for _ in range(5)])
    precise = discover_equations({"G": FunctionSamples(UG, y, name="G")}, backend="library").G
    spread = discover_equations(
        {"G": FunctionSamples(UG, y, ensemble=wobbly, name="G")}, backend="library"
    ).G
    assert max(c.digits for c in spread.constants) <= 2
    assert min(c.digits for c in precise.constants) >= 4


def test_constant_units_by_role():
    d0, m = sp.Float(300.0), sp.Float(2.3)
    units = constant_units(d0 * U**m, "µm²/h", "cells/mm²")
    assert units[d0] == "µm²/h·(cells/mm²)^-2.3"
    assert units[m] == "1"
    a, b = sp.Float(0.5), sp.Float(2.0)
    units = constant_units(a * sp.exp(b * U), "1/h", "u/K")
    assert units[a] == "1/h" and units[b] == "(u/K)^-1"


def test_constant_units_solve_the_dimensions_of_every_form():
    F, dens = sp.Float, "cells/mm²"
    # contact inhibition: b·u is dimensionless, so b is per density and D0 carries the output unit
    d0, b = F(2000.0), F(4e-4)
    assert constant_units(d0 / (b * U + 1), "µm²/h", dens) == {d0: "µm²/h", b: "(cells/mm²)^-1"}
    # Allee growth with minus signs in front of constants: (a - c u)(u - A)
    a, c, thr = F(1.5e-4), F(7.5e-8), F(400.0)
    units = constant_units((a - c * U) * (U - thr), "1/h", dens)
    assert units[a] == "1/h·(cells/mm²)^-1" and units[-c] == "1/h·(cells/mm²)^-2" and units[-thr] == "cells/mm²"
    # Gompertz: log(u) is read in u's unit
    g0, g1 = F(0.2), F(0.03)
    assert constant_units(g0 - g1 * sp.log(U), "1/h", dens) == {g0: "1/h", -g1: "1/h"}
    # a scale the form leaves free, and a sum of a density and a rate: no unit can be given
    assert set(constant_units(F(3.0) / (F(2.0) + F(1.5) * U), "µm²/h", dens).values()) == {""}
    assert constant_units(F(0.3) + U, "1/h", dens) == {F(0.3): ""}


def test_parameter_units_of_named_constants_use_exponent_values():
    G_0, G_1, G_2, u = sp.symbols("G_0 G_1 G_2 u")
    units = parameter_units(G_0 * u**G_2 + G_1, {"G_0": 0.07, "G_1": 0.01, "G_2": 1.5}, "1/h", "cells/mm²")
    assert units == {"G_0": "1/h·(cells/mm²)^-1.5", "G_1": "1/h", "G_2": "1"}
    r, K = sp.symbols("r K")
    assert parameter_units(r * (1 - u / K), {"r": 0.05, "K": 2000.0}, "1/h", "cells/mm²") == \
        {"K": "cells/mm²", "r": "1/h"}


def test_complexity_counts_nodes():
    assert complexity(U) == 1
    assert complexity(sp.Integer(2) * U) == 3
    assert complexity(sp.Float(2.5) * U) == 4  # a fitted constant costs 2
    assert complexity(sp.Float(1.5) + sp.Float(2.5) * U) == 7


# -- input from a BinnFit ---------------------------------------------------------------------------------------


class FakeFit:
    """Duck-typed BinnFit: ensemble-mean and ensemble D, G plus the observed-density histogram."""

    units = {"D": "µm²/h", "G": "1/h", "u": "fraction"}
    u_range = (0.0, 1.0)

    def __init__(self):
        edges = np.linspace(0, 1, 21)
        self.u_hist = (np.r_[np.zeros(2), np.arange(1, 17), np.zeros(2)], edges)
        self.scales = np.array([0.9, 1.0, 1.1])

    def D(self, u):
        return 500 * np.asarray(u) + 100

    def G(self, u):
        return logistic(np.asarray(u))

    def D_ensemble(self, u):
        return self.scales[:, None] * self.D(u)[None]

    def G_ensemble(self, u):
        return self.scales[:, None] * self.G(u)[None]


def test_samples_from_fit_uses_quantiles_weights_and_spread():
    s = samples_from_fit(FakeFit(), n_samples=50)
    d = s["D"]
    assert d.u.size == 50 and d.u_units == "fraction"
    assert 0.2 < d.u.min() < 0.3 and 0.85 < d.u.max() < 0.9  # 5-95 % of the histogram mass, not [0, 1]
    assert d.weight[-1] > d.weight[0]  # more data at high density
    np.testing.assert_allclose(d.sigma, 0.1 * d.value, rtol=1e-9)


def test_discover_from_fit_both_functions_and_parameters():
    eq = discover_equations(FakeFit(), backend="library", n_samples=40, tolerance=0.0)
    np.testing.assert_allclose(eq.D(eq.D.u_range[0]), FakeFit().D(eq.D.u_range[0]), rtol=1e-3)
    model, init = eq.parameters()
    assert set(model) == {"D", "G"}
    assert {"D_0", "D_1", "G_0", "G_1"} <= set(init)
    assert model["D"].free_symbols - {U}
    changed = eq.with_params(D_0=init["D_0"] * 2)
    assert changed.parameters()[1]["D_0"] == pytest.approx(2 * init["D_0"])
    with pytest.raises(ValueError, match="Unknown parameter"):
        eq.with_params(Q_7=1.0)
    json.dumps(eq.to_dict())


def test_refit_hands_symbolic_model_to_fit_mechanistic(monkeypatch):
    eq = discover_equations(FakeFit(), backend="library", n_samples=40)
    calls = {}

    def fake_fit_mechanistic(field, model, *, init=None, **kw):
        calls.update(field=field, model=model, init=init, kw=kw)
        return types.SimpleNamespace(params={k: v * 1.5 for k, v in init.items()})

    import napari_binn

    pde = sys.modules.get("napari_binn.pde") or types.ModuleType("napari_binn.pde")
    mech = types.ModuleType("napari_binn.pde.mechanistic")
    mech.fit_mechanistic = fake_fit_mechanistic
    monkeypatch.setitem(sys.modules, "napari_binn.pde", pde)
    monkeypatch.setitem(sys.modules, "napari_binn.pde.mechanistic", mech)
    monkeypatch.setattr(napari_binn, "pde", pde, raising=False)
    monkeypatch.setattr(pde, "mechanistic", mech, raising=False)
    result = eq.refit("FIELD", max_iter=3)
    assert calls["field"] == "FIELD" and calls["kw"] == {"max_iter": 3, "bounds": eq.form_bounds()}
    assert set(calls["model"]) == {"D", "G"} and "D_0" in calls["init"]
    refitted = eq.with_params(result)
    assert refitted.parameters()[1]["G_0"] == pytest.approx(1.5 * eq.parameters()[1]["G_0"])


def test_refit_with_real_fit_mechanistic_recovers_growth_constants():
    pytest.importorskip("napari_binn.pde.mechanistic", reason="napari_binn.pde.mechanistic is not available")
    from napari_binn.field import DensityField

    t_h = np.linspace(0, 12, 5)
    logistic_u = 1.0 / (1 + 9.0 * np.exp(-0.3 * t_h))  # r = 0.3 /h, K = 1, spatially uniform
    u = np.broadcast_to(logistic_u[:, None, None], (5, 6, 6)).copy()
    field = DensityField(u=u, mask=np.ones((6, 6), bool), x_um=np.arange(6) * 20.0, y_um=np.arange(6) * 20.0,
                         t_h=t_h, units="fraction", K=1.0)
    ug = np.linspace(0.1, 0.9, 50)
    eq = discover_equations({"D": FunctionSamples(ug, np.full(50, 100.0), name="D"),
                             "G": FunctionSamples(ug, 0.25 * (1 - ug / 1.1), name="G")}, backend="library")
    fit = eq.refit(field, max_evals=60, intervals=None, fixed={"D_0": 100.0})
    refitted = eq.with_params(fit)
    np.testing.assert_allclose(refitted.G(ug), 0.3 * (1 - ug), rtol=0.02, atol=2e-3)


def test_a_refitted_library_form_keeps_the_signs_of_its_constants():
    """Data whose D grows with density (Porous-Fisher, D = 2000 u/K), the saturating form D0/(1 + b u) refitted
    from b ~ 0: unbounded, b turns negative (a D with a pole, growing with density: another form under the
    saturating name); bounded, b stays >= 0."""
    pytest.importorskip("napari_binn.pde.mechanistic", reason="napari_binn.pde.mechanistic is not available")
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("porous_fisher", {"D0": 2000.0, "m": 1.0, "r": 0.1, "K": 1700.0}, domain="scratch",
                              grid=(10, 12), dx_um=50.0, times_h=np.linspace(0, 24, 5), seed=0)
    ug = np.linspace(100.0, 1600.0, 60)
    eq = discover_equations({"D": FunctionSamples(ug, 1200.0 / (1 + 1e-5 * ug), name="D"),
                             "G": FunctionSamples(ug, 0.1 * (1 - ug / 1700.0), name="G")},
                            backend="library", forms_D=["saturating"], forms_G=["logistic"])
    eq = dataclasses.replace(eq, D=dataclasses.replace(eq.D, selected_index=len(eq.D.front)))  # the library row
    bounds = eq.form_bounds()
    assert eq.D.selected_row.form == "saturating"
    assert eq.G.selected_row.form == ""  # a front row: its constants are left free
    assert set(bounds) == {"D_0", "D_1"} and all(v in ((0.0, math.inf), (-math.inf, 0.0))
                                                           for v in bounds.values())
    b = next(n for n, v in eq.parameters()[1].items() if n.startswith("D") and abs(v) < 1)
    kw = dict(max_evals=40, intervals=None, fixed={n: v for n, v in eq.parameters()[1].items() if n.startswith("G")})
    free = eq.refit(field, bounds={b: (-math.inf, math.inf)}, **kw)
    kept = eq.refit(field, **kw)
    assert free.params[b] < 0 <= kept.params[b]


# -- bad input --------------------------------------------------------------------------------------------------


def test_too_few_samples():
    with pytest.raises(ValueError, match="at least"):
        discover_equations({"G": FunctionSamples(UG[:5], logistic(UG[:5]), name="G")}, backend="library")


def test_nan_targets_are_dropped_with_warning():
    y = logistic(UG).copy()
    y[::7] = np.nan
    with pytest.warns(RuntimeWarning, match="dropped"):
        eq = discover_equations({"G": FunctionSamples(UG, y, name="G")}, backend="library")
    np.testing.assert_allclose(eq.G(UG), logistic(UG), rtol=1e-4, atol=1e-6)
    assert any("dropped" in n for n in eq.G.notes)


def test_all_nan_targets_raise():
    with pytest.raises(ValueError, match="finite samples"), pytest.warns(RuntimeWarning):
        discover_equations({"G": FunctionSamples(UG, np.full(UG.size, np.nan), name="G")}, backend="library")


def test_unknown_operator_names_it():
    with pytest.raises(ValueError, match="'sinh'"):
        discover_equations({"G": FunctionSamples(UG, logistic(UG), name="G")}, operators=["+", "*", "sinh"])


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown backend"):
        discover_equations({"G": FunctionSamples(UG, logistic(UG), name="G")}, backend="eureqa")


def test_pysr_missing_says_how_to_install():
    try:
        import pysr  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'napari-binn\[pysr\]'"):
            discover_equations({"G": FunctionSamples(UG, logistic(UG), name="G")}, backend="pysr")
    else:
        pytest.skip("PySR is installed here; the missing-backend message cannot be exercised")


def test_pysr_backend_recovers_logistic():
    pytest.importorskip("pysr", reason="PySR not installed (pip install 'napari-binn[pysr]' and Julia >= 1.10)")
    import shutil

    if shutil.which("julia") is None:
        pytest.skip("no Julia runtime on PATH (PySR needs Julia >= 1.10)")
    eq = discover_equations({"G": FunctionSamples(UG, logistic(UG), name="G")}, backend="pysr",
                            backend_options=dict(niterations=5))
    np.testing.assert_allclose(eq.G(UG), logistic(UG), rtol=1e-3, atol=1e-5)


def test_cancel_returns_flagged_partial_result():
    token = CancelToken()
    token.cancel()
    from napari_binn.jobs import run_job

    eq = run_job(discover_equations_job({"G": FunctionSamples(UG, logistic(UG), name="G")}, backend="library",
                                        cancel=token))
    assert eq.metadata["cancelled"] and any("cancelled" in n for n in eq.G.notes)
    assert eq.G.sympy.is_Number  # only the constant baseline was available


def test_reselecting_by_accuracy_picks_lowest_loss(logistic_eq):
    acc = logistic_eq.select("accuracy")
    losses = [r.loss for r in acc.G.front]
    assert acc.G.selected_index == int(np.argmin(losses)) and acc.G.selection == "accuracy"
    with pytest.raises(ValueError, match="selection rule"):
        logistic_eq.select("nonsense")


def test_binn_curves_get_the_simplest_form_within_tolerance():
    """A network's curve with sub-percent wiggles must not be fitted by a long formula."""

    class FakeFit:
        units = {"u": "cells/mm²", "D": "µm²/h", "G": "1/h"}
        u_range = {"q05": 200.0, "q95": 1900.0, "min": 0.0, "max": 2000.0}
        u_hist = (np.ones(20), np.linspace(0, 2000, 21))

        def D(self, u):
            u = np.asarray(u, float)
            return 800.0 + 0.3 * u + 2.0 * np.sin(u / 90.0)  # 0.2% wiggle on a line

        def G(self, u):
            u = np.asarray(u, float)
            return 0.08 * (1 - u / 2000.0) + 2e-5 * np.cos(u / 70.0)

        def D_ensemble(self, u):
            return self.D(u)[None]

        def G_ensemble(self, u):
            return self.G(u)[None]

    eq = discover_equations(FakeFit(), backend="library")
    u = sp.Symbol("u", positive=True)
    for f in (eq.D, eq.G):  # both are straight lines within 1%: the selected forms must be too
        assert f.sympy.is_polynomial(u) and sp.degree(f.sympy, u) <= 1, f.table()
    assert np.allclose(eq.D(np.array([500.0, 1500.0])), [950.0, 1250.0], rtol=0.01)
    assert_json_round_trip(eq)


def test_huge_constants_do_not_break_canonicalisation():
    from napari_binn.symbolic.expression import canonicalize

    u = sp.Symbol("u", positive=True)
    huge = sp.Float("1e100000")  # beyond double range (int() of far larger ones exhausted memory in sr_bench)
    expr = huge * u + sp.Float(2.0) * sp.exp(sp.Float(1.0) * u)
    out = canonicalize(expr, simplify=False)
    assert huge in out.atoms(sp.Float)
    assert sp.exp(u) in out.atoms(sp.exp)


def test_refitted_constants_are_rounded_to_their_intervals():
    from types import SimpleNamespace

    from napari_binn.symbolic import Equations

    eq = Equations.from_forms(D=["700.0"], G=["0.075 - 3.5e-5*u"], u_range=(0.0, 2000.0))
    fit = SimpleNamespace(params={"D_0": 827.4361, "G_0": 0.08562718, "G_1": -4.356391e-05},
                          ci95={"D_0": (581.0, 1070.0), "G_0": (0.0856, 0.08565),
                                "G_1": (float("nan"), float("nan"))})
    out = Equations.with_refit(eq, fit)
    assert float(out.D.sympy) == 830.0  # +-125 supports 2 digits
    g = out.G.sympy
    consts = sorted(float(c) for c in g.atoms(sp.Float))
    # no interval: 4 digits; tight: more (a sympy Float of d digits holds about d digits' binary precision)
    assert consts == pytest.approx([-4.356e-05, 0.085627], rel=1e-4)
    # and they print with those digits only (830, not 830.000, which claimed digits the interval does not support)
    assert out.D.text == "8.3e+2" and out.G.text == "0.085627 - 4.356e-5*u"


def test_expressions_from_text_cannot_run_code():
    from napari_binn.symbolic.expression import ExpressionError, parse_expression

    assert str(parse_expression("0.5*u**2 - exp(-u)")) == str(parse_expression("0.5*u^2 - exp(-u)"))
    for evil in ("__import__('os').system('true')", "u.__class__", "open('x')", "lambda: 1", "u; 1", "_n0", "exp",
                 "", "u u", "2(u)", "D_0*u"):
        with pytest.raises(ExpressionError):
            parse_expression(evil)
    assert parse_expression("lambda*u + D_0", parameters=True).free_symbols == {
        U, sp.Symbol("lambda", real=True), sp.Symbol("D_0", real=True)}


def test_printed_text_reads_back_to_the_same_text():
    """precision=None keeps each number's written digits, so text napari-binn printed reads back unchanged."""
    from napari_binn.symbolic.expression import parse_expression

    for text in ("308.344", "-0.01633*exp(-9.306e-5*u)", "1512.", "1100.00", "1.235e+4*u + 1.235e+4",
                 "0.075 - 3.5e-5*u", "700.000000000000", "u**(3/2)", "sqrt(u)/(u + 1.0)", "2.5*u**2.5 - 1.0e-7"):
        expr = parse_expression(text, precision=None)
        assert sp.sstr(expr) == text
        assert sp.sstr(parse_expression(sp.sstr(expr), precision=None)) == text
        assert sp.latex(parse_expression(text, precision=None)) == sp.latex(expr)
    assert parse_expression("700.0").equals(sp.Float(700.0))  # 15 digits unless asked otherwise


def test_equation_text_for_people():
    from types import SimpleNamespace

    from napari_binn.symbolic.expression import equation_latex, equation_text, readable

    assert readable("2.5*u**2") == "2.5·u^2"
    assert readable("1512.*u + 1100.00 - 3.5e-05*u**2", 4) == "1512·u + 1100 - 3.5e-5·u^2"
    # a refitted constant of 2 supported digits prints as 8.4e+2: people read 840 (small powers of ten written out)
    assert readable("8.4e+2") == "840" and readable("1.39e+3 - 1.234e+1*u") == "1390 - 12.34·u"
    assert readable("1.0e+5 + 3.6e-5*u") == "1.0e+5 + 3.6e-5·u" and readable("D_1e+2") == "D_1e+2"
    f = SimpleNamespace(text="800.0*u**2", latex="800.0 u^{2}", units="")
    assert equation_text("D", f) == "D(u) = 800.0*u**2   [µm²/h]"
    assert equation_text("D", f, pretty=True) == "D(u) = 800.0·u^2   [µm²/h]"
    assert equation_latex("G", f) == "$G(u) = 800.0 u^{2}$   [$1/h$]"
