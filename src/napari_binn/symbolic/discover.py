"""discover_equations: closed forms for a BinnFit's D(u) and G(u) (or any sampled function of density)."""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sympy as sp

from ..jobs import CancelToken, Progress, ProgressClock, is_cancelled, run_job
from .backends import BACKENDS, check_operators, propose
from .expression import (
    Constant,
    Expression,
    FitResult,
    U,
    _integerize,
    as_float,
    canonicalize,
    complexity,
    constant_units,
    free_floats,
    parse_expression,
    refit_constants,
    round_significant,
    snap_constants,
    supported_digits,
    weighted_mse,
)
from .forms import check_form_names, constant_bounds, fit_forms, in_domain, is_admissible
from .samples import FunctionSamples, samples_from_fit
from .selection import SELECTION_RULES, front_scores, pareto_indices, select_index, significant_indices

__all__ = ["FrontRow", "DiscoveredFunction", "Equations", "delay_constant_names", "discover_equations",
           "discover_equations_job"]

DEFAULT_MAX_COMPLEXITY = 25


@dataclass(frozen=True)
class FrontRow:
    """One member of a Pareto front: complexity, weighted MSE loss ((value units)²), PySR score, expression;
    ``form``: the library form's name when the row is one (see :mod:`~napari_binn.symbolic.forms`)."""

    complexity: int
    loss: float
    score: float
    expression: Expression
    form: str = ""

    def to_dict(self) -> dict:
        out = {"complexity": self.complexity, "loss": self.loss, "score": self.score,
               "expression": self.expression.to_dict()}
        if self.form:
            out["form"] = self.form
        return out

    @classmethod
    def from_dict(cls, d: dict) -> FrontRow:
        return cls(int(d["complexity"]), as_float(d.get("loss")), as_float(d.get("score")),
                   Expression.from_dict(d["expression"]), str(d.get("form", "")))


