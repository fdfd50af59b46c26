"""The whole job in one place: images -> density -> BINN -> equations -> simulation -> refit -> QC.

One :class:`PipelineConfig` (TOML round trip) drives every stage; :func:`run_pipeline` is a job generator
(stage-tagged :class:`~napari_binn.jobs.Progress` events, returns a :class:`PipelineResult`) used alike by the
command line, the napari widgets and the tests. Each stage can be run alone, and a run can start from a
previous result (e.g. a loaded bundle) to redo only the later stages.
"""

from __future__ import annotations

import math

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field as dc_field, replace
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from . import __version__
from ._config_io import from_dict, read_toml, to_dict, write_toml
from .binn import BinnConfig, BinnFit, train_binn
from .binn.refine import RefineConfig, check_frames, refine_binn_job
from .density import extract_density_job
from .errors import ConfigError, InputError
from .field import DensityField
from .io import Stack
from .jobs import CancelToken, Progress, is_cancelled, run_job
from .pde import SimulationError, simulate_job
from .pde.mechanistic import MechanisticFit, fit_mechanistic_job
from .qc import QCReport, compare
from .symbolic import Equations, discover_equations_job
from .symbolic.discover import DiscoveredFunction
from .symbolic.expression import free_floats
from .symbolic.forms import check_form_names, n_constants, pde_safe
from .symbolic.selection import block_errors, heldout_choice, insample_switch, paired_better_pvalue

__all__ = ["DensityConfig", "SymbolicConfig", "SimulationConfig", "RefitConfig", "PipelineConfig",
           "PipelineResult", "run_pipeline", "train_job", "STAGES"]

#: Stage names, in order.
STAGES = ("density", "binn", "symbolic", "simulate", "refit", "qc")


@dataclass
class DensityConfig:
    """Density extraction. method: 'nuclei' | 'confluence' | 'labels' | 'points'. box_um: grid box in µm.
    params: the method's own parameters (see ``extract_density``), e.g. ``nucleus_diameter_um = [6, 16]``.
    allow_unknown_pixel_size: assume 1 µm pixels when the stack has none (flagged loudly in the results)."""

    method: str = "nuclei"
    box_um: float = 50.0
    params: dict[str, Any] = dc_field(default_factory=dict)
    allow_unknown_pixel_size: bool = False


@dataclass
class SymbolicConfig:
    """Equation discovery. backend: 'operon' | 'library' | 'pysr'. operators: None = the backend's default set.
    max_complexity: largest expression size. seeds: one search per seed, fronts merged. selection: 'best'
    (PySR's rule) | 'accuracy' | 'score'. n_samples: densities sampled between the ``quantiles`` of the
    observed density. forms_D / forms_G: library forms fitted alongside the backend and offered to the refit
    stage (D: constant, linear, proportional, power, exponential, saturating, rising_saturating; G: zero, constant,
    logistic, allee, weak_allee, gompertz, richards; None = all, [] = none)."""

    backend: str = "operon"
    operators: list[str] | None = None
    max_complexity: int = 20
    seeds: list[int] = dc_field(default_factory=lambda: [0])
    selection: str = "best"
    n_samples: int = 200
    quantiles: list[float] = dc_field(default_factory=lambda: [0.05, 0.95])
    forms_D: list[str] | None = None
    forms_G: list[str] | None = None


@dataclass
class SimulationConfig:
    """Forward simulation. rtol: relative tolerance. method: 'auto' | 'rkc' | 'bdf' | 'radau'.
    learned: simulate with the BINN's learned networks. closed_form: simulate the selected closed forms.
    (The BINN surrogate itself is always compared with the data when there is a BINN.)"""

    rtol: float = 1e-4
    method: str = "auto"
    learned: bool = True
    closed_form: bool = True


@dataclass
class RefitConfig:
    """Mechanistic refits against the data. closed_form: re-estimate the discovered constants (with 95%
    intervals). reference_model: a classic model fitted for comparison ('fisher_kpp', 'porous_fisher', ...; ''
    for none). weighting: 'ols' | 'gls'. intervals: 'wald+ic' (Wald plus the initial frame's noise, by bootstrap) |
    'wald' | 'profile' | 'profile+ic' | 'none'. max_evals: simulations per fit. holdout_max_evals: simulations per
    held-out candidate's fit (below); a candidate not converged by then is judged at the best state it reached:
    the test compares predictions, and the candidates that need more are many-constant expressions whose
    constants wander along directions the data hardly constrain (half the refit stage's time went to them on the
    discovery benchmark's polygon). candidates: how many forms of
    each Pareto front are refitted against the data (the selected one, the simplest one and the best-scoring ones
    between; first D with G fixed, then G with the chosen D, then D again, and on by turns until a round keeps
    its choice when held-out frames choose), as the 2020 BINN paper chose among its
    guided mechanistic models; 1 = refit only the symbolic selection. bic_margin: among the candidates, the
    simplest form (expression size) whose BIC is within this of the lowest is kept, so a more complex form needs
    strong evidence (a BIC difference above 6, Kass & Raftery 1995); used when ``holdout_frames`` is 0.
    holdout_frames: the last frames held out to choose the form: every candidate (the front rows above and the
    admissible library forms) is refitted on the earlier frames and predicts the held-out ones; a candidate is
    excluded when a one-sided paired t test over 4 x 4-box blocks says it predicts worse than the best by more
    than ``holdout_margin`` (a fraction of the best's squared error) at ``holdout_level``; the headline is the one with the fewest constants among those not excluded (then the smallest expression; the others are
    the alternatives the data cannot exclude), then refitted on all frames. Unset: min(3, (frames - 2) // 2), so
    at least 2 frames stay to refit on and short fields (3 frames) choose by BIC. 0 = choose by BIC instead; with
    ``candidates`` = 1 only the symbolic selection is refitted either way. holdout_bic_switch: a candidate the
    held-out test keeps replaces that headline when it is a named form of the library, its BIC on the training
    frames is lower by more than this and its held-out error is no higher: the earlier frames can tell forms apart
    that the last ones cannot (a falling D seen while dense islands spread, or any form in a short movie). The margin
    is large because a wrong partner function or count noise moves the in-sample BIC by tens to hundreds
    (docs/method.md); None (``"none"`` in TOML): never switch. holdout_tested_switch: a smaller BIC gain that also
    switches when it holds across the domain: the candidate's training-frame squared errors, summed over the held-out
    test's 4 x 4-box blocks, are lower than the headline's by a one-sided paired t test at ``holdout_switch_level``
    (a gain from a few blocks, as count noise or a partner function that is off there give, does not count); None:
    no such switch. holdout_switch_level: that test's level. initial: the state every refit (and the
    held-out prediction) starts from: 'data' (the first frame, negative noise at 0), 'denoised' (also empty space
    that holds only noise at 0: on noisy data, spurious cells in a wound otherwise grow and fill it, and the fit
    makes up for it with a smaller D), or 'auto' (the first refit is done from both; the one that fits the data
    better is used throughout). delay_check: when the BINN learned no delay (``binn.use_delay`` off), the refitted
    closed form is fitted once more with a delay T(t) = 1 - exp(-t/tau) (tau free); a BIC lower by more than this
    adds a warning that the cells may start slowly and a delay should be learned (without one a slow start is read
    into D and G); None (``"none"``): no check. delay: when the BINN learned a delay (``binn.use_delay``), which
    T(t) the final refit of the closed form uses: 'learned' (the BINN's T(t), held fixed), 'fit' (T(t) = 1 -
    exp(-t/tau) with tau refitted with the constants; t from the first frame) or 'auto' (both are fitted and the
    one with the lower BIC is kept). The learned T(t) is a network's curve, fitted to the residual alongside D and
    G; where it is off (it need not start at 0), the closed form's constants make up for it."""

    closed_form: bool = True
    reference_model: str = "fisher_kpp"
    weighting: str = "ols"
    intervals: str = "wald+ic"
    max_evals: int = 200
    holdout_max_evals: int = 100
    candidates: int = 6
    bic_margin: float = 6.0
    holdout_frames: int | None = None
    holdout_level: float = 0.05
    holdout_margin: float = 0.05
    holdout_bic_switch: float | None = 100.0
    holdout_tested_switch: float | None = 10.0
    holdout_switch_level: float = 0.01
    initial: str = "auto"
    delay_check: float | None = 100.0
    delay: str = "auto"


