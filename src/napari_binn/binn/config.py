"""BinnConfig: every choice of a BINN fit, with defaults that work on typical data without tuning."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .nets import ACTIVATIONS
from .residual import RESIDUALS

__all__ = ["BinnConfig", "DEVICES"]

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class BinnConfig:
    """Settings of :func:`~napari_binn.binn.train_binn`. Physical units: µm, hours, density units of the field.

    Networks
        hidden: surrogate u-network hidden widths (default 3 x 64). activation: ``"tanh"`` (default: on the
        Fisher–KPP benchmark it fitted the data better, gave a flatter D and ran faster than SiLU) or ``"silu"``
        (compare with ``benchmarks/binn_accuracy.py --set activation=silu``). rate_hidden: hidden widths of the D-, G- and T-networks. use_delay: learn T(t) in (0, 1]; the closed forms are then simulated and refitted under the learned T(t), held fixed.
    Bounds (None = from the data, see :func:`napari_binn.binn.scaling.default_bounds`)
        D_min, D_max in µm²/h (auto: 0 and (domain size)² / (time span)); D_output: how the D-network's output
        becomes D: ``"softplus"`` (default: D_min + (D_init / 10) softplus(z), capped at D_max; affine in z, so
        where the data say little about D's shape the network's simplest answer is an affine D(u), not an
        exponential one; Porous–Fisher D error 22% -> 12.5% on the accuracy benchmark) or ``"log"`` (a log
        scale spanning D_decades decades below D_max; 0 decades = a linear sigmoid scale); D_init: starting D in
        µm²/h (auto: (box size)² / (frame interval));
        G_min, G_max in 1/h (auto: ±20 / (time span)); K in density units (auto: field.K, else the
        99th percentile of the observed density).
    Loss
        data_weight, pde_weight (default 0.1: the PDE term then regularises the surrogate without pulling it off
        the data; 1.0 and 10 gave worse D and G on the Fisher–KPP benchmark), weak_weight (the PDE's weak form on
        the observed density, see :mod:`napari_binn.binn.weak`: space-time windows of (2 weak_half_boxes + 1)²
        boxes x (2 weak_half_frames + 1) frames, weak_windows of them per step; it needs no derivative of the
        surrogate, so noise does not bias D towards zero; default 1: Fisher–KPP D error 16% -> 7-9% on the accuracy
        benchmark; it switches itself off, saying so, when no window fits in the ROI; 0 = off), noflux_weight (no-flux on the mask edge; 0 = off), gls_gamma (GLS weight
        |u/K|^-gamma on the data term; 0 = plain MSE), monotone_D / monotone_G with constraint_weight,
        n_collocation points per step drawn ``"front"`` (default: from a pool weighted by |grad u| + |u_t| of the
        surrogate, where D and G are identifiable; refreshed every adaptive_every steps), ``"uniform"`` or
        ``"adaptive"`` (half of them weighted by |residual|), batch_size observed points per step.
    Optimisation
        steps (Adam, including the warm-up), lr, lr_final (exponential decay from lr to lr_final), rate_lr_factor
        (the D/G/T networks learn this many times faster than the surrogate), warmup_steps (data term only, to
        fit the surrogate first; cheap steps), rates_only_steps (then the PDE term
        trains only D, G, T against the fixed surrogate, so wrong starting rates cannot distort it), lbfgs_steps (optional L-BFGS polish; 0 = off), validation ``"random"`` (a
        val_fraction of observed points) or ``"frames"`` (every 5th interior frame held out), val_every,
        patience (steps without a better validation loss before stopping early; 0 = never), warmup_restore (when
        the validation loss at the end of the warm-up is more than this factor above its lowest in the warm-up, the
        surrogate has learned the noise: its state at that lowest point is restored before the PDE term starts,
        since a rough surrogate makes the residual large and can drive the surrogate to u = 0; 0 = never).
    Job
        n_models (ensemble size; members differ in split and initialisation seed), seed, device
        (``"auto"|"cpu"|"cuda"|"mps"``), residual (``"fast"`` forward-Laplacian or ``"autograd"``),
        log_every (loss history and progress events), snapshot_every (D/G snapshot in events),
        max_restarts (divergence guard), dtype (``"float32"`` or ``"float64"``).
    """

    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "tanh"
    rate_hidden: tuple[int, ...] = (32, 32)
    use_delay: bool = False
    D_min: float | None = None
    D_max: float | None = None
    G_min: float | None = None
    G_max: float | None = None
    K: float | None = None
    D_init: float | None = None
    D_decades: float = 5.0
    D_output: str = "softplus"
    data_weight: float = 1.0
    pde_weight: float = 0.1
    noflux_weight: float = 0.0
    weak_weight: float = 1.0
    weak_windows: int = 64
    weak_half_boxes: int = 8
    weak_half_frames: int = 4
    gls_gamma: float = 0.0
    monotone_D: bool = False
    monotone_G: bool = False
    constraint_weight: float = 10.0
    n_collocation: int = 1024
    collocation: str = "front"
    adaptive_every: int = 250
    batch_size: int = 4096
    steps: int = 18000
    lr: float = 5e-3
    lr_final: float = 1e-4
    rate_lr_factor: float = 10.0
    warmup_steps: int = 16000
    rates_only_steps: int = 0
    lbfgs_steps: int = 0
    validation: str = "random"
    val_fraction: float = 0.2
    val_every: int = 50
    patience: int = 2000
    warmup_restore: float = 1.1
    n_models: int = 1
    seed: int = 0
    device: str = "auto"
    residual: str = "fast"
    log_every: int = 50
    snapshot_every: int = 500
    max_restarts: int = 5
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.rate_hidden = tuple(int(h) for h in self.rate_hidden)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting and what to do about it."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"[binn] {msg}")

        need(len(self.hidden) >= 1 and all(h > 0 for h in self.hidden),
             f"hidden must be one or more positive widths; got {self.hidden}")
        need(len(self.rate_hidden) >= 1 and all(h > 0 for h in self.rate_hidden),
             f"rate_hidden must be one or more positive widths; got {self.rate_hidden}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        need(self.residual in RESIDUALS, f"residual must be one of {RESIDUALS}; got {self.residual!r}")
        need(self.device in DEVICES, f"device must be one of {DEVICES}; got {self.device!r}")
        need(self.collocation in ("uniform", "adaptive", "front"),
             f"collocation must be 'uniform', 'adaptive' or 'front'; got {self.collocation!r}")
        need(self.D_output in ("log", "softplus"), f"D_output must be 'log' or 'softplus'; got {self.D_output!r}")
        need(self.validation in ("random", "frames"),
             f"validation must be 'random' or 'frames'; got {self.validation!r}")
        need(self.dtype in ("float32", "float64"), f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        need(self.steps >= 1, f"steps must be >= 1 (got {self.steps}); a fit needs at least one step")
        for name in ("n_collocation", "batch_size", "n_models", "val_every", "log_every", "snapshot_every",
                     "adaptive_every", "weak_windows", "weak_half_boxes", "weak_half_frames"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "rates_only_steps", "lbfgs_steps", "patience", "max_restarts"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("data_weight", "pde_weight", "noflux_weight", "weak_weight", "gls_gamma", "constraint_weight"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        need(self.data_weight > 0, "data_weight must be > 0 (the data term anchors the fit)")
        need(self.lr > 0 and self.lr_final > 0, f"lr and lr_final must be > 0; got {self.lr}, {self.lr_final}")
        need(self.rate_lr_factor > 0, f"rate_lr_factor must be > 0; got {self.rate_lr_factor}")
        need(0 <= self.D_decades <= 12, f"D_decades must be in [0, 12] (0 = linear D scale); got {self.D_decades}")
        need(self.D_init is None or self.D_init > 0, f"D_init must be > 0 µm²/h; got {self.D_init}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1); got {self.val_fraction}")
        need(self.warmup_restore == 0 or self.warmup_restore >= 1,
             f"warmup_restore must be 0 (never) or >= 1 (a factor over the lowest validation loss); got "
             f"{self.warmup_restore}")
        need(self.K is None or self.K > 0, f"K must be > 0 (carrying capacity); got {self.K}")
        if self.D_min is not None:
            need(self.D_min >= 0, f"D_min must be >= 0 µm²/h; got {self.D_min}")
        if self.D_max is not None:
            need(self.D_max > 0, f"D_max must be > 0 µm²/h; got {self.D_max}")
        if self.D_min is not None and self.D_max is not None:
            need(self.D_min < self.D_max, f"D_min ({self.D_min}) must be < D_max ({self.D_max}) µm²/h")
        if self.G_min is not None and self.G_max is not None:
            need(self.G_min < self.G_max, f"G_min ({self.G_min}) must be < G_max ({self.G_max}) 1/h")

    def replace(self, **changes: Any) -> "BinnConfig":
        """A validated copy with ``changes`` applied (unknown names raise ValueError)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"BinnConfig has no setting(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def with_steps(self, steps: int) -> "BinnConfig":
        """A validated copy with a budget of ``steps`` Adam steps whose phases keep their shares of it.

        The way to change the budget (the command line's ``--steps``, the docks' step fields): the data-only
        warm-up (``warmup_steps``) and the rates-only phase (``rates_only_steps``) are scaled by
        ``steps / self.steps`` (rounded), and the warm-up stays below ``steps`` so the PDE term always trains.
        ``replace(steps=...)`` changes the budget alone (a warm-up longer than the budget is cut to steps - 1 by
        the training, which then fits the data term only).
        """
        steps = int(steps)
        if steps < 1:
            raise ConfigError(f"BinnConfig: steps must be >= 1 (got {steps}); a fit needs at least one step")
        scale = steps / self.steps
        warmup = min(int(round(self.warmup_steps * scale)), steps - 1)
        rates_only = min(int(round(self.rates_only_steps * scale)), steps - 1 - warmup)
        return self.replace(steps=steps, warmup_steps=warmup, rates_only_steps=rates_only)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON/TOML types (tuples become lists; None stays None)."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["rate_hidden"] = list(self.rate_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BinnConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown BinnConfig key(s) {unknown}; valid keys: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        from .._config_io import check_type

        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            check_type(hints[name], value, f"binn.{name}")
        return cls(**d)
