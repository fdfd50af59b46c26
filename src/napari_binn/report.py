"""Figures (PNG) and the one-page HTML report of a results bundle. Matplotlib with the Agg backend only."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_figures", "write_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _rates_figure(result, path: Path) -> None:
    plt = _plt()
    fit, eq = result.fit, result.equations
    u = fit.u_grid(200, central=False)
    lo, hi = fit.density_range()
    from .pipeline import learned_delay, refitted_delay

    delay, delay_refit = learned_delay(result), refitted_delay(result)
    fig, axes = plt.subplots(1, 2 if delay is None else 3, figsize=(9 if delay is None else 13, 3.6),
                             constrained_layout=True)
    if delay is not None:  # the learned delay, and the refitted closed form's own when it holds one (refit.delay)
        t = np.linspace(float(result.field.t_h[0]), float(result.field.t_h[-1]), 200)
        if delay_refit is None:
            axes[2].plot(t, delay(t), color="C0", lw=2, label="BINN's learned delay (held in every refit)")
        else:
            axes[2].plot(t, delay(t), color="C0", lw=2, label="BINN's learned delay")
            axes[2].plot(t, delay_refit(t), "--", color="C3", lw=1.5,
                         label=f"refitted closed form's: 1 - exp(-t/{result.metadata['refit_delay']['tau_h']:.3g} h)")
        axes[2].set_ylim(0.0, 1.05)
        axes[2].set_xlabel("time  [h]")
        axes[2].set_ylabel("T(t)")
        axes[2].legend(fontsize=7)
    for ax, key, label in ((axes[0], "D", "D(u)  [µm²/h]"), (axes[1], "G", "G(u)  [1/h]")):
        ens = fit.D_ensemble(u) if key == "D" else fit.G_ensemble(u)
        mean = ens.mean(0)
        ax.plot(u, mean, color="C0", lw=2, label=f"BINN (mean of {ens.shape[0]})")
        sd = fit.band_sd(key, u)
        if sd is not None:
            ax.fill_between(u, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.25, lw=0, label="BINN ± 2 sd")
        det = fit.determined_range(key)
        for a, b in ([(u[0], u[-1])] if det is None else [(u[0], det[0]), (det[1], u[-1])]):
            if b > a:
                ax.axvspan(a, b, color="0.55", alpha=0.3, lw=0, zorder=0.5,
                           label="not determined" if a == u[0] or det is None else None)
        f = getattr(eq, key, None) if eq is not None else None
        if f is not None:
            with np.errstate(all="ignore"):
                ax.plot(u, np.broadcast_to(_eval(f, u), u.shape),
                        "--", color="C3", lw=1.5, label=f"closed form: {f.text}")
        ax.axvspan(lo, hi, color="0.9", zorder=0, label="central 90% of data")
        ax.set_xlabel(f"density u  [{fit.units.get('u', '')}]")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eval(f, u):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(f(u), dtype=float)


def _counts_figure(result, path: Path) -> None:
    from .qc import total_count

    plt = _plt()
    fld = result.field
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    obs_ok = fld.observed
    n_obs = total_count(np.where(obs_ok, fld.u, np.nan), fld.mask, fld.dx_um, fld.units)
    ax.plot(fld.t_h, n_obs, "ko", label="observed")
    for i, (name, arr) in enumerate(result.simulations.items()):
        ok = obs_ok & np.isfinite(arr)
        ax.plot(fld.t_h, total_count(np.where(ok, arr, np.nan), fld.mask, fld.dx_um, fld.units), "-",
                color=f"C{i}", label=name)
    unit = "cells" if fld.units == "cells/mm²" else f"{fld.units} x mm²"
    ax.set_xlabel("time  [h]")
    ax.set_ylabel(f"N(t)  [{unit}]")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _snapshots_figure(result, name: str, path: Path) -> None:
    plt = _plt()
    fld = result.field
    sim = result.simulations[name]
    frames = sorted({0, fld.n_frames // 2, fld.n_frames - 1})
    extent = (fld.x_um[0] - fld.dx_um / 2, fld.x_um[-1] + fld.dx_um / 2,
              fld.y_um[-1] + fld.dx_um / 2, fld.y_um[0] - fld.dx_um / 2)
    vmax = float(np.nanpercentile(fld.u[fld.observed], 99.5)) if fld.observed.any() else 1.0
    fig, axes = plt.subplots(3, len(frames), figsize=(3.2 * len(frames), 8), constrained_layout=True, squeeze=False)
    res = fld.u - sim
    rmax = float(np.nanmax(np.abs(res))) if np.isfinite(res).any() else 1.0
    for j, t in enumerate(frames):
        for i, (arr, title, cmap, lim) in enumerate(((fld.u[t], "observed", "magma", (0, vmax)),
                                                     (sim[t], name, "magma", (0, vmax)),
                                                     (res[t], "observed - model", "RdBu_r", (-rmax, rmax)))):
            ax = axes[i, j]
            im = ax.imshow(np.where(fld.mask, arr, np.nan), extent=extent, cmap=cmap, vmin=lim[0], vmax=lim[1])
            ax.set_title(f"{title}, t = {fld.t_h[t]:.3g} h", fontsize=8)
            ax.set_xlabel("x [µm]", fontsize=7)
            ax.set_ylabel("y [µm]", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(result, directory: Path) -> dict[str, str]:
    """Write the bundle's PNG figures into ``directory``; returns {file name: description}."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    if result.fit is not None:
        _rates_figure(result, directory / "rates.png")
        out["rates.png"] = "learned D(u) and G(u) with the ensemble range and the closed forms"
    if result.field is not None and result.simulations:
        _counts_figure(result, directory / "counts.png")
        out["counts.png"] = "total cell number N(t), observed vs models"
        for name in ("closed form (refitted)", "closed form", "learned D, G"):
            if name in result.simulations:
                _snapshots_figure(result, name, directory / "snapshots.png")
                out["snapshots.png"] = f"observed, simulated ({name}) and residual at three frames"
                break
    return out


