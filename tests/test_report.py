"""The results bundle's figures and one-page report."""

import html

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


def test_report_of_a_density_alone_says_what_it_has(fkpp_field, tmp_path):
    from napari_binn.pipeline import PipelineConfig, PipelineResult

    result = PipelineResult(PipelineConfig(), field=fkpp_field, metadata={"warnings": ["pixel size assumed"],
                                                                          "cancelled_in": "binn"})
    assert write_figures(result, tmp_path / "figures") == {}
    write_report(result, tmp_path, {})
    page = (tmp_path / "report.html").read_text(encoding="utf-8").replace("&#x27;", "'")
    assert f"{fkpp_field.n_frames} frames" in page and "pixel size assumed" in page
    assert "cancelled during 'binn'" in page and "Discovered equations" not in page
