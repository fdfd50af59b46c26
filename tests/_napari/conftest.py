"""Shared fixtures of the napari GUI tests: a tiny synthetic nuclei time-lapse (5 frames of 120 x 160 px)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")


def tiny_field(T: int = 5, ny: int = 6, nx: int = 8, dx_um: float = 50.0):
    """A logistic front moving right by 8 µm/h over 24 h, K = 2000 cells/mm², on 50 µm boxes."""
    from napari_binn.field import DensityField

    t = np.linspace(0.0, 24.0, T)
    x = (np.arange(nx) + 0.5) * dx_um
    y = (np.arange(ny) + 0.5) * dx_um
    front = 100.0 + 8.0 * t
    u = 2000.0 / (1.0 + np.exp((x[None, None, :] - front[:, None, None]) / 40.0)) * np.ones((1, ny, 1))
    return DensityField(u, np.ones((ny, nx), bool), x, y, t, "cells/mm²", 2000.0, {})


@pytest.fixture(scope="session")
def tiny_stack():
    """Rendered nuclei of :func:`tiny_field` at 2.5 µm/px (Stack (5, 120, 160), times 0..24 h)."""
    from napari_binn.synthetic.render import render_microscopy

    return render_microscopy(tiny_field(), pixel_size_um=2.5, seed=1).stack


@pytest.fixture
def viewer_with_stack(make_napari_viewer, tiny_stack):
    """A viewer holding the tiny stack as the reader would open it (scale (1, 2.5, 2.5), times in metadata)."""
    from napari_binn._napari._reader import stack_to_layer_data

    viewer = make_napari_viewer()
    data, kwargs, _ = stack_to_layer_data(tiny_stack)
    kwargs["name"] = "nuclei"
    viewer.add_image(data, **kwargs)
    return viewer


TINY_TRAINING = dict(hidden=(16, 16), rate_hidden=(8,), steps=30, warmup_steps=5, n_collocation=256, batch_size=256,
                     log_every=5, snapshot_every=10, val_every=5, device="cpu")


@pytest.fixture
def tiny_density():
    """A fresh :func:`tiny_field` (DensityField (5, 6, 8), cells/mm²)."""
    return tiny_field()


@pytest.fixture
def tiny_config():
    """A BinnConfig of a ~1 s CPU training run (30 steps, tiny networks); pass overrides as keywords."""
    from napari_binn.binn import BinnConfig

    return lambda **kw: BinnConfig(**{**TINY_TRAINING, **kw})
