"""``landscape figures`` and ``landscape report``: paper figures, interactive surfaces, VTK files and the HTML report
from run directories (``run.json``; their analyses under ``RUN/analyses/<name>/``) and result directories."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    figures = subparsers.add_parser(
        "figures",
        help="write every figure the given runs / results allow (PDF + PNG, interactive HTML, VTK)",
        description="Write every figure the given run and result directories allow: PDF + PNG per figure, one "
        "interactive HTML per 2-D surface and one .vtu (ParaView) per surface. Prints the files written.",
    )
    figures.add_argument(
        "inputs",
        nargs="+",
        metavar="RUN_OR_RESULT",
        help="run directories (their analyses/*/ are included) or result directories",
    )
    figures.add_argument("--out", required=True, help="output folder (created if needed)")
    figures.add_argument(
        "--formats",
        nargs="+",
        choices=("pdf", "png", "svg"),
        default=["pdf", "png"],
        help="file formats of each figure (default: pdf png)",
    )
    figures.add_argument(
        "--html",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="interactive plotly HTML per 2-D surface (default: on)",
    )
    figures.add_argument(
        "--vtk",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a .vtu file per surface for ParaView (default: on)",
    )
    figures.set_defaults(run=run_figures)

    report = subparsers.add_parser(
        "report",
        help="one self-contained HTML page: metrics table, all figures, interactive surfaces",
        description="Write one self-contained HTML page comparing the given runs and results: a metrics table, every "
        "figure (embedded PNG) and the interactive surfaces (plotly.js inlined, works offline).",
    )
    report.add_argument(
        "inputs",
        nargs="+",
        metavar="RUN_OR_RESULT",
        help="run directories (their analyses/*/ are included) or result directories",
    )
    report.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    report.add_argument("--title", default="Loss landscape report", help="page title")
    report.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier report")
    report.set_defaults(run=run_report)


def run_figures(args: argparse.Namespace) -> int:
    from figures.catalogue import write_figures

    written = write_figures(args.inputs, args.out, formats=args.formats, html=args.html, vtk=args.vtk)
    for path in written:
        print(path)
    if not written:
        print("landscape figures: nothing to draw (no analyses under RUN/analyses/ and no metrics.jsonl records)",
              file=sys.stderr)  # fmt: skip
    return 0


def run_report(args: argparse.Namespace) -> int:
    from figures.report import build_report

    print(build_report(args.inputs, args.out, title=args.title, overwrite=args.overwrite))
    return 0
