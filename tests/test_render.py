"""Synthetic microscopy renderer: exact counts, placement, alignment, determinism."""

import numpy as np
import pytest

from napari_binn.field import DensityField
from napari_binn.synthetic.render import render_microscopy


def _field(u, mask=None, units="cells/mm²", box_um=50.0):
    u = np.asarray(u, float)
    T, ny, nx = u.shape
    mask = np.ones((ny, nx), bool) if mask is None else mask
    return DensityField(u, mask, box_um * np.arange(nx), box_um * np.arange(ny), np.arange(T, dtype=float),
                        units=units)


def test_counts_match_positions_and_boxes():
    u = np.full((2, 4, 5), 1200.0)
    mask = np.ones((4, 5), bool)
    mask[0, :2] = False
    r = render_microscopy(_field(u, mask), pixel_size_um=2.0, seed=3)
    b = r.box_px
    assert b == 25 and r.stack.shape == (2, 100, 125)
    assert r.stack.data.dtype == np.uint16 and r.stack.pixel_size_um == 2.0
    for t in range(2):
        pos = r.positions[t]
        assert len(pos) == r.counts[t].sum()
        bi = np.floor((pos[:, 0] + 0.5) / b).astype(int)
        bj = np.floor((pos[:, 1] + 0.5) / b).astype(int)
        recount = np.zeros((4, 5), int)
        np.add.at(recount, (bi, bj), 1)
        np.testing.assert_array_equal(recount, r.counts[t])
    assert r.counts[:, ~mask].sum() == 0
    assert r.pixel_mask.shape == (100, 125) and not r.pixel_mask[:25, :50].any() and r.pixel_mask[:25, 50:].all()


def test_poisson_mean_and_units():
    u = np.full((3, 8, 8), 0.5)
    r = render_microscopy(_field(u, units="fraction"), pixel_size_um=2.5, seed=1,
                          cells_per_mm2_at_confluence=2000.0)
    expected = 0.5 * 2000.0 * 0.0025 * u.size  # cells/mm² x mm² per box x boxes
    assert abs(r.counts.sum() - expected) < 4 * np.sqrt(expected)
    np.testing.assert_allclose(r.true_density, r.counts / 0.0025)


def test_min_separation_and_nuclei_brightness_at_positions():
    u = np.full((1, 6, 6), 1700.0)
    r = render_microscopy(_field(u), pixel_size_um=2.0, seed=0, nucleus_diameter_um=10.0, read_noise=0.0)
    pos = r.positions[0]
    d = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 5.0 - 1e-9  # one nucleus diameter in pixels
    img = r.stack.data[0].astype(float)
    ri, ci = np.rint(pos).astype(int).T
    ok = (ri >= 0) & (ri < img.shape[0]) & (ci >= 0) & (ci < img.shape[1])
    on = img[ri[ok], ci[ok]].mean()
    assert on > 5 * np.median(img)  # nuclei are drawn where the positions say


def test_phase_kind_and_coverage():
    u = np.zeros((2, 4, 4))
    u[:, :, 2:] = 1500.0
    r = render_microscopy(_field(u), pixel_size_um=2.0, kind="phase", seed=0)
    assert r.stack.data.dtype == np.uint8
    assert np.all((r.coverage >= 0) & (r.coverage <= 1))
    assert r.coverage[:, :, 0].max() == 0 and r.coverage[:, :, 2:].mean() > 0.2
    img = r.stack.data[0].astype(float)
    assert img[:, 60:].std() > 2 * img[:, :40].std()  # textured cells vs flat background


def test_deterministic_and_seed_dependent():
    u = np.full((2, 4, 4), 1000.0)
    f = _field(u)
    a, b, c = (render_microscopy(f, seed=s) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.stack.data, b.stack.data)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert not np.array_equal(a.stack.data, c.stack.data)


def test_pixel_size_must_divide_box():
    with pytest.raises(ValueError, match="whole number"):
        render_microscopy(_field(np.ones((1, 3, 3))), pixel_size_um=3.0)
    with pytest.raises(ValueError, match="kind"):
        render_microscopy(_field(np.ones((1, 3, 3))), kind="brightfield")
