"""Forward-solver benchmark: napari_binn.pde.simulate against scipy BDF (sparse Jacobian) and py-pde.

Cases: Fisher–KPP (D 1000 µm²/h, r 0.3 /h, K 2000 cells/mm²) and Porous–Fisher (D = D0 u/K, D0 2000 µm²/h,
same r, K) on 128² and 256² grids of 25 µm boxes, full square (no-flux edges) and a disc mask, 0-48 h with
13 output frames; initial state: a tissue patch (0.9 K, radius 1/4 of the grid, smooth edge of 2 boxes).

Accuracy: ``rel_error`` = ||u(48 h) - u_ref(48 h)||_2 / ||u_ref(48 h)||_2 over the mask, against our RKC at
rtol 1e-7 (atol 1e-9 K; checked once against scipy BDF at rtol 1e-8). Both our solver and the BDF baseline use
atol = 0.01 rtol K (Fisher fronts are pulled by their low-density edge, so a fixed atol floors the accuracy). Each method runs down a tolerance ladder, loosest first,
and is timed at the first tolerance whose rel_error <= 1e-3 ("equal accuracy"). Seconds are medians of
repeats (3 for ours, 1 for baselines slower than 5 s). py-pde (numba backend, fixed-step Euler with dt
0.1/0.05/0.025 h, then adaptive explicit; JIT compilation excluded by warm-up solves) has no masked domains, so the disc cases have no py-pde figure.

Run: python benchmarks/solver_bench.py [--quick]  (``--quick``: 128² only). py-pde: pip install py-pde.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import scipy.sparse as sp
from scipy.integrate import solve_ivp

from napari_binn.pde import simulate

DX, D, R, K, D0 = 25.0, 1000.0, 0.3, 2000.0, 2000.0
T_END = 48.0
TIMES = np.linspace(0.0, T_END, 13)
TARGET = 1e-3
LADDER = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6)


def initial_state(n: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:n, :n].astype(float)
    rad = np.hypot(x - (n - 1) / 2, y - (n - 1) / 2)
    mask = np.ones((n, n), bool) if domain == "square" else rad <= 0.48 * n
    u0 = 0.9 * K * 0.5 * (1 + np.tanh((0.25 * n - rad) / 2.0))
    return mask, np.where(mask, u0, 0.0)


def coefficients(model: str):
    G = lambda u: R * (1.0 - u / K)  # noqa: E731
    Dfun = D if model == "fisher_kpp" else (lambda u: D0 * u / K)
    return Dfun, G


def rel_error(u: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm(u[mask] - ref[mask]) / np.linalg.norm(ref[mask]))


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# --- baseline 1: scipy solve_ivp BDF, sparse 5-point Laplacian and exact sparse Jacobian ------------------

def graph_laplacian(mask: np.ndarray) -> sp.csr_matrix:
    """No-flux 5-point Laplacian / dx² on the mask's boxes (the standard finite-volume one)."""
    n = int(mask.sum())
    idx = np.full(mask.shape, -1)
    idx[mask] = np.arange(n)
    pairs = [(idx[:, :-1][mask[:, :-1] & mask[:, 1:]], idx[:, 1:][mask[:, :-1] & mask[:, 1:]]),
             (idx[:-1, :][mask[:-1, :] & mask[1:, :]], idx[1:, :][mask[:-1, :] & mask[1:, :]])]
    i = np.concatenate([p[0] for p in pairs])
    j = np.concatenate([p[1] for p in pairs])
    adj = sp.coo_matrix((np.ones(i.size), (i, j)), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    return ((adj - sp.diags(np.asarray(adj.sum(axis=1)).ravel())) / DX**2).tocsr()


def scipy_bdf(model: str, mask: np.ndarray, u0: np.ndarray, rtol: float, atol: float | None = None) -> np.ndarray:
    atol = 1e-2 * rtol * K if atol is None else atol  # same tolerance rule as ours
    L = graph_laplacian(mask)
    y0 = u0[mask]
    eye_diag = sp.diags

    if model == "fisher_kpp":
        def f(t, u):
            return D * (L @ u) + R * u * (1 - u / K)

        def jac(t, u):
            return (D * L + eye_diag(R * (1 - 2 * u / K))).tocsc()
    else:  # div((D0 u/K) grad u) = D0/(2K) L u² for the arithmetic face average
        c = D0 / (2 * K)

        def f(t, u):
            return c * (L @ (u * u)) + R * u * (1 - u / K)

        def jac(t, u):
            return (2 * c * (L @ eye_diag(u)) + eye_diag(R * (1 - 2 * u / K))).tocsc()

    sol = solve_ivp(f, (0.0, T_END), y0, method="BDF", t_eval=TIMES, rtol=rtol, atol=atol, jac=jac)
    if sol.status != 0:
        raise RuntimeError(sol.message)
    out = np.full((TIMES.size,) + mask.shape, np.nan)
    out[:, mask] = sol.y.T
    return out


# --- baseline 2: py-pde (full square only) -------------------------------------------------------------

def pypde_solver(model: str, n: int):
    import pde

    grid = pde.CartesianGrid([[0, n * DX], [0, n * DX]], [n, n], periodic=False)
    if model == "fisher_kpp":
        rhs = f"{D} * laplace(u) + {R} * u * (1 - u / {K})"
    else:
        rhs = f"{D0 / (2 * K)} * laplace(u**2) + {R} * u * (1 - u / {K})"
    eq = pde.PDE({"u": rhs}, bc={"derivative": 0})

    def run(u0: np.ndarray, tol: float) -> np.ndarray:
        """tol >= 0.01: fixed-step Euler with dt = tol hours; else adaptive explicit with that tolerance."""
        state = pde.ScalarField(grid, u0.T.copy())  # py-pde axis 0 is x
        if tol >= 0.01:
            res = eq.solve(state, t_range=T_END, dt=tol, solver="euler", tracker=None, backend="numba")
        else:
            res = eq.solve(state, t_range=T_END, dt=1e-3, solver="explicit", adaptive=True, tolerance=tol,
                           tracker=None, backend="numba")
        return res.data.T.copy()

    return run


def ladder(run, ref_final, mask, label, tolerances=LADDER):
    """Loosest tolerance with rel_error <= TARGET: (tol, first run seconds, error)."""
    last = None
    for tol in tolerances:
        t0 = time.perf_counter()
        final = run(tol)
        secs = time.perf_counter() - t0
        err = rel_error(final, ref_final, mask)
        last = (tol, secs, err)
        if err <= TARGET:
            return last
        print(f"    {label}: tol {tol:g} -> rel_error {err:.2e} ({secs:.2f} s), tightening")
    return last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="128² cases only")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    args = parser.parse_args()
    try:
        import pde  # noqa: F401
        have_pypde = True
    except ImportError:
        have_pypde = False
        print("py-pde not installed: pip install py-pde (benchmark-only dependency)")
    sizes = (128,) if args.quick else (128, 256)
    results: dict[str, dict] = {}
    checked_reference = False
    for model in ("fisher_kpp", "porous_fisher"):
        for n in sizes:
            pypde_run = pypde_solver(model, n) if have_pypde and n in sizes else None
            for domain in ("square", "disc"):
                name = f"{model}_{n}_{domain}"
                if args.cases and not any(c in name for c in args.cases.split(",")):
                    continue
                mask, u0 = initial_state(n, domain)
                Dfun, G = coefficients(model)
                print(f"{name}: {int(mask.sum())} unknowns")
                ref = simulate(Dfun, G, u0, mask, DX, TIMES, rtol=1e-7, method="rkc")[-1]  # atol 1e-9 K
                case: dict = {}
                if not checked_reference and n == 128:
                    check = scipy_bdf(model, mask, u0, 1e-8)[-1]
                    case["reference_vs_bdf_1e-8"] = rel_error(check, ref, mask)
                    print(f"    reference check: RKC 1e-7 vs scipy BDF 1e-8 differ by {case['reference_vs_bdf_1e-8']:.1e}")
                    checked_reference = True

                ours = lambda tol: simulate(Dfun, G, u0, mask, DX, TIMES, rtol=tol)[-1]  # noqa: E731
                tol, _, err = ladder(ours, ref, mask, "ours")
                secs, final = timed(lambda: ours(tol), 3)
                case.update(seconds=secs, rel_error=rel_error(final, ref, mask), rtol=tol)

                btol, bsecs, berr = ladder(lambda t: scipy_bdf(model, mask, u0, t)[-1], ref, mask, "scipy BDF")
                if bsecs < 5:
                    bsecs, _ = timed(lambda: scipy_bdf(model, mask, u0, btol), 3)
                case.update(scipy_bdf_seconds=bsecs, scipy_bdf_rel_error=berr, scipy_bdf_rtol=btol,
                            ratio_vs_scipy_bdf=bsecs / secs)

                if pypde_run is not None and domain == "square":
                    pypde_run(u0, 1.0)  # JIT warm-up (numba compiles per grid and equation)
                    pypde_run(u0, 1e-1)
                    # fixed-step Euler (dt in h; the faster py-pde mode when stable), then adaptive as fallback
                    ptol, psecs, perr = ladder(lambda t: pypde_run(u0, t), ref, mask, "py-pde",
                                               (0.1, 0.05, 0.025, 1e-3, 1e-4))
                    if psecs < 5:
                        psecs, _ = timed(lambda: pypde_run(u0, ptol), 3)
                    case.update(pypde_seconds=psecs, pypde_rel_error=perr, pypde_tolerance=ptol,
                                ratio_vs_pypde=psecs / secs)
                else:
                    case.update(pypde_seconds=None, ratio_vs_pypde=None,
                                pypde_note="py-pde cannot restrict a Cartesian grid to a mask" if have_pypde
                                else "py-pde not installed")
                results[name] = case

    print()
    print(f"{'case':28s} {'ours s':>8s} {'err':>8s} {'BDF s':>8s} {'x BDF':>7s} {'py-pde s':>9s} {'x py-pde':>9s}")
    for name, c in results.items():
        pp = f"{c['pypde_seconds']:9.2f} {c['ratio_vs_pypde']:9.1f}" if c["pypde_seconds"] else f"{'-':>9s} {'-':>9s}"
        print(f"{name:28s} {c['seconds']:8.2f} {c['rel_error']:8.1e} {c['scipy_bdf_seconds']:8.2f} "
              f"{c['ratio_vs_scipy_bdf']:7.1f} {pp}")
    print(json.dumps({"benchmark": "solver_bench", "target_rel_error": TARGET, "cases": results}))


if __name__ == "__main__":
    main()
