"""The whole job in one place: images -> density -> BINN -> equations -> simulation -> refit -> QC.

One :class:`PipelineConfig` (TOML round trip) drives every stage; :func:`run_pipeline` is a job generator
(stage-tagged :class:`~napari_binn.jobs.Progress` events, returns a :class:`PipelineResult`) used alike by the
command line, the napari widgets and the tests. Each stage can be run alone, and a run can start from a
previous result (e.g. a loaded bundle) to redo only the later stages.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from ._config_io import from_dict, read_toml, to_dict, write_toml
from .binn import BinnConfig, BinnFit, train_binn
from .binn.refine import RefineConfig, refine_binn_job
from .density import extract_density_job
from .field import DensityField
from .io import Stack
from .jobs import CancelToken, Progress, is_cancelled, run_job
from .pde import SimulationError, simulate_job
from .pde.mechanistic import MechanisticFit, fit_mechanistic_job
from .qc import QCReport, compare
from .symbolic import Equations, discover_equations_job

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
    observed density."""

    backend: str = "operon"
    operators: list[str] | None = None
    max_complexity: int = 20
    seeds: list[int] = dc_field(default_factory=lambda: [0])
    selection: str = "best"
    n_samples: int = 200
    quantiles: list[float] = dc_field(default_factory=lambda: [0.05, 0.95])


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
    'wald' | 'profile' | 'profile+ic' | 'none'. max_evals: simulations per fit. candidates: how many forms of
    each Pareto front are refitted against the data (the selected one, the simplest one and the best-scoring ones
    between; first D with G fixed, then G with the chosen D, then D again), as the 2020 BINN paper chose among its
    guided mechanistic models; 1 = refit only the symbolic selection. bic_margin: among the candidates, the
    simplest form (expression size) whose BIC is within this of the lowest is kept, so a more complex form needs
    strong evidence (a BIC difference above 6, Kass & Raftery 1995)."""

    closed_form: bool = True
    reference_model: str = "fisher_kpp"
    weighting: str = "ols"
    intervals: str = "wald+ic"
    max_evals: int = 200
    candidates: int = 6
    bic_margin: float = 6.0


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
            raise ValueError(f"[binn] unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(sorted(BinnConfig.__dataclass_fields__))}")
        cfg.binn = BinnConfig.from_dict(binn)
        return cfg

    def to_toml(self, path: str | Path) -> None:
        write_toml(self.to_dict(), path)

    @classmethod
    def from_toml(cls, path: str | Path) -> "PipelineConfig":
        return cls.from_dict(read_toml(path))


@dataclass(eq=False)
class PipelineResult:
    """Everything a run produced. Stages not run (or cancelled) leave their entries None / empty. Two results are
    equal only when they are the same object (their arrays and fits have no meaningful ``==``).

    field: the density data. fit: the BINN. equations: discovered closed forms (after the refit stage, the forms
    the BIC chose, with the symbolic fit's constants; the refitted constants are in
    ``metadata['closed_form_refitted']``, and ``equations.with_refit(mechanistic['closed form (refitted)'])``
    puts them in). simulations: (T, Ny, Nx) arrays in the field's units, keyed 'BINN surrogate', 'learned D, G',
    'closed form', 'closed form (refitted)' and the reference model's name. mechanistic: refits keyed
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


def train_job(field_: DensityField, config: PipelineConfig, *,
              cancel: CancelToken | None = None) -> Generator[Progress, None, BinnFit]:
    """The 'binn' stage as one job: train the BINN (``config.binn``), then, with ``config.refine.enabled``, refine
    its D(u), G(u) through the forward solver (:mod:`napari_binn.binn.refine`; inner stage ``"refine"``). Every
    path that trains a BINN (the pipeline, the command line, the training dock, batches) goes through here."""
    config.refine.validate()
    fit = yield from train_binn(field_, config.binn, cancel=cancel)
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
) -> Generator[Progress, None, PipelineResult]:
    """Run the requested ``stages`` as one job; yields stage-tagged Progress, returns a PipelineResult.

    data: an image Stack (starts at 'density'; ``roi`` as for ``extract_density``), a DensityField (starts at
    'binn'), or a previous PipelineResult (its finished stages are reused; only ``stages`` are redone, e.g.
    ``stages=('symbolic', 'simulate', 'refit', 'qc')`` re-discovers equations from a saved BINN).
    Cancel: the running stage returns its best partial result, later stages are skipped, and
    ``result.metadata['cancelled_in']`` names the stage.
    """
    config = config or PipelineConfig()
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
    result.metadata.setdefault("napari_binn_version", __version__)
    timings = result.metadata.setdefault("seconds", {})
    warnings = result.metadata.setdefault("warnings", [])

    def stop(stage: str) -> bool:
        if is_cancelled(cancel):
            result.metadata["cancelled_in"] = stage
            return True
        return False

    for index, stage in enumerate(STAGES):
        if stage not in stages:
            continue
        if stop(stage):
            break
        t0 = time.perf_counter()
        if stage == "density":
            if stack is None:
                if result.field is None:
                    raise ValueError("the 'density' stage needs an image Stack")
                continue
            dc = config.density
            result.field = yield from _tag(extract_density_job(
                stack, roi, dc.method, dc.box_um, cancel=cancel,
                allow_unknown_pixel_size=dc.allow_unknown_pixel_size, **dc.params), stage, index)
            warnings += list(result.field.metadata.get("warnings", []))
        elif stage == "binn":
            _need(result.field, "binn", "a density field")
            result.fit = yield from _tag(train_job(result.field, config, cancel=cancel), stage, index)
        elif stage == "symbolic":
            _need(result.fit, "symbolic", "a trained BINN")
            sc = config.symbolic
            result.equations = yield from _tag(discover_equations_job(
                result.fit, backend=sc.backend, operators=sc.operators, max_complexity=sc.max_complexity,
                seeds=tuple(sc.seeds), selection=sc.selection, n_samples=sc.n_samples,
                quantiles=tuple(sc.quantiles), cancel=cancel), stage, index)
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
        raise ValueError(f"the '{stage}' stage needs {what}: run the earlier stages first or start from a result "
                         "that has it")


