"""``landscape table``: the papers' tables from run directories or sweeps, recomputed from each run's own records.

For every completed run, the metric is the last dev evaluation in its ``metrics.jsonl`` (never the copy in
``run.json``) and the row / column keys are its config's values (``task``, ``sam``, ``optimizer``, ``sparsity``...).
Rows and columns may combine options (``sam,ascent_fraction``: values joined as ``sam/0.25``); two runs that fall
in one cell under one seed are refused, naming the options that differ. Cells give the mean ± sample standard
deviation over the runs that share a row and a column (seeds) and their count, scaled by 100 as the papers print
them (FSAM Table 1, δ-SAM Table 1); ``Avg`` is the mean of a row's cell means (the papers' Avg column); the best
cell of each row is marked. With ``baseline`` (a column value), each cell also gives its paired difference to the
baseline over the seeds both have: the mean and a 95 % t interval.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from figures.sources import RunRecord, primary_metric, read_run
from landscape.core.errors import ConfigError
from landscape.core.rundir import COMPLETED, RUN_FILE, TRIALS_DIR, upgrade_config

FORMATS = ("md", "csv", "latex")


@dataclass
class Cell:
    values: dict[Any, float] = field(default_factory=dict)  # seed -> metric

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values())))

    @property
    def std(self) -> float:
        return float(np.std(list(self.values.values()), ddof=1)) if len(self.values) > 1 else float("nan")


@dataclass
class Table:
    rows: list[Any]
    cols: list[Any]
    cells: dict[tuple[Any, Any], Cell]
    metric: str
    row_key: str
    col_key: str
    baseline: Any = None

    def average(self, row: Any) -> float:
        means = [self.cells[row, col].mean for col in self.cols if (row, col) in self.cells]
        return float(np.mean(means)) if means else float("nan")

    def paired(self, row: Any, col: Any) -> tuple[float, float, float, int] | None:
        """Mean of the per-seed differences to the baseline column and its 95 % t interval (None if < 2 pairs)."""
        if self.baseline is None or col == self.baseline or (row, self.baseline) not in self.cells:
            return None
        ours, base = self.cells.get((row, col)), self.cells[row, self.baseline]
        seeds = sorted(set(ours.values) & set(base.values), key=str) if ours else []
        if len(seeds) < 2:
            return None
        differences = np.array([ours.values[s] - base.values[s] for s in seeds])
        mean, se = float(differences.mean()), float(differences.std(ddof=1) / math.sqrt(len(seeds)))
        half = float(stats.t.ppf(0.975, len(seeds) - 1)) * se
        return mean, mean - half, mean + half, len(seeds)


def option_value(config: dict[str, Any], options: str) -> Any:
    """The value of a row or column: one option's value, or for ``a,b`` the values joined as ``va/vb``."""
    keys = options.split(",")
    return config[keys[0]] if len(keys) == 1 else "/".join(str(config[key]) for key in keys)


def run_directories(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories from ``paths``: run directories themselves, or sweep directories (their trials)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / RUN_FILE).is_file():
            found.append(path)
        elif (path / TRIALS_DIR).is_dir():
            found += sorted(p for p in (path / TRIALS_DIR).iterdir() if (p / RUN_FILE).is_file())
        else:
            raise ConfigError(f"{path} is neither a run directory (no {RUN_FILE}) nor a sweep (no {TRIALS_DIR}/)")
    return found


EVAL_FIELDS = frozenset({"kind", "split", "step", "epoch", "loss", "time"})  # an eval record's non-metric keys


def final_dev_metric(run: RunRecord, metric: str) -> float | None:
    """The metric of the run's last dev evaluation in metrics.jsonl, or None."""
    evals = [r for r in run.records_of("eval") if r.get("split", "dev") == "dev" and metric in r]
    return float(evals[-1][metric]) if evals else None


