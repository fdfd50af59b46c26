"""Results bundles: reading bundles written by earlier versions of napari-binn."""

from pathlib import Path

import numpy as np
import pytest

from napari_binn.results import load_results

DATA = Path(__file__).parent / "data"


def test_schema1_bundle_loads():
    """A bundle of schema 1 (tests/data/make_bundle_schema1.py, written by napari-binn at commit c946738)."""
    result = load_results(DATA / "bundle_schema1")
    assert result.field.u.shape == (4, 6, 8) and result.field.units == "cells/mm²"
    assert result.equations.D.text == "308.344"
    assert result.equations.G.text == "-0.01633*exp(-9.306e-5*u)"
    fkpp = result.mechanistic["fisher_kpp"]
    assert fkpp.params["D"] == pytest.approx(800.964874552193)
    assert fkpp.ci95["D"] == pytest.approx((800.8350927300748, 801.0946774065079))
    refit = result.mechanistic["closed form (refitted)"]
    assert refit.ci95["G_1"] == pytest.approx((-0.0012991513218561168, -0.001261418422078681))
    assert np.all(np.isfinite(result.fit.D(np.linspace(200, 1600, 5))))
    assert {"closed form (refitted)", "fisher_kpp", "BINN surrogate"} <= set(result.simulations)
    assert result.qc["fisher_kpp"].mean_rel_l2 < 0.01
