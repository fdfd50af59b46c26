"""The ``napari-binn`` command line: the demo, each stage on your own files, and batches.

Units everywhere: lengths in µm, times in hours, D(u) in µm²/h, G(u) in 1/h, densities in cells/mm²
(counting methods), a fraction (confluence) or u/K (normalised).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import BackendUnavailableError, InputError, NapariBinnError, OutputError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

_EPILOG = """units: lengths in µm, times in hours, D(u) in µm²/h, G(u) in 1/h; density in cells/mm² (nuclei,
labels, points), fraction (confluence) or u/K (normalised). Exit codes: 0 done, 1 unexpected error (a bug:
please report it), 2 bad input or usage (the message says what to fix; --debug shows the traceback),
130 interrupted (Ctrl-C: the best model so far is saved as a partial bundle)."""


# ------------------------------------------------------------------------------------------------ progress
class _ProgressPrinter:
    """One updating line per stage on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.stage = None
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, ev) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        new_stage = ev.stage != self.stage
        if new_stage and self.stage is not None and self.tty:
            sys.stderr.write("\n")
        self.stage = ev.stage
        if not new_stage and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        frac = ev.fraction
        bar = ""
        if frac is not None:
            n = int(round(24 * frac))
            bar = f"[{'#' * n}{'.' * (24 - n)}] {100 * frac:5.1f}% "
        eta = f" ETA {ev.eta_s:.0f} s" if ev.eta_s is not None and frac is not None and frac < 1 else ""
        line = f"{ev.stage:<9} {bar}{ev.message[:90]}{eta}"
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if not self.quiet and self.tty and self.stage is not None:
            sys.stderr.write("\n")


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


# ---------------------------------------------------------------------------------------------- commands
def _config(args):
    from .pipeline import PipelineConfig

    cfg = PipelineConfig.from_toml(args.config) if getattr(args, "config", None) else PipelineConfig()
    return _with_options(args, cfg)


def _with_options(args, cfg):
    """``cfg`` with the BINN options of the command line (--device, --seed, and --steps, which keeps the warm-up's
    share of the steps: BinnConfig.with_steps)."""
    changes = {}
    if getattr(args, "device", None):
        changes["device"] = args.device
    if getattr(args, "seed", None) is not None:
        changes["seed"] = args.seed
    if changes:
        cfg.binn = cfg.binn.replace(**changes)
    if getattr(args, "steps", None):
        cfg.binn = cfg.binn.with_steps(args.steps)
    return cfg


def _drive(args, make_job, on_event=None, interrupted: str = "keeping the best result so far"):
    """Run ``make_job(token)`` (a job generator) with a progress printer; returns (its result, whether it was
    cancelled). The first Ctrl-C cancels cooperatively, a second one aborts. ``on_event`` also sees every event."""
    import signal

    from .jobs import CancelToken, run_job

    token = CancelToken()
    printer = _ProgressPrinter(args.quiet)

    def on_sigint(signum, frame):
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        sys.stderr.write(f"\ninterrupted: finishing the current step and {interrupted} (Ctrl-C again to abort "
                         "without saving)\n")

    def callback(ev) -> None:
        if on_event is not None:
            on_event(ev, printer)
        printer(ev)

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: no signal handling
        previous = None
    try:
        result = run_job(make_job(token), callback)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        printer.done()
    return result, token.cancelled


def _run(args, data, cfg, stages, roi=None):
    """Run the pipeline with a progress printer; on Ctrl-C the running stage returns its best partial result,
    which is then saved."""
    from .pipeline import run_pipeline

    result, cancelled = _drive(args, lambda token: run_pipeline(data, cfg, roi=roi, stages=stages, cancel=token))
    if cancelled:
        result.metadata["cancelled_in"] = result.metadata.get("cancelled_in") or "interrupted"
    return result


