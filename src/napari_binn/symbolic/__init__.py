"""Equation discovery: closed forms for the learned D(u) and G(u), GUI-free.

One interface (:func:`discover_equations`) over three backends: 'operon' (default), 'pysr' (optional) and
'library' (sparse regression over a biology-aware term library).
"""

from .backends import DEFAULT_OPERATORS, OPERATOR_NAMES
from .discover import DiscoveredFunction, Equations, FrontRow, discover_equations, discover_equations_job
from .expression import Constant, Expression, ExtrapolationWarning
from .samples import FunctionSamples, samples_from_fit
from .selection import SELECTION_RULES, front_scores, pareto_indices, select_index

__all__ = [
    "discover_equations",
    "discover_equations_job",
    "Equations",
    "DiscoveredFunction",
    "FrontRow",
    "Expression",
    "Constant",
    "ExtrapolationWarning",
    "FunctionSamples",
    "samples_from_fit",
    "select_index",
    "pareto_indices",
    "front_scores",
    "SELECTION_RULES",
    "OPERATOR_NAMES",
    "DEFAULT_OPERATORS",
]
