"""DensityField: the one rule for the state a simulation starts from."""

import numpy as np

from napari_binn.field import DensityField, initial_state


def _field(frame0):
    ny, nx = frame0.shape
    mask = np.ones((ny, nx), bool)
    mask[0, :] = False
    u = np.stack([frame0, np.full((ny, nx), 5.0)])
    return DensityField(u, mask, np.arange(nx) * 10.0, np.arange(ny) * 10.0, np.array([0.0, 1.0]))


def test_unobserved_negative_and_outside_boxes_start_at_zero():
    frame = np.full((4, 5), 7.0)
    frame[2, 2], frame[3, 1], frame[0, 3] = np.nan, -0.5, 9.0
    fld = _field(frame)
    u0 = fld.initial_state()
    expected = np.where(fld.mask, frame, 0.0)
    expected[2, 2] = expected[3, 1] = 0.0
    np.testing.assert_array_equal(u0, expected)
    np.testing.assert_array_equal(initial_state(frame, fld.mask), u0)
    assert np.isnan(fld.u[0, 2, 2])  # the field itself is untouched


def test_denoise_zeroes_noise_specks_in_empty_space_only():
    rng = np.random.default_rng(0)
    frame = np.zeros((30, 30))
    frame[:, :12] = 1000.0
    frame += 20.0 * rng.standard_normal(frame.shape)
    mask = np.ones(frame.shape, bool)
    plain, denoised = initial_state(frame, mask), initial_state(frame, mask, denoise=True)
    assert (plain[:, 20:] > 0).sum() > 100  # positive noise in empty space
    assert (denoised[:, 20:] == 0).all()
    np.testing.assert_array_equal(denoised[:, :10], plain[:, :10])
