"""BinnFit: the learned D(u), G(u), T(t) and u(x, y, t) in physical units, and saving/loading."""

import numpy as np
import pytest
import torch

from napari_binn.binn import BinnConfig, BinnFit, fit_binn


def test_shapes_bounds_and_snapshots(binn_field, tiny):
    f = binn_field()
    cfg = BinnConfig(steps=20, D_min=10.0, D_max=500.0, G_min=-0.1, G_max=0.2, n_models=2, **tiny)
    events = []
    fit = fit_binn(f, cfg, callback=events.append)
    u = np.linspace(0, 1, 7)
    assert fit.D(u).shape == (7,) and fit.G(u).shape == (7,)
    assert fit.D_ensemble(u).shape == (2, 7) and fit.G_ensemble(u).shape == (2, 7)
    assert np.all(fit.D(u) >= 10.0) and np.all(fit.D(u) <= 500.0)
    assert np.all(fit.G(u) >= -0.1) and np.all(fit.G(u) <= 0.2)
    assert np.all(fit.D_std(u) >= 0) and fit.D_std(u).max() > 0
    assert fit.u(f.x_um[None, :], f.y_um[:, None], 2.0).shape == (10, 10)
    assert np.all(fit.u(f.x_um, f.y_um, 0.0) >= 0)
    assert np.allclose(fit.T([0.0, 4.0]), 1.0)
    assert fit.u_range["min"] <= fit.u_range["q05"] < fit.u_range["q95"] <= fit.u_range["max"]
    assert fit.units["D"] == "µm²/h" and fit.units["G"] == "1/h"
    assert len(fit.history) == 2 and fit.history[0][-1]["step"] == 20
    snaps = [e.data["snapshot"] for e in events if "snapshot" in e.data]
    assert snaps and set(snaps[0]) == {"u_grid", "D", "G"}
    assert any(e.data.get("losses", {}).get("pde") is not None for e in events)
    # the torch modules agree with the numpy callables (as pde.simulate would call them)
    with torch.no_grad():
        d_t = fit.D_module(torch.as_tensor(u).reshape(-1, 1)).numpy().ravel()
    assert np.allclose(d_t, fit.D(u), rtol=1e-5)


def test_save_load_round_trip(tmp_path, binn_field, tiny):
    f = binn_field()
    fit = fit_binn(f, BinnConfig(steps=10, n_models=2, use_delay=True, **tiny))
    fit.save(tmp_path / "fit")
    blob = (tmp_path / "fit" / "binn_weights.safetensors").read_bytes()
    assert b"\x80\x04" not in blob[:16]  # not a pickle stream
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the weights file's header is read and closed at once
        warnings.simplefilter("always", ResourceWarning)
        again = BinnFit.load(tmp_path / "fit")
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    u = np.linspace(0, 1, 9)
    assert np.array_equal(fit.D_ensemble(u), again.D_ensemble(u))
    assert np.array_equal(fit.G(u), again.G(u))
    assert np.array_equal(fit.T([0.0, 3.0]), again.T([0.0, 3.0]))
    assert np.array_equal(fit.u(100.0, 50.0, 1.0), again.u(100.0, 50.0, 1.0))
    assert again.config == fit.config and again.u_range == fit.u_range
    with pytest.raises(ValueError, match="no BINN fit"):
        BinnFit.load(tmp_path)


def test_load_fit_saved_before_the_softplus_D_network(tmp_path, binn_field, tiny):
    import json

    fit = fit_binn(binn_field(), BinnConfig(steps=5, D_output="log", D_decades=5.0, **tiny))
    fit.save(tmp_path / "fit")
    meta_path = tmp_path / "fit" / "binn_fit.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["D_output"]  # as written by earlier versions
    meta_path.write_text(json.dumps(meta))
    again = BinnFit.load(tmp_path / "fit")
    u = np.linspace(0, 1, 9)
    assert again.config.D_output == "log"
    assert np.array_equal(fit.D(u), again.D(u))


def test_bands_and_determined_range(binn_field, tiny):
    f = binn_field()
    fit = fit_binn(f, BinnConfig(steps=10, n_models=2, **tiny))
    u = fit.u_grid(31)
    for key in ("D", "G"):
        sd = fit.band_sd(key, u)
        ens = fit.D_ensemble(u) if key == "D" else fit.G_ensemble(u)
        np.testing.assert_allclose(sd, ens.std(0, ddof=1), rtol=1e-12, atol=1e-300)
        lo, hi = fit.determined_range(key, tolerance=1e9)  # everything is determined at a huge tolerance
        assert (lo, hi) == pytest.approx(fit.density_range())
        assert fit.determined_range(key, tolerance=1e-12) is None  # nothing at a vanishing one
    # a refinement's band, when there is one, is preferred
    fit.metadata["refine"] = {"u_nodes": [0.0, 1.0], "D_sd": [0.0, 2.0]}  # the keys refine_binn writes
    np.testing.assert_allclose(fit.band_sd("D", np.array([0.25, 0.5])), [0.5, 1.0])
    assert fit.band_sd("G", u) is not None  # no G band in the refinement: the ensemble's
    # the symbolic stage keeps weighting by the ensemble spread (as the discovery benchmark was measured)
    from napari_binn.symbolic.samples import samples_from_fit

    s = samples_from_fit(fit)["D"]
    np.testing.assert_allclose(s.sigma, fit.D_ensemble(s.u).std(0, ddof=1), rtol=1e-12)
    with pytest.raises(ValueError, match="'D' or 'G'"):
        fit.band_sd("T", u)
    with pytest.raises(ValueError, match="tolerance"):
        fit.determined_range("D", tolerance=0)
    single = fit_binn(f, BinnConfig(steps=5, n_models=1, **tiny))
    assert single.band_sd("D", u) is None  # no spread is known
    assert single.determined_range("D") == pytest.approx(single.density_range())


def test_density_range_starts_at_zero(binn_field, tiny):
    """Negative observed values (noise around empty space) are kept in ``u_range`` but not shown as densities."""
    fit = fit_binn(binn_field(), BinnConfig(steps=5, n_models=1, **tiny))
    q95 = fit.u_range["q95"]
    fit.u_range = {**fit.u_range, "q05": -0.2, "min": -0.5}
    assert fit.density_range() == (0.0, q95)
    assert fit.density_range(central=False) == (0.0, fit.u_range["max"])
    assert fit.density_range(from_zero=False) == (-0.2, q95)
    assert fit.u_grid(5)[0] == 0.0 and fit.u_grid(5, from_zero=False)[0] == -0.2
    lo, hi = fit.determined_range("D")  # a single model: the data range alone, from 0
    assert lo == 0.0 and hi == pytest.approx(q95)
    # a density scale that is all below 0 (e.g. an offset intensity) keeps its range rather than emptying it
    fit.u_range = {**fit.u_range, "q05": -3.0, "q95": -1.0}
    assert fit.density_range() == (-3.0, -1.0)
