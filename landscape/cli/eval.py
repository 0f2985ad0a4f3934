"""``landscape eval PATH``: evaluate a run directory or a checkpoint on a task's dev split."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from landscape.cli.common import RUN_HELP, add_precision_argument, add_weights_argument, positive_int
from landscape.data.encoding import default_cache_dir, encode_split
from landscape.data.tasks import load_split
from landscape.models.devices import autocast_context, resolve_device
from landscape.models.evaluation import evaluate
from landscape.models.runs import load_run_model, open_run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a run or checkpoint",
        description="Evaluate a run directory (its final weights), one .safetensors file (a run's, or any with "
        "--model and --task), a model checkpoint or a PEFT adapter folder on a task's split. Task, model and data "
        "directory default to the run's own.",
    )
    parser.add_argument("path", help=RUN_HELP + "; or one .safetensors file")
    parser.add_argument("--task", help="task to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="data directory (default: the run's, else $LANDSCAPE_DATA_DIR)")
    parser.add_argument("--model", help="architecture and tokenizer (default: the run's)")
    add_weights_argument(parser)
    parser.add_argument("--split", choices=("dev", "train"), default="dev")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="evaluation batch size (default 64)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    add_precision_argument(parser)
    parser.add_argument("--max-length", type=positive_int, help="maximum tokens per example (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)  # before any loading: a machine without that device says so first
    # The analyses' one model source: a run, a .safetensors file, a checkpoint folder, an adapter or a hub name
    run = open_run(args.path, task=args.task, data_dir=args.data_dir, model=args.model)
    if args.max_length is not None:
        run = replace(run, max_length=args.max_length)
    loaded = load_run_model(run, args.weights, device=str(device))
    examples = load_split(run.task, args.split, run.data_dir)
    encoded = encode_split(
        examples,
        loaded.tokenizer,
        max_length=run.max_length,
        cache_dir=default_cache_dir(),
        cache_tag=f"{run.task.name}/{args.split}",
    )
    pad_id = loaded.tokenizer.pad_token_id or 0
    with autocast_context(device, args.precision):
        metrics = evaluate(loaded.model, encoded, run.task, batch_size=args.batch_size, pad_token_id=pad_id)
    # The file evaluated where there is one, else the checkpoint folder, adapter or hub name
    shown_path = str(run.weights_file(args.weights) if run.source in ("run", "file") else run.path)
    if args.json:
        print(json.dumps({"weights": shown_path, "task": run.task.name, "split": args.split,
                          "precision": args.precision, **metrics}))  # fmt: skip
    else:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{shown_path} on {run.task.name} {args.split} ({len(encoded)} examples): {shown}")
    return 0
