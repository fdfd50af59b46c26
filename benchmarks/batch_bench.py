"""Batches on dask.distributed: throughput of a plate of stacks and of one BINN's ensemble, serial vs 2 workers.

1. Plate: 8 small nuclei stacks (TIFF files named by well, A01..A08; rendered from Fisher–KPP scratches with
   different seeds) through the whole pipeline, one bundle each: serially in this process, then on a local dask
   cluster of ``--workers`` processes (items sent as paths; each worker reads its file). Throughput ratio =
   serial seconds / cluster seconds. The cluster's start-up (worker processes importing torch and napari-binn) is
   measured apart: it is paid once per batch, not per item.
2. Ensemble: one BINN with n_models = 4 on one density field: serially, then with its members as tasks
   (``train_binn(..., members=DaskMembers(client))``). Ensemble ratio = serial / distributed seconds.
3. Overhead per task: ``--tasks`` trivial tasks (no work) through the same client; wall seconds per task.
4. identical_to_serial: every bundle's learned D(u), G(u) (every member), chosen equations and constants, and the
   ensemble's networks, equal to the serial run's (same seeds, one torch thread everywhere).

torch runs on one thread in this process and in every worker. The ratios need an otherwise idle machine with
at least ``--workers`` cores: on a loaded machine they measure the load. The last line is JSON:
``{"throughput_ratio": x, "ensemble_ratio": y, "overhead_s_per_task": z, "identical_to_serial": true}``.

    python benchmarks/batch_bench.py [--steps 1500] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _noop(x):
    return x


def make_stacks(folder: Path, n: int, grid: tuple[int, int], frames: int) -> list[Path]:
    """``n`` nuclei stacks A01.. (Fisher–KPP scratch, seeds 0..n-1), calibrated TIFFs."""
    from napari_binn.io import write_stack_tiff
    from napari_binn.synthetic.sample import spreading_sample

    paths = []
    for i in range(n):
        sample = spreading_sample(grid=grid, n_frames=frames, span_h=48.0, seed=i)
        stack = sample.rendered.stack
        path = folder / f"A{i + 1:02d}.tif"
        write_stack_tiff(path, stack.data, stack.pixel_size_um, stack.times_h)
        paths.append(path)
    return paths


def config(steps: int, n_models: int = 1):
    from napari_binn.pipeline import PipelineConfig

    cfg = PipelineConfig()
    cfg.density.box_um = 50.0
    cfg.binn = cfg.binn.with_steps(steps).replace(n_models=n_models, device="cpu")
    cfg.symbolic.backend = "library"
    cfg.refit.candidates = 2
    cfg.refit.max_evals = 40
    cfg.refit.intervals = "wald"
    # the engine's throughput is measured, not the method's: the refinement through the solver (about a minute
    # per item on one thread) would make the serial run of 8 items take 15+ minutes for the same ratios
    cfg.refine.enabled = False
    # and the forms are chosen by BIC among the front's 2 candidates, not by refitting every library form on
    # held-out frames (a dozen refits per item): the same engine work per item, a fraction of the wall time
    cfg.refit.holdout_frames = 0
    return cfg


def same_bundles(a_dir: Path, b_dir: Path, names: list[str]) -> bool:
    from napari_binn.results import load_results

    for name in names:
        a, b = load_results(a_dir / name), load_results(b_dir / name)
        u = np.linspace(a.fit.u_range["min"], a.fit.u_range["max"], 17)
        if not (np.array_equal(a.fit.D_ensemble(u), b.fit.D_ensemble(u))
                and np.array_equal(a.fit.G_ensemble(u), b.fit.G_ensemble(u))
                and a.equations.D.text == b.equations.D.text and a.equations.G.text == b.equations.G.text
                and a.metadata.get("closed_form_refitted") == b.metadata.get("closed_form_refitted")):
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="BINN steps per item (several seconds of work each)")
    p.add_argument("--ensemble-steps", type=int, default=1500, help="steps per member of the n_models = 4 BINN")
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=200, help="trivial tasks for the overhead")
    p.add_argument("--quick", action="store_true", help="small settings: checks the benchmark runs (ratios then "
                                                        "mostly measure overhead)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.ensemble_steps, args.items, args.tasks = 300, 300, 4, 50

    import torch

    torch.set_num_threads(1)
    from napari_binn.batch import BatchItem, run_batch
    from napari_binn.batch.cluster import DaskMembers, connect
    from napari_binn.binn import fit_binn, train_binn
    from napari_binn.jobs import run_job
    from napari_binn.synthetic.models import make_synthetic

    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} (1 min) at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="napari-binn-batch-bench-") as tmp:
        tmp = Path(tmp)
        paths = make_stacks(tmp, args.items, grid=(12, 16), frames=9)
        names = [p.stem for p in paths]
        cfg = config(args.steps)

        def items(where: str, config=cfg, stacks=paths):
            return [BatchItem(f"{where}_{i}" if where.startswith("warm") else p.stem, str(p), config,
                              tmp / where / (f"{i}" if where.startswith("warm") else p.stem))
                    for i, p in enumerate(stacks)]

        # warm-up: each process pays its first-call costs (lazy imports, first torch calls) once, before timing
        warm = config(20)
        run_job(run_batch(items("warm-serial", warm, paths[:1])))
        t0 = time.perf_counter()
        serial = run_job(run_batch(items("serial")))
        t_serial = time.perf_counter() - t0
        assert all(o.status == "done" for o in serial), [(o.name, o.message) for o in serial]
        per_item = statistics.median(o.seconds for o in serial)
        print(f"plate: {args.items} stacks serially in {t_serial:.1f} s (median {per_item:.1f} s per item)",
              flush=True)

        t0 = time.perf_counter()
        client, close = connect("local", args.workers)
        client.gather(client.map(_noop, range(4 * args.workers), pure=False))
        t_start = time.perf_counter() - t0
        print(f"local cluster of {args.workers} workers started in {t_start:.1f} s", flush=True)
        try:
            t0 = time.perf_counter()
            run_job(run_batch(items("warm-dask", warm, paths[:1] * args.workers), cluster=client, members=False))
            print(f"warm-up item on each worker: {time.perf_counter() - t0:.1f} s", flush=True)
            t0 = time.perf_counter()
            dist = run_job(run_batch(items("dask"), cluster=client, members=False))
            t_dist = time.perf_counter() - t0
            assert all(o.status == "done" for o in dist), [(o.name, o.message) for o in dist]
            throughput = t_serial / t_dist
            same = same_bundles(tmp / "serial", tmp / "dask", names)
            print(f"plate: {args.items} stacks on {args.workers} workers in {t_dist:.1f} s (median "
                  f"{statistics.median(o.seconds for o in dist):.1f} s per item): throughput x{throughput:.2f}; "
                  f"identical to serial: {same}", flush=True)

            field, _ = make_synthetic("fisher_kpp", {"D": 800.0, "r": 0.08, "K": 2000.0}, domain="scratch",
                                      grid=(12, 16), dx_um=50.0, times_h=np.linspace(0, 48, 9), seed=0)
            ens = config(args.ensemble_steps, n_models=4).binn
            t0 = time.perf_counter()
            fit_serial = fit_binn(field, ens)
            t_ens_serial = time.perf_counter() - t0
            t0 = time.perf_counter()
            fit_dist = run_job(train_binn(field, ens, members=DaskMembers(client)))
            t_ens_dist = time.perf_counter() - t0
            u = np.linspace(100.0, 1900.0, 17)
            same_ens = bool(np.array_equal(fit_serial.D_ensemble(u), fit_dist.D_ensemble(u))
                            and np.array_equal(fit_serial.G_ensemble(u), fit_dist.G_ensemble(u)))
            ensemble = t_ens_serial / t_ens_dist
            print(f"ensemble (n_models = 4, {args.ensemble_steps} steps each): serial {t_ens_serial:.1f} s, "
                  f"{args.workers} workers {t_ens_dist:.1f} s: x{ensemble:.2f}; identical: {same_ens}", flush=True)

            t0 = time.perf_counter()
            client.gather(client.map(_noop, range(args.tasks), pure=False))
            overhead = (time.perf_counter() - t0) / args.tasks
            print(f"overhead: {args.tasks} trivial tasks, {overhead * 1e3:.1f} ms per task "
                  f"({100 * overhead / per_item:.2f}% of a median item)", flush=True)
        finally:
            close()
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end", flush=True)
    print(json.dumps({"throughput_ratio": round(throughput, 3), "ensemble_ratio": round(ensemble, 3),
                      "overhead_s_per_task": round(overhead, 5), "identical_to_serial": bool(same and same_ens)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
