"""Real-data validation of ``fit_mechanistic`` against published Fisher–KPP estimates.

- MDCK tissues (Liu et al. 2024, J R Soc Interface 21:20230607), circle xy2 and triangle xy4: 2D density maps
  (77 frames, 150x150 boxes of 29.2 µm, 20 min apart, cells/mm²; NaN = no cells = 0 as the authors treat it).
  Fitted like the authors: the whole square grid is the domain (no-flux edges), Gaussian errors (OLS), D, r and
  K free. Target: within 15% of the authors' estimates.
- Jin et al. 2016 PC-3 scratch assays, six seeding densities: U_mean profiles u(x, t) (x strips of 50 µm,
  t = 0..48 h) extruded along y into a few identical rows, the x = 25 µm strip dropped and K fixed at
  1700 cells/mm² as Lagergren et al. 2020 did. Target: D and r within 20% of their refit, and the trend
  (D up about 3x, r about 1.5x from 10k to 20k cells/well).

Data are read from $NAPARI_BINN_SHARED_DATA (default ``<repo>/../shared/data``); the benchmark skips with a
message when they are absent. Prints a table and, as its last line, a JSON object with every figure.

With ``--pipeline`` it also runs the whole pipeline (BINN -> symbolic -> simulation -> refit with BIC choice ->
QC) on MDCK xy2 (every 4th frame, boxes merged 2x2 to 58.4 µm to keep the run to minutes on 2 cores) and on one
Jin 2016 density, and prints the QC table next to the 2026 paper's reported N(t) error range (3.4-6.6%).

Usage: python benchmarks/real_data.py [--frame-step N] [--jin-weighting ols|gls] [--intervals wald|profile]
                                      [--pipeline] [--skip-mdck]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from napari_binn.field import DensityField
from napari_binn.pde.mechanistic import fit_mechanistic

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_BINN_SHARED_DATA", REPO.parent / "shared" / "data"))

MDCK_REF = {  # Liu et al. 2024, Fisher-KPP: D0 µm²/h, r 1/h, K cells/mm²
    "xy2": {"D": 1157.0, "r": 0.29, "K": 2550.0},
    "xy4": {"D": 1161.0, "r": 0.32, "K": 2306.0},
}
JIN_K = 1700.0  # cells/mm² (1.7e-3 cells/µm²), fixed as in the 2020 refit
JIN_DENSITIES = (10000, 12000, 14000, 16000, 18000, 20000)


def load_mdck(tissue: str, frame_step: int = 1) -> DensityField:
    """One MDCK tissue as a DensityField on the whole 150x150 grid (NaN -> 0 cells/mm²)."""
    z = np.load(DATA / "mdck_liu2024" / "mdck_density_xy2_xy4.npz")
    u = np.nan_to_num(z[f"{tissue}_density"].astype(np.float64), nan=0.0)[::frame_step]
    dx = float(z["grid_spacing_um"])
    t = np.arange(z[f"{tissue}_density"].shape[0])[::frame_step] * float(z["dt_hours"])
    ny, nx = u.shape[1:]
    return DensityField(u, np.ones((ny, nx), bool), np.arange(nx) * dx, np.arange(ny) * dx, t,
                        units="cells/mm²", metadata={"source": f"mdck_liu2024/{tissue}"})


def load_jin(cells_per_well: int, rows: int = 3) -> DensityField:
    """Jin 2016 U_mean profile for one seeding density, x = 25 µm dropped, extruded into ``rows`` rows."""
    table: dict[tuple[float, float], float] = {}
    with open(DATA / "jin2016_pc3_scratch" / "jin2016_density_long.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["initial_cells_per_well"]) == cells_per_well and row["series"] == "U_mean":
                table[(float(row["t_h"]), float(row["x_um"]))] = float(row["density_cells_per_um2"]) * 1e6
    times = sorted({t for t, _ in table})
    xs = sorted({x for _, x in table if x != 25.0})
    prof = np.array([[table[(t, x)] for x in xs] for t in times])
    u = np.repeat(prof[:, None, :], rows, axis=1)
    dx = xs[1] - xs[0]
    return DensityField(u, np.ones((rows, len(xs)), bool), np.array(xs), np.arange(rows) * dx,
                        np.array(times), units="cells/mm²", K=JIN_K,
                        metadata={"source": f"jin2016_pc3_scratch/{cells_per_well}"})


def load_jin_refit() -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    with open(DATA / "jin2016_pc3_scratch" / "lagergren2020_refit_params.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["model"] == "FKPP":
                out.setdefault(int(row["initial_cells_per_well"]), {})[row["param"]] = float(
                    row["value_um_h_units"])
    return out


def _rel(a: float, b: float) -> float:
    return a / b - 1.0


def run_mdck(frame_step: int, intervals: str | None) -> dict:
    results = {}
    print(f"MDCK (Liu et al. 2024), Fisher-KPP, whole 150x150 grid, OLS, every {frame_step} frame(s)")
    print(f"{'tissue':<7}{'param':<6}{'ours':>10}{'95% interval':>24}{'authors':>10}{'rel.err':>9}")
    for tissue, ref in MDCK_REF.items():
        field = load_mdck(tissue, frame_step)
        t0 = time.perf_counter()
        fit = fit_mechanistic(field, "fisher_kpp", intervals=intervals)
        seconds = time.perf_counter() - t0
        row = {"seconds": round(seconds, 1), "converged": fit.converged, "n_evals": fit.n_evals,
               "frames": field.n_frames, "aic": fit.aic}
        for name in ("D", "r", "K"):
            lo, hi = fit.ci95[name]
            err = _rel(fit.params[name], ref[name])
            row[name] = fit.params[name]
            row[f"{name}_ci95"] = [lo, hi]
            row[f"{name}_ref"] = ref[name]
            row[f"{name}_rel_err"] = err
            print(f"{tissue:<7}{name:<6}{fit.params[name]:>10.4g}{f'[{lo:.4g}, {hi:.4g}]':>24}"
                  f"{ref[name]:>10.4g}{err:>+9.1%}")
        row["within_15pct"] = all(abs(row[f"{n}_rel_err"]) <= 0.15 for n in ("D", "r", "K"))
        print(f"{'':<7}{fit.n_evals} simulations, {seconds:.0f} s, converged {fit.converged}: {fit.message}")
        results[tissue] = row
    return results


def run_jin(weighting: str, intervals: str | None, rows: int) -> dict:
    refit = load_jin_refit()
    print(f"\nJin 2016 PC-3 scratch assays, Fisher-KPP, K fixed {JIN_K:g} cells/mm², {weighting.upper()}, "
          f"profiles extruded into {rows} rows")
    if rows > 1:
        print(f"(intervals count the {rows} identical rows as independent data, so they are sqrt({rows}) too "
              "narrow; --jin-rows 1 gives the honest ones)")
    print(f"{'cells':>6}{'D ours':>9}{'D 2020':>9}{'err':>8}{'r ours':>9}{'r 2020':>9}{'err':>8}"
          f"{'D 95% interval':>20}{'r 95% interval':>22}{'s':>5}")
    rows_out = {}
    for cells in JIN_DENSITIES:
        field = load_jin(cells, rows)
        t0 = time.perf_counter()
        fit = fit_mechanistic(field, "fisher_kpp", fixed={"K": JIN_K}, weighting=weighting,
                              intervals=intervals)
        seconds = time.perf_counter() - t0
        ref = refit[cells]
        d, r = fit.params["D"], fit.params["r"]
        (dlo, dhi), (rlo, rhi) = fit.ci95["D"], fit.ci95["r"]
        rows_out[cells] = {"D": d, "r": r, "D_ref": ref["D"], "r_ref": ref["r"],
                           "D_rel_err": _rel(d, ref["D"]), "r_rel_err": _rel(r, ref["r"]),
                           "D_ci95": [dlo, dhi], "r_ci95": [rlo, rhi], "converged": fit.converged,
                           "seconds": round(seconds, 2), "aic": fit.aic}
        rows_out[cells]["within_20pct"] = (abs(rows_out[cells]["D_rel_err"]) <= 0.2
                                           and abs(rows_out[cells]["r_rel_err"]) <= 0.2)
        print(f"{cells:>6}{d:>9.1f}{ref['D']:>9.1f}{_rel(d, ref['D']):>+8.1%}{r:>9.4f}{ref['r']:>9.4f}"
              f"{_rel(r, ref['r']):>+8.1%}{f'[{dlo:.0f}, {dhi:.0f}]':>20}{f'[{rlo:.4f}, {rhi:.4f}]':>22}"
              f"{seconds:>5.1f}")
    lo, hi = rows_out[JIN_DENSITIES[0]], rows_out[JIN_DENSITIES[-1]]
    trend = {"D_ratio_20k_10k": hi["D"] / lo["D"], "r_ratio_20k_10k": hi["r"] / lo["r"],
             "D_ratio_ref": hi["D_ref"] / lo["D_ref"], "r_ratio_ref": hi["r_ref"] / lo["r_ref"]}
    trend["reproduced"] = bool(trend["D_ratio_20k_10k"] > 2.0 and trend["r_ratio_20k_10k"] > 1.2)
    print(f"trend 10k -> 20k: D x{trend['D_ratio_20k_10k']:.2f} (2020: x{trend['D_ratio_ref']:.2f}), "
          f"r x{trend['r_ratio_20k_10k']:.2f} (2020: x{trend['r_ratio_ref']:.2f})")
    return {"fits": {str(k): v for k, v in rows_out.items()}, "trend": trend,
            "all_within_20pct": all(v["within_20pct"] for v in rows_out.values())}


def _coarsen(field: DensityField, k: int) -> DensityField:
    """Merge k x k boxes (mean density) of a fully observed square grid."""
    T, ny, nx = field.u.shape
    ny, nx = ny - ny % k, nx - nx % k
    u = field.u[:, :ny, :nx].reshape(T, ny // k, k, nx // k, k).mean(axis=(2, 4))
    dx = field.dx_um * k
    return DensityField(u, np.ones(u.shape[1:], bool), np.arange(nx // k) * dx, np.arange(ny // k) * dx,
                        field.t_h.copy(), units=field.units, metadata=dict(field.metadata, coarsened=k))


def run_pipeline_on(name: str, field: DensityField) -> dict:
    """The whole pipeline from the density on; the QC table and the equations chosen."""
    from napari_binn.jobs import run_job
    from napari_binn.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig()
    cfg.binn = cfg.binn.replace(warmup_steps=1000, steps=8000, pde_weight=1.0)  # the demo's schedule
    cfg.refit.candidates = 4
    cfg.refit.intervals = "wald"
    t0 = time.perf_counter()
    res = run_job(run_pipeline(field, cfg, stages=("binn", "symbolic", "simulate", "refit", "qc")))
    seconds = time.perf_counter() - t0
    print(f"\n{name}: {field}")
    print(res.qc.table())
    eq = res.equations
    print(f"chosen (BIC): D(u) = {eq.D.text}; G(u) = {eq.G.text}")
    refit = res.metadata.get("closed_form_refitted", {})
    mech = res.mechanistic.get("closed form (refitted)")
    for k, v in refit.items():
        lo, hi = mech.ci95.get(k, (float("nan"), float("nan")))
        print(f"  {k} = {v:.4g} [{lo:.4g}, {hi:.4g}]")
    fk = res.mechanistic.get("fisher_kpp")
    if fk is not None:
        print("  Fisher-KPP refit: " + ", ".join(f"{k} = {v:.4g}" for k, v in fk.params.items()))
    member = res.fit.metadata["members"][0]
    rolled = member.get("warmup_restored")
    print("  BINN warm-up: " + (f"rolled back to step {rolled['step']} (validation loss {rolled['end_val']:.3g} at "
                                f"its end, {rolled['val']:.3g} there)" if rolled else "kept (validation loss at its "
                                "end within binn.warmup_restore of its lowest)"))
    check = res.metadata.get("delay_check")
    if check:
        print(f"  delay check: a delay T(t) = {check['T']} (tau {check['tau_h']:.3g} h) lowers the closed form's BIC by "
              f"{check['bic_drop']:.1f} (a warning above {check['threshold']:g})")
    for w in res.metadata.get("warnings", []):
        print(f"  warning: {w}")
    print(f"  {seconds:.0f} s; the 2026 paper reports N(t) errors of 3.4-6.6% on its data")
    return {"seconds": round(seconds, 1), "D": eq.D.text, "G": eq.G.text, "refit": refit, "warmup_restored": rolled,
            "delay_check": check, "warnings": list(res.metadata.get("warnings", [])),
            "qc": {row: {"rel_l2": res.qc[row].mean_rel_l2, "nt_err_pct": res.qc[row].mean_abs_count_error_pct}
                   for row in res.simulations if row in {m.name for m in res.qc.models}},
            "fisher_kpp": dict(fk.params) if fk is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame-step", type=int, default=1, help="use every N-th MDCK frame (default all 77)")
    parser.add_argument("--jin-weighting", choices=("ols", "gls"), default="gls")
    parser.add_argument("--jin-rows", type=int, default=3)
    parser.add_argument("--intervals", choices=("wald", "profile", "none"), default="wald")
    parser.add_argument("--skip-mdck", action="store_true")
    parser.add_argument("--pipeline", action="store_true", help="also run the whole pipeline (minutes)")
    parser.add_argument("--pipeline-only", action="store_true", help="only the pipeline runs")
    args = parser.parse_args(argv)
    intervals = None if args.intervals == "none" else args.intervals
    if not DATA.is_dir():
        print(f"real data not found at {DATA}; set NAPARI_BINN_SHARED_DATA. Skipping.")
        print(json.dumps({"skipped": True, "reason": f"no data at {DATA}"}))
        return 0
    out: dict = {"data": str(DATA.name), "frame_step": args.frame_step, "jin_weighting": args.jin_weighting,
                 "intervals": args.intervals}
    if not args.pipeline_only:
        if not args.skip_mdck:
            out["mdck"] = run_mdck(args.frame_step, intervals)
        out["jin"] = run_jin(args.jin_weighting, intervals, args.jin_rows)
    if args.pipeline or args.pipeline_only:
        out["pipeline"] = {"jin_14000": run_pipeline_on("Jin 2016, 14000 cells/well", load_jin(14000, rows=3))}
        if not args.skip_mdck:
            out["pipeline"]["mdck_xy2"] = run_pipeline_on("MDCK xy2 (every 4th frame, 58.4 µm boxes)",
                                                          _coarsen(load_mdck("xy2", 4), 2))
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
