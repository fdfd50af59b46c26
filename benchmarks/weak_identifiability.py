"""How much of D(u)'s shape the data determine: linear least squares on the BINN's weak-form equations.

The BINN's weak-form term (``napari_binn.binn.weak``) turns the data into one linear equation in D and G per
space-time window. Here D(u) and G(u) are expanded in ``n`` piecewise-linear hat functions over the observed
density and the equations of all windows are solved by least squares, with no network and no prior. The D error
as ``n`` grows shows how many degrees of freedom of D the windows pin down; the normalised window residual of
the TRUE D and G is the noise floor (a fit whose residual is below it is fitting noise).

Case: ``make_synthetic`` scratch assay, 64 x 64 boxes of 50 µm, 20 frames, Gaussian noise, the accuracy
benchmark's setting. Errors: relative L2 over the central 90% of the observed density, as in binn_accuracy.py.

    python benchmarks/weak_identifiability.py [--model porous_fisher] [--seeds 3] [--noise 0.05 0]
        [--bases 2 3 5 8]

Last line: JSON {model: {noise: {n: {"d_rel_err": median, "g_rel_err": median, "residual": median},
"truth_residual": median}}}.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from napari_binn.binn import BinnConfig
from napari_binn.binn.train import _prepare
from napari_binn.binn.weak import _N_GRID, build_weak_form
from napari_binn.synthetic.models import make_synthetic


def _hats(grid: np.ndarray, n: int) -> np.ndarray:
    """(N, n) piecewise-linear hat basis on [0, grid.max()]."""
    nodes = np.linspace(0.0, grid[-1], n)
    return np.maximum(0.0, 1.0 - np.abs(grid[:, None] - nodes[None]) / (nodes[1] - nodes[0]))


def _cumtrapz_matrix(step: float) -> np.ndarray:
    """F = M @ D: the trapezoid integral of D from 0 on the weak form's density grid."""
    M = np.zeros((_N_GRID, _N_GRID))
    for i in range(1, _N_GRID):
        M[i] = M[i - 1]
        M[i, i - 1] += step / 2
        M[i, i] += step / 2
    return M


def run(model: str, seed: int, noise: float, bases: list[int]) -> dict:
    field, truth = make_synthetic(model, domain="scratch", grid=(64, 64), dx_um=50.0, noise=noise,
                                  noise_model="gaussian", seed=seed)
    cfg = BinnConfig()
    data = _prepare(field, cfg)
    u_hat, mask, xh, yh, th = data.grid
    wf = build_weak_form(u_hat, mask, xh, yh, th, half_boxes=cfg.weak_half_boxes,
                         half_frames=cfg.weak_half_frames, device=torch.device("cpu"), dtype=torch.float64)
    # no delay network: T(t) = 1, so each window's equation sums over its frames
    A, B, c, lhs = (wf.A.numpy().sum(1), wf.B.numpy().sum(1), wf.c.numpy().sum(1), wf.lhs.numpy())
    grid = np.linspace(0.0, wf.top, _N_GRID)
    M = _cumtrapz_matrix(grid[1] - grid[0])
    scale = float(np.mean(lhs**2))
    u_phys = grid * data.scales.K
    central = (u_phys >= data.u_range["q05"]) & (u_phys <= data.u_range["q95"])
    D_true, G_true = truth.D(u_phys[central]), truth.G(u_phys[central])

    d_true_hat = truth.D(u_phys) / data.scales.D_unit
    g_true_hat = truth.G(u_phys) / data.scales.G_unit
    r_true = lhs - (A @ M @ d_true_hat + c * d_true_hat[0] + B @ g_true_hat)
    out = {"windows": wf.n_windows, "truth_residual": float(np.mean(r_true**2) / scale)}
    for n in bases:
        H = _hats(grid, n)
        X = np.hstack([A @ M @ H + c[:, None] * H[0][None], B @ H])
        coef, *_ = np.linalg.lstsq(X, lhs, rcond=None)
        D = (H @ coef[:n]) * data.scales.D_unit
        G = (H @ coef[n:]) * data.scales.G_unit
        out[n] = {"d_rel_err": float(np.linalg.norm(D[central] - D_true) / np.linalg.norm(D_true)),
                  "g_rel_err": float(np.linalg.norm(G[central] - G_true) / np.linalg.norm(G_true)),
                  "residual": float(np.mean((lhs - X @ coef) ** 2) / scale)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="porous_fisher")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.0])
    ap.add_argument("--bases", type=int, nargs="+", default=[2, 3, 5, 8])
    args = ap.parse_args()
    report: dict = {args.model: {}}
    print(f"{args.model}: weak-form least squares, D and G on n hat functions each (median of {args.seeds} seeds)")
    print(f"{'noise':>6} {'n':>3} {'D rel L2':>9} {'G rel L2':>9} {'residual':>9} {'truth res.':>10}")
    for noise in args.noise:
        runs = [run(args.model, seed, noise, args.bases) for seed in range(args.seeds)]
        truth_res = statistics.median(r["truth_residual"] for r in runs)
        entry: dict = {"truth_residual": truth_res, "windows": runs[0]["windows"]}
        for n in args.bases:
            med = {k: statistics.median(r[n][k] for r in runs) for k in ("d_rel_err", "g_rel_err", "residual")}
            entry[n] = med
            print(f"{noise:>6g} {n:>3} {med['d_rel_err']:>9.3f} {med['g_rel_err']:>9.3f} {med['residual']:>9.5f} "
                  f"{truth_res:>10.5f}")
        report[args.model][str(noise)] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
