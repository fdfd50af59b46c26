"""The PDE residual: the fast forward-Laplacian form agrees with autograd."""

import pytest
import torch

from napari_binn.binn import residual_autograd, residual_fast
from napari_binn.binn.nets import BinnModel


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
