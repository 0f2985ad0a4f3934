"""Benchmark: the cost of a 2-D loss surface against bare forwards, and against ``loss_landscapes.random_plane``.

On ``minilm`` with an 11 × 11 grid over 64 real examples (CoLA dev by default), in one process:

1. ``t_forward``: the median time of one bare eval-mode forward over the same 64 examples (the same batches);
2. ``landscape.geometry.surface.compute_surface`` end to end (loading, directions, 121 cells, a result save per cell);
   the goal is total ≤ 1.10 × 121 × ``t_forward``;
3. ``loss_landscapes.random_plane`` (PyPI ``loss-landscapes``) on the same model, grid size and batches, timed,
   and whether it leaves the model as it found it (weights bitwise, ``requires_grad`` flags, train/eval modes),
   next to the same check for ours;
4. the command a user runs: ``landscape surface`` from the CLI (a fresh process each time, ``--cli-samples``
   examples), timed as wall time for an 11 × 11 grid and for a 2 × 2 grid (the smallest the CLI takes), so that
   their difference ÷ 117 cells is the cost of one cell without the start-up; interleaved with bare forwards of
   the same batches, ``--cli-repeats`` times, in a rotating order. Goal: one cell ≤ 1.05 × a bare forward.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/surface.py --data-dir ../shared/data

Writes ``benchmarks/results/surface.{json,md}``. Needs ``pip install loss-landscapes`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from landscape.core.atomic import write_json, write_text  # noqa: E402
from landscape.data.losses import model_inputs  # noqa: E402
from landscape.data.tasks import get_task  # noqa: E402
from landscape.geometry.surface import compute_surface  # noqa: E402
from landscape.models.jobs import DataSelection  # noqa: E402
from landscape.models.loading import load_model  # noqa: E402
from landscape.models.runs import evaluate_subset, open_run, select_subset  # noqa: E402
from landscape.models.weights import save_weights  # noqa: E402


def forward_timer(model: torch.nn.Module, subset) -> Callable[[], float]:
    """A function timing one bare eval-mode forward of ``model`` over the subset's batches (seconds)."""

    def bare_forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in subset.batches:
                model(**model_inputs(batch))
        return time.perf_counter() - start

    return bare_forward


