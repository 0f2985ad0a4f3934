"""The HTML report of one comparison: a metrics table of every run, every figure, the interactive surfaces.

One self-contained page (``landscape report``): PNG figures as base64 data URIs and plotly.js inlined once, so it opens
offline and can be mailed as one file. It is regenerated from the result files each time and written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from figures.catalogue import figure_specs
from figures.interactive import surface_html_fragment
from figures.landscapes import shared_range
from figures.sources import Collection, ResultRecord, collect, group_by_task
from figures.style import optimizer_colour, paper_style
from figures.tables import Table, build_table, table_caption, table_lines
from landscape.core.atomic import write_text
from landscape.core.errors import ConfigError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; white-space: nowrap; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; vertical-align: middle; }
figure { display: inline-block; margin: 1em; vertical-align: top; max-width: 32em; }
figure img { width: 100%; } figcaption { font-size: 0.85em; color: #555; }
.plot { margin: 1em 0; } .scroll { overflow-x: auto; }
"""


# Marks a page as written here, so that a rerun may replace it and nothing else is replaced without --overwrite.
GENERATOR_TAG = '<meta name="generator" content="landscape report">'


def format_value(value: Any) -> str:
    """Numbers with four significant digits (NaN written as such); anything else as text."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = float(value)
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _run_key(path: Any) -> str:
    try:
        return str(Path(str(path)).resolve())
    except OSError:
        return str(path)


def _value_at(coordinates: np.ndarray, target: float) -> int | None:
    matches = np.flatnonzero(np.isclose(np.asarray(coordinates, dtype=float), target, atol=1e-12))
    return int(matches[0]) if matches.size else None


def _result_scalars(record: ResultRecord) -> dict[str, Any]:
    """The scalars of one result that go into the metrics table, by column name."""
    arrays, out = record.arrays, {}
    if record.kind == "hessian":
        eigenvalues = np.asarray(arrays["eigenvalues"], dtype=float)
        if np.isfinite(eigenvalues).any():
            if record.meta.get("which", "LA") == "SA":  # the smallest algebraic end of the spectrum was asked for
                out["lowest Hessian eigenvalue"] = float(np.nanmin(eigenvalues))
            else:
                out["top Hessian eigenvalue"] = float(np.nanmax(eigenvalues))
        if "trace" in arrays:
            trace = float(arrays["trace"])
            se = float(arrays["trace_se"]) if "trace_se" in arrays else float("nan")
            out["Hessian trace ± SE"] = f"{format_value(trace)} ± {format_value(se)}"
    elif record.kind == "sharpness":
        for index, rho in enumerate(np.asarray(arrays["rho"], dtype=float)):
            for name, title in (("eps_sharpness_ascent", "1 step"), ("eps_sharpness_pgd", "PGD")):
                if name in arrays:
                    out[f"ε-sharpness ρ={rho:g} ({title})"] = float(arrays[name][index])
        for index, sigma in enumerate(np.asarray(arrays.get("sigma", []), dtype=float)):
            out[f"average sharpness σ={sigma:g}"] = float(arrays["average_sharpness"][index])
    elif record.kind == "surface":
        a = arrays["a"]
        i = _value_at(a, 0.0)
        if "b" in arrays:
            j = _value_at(arrays["b"], 0.0)
            if i is not None and j is not None:
                out["2-D surface loss at (0, 0)"] = float(arrays["loss"][j, i])
            finite = np.asarray(arrays["loss"], dtype=float)
            finite = finite[np.isfinite(finite)]
            if finite.size:
                out["2-D surface max loss"] = float(finite.max())
        elif i is not None:
            out["1-D surface loss at 0"] = float(arrays["loss"][i])
    elif record.kind == "interpolation":
        for alpha, title in ((0.0, "θ1"), (-1.0, "θ0")):
            index = _value_at(arrays["alpha"], alpha)
            if index is not None:
                out[f"interpolation loss at {title}"] = float(arrays["loss"][index])
    elif record.kind == "fisher" and record.meta.get("total_trace") is not None:
        out["Fisher trace"] = float(record.meta["total_trace"])
    return out


def metrics_table(collection: Collection) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per run (task, optimizer label, seed, dev metrics from run.json, then the scalars
    of its analyses: top eigenvalue, trace ± SE, sharpness at each ρ, surface loss at the origin, …)."""
    rows: dict[str, dict[str, Any]] = {}
    for run in collection.runs:
        row = rows.setdefault(_run_key(run.path), {})
        row.update({"run": run.name, "task": run.task, "optimizer": run.label, "seed": run.config.get("seed", "")})
        for name, value in run.dev_metrics.items():
            row[f"dev {name}"] = value
    for record in collection.results:
        run_path = record.run.get("path")
        if record.path.parent.name == "analyses" and (record.path.parent.parent / "run.json").is_file():
            run_path = record.path.parent.parent
        key = _run_key(run_path) if run_path else f"label:{record.label}"
        row = rows.setdefault(key, {})
        row.setdefault("run", record.run_name)
        row.setdefault("task", record.run.get("task") or record.task)
        row.setdefault("optimizer", record.label)
        row.setdefault("seed", record.run.get("seed", ""))
        row.update(_result_scalars(record))
    columns: list[str] = []
    for row in rows.values():
        columns += [column for column in row if column not in columns]
    return columns, list(rows.values())


