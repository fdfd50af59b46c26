"""Pareto fronts of (complexity, loss) and the rules that pick one expression from them."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SELECTION_RULES", "pareto_indices", "front_scores", "select_index", "significant_indices"]

SELECTION_RULES = ("best", "accuracy", "score")


def pareto_indices(complexities, losses) -> list[int]:
    """Indices of the Pareto front, by increasing complexity: each member is strictly more accurate than all
    simpler ones (ties in complexity keep the lowest loss, then the first)."""
    order = sorted(range(len(losses)), key=lambda i: (complexities[i], losses[i], i))
    front: list[int] = []
    best = math.inf
    for i in order:
        if losses[i] < best and (not front or complexities[i] > complexities[front[-1]]):
            front.append(i)
            best = losses[i]
    return front


def front_scores(complexities, losses) -> np.ndarray:
    """PySR's score along a front sorted by complexity: -d log(loss) / d complexity to the previous member
    (0 for the simplest). Zero losses are floored at the smallest positive double so logs stay finite."""
    c = np.asarray(complexities, dtype=float)
    loss = np.maximum(np.asarray(losses, dtype=float), np.finfo(float).tiny)
    scores = np.zeros(len(c))
    if len(c) > 1:
        scores[1:] = -np.diff(np.log(loss)) / np.diff(c)
    return scores


def select_index(
    complexities, losses, rule: str = "best", *, loss_factor: float = 1.5, loss_floor: float = 0.0
) -> int:
    """Position on a complexity-sorted front chosen by ``rule``.

    'best' (PySR's default): highest score among members whose loss is <= ``loss_factor`` x the lowest loss;
    'accuracy': the lowest loss; 'score': the highest score overall. Ties go to the simpler expression.
    Losses below ``loss_floor`` (round-off level of exact data) count as equal to it.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"Unknown selection rule {rule!r}; choose one of {', '.join(SELECTION_RULES)}.")
    if len(losses) == 0:
        raise ValueError("Cannot select from an empty Pareto front.")
    losses = np.maximum(np.asarray(losses, dtype=float), loss_floor)
    scores = front_scores(complexities, losses)
    if rule == "accuracy":
        return int(np.argmin(losses))
    if rule == "score":
        return int(np.argmax(scores))
    eligible = np.flatnonzero(losses <= loss_factor * losses.min())
    return int(eligible[np.argmax(scores[eligible])])


def significant_indices(losses, n_constants, n_effective: float, *, loss_floor: float = 0.0) -> list[int]:
    """Members of a complexity-sorted front whose gain over the last kept simpler member is significant.

    A member is kept when n_eff * log(loss_prev / loss) exceeds log(n_eff) per added constant (at least one),
    the BIC penalty; this stops a constant or a simple form from losing to a look-alike that only fits noise.
    The simplest member is always kept.
    """
    losses = np.maximum(np.asarray(losses, dtype=float), max(loss_floor, np.finfo(float).tiny))
    keep = [0]
    penalty = math.log(max(n_effective, 2.0))
    for i in range(1, len(losses)):
        j = keep[-1]
        added = max(int(n_constants[i]) - int(n_constants[j]), 1)
        if n_effective * math.log(losses[j] / losses[i]) > penalty * added:
            keep.append(i)
    return keep
