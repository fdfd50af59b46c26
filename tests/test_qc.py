import numpy as np
import pytest

from napari_binn.field import DensityField
from napari_binn.qc import compare, count_errors, frame_errors, residual_maps, total_count


def _field():
    rng = np.random.default_rng(0)
    u = rng.uniform(100, 200, (4, 5, 6))
    mask = np.ones((5, 6), bool)
    mask[0, 0] = False
    u[:, ~mask] = np.nan
    return DensityField(u, mask, np.arange(6) * 50.0, np.arange(5) * 50.0, np.arange(4.0))


def test_perfect_model_has_zero_error():
    f = _field()
    assert np.allclose(frame_errors(f, f.u), 0)
    assert np.allclose(count_errors(f, f.u), 0)
    assert np.nanmax(np.abs(residual_maps(f, f.u))) == 0


def test_scaled_model_errors_are_exact():
    f = _field()
    model = f.u * 1.1
    assert np.allclose(frame_errors(f, model), 0.1)
    assert np.allclose(count_errors(f, model), 10.0)
    assert np.allclose(residual_maps(f, model)[f.observed], -0.1 * f.u[f.observed])


def test_total_count_is_cells_in_the_roi():
    f = _field()
    u = np.full(f.u.shape, 1000.0)  # cells/mm²; a 50 µm box is 0.0025 mm²
    n = total_count(u, f.mask, 50.0, "cells/mm²")
    assert np.allclose(n, 1000 * 0.0025 * f.mask.sum())


def test_report_table_and_roundtrip():
    from napari_binn.qc import QCReport

    f = _field()
    report = compare(f, {"exact": f.u, "high": f.u * 1.05}, aic={"high": 12.5})
    text = report.table()
    assert "exact" in text and "high" in text and "12.5" in text
    assert report["high"].mean_abs_count_error_pct == pytest.approx(5.0)
    again = QCReport.from_dict(report.to_dict())
    assert again["high"].mean_rel_l2 == pytest.approx(report["high"].mean_rel_l2)


def test_shape_mismatch_is_an_error():
    f = _field()
    with pytest.raises(ValueError, match="shape"):
        frame_errors(f, f.u[:2])
