"""A batch's summary: ``summary.csv`` (one row per item), a plate heat map when the names carry a well, and
``summary.html`` (what ``napari-binn report <batch folder>`` renders).

Wells: an item named like ``plate1_B03_roi2``, ``B3`` or ``C12-left`` is in well B03, B03 and C12 (an upper-case
row letter A-P and a column 1-24, not part of a longer word or number). Several items (ROIs) in one well are
averaged in the heat map; the CSV keeps one row per item.
"""

from __future__ import annotations

import csv
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .items import ItemOutcome

__all__ = ["well_of", "summary_rows", "write_summary", "read_summary", "write_plate_figure", "write_summary_html",
           "FIXED_COLUMNS"]

_WELL = re.compile(r"(?:^|[^A-Za-z0-9])([A-P])(\d{1,2})(?=$|[^0-9])")
#: The columns every summary.csv has, in order; each constant adds ``<name>``, ``<name>_ci95_lo``,
#: ``<name>_ci95_hi`` and ``<name>_units`` before ``nt_error_pct``.
FIXED_COLUMNS = ("name", "well", "status", "error", "D", "G", "D_units", "G_units", "constants_from")
_TAIL_COLUMNS = ("nt_error_pct", "nt_model", "seconds", "bundle", "pixel_size_um", "frame_interval_h", "calibration")
#: Standard plates (rows, columns), smallest first.
_PLATES = ((2, 3), (3, 4), (4, 6), (6, 8), (8, 12), (16, 24))


def well_of(name: str) -> str:
    """The well in ``name`` as row letter + two-digit column ('B03'), or '' when it has none."""
    for match in _WELL.finditer(name):
        col = int(match.group(2))
        if 1 <= col <= 24:
            return f"{match.group(1)}{col:02d}"
    return ""


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def summary_rows(outcomes: Sequence[ItemOutcome]) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of the summary table: one row per item, one set of columns per constant name."""
    constants: list[str] = []
    for o in outcomes:
        constants += [c for c in o.constants if c not in constants]
    columns = list(FIXED_COLUMNS)
    for c in constants:
        columns += [c, f"{c}_ci95_lo", f"{c}_ci95_hi", f"{c}_units"]
    columns += list(_TAIL_COLUMNS)
    rows = []
    for o in outcomes:
        done = o.status == "done"
        row = {"name": o.name, "well": well_of(o.name), "status": o.status,
               "error": o.message if o.status != "done" else "", "D": o.D if done else "",
               "G": o.G if done else "", "D_units": o.D_units, "G_units": o.G_units,
               "constants_from": ("refit to the data" if o.refitted else "symbolic regression") if done else "",
               "nt_error_pct": _fmt(o.nt_error), "nt_model": o.nt_model, "seconds": f"{o.seconds:.1f}",
               "bundle": o.out.name if done else "", "pixel_size_um": _fmt(o.pixel_size_um),
               "frame_interval_h": _fmt(o.frame_interval_h), "calibration": o.calibration}
        for c in constants:
            value, lo, hi, units = o.constants.get(c) or (None, None, None, "")
            row.update({c: _fmt(value), f"{c}_ci95_lo": _fmt(lo), f"{c}_ci95_hi": _fmt(hi), f"{c}_units": units or ""})
        rows.append(row)
    return columns, rows


def write_summary(folder: str | Path, outcomes: Sequence[ItemOutcome], *, figure: bool = True) -> list[Path]:
    """Write ``summary.csv`` (and ``plate.png`` when some names carry a well) into ``folder``; returns the files.
    The CSV is written to a temporary file and renamed, so a reader never sees half of it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns, rows = summary_rows(outcomes)
    tmp = folder / ".summary.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(folder / "summary.csv")
    files = [folder / "summary.csv"]
    if figure and any(r["well"] for r in rows):
        files.append(write_plate_figure(rows, folder / "plate.png"))
    return files


