"""Data-parallel throughput, SAM's cost under data parallelism, and bf16 autocast on the CPU (issue #11).

What is measured: ``landscape train`` on the pretrained MiniLM (``minilm``) and real SST-2 training batches of
``--batch-size`` examples (the global batch), ``--steps`` steps, dropout on, run as the user runs it (a subprocess
per run; ``torchrun --standalone`` for the data-parallel runs, gloo backend). The time is run.json's
``timings.train_seconds`` of rank 0: the training loop alone (model loading, tokenisation and the final evaluation
excluded; no checkpoint is written inside the loop). Throughput = steps × global batch / train_seconds.

Configurations, each repeated ``--repeats`` times, the repetitions interleaved (repetition r runs every
configuration once, in an order that rotates with r, so a slow period of the shared machine hits all alike):

- 1 process × 1 thread (the baseline), 1 process × 2 threads, 2 processes × 1 thread (DDP), for AdamW and SAM;
- 1 process × 2 threads in bf16 autocast, for AdamW and SAM (against the fp32 runs of the same shape), over
  ``--bf16-steps`` steps only: this CPU has no native bf16 arithmetic and a first attempt measured 376 s for 20
  AdamW steps in bf16 against 18 s in fp32; times are compared per step.

Reported: medians, throughput ratios to the baseline (goal: DDP 2 × 1 ≥ 1.6× the 1 × 1 baseline), SAM / AdamW time
under DDP (goal ≤ 2.05), bf16 / fp32 step time (reported as measured). Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed.py --data-dir ../shared/data \\
        --steps 20 --repeats 3 --out benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = [
    # name, processes, threads per process, sam, precision
    ("adamw 1x1", 1, 1, "none", "fp32"),
    ("adamw 1x2", 1, 2, "none", "fp32"),
    ("adamw ddp 2x1", 2, 1, "none", "fp32"),
    ("sam 1x1", 1, 1, "sam", "fp32"),
    ("sam 1x2", 1, 2, "sam", "fp32"),
    ("sam ddp 2x1", 2, 1, "sam", "fp32"),
    ("adamw 1x2 bf16", 1, 2, "none", "bf16"),
    ("sam 1x2 bf16", 1, 2, "sam", "bf16"),
]


def steps_of(precision: str, args) -> int:
    return args.bf16_steps if precision == "bf16" else args.steps


def one_run(name, processes, threads, sam, precision, args, root: Path) -> float:
    """Seconds per training step of one run (rank 0's ``train_seconds`` over its steps)."""
    out = root / name.replace(" ", "-")
    steps = steps_of(precision, args)
    train = ["train", "--task", "sst2", "--model", args.model, "--data-dir", args.data_dir, "--out", str(out),
             "--batch-size", str(args.batch_size), "--max-steps", str(steps), "--save-every", "100000",
             "--sam", sam, "--precision", precision, "--device", "cpu", "--seed", "1", "--no-progress",
             "--overwrite"]  # fmt: skip
    if processes == 1:
        command = [sys.executable, "-m", "landscape", *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "landscape", *train]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "run.json").read_text())["timings"]["train_seconds"] / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/distributed.json")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name, *_ in CONFIGS}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]
            for name, processes, threads, sam, precision in order:
                value = one_run(name, processes, threads, sam, precision, args, Path(tmp))
                seconds[name].append(value)
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {value:.3f} s/step", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    throughput = {name: args.batch_size / value for name, value in median.items()}
    ratios = {
        "ddp_2x1_over_1x1_throughput_adamw": throughput["adamw ddp 2x1"] / throughput["adamw 1x1"],
        "ddp_2x1_over_1x1_throughput_sam": throughput["sam ddp 2x1"] / throughput["sam 1x1"],
        "1x2_over_1x1_throughput_adamw": throughput["adamw 1x2"] / throughput["adamw 1x1"],
        "ddp_2x1_over_1x2_throughput_adamw": throughput["adamw ddp 2x1"] / throughput["adamw 1x2"],
        "sam_over_adamw_time_ddp": median["sam ddp 2x1"] / median["adamw ddp 2x1"],
        "sam_over_adamw_time_1x1": median["sam 1x1"] / median["adamw 1x1"],
        "bf16_over_fp32_time_adamw": median["adamw 1x2 bf16"] / median["adamw 1x2"],
        "bf16_over_fp32_time_sam": median["sam 1x2 bf16"] / median["sam 1x2"],
    }
    goals = {
        "ddp_2x1_over_1x1_throughput_adamw": (">=", 1.6),
        "ddp_2x1_over_1x1_throughput_sam": (">=", 1.6),
        "sam_over_adamw_time_ddp": ("<=", 2.05),
    }
    report = {
        "command": " ".join(sys.argv),
        "settings": vars(args) | {"out": str(args.out)},
        "cpu_count": os.cpu_count(),
        "seconds_per_step": seconds,
        "median_seconds_per_step": median,
        "examples_per_second": throughput,
        "ratios": ratios,
        "goals": {
            key: {"goal": f"{op} {limit}", "passed": ratios[key] >= limit if op == ">=" else ratios[key] <= limit}
            for key, (op, limit) in goals.items()
        },
        "wall_seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    lines = [
        f"# Data parallel, SAM under DDP, bf16 on the CPU (global batch {args.batch_size})",
        "",
        f"`{report['command']}` on {os.cpu_count()} CPU cores; medians of {args.repeats} interleaved repetitions.",
        "",
        "| configuration | steps | median s/step | examples/s | × 1×1 throughput |",
        "|---|---|---|---|---|",
    ]
    for name, _, _, _, precision in CONFIGS:
        base = throughput[("sam" if name.startswith("sam") else "adamw") + " 1x1"]
        lines.append(
            f"| {name} | {steps_of(precision, args)} | {median[name]:.3f} | {throughput[name]:.1f} | "
            f"{throughput[name] / base:.2f} |"
        )
    lines += ["", "| ratio | value | goal |", "|---|---|---|"]
    for key, value in ratios.items():
        goal = report["goals"].get(key)
        verdict = f"{goal['goal']}: {'PASS' if goal['passed'] else 'FAIL'}" if goal else "reported"
        lines.append(f"| {key} | {value:.3f} | {verdict} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
