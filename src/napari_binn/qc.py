"""Quality control: how well a model (surrogate or simulation) reproduces the observed density.

Metrics are computed inside the ROI mask at observed boxes only:

- per-frame relative L2 error ``||u_model - u_obs|| / ||u_obs||``;
- total cell number N(t) = sum of u over the ROI x box area, and its percentage error against the data
  (Lavery et al. 2026's headline metric), reported as the mean and the maximum over frames after the first;
- residual maps ``u_obs - u_model`` (the sign convention of the residual layers: positive = model too low).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .field import DensityField

__all__ = ["frame_errors", "total_count", "count_errors", "residual_maps", "ModelQC", "QCReport", "compare"]


def _observed(field_: DensityField, model: np.ndarray) -> np.ndarray:
    model = np.asarray(model, dtype=np.float64)
    if model.shape != field_.u.shape:
        raise ValueError(f"model array shape {model.shape} does not match the field's {field_.u.shape}")
    return field_.observed & np.isfinite(model)


def frame_errors(field_: DensityField, model: np.ndarray) -> np.ndarray:
    """(T,) relative L2 error of ``model`` against the data per frame, over boxes observed in both."""
    ok = _observed(field_, model)
    err = np.full(field_.n_frames, np.nan)
    for t in range(field_.n_frames):
        obs = field_.u[t][ok[t]]
        if obs.size:
            norm = np.linalg.norm(obs)
            err[t] = np.linalg.norm(np.asarray(model)[t][ok[t]] - obs) / norm if norm > 0 else np.nan
    return err


def total_count(u: np.ndarray, mask: np.ndarray, box_um: float, units: str) -> np.ndarray:
    """(T,) total amount in the ROI per frame: cells when ``units`` is cells/mm², else sum(u) x box area in mm²."""
    area_mm2 = (box_um * 1e-3) ** 2
    vals = np.where(mask[None] & np.isfinite(u), u, 0.0)
    return vals.sum(axis=(1, 2)) * area_mm2


def count_errors(field_: DensityField, model: np.ndarray) -> np.ndarray:
    """(T,) percentage error of the model's total count N(t) against the data's (boxes observed in both)."""
    ok = _observed(field_, model)
    n_obs = total_count(np.where(ok, field_.u, np.nan), field_.mask, field_.dx_um, field_.units)
    n_mod = total_count(np.where(ok, model, np.nan), field_.mask, field_.dx_um, field_.units)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_obs > 0, 100.0 * (n_mod - n_obs) / n_obs, np.nan)


def residual_maps(field_: DensityField, model: np.ndarray) -> np.ndarray:
    """(T, Ny, Nx) observed minus model, NaN where either is missing or outside the ROI."""
    ok = _observed(field_, model)
    return np.where(ok, field_.u - np.asarray(model, dtype=np.float64), np.nan)


@dataclass
class ModelQC:
    """QC figures of one model against the data."""

    name: str
    frame_rel_l2: np.ndarray
    count_pct_error: np.ndarray
    aic: float | None = None
    note: str = ""

    @property
    def mean_rel_l2(self) -> float:
        return float(np.nanmean(self.frame_rel_l2[1:])) if self.frame_rel_l2.size > 1 else float("nan")

    @property
    def mean_abs_count_error_pct(self) -> float:
        return float(np.nanmean(np.abs(self.count_pct_error[1:]))) if self.count_pct_error.size > 1 else float("nan")

    @property
    def max_abs_count_error_pct(self) -> float:
        return float(np.nanmax(np.abs(self.count_pct_error[1:]))) if self.count_pct_error.size > 1 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "mean_rel_l2": self.mean_rel_l2,
            "mean_abs_count_error_pct": self.mean_abs_count_error_pct,
            "max_abs_count_error_pct": self.max_abs_count_error_pct,
            "frame_rel_l2": [None if not np.isfinite(v) else float(v) for v in self.frame_rel_l2],
            "count_pct_error": [None if not np.isfinite(v) else float(v) for v in self.count_pct_error],
            "aic": self.aic, "note": self.note,
        }


@dataclass
class QCReport:
    """QC of several models against one density field; ``table()`` is the one table a user reads."""

    models: list[ModelQC] = field(default_factory=list)
    units: str = ""

    def __getitem__(self, name: str) -> ModelQC:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in the QC report; have {[m.name for m in self.models]}")

    def table(self) -> str:
        """Plain-text table: frames after the first (frame 0 is the initial condition of the simulations)."""
        head = f"{'model':<28}{'rel. L2 error':>14}{'N(t) error':>12}{'max N(t) err':>14}{'AIC':>12}"
        lines = [head, "-" * len(head)]
        for m in self.models:
            aic = f"{m.aic:.1f}" if m.aic is not None and np.isfinite(m.aic) else "-"
            lines.append(f"{m.name:<28}{100 * m.mean_rel_l2:>13.1f}%{m.mean_abs_count_error_pct:>11.2f}%"
                         f"{m.max_abs_count_error_pct:>13.2f}%{aic:>12}" + (f"  {m.note}" if m.note else ""))
        lines.append("rel. L2: mean over frames of ||model - data|| / ||data|| in the ROI; N(t) error: mean |%| "
                     "difference of the total cell number.")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "models": [m.to_dict() for m in self.models]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QCReport":
        models = []
        for m in d.get("models", []):
            arr = lambda key: np.array([np.nan if v is None else v for v in m.get(key, [])], dtype=float)  # noqa: E731
            models.append(ModelQC(str(m["name"]), arr("frame_rel_l2"), arr("count_pct_error"),
                                  m.get("aic"), str(m.get("note", ""))))
        return cls(models, str(d.get("units", "")))


def compare(field_: DensityField, models: dict[str, np.ndarray], aic: dict[str, float] | None = None,
            notes: dict[str, str] | None = None) -> QCReport:
    """QC report of each named (T, Ny, Nx) model array against ``field_``."""
    aic = aic or {}
    notes = notes or {}
    rows = [ModelQC(name, frame_errors(field_, arr), count_errors(field_, arr), aic.get(name), notes.get(name, ""))
            for name, arr in models.items()]
    return QCReport(rows, field_.units)
