"""Fixtures shared by the core tests: a small Fisher–KPP field, a pipeline configuration of a few seconds, and one
whole pipeline run on them."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread: on a small shared CPU, torch's default of one thread per core can be several times
    slower (threads spin-waiting for each other), which would only slow these tests down."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_pipeline_config():
    """A PipelineConfig of a few seconds: a 40-step BINN of two layers of 16, a 10-iteration refinement through the
    solver, term-library discovery, 8-simulation
    refits without intervals."""
    from napari_binn.pipeline import PipelineConfig

    cfg = PipelineConfig()
    cfg.binn = cfg.binn.replace(steps=40, warmup_steps=10, hidden=(16, 16), rate_hidden=(8,), n_collocation=128,
                                batch_size=128, log_every=10, snapshot_every=20, val_every=10, device="cpu")
    cfg.refine.iterations = 10
    cfg.refine.smoothness = [1.0]
    cfg.refine.distill_steps = 20
    cfg.refine.bands = False
    cfg.symbolic.backend = "library"
    cfg.symbolic.seeds = [0]
    cfg.refit.max_evals = 8
    cfg.refit.intervals = "none"
    return cfg


@pytest.fixture
def pipeline_config():
    """A factory of fresh tiny PipelineConfigs (change them freely)."""
    return _tiny_pipeline_config


@pytest.fixture(scope="session")
def fkpp_field():
    """Fisher–KPP (D = 800 µm²/h, r = 0.08 /h, K = 2000 cells/mm²) scratch on 10 x 12 boxes of 50 µm, 5 frames
    over 24 h, noise-free."""
    from napari_binn.synthetic.models import make_synthetic

    fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(10, 12),
                            dx_um=50.0, times_h=np.linspace(0, 24, 5), seed=0)
    return fld


@pytest.fixture(scope="session")
def pipeline_run(fkpp_field):
    """(result, events) of every stage of the pipeline on :func:`fkpp_field` with the tiny configuration.
    Shared: do not change the result (copy what you change)."""
    from napari_binn.jobs import run_job
    from napari_binn.pipeline import run_pipeline

    events = []
    result = run_job(run_pipeline(fkpp_field, _tiny_pipeline_config()), events.append)
    return result, events
