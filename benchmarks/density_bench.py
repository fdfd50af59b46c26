"""Density extraction benchmark: speed and memory on a 100-frame 1024x1024 uint16 stack, accuracy vs drawn counts.

1. Accuracy: nuclei stacks rendered (``render_microscopy``) from a spreading front whose density runs from 0 to
   confluence (1700 cells/mm²), 3 seeds, 50 µm boxes: relative L2 error of the extracted density against the
   exact number of cells drawn per box (all boxes, all frames).
2. Another renderer's nuclei (``--independent``, also run by default): ``nuclei_renderer.py``, written apart from
   ``render_microscopy`` and unlike it (flat-topped ellipses packed without overlap, shot noise, a camera offset).
   One frame per density (100 ... 3000 cells/mm², 500 µm square, 50 µm boxes); the count ratio (cells counted /
   cells drawn in the boxes) per density, for several settings: plain (10 µm nuclei at 1 µm pixels), a camera
   offset of 1000 counts with the signal fading to 40% over the movie (bleaching), dim cells (brightness CV
   0.7), 14 µm nuclei at 0.65 µm pixels and 8 µm nuclei at 2 µm pixels (both with the default diameter range
   of 6-16 µm).
3. Speed/memory: a 100-frame 1024x1024 uint16 nuclei stack (~200 MB, 50 µm boxes of 32 px at 1.5625 µm) is
   written to a temporary TIFF, opened lazily (``read_stack(lazy=True)``, falling back to ``tifffile.memmap``)
   and run through ``nuclei`` and ``confluence`` in a fresh child process per run, which reports its wall time,
   CPU time and peak resident memory (``ru_maxrss``). Wall times are medians of ``--repeats`` runs; the machine
   may be shared, so CPU seconds are reported too. The big stack's nuclei error is ``rel_l2_error``.

Usage: python benchmarks/density_bench.py [--repeats 3] [--frames 100] [--size 1024] [--independent]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_binn.density import extract_density, preview_frame
from napari_binn.field import DensityField
from napari_binn.io import Stack
from napari_binn.synthetic.render import render_microscopy
from nuclei_renderer import uniform_frames

CONFLUENCE = 1700.0  # cells/mm²

_CHILD = r"""
import json, resource, sys, time
import numpy as np
path, method, px = sys.argv[1], sys.argv[2], float(sys.argv[3])
from napari_binn.density import extract_density, preview_frame
from napari_binn.io import Stack
try:
    from napari_binn.io import read_stack
    stack = read_stack(path, pixel_size_um=px, frame_interval_h=0.5, lazy=True)
    opened = "read_stack(lazy=True)"
except Exception as exc:  # read_stack missing or failing: plain memory map
    import tifffile
    data = tifffile.memmap(path, mode="r")
    stack = Stack(data, px, 0.5 * np.arange(data.shape[0]))
    opened = f"tifffile.memmap ({type(exc).__name__})"
