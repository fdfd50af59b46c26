"""The built-in known-equation sample: a Fisher–KPP population closing a scratch, rendered as nuclei."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..field import DensityField
from .models import Truth, make_synthetic
from .render import RenderedStack, render_microscopy

__all__ = ["SpreadingSample", "spreading_sample", "SAMPLE_MODEL", "SAMPLE_PARAMS"]

#: The sample's ground truth: D in µm²/h, r in 1/h, K in cells/mm².
SAMPLE_MODEL = "fisher_kpp"
SAMPLE_PARAMS = {"D": 800.0, "r": 0.08, "K": 2000.0}


@dataclass
class SpreadingSample:
    """field: the exact density (cells/mm², 50 µm boxes); truth: its equation; rendered: nuclei images of it."""

    field: DensityField
    truth: Truth
    rendered: RenderedStack


def spreading_sample(*, grid: tuple[int, int] = (24, 32), n_frames: int = 13, span_h: float = 48.0,
                     pixel_size_um: float = 2.5, render: bool = True, seed: int = 0) -> SpreadingSample:
    """A scratch closing under Fisher–KPP (D = 800 µm²/h, r = 0.08 /h, K = 2000 cells/mm²).

    The field has 50 µm boxes on a ``grid`` (rows, columns) and ``n_frames`` frames over ``span_h`` hours;
    with ``render`` the nuclei images are drawn at ``pixel_size_um`` (20 px per box at 2.5 µm).
    """
    times_h = np.linspace(0.0, span_h, n_frames)
    field, truth = make_synthetic(SAMPLE_MODEL, dict(SAMPLE_PARAMS), domain="scratch", grid=grid, dx_um=50.0,
                                  times_h=times_h, noise=0.0, seed=seed)
    rendered = render_microscopy(field, pixel_size_um=pixel_size_um, kind="nuclei", seed=seed) if render else None
    return SpreadingSample(field, truth, rendered)  # type: ignore[arg-type]
