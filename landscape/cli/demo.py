"""``landscape demo``: the end-to-end demo (the README's main job)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune with AdamW, SAM, FSAM and δ-SAM, analyse each run, write figures and a report",
        description="The end-to-end demo on the offline MiniLM and a real task: four fine-tuning runs, then per run "
        "the interpolation, a 2-D surface, Hessian eigenvalues and trace, the Fisher distribution and the sharpness "
        "metrics, then figures and report.html. A rerun skips what is done. About 15 minutes on 2 CPU cores.",
    )
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    parser.add_argument("--task", default="sst2", help="task (default sst2)")
    parser.add_argument("--model", default="minilm", help="model (default minilm, offline)")
    parser.add_argument("--data-dir", help="data directory (default $LANDSCAPE_DATA_DIR, else the hub)")
    parser.add_argument("--seed", type=int, default=42, help="seed of training and analyses (default 42)")
    parser.add_argument(
        "--device", default="auto", help="where training and the analyses compute: auto (default), cpu, cuda, ..."
    )
    parser.add_argument("--quick", action="store_true", help="a smoke version with tiny budgets (minutes)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from landscape.demo import run_demo, summary

    started = time.perf_counter()
    report = run_demo(
        args.out,
        task=args.task,
        model=args.model,
        data_dir=args.data_dir,
        quick=args.quick,
        seed=args.seed,
        device=args.device,
        dispatch=args.dispatch,
    )
    for row in summary(args.out):
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"report written to {report} ({time.perf_counter() - started:.0f} s)")
    return 0
