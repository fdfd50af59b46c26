"""The training engine: determinism, cancel, pause, the divergence guard, bad input, masks, options."""

import threading
import time

import numpy as np
import pytest
import torch

from napari_binn.binn import BinnConfig, fit_binn
from napari_binn.field import DensityField
from napari_binn.jobs import CancelToken


def test_same_seed_same_result(binn_field, tiny):
    f = binn_field()
    cfg = BinnConfig(steps=15, seed=3, **tiny)
    a, b = fit_binn(f, cfg), fit_binn(f, cfg)
    c = fit_binn(f, cfg.replace(seed=4))
    u = np.linspace(0, 1, 5)
    assert np.array_equal(a.D(u), b.D(u)) and np.array_equal(a.G(u), b.G(u))
    assert not np.array_equal(a.D(u), c.D(u))


def test_cancel_mid_run_returns_finite_best_model(binn_field, tiny):
    f = binn_field()
    token = CancelToken()

    def cb(ev):
        if ev.step >= 20:
            token.cancel()

    fit = fit_binn(f, BinnConfig(steps=10_000, **tiny), cancel=token, callback=cb)
    assert fit.metadata["cancelled"] is True
    assert fit.metadata["members"][0]["steps_done"] < 100
    u = np.linspace(0, 1, 5)
    assert np.all(np.isfinite(fit.D(u))) and np.all(np.isfinite(fit.G(u)))


def test_pause_and_resume(binn_field, tiny):
    f = binn_field()
    token = CancelToken()
    token.pause()
    timer = threading.Timer(0.6, token.resume)
    events = []
    timer.start()
    start = time.perf_counter()
    fit = fit_binn(f, BinnConfig(steps=10, **tiny), cancel=token, callback=events.append)
    assert time.perf_counter() - start >= 0.5
    assert any(e.data.get("paused") for e in events)
    assert not fit.metadata["cancelled"] and fit.metadata["members"][0]["steps_done"] == 10


def test_divergence_guard_restores_and_never_returns_nan(binn_field, tiny):
    f = binn_field()
    events = []
    fit = fit_binn(f, BinnConfig(steps=30, lr=1e5, lr_final=1e5, max_restarts=3, activation="silu", **tiny),
                   callback=events.append)
    div = [e for e in events if "divergence" in e.data]
    assert div and "diverged" in div[0].message
    for m in fit.members:
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert np.all(np.isfinite(fit.D(np.linspace(0, 1, 5))))


def test_bad_input(binn_field, tiny):
    f = binn_field()
    with pytest.raises(ValueError, match="at least 3 frames"):
        fit_binn(DensityField(f.u[:2], f.mask, f.x_um, f.y_um, f.t_h[:2]), BinnConfig(steps=2, **tiny))
    with pytest.raises(ValueError, match="no observed"):
        fit_binn(DensityField(np.full_like(f.u, np.nan), f.mask, f.x_um, f.y_um, f.t_h),
                 BinnConfig(steps=2, **tiny))
    for const in (0.0, 3.0):
        with pytest.raises(ValueError, match="nothing to learn"):
            fit_binn(DensityField(np.full_like(f.u, const), f.mask, f.x_um, f.y_um, f.t_h),
                     BinnConfig(steps=2, **tiny))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            fit_binn(f, BinnConfig(steps=2, **{**tiny, "device": "cuda"}))
        events = []
        fit = fit_binn(f, BinnConfig(steps=2, **{**tiny, "device": "auto"}), callback=events.append)
        assert fit.device == "cpu" and "no GPU" in fit.metadata["device_note"]
        assert "no GPU" in events[0].message


def test_nan_values_are_masked_out(binn_field, tiny):
    f = binn_field()
    u = f.u.copy()
    u[:, 2:4, 2:4] = np.nan
    g = DensityField(u, f.mask, f.x_um, f.y_um, f.t_h, units="fraction")
    fit = fit_binn(g, BinnConfig(steps=10, **tiny))
    assert fit.metadata["n_observed"] == np.isfinite(u).sum()
    assert np.all(np.isfinite(fit.D(np.linspace(0, 1, 5))))


def test_noflux_constraints_and_adaptive_options_run(binn_field, tiny):
    f = binn_field()
    mask = f.mask.copy()
    mask[:, :2] = False
    g = f.with_mask(mask)
    fit = fit_binn(g, BinnConfig(steps=12, noflux_weight=1.0, monotone_D=True, monotone_G=True,
                                 collocation="adaptive", adaptive_every=4, validation="frames",
                                 lbfgs_steps=20, residual="autograd", **tiny))
    terms = fit.history[0][-2]
    assert {"noflux", "constraint", "pde"} <= set(terms)