@dataclass
class PipelineConfig:
    """Every setting of every stage; ``to_toml``/``from_toml`` round-trip it. Units are in the names or docs."""

    density: DensityConfig = dc_field(default_factory=DensityConfig)
    binn: BinnConfig = dc_field(default_factory=BinnConfig)
    refine: RefineConfig = dc_field(default_factory=RefineConfig)
    symbolic: SymbolicConfig = dc_field(default_factory=SymbolicConfig)
    simulation: SimulationConfig = dc_field(default_factory=SimulationConfig)
    refit: RefitConfig = dc_field(default_factory=RefitConfig)

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["binn"] = {k: v for k, v in self.binn.to_dict().items() if v is not None}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PipelineConfig":
        """Build from a dict; unknown sections or keys raise ValueError naming them."""
        d = dict(d)
        binn = d.pop("binn", {})
        cfg = from_dict(cls, d)
        unknown = sorted(set(binn) - {f for f in BinnConfig.__dataclass_fields__})
        if unknown:
            raise ConfigError(f"[binn] unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(sorted(BinnConfig.__dataclass_fields__))}")
        cfg.binn = BinnConfig.from_dict(binn)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError naming the first setting out of range (``section.key``) and its allowed values."""
        from .density import METHODS as DENSITY_METHODS
        from .pde.mechanistic import _INTERVALS, MODEL_NAMES
        from .pde.solver import METHODS as SOLVER_METHODS
        from .symbolic.backends import BACKENDS
        from .symbolic.selection import SELECTION_RULES

        def choice(key: str, value: Any, allowed) -> None:
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}; got {value!r}", key=key)

        def number(key: str, value: Any, low: float, *, strict: bool = True, whole: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if strict else value >= low) and (not whole or float(value).is_integer())
            if not ok:
                what = "a whole number" if whole else "a finite number"
                raise ConfigError(f"{key} must be {what} {'>' if strict else '>='} {low:g}; got {value!r}", key=key)

        d, s, sim, r = self.density, self.symbolic, self.simulation, self.refit
        choice("density.method", d.method, DENSITY_METHODS)
        number("density.box_um", d.box_um, 0)
        if not isinstance(d.params, dict):
            raise ConfigError(f"density.params must be a table; got {d.params!r}", key="density.params")
        choice("symbolic.backend", s.backend, tuple(BACKENDS))
        number("symbolic.max_complexity", s.max_complexity, 1, strict=False, whole=True)
        if not s.seeds:
            raise ConfigError("symbolic.seeds must list at least one seed, e.g. [0]", key="symbolic.seeds")
        choice("symbolic.selection", s.selection, SELECTION_RULES)
        number("symbolic.n_samples", s.n_samples, 2, strict=False, whole=True)
        q = list(s.quantiles)
        if len(q) != 2 or not all(isinstance(v, (int, float)) for v in q) or not 0 <= q[0] < q[1] <= 1:
            raise ConfigError(f"symbolic.quantiles must be two numbers [low, high] with 0 <= low < high <= 1; "
                              f"got {s.quantiles!r}", key="symbolic.quantiles")
        number("simulation.rtol", sim.rtol, 0)
        choice("simulation.method", sim.method, SOLVER_METHODS)
        if r.reference_model:
            choice("refit.reference_model", r.reference_model, ("", *MODEL_NAMES))
        choice("refit.weighting", r.weighting, ("ols", "gls"))
        choice("refit.intervals", r.intervals, tuple(i for i in _INTERVALS if i) + ("none",))
        number("refit.max_evals", r.max_evals, 1, strict=False, whole=True)
        number("refit.holdout_max_evals", r.holdout_max_evals, 1, strict=False, whole=True)
        number("refit.candidates", r.candidates, 1, strict=False, whole=True)
        number("refit.bic_margin", r.bic_margin, 0, strict=False)
        choice("refit.initial", r.initial, REFIT_INITIAL)

    def to_toml(self, path: str | Path) -> None:
        write_toml(self.to_dict(), path)

    @classmethod
    def from_toml(cls, path: str | Path) -> "PipelineConfig":
        """Read a TOML file; a bad setting raises ConfigError naming the file and the key."""
        try:
            return cls.from_dict(read_toml(path))
        except ConfigError as err:
            err.file = err.file or str(path)
            raise


@dataclass(eq=False)
class PipelineResult:
    """Everything a run produced. Stages not run (or cancelled) leave their entries None / empty. Two results are
    equal only when they are the same object (their arrays and fits have no meaningful ``==``).

    field: the density data. fit: the BINN. equations: discovered closed forms (after the refit stage, the forms
    the refit stage chose, with the symbolic fit's constants; the refitted constants are in
    ``metadata['closed_form_refitted']``, and :meth:`refitted_equations` puts them in). simulations: (T, Ny,
    Nx) arrays in the field's units, keyed 'BINN surrogate', 'learned D, G', 'closed form' (the forms in
    ``metadata['closed_form_simulated']``, with the symbolic fit's constants: the refit stage simulates them again
    when its choice changes them), 'closed form (refitted)' and the reference model's name. mechanistic: refits keyed
    'closed form (refitted)' and the reference model's name. qc: the comparison table. metadata: timings, version, cancellation, warnings.
    """

    config: PipelineConfig
    field: DensityField | None = None
    fit: BinnFit | None = None
    equations: Equations | None = None
    simulations: dict[str, np.ndarray] = dc_field(default_factory=dict)
    mechanistic: dict[str, MechanisticFit] = dc_field(default_factory=dict)
    qc: QCReport | None = None
    metadata: dict[str, Any] = dc_field(default_factory=dict)

    @property
    def cancelled(self) -> bool:
        return bool(self.metadata.get("cancelled_in"))

    def refitted_equations(self) -> Equations | None:
        """``equations`` with the constants refitted against the data (``mechanistic['closed form (refitted)']``,
        rounded by :meth:`Equations.with_refit`) when that refit is of the forms now selected; otherwise
        ``equations`` itself (no refit, or a form picked after it)."""
        eq = self.equations
        fit = self.mechanistic.get("closed form (refitted)")
        if eq is None or eq.D is None or eq.G is None or fit is None or not self.metadata.get("closed_form_refitted"):
            return eq
        model, _ = eq.parameters()
        names = refit_names(model, fit)
        if names is None:
            return eq
        if any(a != b for a, b in names.items()):
            fit = replace(fit, params={names.get(k, k): v for k, v in fit.params.items()},
                          ci95={names.get(k, k): v for k, v in fit.ci95.items()})
        return eq.with_refit(fit)


def refit_names(model: dict[str, sp.Expr], fit: Any, most: int = 6) -> dict[str, str] | None:
    """The refit's constant names -> ``model``'s (``Equations.parameters()``) under which the refit's D and G are
    the selected forms: the identity when they print alike (both written by str(sympy)); otherwise the renaming
    of a function's constants (up to ``most`` of them) that makes its expression equal; None when there is none.
    Constants are named in the order sympy keeps an expression's numbers, and that order can change with their
    values: a weak Allee G's two factors swapped places once its constants were rounded for a results bundle and
    read back, so the reloaded forms named their constants otherwise than the refit, and the refitted constants
    were dropped from the reloaded result (8 December)."""
    from itertools import permutations

    out: dict[str, str] = {}
    for key in ("D", "G"):
        text = fit.expressions.get(key)
        consts = sorted((s for s in model[key].free_symbols if s.name != "u"), key=lambda s: s.name)
        if text is None:
            return None
        if str(model[key]) == text:
            out.update((s.name, s.name) for s in consts)
            continue
        if len(consts) > most:
            return None
        local = {s.name: s for s in model[key].free_symbols}
        try:
            theirs = sp.sympify(text, locals=local)
        except (sp.SympifyError, TypeError, SyntaxError):
            return None
        for order in permutations(consts):
            if theirs.xreplace(dict(zip(consts, order))) == model[key]:
                out.update((a.name, b.name) for a, b in zip(consts, order))
                break
        else:
            return None
    return out


def _tag(job: Generator[Progress, None, Any], stage: str, index: int) -> Generator[Progress, None, Any]:
    """Re-yield a stage's events with the pipeline stage name and its position in ``message``/``data``."""
    while True:
        try:
            ev = next(job)
        except StopIteration as stop:
            return stop.value
        data = dict(ev.data)
        data.update(pipeline_stage=stage, stage_index=index, n_stages=len(STAGES), inner_stage=ev.stage)
        yield Progress(stage, ev.step, ev.total, ev.message, ev.elapsed_s, ev.eta_s, data)