@dataclass(frozen=True)
class DiscoveredFunction:
    """The discovery result for one function (D or G): its Pareto front, the fitted library forms that are
    admissible (``library``), and the selected closed form. ``selected_index`` counts the front's rows, then the
    library's (``rows``)."""

    name: str
    front: tuple[FrontRow, ...]
    selected_index: int
    selection: str
    backend: str
    u_range: tuple[float, float]
    units: str = ""
    u_units: str = "u"
    notes: tuple[str, ...] = ()
    loss_floor: float = 0.0
    significant: tuple[int, ...] | None = None
    library: tuple[FrontRow, ...] = ()

    @property
    def rows(self) -> tuple[FrontRow, ...]:
        """The front's rows, then the library's: what ``selected_index`` and :meth:`pick` count."""
        return self.front + self.library

    @property
    def selected_row(self) -> FrontRow:
        return self.rows[self.selected_index]

    @property
    def selected(self) -> Expression:
        """The selected closed form."""
        return self.rows[self.selected_index].expression

    def with_row(self, index: int, row: FrontRow) -> DiscoveredFunction:
        """Copy with row ``index`` (of ``rows``) replaced."""
        n = len(self.front)
        if index < n:
            return replace(self, front=self.front[:index] + (row,) + self.front[index + 1:])
        k = index - n
        return replace(self, library=self.library[:k] + (row,) + self.library[k + 1:])

    @property
    def sympy(self) -> sp.Expr:
        return self.selected.sympy

    @property
    def text(self) -> str:
        return self.selected.text

    @property
    def latex(self) -> str:
        return self.selected.latex

    @property
    def constants(self) -> tuple[Constant, ...]:
        return self.selected.constants

    def __call__(self, u) -> np.ndarray:
        """Evaluate the selected closed form (units of ``units``); warns when extrapolating beyond ``u_range``."""
        return self.selected(u)

    def select(self, rule: str) -> DiscoveredFunction:
        """Copy that picks from the same front with another rule ('best', 'accuracy', 'score')."""
        comps, losses = [r.complexity for r in self.front], [r.loss for r in self.front]
        return replace(self, selected_index=_pick(comps, losses, rule, self.loss_floor, self.significant),
                       selection=rule)

    def pick(self, index: int) -> DiscoveredFunction:
        """Copy whose selected form is row ``index`` of ``rows`` (front, then library), chosen by the user
        (selection ``'user pick'``)."""
        if not 0 <= int(index) < len(self.rows):
            raise ValueError(f"{self.name}(u): no row {index}; the front and library have {len(self.rows)} rows.")
        return replace(self, selected_index=int(index), selection="user pick")

    def to_dict(self) -> dict:
        """Plain types for JSON: the whole front (each row with its constants) and the selection; ``text`` and
        ``latex`` repeat the selected form for people reading the file."""
        return {"name": self.name, "text": self.text, "latex": self.latex, "units": self.units,
                "u_units": self.u_units, "u_range": [float(v) for v in self.u_range], "backend": self.backend,
                "selection": self.selection, "selected": self.selected_index, "notes": list(self.notes),
                "loss_floor": self.loss_floor,
                "significant": None if self.significant is None else list(self.significant),
                "front": [row.to_dict() for row in self.front],
                **({"library": [row.to_dict() for row in self.library]} if self.library else {})}

    @classmethod
    def from_dict(cls, d: dict) -> DiscoveredFunction:
        """Inverse of :meth:`to_dict`."""
        lo, hi = d["u_range"]
        significant = d.get("significant")
        front = tuple(FrontRow.from_dict(r) for r in d["front"])
        library = tuple(FrontRow.from_dict(r) for r in d.get("library", ()))
        selected, n_rows = int(d["selected"]), len(front) + len(library)
        if not 0 <= selected < n_rows:
            raise ValueError(f"{d['name']}: 'selected' is {selected}, not a row of its front and library "
                             f"(0 to {n_rows - 1})")
        return cls(str(d["name"]), front, selected,
                   str(d.get("selection", "best")), str(d.get("backend", "")), (as_float(lo), as_float(hi)),
                   str(d.get("units", "")), str(d.get("u_units", "u")), tuple(d.get("notes", ())),
                   as_float(d.get("loss_floor", 0.0)), None if significant is None else tuple(map(int, significant)),
                   library)

    def table(self) -> str:
        """The Pareto front as a text table; the selected row is starred."""
        lines = [
            f"{self.name}(u) [{self.units}] on u in [{self.u_range[0]:.4g}, {self.u_range[1]:.4g}] {self.u_units}"
            f" ({self.backend}, selection {self.selection!r})",
            f"   {'complexity':>10}  {'loss':>10}  {'score':>7}  expression",
        ]
        for i, row in enumerate(self.front):
            mark = "*" if i == self.selected_index else " "
            form = f"   [{row.form}]" if row.form else ""
            lines.append(
                f" {mark} {row.complexity:>10d}  {row.loss:>10.3g}  {row.score:>7.3f}  {row.expression.text}{form}"
            )
        if self.library:
            lines.append("   library forms:")
        for i, row in enumerate(self.library, start=len(self.front)):
            mark = "*" if i == self.selected_index else " "
            lines.append(f" {mark} {row.complexity:>10d}  {row.loss:>10.3g}  {'':>7}  {row.expression.text}"
                         f"   [{row.form}]")
        lines += [f"   {c}" for c in self.constants]
        lines += [f"   note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{self.name}(u) = {self.text}   [{self.units}; {len(self.front)} on front, {self.backend}]"


@dataclass(frozen=True)
class Equations:
    """Discovered closed forms for D(u) (µm²/h) and G(u) (1/h); either may be None if it was not requested."""

    D: DiscoveredFunction | None
    G: DiscoveredFunction | None
    backend: str
    metadata: dict = field(default_factory=dict)

    def _functions(self):
        return [(k, f) for k, f in (("D", self.D), ("G", self.G)) if f is not None]

    @classmethod
    def from_forms(cls, D: Sequence[str], G: Sequence[str], u_range: tuple[float, float]) -> Equations:
        """Equations from hand-written candidate forms in ``u`` (e.g. ``["800.0", "500.0 + 0.2*u"]``), simplest
        first; the last of each is selected. Decimal constants (``800.0``) become free parameters of
        :meth:`refit` / the pipeline's refit stage, integers (``u**2``) stay fixed. Units: D in µm²/h, G in 1/h.
        Use it to test your own hypotheses against the data with the same refit and BIC choice."""
        def function(name: str, forms: Sequence[str], units: str) -> DiscoveredFunction:
            if not forms:
                raise ValueError(f"from_forms needs at least one {name}(u) form")
            rows = []
            for text in forms:
                e = parse_expression(text)
                c = complexity(e)
                rows.append(FrontRow(c, math.nan, 0.0, Expression(e, tuple(u_range), math.nan, c, units=units,
                                                                   name=name)))
            return DiscoveredFunction(name, tuple(rows), len(rows) - 1, "given", "user", tuple(u_range), units)

        return cls(function("D", D, "µm²/h"), function("G", G, "1/h"), "user")

    def summary(self) -> str:
        """Both Pareto fronts and selected forms as text."""
        return "\n\n".join(f.table() for _, f in self._functions())

    def __repr__(self) -> str:
        body = "; ".join(f"{k}(u) = {f.text}" for k, f in self._functions())
        return f"Equations({body}; backend={self.backend!r})"

    def select(self, rule: str) -> Equations:
        """Copy whose D and G are picked from their fronts by ``rule``."""
        return replace(
            self,
            D=None if self.D is None else self.D.select(rule),
            G=None if self.G is None else self.G.select(rule),
        )

    def parameters(self) -> tuple[dict[str, sp.Expr], dict[str, float]]:
        """({'D': expr, 'G': expr} with constants as symbols D_0.., G_0..; {symbol name: current value})."""
        model, init = {}, {}
        for key, f in self._functions():
            expr, values = f.selected.parametrized(key)
            model[key] = expr
            init.update(values)
        return model, init

    def form_bounds(self) -> dict[str, tuple[float, float]]:
        """(low, high) for the constants (names as in :meth:`parameters`) of a selected row that is a library form:
        the library's bounds for that form (:func:`~napari_binn.symbolic.forms.constant_bounds`). A form's meaning
        rests on them (D0/(1 + b u) saturates only for b >= 0, a negative b is a pole in D; logistic growth falls
        with density); a refit that crossed one would fit another form under the same name. Constants the library
        leaves free (a logistic's r, a linear D's slope) stay free, whatever sign the fit to the learned curve gave
        them: a badly learned curve must not fix the sign the data then cannot change. A library row that does not match
        its template, or lies outside its bounds (fitted by older versions), keeps each constant's sign; constants
        of other rows are left free."""
        out: dict[str, tuple[float, float]] = {}
        for key, f in self._functions():
            row = f.selected_row
            if not row.form:
                continue
            values = f.selected.parametrized(key)[1]
            library = constant_bounds(key, row.form, f.selected.sympy)
            if library is not None and all(lo <= v <= hi for v, (lo, hi) in zip(values.values(), library)):
                out.update((name, b) for name, b in zip(values, library) if b != (-math.inf, math.inf))
                continue
            for name, v in values.items():
                if v > 0:
                    out[name] = (0.0, math.inf)
                elif v < 0:
                    out[name] = (-math.inf, 0.0)
        return out

    def with_params(self, params=None, *, digits: Mapping[str, int] | None = None, **values: float) -> Equations:
        """Copy with constants replaced by name (``D_0=..``, ``G_1=..``), from a mapping or an object with a
        ``params`` mapping (e.g. a MechanisticFit); names not given keep their values. ``digits``: significant
        digits per name (default 6) the constants keep and print with."""
        given: dict[str, float] = {}
        if params is not None:
            source = params if isinstance(params, Mapping) else getattr(params, "params", None)
            if not isinstance(source, Mapping):
                raise ValueError("with_params needs a mapping of parameter names to values (or a fit with .params).")
            given.update({str(k): float(np.asarray(v, dtype=float).ravel()[0]) for k, v in source.items()})
        given.update({k: float(v) for k, v in values.items()})
        model, init = self.parameters()
        unknown = sorted(set(given) - set(init))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(init)) or 'none'}.")
        out = {}
        digits = digits or {}
        for key, f in self._functions():
            _, values_now = f.selected.parametrized(key)
            new_values = [given.get(name, v) for name, v in values_now.items()]
            expr = f.selected.with_constants(new_values, [digits.get(name, 6) for name in values_now])
            out[key] = f.with_row(f.selected_index, replace(f.selected_row, expression=expr))
        return replace(self, D=out.get("D", self.D), G=out.get("G", self.G))

    def with_refit(self, fit) -> Equations:
        """Copy with the constants of a refit (a MechanisticFit of :meth:`refit` or the pipeline's refit stage),
        each rounded to the significant digits its 95% interval supports (4 when the interval is undefined). A
        constant of the fit's delay T(t) alone (``tau`` of the refit stage's T(t) = 1 - exp(-t/tau)) is not one of
        D's or G's and is left out."""
        delay_only = delay_constant_names(fit) - set(self.parameters()[1])
        params = {k: v for k, v in fit.params.items() if k not in delay_only}
        digits = {}
        for name, value in params.items():
            lo, hi = fit.ci95.get(name, (math.nan, math.nan))
            spread = (hi - lo) / 3.92 if math.isfinite(lo) and math.isfinite(hi) else math.nan
            digits[name] = max(supported_digits(float(value), spread) if math.isfinite(spread) else 4, 2)
        return self.with_params(params, digits=digits)  # with_constants rounds each to its digits

    def refit(self, field, **kwargs):
        """Re-estimate the selected forms' constants against the density data itself.

        Calls ``napari_binn.pde.mechanistic.fit_mechanistic(field, {'D': expr, 'G': expr}, init=..., **kwargs)``
        with the constants as free parameters (D_0, D_1, ..., G_0, ...) and returns its MechanisticFit
        (intervals, AIC); ``with_params(fit)`` puts the refitted values back into the closed forms. A library form's
        constants keep the library's bounds (:meth:`form_bounds`) unless ``bounds`` says otherwise.
        """
        try:
            from ..pde.mechanistic import fit_mechanistic
        except ImportError as exc:
            raise ImportError("Equations.refit needs napari_binn.pde.mechanistic.fit_mechanistic.") from exc
        if self.D is None or self.G is None:
            raise ValueError("refit needs both D and G closed forms; discover both first.")
        model, init = self.parameters()
        kwargs["bounds"] = {**self.form_bounds(), **(kwargs.get("bounds") or {})}
        return fit_mechanistic(field, model, init=init, **kwargs)

    def to_dict(self) -> dict:
        """Plain types for JSON (results bundles): backend, metadata (JSON-typed entries), and D and G with their
        fronts; expressions as text, read back by the restricted parser."""
        out: dict = {"backend": self.backend, "metadata": {k: v for k, v in self.metadata.items() if _jsonable(v)}}
        for key, f in self._functions():
            out[key] = f.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Equations:
        """Inverse of :meth:`to_dict`; raises ExpressionError for expressions the restricted parser refuses."""
        return cls(*(DiscoveredFunction.from_dict(d[key]) if d.get(key) is not None else None for key in ("D", "G")),
                   str(d.get("backend", "")), dict(d.get("metadata", {})))


