"""Real screenshots of each napari-binn step, for the README and docs (run under Xvfb).

    xvfb-run -a -s "-screen 0 1800x1100x24" .venv/bin/python scripts/screenshots.py [--out docs/images]
        [--steps 8000] [--warmup 1000] [--pde-weight 1] [--models 2] [--box-um 100] [--backend operon]
        [--only-batch] [--bands BUNDLE] [--bundle BUNDLE --shot NAME.png]

Opens the synthetic sample (File > Open Sample > napari-binn), draws an ROI, previews, extracts, trains with the
demo's settings, discovers, refits the candidate forms against the data, simulates, exports and re-opens the
bundle, saving ``viewer.screenshot(canvas_only=False)`` of the whole window after each step. Then, in a fresh
viewer, the per-shape batch dock runs the whole pipeline on two regions of the scratch (one BINN each).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--pde-weight", type=float, default=1.0)
    parser.add_argument("--models", type=int, default=2, help="ensemble size (bands in the D, G plots)")
    parser.add_argument("--box-um", type=float, default=100.0)
    parser.add_argument("--backend", default="operon")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--only-batch", action="store_true", help="only the per-shape batch screenshot")
    parser.add_argument("--bands", metavar="BUNDLE", default="",
                        help="only 10_bands.png: the results dock on a saved bundle (a refined BINN, e.g. the "
                             "demo's, or an ensemble, n_models >= 2)")
    parser.add_argument("--bundle", metavar="BUNDLE", default="",
                        help="only one screenshot: the results dock on a saved bundle alone (e.g. a discovery "
                             "benchmark's --keep bundle), saved as --shot")
    parser.add_argument("--shot", default="11_bundle.png", help="the file name of the --bundle screenshot")
    parser.add_argument("--scroll-to", choices=["plots", "alternatives"], default="plots",
                        help="what the --bundle screenshot scrolls the results dock to: the plots, or the forms the "
                             "data cannot tell apart (listed under the tables after a refit)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from napari.settings import get_settings

    torch.set_num_threads(args.threads)

    settings = get_settings().application
    level = settings.gui_notification_level
    settings.gui_notification_level = "warning"  # no info toasts over the pictures (restored at the end)
    try:
        if args.bands:
            bands(Path(args.bands), out)
            return
        if args.bundle:
            bands(Path(args.bundle), out, name=args.shot, sample=False, scroll=args.scroll_to)
            return
        if not args.only_batch:
            run(args, out)
        per_shape(args, out)
    finally:
        settings.gui_notification_level = level


def pump(seconds: float = 0.3) -> None:
    """Let Qt process events for ``seconds``."""
    import napari

    app = napari.qt.get_qapp()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def wait(cond, timeout: float = 600.0) -> None:
    """Process events until ``cond()`` is true (TimeoutError after ``timeout`` seconds)."""
    end = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > end:
            raise TimeoutError("step did not finish in time")
        pump(0.05)


def scroll_to(widget) -> None:
    """Scroll the dock that holds ``widget`` (its scroll area, ``_forms.scrolling_layout``) until it is in view."""
    from qtpy.QtWidgets import QScrollArea

    parent = widget.parent()
    while parent is not None and not isinstance(parent, QScrollArea):
        parent = parent.parent()
    if parent is not None:
        parent.ensureWidgetVisible(widget, 0, 0)


def save_window(viewer, path: Path) -> None:
    """The whole napari window (canvas and docks) as a PNG."""
    from PIL import Image

    img = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(np.asarray(img)).save(path)
    print(f"saved {path}", flush=True)


def run(args: argparse.Namespace, out: Path) -> None:
    import napari

    from napari_binn._napari._state import LAYER_NAMES, get_state

    def shot(name: str, dock=None, scroll=None) -> None:
        if dock is not None:
            dock.raise_()
        viewer.reset_view()
        pump(1.0)
        if scroll is not None:  # a widget low in a scrolling dock (the results plots)
            scroll_to(scroll)
            pump(0.3)
        save_window(viewer, out / name)

    viewer = napari.Viewer(title="napari-binn")
    viewer.window.resize(1750, 1050)
    viewer.open_sample("napari-binn", "synthetic_scratch")
    image = viewer.layers[0]
    dd, dens = viewer.window.add_plugin_dock_widget("napari-binn", "Density extraction")
    td, train = viewer.window.add_plugin_dock_widget("napari-binn", "BINN training", tabify=True)
    rd, res = viewer.window.add_plugin_dock_widget("napari-binn", "Equations and results", tabify=True)
    state = get_state(viewer)
    dens.layer_combo.value = image.name
    dens.box_um.value = args.box_um
    viewer.dims.set_current_step(0, 1)  # 4 h: the scratch is still open

    # 1. ROI + live preview
    ny, nx = image.data.shape[-2:]
    roi = dens.new_roi_layer()
    roi.add_polygons([np.array([[10, 10], [10, nx - 60], [ny - 10, nx - 10], [ny - 10, 10]], float)])
    roi.mode = "pan_zoom"
    dens.refresh_preview()
    wait(lambda: LAYER_NAMES["preview"] in viewer.layers and not dens._preview_job.running)
    viewer.layers.selection.active = image
    shot("01_density_preview.png", dd)

    # 2. extract all frames
    dens.extract()
    wait(lambda: state.field is not None)
    viewer.layers[LAYER_NAMES["roi"]].visible = False
    shot("02_density_extracted.png", dd)

    # 3. training with live plots (mid-run and done)
    td.raise_()
    train.steps.value = args.steps
    train.n_models.value = args.models
    train.warmup.value = args.warmup
    train.pde_weight.value = args.pde_weight
    train.snapshot_every.value = 100
    job = train.train()
    wait(lambda: job.token is not None and train.progress.value() >= 40)
    shot("03_training_live.png", td)
    wait(lambda: state.fit is not None, timeout=3600)
    pump(2.0)
    shot("04_training_done.png", td)

    # 4. equations
    rd.raise_()
    res.backend.value = args.backend
    res.discover()
    wait(lambda: res.job is not None and not res.job.running, timeout=1800)
    shot("05_equations.png", rd)

    # 5. candidate forms refitted against the data (BIC choice), simulated over the data, residual, N(t), QC
    res.sim_model.value = "closed form refitted to the data"
    res.simulate()
    wait(lambda: res.job is not None and not res.job.running)
    viewer.layers[LAYER_NAMES["density"]].visible = False
    viewer.dims.set_current_step(0, 3)  # 12 h: the simulated front is half-way
    shot("06_simulation.png", rd, scroll=res.figure)
    viewer.layers[LAYER_NAMES["simulated"]].visible = False
    viewer.layers[LAYER_NAMES["residual"]].visible = True
    shot("07_residual.png", rd, scroll=res.figure)

    # 6. export, then re-open the bundle in a fresh viewer
    bundle = Path(tempfile.mkdtemp()) / "scratch_results"
    res.bundle_path.value = str(bundle)
    res.export()
    wait(lambda: not res.job.running)
    for w in (dens, train, res):
        w.shutdown()
    viewer.close()
    viewer2 = napari.Viewer(title="napari-binn: re-opened bundle")
    viewer2.window.resize(1750, 1050)
    _, res2 = viewer2.window.add_plugin_dock_widget("napari-binn", "Equations and results")
    viewer2.open_sample("napari-binn", "synthetic_scratch")
    viewer2.layers[1].visible = False
    viewer2.open(str(bundle), plugin="napari-binn")
    viewer = viewer2
    wait(lambda: get_state(viewer2).equations is not None)
    viewer2.dims.set_current_step(0, 6)
    shot("08_bundle_reopened.png", scroll=res2.figure)
    res2.shutdown()
    viewer2.close()


def bands(bundle: Path, out: Path, name: str = "10_bands.png", sample: bool = True, scroll: str = "plots") -> None:
    """The results dock on a bundle whose BINN has a band (refined, or an ensemble): D(u), G(u) with their ± 2 sd
    bands, the densities the data leave undetermined greyed, and the library rows in the tables; over the built-in
    sample's images (``sample``, for the demo's bundle) or the bundle's layers alone."""
    import napari

    from napari_binn._napari._state import get_state

    viewer = napari.Viewer(title="napari-binn: " + bundle.name)
    viewer.window.resize(1750, 1050)
    _, res = viewer.window.add_plugin_dock_widget("napari-binn", "Equations and results")
    if sample:
        viewer.open_sample("napari-binn", "synthetic_scratch")
        viewer.layers[1].visible = False
    viewer.open(str(bundle), plugin="napari-binn")
    wait(lambda: get_state(viewer).equations is not None)
    viewer.dims.set_current_step(0, 6)
    viewer.reset_view()
    pump(3.0)
    scroll_to(res.alternatives if scroll == "alternatives" else res.figure)  # the dock scrolls: show that part
    pump(0.5)
    save_window(viewer, out / name)
    res.shutdown()
    viewer.close()


