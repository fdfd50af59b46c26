"""Accuracy of learned D(u) and G(u) on synthetic data with known truth.

Cases (``make_synthetic`` defaults: scratch assay, 64 x 64 boxes of 50 µm, 20 frames over 48 h, 5% Gaussian
noise): Fisher–KPP (targets: D and G within 10% relative L2) and Porous–Fisher D = D0 u/K (within 15%),
over the central 90% of the observed density. Wall-time target: <= 3 min per fit on 2 CPU cores.
Timings on a shared machine are inflated; quote medians.

    python benchmarks/binn_accuracy.py [--seeds 3] [--cases fisher_kpp porous_fisher] [--noise 0.05]
        [--set steps=3000 activation=tanh ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from napari_binn.binn import BinnConfig, fit_binn
from napari_binn.synthetic.models import make_synthetic

TARGETS = {"fisher_kpp": 0.10, "porous_fisher": 0.15}


def rel_l2(learned: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(learned - truth) / np.linalg.norm(truth))


def run_case(model: str, seed: int, overrides: dict, noise: float = 0.05) -> dict:
    field, truth = make_synthetic(model, domain="scratch", grid=(64, 64), dx_um=50.0, noise=noise,
                                  noise_model="gaussian", seed=seed)
    config = BinnConfig(seed=seed, **overrides)
    start = time.perf_counter()
    def report(ev) -> None:
        if ev.data.get("losses") and ev.step % 1000 == 0 or ev.data.get("divergence"):
            print(f"   {ev.message} ({ev.elapsed_s:.0f} s)", flush=True)

    fit = fit_binn(field, config, callback=report)
    seconds = time.perf_counter() - start
    u = fit.u_grid(200, central=True, from_zero=False)
    return {"model": model, "seed": seed, "d_rel_err": rel_l2(fit.D(u), truth.D(u)),
            "g_rel_err": rel_l2(fit.G(u), truth.G(u)), "seconds": seconds,
            "steps_done": fit.metadata["members"][0]["steps_done"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(TARGETS))
    ap.add_argument("--noise", type=float, default=0.05,
                    help="Gaussian noise fraction (0.05 is the target's; 0 separates noise effects from others)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="BinnConfig overrides, e.g. steps=3000 activation=tanh")
    args = ap.parse_args()
    defaults = BinnConfig().to_dict()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        kind = type(defaults.get(key)) if defaults.get(key) is not None else float
        overrides[key] = value if kind is str else (value.lower() == "true" if kind is bool else kind(value))
    rows = []
    print(f"torch threads {torch.get_num_threads()}; noise {args.noise:g}; config {overrides or 'defaults'}")
    print(f"{'case':<15} {'seed':>4} {'D rel L2':>9} {'G rel L2':>9} {'seconds':>8}")
    for model in args.cases:
        for seed in range(args.seeds):
            r = run_case(model, seed, overrides, args.noise)
            rows.append(r)
            print(f"{model:<15} {seed:>4} {r['d_rel_err']:>9.3f} {r['g_rel_err']:>9.3f} {r['seconds']:>8.1f}",
                  flush=True)
    out = {}
    for model in args.cases:
        rs = [r for r in rows if r["model"] == model]
        out[model] = {"d_rel_err": statistics.median(r["d_rel_err"] for r in rs),
                      "g_rel_err": statistics.median(r["g_rel_err"] for r in rs),
                      "seconds": statistics.median(r["seconds"] for r in rs),
                      "target": TARGETS.get(model), "per_seed": rs}
        print(f"{model}: median D {out[model]['d_rel_err']:.3f}, G {out[model]['g_rel_err']:.3f} "
              f"(target {TARGETS.get(model)}), {out[model]['seconds']:.0f} s per fit")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
