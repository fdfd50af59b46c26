"""Tests of the BINN engine (tiny networks, few steps, ~10x10 grids)."""

import threading
import time

import numpy as np
import pytest
import torch

from napari_binn.binn import BinnConfig, BinnFit, fit_binn, residual_autograd, residual_fast
from napari_binn.binn.nets import BinnModel
from napari_binn.field import DensityField
from napari_binn.jobs import CancelToken

TINY = dict(hidden=(16, 16), rate_hidden=(8,), n_collocation=128, batch_size=128, warmup_steps=5,
            val_every=5, log_every=5, snapshot_every=10, device="cpu")


def make_field(n=10, frames=5, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(n) * 50.0
    t = np.arange(frames) * 2.0
    X = x[None, None, :]
    front = 150.0 + 20.0 * t[:, None, None]
    u = 1.0 / (1.0 + np.exp((X - front) / 60.0)) * (0.5 + 0.05 * t[:, None, None])
    u = np.broadcast_to(u, (frames, n, n)) + 0.01 * rng.standard_normal((frames, n, n))
    return DensityField(u, np.ones((n, n), bool), x, x.copy(), t, units="fraction", K=None)


def test_shapes_bounds_and_snapshots():
    f = make_field()
    cfg = BinnConfig(steps=20, D_min=10.0, D_max=500.0, G_min=-0.1, G_max=0.2, n_models=2, **TINY)
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


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_fast_residual_agrees_with_autograd(activation):
    torch.manual_seed(0)
    m = BinnModel((24, 24, 24), activation, (8, 8), (0.0, 2.0), (-5.0, 5.0), True).double()
    xyt = torch.rand(300, 3, dtype=torch.float64) * 2 - 1
    r_fast, u_fast = residual_fast(m, xyt)
    r_auto, u_auto = residual_autograd(m, xyt)
    assert torch.allclose(u_fast, u_auto)
    assert float((r_fast - r_auto).norm() / r_auto.norm()) < 1e-5
    # and their parameter gradients agree too
    g_fast = torch.autograd.grad((r_fast ** 2).mean(), list(m.parameters()), allow_unused=True)
    r_auto, _ = residual_autograd(m, xyt)
    g_auto = torch.autograd.grad((r_auto ** 2).mean(), list(m.parameters()), allow_unused=True)
    for a, b in zip(g_fast, g_auto):
        if a is not None and b is not None:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)


def test_same_seed_same_result():
    f = make_field()
    cfg = BinnConfig(steps=15, seed=3, **TINY)
    a, b = fit_binn(f, cfg), fit_binn(f, cfg)
    c = fit_binn(f, cfg.replace(seed=4))
    u = np.linspace(0, 1, 5)
    assert np.array_equal(a.D(u), b.D(u)) and np.array_equal(a.G(u), b.G(u))
    assert not np.array_equal(a.D(u), c.D(u))


def test_cancel_mid_run_returns_finite_best_model():
    f = make_field()
    token = CancelToken()

    def cb(ev):
        if ev.step >= 20:
            token.cancel()

    fit = fit_binn(f, BinnConfig(steps=10_000, **TINY), cancel=token, callback=cb)
    assert fit.metadata["cancelled"] is True
    assert fit.metadata["members"][0]["steps_done"] < 100
    u = np.linspace(0, 1, 5)
    assert np.all(np.isfinite(fit.D(u))) and np.all(np.isfinite(fit.G(u)))


def test_pause_and_resume():
    f = make_field()
    token = CancelToken()
    token.pause()
    timer = threading.Timer(0.6, token.resume)
    events = []
    timer.start()
    start = time.perf_counter()
    fit = fit_binn(f, BinnConfig(steps=10, **TINY), cancel=token, callback=events.append)
    assert time.perf_counter() - start >= 0.5
    assert any(e.data.get("paused") for e in events)
    assert not fit.metadata["cancelled"] and fit.metadata["members"][0]["steps_done"] == 10


def test_divergence_guard_restores_and_never_returns_nan():
    f = make_field()
    events = []
    fit = fit_binn(f, BinnConfig(steps=30, lr=1e5, lr_final=1e5, max_restarts=3, activation="silu", **TINY),
                   callback=events.append)
    div = [e for e in events if "divergence" in e.data]
    assert div and "diverged" in div[0].message
    for m in fit.members:
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert np.all(np.isfinite(fit.D(np.linspace(0, 1, 5))))