def _switch_text(holdout: dict) -> str:
    """The in-sample switch's rule as the run used it (nothing when it was off, or for bundles from before it was
    recorded)."""
    bic, tested = holdout.get("bic_switch"), holdout.get("tested_switch")
    if bic is None:
        return ""
    rule = f"by a BIC difference over {bic:g}"
    if tested is not None:
        rule += (f", or over {tested:g} where a paired t test over the same blocks finds it better at level "
                 f"{holdout.get('switch_level')}")
    return f", unless a library form among them fits the earlier frames better {rule} (the reason is given above)"


def _budget_text(metadata: dict, holdout: dict) -> str:
    """How many held-out candidates were compared at the simulation budget, before their fit converged (a fit that
    stopped short of it for another reason is not counted)."""
    rows = [r for r in metadata.get("refit_candidates", []) if isinstance(r, dict) and "converged" in r]
    budget = holdout.get("max_evals")
    stopped = sum(not r["converged"] and budget is not None and r.get("simulations", 0) >= budget for r in rows)
    if not stopped:
        return ""
    return (f" {stopped} of {len(rows)} candidates reached the budget of {budget} simulations "
            "per fit before converging and were compared at the best state they reached.")


def write_report(result, directory: Path, files: dict[str, str]) -> None:
    """Write ``report.html``: equations, QC table, refits, figures and links to every file."""
    esc = html.escape
    parts: list[str] = ["<!doctype html><html><head><meta charset='utf-8'><title>napari-binn report</title>",
                        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;}pre{background:#f4f4f4;"
                        "padding:.6em;overflow-x:auto}img{max-width:100%}td,th{padding:2px 8px}</style></head><body>",
                        "<h1>napari-binn report</h1>"]
    fld = result.field
    if fld is not None:
        from .density import counting_text
        from .io import calibration_sources

        counted = counting_text(fld.metadata)
        calibration = "; ".join(calibration_sources(fld.metadata))
        parts.append(f"<p>Density: {fld.n_frames} frames, {fld.u.shape[1]} x {fld.u.shape[2]} boxes of "
                     f"{fld.dx_um:g} µm, {int(fld.mask.sum())} boxes in the ROI, t = {fld.t_h[0]:g}–{fld.t_h[-1]:g} h, "
                     f"units {esc(fld.units)}{'; ' + esc(counted) if counted else ''}"
                     f"{'; ' + esc(calibration) if calibration else ''}.</p>")
    warnings: list[Any] = result.metadata.get("warnings", [])
    if result.metadata.get("cancelled_in"):
        warnings = [f"the run was cancelled during '{result.metadata['cancelled_in']}': results are partial"] + list(warnings)
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(str(w))}</li>" for w in warnings) + "</ul>")
    from .pipeline import delay_text, refine_text

    refined = (delay_text(result.fit, fld.t_h if fld is not None else None, metadata=result.metadata)
               + refine_text(result.fit))
    if refined:
        parts.append("<h2>Learned D(u), G(u)</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in refined) + "</ul>")
    eq = result.equations
    if eq is not None:
        from .symbolic.expression import equation_text

        parts.append("<h2>Discovered equations</h2><pre>")
        for key in ("D", "G"):
            f = getattr(eq, key, None)
            if f is not None:
                parts.append(esc(equation_text(key, f)) + "\n")
        parts.append("</pre>")
        from .pipeline import alternatives_text, determined_text

        notes = alternatives_text(eq) + determined_text(result.fit)
        if notes:
            parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
        holdout = result.metadata.get("holdout")
        if isinstance(holdout, dict) and holdout.get("frames"):
            parts.append(f"<p>Forms chosen by the last {holdout['frames']} frames held out: candidates refitted on the "
                         f"earlier frames predict them; a candidate is excluded when a one-sided paired t test over "
                         f"{holdout.get('n_blocks', '?')} blocks of {holdout.get('block_boxes', 4)} x "
                         f"{holdout.get('block_boxes', 4)} boxes finds it worse than the best by more than "
                         f"{100 * float(holdout.get('margin', 0)):.0f}% at level {holdout.get('level')}; the headline "
                         "has the fewest constants among the rest" + _switch_text(holdout) + "."
                         + _budget_text(result.metadata, holdout) + "</p>")
        refit = result.metadata.get("closed_form_refitted")
        if refit:
            mech = result.mechanistic.get("closed form (refitted)")
            units = dict(getattr(mech, "units", None) or {})
            parts.append("<p>Constants refitted against the data: " +
                         esc(", ".join(f"{k} = {v:.4g} {units.get(k, '')}".rstrip() for k, v in refit.items()))
                         + "</p>")
    if result.qc is not None:
        parts.append("<h2>Quality control</h2><pre>" + esc(result.qc.table()) + "</pre>")
    for name, fit in result.mechanistic.items():
        parts.append(f"<h2>Mechanistic fit: {esc(name)}</h2><pre>{esc(fit.summary())}</pre>")
    for png, desc in files.items():
        if png.endswith(".png"):
            parts.append(f"<h3>{esc(desc)}</h3><img src='{esc(png)}' alt='{esc(desc)}'>")
    parts.append("<h2>Files</h2><ul>" + "".join(f"<li><a href='{esc(k)}'>{esc(k)}</a>: {esc(v)}</li>"
                                                 for k, v in files.items()) + "</ul>")
    parts.append(f"<p><small>napari-binn {esc(str(result.metadata.get('napari_binn_version', '')))}</small></p>")
    parts.append("</body></html>")
    (directory / "report.html").write_text("".join(parts), encoding="utf-8")