def _pick(complexities, losses, rule, loss_floor, significant) -> int:
    """Index into a front chosen by ``rule``; 'best' and 'score' look only at the significant members."""
    idx = list(range(len(losses))) if significant is None or rule == "accuracy" else list(significant)
    sub = select_index([complexities[i] for i in idx], [losses[i] for i in idx], rule, loss_floor=loss_floor)
    return idx[sub]


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))


# -- the engine --------------------------------------------------------------------------------------------------


def _as_samples(fit_or_samples, n_samples, quantiles) -> dict[str, FunctionSamples]:
    if isinstance(fit_or_samples, FunctionSamples):
        name = fit_or_samples.name if fit_or_samples.name in ("D", "G") else "G"
        return {name: fit_or_samples}
    if isinstance(fit_or_samples, Mapping):
        out = {}
        for key, s in fit_or_samples.items():
            if key not in ("D", "G"):
                raise ValueError(f"Sample keys must be 'D' and/or 'G', got {key!r}.")
            if not isinstance(s, FunctionSamples):
                raise ValueError(f"{key}: expected a FunctionSamples, got {type(s).__name__}.")
            out[key] = s if s.name == key else replace(s, name=key, units=s.units or "")
        if not out:
            raise ValueError("No samples given: pass {'D': FunctionSamples, 'G': FunctionSamples} or a BinnFit.")
        return out
    if all(hasattr(fit_or_samples, a) for a in ("D", "G")) and callable(getattr(fit_or_samples, "D")):
        return samples_from_fit(fit_or_samples, n_samples=n_samples, quantiles=quantiles)
    raise ValueError(
        f"discover_equations needs a BinnFit, a FunctionSamples or a dict of them, got {type(fit_or_samples).__name__}."
    )