def model_state(model: torch.nn.Module) -> tuple[dict[str, bytes], dict[str, bool], dict[str, bool]]:
    """Weights (bytes), requires_grad flags and module modes: what "left as found" compares."""
    weights = {name: p.detach().numpy().tobytes() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    return weights, flags, modes


def compare_states(before, after) -> dict[str, object]:
    changed_weights = sum(before[0][k] != after[0][k] for k in before[0])
    changed_flags = sum(before[1][k] != after[1][k] for k in before[1])
    changed_modes = sum(before[2][k] != after[2][k] for k in before[2])
    return {
        "left_as_found": changed_weights == changed_flags == changed_modes == 0,
        "tensors_changed": int(changed_weights),
        "requires_grad_flags_changed": int(changed_flags),
        "module_modes_changed": int(changed_modes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--task", default="cola")
    parser.add_argument("--grid", type=int, default=11)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "surface"))
    parser.add_argument("--skip-peer", action="store_true", help="do not run loss_landscapes")
    parser.add_argument("--cli-repeats", type=int, default=3, help="interleaved CLI repetitions (0: none)")
    parser.add_argument("--cli-samples", type=int, default=32, help="examples of the CLI measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        # A run directory holding MiniLM with a seeded head for the task: the surface needs only run.json + weights.
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        task = get_task(args.task)
        loaded = load_model("minilm", task, seed=0)
        # The freshly initialised biases (classifier, pooler) are all zero, on which loss_landscapes divides by
        # zero: its filter normalisation rescales a 1-D tensor as a whole and then again element by element.
        # Trained biases are nonzero; draw small seeded ones so that both tools run on the same model.
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in loaded.model.parameters():
                if parameter.dim() == 1 and not parameter.any():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        save_weights(run_dir / "final.safetensors", loaded.model)
        config = {"task": task.name, "model": "minilm", "data_dir": args.data_dir, "max_length": 128, "seed": 0}
        (run_dir / "run.json").write_text(json.dumps({"config": config}))
        run = open_run(run_dir)
        model = loaded.model
        model.eval()
        subset = select_subset(run, loaded.tokenizer, samples=args.samples, seed=0, batch_size=args.batch_size)

        bare_forward = forward_timer(model, subset)
        bare_forward()  # warm-up
        forwards = [bare_forward() for _ in range(args.forward_repeats)]
        t_forward = statistics.median(forwards)
        cells = args.grid * args.grid

        start = time.perf_counter()
        selection = DataSelection(samples=args.samples, seed=0, batch_size=args.batch_size)
        ours = compute_surface(run_dir, Path(tmp) / "surface", grid=args.grid, data=selection)
        ours_total = time.perf_counter() - start
        ours_grid = float(ours.meta["wall_time_s"])

        # Ours on a model the caller holds: the CellEvaluator's restore guarantee, checked the same way.
        from landscape.geometry.directions import load_directions
        from landscape.geometry.grids import CellEvaluator

        directions, _ = load_directions(Path(tmp) / "surface" / "directions.safetensors")
        before = model_state(model)
        with CellEvaluator(model, subset, directions) as evaluator:
            evaluator((0.5, -0.5))
        ours_state = compare_states(before, model_state(model))

        peer: dict[str, object] = {"ran": False}
        if not args.skip_peer:
            try:
                import loss_landscapes
                from loss_landscapes.metrics import Metric
            except ImportError:
                peer = {"ran": False, "reason": "loss-landscapes is not installed (pip install loss-landscapes)"}
            else:

                class SubsetLoss(Metric):
                    """The same evaluation as ours: mean per-example loss over the same batches."""

                    def __call__(self, model_wrapper) -> float:
                        return evaluate_subset(model, subset).loss

                before = model_state(model)
                start = time.perf_counter()
                peer_values = loss_landscapes.random_plane(model, SubsetLoss(), distance=1, steps=args.grid,
                                                           normalization="filter", deepcopy_model=False)  # fmt: skip
                peer_total = time.perf_counter() - start
                peer = {
                    "ran": True,
                    "version": _version("loss-landscapes"),
                    "total_s": peer_total,
                    "ratio_to_cells_x_forward": peer_total / (cells * t_forward),
                    "values_shape": list(np.asarray(peer_values).shape),
                    "finite_values": int(np.isfinite(np.asarray(peer_values, dtype=float)).sum()),
                    **compare_states(before, model_state(model)),
                }

        cli = cli_cell_cost(run_dir, Path(tmp), args) if args.cli_repeats > 0 else {"ran": False}

    goal = 1.10
    ratio_total = ours_total / (cells * t_forward)
    report = {
        "task": args.task, "grid": [args.grid, args.grid], "samples": args.samples, "batch_size": args.batch_size,
        "threads": args.threads, "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "t_forward_s": t_forward, "t_forward_all_s": forwards, "cells": cells,
        "ours": {"total_s": ours_total, "grid_only_s": ours_grid, "ratio_total": ratio_total,
                 "ratio_grid_only": ours_grid / (cells * t_forward), "goal": goal, "pass": ratio_total <= goal,
                 **ours_state},
        "loss_landscapes": peer,
        "cli": cli,
        "torch": torch.__version__,
    }  # fmt: skip
    if peer.get("ran"):
        report["peer_over_ours"] = float(peer["total_s"]) / ours_total
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), report)
    write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


