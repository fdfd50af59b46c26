"""Writes ``tests/data/bundle_schema1``: a tiny results bundle of schema 1, made with napari-binn at commit c946738
(before schema 2). Kept to say how the fixture was made; run today, it writes the current schema instead.

Usage: ``python tests/data/make_bundle_schema1.py tests/data/bundle_schema1``
"""

import shutil
import sys
from pathlib import Path

import numpy as np

from napari_binn.jobs import run_job
from napari_binn.pipeline import PipelineConfig, run_pipeline
from napari_binn.results import save_results
from napari_binn.synthetic.models import make_synthetic

fld, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch", grid=(6, 8),
                        dx_um=50.0, times_h=np.linspace(0, 24, 4), seed=0)
cfg = PipelineConfig()
cfg.binn = cfg.binn.replace(steps=30, warmup_steps=10, hidden=(8, 8), rate_hidden=(4,), n_collocation=64,
                            batch_size=64, log_every=10, snapshot_every=10, val_every=10, device="cpu")
cfg.symbolic.backend = "library"
cfg.refit.max_evals = 80
cfg.refit.intervals = "wald"
cfg.refit.candidates = 2
result = run_job(run_pipeline(fld, cfg))
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
save_results(result, out, figures=False)
print(result.equations, result.mechanistic)
