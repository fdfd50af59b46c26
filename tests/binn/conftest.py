"""Fixtures of the BINN tests: tiny networks and a small noisy front (~10 x 10 boxes, few steps)."""

import numpy as np
import pytest

from napari_binn.field import DensityField

TINY = dict(hidden=(16, 16), rate_hidden=(8,), n_collocation=128, batch_size=128, warmup_steps=5,
            val_every=5, log_every=5, snapshot_every=10, device="cpu")


def _make_field(n=10, frames=5, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(n) * 50.0
    t = np.arange(frames) * 2.0
    X = x[None, None, :]
    front = 150.0 + 20.0 * t[:, None, None]
    u = 1.0 / (1.0 + np.exp((X - front) / 60.0)) * (0.5 + 0.05 * t[:, None, None])
    u = np.broadcast_to(u, (frames, n, n)) + 0.01 * rng.standard_normal((frames, n, n))
    return DensityField(u, np.ones((n, n), bool), x, x.copy(), t, units="fraction", K=None)


@pytest.fixture
def tiny():
    """BinnConfig settings of a tiny, fast CPU network (pass as ``**tiny``)."""
    return dict(TINY)


@pytest.fixture
def binn_field():
    """A factory of small fields (a front moving right, in 'fraction' units, 1% noise): ``binn_field(n=10,
    frames=5, seed=0)``."""
    return _make_field
