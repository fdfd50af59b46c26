"""Training a BINN as a cancellable job: :func:`train_binn` (generator) and :func:`fit_binn` (blocking)."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..field import DensityField
from ..jobs import CancelToken, Progress, ProgressClock, is_cancelled, run_job
from .config import BinnConfig
from .fit import BinnFit, build_model
from .residual import residual_autograd, residual_fast
from .scaling import Scales, default_bounds
from .weak import WeakForm, build_weak_form, weak_loss

__all__ = ["train_binn", "fit_binn", "resolve_device", "train_member", "assemble_fit", "MemberResult"]

_STAGE = "train"
_EXPLODE = 1e3  # a loss this many times the running loss counts as divergence


def resolve_device(device: str) -> tuple[torch.device, str]:
    """The torch device for ``device`` and a note (empty unless 'auto' fell back to the CPU).

    Raises ValueError when 'cuda' or 'mps' is asked for but not available.
    """
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available to torch here; "
                             "use device='cpu' or 'auto'")
        return torch.device("cuda"), ""
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' was asked for but Apple MPS is not available here; "
                             "use device='cpu' or 'auto'")
        return torch.device("mps"), ""
    if device == "cpu":
        return torch.device("cpu"), ""
    if torch.cuda.is_available():
        return torch.device("cuda"), "auto: using CUDA GPU"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps"), "auto: using Apple MPS"
    return torch.device("cpu"), "auto: no GPU available, using the CPU"


@dataclass
class _Data:
    """Observed points in scaled units, the ROI for collocation, and everything BinnFit needs."""

    scales: Scales
    bounds: dict[str, float]
    xyt: np.ndarray  # (N, 3) scaled coords of observed points
    u: np.ndarray  # (N,) û = u/K
    frame: np.ndarray  # (N,) frame index
    boxes: np.ndarray  # (M, 2) scaled (x̂, ŷ) centres of ROI boxes
    half_box: float  # half a box, scaled
    edges: np.ndarray  # (E, 4) scaled face points (x̂, ŷ) and outward normals (n_x, n_y)
    u_range: dict[str, float]
    u_hist: tuple[np.ndarray, np.ndarray]
    units: dict[str, str]
    d_init: float  # starting diffusivity, µm²/h
    grid: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # û, mask, x̂, ŷ, t̂ (weak form)


def _prepare(field: DensityField, config: BinnConfig) -> _Data:
    """Validate the field and convert it to scaled units (ValueError explains what is wrong)."""
    if not isinstance(field, DensityField):
        raise ValueError(f"train_binn needs a DensityField; got {type(field).__name__}")
    if field.n_frames < 3:
        raise ValueError(f"the field has {field.n_frames} frame(s); a BINN needs at least 3 frames to learn "
                         "a time derivative")
    obs = field.observed
    n_obs = int(obs.sum())
    if n_obs == 0:
        raise ValueError("the field has no observed (finite) values inside its mask; check the ROI mask "
                         "and the density extraction")
    vals = field.u[obs]
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= 0 or hi - lo <= 1e-9 * max(abs(hi), 1.0):
        raise ValueError(f"the observed density is {'all zero' if hi == lo == 0 else 'constant'} "
                         f"({lo:g}..{hi:g} {field.units}): there is nothing to learn")
    K = config.K or field.K or float(np.percentile(vals, 99))
    if not K or K <= 0:
        raise ValueError(f"cannot choose a density scale K (got {K}); set BinnConfig.K")
    scales = Scales.from_field(field, K)
    if scales.length_um <= 0 or scales.time_h <= 0:
        raise ValueError("the field's grid spacing and frame times must span a positive extent")
    auto = default_bounds(scales)
    bounds = {k: (getattr(config, k) if getattr(config, k) is not None else v) for k, v in auto.items()}
    if not bounds["D_min"] < bounds["D_max"]:
        raise ValueError(f"D_min ({bounds['D_min']:g}) must be < D_max ({bounds['D_max']:g}) µm²/h")
    if not bounds["G_min"] < bounds["G_max"]:
        raise ValueError(f"G_min ({bounds['G_min']:g}) must be < G_max ({bounds['G_max']:g}) 1/h")

    it, iy, ix = np.nonzero(obs)
    xyt = scales.xyt(field.x_um[ix], field.y_um[iy], field.t_h[it])
    my, mx = np.nonzero(field.mask)
    boxes = scales.xyt(field.x_um[mx], field.y_um[my], 0.0)[:, :2]
    half = abs(field.dx_um) / 2 / scales.length_um
    sx = np.sign(field.x_um[1] - field.x_um[0]) if field.x_um.size > 1 else 1.0
    sy = np.sign(field.y_um[1] - field.y_um[0]) if field.y_um.size > 1 else 1.0
    padded = np.pad(field.mask, 1)
    edges = []  # faces of ROI boxes whose neighbour is outside the ROI: (x̂, ŷ, n_x, n_y)
    for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        normal = (dj * sx, di * sy)
        for b in np.nonzero(~padded[1 + my + di, 1 + mx + dj])[0]:
            edges.append((boxes[b, 0] + normal[0] * half, boxes[b, 1] + normal[1] * half, *normal))
    # start D at (box size)² / (frame interval): cells moving about one box per frame
    frame_dt = float(np.median(np.diff(field.t_h)))
    d_init = config.D_init if config.D_init is not None else field.dx_um ** 2 / max(frame_dt, 1e-12)
    span = bounds["D_max"] - bounds["D_min"]
    d_init = float(np.clip(d_init, bounds["D_min"] + 1e-3 * span * 10.0 ** (-config.D_decades),
                           bounds["D_max"] - 1e-3 * span))
    q = np.percentile(vals, [5, 95])
    counts, bin_edges = np.histogram(vals, bins=50, range=(lo, hi))
    return _Data(scales, bounds, xyt, vals / K, it, boxes, half, np.asarray(edges, float).reshape(-1, 4),
                 {"q05": float(q[0]), "q95": float(q[1]), "min": lo, "max": hi}, (counts, bin_edges),
                 {"x": "µm", "y": "µm", "t": "h", "u": field.units, "D": "µm²/h", "G": "1/h", "T": "1"}, d_init,
                 (field.u / K, field.mask, scales.xyt(field.x_um, 0.0, 0.0)[:, 0],
                  scales.xyt(0.0, field.y_um, 0.0)[:, 1], scales.xyt(0.0, 0.0, field.t_h)[:, 2]))


def _split(data: _Data, config: BinnConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices into the observed points."""
    n = data.u.size
    rng = np.random.default_rng(seed)
    if config.validation == "frames":
        frames = np.unique(data.frame)
        interior = frames[1:-1]
        held = interior[(seed % 5)::5] if interior.size >= 5 else interior[len(interior) // 2:][:1]
        val_mask = np.isin(data.frame, held)
        if val_mask.all() or not val_mask.any():
            raise ValueError("validation='frames' needs at least 3 frames with observed points")
        return np.nonzero(~val_mask)[0], np.nonzero(val_mask)[0]
    perm = rng.permutation(n)
    n_val = max(1, int(round(config.val_fraction * n)))
    if n - n_val < 1:
        raise ValueError(f"only {n} observed point(s): too few to split into training and validation")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class _Member:
    """Trains one ensemble member; ``run()`` is a generator of (kind, payload) tuples."""

    def __init__(self, data: _Data, config: BinnConfig, seed: int, device: torch.device,
                 dtype: torch.dtype, weak: WeakForm | None = None) -> None:
        self.data, self.config, self.seed = data, config, seed
        self.weak = weak  # the weak-form windows depend on the data only: built once, shared by the members
        self.device, self.dtype = device, dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(config, data.scales, data.bounds, data.d_init).to(device=device, dtype=dtype)
        self.gen = torch.Generator().manual_seed(seed)
        tr, va = _split(data, config, seed)
        self.train_xyt = self._t(data.xyt[tr])
        self.train_u = self._t(data.u[tr])
        # validation on at most 16384 points and a fixed set of collocation points
        if va.size > 16384:
            va = np.sort(np.random.default_rng(seed + 1).choice(va, 16384, replace=False))
        self.val_xyt, self.val_u = self._t(data.xyt[va]), self._t(data.u[va])
        self.val_coll = self._uniform(config.n_collocation)
        self.residual = residual_fast if config.residual == "fast" else residual_autograd
        self.adaptive: torch.Tensor | None = None
        self.u_grid = self._t(np.linspace(0.0, max(1.0, float(data.u.max())), 64))
        self.history: list[dict[str, Any]] = []
        self.restarts = 0
        self.rates_until = 0

    def _t(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(a).to(device=self.device, dtype=self.dtype)

    def _uniform(self, n: int) -> torch.Tensor:
        """n collocation points uniform in the ROI (jittered within boxes) and time."""
        d = self.data
        idx = torch.randint(0, d.boxes.shape[0], (n,), generator=self.gen)
        jitter = (torch.rand(n, 2, generator=self.gen, dtype=torch.float64) * 2 - 1) * d.half_box
        xy = torch.as_tensor(d.boxes)[idx] + jitter
        t = torch.rand(n, 1, generator=self.gen, dtype=torch.float64) * 2 - 1
        return self._t(torch.cat([xy, t], 1))

    def _collocation(self, step: int) -> torch.Tensor:
        cfg = self.config
        n = cfg.n_collocation
        if cfg.collocation == "uniform":
            return self._uniform(n)
        if cfg.collocation == "front":
            if self.adaptive is None or step % cfg.adaptive_every == 0:
                pool = self._uniform(8 * n)
                with torch.no_grad():
                    d = self.model.unet.forward_laplacian(pool)
                w = (torch.sqrt(d["u_x"] ** 2 + d["u_y"] ** 2) + d["u_t"].abs()).double().cpu()
                w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
                w = w + 0.05 * w.mean() + 1e-12
                self.adaptive = pool[torch.multinomial(w, 4 * n, replacement=True, generator=self.gen).to(pool.device)]
            pick = torch.randint(0, self.adaptive.shape[0], (n,), generator=self.gen).to(self.adaptive.device)
            return self.adaptive[pick]
        if self.adaptive is None or step % cfg.adaptive_every == 0:
            pool = self._uniform(4 * n)
            with torch.no_grad():
                r, _ = self.residual(self.model, pool)
            w = r.abs().double().cpu()
            w = torch.where(torch.isfinite(w), w, torch.zeros_like(w)) + 1e-12
            pick = torch.multinomial(w, n // 2, replacement=True, generator=self.gen)
            self.adaptive = pool[pick.to(pool.device)]
        return torch.cat([self.adaptive, self._uniform(n - n // 2)])

    def losses(self, step: int, warm: bool) -> dict[str, torch.Tensor]:
        """Loss terms at this step (scaled units)."""
        cfg, m = self.config, self.model
        idx = torch.randint(0, self.train_u.numel(), (min(cfg.batch_size, self.train_u.numel()),),
                            generator=self.gen).to(self.device)
        pred = m.unet(self.train_xyt[idx])
        err2 = (pred - self.train_u[idx]) ** 2
        if cfg.gls_gamma > 0:
            err2 = err2 * self.train_u[idx].abs().clamp_min(1e-2) ** (-cfg.gls_gamma)
        out = {"data": err2.mean()}
        if not warm:
            if step < self.rates_until:  # surrogate fixed in the PDE term: fit D, G to it first
                r, _ = residual_fast(m, self._collocation(step), detach_u=True)
            else:
                r, _ = self.residual(m, self._collocation(step))
            out["pde"] = (r ** 2).mean()
            if self.weak is not None:
                out["weak"] = weak_loss(m, self.weak, cfg.weak_windows, self.gen)
            if cfg.noflux_weight > 0 and self.data.edges.shape[0]:
                out["noflux"] = self._noflux()
            if cfg.monotone_D or cfg.monotone_G:
                out["constraint"] = self._constraint()
        return out

    def _noflux(self) -> torch.Tensor:
        e = self.data.edges
        n = self.config.n_collocation // 4 or 1
        pick = torch.randint(0, e.shape[0], (n,), generator=self.gen)
        pts = torch.as_tensor(e)[pick]
        t = torch.rand(n, 1, generator=self.gen, dtype=torch.float64) * 2 - 1
        d = self.model.unet.forward_laplacian(self._t(torch.cat([pts[:, :2], t], 1)))
        normal = self._t(pts[:, 2:])
        return ((d["u_x"] * normal[:, 0] + d["u_y"] * normal[:, 1]) ** 2).mean()

    def _constraint(self) -> torch.Tensor:
        m, total = self.model, self.u_grid.new_zeros(())
        if self.config.monotone_D:
            D = m.dnet(self.u_grid)
            total = total + (torch.relu(D[:-1] - D[1:]) / (m.dnet.hi - m.dnet.lo)).pow(2).sum()
        if self.config.monotone_G:
            G = m.gnet(self.u_grid)
            total = total + (torch.relu(G[1:] - G[:-1]) / (m.gnet.hi - m.gnet.lo)).pow(2).sum()
        return total

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        weights = {"data": cfg.data_weight, "pde": cfg.pde_weight, "noflux": cfg.noflux_weight,
                   "constraint": cfg.constraint_weight, "weak": cfg.weak_weight}
        return sum(weights[k] * v for k, v in terms.items())

    @torch.no_grad()
    def val_loss(self, warm: bool) -> float:
        pred = self.model.unet(self.val_xyt)
        v = torch.mean((pred - self.val_u) ** 2)
        if not warm:
            r, _ = self.residual(self.model, self.val_coll)
            v = self.config.data_weight * v + self.config.pde_weight * torch.mean(r ** 2)
        return float(v)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def snapshot(self) -> dict[str, np.ndarray]:
        d = self.data
        u = np.linspace(d.u_range["min"], d.u_range["max"], 64)
        uh = self._t(u / d.scales.K)
        with torch.no_grad():
            D = self.model.dnet(uh).double().cpu().numpy() * d.scales.D_unit
            G = self.model.gnet(uh).double().cpu().numpy() * d.scales.G_unit
        return {"u_grid": u, "D": D, "G": G}

    def run(self, cancel: CancelToken | None) -> Generator[tuple[str, Any], None, dict[str, Any]]:
        """Adam (then optional L-BFGS); yields ('log'|'snapshot'|'divergence'|'paused', payload)."""
        cfg = self.config
        warmup = min(cfg.warmup_steps, cfg.steps - 1) if cfg.steps > 1 else 0
        self.rates_until = warmup + cfg.rates_only_steps
        lr_scale = 1.0
        opt = self._adam(cfg.lr)
        best_state, best_val, best_step = self.state(), math.inf, 0
        ema: float | None = None
        since_restart = 0
        status = {"cancelled": False, "stopped_early": False, "steps_done": 0, "divergences": 0}
        warm_best: tuple[float, int, dict[str, Any]] | None = None  # the warm-up's lowest validation loss
        last_val: float | None = None
        step = 0
        while step < cfg.steps:
            if cancel is not None and cancel.paused:
                yield "paused", {"step": step}
            if is_cancelled(cancel):
                status["cancelled"] = True
                break
            warm = step < warmup
            if step == warmup:
                if (cfg.warmup_restore and warm_best is not None and last_val is not None
                        and last_val > cfg.warmup_restore * warm_best[0] and "warmup_restored" not in status):
                    # the surrogate has learned the noise since its lowest validation loss: a rough surrogate
                    # makes the PDE residual large, and the residual can then pull the surrogate to u = 0
                    self.model.load_state_dict(warm_best[2])
                    best_state = warm_best[2]  # what a divergence guard restores until the next validation
                    opt = self._adam(cfg.lr * lr_scale)
                    status["warmup_restored"] = {"step": warm_best[1], "val": warm_best[0], "end_val": last_val}
                    yield "warmup_restored", dict(status["warmup_restored"])
                ema, best_val = None, math.inf  # the PDE term starts: new loss scale, new best
            lr = cfg.lr * (cfg.lr_final / cfg.lr) ** (step / max(cfg.steps - 1, 1)) * lr_scale
            for group in opt.param_groups:
                group["lr"] = lr * group["factor"]
            terms = self.losses(step, warm)
            loss = self.total(terms)
            lval = float(loss.detach())
            exploded = not math.isfinite(lval) or (ema is not None and since_restart > 10
                                                    and lval > _EXPLODE * ema)
            if exploded:
                status["divergences"] += 1
                self.model.load_state_dict(best_state)
                self.adaptive = None
                lr_scale *= 0.2
                opt = self._adam(cfg.lr * lr_scale)
                since_restart, ema = 0, None
                give_up = status["divergences"] > cfg.max_restarts
                yield "divergence", {"step": step, "loss": lval, "lr": cfg.lr * lr_scale, "give_up": give_up}
                if give_up:
                    break
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            since_restart += 1
            ema = lval if ema is None else 0.9 * ema + 0.1 * lval
            step += 1
            status["steps_done"] = step
            if step % cfg.val_every == 0 or step == cfg.steps:
                if not self.finite():
                    continue  # caught as a NaN loss at the next step
                v = self.val_loss(step <= warmup)
                last_val = v
                if v < best_val or (step <= warmup):
                    best_val, best_step, best_state = v, step, self.state()
                if step <= warmup and (warm_best is None or v < warm_best[0]):
                    warm_best = (v, step, best_state)
                if cfg.patience and step > warmup and step - best_step > cfg.patience:
                    status["stopped_early"] = True
                    break
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"step": step, "loss": lval, "lr": lr, **{k: float(v.detach()) for k, v in terms.items()},
                       "val": best_val if best_step == step else None}
                self.history.append(rec)
                yield "log", rec
            if step % cfg.snapshot_every == 0:
                yield "snapshot", self.snapshot()
        self.model.load_state_dict(best_state)
        if cfg.lbfgs_steps and not status["cancelled"] and step > warmup:
            yield from self._lbfgs(best_val, cancel, status)
        if not self.finite():  # cannot happen with finite checkpoints; never hand out NaN networks
            raise FloatingPointError("BINN parameters became non-finite and no finite checkpoint exists")
        status["best_val"] = best_val if math.isfinite(best_val) else None
        status["best_step"] = best_step
        status["warmup_best_val"] = None if warm_best is None else warm_best[0]
        return status

    def _adam(self, lr: float) -> torch.optim.Adam:
        """Adam with the surrogate at ``lr`` and the D/G/T networks at ``lr * rate_lr_factor``."""
        m = self.model
        rates = [p for net in (m.dnet, m.gnet, m.tnet) if net is not None for p in net.parameters()]
        groups = [{"params": list(m.unet.parameters()), "factor": 1.0},
                  {"params": rates, "factor": self.config.rate_lr_factor}]
        for g in groups:
            g["lr"] = lr * g["factor"]
        return torch.optim.Adam(groups, lr=lr)

    def _lbfgs(self, best_val: float, cancel: CancelToken | None,
               status: dict[str, Any]) -> Generator[tuple[str, Any], None, None]:
        """L-BFGS polish on a fixed batch; kept only when it lowers the validation loss."""
        cfg = self.config
        before = self.state()
        n = min(4 * cfg.batch_size, self.train_u.numel())
        idx = torch.randperm(self.train_u.numel(), generator=self.gen)[:n].to(self.device)
        xyt, u, coll = self.train_xyt[idx], self.train_u[idx], self._uniform(2 * cfg.n_collocation)
        opt = torch.optim.LBFGS(self.model.parameters(), lr=1.0, max_iter=20, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            r, _ = self.residual(self.model, coll)
            loss = cfg.data_weight * torch.mean((self.model.unet(xyt) - u) ** 2) + cfg.pde_weight * torch.mean(r ** 2)
            loss.backward()
            return loss

        done = 0
        while done < cfg.lbfgs_steps:
            if is_cancelled(cancel):
                status["cancelled"] = True
                break
            loss = float(opt.step(closure))
            done += 20
            if not math.isfinite(loss) or not self.finite():
                break
            rec = {"step": cfg.steps + done, "loss": loss, "lbfgs": True}
            self.history.append(rec)
            yield "log", rec
        v = self.val_loss(False) if self.finite() else math.inf
        status["lbfgs_kept"] = bool(v < best_val)
        if not v < best_val:
            self.model.load_state_dict(before)


@dataclass
class MemberResult:
    """One trained ensemble member, plain and picklable (what a worker sends back): its index and seed, the
    network's state dict on the CPU, its loss history and its status (steps done, best validation loss,
    cancelled, ...)."""

    index: int
    seed: int
    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    status: dict[str, Any]


def _weak_form(data: _Data, config: BinnConfig, device: torch.device, dtype: torch.dtype) -> WeakForm | None:
    """The weak-form windows (they depend on the data only: built once, shared by the members)."""
    if config.weak_weight <= 0:
        return None
    u_hat, mask, xh, yh, th = data.grid
    return build_weak_form(u_hat, mask, xh, yh, th, half_boxes=config.weak_half_boxes,
                           half_frames=config.weak_half_frames, device=device, dtype=dtype)


def _dtype(config: BinnConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


def _member_job(data: _Data, config: BinnConfig, index: int, device: torch.device, weak: WeakForm | None,
                cancel: CancelToken | None) -> Generator[tuple[str, Any], None, MemberResult]:
    """Train member ``index`` (seed ``config.seed + index``); yields its ('log'|'snapshot'|...) tuples and returns
    its :class:`MemberResult`. The one way a member is trained, in a serial run and on a worker alike."""
    seed = config.seed + index
    member = _Member(data, config, seed, device, _dtype(config), weak)
    status = yield from member.run(cancel)
    state = {k: v.detach().to("cpu").clone() for k, v in member.model.state_dict().items()}
    return MemberResult(index, seed, state, member.history, status)


def train_member(field: DensityField, config: BinnConfig, index: int, *,
                 cancel: CancelToken | None = None) -> MemberResult:
    """Train ensemble member ``index`` of ``config`` on ``field`` (blocking; a pure function of the field, the
    configuration and the member's seed ``config.seed + index``): what a dask task of an ensemble runs.
    :func:`assemble_fit` puts members back together; a serial :func:`train_binn` trains the same members the same
    way, so the fit is the same wherever its members ran (same device, same torch thread count)."""
    config.validate()
    if not 0 <= index < config.n_models:
        raise ValueError(f"member index {index} is outside the ensemble (n_models = {config.n_models})")
    data = _prepare(field, config)
    device, _ = resolve_device(config.device)
    job = _member_job(data, config, index, device, _weak_form(data, config, device, _dtype(config)), cancel)
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value


def assemble_fit(field: DensityField, config: BinnConfig, members: list[MemberResult]) -> BinnFit:
    """The :class:`BinnFit` of trained members (from :func:`train_member`, in any order; they are sorted by
    index): the same fit a serial :func:`train_binn` returns for them."""
    if not members:
        raise ValueError("assemble_fit needs at least one trained member")
    data = _prepare(field, config)
    _, note = resolve_device(config.device)
    return _fit_from(data, config, members, "cpu", note)


#: a member whose data loss at the end of training is this many times its lowest validation loss in the warm-up
#: no longer fits the data (healthy runs end within a few per cent of it)
_LOST_DATA_FACTOR = 3.0


def _lost_the_data(member: MemberResult) -> str:
    """A warning when the PDE term has pulled member's surrogate away from the data it fitted in the warm-up."""
    best = member.status.get("warmup_best_val")
    after = [h for h in member.history if "pde" in h and "data" in h]  # the records with the PDE term on
    kept = [h for h in after if h["step"] == member.status.get("best_step")] or after[-1:]  # the state handed out
    if not best or not kept or member.status.get("cancelled") or not kept[0]["data"] > _LOST_DATA_FACTOR * best:
        return ""
    end = kept[0]["data"]
    return (f"BINN model {member.index + 1}: the surrogate fits the data {end / best:.1f} times worse at the end "
            f"of training than in its warm-up (data loss {end:.3g} against {best:.3g}): the PDE term has pulled "
            "it away from the data (e.g. towards u = 0), so its D(u) and G(u) are not to be trusted; try more "
            "frames, a larger data_weight or a smaller network")


def _fit_from(data: _Data, config: BinnConfig, members: list[MemberResult], device: str, note: str) -> BinnFit:
    """Every step after the members are trained, in one place for the serial and the distributed paths: the
    networks rebuilt from their state dicts (on the CPU, in index order), the fit's metadata."""
    members = sorted(members, key=lambda m: m.index)
    models = []
    for m in members:
        with torch.random.fork_rng(devices=[]):  # building a network must not move the global random state
            model = build_model(config, data.scales, data.bounds, data.d_init).to(dtype=_dtype(config))
        model.load_state_dict(m.state)
        models.append(model)
    statuses = [m.status for m in members]
    cancelled = any(s.get("cancelled") for s in statuses) or len(members) < config.n_models
    metadata = {"cancelled": cancelled, "device_note": note, "members": statuses,
                "n_observed": int(data.u.size), "seeds": [m.seed for m in members],
                "warnings": [w for m in members if (w := _lost_the_data(m))]}
    return BinnFit(models, data.scales, config, data.bounds, data.units, data.u_range, data.u_hist,
                   [m.history for m in members], device, metadata)


def train_binn(field: DensityField, config: BinnConfig | None = None, *,
               cancel: CancelToken | None = None, members: Any = None) -> Generator[Progress, None, BinnFit]:
    """Train a BINN (or an ensemble of ``config.n_models``) on ``field``; a job generator.

    Yields :class:`~napari_binn.jobs.Progress` events (stage ``"train"``) with ``data`` holding ``model``
    (member index), ``losses`` (by term, scaled units), ``val`` (validation loss when it improved), ``lr``,
    and every ``snapshot_every`` steps ``snapshot = {"u_grid", "D", "G"}`` in physical units (density units,
    µm²/h, 1/h). Divergence restarts and the device choice are reported as events too. Returns a
    :class:`BinnFit`; a cancelled job returns the best model so far with ``metadata["cancelled"] = True``.

    members: where the ensemble members train. None: here, one after another. Otherwise an object with
    ``run(field, config, indices, cancel)``, an iterator of :class:`MemberResult` in the order they finish
    (e.g. :class:`napari_binn.batch.cluster.DaskMembers`: one dask task per member); the fit is the same.
    """
    config = config or BinnConfig()
    config.validate()
    data = _prepare(field, config)
    device, note = resolve_device(config.device)
    dtype = _dtype(config)
    per_model = config.steps + config.lbfgs_steps
    clock = ProgressClock(config.n_models * per_model)
    where = device.type if members is None else f"{type(members).__name__}"
    yield clock.event(_STAGE, 0, f"training {config.n_models} BINN(s) on {where}"
                      + (f" ({note})" if note else ""), device=device.type, device_note=note,
                      bounds=dict(data.bounds), K=data.scales.K)
    results: list[MemberResult] = []
    if members is not None:
        for res in members.run(field, config, list(range(config.n_models)), cancel):
            results.append(res)
            yield clock.event(_STAGE, len(results) * per_model, f"model {res.index + 1}/{config.n_models} trained "
                              f"({len(results)} of {config.n_models} done)", model=res.index,
                              val=res.status.get("best_val"))
        device_type = "cpu"
    else:
        weak = _weak_form(data, config, device, dtype)
        if config.weak_weight > 0:
            n_win = 0 if weak is None else weak.n_windows
            yield clock.event(_STAGE, 0, f"weak form: {n_win} space-time windows" if n_win else
                              f"weak form off: no fully observed window of {2 * config.weak_half_boxes + 1}² boxes "
                              f"x {2 * config.weak_half_frames + 1} frames inside the ROI (lower weak_half_boxes "
                              "or weak_half_frames)", weak_windows=n_win)
        for i in range(config.n_models):
            offset = i * per_model
            job = _member_job(data, config, i, device, weak, cancel)
            last_step = 0
            while True:
                try:
                    kind, payload = next(job)
                except StopIteration as stop:
                    results.append(stop.value)
                    break
                if kind == "log":
                    last_step = payload["step"]
                    s = offset + payload["step"]
                    losses = {k: payload[k] for k in ("data", "pde", "weak", "noflux", "constraint") if k in payload}
                    yield clock.event(_STAGE, s, f"model {i + 1}/{config.n_models} step {payload['step']}: "
                                      f"loss {payload['loss']:.3g}", model=i, losses=losses, loss=payload["loss"],
                                      val=payload.get("val"), lr=payload.get("lr"))
                elif kind == "snapshot":
                    yield clock.event(_STAGE, offset + last_step, f"model {i + 1}: D(u), G(u) snapshot", model=i,
                                      snapshot=payload)
                elif kind == "divergence":
                    msg = (f"model {i + 1}: loss diverged at step {payload['step']} ({payload['loss']:.3g}); "
                           + ("too many restarts, keeping the best checkpoint" if payload["give_up"] else
                              f"restored the best checkpoint, learning rate lowered to {payload['lr']:.3g}"))
                    yield clock.event(_STAGE, offset + payload["step"], msg, model=i, divergence=payload)
                elif kind == "warmup_restored":
                    yield clock.event(_STAGE, offset + last_step, f"model {i + 1}: the surrogate learned the noise "
                                      f"in the warm-up (validation loss {payload['end_val']:.3g} at its end, "
                                      f"{payload['val']:.3g} at step {payload['step']}); that step's state "
                                      "restored before the PDE term starts", model=i, warmup_restored=payload)
                elif kind == "paused":
                    yield clock.event(_STAGE, offset + payload["step"], "paused", model=i, paused=True)
            if results[-1].status["cancelled"]:
                break
        device_type = device.type
    fit = _fit_from(data, config, results, device_type, note)
    cancelled = bool(fit.metadata["cancelled"])
    yield clock.event(_STAGE, clock.total,
                      "cancelled: returning the best model so far" if cancelled else "training done",
                      done=True, cancelled=cancelled)
    return fit


def fit_binn(field: DensityField, config: BinnConfig | None = None, *, cancel: CancelToken | None = None,
             callback: Callable[[Progress], None] | None = None, **overrides: Any) -> BinnFit:
    """Blocking form of :func:`train_binn`; ``overrides`` replace config fields as given (``n_models=5``, ...);
    to change the step budget with the warm-up keeping its share, pass ``config.with_steps(n)``."""
    config = (config or BinnConfig()).replace(**overrides) if overrides else (config or BinnConfig())
    return run_job(train_binn(field, config, cancel=cancel), callback)
