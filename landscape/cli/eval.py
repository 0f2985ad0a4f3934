"""``landscape eval PATH``: evaluate a run directory or a checkpoint on a task's dev split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from landscape.cli.common import add_precision_argument, positive_int
from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.rundir import find_run_dir, read_run_info
from landscape.data.encoding import default_cache_dir, encode_split
from landscape.data.tasks import get_task, load_split, resolve_data_dir
from landscape.models.devices import autocast_context, resolve_device
from landscape.models.evaluation import evaluate
from landscape.models.loading import load_model
from landscape.models.weights import PICKLE_SUFFIXES, load_weights_into, read_safetensors


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a run or checkpoint",
        description="Evaluate a run directory (its final weights), one of its .safetensors files, or a "
        "checkpoint folder on a task's split. Task, model and data directory default to the run's own.",
    )
    parser.add_argument("path", help="run directory, .safetensors file, or checkpoint folder")
    parser.add_argument("--task", help="task to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="data directory (default: the run's, else $LANDSCAPE_DATA_DIR)")
    parser.add_argument("--model", help="architecture and tokenizer (default: the run's)")
    parser.add_argument("--weights", choices=("final", "init"), default="final", help="which weights of a run")
    parser.add_argument("--split", choices=("dev", "train"), default="dev")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    add_precision_argument(parser)
    parser.add_argument("--max-length", type=positive_int, help="maximum tokens per example (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(run=run)


def resolve_weights(path: Path, weights: str) -> Path:
    """The .safetensors file that ``path`` designates."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; expected a run directory or a .safetensors checkpoint")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            read_safetensors(path)  # raises the pickle refusal
        return path
    for candidate in (path / f"{weights}.safetensors", path / "model.safetensors"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path} holds no {weights}.safetensors or model.safetensors")


def run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0, got {args.batch_size}")
    path = Path(args.path)
    weights_file = resolve_weights(path, args.weights)
    run_dir = find_run_dir(path)
    run_config = read_run_info(run_dir)["config"] if run_dir else {}
    task_name = args.task or run_config.get("task")
    # A Hugging Face folder (save_pretrained, a Trainer checkpoint-N/) is its own architecture
    own_folder = str(path) if path.is_dir() and (path / "config.json").is_file() and not run_dir else None
    model_name = args.model or run_config.get("model") or own_folder
    if not task_name:
        raise ConfigError(f"{path} belongs to no run (no run.json); pass --task")
    if not model_name:
        raise ConfigError(f"{path} belongs to no run (no run.json); pass --model for its architecture")
    max_length = args.max_length if args.max_length is not None else run_config.get("max_length", 128)
    task = get_task(task_name)
    data_dir = resolve_data_dir(args.data_dir or run_config.get("data_dir"))
    examples = load_split(task, args.split, data_dir)
    device = resolve_device(args.device)  # before any loading: a machine without that device says so first
    loaded = load_model(model_name, task, seed=0)
    load_weights_into(loaded.model, weights_file)
    loaded.model.to(device)
    encoded = encode_split(
        examples,
        loaded.tokenizer,
        max_length=max_length,
        cache_dir=default_cache_dir(),
        cache_tag=f"{task.name}/{args.split}",
    )
    pad_id = loaded.tokenizer.pad_token_id or 0
    with autocast_context(device, args.precision):
        metrics = evaluate(loaded.model, encoded, task, batch_size=args.batch_size, pad_token_id=pad_id)
    if args.json:
        print(json.dumps({"weights": str(weights_file), "task": task.name, "split": args.split,
                          "precision": args.precision, **metrics}))  # fmt: skip
    else:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{weights_file} on {task.name} {args.split} ({len(encoded)} examples): {shown}")
    return 0
