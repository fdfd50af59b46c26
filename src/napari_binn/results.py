"""Results bundles: one directory per run, readable by people (TIFF, PNG, HTML, JSON) and by napari-binn.

Layout (schema ``SCHEMA_VERSION``)::

    manifest.json        schema version, napari-binn version, what each file is
    config.toml          the PipelineConfig that produced it
    field.npz            density u (T, Ny, Nx; NaN = unobserved), mask, x_um, y_um, t_h (+ field.json: units, K, metadata)
    density.tif          the density as an ImageJ TIFF calibrated in µm (box size) and hours
    simulations.npz      every simulated / surrogate array, keyed by model name (+ sim_<name>.tif)
    binn/                network weights (safetensors) and their JSON description
    equations.json       discovered D(u), G(u): Pareto fronts (each row with its constants and units), selections
    equations.txt/.tex   the selected equations as plain text (with u's unit and, after a refit, the refitted constants
                         with their 95% intervals and units) and LaTeX
    mechanistic.json     refits: the model (expressions), parameters, 95% intervals, AIC/BIC
    metrics.json         the QC table (per-frame errors, N(t) errors)
    figures/*.png        D(u), G(u) with bands; N(t); observed / simulated / residual snapshots
    report.html          one page linking all of it

Writing goes to a temporary sibling directory that is moved into place at the end, so a failure or Ctrl-C
never leaves a half-written bundle. Loading reads only JSON, TOML, NumPy arrays without pickle, and safetensors:
nothing in a bundle is executed. Expressions are rebuilt by the restricted parser of
:mod:`napari_binn.symbolic.expression` (numbers, u, + - * / ** and a few named functions); anything else is refused.

Each result type writes and reads its own part (``Equations.to_dict``/``from_dict``, ``MechanisticFit``'s,
``BinnFit.save``/``load``, ``QCReport``'s); this module puts the parts in their files, so a loaded bundle is the
result that was saved, and saving it again writes the same bytes. Schema 1 bundles (front rows without their
constants, fits without ``n_evals``) are still read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import BundleError, ConfigError, OutputError
from .field import DensityField

__all__ = ["save_results", "load_results", "claim_output", "SCHEMA_VERSION", "BundleError"]

SCHEMA_VERSION = 2  # 2: every front row with its constants; mechanistic fits with n_evals and metadata
_FORMAT = "napari-binn results bundle"
#: metadata keys about the result in memory, not written to metadata.json ('bundle': where it was loaded from)
_NOT_WRITTEN = ("bundle",)


# ------------------------------------------------------------------------------------------------ helpers
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _clean_json(obj: Any) -> Any:
    """Replace non-finite floats by None so the JSON is standard (readable by any tool)."""
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _clean_json(obj.tolist())
    return obj


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_clean_json(data), indent=1, default=_json_default, allow_nan=False),
                    encoding="utf-8")


def _why(exc: BaseException) -> str:
    return f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "model"


# ------------------------------------------------------------------------------------------- claiming --out
#: output paths this process has claimed (claim_output), so that its own save_results does not refuse them
_CLAIMED: set[Path] = set()


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.napari-binn-lock"


def _lock_holder(lock: Path) -> tuple[str, int] | None:
    """(host, pid) written in ``lock``, or None when unreadable."""
    try:
        host, pid = lock.read_text(encoding="utf-8").split()[:2]
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _is_stale(lock: Path) -> bool:
    """A lock left by a process of this machine that no longer runs (killed before it could remove it)."""
    holder = _lock_holder(lock)
    if holder is None or holder[0] != socket.gethostname():
        return False
    try:
        os.kill(holder[1], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, not ours
        return False
    return False


@contextmanager
def claim_output(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``directory`` as this process's output while the block runs: one run at a time may write it.

    Refuses (OutputError) an existing ``directory`` unless ``overwrite``, and a directory another run holds: the
    claim is a lock file created atomically (O_CREAT | O_EXCL) beside it, so two processes writing the same
    ``--out`` cannot both go on. The command line claims ``--out`` before any work; :func:`save_results` claims
    the directory it writes unless this process holds it already. Folders made for the lock and left empty are
    removed again, so a run that fails leaves nothing behind.
    """
    target = Path(directory).absolute()
    if target in _CLAIMED:
        yield target
        return
    made = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder for {target} ({exc.strerror}): choose another output",
                          file=target) from None
    lock = _lock_path(target)
    try:
        fd = _create_lock(lock, target)
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        if target.exists() and not overwrite:
            lock.unlink(missing_ok=True)
            raise OutputError(f"{target} exists: choose another output folder or pass overwrite=True "
                              "(--overwrite on the command line)", file=target)
        _CLAIMED.add(target)
        try:
            yield target
        finally:
            _CLAIMED.discard(target)
            lock.unlink(missing_ok=True)
    finally:
        for p in made:  # innermost first
            try:
                p.rmdir()
            except OSError:
                break