def build_table(
    paths: Sequence[str | os.PathLike[str]],
    *,
    rows: str = "task",
    cols: str = "sam",
    metric: str | None = None,
    baseline: Any = None,
) -> Table:
    """Aggregate the completed runs under ``paths`` into a :class:`Table` (see the module doc)."""
    runs = [read_run(path) for path in run_directories(paths)]
    runs = [run for run in runs if run.info.get("status") == COMPLETED]
    if not runs:
        raise ConfigError("no completed run found; expected run directories or a sweep with finished trials")
    cells: dict[tuple[Any, Any], Cell] = {}
    owners: dict[tuple[Any, Any, Any], RunRecord] = {}  # (row, col, seed) -> the run that gave the value
    names = set()
    for run in runs:
        config = upgrade_config(dict(run.config))
        for key in (*rows.split(","), *cols.split(",")):
            if key not in config:
                raise ConfigError(f"run {run.path} has no option {key!r}; expected a key of its run.json config")
        name = metric or run.metric_name or primary_metric(run.task, [])
        names.add(name)
        value = final_dev_metric(run, name) if name else None
        if value is None:
            continue
        row, col = option_value(config, rows), option_value(config, cols)
        cell = cells.setdefault((row, col), Cell())
        seed = config.get("seed", len(cell.values))
        other = owners.setdefault((row, col, seed), run)
        if other is not run:  # two runs in one cell under one seed: averaging or keeping one would hide one
            differ = sorted(key for key in {*config, *other.config} - {"out", "seed"}
                            if config.get(key) != upgrade_config(dict(other.config)).get(key))  # fmt: skip
            raise ConfigError(
                f"runs {other.path} and {run.path} fall in one cell ({rows}={row}, {cols}={col}, seed {seed}) but "
                f"differ in {', '.join(differ) or 'nothing recorded'}; expected options that separate them, e.g. "
                f"--cols {cols},{differ[0] if differ else 'OPTION'}"
            )
        cell.values[seed] = value
    if len(names) > 1 and metric is None:
        raise ConfigError(f"the runs have different primary metrics ({', '.join(sorted(names))}); pass --metric")
    if not cells:
        recorded = sorted({key for run in runs for r in run.records_of("eval") for key in r} - EVAL_FIELDS)
        raise ConfigError(
            f"no completed run has a dev {', '.join(sorted(names)) or 'metric'}; "
            f"expected --metric to be one of {', '.join(recorded) or 'their recorded metrics (none found)'}"
        )
    row_values = list(dict.fromkeys(r for r, _ in cells))
    col_values = list(dict.fromkeys(c for _, c in cells))
    if baseline is not None:
        matched = [c for c in col_values if str(c) == str(baseline)]
        if not matched:
            raise ConfigError(f"baseline {baseline!r} is no {cols} of these runs; expected one of {col_values}")
        baseline = matched[0]
        col_values = [baseline, *(c for c in col_values if c != baseline)]  # the baseline column first
    return Table(row_values, col_values, cells, names.pop() if names else "?", rows, cols, baseline)


def table_lines(table: Table, *, best: str = "{}") -> tuple[list[str], list[list[str]]]:
    """The header and the rows of cell texts; the best mean of each row formatted with ``best`` (``"**{}**"``)."""
    header = [f"{table.row_key} \\ {table.col_key}", *map(str, table.cols), "Avg"]
    lines = []
    for row in table.rows:
        means = {col: table.cells[row, col].mean for col in table.cols if (row, col) in table.cells}
        top = max(means, key=means.get) if means else None
        texts = []
        for col in table.cols:
            text = _cell_text(table, row, col)
            texts.append(best.format(text) if col == top and len(means) > 1 else text)
        lines.append([str(row), *texts, f"{100 * table.average(row):.1f}"])
    return header, lines


def table_caption(table: Table) -> str:
    caption = f"dev {table.metric} × 100, mean ± std over seeds (n runs)"
    if table.baseline is not None:
        caption += f"; Δ: paired difference to {table.col_key}={table.baseline}, 95 % t interval"
    return caption


def _cell_text(table: Table, row: Any, col: Any) -> str:
    cell = table.cells.get((row, col))
    if cell is None:
        return "–"
    spread = "" if math.isnan(cell.std) else f" ± {100 * cell.std:.1f}"
    text = f"{100 * cell.mean:.1f}{spread} (n={len(cell.values)})"
    paired = table.paired(row, col)
    if paired is not None:
        mean, low, high, _ = paired
        text += f" Δ{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
    return text


def format_table(table: Table, fmt: str = "md") -> str:
    """The table as Markdown, CSV or LaTeX; the best mean of each row is bold (Markdown, LaTeX) or starred (CSV)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    marks = {"md": "**{}**", "latex": "\\textbf{{{}}}", "csv": "{} *"}
    header, lines = table_lines(table, best=marks[fmt])
    caption = table_caption(table)
    if fmt == "csv":
        quote = lambda text: '"' + text.replace('"', '""') + '"'  # noqa: E731
        return "\n".join(",".join(quote(t) for t in line) for line in [header, *lines]) + "\n"
    if fmt == "latex":
        body = [" & ".join(line).replace("±", "$\\pm$").replace("Δ", "$\\Delta$") + " \\\\" for line in lines]
        spec = "l" + "r" * (len(header) - 1)
        return "\n".join(
            [f"% {caption}", f"\\begin{{tabular}}{{{spec}}}", " & ".join(header) + " \\\\", "\\hline", *body,
             "\\end{tabular}"]
        ) + "\n"  # fmt: skip
    rule = "|" + "|".join("---" for _ in header) + "|"
    body = ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join([f"{caption}", "", "| " + " | ".join(header) + " |", rule, *body]) + "\n"
