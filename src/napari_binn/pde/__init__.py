"""Reaction–diffusion engine: masked-grid finite-volume operators, the forward solver, mechanistic fitting."""

from .grid import MaskedGrid
from .mechanistic import MechanisticFit, fit_mechanistic, fit_mechanistic_job
from .solver import SimulationError, simulate, simulate_field, simulate_job

__all__ = ["simulate", "simulate_job", "simulate_field", "SimulationError", "MaskedGrid", "fit_mechanistic",
           "fit_mechanistic_job", "MechanisticFit"]
