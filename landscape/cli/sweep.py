"""``landscape sweep SPEC.yaml --out DIR``: a grid of training runs and their analyses (see :mod:`analyses.sweep`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from landscape.cli.common import positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train a grid of runs (and analyse each), resumable",
        description="Train every trial of a sweep spec (base options, a grid and zip of option values, analyses "
        "of each finished trial) into OUT/trials/<name>; a rerun skips finished trials and resumes the others; a "
        "failed trial is recorded in OUT/sweep.json and the others go on.",
    )
    parser.add_argument("spec", help="YAML with base:, grid:, zip: and analyses:")
    parser.add_argument("--out", required=True, help="sweep directory")
    parser.add_argument("--dry-run", action="store_true", help="list the trials, their state and their cost")
    parser.add_argument("--executor", choices=("serial", "ray"), default="serial", help="where trials run")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    parser.add_argument(
        "--cpus-per-trial", type=positive_int, default=1, help="Ray: CPUs (and torch threads) of each trial"
    )
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="Ray: GPUs of each trial (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from analyses.fisher import EmpiricalFisherMask
    from analyses.sweep import plan, read_spec, run_sweep

    if args.dry_run:
        rows = plan(read_spec(args.spec), Path(args.out), calibrate=True, fisher=EmpiricalFisherMask())
        total = 0.0
        for row in rows:
            config, steps, per_step = row["config"], row["steps"], row["seconds_per_step"]
            cost = "time unknown"
            if per_step and steps:
                cost = f"~{per_step * steps:.0f} s ({per_step:.3g} s/step, {row['seconds_source']})"
                total += per_step * steps if row["state"] != "done" else 0.0
            print(f"{row['name']}: {row['state']}, {config.sam} on {config.task}, {steps or '?'} steps, {cost}")
        todo = sum(row["state"] != "done" for row in rows)
        print(
            f"{len(rows)} trials, {todo} to train, ~{total / 60:.1f} min of training on this machine (seconds per "
            "step from finished trials of the same cost, else 2 steps timed now; analyses and evaluations not counted)"
        )
        return 0
    record = run_sweep(
        args.spec,
        args.out,
        dispatch=args.dispatch,
        fisher=EmpiricalFisherMask(),
        executor=args.executor,
        ray_address=args.ray_address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
    )
    failed = [name for name, trial in record["trials"].items() if trial["status"] == "failed"]
    print(f"sweep {args.out}: {len(record['trials']) - len(failed)} trials completed, {len(failed)} failed")
    return 1 if failed else 0
