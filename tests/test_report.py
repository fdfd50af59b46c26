"""The results bundle's figures and one-page report."""

import html

import numpy as np

from napari_binn.report import write_figures, write_report
from napari_binn.symbolic.expression import equation_text


def test_figures_and_report_of_a_whole_run(pipeline_run, tmp_path):
    result, _ = pipeline_run
    files = write_figures(result, tmp_path / "figures")
    assert set(files) == {"rates.png", "counts.png", "snapshots.png"}
    assert "closed form" in files["snapshots.png"]
    for name in files:
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = write_figures(result, tmp_path / "again")
    assert all((tmp_path / "figures" / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in again)
    write_report(result, tmp_path, {f"figures/{n}": d for n, d in files.items()})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert equation_text("D", result.equations.D) in page
    assert "Quality control" in page and "fisher_kpp" in page
    assert all(f"Mechanistic fit: {name}" in page for name in result.mechanistic)
    assert "<img src='figures/rates.png'" in page
    # the refinement through the solver (on in the fixture's configuration) and its notes
    info = result.fit.metadata["refine"]
    assert f"misfit {info['misfit_start']:.4g} -&gt; {info['misfit']:.4g}" in page
    assert all(html.escape(note) in page for note in info["notes"]) and info["notes"]
    # the refitted constants with their units (read from where each stands in the closed form)
    refit = result.metadata["closed_form_refitted"]
    units = result.mechanistic["closed form (refitted)"].units
    assert any(units.get(k) for k in refit)
    for name, value in refit.items():
        assert html.escape(f"{name} = {value:.4g} {units.get(name, '')}".rstrip()) in page


def test_report_of_a_density_alone_says_what_it_has(fkpp_field, tmp_path):
    from napari_binn.pipeline import PipelineConfig, PipelineResult

    result = PipelineResult(PipelineConfig(), field=fkpp_field, metadata={"warnings": ["pixel size assumed"],
                                                                          "cancelled_in": "binn"})
    assert write_figures(result, tmp_path / "figures") == {}
    write_report(result, tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8").replace("&#x27;", "'")
    assert f"{fkpp_field.n_frames} frames" in page and "pixel size assumed" in page
    assert "cancelled during 'binn'" in page and "Discovered equations" not in page
    assert "nuclei found at the scale of" not in page  # a field not counted from nuclei images
    assert "pixel size:" not in page  # nor read from a stack with a recorded calibration


def test_report_says_where_the_stacks_calibration_came_from(tmp_path):
    from napari_binn.density import extract_density
    from napari_binn.io import read_stack, write_stack_tiff
    from napari_binn.pipeline import PipelineConfig, PipelineResult

    frames = np.zeros((3, 60, 60), np.uint16)
    frames[:, 20:24, 20:24] = 500
    stack = read_stack(write_stack_tiff(tmp_path / "s.tif", frames, 2.0, np.array([0.0, 0.5, 1.0])))
    field = extract_density(stack, method="nuclei", box_um=40.0)
    (tmp_path / "r").mkdir()
    write_report(PipelineResult(PipelineConfig(), field=field), tmp_path / "r", {})
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "pixel size: from ImageJ metadata (XResolution 0.5 px per um); frame times: from ImageJ Info" in page


def test_report_says_how_the_nuclei_were_counted(tmp_path):
    from napari_binn.density import extract_density
    from napari_binn.pipeline import PipelineConfig, PipelineResult
    from napari_binn.synthetic.sample import spreading_sample

    sample = spreading_sample(seed=0)
    field = extract_density(sample.rendered.stack, roi=sample.rendered.pixel_mask, method="nuclei", box_um=100.0)
    write_report(PipelineResult(PipelineConfig(), field=field), tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    thr = field.metadata["threshold_used"]
    assert f"nuclei found at the scale of 9.8 µm nuclei, threshold {thr:.3g} noise sd" in page


def test_report_says_how_many_held_out_candidates_stopped_at_the_budget(pipeline_run, tmp_path):
    import dataclasses

    result, _ = pipeline_run
    rows = [{"D": "1", "G": "2", "converged": True, "simulations": 30},
            {"D": "3", "G": "4", "converged": False, "simulations": 100},
            {"D": "5", "G": "6", "converged": False, "simulations": 100}]
    meta = {**result.metadata, "refit_candidates": rows,
            "holdout": {"frames": 2, "level": 0.05, "margin": 0.05, "n_blocks": 6, "block_boxes": 4, "max_evals": 100}}
    write_report(dataclasses.replace(result, metadata=meta), tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "2 of 3 candidates reached the budget of 100 simulations per fit before converging" in page
    rows[2]["simulations"] = 40  # stopped short of the budget (an optimiser failure): not counted as reaching it
    write_report(dataclasses.replace(result, metadata=meta), tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "1 of 3 candidates reached the budget of 100 simulations per fit before converging" in page
    rows[1]["converged"] = rows[2]["converged"] = True
    write_report(dataclasses.replace(result, metadata=meta), tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Forms chosen by the last 2 frames held out" in page and "reached the budget" not in page
    assert "unless a library form" not in page  # a bundle from before the switch's rule was recorded
    # the in-sample switch's rule as the run used it
    meta["holdout"].update(bic_switch=100.0, tested_switch=10.0, switch_level=0.01)
    write_report(dataclasses.replace(result, metadata=meta), tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert ("the headline has the fewest constants among the rest, unless a library form among them fits the earlier "
            "frames better by a BIC difference over 100, or over 10 where a paired t test over the same blocks finds "
            "it better at level 0.01") in " ".join(page.split())


def test_a_learned_delay_is_drawn_and_reported(fkpp_field, pipeline_config, pipeline_run, tmp_path):
    """With binn.use_delay the report shows T(t) next to D(u) and G(u), and says its values and that the closed
    forms are refitted under it."""
    import matplotlib.image

    from napari_binn.jobs import run_job
    from napari_binn.pipeline import run_pipeline

    cfg = pipeline_config()
    cfg.binn = cfg.binn.replace(use_delay=True)
    result = run_job(run_pipeline(fkpp_field, cfg))
    assert result.mechanistic["closed form (refitted)"].metadata["time_factor"] == "given"
    files = write_figures(result, tmp_path / "figures")
    write_report(result, tmp_path, {f"figures/{n}": d for n, d in files.items()})
    page = html.unescape((tmp_path / "report.html").read_text(encoding="utf-8"))
    t0, t1 = fkpp_field.t_h[0], fkpp_field.t_h[-1]
    assert "T(t), the learned delay" in page and f"at {t0:g} h" in page and f"at {t1:g} h" in page
    plain = write_figures(pipeline_run[0], tmp_path / "plain")  # the same run without a delay
    assert "rates.png" in plain
    width = {d: matplotlib.image.imread(tmp_path / d / "rates.png").shape[1] for d in ("figures", "plain")}
    assert width["figures"] > 1.3 * width["plain"]  # a third panel: T(t)
    plain_page = tmp_path / "plain_report"
    plain_page.mkdir()
    write_report(pipeline_run[0], plain_page, {})
    assert "learned delay" not in (plain_page / "report.html").read_text(encoding="utf-8")