def _save(args, result) -> None:
    from .results import save_results

    out = save_results(result, args.out, overwrite=args.overwrite)
    _say(args, f"results bundle: {out}  (open {out / 'report.html'} in a browser, or the folder in napari)")


def _read_options(args) -> dict[str, Any]:
    return {"pixel_size_um": args.pixel_size_um, "frame_interval_h": args.frame_interval_h, "channel": args.channel}


def _load_input(args, path: str):
    """A stack (TIFF, folder, glob) or a results bundle directory (napari_binn.batch.load_input)."""
    from .batch import load_input

    return load_input(path, **_read_options(args))


def _roi(args) -> Any:
    from .roi import read_roi

    return read_roi(args.roi) if args.roi else None


def _stages_from(start: str) -> tuple[str, ...]:
    from .pipeline import STAGES

    return STAGES[STAGES.index(start):]


def cmd_demo(args) -> int:
    from .pipeline import PipelineConfig
    from .synthetic.sample import SAMPLE_PARAMS, spreading_sample

    t0 = time.perf_counter()
    cfg = PipelineConfig.from_toml(args.config) if args.config else demo_config()
    _say(args, "napari-binn demo: a scratch closing under a known equation, rendered as nuclei images")
    _say(args, "  truth: u_t = D Δu + r u (1 - u/K), D = {D:g} µm²/h, r = {r:g} /h, K = {K:g} cells/mm²".format(**SAMPLE_PARAMS))
    sample = spreading_sample(seed=args.seed or 0)
    stack = sample.rendered.stack
    _say(args, f"  images: {stack}")
    cfg = _with_options(args, cfg)
    result = _run(args, stack, cfg, _stages_from("density"), roi=sample.rendered.pixel_mask)
    fld = result.field
    drawn = _drawn_density(sample.rendered, fld) if fld is not None else None
    if drawn is not None:
        ok = fld.observed & np.isfinite(drawn)
        err = np.linalg.norm(fld.u[ok] - drawn[ok]) / np.linalg.norm(drawn[ok])
        _say(args, f"\ndensity extraction: relative L2 error against the cells drawn = {100 * err:.1f}%")
    _print_equations(args, result)
    if result.fit is not None:
        _say(args, "\ncompared with the truth:")
        for line in demo_comparison(result, sample.truth):
            _say(args, line)
    _print_qc(args, result)
    _save(args, result)
    _say(args, f"demo finished in {time.perf_counter() - t0:.0f} s")
    return EXIT_CANCELLED if result.cancelled else EXIT_OK