def test_members_trained_one_by_one_assemble_to_the_serial_fit(binn_field, tiny):
    """train_member + assemble_fit (what dask tasks run) give the fit a serial train_binn gives, in any order."""
    from napari_binn.binn import assemble_fit, train_member

    fld = binn_field()
    cfg = BinnConfig(steps=15, n_models=2, seed=3, weak_weight=0.1, **tiny)
    serial = fit_binn(fld, cfg)
    members = [train_member(fld, cfg, i) for i in (1, 0)]
    assert [m.seed for m in members] == [4, 3]
    fit = assemble_fit(fld, cfg, members)
    u = np.linspace(0.05, 0.6, 7)
    np.testing.assert_array_equal(fit.D_ensemble(u), serial.D_ensemble(u))
    np.testing.assert_array_equal(fit.u(100.0, 50.0, 3.0), serial.u(100.0, 50.0, 3.0))
    assert fit.metadata["seeds"] == serial.metadata["seeds"] == [3, 4] and not fit.metadata["cancelled"]
    assert fit.history == serial.history
    with pytest.raises(ValueError, match="outside the ensemble"):
        train_member(fld, cfg, 2)


def test_a_warmup_that_learned_the_noise_restores_its_best_state(binn_field, tiny, monkeypatch):
    """When the validation loss ends the warm-up more than warmup_restore times above its lowest, the state of
    that lowest point is restored before the PDE term starts (and said so); otherwise nothing changes."""
    from napari_binn.binn import train as train_mod

    real = train_mod._Member.val_loss
    scripted = {"values": []}

    def val_loss(self, warm):
        real(self, warm)  # the same work (and random draws) as without the script
        return scripted["values"].pop(0) if warm and scripted["values"] else 1.0

    monkeypatch.setattr(train_mod._Member, "val_loss", val_loss)
    f = binn_field()
    cfg = BinnConfig(steps=30, seed=2, **{**tiny, "warmup_steps": 20})  # warm-up validations at steps 5-20
    runs = {}
    for label, values, restore in (("rises", [1.0, 0.5, 0.8, 0.9], 1.1), ("off", [1.0, 0.5, 0.8, 0.9], 0.0),
                                   ("small rise", [1.0, 0.5, 0.52, 0.54], 1.1)):
        scripted["values"] = list(values)
        events = []
        fit = fit_binn(f, cfg.replace(warmup_restore=restore), callback=events.append)
        runs[label] = (fit, events)
    fit, events = runs["rises"]
    assert fit.metadata["members"][0]["warmup_restored"] == {"step": 10, "val": 0.5, "end_val": 0.9}
    assert any("learned the noise" in e.message and "step 10" in e.message for e in events)
    for label in ("off", "small rise"):
        other, other_events = runs[label]
        assert "warmup_restored" not in other.metadata["members"][0]
        assert not any("learned the noise" in e.message for e in other_events)
    u = np.linspace(0.05, 0.6, 5)
    # the restore changes the path; without it the run is the plain one
    assert not np.array_equal(fit.D(u), runs["off"][0].D(u))
    np.testing.assert_array_equal(runs["off"][0].D(u), runs["small rise"][0].D(u))


def test_a_surrogate_pulled_away_from_the_data_is_warned_about(binn_field, tiny, monkeypatch):
    """A member whose data loss ends far above its warm-up's lowest validation loss gets a warning in the fit's
    metadata; a healthy run gets none."""
    from napari_binn.binn import train as train_mod

    f = binn_field()
    cfg = BinnConfig(steps=30, seed=2, **{**tiny, "warmup_steps": 20})
    healthy = fit_binn(f, cfg)
    assert healthy.metadata["warnings"] == []
    assert healthy.metadata["members"][0]["warmup_best_val"] > 0
    real = train_mod._Member.val_loss
    # the warm-up's validation loss claims a fit far better than the data loss the run ends with
    monkeypatch.setattr(train_mod._Member, "val_loss",
                        lambda self, warm: real(self, warm) * (1e-3 if warm else 1.0))
    for restore in (1.1, 0.0):  # the warning does not depend on the warm-up's rollback
        fit = fit_binn(f, cfg.replace(warmup_restore=restore))
        (warning,) = fit.metadata["warnings"]
        assert warning.startswith("BINN model 1: the surrogate fits the data") and "times worse" in warning
