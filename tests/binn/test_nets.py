"""The networks: bounded D and G outputs and where they start."""

import numpy as np
import torch

from napari_binn.binn import BinnConfig, fit_binn


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


def test_log_scale_D_network_bounds_and_init(binn_field, tiny):
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
    f = binn_field()
    fit = fit_binn(f, BinnConfig(steps=1, **tiny) .replace(warmup_steps=0), lr=1e-12, lr_final=1e-12)
    assert np.allclose(fit.D(np.linspace(0, 0.5, 5)), 1250.0, rtol=0.3)