def train_job(field_: DensityField, config: PipelineConfig, *, cancel: CancelToken | None = None,
              members: Any = None) -> Generator[Progress, None, BinnFit]:
    """The 'binn' stage as one job: train the BINN (``config.binn``), then, with ``config.refine.enabled``, refine
    its D(u), G(u) through the forward solver (:mod:`napari_binn.binn.refine`; inner stage ``"refine"``). Every
    path that trains a BINN (the pipeline, the command line, the training dock, batches) goes through here.
    members: where the ensemble members train (``train_binn``'s ``members``: None, one after another)."""
    config.refine.validate()
    if config.refine.enabled:  # a field too short for the refinement is refused before the training, not after it
        check_frames(config.refine, field_.n_frames)
    fit = yield from train_binn(field_, config.binn, cancel=cancel, members=members)
    if config.refine.enabled and not fit.metadata.get("cancelled") and not is_cancelled(cancel):
        fit = yield from refine_binn_job(field_, fit, config.refine, cancel=cancel)
        if is_cancelled(cancel):
            fit.metadata["cancelled"] = True
    return fit


def surrogate_on_grid(fit: BinnFit, field_: DensityField) -> np.ndarray:
    """(T, Ny, Nx) BINN surrogate u at the field's box centres and frame times, NaN outside the mask."""
    t, y, x = np.meshgrid(field_.t_h, field_.y_um, field_.x_um, indexing="ij")
    u = fit.u(x, y, t)
    return np.where(field_.mask[None], u, np.nan)


def run_pipeline(
    data: Stack | DensityField | PipelineResult,
    config: PipelineConfig | None = None,
    *,
    roi: Any = None,
    stages: Sequence[str] = STAGES,
    cancel: CancelToken | None = None,
    members: Any = None,
) -> Generator[Progress, None, PipelineResult]:
    """Run the requested ``stages`` as one job; yields stage-tagged Progress, returns a PipelineResult.

    data: an image Stack (starts at 'density'; ``roi`` as for ``extract_density``), a DensityField (starts at
    'binn'), or a previous PipelineResult (its finished stages are reused; only ``stages`` are redone, e.g.
    ``stages=('symbolic', 'simulate', 'refit', 'qc')`` re-discovers equations from a saved BINN).
    Cancel: the running stage returns its best partial result, later stages are skipped, and
    ``result.metadata['cancelled_in']`` names the stage. members: where the BINN's ensemble members train
    (``train_binn``'s ``members``: None here, one after another).
    """
    config = config or PipelineConfig()
    config.validate()
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    if isinstance(data, PipelineResult):
        result = PipelineResult(config, data.field, data.fit, data.equations, dict(data.simulations),
                                dict(data.mechanistic), data.qc, dict(data.metadata))
        stack = None
    elif isinstance(data, DensityField):
        result, stack = PipelineResult(config, field=data), None
    elif isinstance(data, Stack):
        result, stack = PipelineResult(config), data
    else:
        raise TypeError(f"run_pipeline needs a Stack, a DensityField or a PipelineResult; got {type(data).__name__}")
    if "symbolic" in stages:  # bad form names are refused before any stage runs
        check_form_names("D", config.symbolic.forms_D)
        check_form_names("G", config.symbolic.forms_G)
    result.metadata.setdefault("napari_binn_version", __version__)
    timings = result.metadata.setdefault("seconds", {})
    warnings = result.metadata.setdefault("warnings", [])

    def stop(stage: str) -> bool:
        if is_cancelled(cancel):
            result.metadata["cancelled_in"] = stage
            return True
        return False

    for index, stage in enumerate(STAGES):
        if "refit" in stages and result.field is not None:  # fail before the long stages, not after them
            check_holdout(config.refit, result.field.n_frames)
        if stage not in stages:
            continue
        if stop(stage):
            break
        t0 = time.perf_counter()
        if stage == "density":
            if stack is None:
                if result.field is None:
                    raise InputError("the 'density' stage needs an image Stack")
                continue
            dc = config.density
            result.field = yield from _tag(extract_density_job(
                stack, roi, dc.method, dc.box_um, cancel=cancel,
                allow_unknown_pixel_size=dc.allow_unknown_pixel_size, **dc.params), stage, index)
            warnings += list(result.field.metadata.get("warnings", []))
        elif stage == "binn":
            _need(result.field, "binn", "a density field")
            result.fit = yield from _tag(train_job(result.field, config, cancel=cancel, members=members),
                                         stage, index)
            warnings += list(result.fit.metadata.get("warnings", []))
        elif stage == "symbolic":
            _need(result.fit, "symbolic", "a trained BINN")
            sc = config.symbolic
            result.equations = yield from _tag(discover_equations_job(
                result.fit, backend=sc.backend, operators=sc.operators, max_complexity=sc.max_complexity,
                seeds=tuple(sc.seeds), selection=sc.selection, n_samples=sc.n_samples,
                quantiles=tuple(sc.quantiles), forms_D=sc.forms_D, forms_G=sc.forms_G, cancel=cancel), stage, index)
        elif stage == "simulate":
            _need(result.field, "simulate", "a density field")
            yield from _simulate_stage(result, config, cancel, index)
        elif stage == "refit":
            _need(result.field, "refit", "a density field")
            yield from _refit_stage(result, config, cancel, index)
        elif stage == "qc":
            _need(result.field, "qc", "a density field")
            aic = {name: fit.aic for name, fit in result.mechanistic.items()}
            result.qc = compare(result.field, result.simulations, aic=aic)
            yield Progress("qc", 1, 1, "QC table ready", data={"pipeline_stage": "qc", "stage_index": index,
                                                                "n_stages": len(STAGES)})
        timings[stage] = time.perf_counter() - t0
        if (stage == "binn" and result.fit is not None and result.fit.metadata.get("cancelled")) or stop(stage):
            result.metadata["cancelled_in"] = stage
            break
    return result


def _need(value: Any, stage: str, what: str) -> None:
    if value is None:
        raise InputError(f"the '{stage}' stage needs {what}: run the earlier stages first or start from a result "
                         "that has it")


def _simulate_stage(result: PipelineResult, config: PipelineConfig, cancel: CancelToken | None, index: int):
    fld = result.field
    sc = config.simulation
    runs: list[tuple[str, Any, Any, Any]] = []
    if result.fit is not None:
        result.simulations["BINN surrogate"] = surrogate_on_grid(result.fit, fld)
        if sc.learned:
            runs.append(("learned D, G", result.fit.D, result.fit.G, learned_delay(result)))
    eq = result.equations
    if sc.closed_form and eq is not None and eq.D is not None and eq.G is not None:
        runs.append(_closed_form_run(result, eq))
    yield from _simulate_runs(result, runs, config, cancel, "simulate", index)


def _forms(eq: Equations) -> dict[str, str]:
    """The selected D and G of ``eq`` as text (sympy's), to tell whether a choice changed them."""
    return {"D": str(eq.D.sympy), "G": str(eq.G.sympy)}


