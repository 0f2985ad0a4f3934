"""``landscape surface RUN``: loss and metric on a 1-D or 2-D grid along filter-normalised random directions."""

from __future__ import annotations

import argparse

from landscape.cli.common import (
    RUN_HELP,
    add_checkpoint_argument,
    add_data_arguments,
    add_executor_arguments,
    add_output_arguments,
    add_precision_argument,
    add_weights_argument,
    check_range,
    data_selection,
    positive_int,
    print_grid_summary,
)
from landscape.geometry.directions import NORMS
from landscape.geometry.surface import MAX_CELLS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "surface",
        help="loss surface along random directions (1-D or 2-D)",
        description="Loss and the task's metric at θ + a·d1 (+ b·d2) for the run's final weights θ, along seeded "
        "filter-normalised Gaussian directions (Li et al. 2018). Resumable: rerun with the same --out.",
    )
    parser.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    parser.add_argument("--dims", type=int, choices=(1, 2), default=2, help="1-D line or 2-D grid (default 2)")
    parser.add_argument(
        "--grid",
        type=int,
        nargs="+",
        default=[25],
        metavar="N",
        help="points per axis: N, or N_A N_B for a non-square grid (default 25)",
    )
    parser.add_argument(
        "--range",
        type=float,
        nargs=2,
        default=[-1.0, 1.0],
        metavar=("A", "B"),
        help="coefficient range of every axis (default -1 1)",
    )
    parser.add_argument("--range-b", type=float, nargs=2, metavar=("A", "B"), help="range of b (default: --range)")
    parser.add_argument("--norm", choices=NORMS, default="filter", help="direction normalisation (default filter)")
    parser.add_argument(
        "--ignore-1d",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="zero direction for biases and LayerNorm (default: on, as Li et al.)",
    )
    parser.add_argument("--orthogonal", action="store_true", help="orthogonalise the second direction")
    add_weights_argument(parser)
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
    parser.add_argument(
        "--dry-run", action="store_true", help="time a few cells on this machine, print the cost, write nothing"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from landscape.core.errors import ConfigError
    from landscape.geometry.surface import compute_surface

    if len(args.grid) > 2 or any(n < 2 for n in args.grid):
        raise ConfigError(f"--grid takes N or N_A N_B, each >= 2, got {' '.join(map(str, args.grid))}")
    grid = args.grid[0] if len(args.grid) == 1 else (args.grid[0], args.grid[1])
    if args.dry_run:
        from landscape.geometry.surface import estimate_surface

        plan = estimate_surface(args.run_dir, dims=args.dims, grid=grid, data=data_selection(args),
                                weights=args.weights, device=args.device, precision=args.precision,
                                save_every=args.checkpoint_every)  # fmt: skip
        print(plan.describe())
        return 0
    result = compute_surface(
        args.run_dir,
        args.out,
        dims=args.dims,
        grid=grid,
        range_a=check_range(args.range, "--range"),
        range_b=None if args.range_b is None else check_range(args.range_b, "--range-b"),
        norm=args.norm,
        ignore_1d=args.ignore_1d,
        orthogonal=args.orthogonal,
        data=data_selection(args),
        weights=args.weights,
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
