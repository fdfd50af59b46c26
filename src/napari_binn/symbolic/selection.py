"""Pareto fronts of (complexity, loss) and the rules that pick one expression from them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["SELECTION_RULES", "pareto_indices", "front_scores", "select_index", "significant_indices",
           "block_errors", "paired_worse_pvalue", "paired_better_pvalue", "heldout_choice",
           "insample_switch"]

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


def block_errors(predicted: np.ndarray, observed: np.ndarray, mask: np.ndarray, block: int = 4) -> np.ndarray:
    """Squared prediction errors summed per spatial block of ``block`` x ``block`` grid boxes (and over frames).

    predicted, observed: (T, Ny, Nx) (e.g. the held-out frames); mask: (Ny, Nx). Boxes outside the mask or
    unobserved (NaN data) do not count; a non-finite prediction at an observed box makes its block inf. Returns
    the errors of the blocks that hold at least one observed box, in a fixed (row-major) order, so two candidates'
    arrays pair block by block.
    """
    predicted = np.asarray(predicted, dtype=float)
    observed = np.asarray(observed, dtype=float)
    if predicted.shape != observed.shape:
        raise ValueError(f"block_errors: predicted {predicted.shape} and observed {observed.shape} differ")
    if int(block) < 1:
        raise ValueError(f"block_errors: block must be >= 1 boxes; got {block}")
    seen = np.asarray(mask, dtype=bool)[None] & np.isfinite(observed)
    with np.errstate(invalid="ignore"):
        sq = np.where(seen, (predicted - observed) ** 2, 0.0)
    sq = np.where(seen & ~np.isfinite(sq), np.inf, sq)
    _, ny, nx = observed.shape
    out = []
    for y0 in range(0, ny, block):
        for x0 in range(0, nx, block):
            if seen[:, y0:y0 + block, x0:x0 + block].any():
                out.append(float(sq[:, y0:y0 + block, x0:x0 + block].sum()))
    return np.asarray(out)


def paired_worse_pvalue(errors: np.ndarray, best: np.ndarray, margin: float = 0.0) -> float:
    """One-sided p-value of a paired t test over blocks that ``errors`` exceed ``best``'s by more than the
    fraction ``margin`` (differences errors - (1 + margin)·best).

    Small p: the candidate predicts the held-out frames worse than the best by more than the margin, in a way
    the block-to-block variation cannot explain (the margin keeps a consistent but negligible difference, as on
    noise-free data, from excluding a form). Fewer than 3 blocks: 1 (no test possible: nothing is excluded).
    A candidate with an infinite error (failed prediction) gets 0.
    """
    errors, best = np.asarray(errors, dtype=float), np.asarray(best, dtype=float)
    if errors.shape != best.shape:
        raise ValueError("paired_worse_pvalue: the two error arrays must pair block by block")
    if not np.all(np.isfinite(errors)):
        return 0.0
    return _positive_mean_pvalue(errors - (1.0 + float(margin)) * best)


def _positive_mean_pvalue(d: np.ndarray) -> float:
    """One-sided p-value of a t test that the paired differences ``d`` have a positive mean (fewer than 3: 1)."""
    from scipy import stats

    if d.size < 3:
        return 1.0
    if np.all(d == d[0]):
        return 0.0 if d[0] > 0 else 1.0
    return float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def heldout_choice(errors: Sequence[np.ndarray | None], n_constants: Sequence[int], level: float = 0.05,
                   margin: float = 0.05, complexities: Sequence[int] | None = None):
    """The held-out selection rule: which candidates the data exclude, and the headline among the rest.

    errors: per candidate, its per-block held-out squared errors (:func:`block_errors`), or None when it could
    not be fitted or simulated (always excluded). The best is the lowest total error; a candidate is excluded
    when a one-sided paired t test over blocks says it is worse than the best by more than the fraction
    ``margin`` of the best's error, at ``level``. The headline is the
    candidate with the fewest constants among those not excluded; among those with as many constants, the ones
    whose total error is within ``margin`` of the lowest of them count as equal and the smallest expression
    (``complexities``) wins, then the lowest error. So a form with more constants than the data support is never
    the headline.

    Returns (headline index, excluded flags, p-values (NaN for failed), total errors (inf for failed)).
    """
    if not 0 < float(level) < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    totals = np.array([np.inf if e is None or not np.all(np.isfinite(e)) else float(np.sum(e)) for e in errors])
    if len(totals) == 0:
        raise ValueError("heldout_choice needs at least one candidate")
    if not np.any(np.isfinite(totals)):
        return None, [True] * len(totals), [math.nan] * len(totals), totals.tolist()
    b = int(np.argmin(totals))
    pvals, excluded = [], []
    for i, e in enumerate(errors):
        if e is None or not np.isfinite(totals[i]):
            pvals.append(math.nan)
            excluded.append(True)
            continue
        p = 1.0 if i == b else paired_worse_pvalue(e, errors[b], margin)
        pvals.append(p)
        excluded.append(p < level)
    keep = [i for i in range(len(totals)) if not excluded[i]]
    fewest = min(int(n_constants[i]) for i in keep)
    tied = [i for i in keep if int(n_constants[i]) == fewest]
    lowest = min(totals[i] for i in tied)
    # as many constants: those within the margin of the lowest error of them are equivalent; the smallest wins
    near = [i for i in tied if totals[i] <= (1.0 + float(margin)) * lowest]
    size = list(complexities) if complexities is not None else [0] * len(totals)
    head = min(near, key=lambda i: (int(size[i]), totals[i], i))
    return head, excluded, pvals, totals.tolist()


def paired_better_pvalue(errors: np.ndarray, reference: np.ndarray) -> float:
    """One-sided p-value of a paired t test over blocks that ``errors`` are lower than ``reference``'s (differences
    reference - errors). Fewer than 3 blocks or non-finite errors: 1 (no evidence)."""
    errors, reference = np.asarray(errors, dtype=float), np.asarray(reference, dtype=float)
    if errors.shape != reference.shape:
        raise ValueError("paired_better_pvalue: the two error arrays must pair block by block")
    d = reference - errors
    return _positive_mean_pvalue(d) if np.all(np.isfinite(d)) else 1.0


def insample_switch(head: int | None, excluded: Sequence[bool], totals: Sequence[float],
                    bics: Sequence[float | None], margin: float | None,
                    train_errors: Sequence[np.ndarray | None] | None = None, tested_margin: float | None = None,
                    level: float = 0.01) -> tuple[int | None, float | None]:
    """Second look at the held-out headline (:func:`heldout_choice`) with the frames the held-out test does not see.

    The held-out frames are the last ones; what tells some forms apart (a density-dependent D seen while dense
    islands spread, or any form in a short movie) can lie in the earlier frames the candidates were refitted on. A
    candidate the held-out test keeps, whose held-out error is no higher than the headline's, replaces the headline
    when its BIC on those training frames is lower than the headline's by more than ``margin``, or by more than
    ``tested_margin`` when also its training-frame squared errors per block (``train_errors``, as
    :func:`block_errors` sums them) are lower than the headline's by a one-sided paired t test over blocks at
    ``level``: a smaller gain counts when it holds across the domain, not when it comes from a few blocks (count
    noise, whose variance grows with u, or a partner function that is off there). Among several, the lowest BIC
    wins. ``bics``: per candidate, its training-frame BIC (None when unknown); ``margin`` None: never switch;
    ``tested_margin`` None: no tested switch. (Capping the switch at one constant more than the headline was tried:
    on a Gompertz polygon whose G no candidate got right it then replaced the true constant D with a saturating one;
    without the cap D stayed right and G became a 4-constant form.)

    Returns (the headline index, its BIC gain over the held-out headline, or None when unchanged)."""
    if head is None or margin is None or bics[head] is None or not math.isfinite(bics[head]):
        return head, None
    head_errors = train_errors[head] if train_errors is not None else None
    best, best_bic = head, float(bics[head])
    for i, b in enumerate(bics):
        if i == head or excluded[i] or b is None or not math.isfinite(b) or not totals[i] <= totals[head]:
            continue
        gain = float(bics[head]) - float(b)
        if not gain > float(margin):
            errs = train_errors[i] if train_errors is not None else None
            if (tested_margin is None or not gain > float(tested_margin) or errs is None or head_errors is None
                    or not paired_better_pvalue(errs, head_errors) < float(level)):
                continue
        if float(b) < best_bic:
            best, best_bic = i, float(b)
    return (head, None) if best == head else (best, float(bics[head]) - best_bic)
