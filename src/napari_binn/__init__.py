"""napari-binn: learn the reaction–diffusion equation of a cell population from time-lapse microscopy.

The public API is re-exported here and imported on first use, so that opening napari (which reads this
plugin's manifest) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "read_stack": "io", "Stack": "io",
    "extract_density": "density", "DensityField": "field",
    "make_synthetic": "synthetic", "render_microscopy": "synthetic",
    "simulate": "pde", "fit_mechanistic": "pde",
    "BinnConfig": "binn", "train_binn": "binn", "fit_binn": "binn",
    "discover_equations": "symbolic", "Equations": "symbolic",
    "PipelineConfig": "pipeline", "PipelineResult": "pipeline", "run_pipeline": "pipeline",
    "save_results": "results", "load_results": "results",
    "BatchItem": "batch", "run_batch": "batch",
    "NapariBinnError": "errors", "BundleError": "errors", "ConfigError": "errors", "InputError": "errors",
    "OutputError": "errors", "BackendUnavailableError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_binn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .batch import BatchItem, run_batch
    from .binn import BinnConfig, fit_binn, train_binn
    from .density import extract_density
    from .errors import (BackendUnavailableError, BundleError, ConfigError, InputError, NapariBinnError,
                         OutputError)
    from .field import DensityField
    from .io import Stack, read_stack
    from .pde import fit_mechanistic, simulate
    from .pipeline import PipelineConfig, PipelineResult, run_pipeline
    from .results import load_results, save_results
    from .symbolic import Equations, discover_equations
    from .synthetic import make_synthetic, render_microscopy