def test_save_load_round_trip(tmp_path):
    f = make_field()
    fit = fit_binn(f, BinnConfig(steps=10, n_models=2, use_delay=True, **TINY))
    fit.save(tmp_path / "fit")
    blob = (tmp_path / "fit" / "binn_weights.safetensors").read_bytes()
    assert b"\x80\x04" not in blob[:16]  # not a pickle stream
    again = BinnFit.load(tmp_path / "fit")
    u = np.linspace(0, 1, 9)
    assert np.array_equal(fit.D_ensemble(u), again.D_ensemble(u))
    assert np.array_equal(fit.G(u), again.G(u))
    assert np.array_equal(fit.T([0.0, 3.0]), again.T([0.0, 3.0]))
    assert np.array_equal(fit.u(100.0, 50.0, 1.0), again.u(100.0, 50.0, 1.0))
    assert again.config == fit.config and again.u_range == fit.u_range
    with pytest.raises(ValueError, match="no BINN fit"):
        BinnFit.load(tmp_path)


def test_load_fit_saved_before_the_softplus_D_network(tmp_path):
    import json

    fit = fit_binn(make_field(), BinnConfig(steps=5, D_output="log", D_decades=5.0, **TINY))
    fit.save(tmp_path / "fit")
    meta_path = tmp_path / "fit" / "binn_fit.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["D_output"]  # as written by earlier versions
    meta_path.write_text(json.dumps(meta))
    again = BinnFit.load(tmp_path / "fit")
    u = np.linspace(0, 1, 9)
    assert again.config.D_output == "log"
    assert np.array_equal(fit.D(u), again.D(u))


def test_config_round_trip_and_validation():
    cfg = BinnConfig(steps=5, hidden=(8, 8), D_max=100.0)
    assert BinnConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        BinnConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="D_min"):
        BinnConfig(D_min=10.0, D_max=1.0)
    with pytest.raises(ValueError, match="steps"):
        BinnConfig(steps=0)
    with pytest.raises(ValueError, match="device"):
        BinnConfig(device="tpu")


def test_bad_input():
    f = make_field()
    with pytest.raises(ValueError, match="at least 3 frames"):
        fit_binn(DensityField(f.u[:2], f.mask, f.x_um, f.y_um, f.t_h[:2]), BinnConfig(steps=2, **TINY))
    with pytest.raises(ValueError, match="no observed"):
        fit_binn(DensityField(np.full_like(f.u, np.nan), f.mask, f.x_um, f.y_um, f.t_h),
                 BinnConfig(steps=2, **TINY))
    for const in (0.0, 3.0):
        with pytest.raises(ValueError, match="nothing to learn"):
            fit_binn(DensityField(np.full_like(f.u, const), f.mask, f.x_um, f.y_um, f.t_h),
                     BinnConfig(steps=2, **TINY))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            fit_binn(f, BinnConfig(steps=2, **{**TINY, "device": "cuda"}))
        events = []
        fit = fit_binn(f, BinnConfig(steps=2, **{**TINY, "device": "auto"}), callback=events.append)
        assert fit.device == "cpu" and "no GPU" in fit.metadata["device_note"]
        assert "no GPU" in events[0].message


def test_nan_values_are_masked_out():
    f = make_field()
    u = f.u.copy()
    u[:, 2:4, 2:4] = np.nan
    g = DensityField(u, f.mask, f.x_um, f.y_um, f.t_h, units="fraction")
    fit = fit_binn(g, BinnConfig(steps=10, **TINY))
    assert fit.metadata["n_observed"] == np.isfinite(u).sum()
    assert np.all(np.isfinite(fit.D(np.linspace(0, 1, 5))))


def test_noflux_constraints_and_adaptive_options_run():
    f = make_field()
    mask = f.mask.copy()
    mask[:, :2] = False
    g = f.with_mask(mask)
    fit = fit_binn(g, BinnConfig(steps=12, noflux_weight=1.0, monotone_D=True, monotone_G=True,
                                 collocation="adaptive", adaptive_every=4, validation="frames",
                                 lbfgs_steps=20, residual="autograd", **TINY))
    terms = fit.history[0][-2]
    assert {"noflux", "constraint", "pde"} <= set(terms)


def test_softplus_D_network_bounds_init_and_affine_output():
    from napari_binn.binn.nets import BoundedNet

    torch.manual_seed(0)
    net = BoundedNet(0.1, 100.0, hidden=(8, 8), init_fraction=0.004, unit=0.05)
    u = torch.linspace(0, 1, 11)
    with torch.no_grad():
        d = net(u)
        assert torch.allclose(d, torch.full_like(d, 0.1 + 0.004 * 99.9), rtol=0.05)  # starts at the given fraction
        net.layers[-1].bias.fill_(-60.0)
        assert float(net(u).min()) >= 0.1
        net.layers[-1].bias.fill_(1e4)
        assert float(net(u).max()) <= 100.0
        # an output layer affine in the last hidden layer, whose units are near-linear here: D nearly affine in u
        for lin in net.layers[:-1]:
            lin.weight.zero_()
            lin.bias.zero_()
        net.layers[0].weight.fill_(0.01)
        net.layers[1].weight.fill_(0.0)
        net.layers[1].weight[:, 0] = 1.0
        net.layers[-1].weight.fill_(0.0)
        net.layers[-1].weight[0, :] = 1000.0  # z = 1000 tanh(0.01 u) + 4, about 4 + 10 u
        net.layers[-1].bias.fill_(4.0)
        d = net(u).numpy()
        assert np.allclose(np.diff(d, 2), 0.0, atol=1e-3 * d.max())
    state = net.state_dict()
    assert "unit" in state  # a saved fit rebuilds the same scale