@dataclass
class _Candidate:
    fit: FitResult
    complexity: int
    form: str = ""


def _prepare(expr: sp.Expr, u, y, w) -> _Candidate | None:
    try:
        expr = _integerize(sp.expand_log(sp.sympify(expr), force=True))
        if expr.has(sp.zoo, sp.nan, sp.oo, -sp.oo, sp.I) or expr.free_symbols - {U}:
            return None
        fit = refit_constants(expr, u, y, w, max_nfev=10)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not math.isfinite(fit.loss):
        return None
    return _Candidate(fit, complexity(fit.expr))


def _polish(cand: _Candidate, u, y, w) -> _Candidate:
    if len(cand.fit.values) > 6:
        return cand
    try:
        fit = refit_constants(canonicalize(cand.fit.expr), u, y, w)
        if fit.loss > cand.fit.loss * 1.001 + 1e-300:
            fit = cand.fit
        fit = snap_constants(fit, u, y, w)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return cand
    if not math.isfinite(fit.loss):
        return cand
    return _Candidate(fit, complexity(fit.expr), cand.form)


def _library_candidates(s: FunctionSamples, names, u, y, w, notes: list[str]) -> list[_Candidate]:
    """The library's forms fitted to the curve, as candidates (each keeps its form name); each form's loss is over
    the samples in its domain (:func:`~napari_binn.symbolic.forms.in_domain`), where it was fitted. Forms fitted
    on part of the samples are named in one note."""
    out, partial = [], []
    for ff in fit_forms(s, names):
        keep = in_domain(s.name, ff.name, u)
        if not keep.all():
            partial.append(f"{ff.name} {int(np.count_nonzero(keep))}")
        expr = _integerize(sp.expand_log(ff.expr, force=True))
        uk = u[keep]
        try:  # the form's own (bounded) fit: an unbounded refit could leave the form's biology (A > 0, ...)
            with np.errstate(all="ignore"):
                pred = np.broadcast_to(np.asarray(sp.lambdify([U], expr, modules="numpy")(uk), dtype=float), uk.shape)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
        consts = np.array([float(f) for f in free_floats(expr)])
        fit = FitResult(expr, weighted_mse(pred, y[keep], w[keep]), consts,
                        np.zeros(consts.size))  # zero spread: the constants keep 6 digits
        if math.isfinite(fit.loss):
            out.append(_Candidate(fit, complexity(fit.expr), ff.name))
    if partial:
        notes.append(f"{s.name}: the sampled densities reach {float(np.min(u)):.4g}; library forms not defined there "
                     f"(a logarithm needs u > 0, a free exponent u >= 0) are fitted, and their losses measured, on "
                     f"the samples where they are (of {u.size}): {', '.join(partial)}.")
    return out


