"""Training-step speed of the BINN PDE residual: nested autograd vs the forward-Laplacian ("fast") residual.

One step = residual at N collocation points + data term on 4096 points + backward + Adam, on the default
networks (3 x 64 SiLU surrogate, 2 x 32 D/G nets), same process. Also measures the machine's fp32 GEMM
GFLOP/s and the fraction of it each method reaches (matmul FLOPs counted by torch's FlopCounterMode).
Timings are medians of repeats; on a shared machine they are inflated and noisy.

    python benchmarks/binn_bench.py [--device cpu|cuda] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from napari_binn.binn import BinnConfig, residual_autograd, residual_fast
from napari_binn.binn.nets import BinnModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(device: torch.device, n: int = 1024, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def make_step(model, residual, n_coll: int, device: torch.device):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    coll = (torch.rand(n_coll, 3, generator=gen) * 2 - 1).to(device)
    data_x = (torch.rand(4096, 3, generator=gen) * 2 - 1).to(device)
    data_u = torch.rand(4096, generator=gen).to(device)

    def step() -> None:
        r, _ = residual(model, coll)
        loss = torch.mean((model.unet(data_x) - data_u) ** 2) + torch.mean(r ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_step(step, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class _MatmulFlops(TorchDispatchMode):
    """Counts 2*m*n*k for every matrix product executed (forward, backward and double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a = args[1] if name in ("addmm", "baddbmm") else args[0]
            self.flops += 2 * a.numel() * out.shape[-1]
        return out


def count_flops(step) -> int:
    with _MatmulFlops() as fc:
        step()
    return fc.flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = BinnConfig()
    torch.manual_seed(0)
    model = BinnModel(cfg.hidden, cfg.activation, cfg.rate_hidden, (0.0, 2.0), (-5.0, 5.0), False).to(device)
    gflops = gemm_gflops(device)
    rows = []
    for n in (4096, 16384):
        row = {"n_collocation": n}
        for name, fn in (("autograd", residual_autograd), ("fast", residual_fast)):
            step = make_step(model, fn, n, device)
            ms = time_step(step, device, args.repeats)
            flops = count_flops(step)
            row[f"ms_{name}"] = ms
            row[f"gemm_frac_{name}"] = flops / (ms * 1e-3) / (gflops * 1e9)
        row["speedup"] = row["ms_autograd"] / row["ms_fast"]
        rows.append(row)
    print(f"device {device}, torch threads {torch.get_num_threads()}, fp32 GEMM {gflops:.1f} GFLOP/s "
          f"(1024^3 matmul, median of 10)")
    print(f"{'N coll':>7} {'autograd ms':>12} {'fast ms':>9} {'speedup':>8} {'GEMM frac auto':>15} "
          f"{'GEMM frac fast':>15}")
    for r in rows:
        print(f"{r['n_collocation']:>7} {r['ms_autograd']:>12.1f} {r['ms_fast']:>9.1f} {r['speedup']:>8.2f} "
              f"{r['gemm_frac_autograd']:>15.3f} {r['gemm_frac_fast']:>15.3f}")
    out = {"device": str(device), "gemm_gflops": gflops,
           "ms_step_autograd": {str(r["n_collocation"]): r["ms_autograd"] for r in rows},
           "ms_step_fast": {str(r["n_collocation"]): r["ms_fast"] for r in rows},
           "speedup": {str(r["n_collocation"]): r["speedup"] for r in rows},
           "gemm_fraction_autograd": {str(r["n_collocation"]): r["gemm_frac_autograd"] for r in rows},
           "gemm_fraction_fast": {str(r["n_collocation"]): r["gemm_frac_fast"] for r in rows}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
