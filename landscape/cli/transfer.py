"""``landscape transfer``: cross-task transfer of a fine-tuned run (see :mod:`analyses.transfer`)."""

from __future__ import annotations

import argparse

from analyses.transfer import DEFAULT_LR, DEFAULT_TARGETS, MODES, TransferRecipe, format_table, parse_targets, transfer
from landscape.cli.common import add_output_arguments, positive_int
from landscape.core.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = TransferRecipe()
    parser = subparsers.add_parser(
        "transfer",
        help="fine-tune a run's encoder on other tasks, against the pretrained model",
        description="For each target task, train from the source run's encoder and, with the same recipe and "
        "seed, from the pretrained model; compare their dev metrics. A rerun with the same --out resumes.",
    )
    parser.add_argument("--source", required=True, help="run directory of the source run (landscape train --out)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated target tasks (default {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="finetune",
        help="finetune: train every parameter; probe: the head alone on the frozen encoder",
    )
    recipe = parser.add_argument_group("recipe (the same for every run)")
    lrs = ", ".join(f"{mode} {lr:g}" for mode, lr in DEFAULT_LR.items())
    recipe.add_argument("--lr", type=float, help=f"peak learning rate (default: {lrs})")
    recipe.add_argument("--epochs", type=positive_int, help="training epochs (used when --max-steps is not given)")
    recipe.add_argument("--max-steps", type=positive_int, help=f"training steps per run (default {defaults.max_steps})")
    recipe.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help=f"training batch size (default {defaults.batch_size})",
    )
    recipe.add_argument(
        "--train-fraction",
        type=float,
        default=defaults.train_fraction,
        help="train on a seeded subsample of this fraction of each training set (default 1)",
    )
    recipe.add_argument(
        "--max-length",
        type=positive_int,
        default=defaults.max_length,
        help=f"maximum tokens per example (default {defaults.max_length})",
    )
    recipe.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"seed of the head, data order, subsample and dropout (default {defaults.seed})",
    )
    parser.add_argument("--data-dir", help="data directory (default: the source run's, else $LANDSCAPE_DATA_DIR)")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def recipe_from_args(args: argparse.Namespace) -> TransferRecipe:
    """The recipe of the flags; ``--epochs`` alone trains for epochs, otherwise for steps."""
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.train_fraction <= 1:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    max_steps = args.max_steps
    if max_steps is None and args.epochs is None:
        max_steps = TransferRecipe().max_steps
    return TransferRecipe(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=max_steps,
        batch_size=args.batch_size,
        train_fraction=args.train_fraction,
        max_length=args.max_length,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    targets = parse_targets(args.targets)
    result = transfer(
        args.source,
        targets,
        mode=args.mode,
        recipe=recipe_from_args(args),
        out=args.out,
        data_dir=args.data_dir,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    print(f"transfer result written to {args.out}")
    print(format_table(result))
    return 0
