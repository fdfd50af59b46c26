"""Ground-truth generator: models, domains, noise models and the Truth record."""

import numpy as np
import pytest

from napari_binn.field import DensityField
from napari_binn.synthetic.models import DEFAULT_PARAMS, MODELS, make_synthetic

SMALL = dict(grid=(24, 24), dx_um=50.0, times_h=np.linspace(0, 48, 5))


@pytest.mark.parametrize("model", [m for m in MODELS if m not in ("custom", "diffusion")])  # diffusion: no growth
def test_models_spread_and_grow(model):
    fld, truth = make_synthetic(model, domain="disc", **SMALL)
    assert isinstance(fld, DensityField) and fld.shape == (5, 24, 24)
    assert fld.units == "cells/mm²" and fld.K == DEFAULT_PARAMS[model]["K"]
    np.testing.assert_allclose(fld.u, truth.u_clean, equal_nan=True)  # no noise by default
    mass = np.nansum(truth.u_clean, axis=(1, 2))
    assert mass[-1] > 1.2 * mass[0]  # growth
    occupied = (truth.u_clean > 0.1 * fld.K).sum(axis=(1, 2))
    assert occupied[-1] > occupied[0]  # spreading
    assert np.isnan(fld.u[:, ~fld.mask]).all()
    assert model.split("_")[0].lower()[:4] in truth.describe().lower()
    assert "µm²/h" in truth.describe()


def test_truth_functions_match_parameters():
    _, truth = make_synthetic("porous_fisher", {"D0": 1000.0, "m": 2.0, "r": 0.2}, K=1500.0, **SMALL)
    u = np.array([0.0, 750.0, 1500.0])
    np.testing.assert_allclose(truth.D(u), 1000 * (u / 1500) ** 2)
    np.testing.assert_allclose(truth.G(u), 0.2 * (1 - u / 1500))
    np.testing.assert_allclose(truth.T(np.array([0.0, 5.0])), 1.0)
    _, allee = make_synthetic("allee", {"A": 0.3}, **SMALL)
    K, r = allee.params["K"], allee.params["r"]
    np.testing.assert_allclose(allee.G(np.array([0.3 * K, K])), 0.0, atol=1e-12)
    assert allee.G(np.array([0.1 * K]))[0] < 0 < allee.G(np.array([0.6 * K]))[0] < r


def test_fisher_kpp_truth_satisfies_pde_residual():
    fld, truth = make_synthetic("fisher_kpp", domain="scratch", grid=(8, 40), dx_um=25.0,
                                times_h=np.linspace(0, 10, 41))
    u = truth.u_clean[:, 4]  # uniform in y on a scratch
    D, r, K = truth.params["D"], truth.params["r"], truth.params["K"]
    dt = 0.25
    ut = (u[2:] - u[:-2]) / (2 * dt)
    uxx = (u[1:-1, 2:] - 2 * u[1:-1, 1:-1] + u[1:-1, :-2]) / 25.0**2
    residual = ut[:, 1:-1] - (D * uxx + r * u[1:-1, 1:-1] * (1 - u[1:-1, 1:-1] / K))
    late = slice(8, None)  # skip the first 2 h, where the sharp initial edge makes time differences poor
    assert np.abs(residual[late]).max() < 0.01 * np.abs(ut[late]).max()


@pytest.mark.parametrize("domain", ["scratch", "disc", "triangle", "islands"])
def test_domains(domain):
    fld, truth = make_synthetic("fisher_kpp", domain=domain, **SMALL)
    u0 = truth.u_clean[0]
    assert fld.mask.any() and np.nanmax(u0) > 0.5 * fld.K
    if domain in ("disc", "triangle"):
        assert not fld.mask.all() and (u0[fld.mask] < 0.05 * fld.K).sum() > 0.3 * fld.mask.sum()
    if domain == "scratch":
        assert u0[:, 12].max() < 0.01 * fld.K and u0[:, 0].min() > 0.5 * fld.K


def test_islands_are_seeded():
    a, _ = make_synthetic("fisher_kpp", domain="islands", seed=1, **SMALL)
    b, _ = make_synthetic("fisher_kpp", domain="islands", seed=1, **SMALL)
    c, _ = make_synthetic("fisher_kpp", domain="islands", seed=2, **SMALL)
    np.testing.assert_array_equal(a.u, b.u)
    assert not np.allclose(a.u[0], c.u[0])