def _create_lock(lock: Path, target: Path) -> int:
    for attempt in (0, 1):
        try:
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if attempt == 0 and _is_stale(lock):
                lock.unlink(missing_ok=True)
                continue
            holder = _lock_holder(lock)
            who = f" (process {holder[1]} on {holder[0]})" if holder else ""
            raise OutputError(f"another napari-binn run is writing {target}{who}: wait for it, or choose another "
                              f"output folder (if no run is writing it, delete {lock})", file=target) from None
        except OSError as exc:
            raise OutputError(f"cannot write in {target.parent} ({exc.strerror}): choose another output folder",
                              file=target) from None
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------------------------- saving
def save_results(result, directory: str | os.PathLike, *, overwrite: bool = False, figures: bool = True) -> Path:
    """Write a PipelineResult (or a BinnFit alone) as a results bundle directory; returns its path.

    Refuses an existing ``directory`` unless ``overwrite``; the bundle is written to a temporary directory
    beside it and moved into place only when complete.
    """
    from .binn import BinnFit
    from .pipeline import PipelineConfig, PipelineResult

    if isinstance(result, BinnFit):
        result = PipelineResult(PipelineConfig(binn=result.config), fit=result)
    if not isinstance(result, PipelineResult):
        raise TypeError(f"save_results needs a PipelineResult or a BinnFit; got {type(result).__name__}")
    target = Path(directory)
    with claim_output(target, overwrite=overwrite):
        if target.exists() and not overwrite:
            raise OutputError(f"{target} exists: choose another directory or pass overwrite=True "
                              "(--overwrite on the command line)", file=target)
        _write_atomically(result, target, figures)
    return target


