"""``landscape table RUNS_OR_SWEEPS``: mean ± std over seeds, the Avg column, paired differences (figures.tables)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "table",
        help="a paper-style table of dev metrics over runs or a sweep",
        description="Aggregate completed runs (run directories, or sweep directories' trials): rows and columns "
        "are config options, cells the mean ± std over seeds of the final dev metric from each run's metrics.jsonl.",
    )
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_SWEEP", help="run directories or sweep directories")
    parser.add_argument("--rows", default="task", help="config option of the rows, or several as a,b (default task)")
    parser.add_argument(
        "--cols",
        default="sam",
        help="config option of the columns, or several as a,b, e.g. sam,ascent_fraction (default sam); two runs "
        "of one cell and seed are refused",
    )
    parser.add_argument("--metric", help="dev metric (default: the task's primary metric)")
    parser.add_argument("--baseline", help="a column value: add each cell's paired difference to it")
    parser.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="output format (default md)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from figures.tables import build_table, format_table

    table = build_table(args.inputs, rows=args.rows, cols=args.cols, metric=args.metric, baseline=args.baseline)
    print(format_table(table, args.format), end="")
    return 0
