"""Coverage of the refit's 95% intervals on the discovery benchmark's cases, over many seeds.

For each case the true model is fitted (``fit_mechanistic``, from the true constants, the first frame denoised as
the pipeline mostly chooses; ``--initial data`` for the other) to each seed's data, once with Wald intervals alone
and once with ``wald+ic`` (the pipeline's default: Wald widened by a bootstrap over the first frame's noise). Per
constant it reports how many of the seeds' intervals hold the truth, the median half-width and the estimates'
own spread over the seeds (1.96 s.d., what a calibrated 95% half-width would be without bias) and their mean
bias. A calibrated interval covers about 95% of seeds with a half-width near that spread (plus the bias).

Cases (``discovery_bench.ALL_CASES`` with a built-in model): allee_islands, fkpp_wound_poisson (Poisson counts of
~20 cells per box) and fkpp_scratch (5% Gaussian). About 1-3 s per fit.

Usage: python benchmarks/interval_coverage.py [--seeds 10] [--cases ...] [--initial denoised|data]
Last line: JSON {case: {constant: {"wald_cover", "ic_cover", "ic_half_width_pct", "spread_pct", "bias_pct"}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from discovery_bench import ALL_CASES  # noqa: E402

from napari_binn.pde.mechanistic import fit_mechanistic  # noqa: E402

MODELS = {"allee_islands": "allee", "fkpp_wound_poisson": "fisher_kpp", "fkpp_scratch": "fisher_kpp"}


def run_case(name: str, seeds: int, initial: str) -> dict[str, dict[str, float]]:
    case = ALL_CASES[name]
    truth = dict(case.params)
    rows: dict[str, list] = {}
    for seed in range(seeds):
        field, _ = case.make(seed)
        fits = {iv: fit_mechanistic(field, MODELS[name], init=truth, initial=initial, intervals=iv)
                for iv in ("wald", "wald+ic")}
        for k in fits["wald"].params:
            if k in truth:
                rows.setdefault(k, []).append((fits["wald+ic"].params[k], fits["wald"].ci95[k],
                                               fits["wald+ic"].ci95[k]))
    out = {}
    for k, r in rows.items():
        est = np.array([x[0] for x in r])
        covers = lambda ci: int(sum(lo <= truth[k] <= hi for lo, hi in ci))  # noqa: E731
        half = np.median([(hi - lo) / 2 / e for e, (lo, hi) in zip(est, [x[2] for x in r])])
        out[k] = {"wald_cover": covers([x[1] for x in r]), "ic_cover": covers([x[2] for x in r]), "seeds": len(r),
                  "ic_half_width_pct": round(100 * float(half), 1),
                  "spread_pct": round(100 * 1.96 * float(est.std(ddof=1) / est.mean()), 1),
                  "bias_pct": round(100 * float(est.mean() / truth[k] - 1), 1)}
        print(f"{name:20s} {k:2s}: truth covered by wald {out[k]['wald_cover']}/{len(r)}, wald+ic "
              f"{out[k]['ic_cover']}/{len(r)}; wald+ic half-width {out[k]['ic_half_width_pct']}% (median), "
              f"estimates' spread 1.96 sd {out[k]['spread_pct']}%, bias {out[k]['bias_pct']:+}%", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--cases", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--initial", choices=("denoised", "data"), default="denoised")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the spread needs two estimates)")
    result = {name: run_case(name, args.seeds, args.initial) for name in args.cases}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
