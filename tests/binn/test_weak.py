"""The weak-form term: minimised by the true rates, trained and logged."""

import numpy as np
import pytest
import torch

from napari_binn.binn import BinnConfig, fit_binn


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


def test_weak_term_is_trained_and_logged(binn_field, tiny):
    f = binn_field(n=20, frames=9)
    cfg = BinnConfig(steps=12, weak_weight=1.0, weak_half_boxes=3, weak_half_frames=2, **tiny)
    fit = fit_binn(f, cfg)
    assert any("weak" in rec for rec in fit.history[0])
    with pytest.raises(ValueError, match="weak_weight"):
        BinnConfig(weak_weight=-1.0)
