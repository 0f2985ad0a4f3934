"""Arguments and helpers shared by the analysis commands (surface, interpolate, hessian, fisher, sharpness...)."""

from __future__ import annotations

import argparse
import math
import sys

from landscape.core.errors import ConfigError
from landscape.geometry.grids import EXECUTORS
from landscape.models.adapters import SUBSPACES
from landscape.models.devices import PRECISIONS
from landscape.models.jobs import DataSelection
from landscape.models.runs import SPLITS, WEIGHTS

RUN_HELP = (
    "run directory written by landscape train, or a model checkpoint: a Hugging Face folder (save_pretrained, "
    "safetensors), a Trainer checkpoint-N/ folder or a hub name; a checkpoint needs --task"
)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (the message names the bad value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str, *, zero_allowed: bool) -> float:
    """A finite number > 0 (>= 0 when ``zero_allowed``), or argparse's error naming the bad value."""
    expected = "a number >= 0" if zero_allowed else "a positive number"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _finite_float(text, zero_allowed=False)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite_float(text, zero_allowed=True)


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """``--weights {final,init}``: which of a run's weights are analysed (θ1 or θ0)."""
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="final",
        help="the run's final weights (θ1, default) or init (θ0; for a checkpoint: --init's)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, *, samples: int | None, split: str = "dev") -> None:
    """``--task --data-dir --split --samples --seed``: which examples an analysis evaluates on."""
    group = parser.add_argument_group("data (defaults: the run's task and data directory)")
    group.add_argument("--task", help="evaluate on this task instead of the run's (same number of labels)")
    group.add_argument("--data-dir", help="data directory (default: the run's, else $LANDSCAPE_DATA_DIR)")
    group.add_argument("--split", choices=SPLITS, default=split, help=f"split to evaluate on (default {split})")
    shown = "the whole split" if samples is None else str(samples)
    group.add_argument(
        "--samples",
        type=positive_int,
        default=samples,
        help=f"examples drawn with --seed; at or above the split's size: all (default {shown})",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the example subset and of random draws")
    group.add_argument(
        "--subspace",
        choices=SUBSPACES,
        default="full",
        help="for a PEFT adapter folder: perturb the weights with the adapter merged (full, default) or the "
        "adapter's own weights alone (adapter)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out --overwrite --progress/--no-progress --device``."""
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else MPS, else CPU), cpu, cuda, cuda:N or mps; results are the same files",
    )
    parser.add_argument("--out", required=True, help="result directory; a rerun with the same --out resumes")
    parser.add_argument("--overwrite", action="store_true", help="replace a result computed with other parameters")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint-every SECONDS``: how often a long computation keeps its partial state for a resume."""
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="keep the partial state (a grid's finished cells; a Lanczos basis, Hutchinson samples, Fisher sums) at "
        "most this often, and at once on an interruption; a rerun after a kill resumes (default 60; 0: every step)",
    )


def data_selection(args: argparse.Namespace) -> DataSelection:
    """The :class:`DataSelection` of ``add_data_arguments``'s flags (and ``--batch-size``)."""
    return DataSelection(
        split=args.split,
        samples=args.samples,
        seed=args.seed,
        task=args.task,
        data_dir=args.data_dir,
        batch_size=getattr(args, "batch_size", 32),
        subspace=getattr(args, "subspace", "full"),
    )


def check_range(values: list[float], flag: str) -> tuple[float, float]:
    """Two numbers ``A B`` with ``A < B`` given as ``flag``."""
    low, high = float(values[0]), float(values[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{flag} takes finite numbers, got {low} {high}")
    if not low < high:
        raise ConfigError(f"{flag} needs A < B, got {low} {high}")
    return low, high


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor --ray-address --workers --gpus-per-worker``."""
    parser.add_argument("--executor", choices=EXECUTORS, default="serial", help="where cells are computed")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    parser.add_argument("--workers", type=positive_int, help="Ray workers (default: one per CPU)")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs each Ray worker reserves (a fraction shares one GPU); each worker computes on its own "
        "(default 0: CPU workers)",
    )


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the forward passes of an evaluation in fp32 (default) or under bf16 / fp16 autocast.

    Only for evaluations (eval, surfaces, interpolations): curvature and Fisher stay in full precision
    (docs/pitfalls.md §29)."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default), or the forward passes under bf16 / fp16 autocast (faster on GPUs; recorded in the "
        "result and part of its identity)",
    )


def print_grid_summary(result, out) -> None:
    """One line: where the result is, how much of it is done, and the loss at the origin when computed."""
    import numpy as np

    done = np.asarray(result.arrays["done"])
    loss = np.asarray(result.arrays["loss"])
    finite = loss[done & np.isfinite(loss)]
    span = f", loss {finite.min():.4g} .. {finite.max():.4g}" if finite.size else ""
    bad = int((done & ~np.isfinite(loss)).sum())
    warning = (
        f"; {bad} cells with a non-finite loss (NaN/inf): the surface leaves the model's stable region" if bad else ""
    )
    print(f"{result.kind} written to {out} ({int(done.sum())}/{done.size} cells{span}{warning})")
