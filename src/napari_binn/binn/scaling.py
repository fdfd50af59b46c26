"""Scaled (dimensionless) units used inside the networks, and bounds chosen from the data.

With x̂ = (x - x_c)/ℓ, ŷ = (y - y_c)/ℓ, t̂ = (t - t_c)/θ and û = u/K, the PDE
u_t = T [div(D grad u) + G u] becomes û_t̂ = T [div̂(D̂ grad̂ û) + Ĝ û] with D̂ = D θ/ℓ² and Ĝ = G θ.
ℓ is half the ROI's extent (µm) and θ half the time span (h), so x̂, ŷ, t̂ lie in about [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..field import DensityField

__all__ = ["Scales", "default_bounds"]


@dataclass(frozen=True)
class Scales:
    """Centre and half-extent of space (µm) and time (h), and the density scale K (density units)."""

    x_c_um: float
    y_c_um: float
    length_um: float
    t_c_h: float
    time_h: float
    K: float

    @classmethod
    def from_field(cls, field: DensityField, K: float) -> "Scales":
        iy, ix = np.nonzero(field.mask)
        dx = abs(field.dx_um)
        xs, ys = field.x_um[ix], field.y_um[iy]
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + dx
        t0, t1 = float(field.t_h[0]), float(field.t_h[-1])
        return cls(float(xs.min() + xs.max()) / 2, float(ys.min() + ys.max()) / 2, float(extent) / 2,
                   (t0 + t1) / 2, (t1 - t0) / 2, float(K))

    @property
    def D_unit(self) -> float:
        """µm²/h per unit of scaled D̂."""
        return self.length_um ** 2 / self.time_h

    @property
    def G_unit(self) -> float:
        """1/h per unit of scaled Ĝ."""
        return 1.0 / self.time_h

    def xyt(self, x_um, y_um, t_h) -> np.ndarray:
        """(N, 3) scaled coordinates of broadcast physical coordinates."""
        x, y, t = np.broadcast_arrays(np.asarray(x_um, float), np.asarray(y_um, float), np.asarray(t_h, float))
        return np.stack([((x - self.x_c_um) / self.length_um).ravel(),
                         ((y - self.y_c_um) / self.length_um).ravel(),
                         ((t - self.t_c_h) / self.time_h).ravel()], axis=1)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def default_bounds(scales: Scales) -> dict[str, float]:
    """Physical bounds used when the config leaves them None.

    D in [0, (2ℓ)²/(2θ)] µm²/h: the largest D is the one that spreads cells across the whole ROI within the
    whole time span (anything faster leaves no gradient to learn from). G in ±20/(2θ) 1/h: at most e^20-fold
    growth or decay over the experiment.
    """
    d_max = (2 * scales.length_um) ** 2 / (2 * scales.time_h)
    g = 20.0 / (2 * scales.time_h)
    return {"D_min": 0.0, "D_max": d_max, "G_min": -g, "G_max": g}