def _admissible(cands: list[_Candidate], kind: str, u_max: float, notes: list[str]) -> list[_Candidate]:
    """Candidates that can be the PDE's D or G on [0, u_max]; the others are dropped with one note."""
    keep, dropped = [], []
    for c in cands:
        ok, why = is_admissible(kind, c.fit.expr, u_max)
        if ok:
            keep.append(c)
        else:
            dropped.append(f"{sp.sstr(c.fit.expr)} ({why})")
    if dropped:
        shown = "; ".join(dropped[:3]) + (f"; and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        notes.append(f"{kind}: {len(dropped)} candidate(s) excluded as not admissible on [0, {u_max:.4g}]: {shown}")
    return keep


def _front(cands: list[_Candidate], loss_floor: float) -> list[_Candidate]:
    """Pareto members; losses under the round-off floor count as equal (no gains from round-off)."""
    idx = pareto_indices([c.complexity for c in cands], [max(c.fit.loss, loss_floor) for c in cands])
    return [cands[i] for i in idx]


def _constant_spread(fit: FitResult, s: FunctionSamples, u, y, w) -> np.ndarray:
    """Uncertainty of each constant: the largest of the Jacobian standard error, the spread of refits to the
    ensemble members, and (without an ensemble) half the change when the target shifts by +-sigma."""
    spread = np.where(np.isfinite(fit.stderr), fit.stderr, 0.0)
    if fit.values.size == 0:
        return spread
    refits = []
    if s.ensemble is not None and s.ensemble.shape[0] > 1:
        for member in s.ensemble:
            refits.append(refit_constants(fit.expr, u, member, w, max_nfev=50).values)
        spread = np.maximum(spread, np.std(refits, axis=0, ddof=1))
    elif s.sigma is not None and np.any(s.sigma > 0):
        hi = refit_constants(fit.expr, u, y + s.sigma, w, max_nfev=50).values
        lo = refit_constants(fit.expr, u, y - s.sigma, w, max_nfev=50).values
        spread = np.maximum(spread, 0.5 * np.abs(hi - lo))
    return spread


def _expression(fit: FitResult, spread, s: FunctionSamples, u_range, comp, *, name) -> Expression:
    floats = free_floats(fit.expr)
    reps, digits = {}, {}
    for f, sd in zip(floats, spread):
        d = supported_digits(float(f), float(sd))
        reps[f] = sp.Float(round_significant(float(f), d), max(d, 1))
        digits[reps[f]] = (d, float(sd))
    rounded = fit.expr.xreplace(reps)
    units = constant_units(rounded, s.units, s.u_units)
    consts = []
    for i, f in enumerate(free_floats(rounded)):
        d, sd = digits.get(f, (6, math.nan))
        consts.append(Constant(f"{name}_{i}", float(f), sd, d, units.get(f, "")))
    return Expression(rounded, u_range, fit.loss, comp, tuple(consts), s.units, name)


def _discover_one(s: FunctionSamples, *, backend, operators, max_complexity, seeds, selection, options, cancel,
                  clock, step, prune, tolerance=0.0, forms=None):
    s = s.cleaned()
    u, y, w = s.u, s.value, s.fit_weights()
    notes = list(s.notes)
    scale = float(np.sqrt(np.average(y**2, weights=w)))
    loss_floor = (max(1e-7, tolerance) * scale) ** 2
    if tolerance > 0 and s.sigma is not None and np.any(s.sigma > 0):
        # the ensemble spread says how well the curve is known: finer differences are not evidence
        loss_floor = max(loss_floor, float(np.average(s.sigma**2, weights=w)))
    raw: list[sp.Expr] = [sp.Float(float(np.average(y, weights=w)), 15)]
    if np.ptp(y) <= 1e-12 * max(np.max(np.abs(y)), 1e-300):
        notes.append(f"{s.name} is constant on the sampled range; the closed form is that constant.")
    else:
        for seed in seeds:
            if is_cancelled(cancel):
                notes.append("cancelled: the front uses the seeds finished before the cancel.")
                break
            raw.extend(
                propose(backend, u, y, w, seed=seed, operators=operators, max_complexity=max_complexity,
                        options=options)
            )
            step[0] += 1
            yield clock.event("symbolic", step[0], f"{s.name}: {backend} seed {seed} done", function=s.name)
    seen, cands = set(), []
    for expr in raw:
        key = sp.srepr(expr)
        if key in seen:
            continue
        seen.add(key)
        cand = _prepare(expr, u, y, w)
        if cand is not None:
            cands.append(cand)
    kind = s.name if s.name in ("D", "G") else None
    library: list[_Candidate] = []
    if kind is not None and (forms is None or len(forms)) and not is_cancelled(cancel):
        library = _library_candidates(s, forms, u, y, w, notes)
    u_max = float(s.u_max) if s.u_max is not None and math.isfinite(s.u_max) else float(np.max(u))
    if kind is not None:  # a closed form that breaks the PDE on the observed densities is never selected
        cands = _admissible(cands, kind, u_max, notes)
        library = _admissible(library, kind, u_max, notes)
    if not cands:
        cands = [_Candidate(refit_constants(sp.Float(float(np.average(y, weights=w)), 15), u, y, w), 2)]
    polished = [_polish(c, u, y, w) for c in _front(cands, loss_floor)]
    if kind is not None:
        polished = _admissible(polished, kind, u_max, [])
    front = _front(polished + _front(cands, loss_floor) + library, loss_floor)
    comps = [c.complexity for c in front]
    losses = [c.fit.loss for c in front]
    significant = None
    if prune:
        n_eff = float(w.sum() ** 2 / np.sum(w**2))
        significant = tuple(significant_indices(losses, [len(c.fit.values) for c in front], n_eff,
                                                loss_floor=loss_floor))
    scores = front_scores(comps, np.maximum(losses, loss_floor))
    idx = _pick(comps, losses, selection, loss_floor, significant)
    u_range = s.u_range
    rows = []
    for i, c in enumerate(front):
        spread = _constant_spread(c.fit, s, u, y, w) if i == idx else c.fit.stderr
        rows.append(FrontRow(c.complexity, c.fit.loss, float(scores[i]),
                             _expression(c.fit, spread, s, u_range, c.complexity, name=s.name), c.form))
    lib_rows, texts = [], {r.expression.text for r in rows}
    for c in library:
        if any(c is f for f in front):
            continue
        expr = _expression(c.fit, c.fit.stderr, s, u_range, c.complexity, name=s.name)
        expr = replace(expr, constants=tuple(replace(k, stderr=math.nan) for k in expr.constants))  # not estimated
        row = FrontRow(c.complexity, c.fit.loss, math.nan, expr, c.form)
        if row.expression.text not in texts:  # e.g. Richards with exponent 1 is the logistic form
            texts.add(row.expression.text)
            lib_rows.append(row)
    lib_rows = tuple(lib_rows)
    return DiscoveredFunction(
        name=s.name, front=tuple(rows), selected_index=idx, selection=selection, backend=backend,
        u_range=u_range, units=s.units, u_units=s.u_units, notes=tuple(notes), loss_floor=loss_floor,
        significant=significant, library=lib_rows,
    )


def discover_equations_job(
    fit_or_samples,
    *,
    backend: str = "operon",
    operators: Sequence[str] | None = None,
    max_complexity: int = DEFAULT_MAX_COMPLEXITY,
    seeds: Sequence[int] = (0,),
    selection: str = "best",
    n_samples: int = 200,
    quantiles: tuple[float, float] = (0.05, 0.95),
    backend_options: dict | None = None,
    prune: bool = True,
    tolerance: float | None = None,
    forms_D: Sequence[str] | None = None,
    forms_G: Sequence[str] | None = None,
    cancel: CancelToken | None = None,
) -> Generator[Progress, None, Equations]:
    """Generator form of :func:`discover_equations`: yields a Progress per backend run, returns Equations."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if selection not in SELECTION_RULES:
        raise ValueError(f"Unknown selection rule {selection!r}; choose one of {', '.join(SELECTION_RULES)}.")
    ops = check_operators(backend, operators)
    forms = {"D": check_form_names("D", forms_D), "G": check_form_names("G", forms_G)}
    if int(max_complexity) < 3:
        raise ValueError(f"max_complexity={max_complexity} is too small; use at least 3 (e.g. 25).")
    seeds = tuple(int(x) for x in seeds) or (0,)
    if backend == "library":
        seeds = seeds[:1]  # deterministic: one run is enough
    samples = _as_samples(fit_or_samples, n_samples, quantiles)
    if tolerance is None:
        # a trained network's curve is known to about 1% at best: closed forms within that of each other are
        # equally good, and the simplest wins. Raw samples keep the exact comparison.
        tolerance = 0.01 if not isinstance(fit_or_samples, (FunctionSamples, Mapping)) else 0.0
    if not (0.0 <= float(tolerance) < 1.0):
        raise ValueError(f"tolerance must be in [0, 1) (a relative RMS error); got {tolerance}.")
    clock = ProgressClock(len(samples) * len(seeds))
    step = [0]
    t0 = time.perf_counter()
    found = {}
    for key, s in samples.items():
        found[key] = yield from _discover_one(
            s, backend=backend, operators=ops, max_complexity=int(max_complexity), seeds=seeds,
            selection=selection, options=backend_options or {}, cancel=cancel, clock=clock, step=step,
            prune=prune, tolerance=float(tolerance), forms=forms.get(key),
        )
    metadata = {
        "backend": backend, "operators": list(ops), "max_complexity": int(max_complexity), "seeds": list(seeds),
        "selection": selection, "forms": {k: list(v) for k, v in forms.items()},
        "seconds": time.perf_counter() - t0, "cancelled": bool(is_cancelled(cancel)),
    }
    return Equations(D=found.get("D"), G=found.get("G"), backend=backend, metadata=metadata)


def discover_equations(fit_or_samples, **kwargs) -> Equations:
    """Closed forms for D(u) (µm²/h) and G(u) (1/h) by symbolic regression.

    fit_or_samples: a BinnFit (its ensemble-mean D, G are sampled at ``n_samples`` densities between the
    ``quantiles`` of the observed density, weighted by the density histogram, the ensemble spread as sigma),
    a FunctionSamples, or a dict {'D': FunctionSamples, 'G': FunctionSamples}.
    backend: 'operon' (default, pyoperon), 'pysr' (optional extra, needs Julia) or 'library' (sparse regression
    over a biology-aware term library). operators: subset of + - * / exp log sqrt pow square. seeds: one backend
    run per seed, fronts merged. selection: 'best' (PySR's rule), 'accuracy' or 'score'; with ``prune`` (default)
    'best' and 'score' only consider front members whose loss gain passes a BIC test (no noise-fitting
    look-alikes). backend_options: extra backend settings (operon: population_size, generations,
    optimizer_iterations, n_threads, library_candidates=True merges the term library's candidates into the
    GP front).
    forms_D, forms_G: library forms fitted alongside the backend (see :mod:`~napari_binn.symbolic.forms`; None =
    all, [] = none): they join the Pareto front when they are on it and are kept in ``library`` for the refit
    stage's held-out choice. Candidates that are not admissible for the PDE on [0, max observed u] (D negative or
    infinite, G whose reaction G·u does not vanish at u = 0) are excluded before selection, with a note.
    tolerance: relative RMS error below which two closed forms count as equally accurate, so the simplest is
    kept: default 1% for a BinnFit (a network's curve is not known better; its ensemble spread raises the
    floor further), 0 for raw samples.
    Same keywords as :func:`discover_equations_job`; returns :class:`Equations`.
    """
    return run_job(discover_equations_job(fit_or_samples, **kwargs))


def delay_constant_names(fit: Any) -> set[str]:
    """The constants a fit's delay T(t) names (``fit.expressions['T']``), besides t."""
    text = (getattr(fit, "expressions", None) or {}).get("T")
    if not text:
        return set()
    return {str(x) for x in sp.sympify(text).free_symbols} - {"t"}