def cli_cell_cost(run_dir: Path, tmp: Path, args: argparse.Namespace) -> dict[str, object]:
    """Wall time of ``landscape surface`` from the CLI at 11 × 11 and 2 × 2, interleaved with bare forwards of the
    same examples in this process; one cell = (t_11x11 − t_2x2) / 117, paired per repetition."""
    import subprocess

    run = open_run(run_dir)
    loaded = load_model("minilm", run.task, seed=0)
    model = loaded.model.eval()
    subset = select_subset(run, loaded.tokenizer, samples=args.cli_samples, seed=0, batch_size=args.batch_size)
    bare_forward = forward_timer(model, subset)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}

    def command(grid: int, repeat: int) -> float:
        out = tmp / f"cli-{grid}-{repeat}"
        argv = [sys.executable, "-m", "landscape", "surface", str(run_dir), "--grid", str(grid),
                "--samples", str(args.cli_samples), "--batch-size", str(args.batch_size), "--no-progress",
                "--out", str(out)]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    bare_forward()  # warm-up
    large, small, forwards = [], [], []
    for repeat in range(args.cli_repeats):
        steps = [lambda r: forwards.extend(bare_forward() for _ in range(3)),
                 lambda r: large.append(command(11, r)), lambda r: small.append(command(2, r))]  # fmt: skip
        for index in range(3):  # a rotating order: a slow period of the machine hits every measurement alike
            steps[(index + repeat) % 3](repeat)
    per_cell = [(a - b) / (121 - 4) for a, b in zip(large, small, strict=True)]
    forward = statistics.median(forwards)
    return {
        "ran": True, "samples": args.cli_samples, "repeats": args.cli_repeats, "t_11x11_s": large, "t_2x2_s": small,
        "per_cell_s": per_cell, "bare_forward_s": forwards, "ratio": statistics.median(per_cell) / forward,
        "ratios": [cell / forward for cell in per_cell], "goal": 1.05,
        "pass": statistics.median(per_cell) / forward <= 1.05,
    }  # fmt: skip


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def markdown(r: dict) -> str:
    ours, peer = r["ours"], r["loss_landscapes"]
    lines = [
        f"# Surface benchmark: minilm, {r['grid'][0]}×{r['grid'][1]} grid, {r['samples']} {r['task']} dev examples",
        "",
        f"torch {r['torch']}, {r['threads']} thread(s); load average {r['load_average_start'][0]:.2f} at the start, "
        f"{r['load_average_end'][0]:.2f} at the end. One bare eval-mode forward over the examples: "
        f"median {r['t_forward_s']:.3f} s of {len(r['t_forward_all_s'])}.",
        "",
        "| | total (s) | ÷ (cells × forward) | goal | verdict | left the model as found |",
        "|---|---:|---:|---:|---|---|",
        f"| ours, end to end | {ours['total_s']:.1f} | {ours['ratio_total']:.3f} | ≤ {ours['goal']:.2f} | "
        f"{'PASS' if ours['pass'] else 'FAIL'} | {'yes' if ours['left_as_found'] else 'no'} |",
        f"| ours, grid only (no loading) | {ours['grid_only_s']:.1f} | {ours['ratio_grid_only']:.3f} | | | |",
    ]
    if peer.get("ran"):
        found = "yes" if peer["left_as_found"] else (
            f"no: {peer['tensors_changed']} tensors moved, {peer['requires_grad_flags_changed']} requires_grad "
            f"flags changed, {peer['module_modes_changed']} module modes changed"
        )  # fmt: skip
        lines.append(
            f"| loss_landscapes.random_plane {peer['version']} | {peer['total_s']:.1f} | "
            f"{peer['ratio_to_cells_x_forward']:.3f} | | | {found} |"
        )
        lines += ["", f"loss_landscapes / ours (end to end): {r['peer_over_ours']:.3f}×."]
    else:
        lines += ["", f"loss_landscapes not run: {peer.get('reason', '--skip-peer')}"]
    cli = r.get("cli", {})
    if cli.get("ran"):
        lines += [
            "",
            f"## The CLI a user runs: `landscape surface`, {cli['samples']} examples, {cli['repeats']} interleaved "
            "repetitions",
            "",
            "One cell = (wall time of an 11 × 11 grid − that of a 2 × 2 grid) / 117, from fresh processes; a bare "
            "forward of the same batches timed in between.",
            "",
            "| repetition | 11 × 11 (s) | 2 × 2 (s) | one cell (s) | ÷ bare forward |",
            "|---:|---:|---:|---:|---:|",
        ]
        rows = zip(cli["t_11x11_s"], cli["t_2x2_s"], cli["per_cell_s"], cli["ratios"], strict=True)
        for i, (a, b, c, q) in enumerate(rows):
            lines.append(f"| {i + 1} | {a:.1f} | {b:.1f} | {c:.4f} | {q:.3f} |")
        verdict = "PASS" if cli["pass"] else "FAIL"
        lines += [
            "",
            f"Bare forward: median {statistics.median(cli['bare_forward_s']):.4f} s of {len(cli['bare_forward_s'])}. "
            f"Median one cell ÷ bare forward: **{cli['ratio']:.3f}** (goal ≤ {cli['goal']:.2f}: {verdict}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
