"""``landscape interpolate RUN``: the loss along θ(α) = θ1 + α(θ1 − θ0) (FSAM Fig. 5)."""

from __future__ import annotations

import argparse

from landscape.cli.common import (
    RUN_HELP,
    add_checkpoint_argument,
    add_data_arguments,
    add_executor_arguments,
    add_output_arguments,
    add_precision_argument,
    check_range,
    data_selection,
    positive_int,
    print_grid_summary,
)
from landscape.geometry.directions import NORMS
from landscape.geometry.surface import MAX_CELLS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "interpolate",
        help="1-D interpolation θ1 + α(θ1 − θ0) from the pretrained weights or another run",
        description="Loss and metric along θ(α) = θ1 + α(θ1 − θ0): θ1 is the run's final weights, θ0 its "
        "init.safetensors (α = -1), or --to RUN2's final weights, or a random direction (--random).",
    )
    parser.add_argument("run_dir", metavar="RUN", help=RUN_HELP + " (θ1 = its final weights)")
    parser.add_argument(
        "--init",
        metavar="MODEL",
        help="for a model checkpoint: θ0 = this pretrained model (folder or hub name) with a fresh head seeded by 0",
    )
    parser.add_argument("--to", metavar="RUN2", help="θ0 = the final weights of RUN2 (same architecture and head)")
    parser.add_argument("--random", action="store_true", help="a seeded random direction instead of θ1 − θ0")
    parser.add_argument(
        "--alpha", type=float, nargs=2, default=[-1.0, 1.0], metavar=("A", "B"), help="range of α (default -1 1)"
    )
    parser.add_argument("--points", type=positive_int, default=21, help="values of α (default 21)")
    parser.add_argument("--norm", choices=NORMS, default="filter", help="normalisation of --random (default filter)")
    parser.add_argument(
        "--ignore-1d",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --random: zero direction for biases and LayerNorm",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="evaluation batch size")
    add_data_arguments(parser, samples=256)
    add_executor_arguments(parser)
    parser.add_argument(
        "--max-cells",
        type=positive_int,
        default=MAX_CELLS,
        help=f"refuse grids of more cells than this (default {MAX_CELLS:,})",
    )
    add_output_arguments(parser)
    add_checkpoint_argument(parser)
    add_precision_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from landscape.core.errors import ConfigError
    from landscape.geometry.surface import compute_interpolation

    if args.points < 2:
        raise ConfigError(f"--points must be >= 2, got {args.points}")
    result = compute_interpolation(
        args.run_dir,
        args.out,
        to=args.to,
        random=args.random,
        alpha_range=check_range(args.alpha, "--alpha"),
        points=args.points,
        norm=args.norm,
        ignore_1d=args.ignore_1d,
        data=data_selection(args),
        init=args.init,
        executor=args.executor,
        ray_address=args.ray_address,
        workers=args.workers,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        gpus_per_worker=args.gpus_per_worker,
        max_cells=args.max_cells,
        progress=args.progress,
        save_every=args.checkpoint_every,
    )
    print_grid_summary(result, args.out)
    return 0