def per_shape(args: argparse.Namespace, out: Path) -> None:
    """The per-shape batch dock after running the top and bottom halves of the scratch, one bundle each."""
    import napari

    viewer = napari.Viewer(title="napari-binn: one analysis per shape")
    viewer.window.resize(1750, 1050)
    viewer.open_sample("napari-binn", "synthetic_scratch")
    image = viewer.layers[0]
    _, dens = viewer.window.add_plugin_dock_widget("napari-binn", "Density extraction")
    _, train = viewer.window.add_plugin_dock_widget("napari-binn", "BINN training", tabify=True)
    _, res = viewer.window.add_plugin_dock_widget("napari-binn", "Equations and results", tabify=True)
    bd, batch = viewer.window.add_plugin_dock_widget("napari-binn", "Per-shape batch", tabify=True)
    dens.layer_combo.value = image.name
    dens.box_um.value = args.box_um
    train.warmup.value = args.warmup
    train.pde_weight.value = args.pde_weight
    res.backend.value = args.backend
    viewer.dims.set_current_step(0, 1)  # 4 h: the scratch is open
    ny, nx = image.data.shape[-2:]
    roi = dens.new_roi_layer()
    roi.add_rectangles(np.array([[[10, 10], [ny // 2 - 5, nx - 10]], [[ny // 2 + 5, 10], [ny - 10, nx - 10]]],
                                float))
    roi.mode = "pan_zoom"
    batch.folder.value = str(Path(tempfile.mkdtemp()) / "wound_regions")
    batch.steps.value = args.steps
    batch.n_models.value = 1
    bd.raise_()
    pump(1.0)
    job = batch.run()
    wait(lambda: not job.running, timeout=1800.0)
    for layer in viewer.layers:
        if (layer.metadata or {}).get("napari_binn_output") == "preview":
            layer.visible = False
    batch.table.selectRow(0)  # selects shape 1 in the ROI layer
    roi.mode = "select"
    viewer.layers.selection.active = roi
    viewer.reset_view()
    pump(1.5)
    save_window(viewer, out / "09_batch_per_shape.png")
    for w in (dens, train, res, batch):
        w.shutdown()
    viewer.close()


if __name__ == "__main__":
    main()
