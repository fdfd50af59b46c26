"""Networks of a BINN, in scaled units.

All networks work on dimensionless quantities (see :mod:`napari_binn.binn.scaling`):
``x̂, ŷ, t̂`` in about [-1, 1] and ``û = u/K``. The surrogate :class:`SurrogateNet` also has a
*forward-Laplacian* pass that propagates value, gradient (x, y, t) and spatial Laplacian through its layers,
so that one forward gives u, u_x, u_y, u_t and lap u, and one backward gives the parameter gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SurrogateNet", "BoundedNet", "DelayNet", "BinnModel", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "tanh")


def _act(z: torch.Tensor, name: str) -> torch.Tensor:
    return torch.tanh(z) if name == "tanh" else nn.functional.silu(z)


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.ModuleList:
    sizes = (n_in, *hidden, n_out)
    layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    for lin in layers:
        nn.init.xavier_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
    return layers


class SurrogateNet(nn.Module):
    """(x̂, ŷ, t̂) -> û >= 0: an MLP with a softplus output (density in units of K)."""

    def __init__(self, hidden: tuple[int, ...] = (64, 64, 64), activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
        self.activation = activation
        self.layers = _mlp(3, tuple(hidden), 1)

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        """(N, 3) scaled coordinates -> (N,) û."""
        h = xyt
        for lin in self.layers[:-1]:
            h = _act(lin(h), self.activation)
        return nn.functional.softplus(self.layers[-1](h)).squeeze(-1)

    def forward_laplacian(self, xyt: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass giving û and its derivatives at (N, 3) scaled points.

        Returns a dict of (N,) tensors: ``u``, ``u_x``, ``u_y``, ``u_t``, ``lap`` (u_xx + u_yy), all in scaled units.
        Internally a (5, N, H) stack [value, d/dx, d/dy, d/dt, Laplacian_xy] goes through each layer:
        a linear map acts on all five (bias on the value only); an activation s maps
        value -> s(z), gradient g -> s'(z) g, Laplacian L -> s''(z)(g_x² + g_y²) + s'(z) L.
        Derivatives are taken with respect to the scaled coordinates (no gradient flows back to ``xyt``).
        """
        n = xyt.shape[0]
        stack = xyt.new_zeros(5, n, 3)
        stack[0] = xyt.detach()
        stack[1, :, 0] = 1.0
        stack[2, :, 1] = 1.0
        stack[3, :, 2] = 1.0
        for lin in self.layers[:-1]:
            stack = _ForwardLaplacianActivation.apply(stack @ lin.weight.T, lin.bias, self.activation)
        last = self.layers[-1]
        o, p_x, p_y, p_t, p_l = (stack @ last.weight.T).squeeze(-1).unbind(0)  # each (N,)
        o = o + last.bias
        u = nn.functional.softplus(o)
        sig = torch.sigmoid(o)  # softplus' ; softplus'' = sig (1 - sig)
        lap = sig * (1.0 - sig) * (p_x * p_x + p_y * p_y) + sig * p_l
        return {"u": u, "u_x": sig * p_x, "u_y": sig * p_y, "u_t": sig * p_t, "lap": lap}


def _act_third(z: torch.Tensor, base: torch.Tensor, d1: torch.Tensor, name: str) -> torch.Tensor:
    """Third derivative of the activation at ``z`` (``base`` is sigmoid(z) for SiLU, tanh(z) for tanh)."""
    if name == "tanh":
        return d1 * (6.0 * base * base - 2.0)
    sp = base * (1.0 - base)
    return sp * (3.0 * (1.0 - 2.0 * base) + z * (1.0 - 6.0 * base * (1.0 - base)))


