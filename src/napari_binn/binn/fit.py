"""BinnFit: the result of a BINN fit, in physical units, with a safe save/load (safetensors + JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BundleError
from .config import BinnConfig
from .nets import BinnModel
from .scaling import Scales

__all__ = ["BinnFit", "PhysicalRate", "build_model"]

_WEIGHTS = "binn_weights.safetensors"
_META = "binn_fit.json"
_FORMAT = "napari-binn.binn_fit/1"


#: softplus D scale as a fraction of the starting D: D(u) is affine in the network output from about this D up
_SOFTPLUS_UNIT = 0.1


def build_model(config: BinnConfig, scales: Scales, bounds: dict[str, float],
                D_init: float | None = None) -> BinnModel:
    """A fresh :class:`BinnModel` whose D/G bounds are ``bounds`` (physical) converted to scaled units.

    D starts near ``D_init`` µm²/h (default: the geometric middle of the bounds on a log scale, else 2% of
    the range on a linear scale).
    """
    d_lo, d_hi = bounds["D_min"] / scales.D_unit, bounds["D_max"] / scales.D_unit
    g_lo, g_hi = bounds["G_min"] / scales.G_unit, bounds["G_max"] / scales.G_unit
    decades = float(config.D_decades)
    span = bounds["D_max"] - bounds["D_min"]
    if D_init is not None:
        d_init = (D_init - bounds["D_min"]) / span
    else:
        d_init = 10.0 ** (-decades / 2) if decades > 0 else 0.02
    d_unit = None
    if config.D_output == "softplus":  # a tenth of the starting D (kept in the state dict, for loading)
        d_unit = max(_SOFTPLUS_UNIT * d_init * (d_hi - d_lo), 1e-12)
    return BinnModel(config.hidden, config.activation, config.rate_hidden, (d_lo, d_hi), (g_lo, g_hi),
                     config.use_delay, d_init_fraction=d_init, d_decades=decades, d_unit=d_unit)


class PhysicalRate(nn.Module):
    """Torch module u (density units) -> ensemble-mean D (µm²/h) or G (1/h), for ``pde.simulate``."""

    def __init__(self, nets: list[nn.Module], K: float, unit: float, kind: str) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.K = float(K)
        self.unit = float(unit)
        self.kind = kind

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        p = next(self.nets[0].parameters())
        uh = (u.to(p.dtype) / self.K).reshape(-1)
        out = torch.stack([net(uh) for net in self.nets]).mean(0) * self.unit
        return out.reshape(u.shape).to(u.dtype)

    def extra_repr(self) -> str:
        unit = "µm²/h" if self.kind == "D" else "1/h"
        return f"kind={self.kind}, n_models={len(self.nets)}, K={self.K:g}, output in {unit}"


@dataclass
class BinnFit:
    """A trained BINN (or ensemble): numpy-in, numpy-out callables in physical units.

    u(x_um, y_um, t_h) -> density in ``units['u']``; D(u) -> µm²/h; G(u) -> 1/h; T(t_h) -> (0, 1].
    With ``n_models > 1`` these are ensemble means; ``D_ensemble``/``G_ensemble`` give every member and
    ``D_std``/``G_std`` the spread. ``u_range`` holds the observed density's quantiles (``q05``, ``q95``) and
    ``min``/``max``; ``u_hist`` its histogram (counts, bin edges): later stages restrict D and G to it.
    """

    members: list[BinnModel]
    scales: Scales
    config: BinnConfig
    bounds: dict[str, float]
    units: dict[str, str]
    u_range: dict[str, float]
    u_hist: tuple[np.ndarray, np.ndarray]
    history: list[list[dict[str, Any]]] = field(default_factory=list)
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.members:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    @property
    def n_models(self) -> int:
        return len(self.members)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.members[0].parameters()).dtype

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64)).to(self._dtype)

    def u(self, x_um, y_um, t_h) -> np.ndarray:
        """Surrogate density at broadcast (x µm, y µm, t h), in ``units['u']`` (ensemble mean)."""
        shape = np.broadcast_shapes(np.shape(x_um), np.shape(y_um), np.shape(t_h))
        xyt = self._tensor(self.scales.xyt(x_um, y_um, t_h))
        with torch.no_grad():
            out = torch.stack([m.unet(xyt) for m in self.members]).mean(0)
        return (out.double().numpy() * self.scales.K).reshape(shape)

    def _rates(self, u, kind: str) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        uh = self._tensor(u.ravel() / self.scales.K)
        unit = self.scales.D_unit if kind == "D" else self.scales.G_unit
        with torch.no_grad():
            out = torch.stack([(m.dnet if kind == "D" else m.gnet)(uh) for m in self.members])
        return out.double().numpy().reshape((self.n_models, *u.shape)) * unit

    def D_ensemble(self, u) -> np.ndarray:
        """(n_models, *u.shape) diffusivity of every member, µm²/h."""
        return self._rates(u, "D")

    def G_ensemble(self, u) -> np.ndarray:
        """(n_models, *u.shape) per-capita growth rate of every member, 1/h."""
        return self._rates(u, "G")

    def D(self, u) -> np.ndarray:
        """Ensemble-mean diffusivity D(u) in µm²/h at densities ``u`` (``units['u']``)."""
        return self.D_ensemble(u).mean(0)

    def G(self, u) -> np.ndarray:
        """Ensemble-mean growth rate G(u) in 1/h at densities ``u`` (``units['u']``)."""
        return self.G_ensemble(u).mean(0)

    def D_std(self, u) -> np.ndarray:
        """Ensemble standard deviation of D(u), µm²/h (zeros for a single model)."""
        return self.D_ensemble(u).std(0)

    def G_std(self, u) -> np.ndarray:
        """Ensemble standard deviation of G(u), 1/h (zeros for a single model)."""
        return self.G_ensemble(u).std(0)

    def band_sd(self, kind: str, u) -> np.ndarray | None:
        """Standard deviation of the learned ``kind`` ('D', µm²/h, or 'G', 1/h) at densities ``u``: how well the
        data determine it. A forward-solver refinement's band (``metadata['refine']``: ``D_sd`` / ``G_sd`` at its
        ``u_nodes``) is preferred when present; else the spread of the ensemble members (n_models > 1); None for a
        single model with no refinement band (no spread is known)."""
        if kind not in ("D", "G"):
            raise ValueError(f"band_sd: kind must be 'D' or 'G'; got {kind!r}")
        u = np.asarray(u, dtype=np.float64)
        refine = self.metadata.get("refine") if isinstance(self.metadata, dict) else None
        if isinstance(refine, dict) and refine.get(f"{kind}_sd") is not None and refine.get("u_nodes") is not None:
            grid = np.asarray(refine["u_nodes"], dtype=np.float64).ravel()
            sd = np.asarray(refine[f"{kind}_sd"], dtype=np.float64).ravel()
            if grid.size == sd.size and grid.size >= 2 and np.all(np.diff(grid) > 0):
                return np.interp(u, grid, sd)
        if self.n_models < 2:
            return None
        return self._rates(u, kind).std(0, ddof=1)

    def determined_range(self, kind: str, tolerance: float = 0.25, n: int = 201) -> tuple[float, float] | None:
        """The density range (units of u) where the learned ``kind`` is determined by the data: inside the observed
        densities' central 90% (:meth:`density_range`: where there are data, from 0 up) and where the band is narrow,
        2·band_sd / max(|f(u)|, 0.1·max|f|) < ``tolerance`` (f the ensemble mean; the floor keeps a G that
        crosses zero from counting as undetermined at its root). The longest such stretch, or None when there
        is none. With a single model (no band) it is the data range alone."""
        if not 0 < float(tolerance):
            raise ValueError(f"determined_range: tolerance must be > 0 (a relative band width); got {tolerance}")
        u = self.u_grid(n, central=True)
        sd = self.band_sd(kind, u)
        if sd is None:
            return float(u[0]), float(u[-1])
        f = self.D(u) if kind == "D" else self.G(u)
        scale = np.maximum(np.abs(f), 0.1 * max(float(np.max(np.abs(f))), 1e-300))
        ok = 2.0 * sd / scale < float(tolerance)
        best, start = None, None
        for i, flag in enumerate(np.append(ok, False)):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                if best is None or i - start > best[1] - best[0]:
                    best = (start, i)
                start = None
        if best is None:
            return None
        return float(u[best[0]]), float(u[best[1] - 1])

    def T(self, t_h) -> np.ndarray:
        """Delay factor T(t) in (0, 1] at times ``t_h`` (ones when the fit has no delay network)."""
        t = np.asarray(t_h, dtype=np.float64)
        th = self._tensor((t.ravel() - self.scales.t_c_h) / self.scales.time_h)
        with torch.no_grad():
            out = torch.stack([m.delay(th) for m in self.members]).mean(0)
        return out.double().numpy().reshape(t.shape)

    @property
    def D_module(self) -> PhysicalRate:
        """Torch module u -> ensemble-mean D(u) in µm²/h (accepted by ``pde.simulate``)."""
        return PhysicalRate([m.dnet for m in self.members], self.scales.K, self.scales.D_unit, "D")

    @property
    def G_module(self) -> PhysicalRate:
        """Torch module u -> ensemble-mean G(u) in 1/h (accepted by ``pde.simulate``)."""
        return PhysicalRate([m.gnet for m in self.members], self.scales.K, self.scales.G_unit, "G")

    def density_range(self, central: bool = True, from_zero: bool = True) -> tuple[float, float]:
        """The observed densities' range: central 90% (``u_range`` q05..q95) if ``central``, else min..max. With
        ``from_zero`` it starts at 0 at the lowest: observed values below 0 are noise around empty space (the field
        starts them at 0 too), not densities, so plots, the determined range and reports start at 0."""
        lo, hi = (float(self.u_range[k]) for k in (("q05", "q95") if central else ("min", "max")))
        return (max(lo, 0.0) if from_zero and hi > 0 else lo), hi

    def u_grid(self, n: int = 101, central: bool = True, from_zero: bool = True) -> np.ndarray:
        """``n`` evenly spaced densities over :meth:`density_range` (same arguments)."""
        return np.linspace(*self.density_range(central, from_zero), n)

    def __repr__(self) -> str:
        flags = " (cancelled: best model so far)" if self.metadata.get("cancelled") else ""
        return (f"BinnFit({self.n_models} model(s), device {self.device!r}, u in {self.units['u']}, "
                f"D in [{self.bounds['D_min']:.3g}, {self.bounds['D_max']:.3g}] µm²/h, "
                f"G in [{self.bounds['G_min']:.3g}, {self.bounds['G_max']:.3g}] 1/h{flags})")

    # --- persistence -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``binn_weights.safetensors`` and ``binn_fit.json`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"m{i}.{k}": v.detach().cpu().contiguous()
                   for i, m in enumerate(self.members) for k, v in m.state_dict().items()}
        meta = {
            "format": _FORMAT,
            "n_models": self.n_models,
            "dtype": str(self._dtype).replace("torch.", ""),
            "config": self.config.to_dict(),
            "scales": self.scales.to_dict(),
            "bounds": self.bounds,
            "units": self.units,
            "u_range": self.u_range,
            "u_hist": {"counts": np.asarray(self.u_hist[0]).tolist(), "edges": np.asarray(self.u_hist[1]).tolist()},
            "history": self.history,
            "device": self.device,
            "metadata": _jsonable(self.metadata),
        }
        tmp_w, tmp_m = directory / (_WEIGHTS + ".tmp"), directory / (_META + ".tmp")
        save_file(tensors, str(tmp_w))
        tmp_m.write_text(json.dumps(meta, indent=1, allow_nan=True), encoding="utf-8")
        tmp_w.replace(directory / _WEIGHTS)
        tmp_m.replace(directory / _META)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "BinnFit":
        """Read a fit written by :meth:`save`. Only tensors and JSON are read; nothing is unpickled."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (_META, _WEIGHTS):
            if not (directory / name).is_file():
                raise BundleError(f"{directory} holds no BINN fit: {name} is missing (a fit is {_META} and "
                                  f"{_WEIGHTS})", file=directory / name)
        try:
            meta = json.loads((directory / _META).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{directory / _META} is not valid JSON ({exc})", file=directory / _META) from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            what = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise BundleError(f"{directory / _META} is not a napari-binn BINN fit (format {what!r})",
                              file=directory / _META, key="format")
        _check_safetensors(directory / _WEIGHTS)
        cfg_d = dict(meta["config"])
        cfg_d.setdefault("D_decades", 0.0)  # fits saved before the log-scale D network used a linear scale
        cfg_d.setdefault("D_output", "log")  # and those saved before the softplus D network, D_decades' scale
        config = BinnConfig.from_dict(cfg_d)
        scales = Scales(**meta["scales"])
        tensors = load_file(str(directory / _WEIGHTS))
        n_models = meta["n_models"]
        stored = len({k.split(".", 1)[0] for k in tensors})
        if not isinstance(n_models, int) or isinstance(n_models, bool) or n_models != stored:
            raise BundleError(f"{directory / _META}: n_models is {n_models!r} but {_WEIGHTS} holds {stored} "
                              "network(s)", file=directory / _META, key="n_models")
        members = []
        for i in range(n_models):
            m = build_model(config, scales, meta["bounds"]).to(getattr(torch, meta["dtype"]))
            prefix = f"m{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            members.append(m)
        hist = (np.asarray(meta["u_hist"]["counts"]), np.asarray(meta["u_hist"]["edges"], dtype=float))
        return cls(members, scales, config, meta["bounds"], meta["units"], meta["u_range"], hist,
                   meta["history"], meta["device"], meta["metadata"])


def _check_safetensors(path: Path) -> None:
    """Refuse a weights file that is not safetensors (a pickle or a torch.save file: those could run code, and
    are never read) with a message saying so."""
    with path.open("rb") as fh:  # closed at once (a bare open().read() left it to the garbage collector)
        head = fh.read(9)
    size = path.stat().st_size
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or not 0 < n <= size - 8 or head[8:9] != b"{":
        kind = ("a pickle" if head[:1] == b"\x80" else "a zip archive (torch.save?)" if head[:2] == b"PK"
                else "something else")
        raise BundleError(f"this bundle's weights are not a safetensors file ({path.name} looks like {kind}); "
                          "napari-binn reads only safetensors weights (no pickles): write the bundle again with "
                          "napari-binn", file=path)


def _jsonable(obj: Any) -> Any:
    """Metadata reduced to JSON types (unknown objects become their str)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    return str(obj)