def test_mask_domain():
    mask = np.zeros((20, 30), bool)
    mask[3:17, 5:28] = True
    fld, truth = make_synthetic("fisher_kpp", domain=mask, times_h=[0, 12])
    assert fld.shape == (2, 20, 30)
    np.testing.assert_array_equal(fld.mask, mask)
    assert np.isnan(truth.u_clean[:, ~mask]).all()


@pytest.mark.parametrize("noise_model", ["gaussian", "proportional"])
def test_gaussian_and_proportional_noise(noise_model):
    fld, truth = make_synthetic("fisher_kpp", domain="scratch", noise=0.05, noise_model=noise_model, **SMALL)
    resid = (fld.u - truth.u_clean)[fld.observed]
    if noise_model == "gaussian":
        assert np.std(resid) == pytest.approx(0.05 * np.nanmax(truth.u_clean), rel=0.05)
    else:
        big = truth.u_clean[fld.observed] > 0.5 * fld.K
        rel = resid[big] / truth.u_clean[fld.observed][big]
        assert np.std(rel) == pytest.approx(0.05, rel=0.05)
        assert np.all(np.abs(resid) <= 7 * 0.05 * truth.u_clean[fld.observed])
    assert abs(np.mean(resid)) < 0.01 * np.nanmax(truth.u_clean)
    again, _ = make_synthetic("fisher_kpp", domain="scratch", noise=0.05, noise_model=noise_model, **SMALL)
    np.testing.assert_array_equal(again.u, fld.u)


def test_poisson_counts():
    fld, truth = make_synthetic("fisher_kpp", domain="scratch", noise_model="poisson", **SMALL)
    area = (50.0 / 1000) ** 2
    counts = fld.u[fld.observed] * area
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    expected = truth.u_clean[fld.observed] * area
    assert np.mean(counts) == pytest.approx(np.mean(expected), rel=0.02)
    big = expected > 3
    assert np.var(counts[big] - expected[big]) == pytest.approx(np.mean(expected[big]), rel=0.1)


def test_custom_model_with_sympy_and_time_factor():
    sympy = pytest.importorskip("sympy")
    u, t = sympy.symbols("u t")
    params = {"D": 400 + 200 * u / 2000, "G": 0.1 * (1 - u / 2000), "T": 1 - sympy.exp(-t / 5)}
    fld, truth = make_synthetic("custom", params, **SMALL)
    np.testing.assert_allclose(truth.D(np.array([0.0, 2000.0])), [400.0, 600.0])
    np.testing.assert_allclose(truth.T(np.array([0.0])), 0.0, atol=1e-12)
    assert "custom" in truth.describe() and "T(t)" in truth.describe()
    still, _ = make_synthetic("fisher_kpp", {"T": 0.0}, **SMALL)
    np.testing.assert_allclose(still.u[-1], still.u[0], equal_nan=True)  # T = 0 freezes the field


def test_bad_arguments():
    with pytest.raises(ValueError, match="model"):
        make_synthetic("kpp")
    with pytest.raises(ValueError, match="unknown parameter"):
        make_synthetic("fisher_kpp", {"D0": 3.0})
    with pytest.raises(ValueError, match="domain"):
        make_synthetic("fisher_kpp", domain="square")
    with pytest.raises(ValueError, match="noise_model"):
        make_synthetic("fisher_kpp", noise_model="salt")
    with pytest.raises(ValueError, match="custom"):
        make_synthetic("custom", {"D": 3.0})


NEW_MODELS = ["contact_inhibition", "gompertz", "diffusion"]


@pytest.mark.parametrize("model", NEW_MODELS)
def test_new_models_shapes_and_truth_records(model):
    fld, truth = make_synthetic(model, domain="disc", **SMALL)
    assert fld.shape == (5, 24, 24) and truth.describe()
    D, G = truth.model_functions()
    u = np.array([100.0, 1000.0, 1900.0])
    p = truth.params
    if model == "contact_inhibition":
        expected = ({"D": "contact_inhibition", "G": "logistic"}, p["D0"] / (1 + u / p["K"]), p["r"] * (1 - u / p["K"]))
    elif model == "gompertz":
        expected = ({"D": "constant", "G": "gompertz"}, np.full(3, p["D"]), p["r"] * np.log(p["K"] / u))
    else:
        expected = ({"D": "constant", "G": "none"}, np.full(3, p["D"]), np.zeros(3))
    assert truth.forms == expected[0]
    np.testing.assert_allclose(D(u), expected[1])
    np.testing.assert_allclose(G(u), expected[2])
    assert truth.constants == {k: float(v) for k, v in DEFAULT_PARAMS[model].items()}
    d_expr, g_expr = truth.expressions()
    sympy = pytest.importorskip("sympy")
    us = sympy.Symbol("u")
    np.testing.assert_allclose(sympy.lambdify(us, d_expr)(u) * np.ones(3), expected[1])
    np.testing.assert_allclose(sympy.lambdify(us, g_expr)(u) * np.ones(3), expected[2])