t0, c0 = time.perf_counter(), time.process_time()
field = extract_density(stack, method=method, box_um=50.0)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
np.save(sys.argv[4], field.u)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "opened": opened}))
"""


def front_field(n_boxes: int, frames: int, box_um: float = 50.0, seed: int = 0) -> DensityField:
    """A population spreading from the left edge: 0 to confluence across the domain, front moving in time."""
    x = box_um * (np.arange(n_boxes) + 0.5)
    width = box_um * n_boxes
    rng = np.random.default_rng(seed)
    bumps = 1.0 + 0.1 * rng.standard_normal((n_boxes, 1))
    t = np.linspace(0.2, 0.8, frames)
    u = np.stack([np.clip(CONFLUENCE / (1 + np.exp((x[None, :] - f * width) / (0.12 * width))) * bumps, 0, CONFLUENCE)
                  for f in t])
    return DensityField(u, np.ones((n_boxes, n_boxes), bool), x, x, 0.5 * np.arange(frames), "cells/mm²")


def rel_l2(est: np.ndarray, truth: np.ndarray) -> float:
    m = np.isfinite(truth) & np.isfinite(est)
    return float(np.linalg.norm((est - truth)[m]) / np.linalg.norm(truth[m]))


def accuracy(seeds=(0, 1, 2)) -> dict[int, float]:
    out = {}
    for seed in seeds:
        r = render_microscopy(front_field(16, 5, seed=seed), pixel_size_um=2.0, seed=seed)
        f = extract_density(r.stack, roi=r.pixel_mask, method="nuclei", box_um=50.0)
        out[seed] = rel_l2(f.u, r.true_density)
    return out


INDEPENDENT_DENSITIES = (100, 250, 500, 1000, 1500, 2000, 2500, 3000)  # cells/mm², one frame each
INDEPENDENT_SETTINGS = {
    "plain (10 µm nuclei, 1 µm pixels)": {},
    "camera offset 1000, signal fading to 40%": {"offset": 1000.0, "fade_to": 0.4},
    "dim cells (brightness CV 0.7)": {"brightness_cv": 0.7},
    "14 µm nuclei, 0.65 µm pixels": {"diameter_um": 14.0, "pixel_size_um": 0.65, "side_um": 300.0},
    "8 µm nuclei, 2 µm pixels": {"diameter_um": 8.0, "pixel_size_um": 2.0},
}


def independent_ratios(seed: int = 0) -> dict[str, list[float]]:
    """Cells counted / cells drawn inside the whole boxes, per density, for each setting."""
    out = {}
    for name, kw in INDEPENDENT_SETTINGS.items():
        frames, centres = uniform_frames(INDEPENDENT_DENSITIES, seed=seed, **kw)
        stack = Stack(frames, kw.get("pixel_size_um", 1.0), np.arange(len(frames), dtype=float), name="independent")
        fld = extract_density(stack, method="nuclei", box_um=50.0)
        edge_px = fld.shape[1] * fld.metadata["box_px"]  # boxes start at the corner; the rest is cut off
        area_mm2 = (fld.metadata["box_um"] / 1000.0) ** 2
        counted = np.nansum(fld.u, axis=(1, 2)) * area_mm2
        drawn = np.array([np.sum((p[:, 0] < edge_px) & (p[:, 1] < edge_px)) for p in centres])
        out[name] = [round(float(x), 3) for x in counted / np.maximum(drawn, 1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (a multiple of 32)")
    ap.add_argument("--independent", action="store_true", help="run only part 2 (another renderer's nuclei)")
    args = ap.parse_args()

    ratios = independent_ratios()
    print("another renderer's nuclei: cells counted / cells drawn at "
          + ", ".join(f"{d}" for d in INDEPENDENT_DENSITIES) + " cells/mm²")
    for name, r in ratios.items():
        print(f"  {name:<44}" + " ".join(f"{x:6.3f}" for x in r))
    if args.independent:
        print(json.dumps({"independent_count_ratio": ratios}))
        return

    per_seed = accuracy()
    print("accuracy, 50 µm boxes, 0..confluence, rendered nuclei (px 2 µm, 16x16 boxes, 5 frames)")
    for s, e in per_seed.items():
        print(f"  seed {s}: rel L2 error {e:.4f}")

    px, b = 1.5625, 32  # 50 µm boxes of 32 px
    n = args.size // b
    t0 = time.perf_counter()
    r = render_microscopy(front_field(n, args.frames, seed=7), pixel_size_um=px, seed=7)
    render_s = time.perf_counter() - t0
    truth = r.true_density
    preview_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        preview_frame(r.stack.data[args.frames // 2], args.frames // 2, method="nuclei", box_um=50.0,
                      pixel_size_um=px)
        preview_s.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_nuclei.tif"
        import tifffile

        tifffile.imwrite(path, r.stack.data, photometric="minisblack")
        size_mb = path.stat().st_size / 2**20
        del r
        runs: dict[str, list[dict]] = {"nuclei": [], "confluence": []}
        u_out = Path(tmp) / "u.npy"
        env = dict(os.environ)
        for _ in range(args.repeats):
            for method in runs:
                proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), method, str(px), str(u_out)],
                                      capture_output=True, text=True, env=env, check=False)
                if proc.returncode:
                    sys.exit(f"child failed ({method}):\n{proc.stderr}")
                runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if method == "nuclei":
                    big_err = rel_l2(np.load(u_out), truth)

    def med(method, key):
        return float(np.median([x[key] for x in runs[method]]))

    print(f"\nstack: {args.frames} x {args.size} x {args.size} uint16, {size_mb:.0f} MB TIFF "
          f"(rendered in {render_s:.1f} s), opened with {runs['nuclei'][0]['opened']}")
    print(f"{'method':<12}{'wall s (median)':>17}{'all runs':>26}{'cpu s':>9}{'peak RSS MB':>13}")
    for m in runs:
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs[m])
        print(f"{m:<12}{med(m, 'wall_s'):>17.2f}{walls:>26}{med(m, 'cpu_s'):>9.1f}"
              f"{max(x['peak_rss_mb'] for x in runs[m]):>13.0f}")
    print(f"nuclei rel L2 error on the big stack: {big_err:.4f}")
    print(f"preview_frame (nuclei, one {args.size}x{args.size} frame): median {np.median(preview_s):.3f} s of 5")
    result = {
        "seconds_nuclei": round(med("nuclei", "wall_s"), 3),
        "seconds_confluence": round(med("confluence", "wall_s"), 3),
        "cpu_seconds_nuclei": round(med("nuclei", "cpu_s"), 3),
        "cpu_seconds_confluence": round(med("confluence", "cpu_s"), 3),
        "peak_rss_mb": round(max(x["peak_rss_mb"] for m in runs for x in runs[m]), 1),
        "rel_l2_error": round(big_err, 4),
        "preview_seconds": round(float(np.median(preview_s)), 4),
        "rel_l2_error_per_seed": {str(k): round(v, 4) for k, v in per_seed.items()},
        "rel_l2_error_max_seed": round(max(per_seed.values()), 4),
        "independent_count_ratio": ratios,
        "frames": args.frames, "size_px": args.size, "stack_mb": round(size_mb, 1), "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