def _simulate_stage(result: PipelineResult, config: PipelineConfig, cancel: CancelToken | None, index: int):
    fld = result.field
    sc = config.simulation
    runs: list[tuple[str, Any, Any, Any]] = []
    if result.fit is not None:
        result.simulations["BINN surrogate"] = surrogate_on_grid(result.fit, fld)
        if sc.learned:
            T = result.fit.T if result.fit.config.use_delay else None
            runs.append(("learned D, G", result.fit.D, result.fit.G, T))
    eq = result.equations
    if sc.closed_form and eq is not None and eq.D is not None and eq.G is not None:
        runs.append(("closed form", eq.D.sympy, eq.G.sympy, None))
    for name, D, G, T in runs:
        if is_cancelled(cancel):
            return
        try:
            result.simulations[name] = yield from _tag(simulate_job(
                D, G, fld, T=T, rtol=sc.rtol, method=sc.method, cancel=cancel), "simulate", index)
        except (SimulationError, ValueError) as err:
            result.metadata["warnings"].append(f"simulation '{name}' failed: {err}")
            yield Progress("simulate", 0, None, f"simulation '{name}' failed: {err}",
                           data={"pipeline_stage": "simulate", "failed": name})


def _candidate_indices(f, n: int) -> list[int]:
    """Up to ``n`` rows of a front no more complex than the selected one: the selected row, the simplest row (a
    constant, usually) and the rows with the highest PySR score between them."""
    sel = f.selected_index
    simpler = sorted((i for i, row in enumerate(f.front) if row.complexity < f.front[sel].complexity),
                     key=lambda i: f.front[i].complexity)
    picked = [sel] + simpler[:1]
    picked += sorted(simpler[1:], key=lambda i: -f.front[i].score)[: max(n - 2, 0)]
    return sorted(picked[: max(n, 1)], key=lambda i: f.front[i].complexity)


def _select_by_bic(result: PipelineResult, eq: Equations, n: int, margin: float, kw: dict[str, Any],
                   cancel: CancelToken | None, index: int):
    """Refit candidate forms against the data and return ``eq`` re-selected to the lowest-BIC pair.

    Coordinate-wise: with G at its symbolic selection, every candidate D is refitted and the best kept; then
    every candidate G with that D; then D again with the chosen G. Each time the simplest form (by expression
    size) whose BIC is within ``margin`` of the lowest is kept. The fitted candidates go into ``result.metadata['refit_candidates']``."""
    from dataclasses import replace

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

    for key in ("D", "G", "D"):  # D again only costs fits when G changed (pairs are not refitted twice)
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
                fit = yield from _tag(fit_mechanistic_job(result.field, model, init=init, cancel=cancel, **kw),
                                      "refit", index)
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
    result.metadata["refit_candidates"] = rows
    if not any(np.isfinite(b) for b in scores.values()):
        return eq
    return pair(current["D"], current["G"])


def _refit_stage(result: PipelineResult, config: PipelineConfig, cancel: CancelToken | None, index: int):
    fld = result.field
    rc = config.refit
    kw = dict(weighting=rc.weighting, intervals=None if rc.intervals == "none" else rc.intervals,
              max_evals=rc.max_evals, rtol=config.simulation.rtol)
    if rc.reference_model:
        fit = yield from _tag(fit_mechanistic_job(fld, rc.reference_model, cancel=cancel, **kw), "refit", index)
        result.mechanistic[rc.reference_model] = fit
        result.simulations[rc.reference_model] = fit.predicted
    eq = result.equations
    if rc.closed_form and eq is not None and eq.D is not None and eq.G is not None and not is_cancelled(cancel):
        if rc.candidates > 1:
            eq = yield from _select_by_bic(result, eq, rc.candidates, rc.bic_margin, {**kw, "intervals": None},
                                           cancel, index)
            result.equations = eq
        model, init = eq.parameters()
        fit = yield from _tag(fit_mechanistic_job(fld, model, init=init, cancel=cancel, **kw), "refit", index)
        result.mechanistic["closed form (refitted)"] = fit
        if fit.converged or np.isfinite(fit.loglik):
            result.simulations["closed form (refitted)"] = fit.predicted
            result.metadata["closed_form_refitted"] = {k: float(v) for k, v in fit.params.items()}
