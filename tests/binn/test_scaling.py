"""Scaled units inside the networks and the bounds chosen from the data."""

import numpy as np
import pytest

from napari_binn.binn import Scales, default_bounds


def test_scales_map_the_roi_and_time_span_to_about_minus_one_one(binn_field):
    f = binn_field(n=10, frames=5)  # boxes 0..450 µm, times 0..8 h
    sc = Scales.from_field(f, K=2.0)
    corners = sc.xyt([0.0, 450.0], [0.0, 450.0], [0.0, 8.0])
    assert corners[:, 0] == pytest.approx([-450 / 500, 450 / 500])  # half extent 250 µm (a box wider than centres)
    assert corners[:, 2] == pytest.approx([-1.0, 1.0])
    assert sc.D_unit == pytest.approx(250.0 ** 2 / 4.0) and sc.G_unit == pytest.approx(0.25)
    assert Scales(**sc.to_dict()) == sc


def test_default_bounds_follow_the_domain_and_time_span(binn_field):
    sc = Scales.from_field(binn_field(), K=1.0)
    b = default_bounds(sc)
    assert b["D_min"] == 0.0 and b["D_max"] == pytest.approx(500.0 ** 2 / 8.0)  # across the ROI in the whole span
    assert b["G_max"] == -b["G_min"] == pytest.approx(20.0 / 8.0)  # at most e^20-fold over the experiment
    assert np.isfinite(list(b.values())).all()
