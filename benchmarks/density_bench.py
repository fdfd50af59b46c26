"""Density extraction benchmark: speed and memory on a 100-frame 1024x1024 uint16 stack, accuracy vs drawn counts.

1. Accuracy: nuclei stacks rendered (``render_microscopy``) from a spreading front whose density runs from 0 to
   confluence (1700 cells/mm²), 3 seeds, 50 µm boxes: relative L2 error of the extracted density against the
   exact number of cells drawn per box (all boxes, all frames).
2. Another renderer's nuclei (``--independent``, also run by default): a drawing written apart from
   ``render_microscopy`` and unlike it: nuclei are flat-topped ellipses with soft edges (lognormal sizes,
   eccentricity up to 25%, brightness CV 0.3), packed without overlap by random sequential addition (so
   neighbours can sit closer than one mean diameter across their short axes), blurred, with photon shot noise
   over a background of 300 photons and a camera offset with read noise. One frame per density (100 ... 3000
   cells/mm², 500 µm square, 50 µm boxes); the count ratio (cells counted / cells drawn in the boxes) per density,
   for several settings: plain, a camera offset of 1000 counts with the signal fading to 40% over the movie
   (bleaching), dim cells (brightness CV 0.7), 14 µm nuclei at 0.65 µm pixels and 8 µm nuclei at 2 µm pixels
   (both with the default diameter range of 6-16 µm).
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
from scipy import ndimage as ndi

from napari_binn.density import extract_density, preview_frame
from napari_binn.field import DensityField
from napari_binn.synthetic.render import render_microscopy

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


def _pack_ellipses(n: int, side_px: float, radius_px: float, rng: np.random.Generator,
                   eccentricity: float = 0.25, max_tries: int = 400_000) -> np.ndarray:
    """Up to ``n`` ellipses (row, col, semi-axis a, semi-axis b, angle) placed one by one at random where they do
    not overlap their neighbours (judged along the line between centres)."""
    placed: list[tuple[float, float, float, float, float]] = []
    buckets: dict[tuple[int, int], list[int]] = {}
    cell = 3.0 * radius_px
    for _ in range(max_tries):
        if len(placed) >= n:
            break
        r, c = rng.uniform(0.0, side_px, 2)
        size = radius_px * rng.lognormal(0.0, 0.15)
        stretch = 1.0 + eccentricity * rng.uniform(-1.0, 1.0)
        a, b, ang = size * stretch, size / stretch, rng.uniform(0.0, np.pi)
        key = (int(r // cell), int(c // cell))
        clash = False
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                for j in buckets.get((key[0] + dr, key[1] + dc), ()):
                    r2, c2, a2, b2, ang2 = placed[j]
                    dist = np.hypot(r2 - r, c2 - c)
                    towards = np.arctan2(c2 - c, r2 - r)
                    reach = sum(1.0 / np.hypot(np.cos(towards - t) / aa, np.sin(towards - t) / bb)
                                for aa, bb, t in ((a, b, ang), (a2, b2, ang2)))
                    if dist < reach:
                        clash = True
                        break
                if clash:
                    break
            if clash:
                break
        if not clash:
            buckets.setdefault(key, []).append(len(placed))
            placed.append((r, c, a, b, ang))
    return np.array(placed).reshape(-1, 5)


def independent_stack(densities=INDEPENDENT_DENSITIES, *, diameter_um: float = 10.0, pixel_size_um: float = 1.0,
                      side_um: float = 500.0, brightness_cv: float = 0.3, photons: float = 400.0,
                      background: float = 300.0, offset: float = 100.0, fade_to: float = 1.0, seed: int = 0):
    """One uint16 frame per density, drawn as described in the module docstring -> (Stack, cells drawn per frame,
    nucleus centres per frame in pixels)."""
    from napari_binn.io import Stack

    rng = np.random.default_rng(seed)
    side = int(round(side_um / pixel_size_um))
    radius = 0.5 * diameter_um / pixel_size_um
    frames, centres = [], []
    fades = np.linspace(1.0, fade_to, len(densities))
    for dens, fade in zip(densities, fades):
        cells = _pack_ellipses(rng.poisson(dens * (side_um / 1000.0) ** 2), side, radius, rng)
        img = np.zeros((side, side))
        h = int(2 * radius) + 3
        for r, c, a, b, ang in cells:
            r0, c0 = int(r), int(c)
            ys, xs = np.mgrid[max(0, r0 - h):min(side, r0 + h + 1), max(0, c0 - h):min(side, c0 + h + 1)]
            along = ((ys - r) * np.cos(ang) + (xs - c) * np.sin(ang)) / a
            across = (-(ys - r) * np.sin(ang) + (xs - c) * np.cos(ang)) / b
            edge = 1.0 / (1.0 + np.exp(6.0 * (np.hypot(along, across) - 1.0)))
            img[ys, xs] = np.maximum(img[ys, xs], fade * photons * rng.lognormal(0.0, brightness_cv) * edge)
        img = ndi.gaussian_filter(img, 1.2 / pixel_size_um) + background
        img = rng.poisson(img) + rng.normal(offset, 3.0, img.shape)
        frames.append(np.clip(np.rint(img), 0, 65535).astype(np.uint16))
        centres.append(cells[:, :2])
    stack = Stack(np.stack(frames), pixel_size_um, np.arange(len(frames), dtype=float), name="independent")
    return stack, centres


def independent_ratios(seed: int = 0) -> dict[str, list[float]]:
    """Cells counted / cells drawn inside the whole boxes, per density, for each setting."""
    out = {}
    for name, kw in INDEPENDENT_SETTINGS.items():
        stack, centres = independent_stack(seed=seed, **kw)
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
