"""Batch items: one analysis each (plain, picklable), their names and folders, and the one per-item run.

A batch is a list of :class:`BatchItem`, each a plain, picklable description of one analysis (input, ROI,
configuration, output folder, name), so the items can run here or as dask.distributed tasks through the one
function :func:`run_item_job`. The policy, in :func:`run_item_job` only:

- each item is isolated: one that fails is reported (name and error) and the others still run;
- a finished item's bundle is written as soon as it finishes (atomically: ``save_results`` writes a temporary
  folder and moves it into place), so a cancel or a crash later leaves every written bundle valid;
- a cancelled item writes nothing (status 'stopped'); the items after it are not run ('not run').

The command line (``napari-binn batch``) and the per-shape batch dock both drive ``napari_binn.batch.run_batch``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputError
from ..jobs import CancelToken, JobCancelled, Progress, run_job

__all__ = ["BatchItem", "ItemOutcome", "load_input", "check_outputs", "check_batch_folder", "item_names",
           "bundle_complete", "outcome_of_bundle", "run_item", "run_item_job", "STAGE_NAMES"]

#: What each pipeline stage is called in messages.
STAGE_NAMES = {"density": "density extraction", "binn": "BINN training", "symbolic": "equation discovery",
               "simulate": "simulation", "refit": "refit against the data", "qc": "QC"}
#: Rough share of one item's run time per stage, for one progress fraction over the whole batch.
_STAGE_SHARE = {"density": 0.08, "binn": 0.62, "symbolic": 0.1, "simulate": 0.05, "refit": 0.14, "qc": 0.01}
#: QC models whose N(t) error an outcome reports, first found first.
_NT_MODELS = ("closed form (refitted)", "closed form", "learned D, G", "BINN surrogate")


@dataclass
class BatchItem:
    """One analysis of a batch.

    name: how reports call it. data: a stack (TIFF file, folder of frames or glob) or a results bundle folder (its
    density is reused), or an in-memory Stack or DensityField. config: the PipelineConfig of its run. out: the
    bundle folder to write. roi: an ROI as ``extract_density`` takes it, or an ROI file (``napari_binn.roi``).
    read: ``read_stack`` options for a path (pixel_size_um, frame_interval_h, channel). overwrite: replace an
    existing ``out``. metadata: added to the result's metadata (e.g. which shape of an ROI layer it is).
    """

    name: str
    data: Any
    config: Any
    out: Path
    roi: Any = None
    read: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemOutcome:
    """What running one item gave (one row of a batch report).

    status: 'waiting' | 'running' | 'done' (bundle written) | 'failed' | 'stopped' (cancelled during its run,
    nothing written) | 'not run' (cancelled before it). message: why it failed or stopped. D, G: the chosen
    equations as readable text in ``D_units``, ``G_units``; ``refitted``: with the constants refitted to the data
    (else the symbolic regression's). nt_error: mean |%| error of the total cell number N(t) of ``nt_model``.
    seconds: its run time. constants: the chosen forms' constants, ``{name: [value, ci95 low, ci95 high, units]}``
    (refitted to the data, with their 95% intervals when the refit gave them; else the symbolic fit's, no
    intervals: None). pixel_size_um, frame_interval_h (the median interval), calibration (where the stack's pixel
    size and frame times came from): the units D and G are in, for spotting an item read with another calibration
    (None / '' for an item that started from a density field).
    """

    name: str
    out: Path
    status: str = "waiting"
    message: str = ""
    D: str = ""
    G: str = ""
    D_units: str = "µm²/h"
    G_units: str = "1/h"
    refitted: bool = False
    nt_error: float | None = None
    nt_model: str = ""
    seconds: float = 0.0
    constants: dict[str, list[Any]] = field(default_factory=dict)
    pixel_size_um: float | None = None
    frame_interval_h: float | None = None
    calibration: str = ""

    @property
    def written(self) -> bool:
        return self.status == "done"


def load_input(data: Any, *, pixel_size_um: float | None = None, frame_interval_h: float | None = None,
               channel: int | None = None) -> Any:
    """The input of an analysis: a results bundle folder (read as a PipelineResult) or a stack path (read as a
    calibrated Stack: ValueError when its pixel size or frame interval is unknown and not given); in-memory
    inputs (Stack, DensityField, PipelineResult) are returned as they are."""
    if not isinstance(data, (str, Path)):
        return data
    from ..io import read_stack
    from ..results import load_results

    path = Path(data)
    if path.is_dir() and (path / "manifest.json").is_file():
        return load_results(path)
    stack = read_stack(data, pixel_size_um=pixel_size_um, frame_interval_h=frame_interval_h, channel=channel)
    if stack.pixel_size_um is None:
        raise InputError(f"{data} does not say its pixel size: give it (µm per pixel; --pixel-size-um on the "
                         "command line)")
    if stack.metadata.get("time_units") == "frames":
        raise InputError(f"{data} does not say its frame interval: give it (hours; --frame-interval-h on the "
                         "command line)")
    return stack


def check_outputs(items: Sequence[BatchItem]) -> None:
    """Refuse a batch before it starts when an item's folder exists, is not empty and may not be overwritten
    (OutputError naming them); an empty folder is used."""
    taken = [it.out for it in items if not it.overwrite and it.out.exists()
             and (not it.out.is_dir() or any(it.out.iterdir()))]
    if taken:
        names = ", ".join(p.name for p in taken)
        one = len(taken) == 1
        raise OutputError(f"{names} already exist{'s' if one else ''} in {taken[0].parent} and "
                              f"{'is' if one else 'are'} not empty; nothing was overwritten. Choose another output "
                              "folder, or move those folders away.")


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ValueError, FileExistsError, FileNotFoundError)) else \
        f"{type(exc).__name__}: {exc}"


def _describe(outcome: ItemOutcome, result: Any) -> None:
    """Fill a written item's report: the calibration its density was extracted with, the chosen equations
    (refitted constants when the refit ran) and the N(t) error. A problem here only leaves the text short: the
    bundle is written."""
    from ..io import calibration_sources
    from ..symbolic.expression import readable

    fld = result.field
    if fld is not None:
        outcome.pixel_size_um = _num((fld.metadata or {}).get("pixel_size_um"))
        if len(fld.t_h) > 1:
            outcome.frame_interval_h = float(np.median(np.diff(fld.t_h)))
        outcome.calibration = "; ".join(calibration_sources(fld.metadata))
    try:
        eq = result.refitted_equations()  # the constants the data support, when the refit ran
        if eq is not result.equations:
            refit, outcome.refitted = result.mechanistic["closed form (refitted)"], True
            for name, value in result.metadata["closed_form_refitted"].items():
                lo, hi = (refit.ci95 or {}).get(name, (None, None))
                outcome.constants[name] = [float(value), _num(lo), _num(hi), (refit.units or {}).get(name, "")]
        elif eq is not None and eq.D is not None and eq.G is not None:
            _, init = eq.parameters()
            units = {f"{key}_{i}": c.units for key in ("D", "G")
                     for i, c in enumerate(getattr(eq, key).selected.constants)}
            outcome.constants = {name: [float(v), None, None, units.get(name, "")] for name, v in init.items()}
        for key in ("D", "G"):
            f = getattr(eq, key, None) if eq is not None else None
            setattr(outcome, key, readable(f.text, 4) if f is not None else "-")
            if f is not None and f.units:
                setattr(outcome, f"{key}_units", f.units)
        names = [m.name for m in result.qc.models] if result.qc is not None else []
        model = next((name for name in _NT_MODELS if name in names), "")
        if model:
            value = result.qc[model].mean_abs_count_error_pct
            outcome.nt_error, outcome.nt_model = (float(value) if np.isfinite(value) else None), model
    except Exception as exc:  # noqa: BLE001 - the report only
        outcome.refitted = False
        outcome.D, outcome.G = outcome.D or "?", outcome.G or "?"
        outcome.message = f"equations not shown ({_why(exc)}); see the bundle"


def _num(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def run_item_job(item: BatchItem, cancel: CancelToken | None = None, members: Any = None
                 ) -> Generator[Progress, None, ItemOutcome]:
    """Run one item (read its input, every pipeline stage, write its bundle); yields the pipeline's events and
    returns its :class:`ItemOutcome`. The failure policy of every batch: an error becomes a 'failed' outcome
    naming it (never raised), a cancel a 'stopped' one that wrote nothing. members: where its BINN's ensemble
    members train (``run_pipeline``'s ``members``)."""
    from ..pipeline import run_pipeline
    from ..results import save_results
    from ..roi import read_roi

    run_id = item.metadata.get(BATCH_RUN_KEY)
    if run_id and bundle_complete(item.out) and _bundle_run_id(item.out) == run_id:
        # a retry of an item whose first attempt wrote its bundle, then lost its worker before the outcome was read
        outcome = outcome_of_bundle(item)
        outcome.message = "written by this batch's first attempt (its worker was lost after it finished); kept"
        return outcome
    outcome = ItemOutcome(item.name, Path(item.out), status="running")
    t0 = time.perf_counter()
    try:
        data = load_input(item.data, **item.read)
        roi = read_roi(item.roi) if isinstance(item.roi, (str, Path)) else item.roi
        result = yield from run_pipeline(data, item.config, roi=roi, cancel=cancel, members=members)
        if result.cancelled:
            outcome.status = "stopped"
            outcome.message = f"cancelled during {STAGE_NAMES.get(result.metadata['cancelled_in'], 'the run')}"
        else:
            result.metadata.update(item.metadata)
            if outcome.out.is_dir() and not any(outcome.out.iterdir()):
                outcome.out.rmdir()  # an empty folder is replaced; a non-empty one is refused by save_results
            save_results(result, outcome.out, overwrite=item.overwrite)
            outcome.status = "done"
            _describe(outcome, result)
    except JobCancelled as exc:
        outcome.status, outcome.message = "stopped", f"cancelled ({exc})"
    except Exception as exc:  # one item failing must not stop the others
        outcome.status, outcome.message = "failed", _why(exc)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_item(item: BatchItem, cancel: CancelToken | None = None) -> ItemOutcome:
    """Blocking :func:`run_item_job`: the function a batch runs per item (picklable inputs and output)."""
    return run_job(run_item_job(item, cancel))


# ---------------------------------------------------------------------------------------------- naming, folders
def item_names(inputs: Sequence[str | Path]) -> list[str]:
    """The item names of input paths (their file or folder name without its suffix); InputError naming the
    duplicates when two inputs would share a name (their bundles would share a folder)."""
    names = [Path(str(p).rstrip("/\\")).stem or str(p) for p in inputs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        which = "; ".join(f"{n}: " + ", ".join(str(p) for p, m in zip(inputs, names) if m == n) for n in twice)
        raise InputError(f"several inputs have the same name ({which}): their bundles would share a folder; "
                         "rename them or run them in separate batches")
    return names


def bundle_complete(path: str | Path) -> bool:
    """True when ``path`` is a results bundle that finished: its manifest is there, names no cancelled stage and
    every file it lists exists (bundles are moved into place whole, so this is what --resume trusts)."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("cancelled_in"):
        return False
    return all((path / name).exists() for name in manifest.get("files", {}))


#: Files a batch writes into its folder besides the bundles.
SUMMARY_FILES = ("summary.csv", "summary.html", "plate.png")


def check_batch_folder(folder: str | Path, items: Sequence[BatchItem], *, overwrite: bool = False,
                       resume: bool = False) -> list[bool]:
    """Refuse a batch folder that already holds files unless ``overwrite`` or ``resume`` (OutputError naming
    some of them); returns, per item, whether --resume keeps its complete bundle (so it is not run).

    resume: complete bundles are kept; an item folder that is an unfinished bundle (or empty) is replaced, and
    any other file in an item's folder is refused. overwrite: every item's bundle is (re)written; other files in
    the folder are left alone. Leftover temporary folders of an interrupted run are removed in both cases.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder: choose a folder for the batch")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    visible = [e for e in entries if not e.startswith(".")]
    if visible and not (overwrite or resume):
        shown = ", ".join(visible[:5]) + (f" and {len(visible) - 5} more" if len(visible) > 5 else "")
        raise OutputError(f"the batch folder {folder} already holds files ({shown}); nothing was overwritten. "
                              "Pass --overwrite to write every item again, --resume to keep the complete bundles "
                              "and run the rest, or choose another folder.")
    keep = []
    for item in items:
        out = Path(item.out)
        done = resume and bundle_complete(out)
        if resume and not done and out.exists():
            if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
                raise OutputError(f"{out} holds files that are not a results bundle; nothing was overwritten. "
                                      "Move them away, or pass --overwrite.")
            item.overwrite = True  # an unfinished bundle of an earlier run: written again
        if overwrite:
            item.overwrite = True
        keep.append(done)
    if overwrite or resume:
        for item in items:  # temporary folders of a run that was killed before it could move them into place
            for left in Path(item.out).parent.glob(f".{Path(item.out).name}.partial-*"):
                shutil.rmtree(left, ignore_errors=True)
    return keep


#: the key of ``BatchItem.metadata`` (and so of the bundle's metadata.json) naming the distributed batch run that
#: wrote it: a retried task that finds a complete bundle of its own run keeps it instead of failing on it
BATCH_RUN_KEY = "batch_run"


def _bundle_run_id(path: str | Path) -> str | None:
    try:
        value = json.loads((Path(path) / "metadata.json").read_text(encoding="utf-8")).get(BATCH_RUN_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def outcome_of_bundle(item: BatchItem) -> ItemOutcome:
    """The outcome of an item whose complete bundle an earlier run wrote (read back for the summary)."""
    from ..results import load_results

    outcome = ItemOutcome(item.name, Path(item.out), status="done", message="kept from an earlier run (--resume)")
    try:
        _describe(outcome, load_results(item.out))
    except Exception as exc:  # noqa: BLE001 - the summary only; the bundle stays as it is
        outcome.message = f"kept from an earlier run; not read back ({_why(exc)})"
    return outcome