def read_summary(folder: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a batch folder's ``summary.csv`` (InputError when there is none)."""
    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise InputError(f"{folder} holds no summary.csv: it is not a batch folder (napari-binn batch writes one)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _plate_shape(wells: Sequence[str]) -> tuple[int, int]:
    rows = max(ord(w[0]) - ord("A") + 1 for w in wells)
    cols = max(int(w[1:]) for w in wells)
    return next(((r, c) for r, c in _PLATES if rows <= r and cols <= c), _PLATES[-1])


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def write_plate_figure(rows: Sequence[dict[str, str]], path: str | Path) -> Path:
    """A heat map per quantity over the plate: the N(t) error and the constants found in at least half the wells
    (up to three); wells of failed items are crossed, wells without items blank."""
    import numpy as np

    from ..report import _plt

    plt = _plt()
    wells = sorted({r["well"] for r in rows if r["well"]})
    n_rows, n_cols = _plate_shape(wells)
    constants = [c[: -len("_ci95_lo")] for c in rows[0] if c.endswith("_ci95_lo")] if rows else []
    quantities = []
    for c in constants:
        have = {r["well"] for r in rows if r["well"] and math.isfinite(_float(r.get(c, "")))}
        if len(have) >= max(1, len(wells) / 2):
            quantities.append((c, f"{c} ({next((r[c + '_units'] for r in rows if r.get(c + '_units')), '') or '-'})"))
    quantities = quantities[:3] + [("nt_error_pct", "N(t) error (%)")]
    fig, axes = plt.subplots(1, len(quantities), figsize=(0.45 * n_cols * len(quantities) + 1.5, 0.45 * n_rows + 1.4),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], quantities):
        grid = np.full((n_rows, n_cols), np.nan)
        failed = np.zeros((n_rows, n_cols), bool)
        for w in wells:
            i, j = ord(w[0]) - ord("A"), int(w[1:]) - 1
            values = [_float(r.get(key, "")) for r in rows if r["well"] == w and r["status"] == "done"]
            values = [v for v in values if math.isfinite(v)]
            if values:
                grid[i, j] = float(np.mean(values))
            failed[i, j] = any(r["status"] == "failed" for r in rows if r["well"] == w)
        im = ax.imshow(grid, cmap="viridis", aspect="equal")
        for i, j in zip(*np.nonzero(failed)):
            ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=9)
        ax.set_xticks(range(n_cols), [str(c + 1) for c in range(n_cols)], fontsize=6)
        ax.set_yticks(range(n_rows), [chr(ord("A") + r) for r in range(n_rows)], fontsize=6)
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.7)
    fig.suptitle("per well (mean over its items; x: failed)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary_html(folder: str | Path) -> Path:
    """Render a batch folder's ``summary.csv`` (and ``plate.png``) as ``summary.html`` (links to each bundle's
    report); returns its path. The plate figure is redrawn from the CSV when the names carry wells."""
    folder = Path(folder)
    columns, rows = read_summary(folder)
    if any(r.get("well") for r in rows):
        write_plate_figure(rows, folder / "plate.png")
    done = sum(r["status"] == "done" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            text = esc(r.get(c, "") or "")
            if c == "bundle" and text and (folder / r[c] / "report.html").is_file():
                text = f'<a href="{esc(r[c])}/report.html">{text}</a>'
            cells.append(f"<td>{text}</td>")
        cls = ' class="failed"' if r["status"] == "failed" else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    plate = '<p><img src="plate.png" alt="plate heat map"></p>' if (folder / "plate.png").is_file() else ""
    fails = "".join(f"<li>{esc(r['name'])}: {esc(r['error'])}</li>" for r in failed)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>napari-binn batch: {esc(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}} tr.failed td{{color:#b00}}</style></head>
<body><h1>Batch {esc(folder.name)}</h1>
<p>{done} of {len(rows)} items written{f"; {len(failed)} failed" if failed else ""}. Constants: the chosen forms'
constants, refitted to each item's data with 95% intervals where the refit ran (column constants_from).
N(t) error: mean |%| difference of the total cell number, simulated vs observed.</p>
{plate}
{f"<h2>Failed</h2><ul>{fails}</ul>" if fails else ""}
<h2>Items</h2><table><tr>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""
    out = folder / "summary.html"
    out.write_text(page, encoding="utf-8")
    return out
