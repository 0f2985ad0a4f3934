"""``landscape fisher RUN``: distributions of the empirical Fisher (FSAM Eq. 9) and of the FSAM mask it induces."""

from __future__ import annotations

import argparse

from landscape.cli.common import (
    RUN_HELP,
    add_checkpoint_argument,
    add_data_arguments,
    add_output_arguments,
    add_weights_argument,
    data_selection,
    positive_int,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fisher",
        help="empirical Fisher distributions per layer and module type, FSAM mask shares and overlap",
        description="Per-example empirical Fisher diagonal (FSAM Eq. 9, as the FSAM mask computes it) of a run's "
        "weights on a seeded subset: log10 histograms and quantiles per layer and module type, the share of the "
        "top-(1-s) mask in each layer, and with --compare the mask IoU with another run or checkpoint.",
    )
    parser.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    parser.add_argument(
        "--sparsity", type=float, default=0.9, help="FSAM sparsity s: the mask keeps 1 - s (default 0.9)"
    )
    parser.add_argument(
        "--compare", metavar="RUN2", help="also the mask IoU with this run (same model) on the same examples"
    )
    parser.add_argument(
        "--compare-weights",
        choices=("final", "init"),
        help="which weights of RUN2 (default final); alone: compare with RUN's own",
    )
    add_weights_argument(parser)
    parser.add_argument(
        "--fisher-mode",
        choices=("per-example", "batch-mean"),
        default="per-example",
        help="per-example: FSAM Eq. 9 (default); batch-mean: the FSAM authors' code",
    )
    parser.add_argument("--bins", type=positive_int, default=60, help="log10 histogram bins (default 60)")
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        help="examples per block of per-example gradients (memory for speed; default: from the free memory, "
        "at most 32)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="batch size of the subset (default 32)")
    add_data_arguments(parser, samples=128, split="train")
    add_output_arguments(parser)
    add_checkpoint_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import math

    from analyses.fisher_distribution import compute_fisher
    from landscape.core.errors import ConfigError

    if not (math.isfinite(args.sparsity) and 0 <= args.sparsity < 1):
        raise ConfigError(f"--sparsity takes a number in [0, 1), got {args.sparsity}")
    data = data_selection(args)
    data.open_run(args.run_dir)  # refuses a bad run directory before anything is loaded
    result, skipped = compute_fisher(
        args.run_dir,
        args.out,
        checkpoint_every=args.checkpoint_every,
        sparsity=args.sparsity,
        compare=args.compare,
        compare_weights=args.compare_weights,
        weights=args.weights,
        mode=args.fisher_mode,
        bins=args.bins,
        data=data,
        overwrite=args.overwrite,
        device=args.device,
        chunk_size=args.chunk_size,
    )
    state = "already complete, nothing recomputed" if skipped else "written"
    overlap = f", mask IoU {result.meta['compare']['iou']:.4f}" if "compare" in result.meta else ""
    print(f"fisher result {state}: {args.out} (Fisher trace {result.meta['total_trace']:.4g}{overlap})")
    return 0
