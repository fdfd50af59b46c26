"""Samples of a learned function (u, value, weight, sigma) as input to equation discovery."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FunctionSamples", "samples_from_fit", "MIN_SAMPLES", "DEFAULT_UNITS"]

#: Fewest finite samples accepted for one function (symbolic regression needs a curve, not a handful of points).
MIN_SAMPLES = 10

#: Units of the two functions of u_t = div(D(u) grad u) + G(u) u.
DEFAULT_UNITS = {"D": "µm²/h", "G": "1/h"}


@dataclass
class FunctionSamples:
    """Samples of one scalar function of density to be turned into a closed form.

    u: densities (units ``u_units``), shape (n,).
    value: function values at ``u`` (µm²/h for D, 1/h for G), shape (n,).
    weight: relative importance of each sample (e.g. how much data lies at that density); None = uniform.
    sigma: per-point uncertainty of ``value`` (same units), e.g. the BINN ensemble spread; None = unknown.
    ensemble: optional (n_models, n) values of individual ensemble members, used for constant uncertainties.
    name: 'D' or 'G' (or any label); units: units of ``value``; u_units: units of ``u``.
    u_max: the largest observed density (closed forms must be admissible on [0, u_max]); None = max of ``u``.
    """

    u: np.ndarray
    value: np.ndarray
    weight: np.ndarray | None = None
    sigma: np.ndarray | None = None
    ensemble: np.ndarray | None = None
    name: str = "f"
    units: str = ""
    u_units: str = "u"
    notes: list[str] = field(default_factory=list)
    u_max: float | None = None

    def __post_init__(self) -> None:
        self.u = np.asarray(self.u, dtype=float).ravel()
        self.value = np.asarray(self.value, dtype=float).ravel()
        if self.u.shape != self.value.shape:
            raise ValueError(
                f"FunctionSamples {self.name!r}: u has {self.u.size} points but value has {self.value.size}; "
                "pass one value per density."
            )
        n = self.u.size
        if self.weight is not None:
            self.weight = np.broadcast_to(np.asarray(self.weight, dtype=float), (n,)).copy()
            if np.any(self.weight[np.isfinite(self.weight)] < 0):
                raise ValueError(f"FunctionSamples {self.name!r}: weights must be >= 0.")
        if self.sigma is not None:
            self.sigma = np.broadcast_to(np.asarray(self.sigma, dtype=float), (n,)).copy()
        if self.ensemble is not None:
            self.ensemble = np.atleast_2d(np.asarray(self.ensemble, dtype=float))
            if self.ensemble.shape[1] != n:
                raise ValueError(
                    f"FunctionSamples {self.name!r}: ensemble must have shape (n_models, {n}), "
                    f"got {self.ensemble.shape}."
                )
        if not self.units:
            self.units = DEFAULT_UNITS.get(self.name, "")

    @property
    def u_range(self) -> tuple[float, float]:
        """(min, max) of the sampled densities."""
        return float(np.nanmin(self.u)), float(np.nanmax(self.u))

    def cleaned(self) -> FunctionSamples:
        """Copy without non-finite points (warns how many were dropped); raises if too few remain."""
        ok = np.isfinite(self.u) & np.isfinite(self.value)
        if self.weight is not None:
            ok &= np.isfinite(self.weight)
        n_bad = int((~ok).sum())
        notes = list(self.notes)
        if n_bad:
            msg = f"{self.name}: dropped {n_bad} of {ok.size} samples with NaN/inf density, value or weight."
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            notes.append(msg)
        if ok.sum() < MIN_SAMPLES:
            raise ValueError(
                f"{self.name}: only {int(ok.sum())} finite samples; equation discovery needs at least "
                f"{MIN_SAMPLES}. Sample the function at more densities (e.g. n_samples=200)."
            )
        weight = None if self.weight is None else self.weight[ok]
        if weight is not None and not np.any(weight > 0):
            raise ValueError(f"{self.name}: all weights are zero; give some samples a positive weight.")
        return FunctionSamples(
            u=self.u[ok],
            value=self.value[ok],
            weight=weight,
            sigma=None if self.sigma is None else self.sigma[ok],
            ensemble=None if self.ensemble is None else self.ensemble[:, ok],
            name=self.name,
            units=self.units,
            u_units=self.u_units,
            notes=notes,
            u_max=self.u_max,
        )

    def fit_weights(self) -> np.ndarray:
        """Weights normalised to mean 1 (uniform when none were given)."""
        if self.weight is None:
            return np.ones_like(self.u)
        w = np.asarray(self.weight, dtype=float)
        return w / w.mean()


def _call(fn, u: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(fn(u), dtype=float)


def samples_from_fit(
    fit, *, n_samples: int = 200, quantiles: tuple[float, float] = (0.05, 0.95)
) -> dict[str, FunctionSamples]:
    """Sample a BinnFit's ensemble-mean D(u) and G(u) over the central quantiles of the observed density.

    The densities span the ``quantiles`` of the observed-density histogram ``fit.u_hist`` (counts, edges); each
    sample is weighted by the histogram count at its density (how much data supports it); the spread of
    ``fit.D_ensemble`` / ``fit.G_ensemble`` across models is the per-point ``sigma`` (a refinement's band, which
    the plots show, is not used here). Units come from ``fit.units``
    (keys 'D', 'G', 'u'), defaulting to µm²/h, 1/h.
    """
    if n_samples < MIN_SAMPLES:
        raise ValueError(f"n_samples={n_samples} is below the minimum of {MIN_SAMPLES}.")
    q_lo, q_hi = quantiles
    if not 0.0 <= q_lo < q_hi <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 <= lo < hi <= 1, got {quantiles}.")
    units = dict(getattr(fit, "units", None) or {})
    hist = getattr(fit, "u_hist", None)
    if hist is not None:
        counts, edges = (np.asarray(a, dtype=float) for a in hist)
        if counts.sum() <= 0:
            raise ValueError("BinnFit.u_hist is empty: no observed densities to sample over.")
        cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
        u_lo, u_hi = np.interp([q_lo, q_hi], cdf, edges)
    else:
        rng = fit.u_range
        u_lo, u_hi = (float(rng["min"]), float(rng["max"])) if isinstance(rng, dict) else (float(v) for v in rng)
    if not u_hi > u_lo:
        raise ValueError(f"Observed density range is empty ({u_lo}..{u_hi}); cannot sample D(u), G(u).")
    u = np.linspace(u_lo, u_hi, n_samples)
    if hist is not None:
        centres = 0.5 * (edges[1:] + edges[:-1])
        weight = np.interp(u, centres, counts)
        weight = np.maximum(weight, 1e-3 * weight.max())  # every sampled density keeps a little say
    else:
        weight = None
    rng = getattr(fit, "u_range", None)
    u_max = float(rng["max"]) if isinstance(rng, dict) and "max" in rng else None
    out = {}
    for name in ("D", "G"):
        mean = _call(getattr(fit, name), u)
        ens_fn = getattr(fit, f"{name}_ensemble", None)
        ensemble = _call(ens_fn, u) if ens_fn is not None else None
        sigma = None
        if ensemble is not None and ensemble.ndim == 2 and ensemble.shape[0] > 1:
            sigma = ensemble.std(axis=0, ddof=1)
        else:
            ensemble = None
        # Not the refinement's band (BinnFit.band_sd): the discovery benchmark's figures were measured with the
        # ensemble spread alone (the band never reached this point then), and weighting by it is not yet measured.
        out[name] = FunctionSamples(
            u=u,
            value=mean,
            weight=weight,
            sigma=sigma,
            ensemble=ensemble,
            name=name,
            units=units.get(name, DEFAULT_UNITS[name]),
            u_units=units.get("u", "u"),
            u_max=u_max,
        )
    return out
