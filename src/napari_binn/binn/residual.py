"""PDE residual r = u_t - T(t) [div(D(u) grad u) + G(u) u] of a :class:`BinnModel`, in scaled units.

Two ways to get the same number:

* :func:`residual_autograd` — the straightforward one: nested autograd through the surrogate for grad u and
  then for the divergence of the flux D(u) grad u;
* :func:`residual_fast` (default) — one forward-Laplacian pass of the surrogate gives u, grad u, u_t and lap u,
  and div(D(u) grad u) = D(u) lap u + D'(u) |grad u|², with D'(u) from autograd through the small D-network only.
"""

from __future__ import annotations

import torch

from .nets import BinnModel

__all__ = ["residual_fast", "residual_autograd", "RESIDUALS"]

RESIDUALS = ("fast", "autograd")


def residual_fast(model: BinnModel, xyt: torch.Tensor, *, detach_u: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual at (N, 3) scaled points via the forward Laplacian. Returns (residual (N,), û (N,)).

    ``detach_u``: treat the surrogate's u and derivatives as constants (gradients reach only D, G and T).
    """
    if detach_u:
        with torch.no_grad():
            d = model.unet.forward_laplacian(xyt)
    else:
        d = model.unet.forward_laplacian(xyt)
    u = d["u"]
    need_graph = torch.is_grad_enabled() and (u.requires_grad or detach_u)
    with torch.enable_grad():
        u_in = u if u.requires_grad else u.detach().requires_grad_(True)
        D = model.dnet(u_in)
        (dD,) = torch.autograd.grad(D.sum(), u_in, create_graph=need_graph)
    div = D * d["lap"] + dD * (d["u_x"] ** 2 + d["u_y"] ** 2)
    rhs = div + model.gnet(u) * u
    return d["u_t"] - model.delay(xyt[:, 2]) * rhs, u


def residual_autograd(model: BinnModel, xyt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual at (N, 3) scaled points via nested autograd. Returns (residual (N,), û (N,))."""
    with torch.enable_grad():
        pts = xyt if xyt.requires_grad else xyt.detach().requires_grad_(True)
        u = model.unet(pts)
        (grad,) = torch.autograd.grad(u.sum(), pts, create_graph=True)
        D = model.dnet(u)
        fx = D * grad[:, 0]
        fy = D * grad[:, 1]
        (gfx,) = torch.autograd.grad(fx.sum(), pts, create_graph=True)
        (gfy,) = torch.autograd.grad(fy.sum(), pts, create_graph=True)
        div = gfx[:, 0] + gfy[:, 1]
        r = grad[:, 2] - model.delay(pts[:, 2]) * (div + model.gnet(u) * u)
    return r, u