def learned_delay(result: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """The BINN's learned delay T(t) (time in hours) when it learned one (``binn.use_delay``), else None;
    ``result``: a PipelineResult or anything else with its ``fit`` (the GUI's shared state). Every simulation and
    refit of the result's D and G holds it fixed: the closed forms are D(u) and G(u) under the same T(t) as the
    learned curves."""
    return _fit_delay(result.fit)


def _fit_delay(fit: BinnFit | None) -> Callable[[np.ndarray], np.ndarray] | None:
    return fit.T if fit is not None and fit.config.use_delay else None


def refitted_delay(result: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """The delay T(t) = 1 - exp(-(t - t0)/tau) the refitted closed form holds (``refit.delay``), when the refit
    stage chose it over the learned T(t); else None. ``result``: a PipelineResult or anything with ``metadata``."""
    return _delay_from_info((getattr(result, "metadata", None) or {}).get("refit_delay"))


def _delay_from_info(info: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if not isinstance(info, dict) or not info.get("used"):
        return None
    t0, tau = float(info["t0_h"]), float(info["tau_h"])
    return lambda t: 1.0 - np.exp(-(np.asarray(t, dtype=float) - t0) / tau)


def _closed_form_run(result: PipelineResult, eq: Equations) -> tuple[str, Any, Any, Any]:
    """The 'closed form' simulation's run: ``eq``'s selected forms with the symbolic fit's constants, held finite
    below the field's lowest density (:func:`pde_safe`), under the learned delay if any (:func:`learned_delay`).
    Records those forms in ``result.metadata['closed_form_simulated']``: the refit stage simulates again when its
    choice changes them."""
    result.metadata["closed_form_simulated"] = _forms(eq)
    floor = _u_floor(result.field)
    return ("closed form", pde_safe(eq.D.sympy, floor), pde_safe(eq.G.sympy, floor), learned_delay(result))


def _simulate_runs(result: PipelineResult, runs: list[tuple[str, Any, Any, Any]], config: PipelineConfig,
                   cancel: CancelToken | None, stage: str, index: int):
    """Simulate each (name, D, G, T) of ``runs`` into ``result.simulations[name]``; a simulation that fails is
    left out with a warning (``result.metadata['warnings']``) and a progress event, and the others go on."""
    sc = config.simulation
    for name, D, G, T in runs:
        if is_cancelled(cancel):
            return
        try:
            result.simulations[name] = yield from _tag(simulate_job(
                D, G, result.field, T=T, rtol=sc.rtol, method=sc.method, cancel=cancel), stage, index)
        except (SimulationError, ValueError) as err:
            result.simulations.pop(name, None)
            result.metadata["warnings"].append(f"simulation '{name}' failed: {err}")
            yield Progress(stage, 0, None, f"simulation '{name}' failed: {err}",
                           data={"pipeline_stage": stage, "failed": name})


def _candidate_indices(f, n: int) -> list[int]:
    """Up to ``n`` rows of a front no more complex than the selected one: the selected row, the simplest row (a
    constant, usually) and the rows with the highest PySR score between them."""
    sel = f.selected_index
    simpler = sorted((i for i, row in enumerate(f.front) if row.complexity < f.rows[sel].complexity),
                     key=lambda i: f.front[i].complexity)
    picked = [sel] + simpler[:1]
    picked += sorted(simpler[1:], key=lambda i: -f.front[i].score)[: max(n - 2, 0)]
    return sorted(picked[: max(n, 1)], key=lambda i: f.rows[i].complexity)


#: most rounds of the held-out and BIC choices (D, G, D, G, ...; each stops at the first round that keeps its choice)
HOLDOUT_ROUNDS = 6


def _select_by_bic(result: PipelineResult, eq: Equations, n: int, margin: float, kw: dict[str, Any],
                   cancel: CancelToken | None, index: int):
    """Refit candidate forms against the data and return ``eq`` re-selected to the lowest-BIC pair.

    Coordinate-wise, as the held-out choice: with G at its symbolic selection, every candidate D is refitted and the
    best kept; then every candidate G with that D; then D again, and so on until a round keeps its function's
    choice (at most HOLDOUT_ROUNDS). Each time the simplest form (by expression size) whose BIC is within
    ``margin`` of the lowest is kept. The fitted candidates go into ``result.metadata['refit_candidates']``."""

    cands = {"D": _candidate_indices(eq.D, n), "G": _candidate_indices(eq.G, n)}
    if len(cands["D"]) == 1 and len(cands["G"]) == 1:
        return eq
    total = 2 * len(cands["D"]) + len(cands["G"]) - 2
    current = {"D": eq.D.selected_index, "G": eq.G.selected_index}
    scores: dict[tuple[int, int], float] = {}
    rows: list[dict[str, Any]] = []

    def pair(i: int, j: int) -> Equations:
        return replace(eq, D=replace(eq.D, selected_index=i, selection="bic"),
                       G=replace(eq.G, selected_index=j, selection="bic"))

    for round_ in range(HOLDOUT_ROUNDS):  # a pair is never refitted twice
        key = "DG"[round_ % 2]
        before = current[key]
        for idx in cands[key]:
            ij = (idx, current["G"]) if key == "D" else (current["D"], idx)
            if ij in scores or is_cancelled(cancel):
                continue
            cand = pair(*ij)
            model, init = cand.parameters()
            yield Progress("refit", len(scores), total, f"candidate {len(scores) + 1}/{total}: "
                           f"D = {cand.D.text}; G = {cand.G.text}",
                           data={"pipeline_stage": "refit", "stage_index": index})
            try:
                fit = yield from _tag(fit_mechanistic_job(result.field, model, init=init, cancel=cancel,
                                                          bounds=cand.form_bounds(), **kw), "refit", index)
                bic = float(fit.bic) if np.isfinite(fit.bic) else np.inf
                rows.append({"D": cand.D.text, "G": cand.G.text, "bic": bic if np.isfinite(bic) else None,
                             "aic": float(fit.aic), "params": {p: float(v) for p, v in fit.params.items()}})
            except Exception as err:  # a candidate that cannot be simulated is skipped, not fatal
                bic = np.inf
                rows.append({"D": cand.D.text, "G": cand.G.text, "bic": None, "error": str(err)})
            scores[ij] = bic
        done = {ij: b for ij, b in scores.items() if (ij[1] == current["G"] if key == "D" else ij[0] == current["D"])}
        if done and np.isfinite(min(done.values())):
            # the simplest form within `margin` of the lowest BIC: a more complex form needs strong evidence
            lowest = min(done.values())
            front = eq.D.front if key == "D" else eq.G.front
            pos = 0 if key == "D" else 1
            best = min((ij for ij, b in done.items() if b <= lowest + margin),
                       key=lambda ij: (front[ij[pos]].complexity, done[ij]))
            current = {"D": best[0], "G": best[1]}
        if round_ >= 1 and current[key] == before:
            break
    result.metadata["refit_candidates"] = rows
    if not any(np.isfinite(b) for b in scores.values()):
        return eq
    return pair(current["D"], current["G"])


#: grid boxes per side of the spatial blocks over which the held-out test pairs candidates' errors
HOLDOUT_BLOCK = 4


def holdout_count(rc: RefitConfig, n_frames: int) -> int:
    """The number of late frames held out: ``rc.holdout_frames``, or when unset min(3, (n_frames - 2) // 2)."""
    if rc.holdout_frames is None:
        return max(0, min(3, (int(n_frames) - 2) // 2))
    return int(rc.holdout_frames)


def check_holdout(rc: RefitConfig, n_frames: int) -> None:
    """ConfigError naming ``refit.holdout_frames`` / ``refit.holdout_level`` / ``refit.holdout_margin`` and their
    allowed values, when the held-out choice will run (closed forms refitted, more than one candidate); and
    ``refit.delay_check``'s and ``refit.delay``'s always."""
    _check_bic_margin("delay_check", rc.delay_check, 100, "no check")
    if rc.delay not in REFIT_DELAY:
        raise ConfigError(f"refit.delay = {rc.delay!r}: allowed values are {', '.join(map(repr, REFIT_DELAY))}")
    if not rc.closed_form or rc.candidates <= 1:
        return
    h = rc.holdout_frames
    if h is not None and (isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h <= n_frames - 2):
        raise ConfigError(f"refit.holdout_frames = {h!r}: allowed values are the integers 0 (choose by BIC) to "
                          f"{max(n_frames - 2, 0)} for this field of {n_frames} frames (the candidates are refitted "
                          "on the frames before the held-out ones, and that needs at least 2), or unset (automatic)")
    if not 0.0 < float(rc.holdout_level) < 1.0:
        raise ConfigError(f"refit.holdout_level = {rc.holdout_level!r}: allowed values are in (0, 1), e.g. 0.05")
    if not 0.0 <= float(rc.holdout_margin) < 1.0:
        raise ConfigError(f"refit.holdout_margin = {rc.holdout_margin!r}: allowed values are in [0, 1), e.g. 0.05")
    _check_bic_margin("holdout_bic_switch", rc.holdout_bic_switch, 100, "never switch")
    _check_bic_margin("holdout_tested_switch", rc.holdout_tested_switch, 10, "no tested switch")
    lv = rc.holdout_switch_level
    if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0.0 < float(lv) < 1.0:
        raise ConfigError(f"refit.holdout_switch_level = {lv!r}: allowed values are in (0, 1), e.g. 0.01")


def _check_bic_margin(key: str, value: Any, example: float, unset: str) -> None:
    """ConfigError naming ``refit.<key>`` unless ``value`` is None or a finite number >= 0 (a BIC difference)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0.0 <= float(value) < math.inf):
        raise ConfigError(f"refit.{key} = {value!r}: allowed values are a finite number >= 0 (a BIC difference, "
                          f"e.g. {example:g}) or unset ({unset})")


def _u_floor(fld: DensityField) -> float:
    """The density below which a closed form singular at u = 0 (e.g. Gompertz's log u) is held constant in the
    solver: 1e-6 of the largest observed density."""
    with np.errstate(all="ignore"):
        top = float(np.nanmax(np.where(fld.mask[None], fld.u, np.nan))) if np.any(fld.observed) else 1.0
    return 1e-6 * top if np.isfinite(top) and top > 0 else 1e-9


def solver_model(eq: Equations, fld: DensityField) -> tuple[dict[str, Any], dict[str, float]]:
    """``eq.parameters()`` made safe for the solver at empty boxes (see :func:`~napari_binn.symbolic.forms.pde_safe`)."""
    model, init = eq.parameters()
    floor = _u_floor(fld)
    return {k: pde_safe(v, floor, init) for k, v in model.items()}, init


def _row_label(f, i: int) -> str:
    row = f.rows[i]
    return row.expression.text + (f" [{row.form}]" if row.form else "")


def split_row_label(label: str) -> tuple[str, str]:
    """(expression text, form name or "") of a held-out candidate's label, ``"0.5*u [proportional]"``."""
    if label.endswith("]") and " [" in label:
        cut = label.rfind(" [")
        return label[:cut], label[cut + 2:-1]
    return label, ""


#: a form whose curve (with its symbolic fit's constants) is within this relative L2 distance of the headline's on
#: the observed densities is the headline in another guise (a saturating D with a vanishing saturation constant, an
#: Allee G with its threshold at 0): listed apart from the genuine alternatives
SAME_CURVE = 0.01


def _observed_u(fld: DensityField) -> np.ndarray:
    """33 densities spanning the 5th-95th percentile of the observed boxes (where the forms are compared)."""
    vals = fld.u[:, fld.mask][np.isfinite(fld.u[:, fld.mask])] if np.any(fld.mask) else np.zeros(0)
    if vals.size == 0:
        return np.zeros(0)
    lo, hi = np.percentile(vals, [5, 95])
    return np.linspace(lo, hi, 33)


def _same_curve(a, b, u: np.ndarray, tol: float = SAME_CURVE) -> bool:
    """Whether two closed forms (:class:`~napari_binn.symbolic.expression.Expression`) give the same curve (relative
    L2 distance under ``tol``) on ``u``."""
    if u.size == 0:
        return False
    with np.errstate(all="ignore"):  # an internal comparison on the observed densities: not the user's extrapolation
        ya = np.broadcast_to(np.asarray(a(u, warn=False), float), u.shape)
        yb = np.broadcast_to(np.asarray(b(u, warn=False), float), u.shape)
    if not (np.all(np.isfinite(ya)) and np.all(np.isfinite(yb))):
        return False
    scale = np.linalg.norm(yb)
    return bool(scale > 0 and np.linalg.norm(ya - yb) <= tol * scale)


def _refitted_form(eq: Equations, key: str, params: dict[str, float] | None):
    """``eq``'s selected D or G (``key``) with the constants of its held-out refit (``params``; the symbolic fit's
    constants when the refit has none)."""
    if params:
        try:
            return getattr(eq.with_params(params), key).selected
        except (ValueError, KeyError):  # names of another model (a floored form): keep the symbolic constants
            pass
    return getattr(eq, key).selected


def _four_digits(expr: sp.Expr) -> str:
    """``expr`` as text with its constants to 4 significant digits; its integers stay integers (evalf wrote the 1
    of a saturating D0/(b u + 1) as a constant 1.0, so the form read back had a third constant)."""
    return sp.sstr(expr.xreplace({c: sp.Float(c, 4) for c in expr.atoms(sp.Float)}))


def _holdout_candidates(f, n: int) -> list[int]:
    """Rows of ``f.rows`` the held-out test compares: the front's candidates (as for the BIC choice), the front rows
    that are library forms, and the library rows; one per structure (constants replaced by placeholders, so a
    sign is not told apart), fewest constants first. Two library forms of the same structure are both kept: their
    refits keep their own bounds (an Allee G's threshold >= 0, a weak Allee's <= 0), so they are different
    candidates; until 8 December a weak Allee row dropped the Allee row, and with it every strong Allee threshold."""
    idx = [f.selected_index] + _candidate_indices(f, n) + [i for i, r in enumerate(f.front) if r.form]
    idx += list(range(len(f.front), len(f.rows)))
    out, seen = [], {}
    for i in idx:  # one per structure: the refit re-estimates the constants anyway
        expr = f.rows[i].expression.sympy
        shape = sp.srepr(expr.xreplace({c: sp.Symbol("c") for c in free_floats(expr)}))
        forms = seen.setdefault(shape, set())
        form = f.rows[i].form or None
        if not forms or (form is not None and None not in forms and form not in forms):
            forms.add(form)
            out.append(i)
    return sorted(out, key=lambda i: (n_constants(f.rows[i].expression.sympy), f.rows[i].complexity, i))


def switch_bics(f: DiscoveredFunction, rows: list[int], head: int, bics: list[float | None]) -> list[float | None]:
    """The training-frame BICs the in-sample switch may act on (:func:`~napari_binn.symbolic.selection.insample_switch`):
    the headline's and those of named library forms; None for the symbolic front's other expressions, which gain
    in-sample BIC by making up for a wrong partner function (a Richards wound's G went to a 4-constant expression
    by 222 and its D from 19% to 99% off)."""
    return [b if k == head or f.rows[i].form else None for k, (i, b) in enumerate(zip(rows, bics))]


def _select_by_holdout(result: PipelineResult, eq: Equations, rc: RefitConfig, kw: dict[str, Any],
                       cancel: CancelToken | None, index: int):
    """Choose D and G by how well they predict the held-out last frames (see :class:`RefitConfig`).

    Coordinate-wise: every candidate D with G at its symbolic selection, then every candidate G with the chosen
    D, then D again with the chosen G, and so on until a round keeps its function's choice (at most
    HOLDOUT_ROUNDS). Each candidate pair is refitted (fit_mechanistic, no
    intervals) on the frames before the held-out ones and simulated over all frames; its held-out squared
    errors are summed in 4 x 4-box blocks; :func:`~napari_binn.symbolic.selection.heldout_choice` excludes the
    ones a paired test finds worse than the best and keeps the one with the fewest constants. Returns
    (equations re-selected, with ``metadata['alternatives']``; the headline's held-out fit's constants as the
    start of the final refit)."""

    fld = result.field
    n_t, h = fld.n_frames, holdout_count(rc, fld.n_frames)
    train = DensityField(fld.u[: n_t - h], fld.mask, fld.x_um, fld.y_um, fld.t_h[: n_t - h], fld.units, fld.K,
                         dict(fld.metadata))
    late = fld.u[n_t - h:]
    cands = {"D": _holdout_candidates(eq.D, rc.candidates), "G": _holdout_candidates(eq.G, rc.candidates)}
    current = {"D": eq.D.selected_index, "G": eq.G.selected_index}
    for key in ("D", "G"):
        if current[key] not in cands[key]:
            cands[key].insert(0, current[key])
    cache: dict[tuple[int, int], tuple[Any, dict[str, Any], Any]] = {}
    rows: list[dict[str, Any]] = []
    u_obs = _observed_u(fld)
    total = 2 * len(cands["D"]) + len(cands["G"]) - 2  # the usual count (more when a third round changes D)

    def pair(i: int, j: int) -> Equations:
        return replace(eq, D=replace(eq.D, selected_index=i, selection="held-out"),
                       G=replace(eq.G, selected_index=j, selection="held-out"))

    def evaluate(ij: tuple[int, int]):
        nonlocal total
        total = max(total, len(cache) + 1)
        cand = pair(*ij)
        model, init = solver_model(cand, fld)
        yield Progress("refit", len(cache), total, f"held-out candidate {len(cache) + 1}/{total}: "
                       f"D = {cand.D.text}; G = {cand.G.text}", data={"pipeline_stage": "refit", "stage_index": index})
        rec: dict[str, Any] = {"D": _row_label(eq.D, ij[0]), "G": _row_label(eq.G, ij[1])}
        errors = train_errors = None
        try:
            fit = yield from _tag(fit_mechanistic_job(train, model, init=init, cancel=cancel,
                                                      bounds=cand.form_bounds(), **kw), "refit", index)
            u0 = fld.initial_state(denoise=kw.get("initial") == "denoised")
            pred = yield from _tag(simulate_job(fit.D, fit.G, u0, fld.mask, fld.dx_um, fld.t_h,
                                                kw.get("time_factor"), rtol=kw.get("rtol", 1e-4)), "refit", index)
            errors = block_errors(pred[n_t - h:], late, fld.mask, HOLDOUT_BLOCK)
            train_errors = block_errors(pred[: n_t - h], train.u, fld.mask, HOLDOUT_BLOCK)
            rec.update(params={p: float(v) for p, v in fit.params.items()},
                       heldout_sse=float(np.sum(errors)) if np.all(np.isfinite(errors)) else None,
                       train_bic=float(fit.bic) if np.isfinite(fit.bic) else None,
                       converged=bool(fit.converged), simulations=int(fit.n_evals))
        except Exception as err:  # a candidate that cannot be fitted or simulated is excluded, not fatal
            rec["error"] = str(err)
        cache[ij] = (errors, rec, train_errors)
        rows.append(rec)

    chosen: dict[str, dict[str, Any]] = {}
    # D and G in turn until a round keeps its function's choice (then both are chosen given the other), at most
    # HOLDOUT_ROUNDS rounds; a pair is never refitted twice. (Three fixed rounds D, G, D left the Porous–Fisher
    # polygon's G chosen with a D that the third round replaced: logistic growth lost against the wrong D.)
    for round_ in range(HOLDOUT_ROUNDS):
        key = "DG"[round_ % 2]
        before = current[key]
        options = [(i, current["G"]) if key == "D" else (current["D"], i) for i in cands[key]]
        for ij in options:
            if ij not in cache and not is_cancelled(cancel):
                yield from evaluate(ij)
        avail = [ij for ij in options if ij in cache]
        if not avail:
            continue
        consts = [n_constants(eq.D.rows[i].expression.sympy) + n_constants(eq.G.rows[j].expression.sympy)
                  for i, j in avail]
        sizes = [eq.D.rows[i].complexity + eq.G.rows[j].complexity for i, j in avail]
        head, excluded, pvals, totals = heldout_choice([cache[ij][0] for ij in avail], consts, rc.holdout_level,
                                                       rc.holdout_margin, sizes)
        if head is None:
            continue
        pos = 0 if key == "D" else 1
        f = eq.D if key == "D" else eq.G
        parsimonious = head
        train_errs = [cache[ij][2] for ij in avail]
        head, bic_gain = insample_switch(head, excluded, totals,
                                         switch_bics(f, [ij[pos] for ij in avail], head,
                                                     [cache[ij][1].get("train_bic") for ij in avail]),
                                         rc.holdout_bic_switch, train_errs, rc.holdout_tested_switch,
                                         rc.holdout_switch_level)
        p_better = [None if e is None or train_errs[parsimonious] is None
                    else paired_better_pvalue(e, train_errs[parsimonious]) for e in train_errs]
        reason = "fewest constants" if bic_gain is None else (
            f"training-frame BIC {bic_gain:.0f} below the fewest-constant form "
            f"{_row_label(f, avail[parsimonious][pos])}"
            + (f", lower across blocks (paired test p = {p_better[head]:.2g})" if p_better[head] is not None else "")
            + ", held-out error no higher")
        current = {"D": avail[head][0], "G": avail[head][1]}
        kept = [ij for k, ij in enumerate(avail) if not excluded[k] and k != head]
        # compared as refitted (the curves the held-out test judged), not with the symbolic fit's constants: a
        # saturating D fitted flat to a learned curve can bend once refitted against the data
        fitted = {ij: _refitted_form(pair(*ij), key, cache[ij][1].get("params")) for ij in kept + [avail[head]]}
        same = [ij for ij in kept if _same_curve(fitted[ij], fitted[avail[head]], u_obs)]
        chosen[key] = {
            "headline": _row_label(f, avail[head][pos]),
            "alternatives": [_row_label(f, ij[pos]) for ij in kept if ij not in same],
            "same_as_headline": [_row_label(f, ij[pos]) for ij in same],
            "refitted": {_row_label(f, ij[pos]): _four_digits(fitted[ij].sympy) for ij in kept + [avail[head]]},
            "candidates": [{"form": _row_label(f, ij[pos]), "n_constants": n_constants(f.rows[ij[pos]].expression.sympy),
                            "heldout_sse": totals[k] if np.isfinite(totals[k]) else None,
                            "p_worse": None if not np.isfinite(pvals[k]) else float(pvals[k]),
                            "excluded": bool(excluded[k]), "train_bic": cache[ij][1].get("train_bic"),
                            "p_train_better": p_better[k]} for k, ij in enumerate(avail)],
            "with": _row_label(eq.G if key == "D" else eq.D, avail[head][1 - pos]),
            "headline_reason": reason,
        }
        if round_ >= 1 and current[key] == before:
            break
    result.metadata["refit_candidates"] = rows
    n_blocks = next((len(e) for e, *_ in cache.values() if e is not None), 0)
    result.metadata["holdout"] = {"frames": h, "level": float(rc.holdout_level), "max_evals": kw.get("max_evals"),
                                  "margin": float(rc.holdout_margin), "block_boxes": HOLDOUT_BLOCK,
                                  "n_blocks": n_blocks, "test": "one-sided paired t test over blocks",
                                  "bic_switch": rc.holdout_bic_switch, "tested_switch": rc.holdout_tested_switch,
                                  "switch_level": float(rc.holdout_switch_level), **chosen}
    final = (current["D"], current["G"])
    if final not in cache or cache[final][0] is None:
        return eq, None
    out = pair(current["D"], current["G"])
    alternatives = {k: v["alternatives"] for k, v in chosen.items()}
    same = {k: v["same_as_headline"] for k, v in chosen.items()}
    refitted = {k: v["refitted"] for k, v in chosen.items()}
    reasons = {k: v["headline_reason"] for k, v in chosen.items()}
    out = replace(out, metadata={**out.metadata, "alternatives": alternatives, "same_as_headline": same,
                                 "alternatives_refitted": refitted, "headline_reason": reasons})
    return out, cache[final][1].get("params")


def _as_refitted(label: str, refitted: dict[str, str]) -> str:
    """An alternative's label with the curve its held-out refit gave (fitted on the frames before the held-out ones)
    when that differs from the label's symbolic constants."""
    text = refitted.get(label)
    shown, form = split_row_label(label)
    form = f" [{form}]" if form else ""
    return label if not text or text == shown else f"{text}{form} (refitted; symbolic fit {shown})"


def alternatives_text(eq: Equations | None) -> list[str]:
    """'the data cannot tell apart: ...' lines for D and G (empty when the held-out test excluded every other form;
    none for a function whose form the user picked since: the comparison was made for another headline)."""
    alts = (eq.metadata.get("alternatives") if eq is not None else None) or {}
    same = (eq.metadata.get("same_as_headline") if eq is not None else None) or {}
    refitted = (eq.metadata.get("alternatives_refitted") if eq is not None else None) or {}
    reasons = (eq.metadata.get("headline_reason") if eq is not None else None) or {}
    out = []
    for key in ("D", "G"):
        f = getattr(eq, key, None)
        if f is None or getattr(f, "selection", None) == "user pick":
            continue
        head = f.selected.text + (f" [{f.selected_row.form}]" if f.selected_row.form else "")
        if alts.get(key):
            named = [_as_refitted(a, refitted.get(key, {})) for a in alts[key]]
            reason = reasons.get(key, "fewest constants")
            who = "the data" if reason == "fewest constants" else "the held-out frames"
            out.append(f"{key}(u): {who} cannot tell apart: {head} (headline, {reason}); "
                       + "; ".join(named))
        if same.get(key):
            out.append(f"{key}(u): also consistent, but the same curve as the headline on the observed densities "
                       f"(within {SAME_CURVE:.0%}): " + "; ".join(same[key]))
    return out


def determined_text(fit: BinnFit | None, tolerance: float = 0.25) -> list[str]:
    """One line per learned function: the density range where the data determine it (``BinnFit.determined_range``)."""
    if fit is None:
        return []
    unit = fit.units.get("u", "u")
    lo, hi = fit.density_range()
    out = []
    for key in ("D", "G"):
        if fit.band_sd(key, fit.u_grid(3)) is None:
            out.append(f"{key}(u): no band (a single BINN; train n_models >= 2 to see where the data determine it)")
            continue
        rng = fit.determined_range(key, tolerance)
        if rng is None:
            out.append(f"{key}(u) is not determined anywhere on the observed u in [{lo:.4g}, {hi:.4g}] {unit} "
                       f"(its ± 2 sd band is wider than {tolerance:.0%} of it)")
        else:
            out.append(f"{key}(u) is determined for u in [{rng[0]:.4g}, {rng[1]:.4g}] {unit} of the observed "
                       f"[{lo:.4g}, {hi:.4g}] (± 2 sd band within {tolerance:.0%})")
    return out


def refit_text(result: PipelineResult) -> list[str]:
    """The closed form with its constants refitted against the data: a heading, the two equations, then one line
    per constant with its 95% interval and unit. Empty when the refit did not run (or is of forms no longer
    selected)."""
    from .symbolic.expression import equation_text

    eq, refitted = result.equations, result.refitted_equations()  # eq itself when there is no refit of its forms
    if refitted is None or refitted is eq:
        return []
    lines = ["closed form with its constants refitted against the data (95% intervals):"]
    lines += [f"  {equation_text(k, f)}" for k, f in (("D", refitted.D), ("G", refitted.G)) if f is not None]
    return lines + [f"  {line}" for line in refit_constants_text(result)]


def refit_constants_text(result: PipelineResult) -> list[str]:
    """One line per constant of the refitted closed form: its value, 95% interval and unit (``D_0 = 845.5
    [686.1, 1005]  µm²/h``). Empty without a refit."""
    mech = result.mechanistic.get("closed form (refitted)")
    values = result.metadata.get("closed_form_refitted")
    if mech is None or not values:
        return []
    out = []
    for name, value in values.items():
        lo, hi = (mech.ci95 or {}).get(name, (math.nan, math.nan))
        out.append(f"{name} = {value:.4g}  [{lo:.4g}, {hi:.4g}]  {(mech.units or {}).get(name, '')}".rstrip())
    return out


def refine_text(fit: BinnFit | None) -> list[str]:
    """What the refinement through the PDE solver did (``fit.metadata['refine']``): one summary line, then its
    notes (e.g. a cap on its time steps). Empty when the BINN was not refined."""
    info = fit.metadata.get("refine") if fit is not None and isinstance(fit.metadata, dict) else None
    if not isinstance(info, dict):
        return []

    def num(key: str, fmt: str) -> str:
        value = info.get(key)
        return format(float(value), fmt) if isinstance(value, (int, float)) else "?"

    if info.get("failed"):
        return [f"D(u), G(u) not refined: the PDE solver's refinement did not lower the misfit "
                f"({num('misfit_start', '.4g')} -> {num('misfit', '.4g')}); the BINN's own curves are kept"] + [
            str(note) for note in info.get("notes", [])]
    line = (f"D(u), G(u) refined through the PDE solver: misfit {num('misfit_start', '.4g')} -> "
            f"{num('misfit', '.4g')}, smoothness {num('smoothness', 'g')}"
            + (f" (chosen by {info['smoothness_chosen_by']})" if info.get("smoothness_chosen_by") not in
               (None, "fixed") else "") + f", initial state '{info.get('initial', '?')}'")
    if isinstance(info.get("seconds"), (int, float)):
        line += f", {info['seconds']:.0f} s"
    return [line] + [str(note) for note in info.get("notes", [])]


def delay_text(fit: BinnFit | None, t_h: Any = None, short: bool = False,
               metadata: dict[str, Any] | None = None) -> list[str]:
    """Lines on the BINN's learned delay T(t) (``binn.use_delay``), at the first, middle and last of the times
    ``t_h`` (the field's frames), and on the refit's own T(t) = 1 - exp(-t/tau) when ``metadata['refit_delay']``
    (a result's metadata) says the refitted closed form holds it (``refit.delay``); empty when the BINN learned no
    delay. short: the values only (the canvas overlay)."""
    T = _fit_delay(fit)
    if T is None:
        return []
    t = np.asarray(t_h if t_h is not None else [0.0], dtype=float)
    picks = np.unique([t[0], t[len(t) // 2], t[-1]])

    def values(f: Callable[[np.ndarray], np.ndarray]) -> str:
        return ", ".join(f"{v:.2f} at {th:g} h" for th, v in zip(picks, f(picks)))

    info = (metadata or {}).get("refit_delay")
    refitted = _delay_from_info(info)
    if short:
        out = [f"T(t) learned: {values(T)}"]
        if refitted is not None:
            out.append(f"T(t) refitted: 1 - exp(-t/{float(info['tau_h']):.3g} h): {values(refitted)}")
        return out
    if refitted is None:
        return [f"T(t), the learned delay (1 = none): {values(T)}; the closed forms are D(u) and G(u) under it, "
                "held fixed in every simulation and refit" + _delay_choice_text(info)]
    lo, hi = info.get("tau_ci95") or (math.nan, math.nan)
    return [f"T(t), the learned delay (1 = none): {values(T)}; the symbolic stage's simulations and the choice of "
            "forms hold it fixed",
            f"T(t) of the refitted closed form: 1 - exp(-t/tau), tau = {float(info['tau_h']):.3g} h [{lo:.3g}, "
            f"{hi:.3g}] (t from the first frame): {values(refitted)}" + _delay_choice_text(info)]


def _delay_choice_text(info: Any) -> str:
    """Why the refit holds the T(t) it holds (``metadata['refit_delay']``); empty when there was no choice."""
    if not isinstance(info, dict) or info.get("bic_learned") is None or info.get("bic_fitted") is None:
        return ""
    diff = float(info["bic_learned"]) - float(info["bic_fitted"])
    if info.get("used"):
        return (f"; its BIC is lower by {diff:.0f} than under the learned T(t)" if info.get("delay") == "auto" else
                f" (refit.delay = 'fit'; BIC {-diff:+.0f} against the learned T(t))")
    return (f"; T(t) = 1 - exp(-t/tau) fitted the closed form no better (BIC {-diff:+.0f}, tau "
            f"{float(info.get('tau_h', math.nan)):.3g} h)")


#: allowed values of ``RefitConfig.initial``
REFIT_INITIAL = ("auto", "data", "denoised")
#: allowed values of ``RefitConfig.delay``
REFIT_DELAY = ("auto", "learned", "fit")


def _choose_initial(result: PipelineResult, rc: RefitConfig, kw: dict[str, Any], cancel: CancelToken | None,
                    index: int):
    """'data' or 'denoised': the initial state under which a quick fit (no intervals) of the symbolic selection
    (else the reference model) fits the data better. Written to ``result.metadata['refit_initial']``."""
    fld, eq = result.field, result.equations
    if eq is not None and eq.D is not None and eq.G is not None and rc.closed_form:
        model, init = solver_model(eq, fld)
        bounds = eq.form_bounds()
    elif rc.reference_model:
        model, init, bounds = rc.reference_model, None, None
    else:
        return "data"
    if not np.any(fld.initial_state(denoise=True) != fld.initial_state()):
        result.metadata["refit_initial"] = {"initial": "data", "why": "denoising changes nothing in frame 0"}
        return "data"
    loglik: dict[str, float] = {}
    for initial in ("data", "denoised"):
        if is_cancelled(cancel):
            return "data"
        try:
            fit = yield from _tag(fit_mechanistic_job(fld, model, init=init, cancel=cancel, bounds=bounds,
                                                      **{**kw, "intervals": None, "initial": initial}), "refit", index)
            loglik[initial] = float(fit.loglik) if np.isfinite(fit.loglik) else -np.inf
        except Exception:  # a start that cannot be fitted loses the comparison
            loglik[initial] = -np.inf
    best = "denoised" if loglik["denoised"] > loglik["data"] else "data"
    result.metadata["refit_initial"] = {"initial": best, "loglik": {k: (v if np.isfinite(v) else None)
                                                                    for k, v in loglik.items()}}
    return best


#: the delay the refit stage's check tries, T(t) = 1 - exp(-t/tau), and its starts (fractions of the time span)
DELAY_CHECK_T = "1 - exp(-t/tau)"
DELAY_CHECK_STARTS = (0.05, 0.2)


def _fit_tau(result: PipelineResult, model: dict[str, Any], params: dict[str, Any], bounds: dict[str, Any],
             kw: dict[str, Any], cancel: CancelToken | None, index: int):
    """The closed form ``model`` fitted with a delay T(t) = 1 - exp(-(t - t0)/tau) (t0 the first frame's time),
    from the constants ``params`` and two starts of tau (:data:`DELAY_CHECK_STARTS`), without intervals: the fit
    with the lower BIC, or None when neither could be fitted (or the field spans no time)."""
    fld = result.field
    span = float(fld.t_h[-1] - fld.t_h[0])
    if not span > 0:
        return None
    best = None
    for frac in DELAY_CHECK_STARTS:
        if is_cancelled(cancel):
            return None
        try:
            trial = yield from _tau_fit(fld, model, {**params, "tau": frac * span}, bounds,
                                        {**kw, "intervals": None}, cancel, index)
        except Exception:  # a start that cannot be fitted says nothing
            continue
        if np.isfinite(trial.bic) and (best is None or trial.bic < best.bic):
            best = trial
    return best


def _tau_fit(fld: DensityField, model: dict[str, Any], init: dict[str, Any], bounds: dict[str, Any],
             kw: dict[str, Any], cancel: CancelToken | None, index: int):
    """One fit of the closed form ``model`` with T(t) = 1 - exp(-(t - t0)/tau) (:func:`_tau_expr`, tau within
    :func:`_tau_bounds`) from ``init`` (the constants and tau), with ``kw``'s other settings."""
    return (yield from _tag(fit_mechanistic_job(
        fld, {**model, "T": _tau_expr(fld)}, init={k: float(v) for k, v in init.items()},
        bounds={**bounds, "tau": _tau_bounds(fld)}, **{**kw, "time_factor": None}, cancel=cancel), "refit", index))


def _tau_expr(fld: DensityField) -> str:
    """:data:`DELAY_CHECK_T` with t counted from the first frame's time."""
    return f"1 - exp(-(t - {float(fld.t_h[0])!r})/tau)"


def _tau_bounds(fld: DensityField) -> tuple[float, float]:
    """tau's range in those fits: 0.001 to 2 times the field's time span."""
    span = float(fld.t_h[-1] - fld.t_h[0])
    return 1e-3 * span, 2.0 * span


def _check_delay(result: PipelineResult, model: dict[str, Any], fit: MechanisticFit, bounds: dict[str, Any],
                 rc: RefitConfig, kw: dict[str, Any], cancel: CancelToken | None, index: int):
    """The refitted closed form fitted again with a delay T(t) = 1 - exp(-t/tau) (:func:`_fit_tau`); when the BIC
    falls by more than ``rc.delay_check``, a warning (the data look delayed, and a slow start is otherwise read
    into D and G). Writes ``result.metadata['delay_check']``. Measured on the 55 discovery-benchmark runs without a
    delay: the BIC fell by at most 5; on a delayed scratch by 1200-3100."""
    best = yield from _fit_tau(result, model, fit.params, bounds, kw, cancel, index)
    if best is None or not np.isfinite(fit.bic):
        return
    drop = float(fit.bic - best.bic)
    tau = float(best.params["tau"])
    result.metadata["delay_check"] = {"bic_drop": drop, "tau_h": tau, "T": DELAY_CHECK_T, "threshold": rc.delay_check}
    if drop > float(rc.delay_check):
        result.metadata.setdefault("warnings", []).append(
            f"the closed form fits the data much better with a delay T(t) = 1 - exp(-t/tau), tau = {tau:.3g} h (BIC "
            f"lower by {drop:.0f}): the cells may start slowly (e.g. after scratching). Without a delay a slow start "
            "is read into D(u) and G(u); train with 'Learn a delay T(t)' (binn.use_delay = true)")


def _choose_delay(result: PipelineResult, model: dict[str, Any], fit: MechanisticFit, bounds: dict[str, Any],
                  rc: RefitConfig, kw: dict[str, Any], cancel: CancelToken | None, index: int):
    """``refit.delay`` 'fit' or 'auto' when the BINN learned a delay: the closed form refitted with T(t) = 1 -
    exp(-t/tau) instead of the learned T(t) (``fit``); kept when ``rc.delay`` is 'fit' or its BIC is lower, and
    then refitted once more with ``kw``'s intervals. Returns the fit the result keeps; writes
    ``result.metadata['refit_delay']`` (what was tried and chosen)."""
    fld = result.field
    info: dict[str, Any] = {"delay": rc.delay, "T": DELAY_CHECK_T, "t0_h": float(fld.t_h[0]), "used": False,
                            "bic_learned": float(fit.bic) if np.isfinite(fit.bic) else None, "bic_fitted": None}
    result.metadata["refit_delay"] = info
    best = yield from _fit_tau(result, model, fit.params, bounds, kw, cancel, index)
    if best is None:
        return fit
    info.update(bic_fitted=float(best.bic), tau_h=float(best.params["tau"]))
    if rc.delay == "auto" and np.isfinite(fit.bic) and not best.bic < fit.bic:
        return fit
    final = best
    if kw.get("intervals") is not None and not is_cancelled(cancel):
        try:
            final = yield from _tau_fit(fld, model, best.params, bounds, kw, cancel, index)
        except Exception:  # the intervals could not be had: keep the point estimate, without them
            final = best
        if not np.isfinite(final.bic) or final.bic > best.bic + 1e-6 * abs(best.bic):
            final = best
    info.update(used=True, tau_h=float(final.params["tau"]), bic_fitted=float(final.bic),
                tau_ci95=[float(x) for x in (final.ci95 or {}).get("tau", (math.nan, math.nan))])
    return final


def _refit_stage(result: PipelineResult, config: PipelineConfig, cancel: CancelToken | None, index: int):
    fld = result.field
    rc = config.refit
    check_holdout(rc, fld.n_frames)
    kw = dict(weighting=rc.weighting, intervals=None if rc.intervals == "none" else rc.intervals,
              max_evals=rc.max_evals, rtol=config.simulation.rtol, time_factor=learned_delay(result))
    eq = result.equations
    if rc.initial == "auto":
        kw["initial"] = yield from _choose_initial(result, rc, kw, cancel, index)
    else:
        kw["initial"] = rc.initial
    if rc.reference_model:
        fit = yield from _tag(fit_mechanistic_job(fld, rc.reference_model, cancel=cancel, **kw), "refit", index)
        result.mechanistic[rc.reference_model] = fit
        result.simulations[rc.reference_model] = fit.predicted
    if rc.closed_form and eq is not None and eq.D is not None and eq.G is not None and not is_cancelled(cancel):
        start = None
        if holdout_count(rc, fld.n_frames) > 0 and rc.candidates > 1:
            eq, start = yield from _select_by_holdout(result, eq, rc, {**kw, "intervals": None,
                                                                       "max_evals": rc.holdout_max_evals}, cancel, index)
            result.equations = eq
        elif rc.candidates > 1:
            eq = yield from _select_by_bic(result, eq, rc.candidates, rc.bic_margin, {**kw, "intervals": None},
                                           cancel, index)
            result.equations = eq
        simulated = result.metadata.get("closed_form_simulated")
        if simulated is not None and simulated != _forms(eq) and not is_cancelled(cancel):
            # the 'closed form' simulation (tried by the simulate stage) was of the forms before this choice:
            # simulate the chosen ones, so the QC row and the overlay show the equations the result now holds
            yield from _simulate_runs(result, [_closed_form_run(result, eq)], config, cancel, "refit", index)
        model, init = solver_model(eq, fld)
        if start:  # the held-out fit's constants are closer to the data than the curve fit's
            init = {k: float(start.get(k, v)) for k, v in init.items()}
        fit = yield from _tag(fit_mechanistic_job(fld, model, init=init, cancel=cancel, bounds=eq.form_bounds(),
                                                  **kw), "refit", index)
        result.metadata["refit_delay"] = None
        if (fit.converged or np.isfinite(fit.loglik)) and kw.get("time_factor") is not None \
                and rc.delay != "learned" and not is_cancelled(cancel):
            fit = yield from _choose_delay(result, model, fit, eq.form_bounds(), rc, kw, cancel, index)
        result.mechanistic["closed form (refitted)"] = fit
        if fit.converged or np.isfinite(fit.loglik):
            result.simulations["closed form (refitted)"] = fit.predicted
            result.metadata["closed_form_refitted"] = {k: float(v) for k, v in fit.params.items()}
            if rc.delay_check is not None and kw.get("time_factor") is None and not is_cancelled(cancel):
                yield from _check_delay(result, model, fit, eq.form_bounds(), rc, kw, cancel, index)