def _table_html(columns: list[str], rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "–")
            text = html.escape(format_value(value))
            if column == "optimizer":
                swatch = f'<span class="swatch" style="background:{optimizer_colour(str(value))}"></span>'
                cells.append(f'<td class="text">{swatch}{text}</td>')
            elif isinstance(value, str):
                cells.append(f'<td class="text">{text}</td>')
            else:
                cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    with paper_style():
        figure.savefig(buffer, format="png", dpi=150)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def seeds_table(collection: Collection) -> Table | None:
    """The papers' table (tasks × SAM variants, mean ± std over seeds) when some cell has two or more runs."""
    paths = [run.path for run in collection.runs]
    if len(paths) < 2:
        return None
    try:
        table = build_table(paths, rows="task", cols="sam")
    except ConfigError:  # runs of different metrics, or none completed: the per-run table says it all
        return None
    return table if any(len(cell.values) >= 2 for cell in table.cells.values()) else None


def render_report(collection: Collection, *, title: str = "Loss landscape report", sources: Iterable[str] = ()) -> str:
    """The report page as one HTML string (no external resources)."""
    columns, rows = metrics_table(collection)
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8">{GENERATOR_TAG}',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
        f"{len(collection.runs)} run(s) and {len(collection.results)} result(s): "
        + ", ".join(f"<code>{html.escape(str(s))}</code>" for s in sources)
        + "</p>",
    ]
    seeds = seeds_table(collection)
    if seeds is not None:  # a sweep: the papers' table comes first
        header, lines = table_lines(seeds, best="★ {}")
        parts += [
            f"<h2>Dev {html.escape(seeds.metric)} over seeds</h2>",
            _table_html(header, [dict(zip(header, line, strict=True)) for line in lines]),
            f"<p>{html.escape(table_caption(seeds))}; ★ the best mean of the row.</p>",
        ]
    parts += ["<h2>Metrics</h2>", _table_html(columns, rows) if rows else "<p>No runs or results.</p>"]
    specs = figure_specs(collection)
    if specs:
        parts.append("<h2>Figures</h2>")
    for spec in specs:
        uri = _png_data_uri(spec.draw())
        parts.append(
            f'<figure id="{html.escape(spec.stem)}"><img alt="{html.escape(spec.heading)}" src="{uri}">'
            f"<figcaption><b>{html.escape(spec.heading)}.</b> {html.escape(spec.caption)}</figcaption>"
            "</figure>"
        )
    surfaces = collection.surfaces(2)
    ranges = {task: shared_range(records) for task, records in group_by_task(surfaces).items()}  # one z per task
    if surfaces:
        parts.append("<h2>Interactive surfaces</h2><p>Drag to rotate, scroll to zoom; gaps are cells not computed.</p>")
    for index, record in enumerate(surfaces):
        parts.append(
            f"<h3>{html.escape(record.label)} · {html.escape(record.task)} "
            f"<small>({html.escape(str(record.path))})</small></h3>"
        )
        fragment = surface_html_fragment(
            record, include_plotlyjs=index == 0, div_id=f"surface-{index}", value_range=ranges[record.task]
        )
        parts.append(f'<div class="plot">{fragment}</div>')
    parts.append("</body></html>")
    return "\n".join(parts)


def check_report_target(out: Path, *, overwrite: bool) -> None:
    """Refuse to write the report over anything but an earlier report (unless ``overwrite``) or into a run's files."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; expected the HTML file to write, e.g. {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {out} is not an .html file; expected the report's file name, e.g. report.html")
    if out.exists() and not overwrite:
        with open(out, "rb") as handle:
            ours = GENERATOR_TAG.encode() in handle.read(4096)
        if not ours:
            raise ConfigError(
                f"--out {out} exists and is not a report written by landscape; pass --overwrite to replace it"
            )


def build_report(
    paths: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    title: str = "Loss landscape report",
    overwrite: bool = False,
) -> Path:
    """Read the run and result directories in ``paths`` and write the report page to ``out`` atomically.

    An existing ``out`` is replaced only when it is a report this function wrote, or with ``overwrite``.
    """
    paths = [str(p) for p in paths]
    out = Path(out)
    check_report_target(out, overwrite=overwrite)
    collection = collect(paths)
    write_text(out, render_report(collection, title=title, sources=paths))
    return out