def _write_atomically(result, target: Path, figures: bool) -> None:
    """The bundle, written to a temporary sibling directory and moved into place when complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        files = _write_bundle(result, tmp, figures)
        cancelled_in = result.metadata.get("cancelled_in")
        _write_json(tmp / "manifest.json", {
            "format": _FORMAT, "schema_version": SCHEMA_VERSION, "napari_binn_version": __version__,
            "files": files, "cancelled_in": cancelled_in, "partial": bool(cancelled_in),
        })
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(backup)
            tmp.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_bundle(result, out: Path, figures: bool) -> dict[str, str]:
    from .io import write_stack_tiff
    from .symbolic.expression import equation_text

    files: dict[str, str] = {}
    result.config.to_toml(out / "config.toml")
    files["config.toml"] = "the PipelineConfig of this run (TOML)"
    fld: DensityField | None = result.field
    if fld is not None:
        np.savez_compressed(out / "field.npz", u=fld.u, mask=fld.mask, x_um=fld.x_um, y_um=fld.y_um, t_h=fld.t_h)
        _write_json(out / "field.json", {"units": fld.units, "K": fld.K, "dx_um": fld.dx_um,
                                         "origin_um": fld.origin_um, "metadata": fld.metadata})
        write_stack_tiff(out / "density.tif", np.nan_to_num(fld.u, nan=0.0).astype(np.float32), fld.dx_um, fld.t_h)
        files["field.npz"] = f"density u (T, Ny, Nx) in {fld.units}, NaN = unobserved; mask; box centres (µm); times (h)"
        files["density.tif"] = f"the density as an ImageJ stack, {fld.dx_um:g} µm boxes (NaN written as 0)"
    if result.simulations:
        keys = {_safe_name(k): k for k in result.simulations}
        np.savez_compressed(out / "simulations.npz", **{s: result.simulations[k] for s, k in keys.items()})
        _write_json(out / "simulations.json", {"names": keys})
        files["simulations.npz"] = "simulated / surrogate densities keyed by model (names in simulations.json)"
        if fld is not None:
            for s, k in keys.items():
                write_stack_tiff(out / f"sim_{s}.tif", np.nan_to_num(result.simulations[k], nan=0.0).astype(np.float32),
                                 fld.dx_um, fld.t_h)
                files[f"sim_{s}.tif"] = f"'{k}' as an ImageJ stack"
    if result.fit is not None:
        result.fit.save(out / "binn")
        files["binn/"] = "BINN network weights (safetensors) and description (JSON)"
    if result.equations is not None:
        eq = result.equations
        _write_json(out / "equations.json", eq.to_dict())
        from .pipeline import refit_text

        text = [equation_text(k, f) for k, f in (("D", eq.D), ("G", eq.G)) if f is not None]
        if result.field is not None:
            text.append(f"u: density in {result.field.units}")
        refit = refit_text(result)
        text += [""] + refit if refit else []
        (out / "equations.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
        tex = [f"{k}(u) = {f.latex}" for k, f in (("D", eq.D), ("G", eq.G)) if f is not None]
        (out / "equations.tex").write_text("\n".join(tex) + "\n", encoding="utf-8")
        files["equations.json"] = "discovered closed forms, Pareto fronts, constants with units"
        files["equations.txt"] = "the selected equations, plain text (and refitted, with intervals and units)"
        files["equations.tex"] = "the selected equations, LaTeX"
    if result.mechanistic:
        _write_json(out / "mechanistic.json", {name: f.to_dict() for name, f in result.mechanistic.items()})
        files["mechanistic.json"] = "mechanistic refits: estimates, 95% intervals, AIC/BIC"
    metrics: dict[str, Any] = {"seconds": result.metadata.get("seconds", {}),
                               "warnings": result.metadata.get("warnings", []),
                               "cancelled_in": result.metadata.get("cancelled_in")}
    if result.qc is not None:
        metrics["qc"] = result.qc.to_dict()
        (out / "qc.txt").write_text(result.qc.table() + "\n", encoding="utf-8")
        files["qc.txt"] = "the QC table, plain text"
    _write_json(out / "metrics.json", metrics)
    files["metrics.json"] = "QC metrics, stage timings, warnings"
    _write_json(out / "metadata.json", {k: v for k, v in result.metadata.items() if k not in _NOT_WRITTEN})
    files["metadata.json"] = "run metadata"
    if figures:
        from .report import write_figures, write_report

        for name, desc in write_figures(result, out / "figures").items():
            files[f"figures/{name}"] = desc
        write_report(result, out, files)
        files["report.html"] = "one-page report linking everything"
    return files


# ------------------------------------------------------------------------------------------------ loading
def _equations_schema1(d: dict[str, Any]) -> dict[str, Any]:
    """equations.json of schema 1 in the layout of ``Equations.to_dict``: its front rows had text only, and the
    selected row's constants were kept at the function level."""
    out: dict[str, Any] = {"backend": d.get("backend", ""), "metadata": d.get("metadata", {})}
    for key in ("D", "G"):
        f = d.get(key)
        if f is None:
            continue
        selected = int(f.get("selected", 0))
        rows = [{"complexity": r["complexity"], "loss": r.get("loss"), "score": r.get("score", 0.0),
                 "expression": {"name": key, "text": r["text"], "units": f.get("units", ""), "u_range": f["u_range"],
                                "loss": r.get("loss"), "complexity": r["complexity"],
                                "constants": f.get("constants", []) if i == selected else []}}
                for i, r in enumerate(f.get("front", []))]
        out[key] = {"name": key, "units": f.get("units", ""), "u_units": f.get("u_units", "u"),
                    "u_range": f["u_range"], "backend": d.get("backend", ""), "selection": f.get("selection", "best"),
                    "selected": selected, "notes": f.get("notes", []), "front": rows}
    return out