class _ForwardLaplacianActivation(torch.autograd.Function):
    """Bias + activation on a (5, N, H) [value, d/dx, d/dy, d/dt, Laplacian] stack, with a hand-written backward.

    Writing the backward by hand (instead of letting autograd record ~15 elementwise ops and their saved
    tensors) roughly halves the memory traffic of a training step on CPU.
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, bias: torch.Tensor, name: str) -> torch.Tensor:
        z = pre[0] + bias
        if name == "tanh":
            s = base = torch.tanh(z)
            d1 = 1.0 - s * s
            d2 = -2.0 * s * d1
        else:
            base = torch.sigmoid(z)
            s = z * base
            one_m = 1.0 - base
            d1 = base * (1.0 + z * one_m)
            d2 = base * one_m * (2.0 + z * (1.0 - 2.0 * base))
        out = torch.empty_like(pre)
        out[0] = s
        torch.mul(pre[1:], d1, out=out[1:])
        gxy2 = torch.addcmul(pre[1] * pre[1], pre[2], pre[2])
        out[4].addcmul_(d2, gxy2)
        ctx.save_for_backward(pre, z, base, d1, d2, gxy2)
        ctx.name = name
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: torch.Tensor):
        pre, z, base, d1, d2, gxy2 = ctx.saved_tensors
        d3 = _act_third(z, base, d1, ctx.name)
        gl = gout[4]
        grad = torch.empty_like(pre)
        torch.mul(gout[1:], d1, out=grad[1:])
        d2gl = d2 * gl
        grad[1].addcmul_(d2gl, pre[1], value=2.0)
        grad[2].addcmul_(d2gl, pre[2], value=2.0)
        chain = (gout[1:] * pre[1:]).sum(0)  # sum over x, y, t, L channels of g_c * p_c
        gz = torch.mul(gout[0], d1)
        gz.addcmul_(d2, chain).addcmul_(d3 * gl, gxy2)
        grad[0] = gz
        return grad, gz.sum(0), None


class BoundedNet(nn.Module):
    """Scalar -> scalar MLP with an output bounded to [lo, hi], for D(û) and G(û) in scaled units.

    Linear scale (``decades = 0``): lo + (hi - lo) sigmoid(z). Log scale (``decades > 0``):
    lo + (hi - lo) 10^(-decades (1 - sigmoid(z))), so the output spans ``decades`` orders of magnitude below hi
    with an even sensitivity per decade (a diffusivity 100x below its bound still trains well). Softplus
    (``unit`` given): lo + span (1 - exp(-d / span)) with d = unit softplus(z) and span = hi - lo: affine in z
    from about ``unit`` up to a good fraction of hi. Far below their upper
    bound the first two are exponential in z, so a network whose z is nearly affine in u (the simplest ones, and
    what weakly informative data leave) gives an exponential D(u); softplus gives an affine one.
    ``init_fraction`` is the starting value as a fraction of (hi - lo).
    """

    def __init__(self, lo: float, hi: float, hidden: tuple[int, ...] = (32, 32, 32),
                 activation: str = "silu", init_fraction: float = 0.5, decades: float = 0.0,
                 unit: float | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.layers = _mlp(1, tuple(hidden), 1)
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))
        self.decades = float(decades)
        self.softplus = unit is not None
        if self.softplus:
            # d = unit softplus(z) is affine in z above about unit, so the simplest networks (z nearly affine in u)
            # give an affine D(u) rather than an exponential one; the cap lo + span (1 - exp(-d / span)) keeps D
            # below hi with a gradient everywhere and is d itself while d << span
            self.register_buffer("unit", torch.tensor(float(unit)))
        self._start_output(init_fraction)

    def _start_output(self, init_fraction: float) -> None:
        """The output layer's bias so that the output starts at lo + init_fraction (hi - lo); its weights x 0.1."""
        lo, hi = float(self.lo), float(self.hi)
        if self.softplus:
            frac = min(max(init_fraction, 0.0), 0.999)
            start = max(-math.log1p(-frac) * (hi - lo) / float(self.unit), 1e-6)
            bias = math.log(math.expm1(start)) if start < 30 else start
        else:
            if self.decades > 0:
                floor = 10.0 ** (-self.decades)
                frac = 1.0 + math.log10(min(max(init_fraction, floor * 1.01), 0.99)) / self.decades
            else:
                frac = init_fraction
            frac = min(max(frac, 1e-4), 1 - 1e-4)
            bias = math.log(frac / (1 - frac))
        with torch.no_grad():
            self.layers[-1].bias.fill_(bias)
            self.layers[-1].weight.mul_(0.1)

    def reinitialise(self, init_fraction: float, seed: int = 0) -> None:
        """Fresh weights (as at construction, from ``seed``) with the output at ``init_fraction`` of its range: for a
        network whose hidden units saturated in training, so that its output no longer changes with u and its
        gradients are too small for any optimiser to leave that state."""
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for lin in self.layers:
                nn.init.xavier_normal_(lin.weight, generator=gen)
                nn.init.zeros_(lin.bias)
        self._start_output(init_fraction)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(N,) scaled input -> (N,) bounded output."""
        h = u.unsqueeze(-1)
        for lin in self.layers[:-1]:
            h = _act(lin(h), self.activation)
        if self.softplus:
            span = self.hi - self.lo
            d = self.unit * nn.functional.softplus(self.layers[-1](h).squeeze(-1))
            return torch.clamp(self.lo - span * torch.expm1(-d / span), max=self.hi)
        s = torch.sigmoid(self.layers[-1](h).squeeze(-1))
        if self.decades > 0:
            s = torch.exp((s - 1.0) * (self.decades * math.log(10.0)))
        return self.lo + (self.hi - self.lo) * s


class DelayNet(BoundedNet):
    """t̂ -> T in (0, 1]: the optional delay (activation) factor, starting near 1."""

    def __init__(self, hidden: tuple[int, ...] = (32, 32), activation: str = "silu") -> None:
        super().__init__(0.0, 1.0, hidden, activation, init_fraction=0.95)


class BinnModel(nn.Module):
    """One BINN: surrogate û(x̂, ŷ, t̂), D̂(û), Ĝ(û) and optional T(t̂), all in scaled units."""

    def __init__(self, hidden: tuple[int, ...], activation: str, rate_hidden: tuple[int, ...],
                 d_bounds: tuple[float, float], g_bounds: tuple[float, float], use_delay: bool,
                 d_init_fraction: float = 0.05, d_decades: float = 0.0, d_unit: float | None = None) -> None:
        super().__init__()
        self.unet = SurrogateNet(hidden, activation)
        self.dnet = BoundedNet(*d_bounds, hidden=rate_hidden, activation=activation,
                               init_fraction=d_init_fraction, decades=d_decades, unit=d_unit)
        g_lo, g_hi = g_bounds
        g0 = (0.0 - g_lo) / (g_hi - g_lo) if g_hi > g_lo else 0.5
        self.gnet = BoundedNet(g_lo, g_hi, hidden=rate_hidden, activation=activation, init_fraction=g0)
        self.tnet = DelayNet(rate_hidden[:2] or (16,), activation) if use_delay else None

    def delay(self, t: torch.Tensor) -> torch.Tensor:
        """T(t̂), or ones when the model has no delay network."""
        if self.tnet is None:
            return torch.ones_like(t)
        return self.tnet(t)
