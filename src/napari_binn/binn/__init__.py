"""Biologically-informed neural networks (BINNs): learn D(u) and G(u) of u_t = T(t)[div(D(u) grad u) + G(u) u].

GUI-free; torch. ``train_binn`` is the job generator, ``fit_binn`` its blocking form, ``BinnFit`` the result.
"""

from .config import BinnConfig
from .fit import BinnFit, PhysicalRate
from .nets import BinnModel
from .residual import residual_autograd, residual_fast
from .scaling import Scales, default_bounds
from .train import MemberResult, assemble_fit, fit_binn, resolve_device, train_binn, train_member

__all__ = ["BinnConfig", "BinnFit", "BinnModel", "MemberResult", "PhysicalRate", "Scales", "assemble_fit",
           "default_bounds", "fit_binn", "resolve_device", "residual_autograd", "residual_fast", "train_binn",
           "train_member"]
