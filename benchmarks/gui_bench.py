"""Training speed inside the napari training dock (thread worker, live plots) vs headless ``train_binn``.

Same density field, same BinnConfig, same process; the order alternates and each figure is the median of
``--repeats`` runs. Speed = Adam steps per second measured between the first and the last loss event (so the
one-off set-up before the first step is excluded from both). Run under Xvfb:

    xvfb-run -a .venv/bin/python benchmarks/gui_bench.py [--steps 300] [--repeats 3] [--threads 1]

On a CPU shared with other busy processes, torch's default of one intra-op thread per core can run many times
slower than one thread (threads spin-waiting for each other); ``--threads 1`` compares like with like there.

Prints a table and, as the last line, JSON: headless_steps_per_s, gui_steps_per_s, ratio (target >= 0.9),
torch_threads_main, torch_threads_worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def bench_field():
    """A logistic front over 24 h on a 16 x 20 grid of 50 µm boxes, 9 frames (cells/mm²)."""
    from napari_binn.field import DensityField

    T, ny, nx, dx = 9, 16, 20, 50.0
    t = np.linspace(0.0, 24.0, T)
    x = (np.arange(nx) + 0.5) * dx
    y = (np.arange(ny) + 0.5) * dx
    front = 200.0 + 12.0 * t
    u = 2000.0 / (1.0 + np.exp((x[None, None, :] - front[:, None, None]) / 60.0)) * np.ones((1, ny, 1))
    return DensityField(u, np.ones((ny, nx), bool), x, y, t, "cells/mm²", 2000.0, {})


def _rate(times_steps: list[tuple[float, int]]) -> float:
    (t0, s0), (t1, s1) = times_steps[0], times_steps[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else float("nan")


def headless(field, config) -> float:
    from napari_binn.binn import train_binn

    marks: list[tuple[float, int]] = []
    for ev in train_binn(field, config):
        if "losses" in ev.data:
            marks.append((time.perf_counter(), ev.step))
    return _rate(marks)


def in_gui(viewer, widget, field, config, app) -> tuple[float, int | None]:
    from qtpy.QtCore import QEventLoop

    from napari_binn._napari._state import get_state

    get_state(viewer).update(field=field)
    marks: list[tuple[float, int]] = []
    job = widget.train(config)
    original = job._on_event

    def record(ev):
        if "losses" in ev.data:
            marks.append((time.perf_counter(), ev.step))
        original(ev)

    job._on_event = record
    loop = QEventLoop()  # idle in Qt's event loop, as napari does (a polling loop would compete for the GIL)
    job.worker.finished.connect(loop.quit)
    if job.running:
        loop.exec()
    for _ in range(50):
        app.processEvents()
    return _rate(marks), widget.worker_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for both runs (0 = torch's default)")
    args = parser.parse_args()

    import napari
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from napari_binn._napari._training_widget import TrainingWidget
    from napari_binn.binn import BinnConfig

    config = BinnConfig(hidden=(64, 64, 64), steps=args.steps, warmup_steps=20, n_collocation=2048, batch_size=2048,
                        log_every=10, snapshot_every=50, val_every=10, device="cpu", seed=0)
    field = bench_field()
    viewer = napari.Viewer(show=False)
    app = napari.qt.get_qapp()
    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget)
    headless(field, config.replace(steps=30))  # warm up torch in this process
    head, gui, worker_threads = [], [], None
    for i in range(args.repeats):
        order = ("gui", "headless") if i % 2 else ("headless", "gui")
        for kind in order:
            if kind == "headless":
                head.append(headless(field, config))
            else:
                rate, worker_threads = in_gui(viewer, widget, field, config, app)
                gui.append(rate)
    widget.shutdown()
    viewer.close()
    h, g = statistics.median(head), statistics.median(gui)
    print(f"{'run':<26}{'steps/s (median)':>18}{'all runs':>30}")
    print(f"{'headless train_binn':<26}{h:>18.1f}{str([round(v, 1) for v in head]):>30}")
    print(f"{'napari training dock':<26}{g:>18.1f}{str([round(v, 1) for v in gui]):>30}")
    print(f"ratio gui/headless = {g / h:.3f} (target >= 0.9); torch threads: main {torch.get_num_threads()}, "
          f"worker before fix {worker_threads}")
    print(json.dumps({"headless_steps_per_s": h, "gui_steps_per_s": g, "ratio": g / h, "steps": args.steps,
                      "repeats": args.repeats, "torch_threads_main": torch.get_num_threads(),
                      "torch_threads_worker": worker_threads, "threads_option": args.threads,
                      "headless_runs": head, "gui_runs": gui}))


if __name__ == "__main__":
    main()