def test_truth_forms_of_existing_models():
    assert make_synthetic("fisher_kpp", **SMALL)[1].forms == {"D": "constant", "G": "logistic"}
    assert make_synthetic("porous_fisher", **SMALL)[1].forms == {"D": "linear", "G": "logistic"}
    _, power = make_synthetic("porous_fisher", {"m": 2.0}, **SMALL)
    assert power.forms == {"D": "power", "G": "logistic"} and power.constants["m"] == 2.0
    assert make_synthetic("allee", **SMALL)[1].forms["G"] == "allee"


def test_gompertz_is_finite_at_zero_and_grows():
    _, truth = make_synthetic("gompertz", domain="scratch", **SMALL)
    g = truth.G(np.array([0.0, -5.0, truth.params["K"]]))
    assert np.all(np.isfinite(g)) and g[0] > 0 and g[2] == pytest.approx(0.0, abs=1e-12)
    mass = np.nansum(truth.u_clean, axis=(1, 2))
    assert mass[-1] > 1.2 * mass[0]


def test_diffusion_conserves_mass_on_a_closed_domain():
    fld, truth = make_synthetic("diffusion", domain="wound", **SMALL)
    mass = np.nansum(truth.u_clean, axis=(1, 2))
    np.testing.assert_allclose(mass, mass[0], rtol=1e-4)
    u = truth.u_clean
    centre = u[:, 12, 12]
    assert centre[0] < 0.05 * fld.K < centre[-1]  # the wound fills by spreading alone


def test_allee_growth_negative_at_low_density():
    _, truth = make_synthetic("allee", **SMALL)
    K, A = truth.params["K"], truth.params["A"]
    assert truth.G(np.array([0.5 * A * K]))[0] < 0 < truth.G(np.array([(1 + A) / 2 * K]))[0]


@pytest.mark.parametrize("domain", ["wound", "polygon"])
def test_new_domains(domain):
    fld, truth = make_synthetic("fisher_kpp", domain=domain, grid=(30, 30), times_h=[0, 6], seed=4)
    u0 = truth.u_clean[0]
    assert 0.3 * fld.mask.size < fld.mask.sum() < fld.mask.size
    assert np.nanmax(u0) == pytest.approx(0.8 * fld.K, rel=0.02)
    assert (u0[fld.mask] < 0.05 * fld.K).sum() > 0.08 * fld.mask.sum()  # room to spread
    if domain == "wound":
        assert u0[15, 15] < 0.01 * fld.K and fld.mask[15, 15] and not fld.mask[0, 0]
    else:
        again, _ = make_synthetic("fisher_kpp", domain=domain, grid=(30, 30), times_h=[0, 6], seed=4)
        other, _ = make_synthetic("fisher_kpp", domain=domain, grid=(30, 30), times_h=[0, 6], seed=5)
        np.testing.assert_array_equal(again.mask, fld.mask)
        assert not np.array_equal(other.mask, fld.mask)


def test_u0_fraction_and_gaussian_k_noise():
    fld, truth = make_synthetic("fisher_kpp", domain="scratch", u0_fraction=0.3, noise=0.05,
                                noise_model="gaussian_k", **SMALL)
    assert np.nanmax(truth.u_clean[0]) == pytest.approx(0.3 * fld.K, rel=0.01)
    resid = (fld.u - truth.u_clean)[fld.observed]
    assert np.std(resid) == pytest.approx(0.05 * fld.K, rel=0.05)
    default, _ = make_synthetic("fisher_kpp", domain="scratch", **SMALL)
    same, _ = make_synthetic("fisher_kpp", domain="scratch", u0_fraction=0.6, **SMALL)
    np.testing.assert_array_equal(default.u, same.u)
    with pytest.raises(ValueError, match="u0_fraction"):
        make_synthetic("fisher_kpp", u0_fraction=0.0, **SMALL)