def test_log_scale_D_network_bounds_and_init():
    from napari_binn.binn.nets import BoundedNet

    torch.manual_seed(0)
    net = BoundedNet(0.0, 2.0, hidden=(8, 8), init_fraction=1e-3, decades=5.0)
    u = torch.linspace(0, 1, 11)
    with torch.no_grad():
        d = net(u)
        # starts near 1e-3 of the range, not mid-range
        assert torch.allclose(d, torch.full_like(d, 2e-3), rtol=0.3)
        net.layers[-1].bias.fill_(-50.0)
        assert float(net(u).min()) >= 2.0 * 10 ** -5.0 * 0.999
        net.layers[-1].bias.fill_(50.0)
        assert float(net(u).max()) <= 2.0 + 1e-6
    # the fit starts D at (box size)^2 / (frame interval) = 50^2 / 2 µm²/h
    f = make_field()
    fit = fit_binn(f, BinnConfig(steps=1, **TINY) .replace(warmup_steps=0), lr=1e-12, lr_final=1e-12)
    assert np.allclose(fit.D(np.linspace(0, 0.5, 5)), 1250.0, rtol=0.3)


def test_weak_form_is_minimised_by_the_true_rates():
    """The weak (integral) form of Fisher-KPP on its own noise-free solution: the window residual is smallest
    near the true D and r and grows when either is 40% off; windows leave the ROI's edge alone."""
    import types

    from napari_binn.binn.scaling import Scales
    from napari_binn.binn.weak import build_weak_form, weak_loss
    from napari_binn.synthetic.models import make_synthetic

    field, _ = make_synthetic("fisher_kpp", {"D": 700.0, "r": 0.15, "K": 2000.0}, domain="scratch", grid=(20, 24),
                              dx_um=50.0, times_h=np.linspace(0, 24, 11), seed=0)
    sc = Scales.from_field(field, 2000.0)
    xh, yh, th = (sc.xyt(field.x_um, 0, 0)[:, 0], sc.xyt(0, field.y_um, 0)[:, 1], sc.xyt(0, 0, field.t_h)[:, 2])
    wf = build_weak_form(field.u / 2000.0, field.mask, xh, yh, th, half_boxes=6, half_frames=3,
                         device=torch.device("cpu"), dtype=torch.float64)
    assert wf is not None and wf.n_windows >= 4 and wf.A.shape[1:] == (7, 257)
    small = np.zeros_like(field.mask)
    small[:5, :5] = True  # a 5 x 5 ROI holds no 13 x 13 window
    assert build_weak_form(field.u / 2000.0, small, xh, yh, th, half_boxes=6, half_frames=3,
                           device=torch.device("cpu"), dtype=torch.float64) is None

    def loss(fD, fr):
        m = types.SimpleNamespace(dnet=lambda u: torch.full_like(u, fD * 700.0 / sc.D_unit),
                                  gnet=lambda u: fr * 0.15 / sc.G_unit * (1 - u), delay=lambda t: torch.ones_like(t))
        return float(weak_loss(m, wf, 10**6, torch.Generator()))

    best = loss(1.0, 1.0)
    assert best < 0.05
    for fD, fr in ((0.6, 1.0), (1.4, 1.0), (1.0, 0.6), (1.0, 1.4)):
        assert loss(fD, fr) > 2 * best


def test_weak_term_is_trained_and_logged():
    f = make_field(n=20, frames=9)
    cfg = BinnConfig(steps=12, weak_weight=1.0, weak_half_boxes=3, weak_half_frames=2, **TINY)
    fit = fit_binn(f, cfg)
    assert any("weak" in rec for rec in fit.history[0])
    with pytest.raises(ValueError, match="weak_weight"):
        BinnConfig(weak_weight=-1.0)


def test_with_steps_keeps_the_shares_of_the_phases():
    cfg = BinnConfig(steps=18000, warmup_steps=16000, rates_only_steps=900)
    short = cfg.with_steps(2000)
    assert (short.steps, short.warmup_steps, short.rates_only_steps) == (2000, 1778, 100)
    assert cfg.with_steps(18000) == cfg
    tiny = BinnConfig(steps=10, warmup_steps=10).with_steps(1)
    assert (tiny.steps, tiny.warmup_steps) == (1, 0)  # the PDE term always gets a step
    with pytest.raises(ValueError, match="steps"):
        cfg.with_steps(0)