def _drawn_density(rendered, fld):
    """The cells drawn per box of ``fld``'s grid (cells/mm²), when its boxes are whole blocks of the sample's
    50 µm boxes starting at the image corner; else None (no comparison is printed)."""
    counts = rendered.counts
    T, ny, nx = counts.shape
    k = int(round(fld.dx_um / (rendered.box_area_mm2 ** 0.5 * 1000.0)))
    if k < 1 or fld.shape != (T, ny // k, nx // k) or ny % k or nx % k:
        return None
    summed = counts.reshape(T, ny // k, k, nx // k, k).sum(axis=(2, 4))
    inside = rendered.mask.reshape(ny // k, k, nx // k, k).all(axis=(1, 3))
    return np.where(inside[None], summed / (k * k * rendered.box_area_mm2), np.nan)


def demo_config():
    """The demo's settings: the defaults except 100 µm boxes (about 20 cells per box at confluence rather than 5,
    so counting noise is ~22% rather than ~45% per box) and a BINN schedule suited to such noisy counts: a short
    data-only warm-up and a joint fit with the PDE term at full weight (a long warm-up lets the surrogate learn
    the counting noise, and D fitted to a noisy surrogate collapses towards zero)."""
    from .pipeline import PipelineConfig

    cfg = PipelineConfig()
    cfg.density.box_um = 100.0
    cfg.binn = cfg.binn.replace(warmup_steps=1000, steps=8000, pde_weight=1.0)
    return cfg


def _print_equations(args, result) -> None:
    from .symbolic.expression import equation_text

    eq = result.equations
    if eq is None:
        return
    how = {"bic": "forms chosen by BIC among the Pareto candidates, shown with the symbolic fit's constants",
           "held-out": "forms chosen by held-out frames among the Pareto candidates and library forms, shown with "
                       "the symbolic fit's constants"}.get(getattr(eq.D, "selection", ""), "selected forms")
    _say(args, f"\ndiscovered equations (symbolic regression of the learned D(u), G(u); {how}):")
    for key in ("D", "G"):
        f = getattr(eq, key, None)
        if f is not None:
            _say(args, f"  {equation_text(key, f)}")
    from .pipeline import alternatives_text, delay_text, determined_text, refine_text, refit_text

    t_h = result.field.t_h if result.field is not None else None
    for line in (alternatives_text(eq) + determined_text(result.fit)
                 + delay_text(result.fit, t_h, metadata=result.metadata) + refine_text(result.fit)):
        _say(args, f"  {line}")
    for line in refit_text(result):
        _say(args, line)


def _print_qc(args, result) -> None:
    """The QC table, then the run's warnings (e.g. a closed form that could not be simulated: its row is missing)."""
    if result.qc is not None:
        _say(args, "\n" + result.qc.table())
    for warning in result.metadata.get("warnings", []):
        _say(args, f"note: {warning}")


def demo_comparison(result, truth) -> list[str]:
    """Lines comparing the discovered (refitted when available) closed forms with the known truth: the form
    (same structure once constants are blanked) and the relative L2 error over the observed density range."""
    import sympy as sp

    eq = result.equations
    if eq is None or eq.D is None or eq.G is None:
        return ["no closed forms were discovered"]
    K = truth.params["K"]
    u_sym = sp.Symbol("u", positive=True)
    truth_forms = {"D": sp.Float(truth.params.get("D", 1.0)) + 0 * u_sym,
                   "G": sp.Float(truth.params["r"]) - sp.Float(truth.params["r"] / K) * u_sym}
    mech = result.mechanistic.get("closed form (refitted)")
    if mech is not None:
        eq = eq.with_params(mech)
    lo, hi = result.fit.density_range()
    u = np.linspace(lo, hi, 200)
    lines, found_exprs, same_forms = [], {}, {}
    for key in ("D", "G"):
        expr = (eq.D if key == "D" else eq.G).sympy
        expr = expr.subs({s: u_sym for s in expr.free_symbols if s.name == "u"})
        f = sp.lambdify([u_sym], expr, "numpy")
        t = sp.lambdify([u_sym], truth_forms[key], "numpy")
        est = np.broadcast_to(np.asarray(f(u), float), u.shape)
        ref = np.broadcast_to(np.asarray(t(u), float), u.shape)
        err = float(np.linalg.norm(est - ref) / np.linalg.norm(ref))
        same = _blank(expr) == _blank(truth_forms[key])
        found_exprs[key], same_forms[key] = expr, same
        lines.append(f"  {key}(u): found {sp.sstr(sp.N(expr, 4))}   truth {sp.sstr(sp.N(truth_forms[key], 4))}   "
                     f"form {'SAME' if same else 'DIFFERENT'}, rel. L2 error {100 * err:.1f}% on "
                     f"u in [{lo:.0f}, {hi:.0f}]")
    own = {"D": result.fit.D(u), "G": result.fit.G(u)}  # the BINN's own curves, before any closed form
    truth_at = {k: np.broadcast_to(np.asarray(sp.lambdify([u_sym], truth_forms[k], "numpy")(u), float), u.shape)
                for k in ("D", "G")}
    own_err = {k: 100 * float(np.linalg.norm(own[k] - truth_at[k]) / np.linalg.norm(truth_at[k])) for k in own}
    lines.insert(0, f"  BINN's own curves (before any closed form): D(u) rel. L2 error {own_err['D']:.1f}%, "
                    f"G(u) {own_err['G']:.1f}% on u in [{lo:.0f}, {hi:.0f}]")
    if all(same_forms.values()):
        # same forms: D is a constant and G = r (1 - u/K); read the constants off the found expressions
        G = sp.Poly(sp.expand(found_exprs["G"]), u_sym).all_coeffs()  # [-r/K, r]
        est = {"D": float(found_exprs["D"]), "r": float(G[1]), "K": float(-G[1] / G[0])}
        parts = [f"{name} = {est[name]:.4g} (truth {truth.params[name]:g}, "
                 f"{100 * (est[name] / truth.params[name] - 1):+.1f}%)" for name in ("D", "r", "K")]
        lines.append("  constants: " + ", ".join(parts))
    return lines


def _blank(expr):
    """The expression's structure with every number replaced by one symbol (signs folded in)."""
    import sympy as sp

    c = sp.Symbol("c")
    expr = sp.expand(expr)
    return sp.srepr(expr.replace(lambda e: e.is_Number, lambda e: c))


def _print_stack(args, data) -> None:
    """The stack as read and where its calibration came from (D is in µm²/h only if these are right)."""
    from .io import Stack, calibration_sources

    if not isinstance(data, Stack):
        return
    _say(args, f"stack: {data!r}")
    for line in calibration_sources(data.metadata):
        _say(args, f"  {line}")


def _print_density(args, result) -> None:
    """The density field and how its cells were counted."""
    from .density import counting_text

    if result.field is None:
        return
    _say(args, repr(result.field))
    counted = counting_text(result.field.metadata)
    if counted:
        _say(args, counted)


def cmd_extract(args) -> int:
    data = _load_input(args, args.input)
    _print_stack(args, data)
    roi = _roi(args)
    result = _run(args, data, _config(args), ("density",), roi=roi)
    _print_density(args, result)
    _print_qc(args, result)  # no QC table yet: the density stage's warnings
    _save(args, result)
    return EXIT_CANCELLED if result.cancelled else EXIT_OK


def cmd_fit(args) -> int:
    from .pipeline import PipelineResult, determined_text, refine_text

    data = _load_input(args, args.input)
    _print_stack(args, data)
    roi = _roi(args)
    stages = ("binn",) if isinstance(data, PipelineResult) else ("density", "binn")
    result = _run(args, data, _config(args), stages, roi=roi)
    if "density" in stages:
        _print_density(args, result)
    _say(args, repr(result.fit))
    for line in determined_text(result.fit) + refine_text(result.fit)[:1]:
        _say(args, f"  {line}")
    _print_qc(args, result)  # no QC table yet: the density and training stages' warnings
    _save(args, result)
    return EXIT_CANCELLED if result.cancelled else EXIT_OK


def cmd_discover(args) -> int:
    data = _load_input(args, args.input)
    cfg = data.config if args.config is None else _config(args)
    if args.backend:
        cfg.symbolic.backend = args.backend
    result = _run(args, data, cfg, ("symbolic",))
    _print_equations(args, result)
    _save(args, result)
    return EXIT_CANCELLED if result.cancelled else EXIT_OK


def cmd_simulate(args) -> int:
    data = _load_input(args, args.input)
    cfg = data.config if args.config is None else _config(args)
    result = _run(args, data, cfg, ("simulate", "refit", "qc"))
    _print_qc(args, result)
    _save(args, result)
    return EXIT_CANCELLED if result.cancelled else EXIT_OK


def cmd_report(args) -> int:
    from .results import load_results

    folder = Path(args.input)
    if folder.is_dir() and (folder / "summary.csv").is_file() and not (folder / "manifest.json").exists():
        return _report_batch(args, folder)
    result = load_results(args.input)
    _print_equations(args, result)
    _print_qc(args, result)
    if args.out:
        _save(args, result)
    return EXIT_OK


def _batch_where(args, n_to_run: int) -> tuple[Any, int | None]:
    """(cluster, workers) of ``run_batch`` from --scheduler / DASK_SCHEDULER_ADDRESS and --workers: an address;
    'local' with N worker processes (default: the cores, at most one per input to run); None (here, one input after
    another) for one worker, or by default when dask.distributed is not installed."""
    import os

    scheduler = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if scheduler:
        if args.workers:
            _say(args, "note: --workers is ignored with a scheduler address (that cluster has its own workers)")
        _need_distributed(f"--scheduler {scheduler}")
        return scheduler, None
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1 (got {args.workers})")
    workers = args.workers or min(os.cpu_count() or 1, max(n_to_run, 1))
    if workers <= 1:
        return None, None
    if args.workers is None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            _say(args, "note: running the inputs one after another; install napari-binn[distributed] to run them "
                       "on every core")
            return None, None
    _need_distributed(f"--workers {workers}")
    return "local", workers


def _need_distributed(what: str) -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(f"{what} needs dask.distributed, which is not installed: pip install "
                         "'napari-binn[distributed]' (or run with --workers 1)") from None


def _report_batch(args, folder: Path) -> int:
    """A batch folder: its summary as a table, and summary.html (with the plate heat map) rendered."""
    from .batch.summary import read_summary, write_summary_html

    _, rows = read_summary(folder)
    for r in rows:
        what = (f"D(u) = {r['D']}; G(u) = {r['G']}; N(t) error {r['nt_error_pct'] or '-'} %" if r["status"] == "done"
                else f"{r['status']}: {r['error']}")
        _say(args, f"{r['name']:<24} {r['well'] or '':<4} {what}")
    page = write_summary_html(folder)
    _say(args, f"batch report: {page}")
    return EXIT_OK


def batch_items(args, cfg, roi) -> list:
    """The batch's items: one per input, or with --each-shape one per input and shape of --roi (named
    ``<input>_roi<n>``, n = the shape's number in the file)."""
    from .batch import BatchItem, item_names

    out = Path(args.out)
    names = item_names(args.inputs)
    if not getattr(args, "each_shape", False):
        return [BatchItem(name, path, cfg, out / name, roi=roi, read=_read_options(args), overwrite=args.overwrite)
                for name, path in zip(names, args.inputs)]
    if not isinstance(roi, list) or not roi:
        raise InputError("--each-shape needs --roi with shapes: a JSON file of polygons or a napari Shapes CSV "
                         "(a mask image is one region)")
    return [BatchItem(f"{name}_roi{k + 1}", path, cfg, out / f"{name}_roi{k + 1}", roi=[shape],
                      read=_read_options(args), overwrite=args.overwrite,
                      metadata={"roi_shape": {"number": k + 1, "polygons_px": np.asarray(shape).tolist()}})
            for name, path in zip(names, args.inputs) for k, shape in enumerate(roi)]


def cmd_batch(args) -> int:
    """The whole pipeline on each input, one bundle each (``<out>/<input name>``), by the core's batch engine (here
    or on a dask cluster), then ``<out>/summary.csv``: a failing input is reported and the others run; Ctrl-C
    stops the running inputs without writing them (bundles already written stay)."""
    from .batch import check_batch_folder, run_batch
    from .batch.summary import write_summary

    out = Path(args.out)  # an existing folder is checked here (check_batch_folder), not in main()
    items = batch_items(args, _config(args), _roi(args))
    keep = check_batch_folder(out, items, overwrite=args.overwrite, resume=args.resume)
    cluster, workers = _batch_where(args, len(items) - sum(keep))
    if sum(keep):
        _say(args, f"--resume: {sum(keep)} of {len(items)} bundles are complete and kept")
    if cluster is not None:
        where = f"a local dask cluster of {workers} workers" if cluster == "local" else f"the dask cluster at {cluster}"
        _say(args, f"running on {where}")
    running = cluster is not None

    def on_event(ev, printer) -> None:
        outcome = ev.data.get("outcome") if ev.stage == "batch" else None
        if outcome is None:
            return
        printer.done()
        if outcome.status == "running":
            if not running:
                _say(args, f"=== {outcome.name} ({ev.data['item'] + 1} of {ev.data['n_items']})")
        elif outcome.status == "done":
            head = f"=== {outcome.name}: " + (outcome.message or "done") + "\n" if running or outcome.message else ""
            _say(args, head + f"  D(u) = {outcome.D}   [{outcome.D_units}]\n  G(u) = {outcome.G}   "
                       f"[{outcome.G_units}]" + (" (constants refitted to the data)" if outcome.refitted else "")
                       + f"\n  results bundle: {outcome.out}")
        elif outcome.status == "failed":
            print(f"napari-binn batch: {outcome.name}: {outcome.message}", file=sys.stderr)

    outcomes, cancelled = _drive(args, lambda token: run_batch(items, cancel=token, cluster=cluster, workers=workers,
                                                               resume=args.resume), on_event,
                                 interrupted="writing nothing for the inputs still running")
    summary_files = write_summary(out, outcomes)
    done = [o for o in outcomes if o.written]
    failed = [o for o in outcomes if o.status == "failed"]
    left = [o for o in outcomes if o.status in ("stopped", "not run")]
    summary = f"batch: {len(done)} of {len(outcomes)} written to {out}"
    if failed:
        summary += f"; failed: {', '.join(o.name for o in failed)}"
    if left:
        summary += f"; not finished (interrupted): {', '.join(o.name for o in left)}"
    _say(args, summary + f"\nsummary: {', '.join(str(f) for f in summary_files)}  (napari-binn report {out} "
               "renders summary.html)")
    if cancelled or left:
        return EXIT_CANCELLED
    return EXIT_ERROR if failed else EXIT_OK


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-binn", description=__doc__.split("\n\n")[0], epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"napari-binn {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, out_default=None, stack=True):
        sp.add_argument("--config", help="a PipelineConfig TOML file (see docs/configuration.md)")
        sp.add_argument("--out", default=out_default, required=out_default is None,
                        help="results bundle directory to write" + (f" (default {out_default})" if out_default else ""))
        sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        sp.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to train the BINN")
        sp.add_argument("--seed", type=int, help="random seed (same seed, same device: same result)")
        sp.add_argument("--steps", type=int, help="BINN training steps (overrides the config; the data-only warm-up "
                                                  "keeps its share of the steps)")
        sp.add_argument("--quiet", action="store_true", help="no progress output")
        _debug_option(sp)
        if stack:
            sp.add_argument("--roi", help="ROI: mask image (.tif/.png), polygons (.json, pixel row/col) or "
                                          "vertices (.csv, napari Shapes export: rectangles, polygons, ellipses)")
            sp.add_argument("--pixel-size-um", type=float, help="pixel size in µm (if the file does not say)")
            sp.add_argument("--frame-interval-h", type=float, help="time between frames in hours (if the file does not say)")
            sp.add_argument("--channel", type=int, help="channel index for multichannel / RGB stacks")

    sp = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic sample with a known equation",
                        epilog=_EPILOG)
    common(sp, out_default="napari-binn-demo", stack=False)
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("extract", help="images -> density field (bundle)", epilog=_EPILOG)
    sp.add_argument("input", help="a TIFF / OME-TIFF stack, a folder of frames, or a glob")
    common(sp)
    sp.set_defaults(func=cmd_extract)
    sp = sub.add_parser("fit", help="train the BINN on a stack or on a bundle's density", epilog=_EPILOG)
    sp.add_argument("input", help="a stack, or a results bundle from 'extract'")
    common(sp)
    sp.set_defaults(func=cmd_fit)
    sp = sub.add_parser("discover", help="symbolic regression of a bundle's learned D(u), G(u)", epilog=_EPILOG)
    sp.add_argument("input", help="a results bundle with a trained BINN")
    sp.add_argument("--backend", choices=["operon", "library", "pysr"], help="symbolic regression backend")
    common(sp, stack=False)
    sp.set_defaults(func=cmd_discover, pixel_size_um=None, frame_interval_h=None, channel=None)
    sp = sub.add_parser("simulate", help="simulate a bundle's equations, refit, and QC", epilog=_EPILOG)
    sp.add_argument("input", help="a results bundle with equations (and/or a BINN)")
    common(sp, stack=False)
    sp.set_defaults(func=cmd_simulate, pixel_size_um=None, frame_interval_h=None, channel=None)
    sp = sub.add_parser("report", help="print a bundle's equations and QC table (and re-write it with --out); on a "
                                       "batch folder, its summary (and summary.html)",
                        epilog=_EPILOG)
    sp.add_argument("input", help="a results bundle, or a batch folder (summary.csv)")
    sp.add_argument("--out", help="write a fresh copy of the bundle (figures and report.html) here")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    _debug_option(sp)
    sp.set_defaults(func=cmd_report)
    sp = sub.add_parser("batch", help="the whole pipeline on several stacks, one bundle each", epilog=_EPILOG)
    sp.add_argument("inputs", nargs="+", help="stacks (TIFF files, folders or globs) or bundles; a name carrying a "
                                              "well (plate1_B03.tif) puts the item on the plate heat map")
    common(sp)
    sp.add_argument("--workers", type=int, help="local worker processes (default: one per core, at most one per "
                                                "input; 1 runs the inputs one after another in this process). "
                                                "Needs napari-binn[distributed] for more than 1")
    sp.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing dask cluster: its scheduler address, "
                                                           "tcp://host:8786 (default: $DASK_SCHEDULER_ADDRESS)")
    sp.add_argument("--resume", action="store_true", help="keep the inputs whose bundle in --out is complete and "
                                                          "run the rest")
    sp.add_argument("--each-shape", action="store_true", help="one analysis per input and shape of --roi (JSON or "
                                                              "Shapes CSV), named <input>_roi<n>")
    sp.set_defaults(func=cmd_batch)
    return p


_BUG_REPORT = ("napari-binn: this is a bug in napari-binn, not in your input: please report it with the traceback "
               "above and the command you ran (https://github.com/napari-binn/napari-binn/issues)")
#: expected failures: the project's own errors, and files that are missing, present or not writable
_EXPECTED = (NapariBinnError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
             NotADirectoryError)


def _claim_out(args):
    """Hold --out for the whole command (refused before any work if it exists or another run writes it)."""
    from contextlib import nullcontext

    from .results import claim_output

    out = getattr(args, "out", None)
    if not out:
        return nullcontext()
    # batch checks its folder itself (check_batch_folder: --resume keeps complete bundles in an existing folder)
    overwrite = getattr(args, "overwrite", False) or hasattr(args, "resume")
    if Path(out).exists() and not overwrite:
        raise OutputError(f"{out} exists: choose another --out or pass --overwrite", file=out)
    return claim_output(out, overwrite=overwrite)


def _debug_option(sp) -> None:
    """--debug after the command too (SUPPRESS: not given there, the top-level value stands)."""
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="show the traceback of an error (for bug reports)")


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit codes: 0 done; 2 bad input (one line saying what to fix; ``--debug`` for the
    traceback); 1 an unexpected error (a bug: traceback and a request to report it); 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        with _claim_out(args):
            return int(args.func(args))
    except _EXPECTED as err:
        if args.debug:
            traceback.print_exc()
        print(f"napari-binn: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("napari-binn: aborted (nothing was written for the step that was running)", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception:
        traceback.print_exc()
        print(_BUG_REPORT, file=sys.stderr)
        return EXIT_ERROR


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and not isinstance(err, NapariBinnError):
        return f"{err.strerror or 'cannot use'}: {err.filename}"
    return " ".join(str(err).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