def _read_json(path: Path, kind: type = dict) -> Any:
    """The JSON in ``path``, which must be a ``kind`` (a dict: an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})", file=path) from None
    if not isinstance(data, kind):
        raise BundleError(f"{path} must hold a JSON {'object' if kind is dict else kind.__name__}, not "
                          f"{type(data).__name__}", file=path)
    return data


def _malformed() -> tuple[type[BaseException], ...]:
    """What reading a malformed part raises (a missing key, a wrong type, a corrupt archive or tensor file)."""
    import zipfile

    kinds: list[type[BaseException]] = [KeyError, TypeError, ValueError, AttributeError, IndexError, OSError,
                                        RuntimeError, EOFError, zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError
        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(kinds)


class _Part:
    """``with _Part(path, key):`` turns a failure while reading one part of a bundle into a BundleError naming
    the file (and the entry); BundleErrors and ConfigErrors (config.toml) pass through as they are."""

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path, self.key = path, key

    def __enter__(self) -> _Part:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, BundleError) or not isinstance(exc, _malformed()):
            return False
        if isinstance(exc, ConfigError) and self.path.name == "config.toml":
            return False  # it names config.toml and the key already
        where = f"{self.path}" + (f", {self.key}" if self.key else "")
        raise BundleError(f"{where}: {_why(exc)}: the file is damaged or was not written by napari-binn",
                          file=self.path, key=self.key) from None


def load_results(directory: str | os.PathLike):
    """Read a results bundle into the PipelineResult it was written from: the same types as a fresh run
    (Equations with their fronts and selections, MechanisticFit with intervals and a working model, BinnFit,
    QCReport), so a loaded result can be refitted, simulated and saved again (save -> load -> save writes the same
    files). ``metadata['bundle']`` says where it came from (not written back).

    Works for this schema version and older ones it knows; refuses newer schemas and non-bundles with a
    message that says why. Reads no pickle and executes nothing from the bundle. Any damaged file raises
    :class:`~napari_binn.errors.BundleError` naming the file (and the entry).
    """
    d = Path(directory)
    version, manifest = _read_manifest(d)
    with _Part(d / "config.toml"):
        result = _load_parts(d, version)
    result.metadata["bundle"] = {"schema_version": version, "written_by": manifest.get("napari_binn_version"),
                                 "partial": bool(manifest.get("partial", False))}
    return result


def _read_manifest(d: Path) -> tuple[int, dict]:
    manifest_path = d / "manifest.json"
    if not d.is_dir():
        raise BundleError(f"{d} is not a directory: a results bundle is a directory with a manifest.json", file=d)
    if not manifest_path.is_file():
        raise BundleError(f"{d} has no manifest.json: it is not a napari-binn results bundle", file=manifest_path)
    manifest = _read_json(manifest_path)
    if manifest.get("format") != _FORMAT:
        raise BundleError(f"{manifest_path} is not a napari-binn results bundle (format {manifest.get('format')!r})",
                          file=manifest_path, key="format")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{manifest_path}: unknown bundle schema version {version!r} (schema_version must be a "
                          f"whole number from 1 to {SCHEMA_VERSION})", file=manifest_path, key="schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{d} was written with bundle schema_version {version} by napari-binn "
                          f"{manifest.get('napari_binn_version')}; this napari-binn ({__version__}) reads schema "
                          f"<= {SCHEMA_VERSION}: upgrade napari-binn to open it", file=manifest_path,
                          key="schema_version")
    return version, manifest


def _load_parts(d: Path, version: int):
    from .binn import BinnFit
    from .pde.mechanistic import MechanisticFit
    from .pipeline import PipelineConfig, PipelineResult
    from .qc import QCReport
    from .symbolic import Equations

    config = PipelineConfig.from_toml(d / "config.toml") if (d / "config.toml").is_file() else PipelineConfig()
    result = PipelineResult(config)
    if (d / "field.npz").is_file():
        with _Part(d / "field.npz"):
            with np.load(d / "field.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("u", "mask", "x_um", "y_um", "t_h")}
        info = _read_json(d / "field.json") if (d / "field.json").is_file() else {}
        with _Part(d / "field.json"):
            result.field = DensityField(arrays["u"], arrays["mask"], arrays["x_um"], arrays["y_um"], arrays["t_h"],
                                        info.get("units", "cells/mm²"), info.get("K"), info.get("metadata", {}))
    if (d / "simulations.npz").is_file():
        if not (d / "simulations.json").is_file():
            raise BundleError(f"{d} has simulations.npz without simulations.json (the models' names)",
                              file=d / "simulations.json")
        names = _read_json(d / "simulations.json")
        with _Part(d / "simulations.json", "names"):
            names = dict(names["names"])
        with _Part(d / "simulations.npz"):
            with np.load(d / "simulations.npz", allow_pickle=False) as z:
                result.simulations = {names.get(k, k): z[k] for k in z.files}
    if (d / "binn").is_dir():
        with _Part(d / "binn" / "binn_fit.json"):
            result.fit = BinnFit.load(d / "binn")
    path = d / "equations.json"
    if path.is_file():
        eq = _read_json(path)
        for key in ("D", "G"):
            if eq.get(key) is not None and not isinstance(eq[key], dict):
                raise BundleError(f"{path}: {key} must be an object (a closed form with its Pareto front), not "
                                  f"{type(eq[key]).__name__} {eq[key]!r}", file=path, key=key)
        with _Part(path):
            result.equations = Equations.from_dict(_equations_schema1(eq) if version == 1 else eq)
    path = d / "mechanistic.json"
    if path.is_file():
        if result.field is None:
            raise BundleError(f"{path}: mechanistic fits need the density they were fitted to (field.npz is missing)",
                              file=d / "field.npz")
        for name, fit in _read_json(path).items():
            with _Part(path, f"fit {name!r}"):
                if not isinstance(fit, dict):
                    raise TypeError(f"a fit must be an object, not {type(fit).__name__}")
                result.mechanistic[name] = MechanisticFit.from_dict(fit, result.field, result.simulations.get(name))
    if (d / "metrics.json").is_file():
        metrics = _read_json(d / "metrics.json")
        if "qc" in metrics:
            with _Part(d / "metrics.json", "qc"):
                result.qc = QCReport.from_dict(metrics["qc"])
    if (d / "metadata.json").is_file():
        result.metadata = _read_json(d / "metadata.json")
    return result
