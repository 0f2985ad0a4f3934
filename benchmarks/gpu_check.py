"""GPU check, one command, about 10 minutes on one GPU: does the same code give the same numbers there, and how fast?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py --data-dir ../shared/data [--device cuda] [--steps 200]

1. MiniLM on SST-2 (real data): AdamW, SAM and FSAM for ``--steps`` steps in fp32, bf16 and fp16 (with the loss
   scale of ``optimizers/loss_scale.py``) on ``--device`` (fp32 only on a CPU); for each, throughput (training
   examples per second), the SAM / AdamW and FSAM / AdamW time ratios, and the peak GPU memory;
2. the first ``--cpu-steps`` steps of each fp32 run again on the CPU: the largest relative difference of the
   per-step training losses (float32 on two devices: expect about 1e-5, not 0);
3. a 25 x 25 surface of the fp32 AdamW run over 64 dev examples, and its Hessian top-5 eigenvalues and trace.

Prints a table and writes ``benchmarks/results/gpu_check.{json,md}``. ``--quick`` shrinks every size for a smoke
test (it runs on the CPU too, with ``--device cpu``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from analyses.curvature import HessianOptions, compute_hessian
from analyses.fisher import EmpiricalFisherMask
from landscape.core.atomic import write_json, write_text
from landscape.core.rundir import METRICS_FILE, read_records
from landscape.geometry.surface import compute_surface
from landscape.models.devices import resolve_device
from landscape.models.jobs import DataSelection
from landscape.training.config import TrainConfig
from landscape.training.loop import train

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("none", "sam", "fsam")


def train_losses(run_dir: Path) -> np.ndarray:
    return np.array([r["loss"] for r in read_records(run_dir / METRICS_FILE) if r.get("kind") == "train"])


def one_run(root: Path, args, sam: str, precision: str, device: str, steps: int, tag: str = "") -> dict:
    config = TrainConfig(
        task="sst2", model=args.model, data_dir=args.data_dir, out=str(root / f"{sam}-{precision}-{device}{tag}"),
        max_steps=steps, batch_size=args.batch_size, lr=2e-5, save_every=10**6, seed=0, dropout=0.0, sam=sam,
        rho=0.05, mask_interval=max(1, steps // 2), fisher_samples=64, precision=precision, device=device,
    )  # fmt: skip
    on_cuda = resolve_device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(config, progress=False, fisher=EmpiricalFisherMask())
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "sam": sam, "precision": precision, "device": device, "steps": steps, "seconds": seconds,
        "examples_per_second": steps * args.batch_size / seconds,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "losses": train_losses(Path(config.out)).tolist(), "run_dir": config.out,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cpu-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.cpu_steps, args.grid, args.batch_size = 4, 2, 3, 8
    device = str(resolve_device(args.device))
    report: dict = {"device": device, "name": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                    "torch": torch.__version__, "args": vars(args), "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # fp16 with the loss scale correct for SAM on the GPU; on the CPU (the smoke test) bf16 / fp16 are 20x slower
        precisions = ("fp32", "bf16", "fp16") if device.startswith("cuda") else ("fp32",)
        for precision in precisions:
            for sam in VARIANTS:
                report["runs"].append(one_run(root, args, sam, precision, device, args.steps))
                print(f"trained {sam} {precision} on {device}", flush=True)
        for sam in VARIANTS:
            cpu = one_run(root, args, sam, "fp32", "cpu", args.cpu_steps, tag="-reference")
            gpu = next(r for r in report["runs"] if r["sam"] == sam and r["precision"] == "fp32")
            n = min(len(cpu["losses"]), len(gpu["losses"]))
            difference = np.max(np.abs(np.array(gpu["losses"][:n]) / np.array(cpu["losses"][:n]) - 1))
            report.setdefault("cpu_vs_device", {})[sam] = float(difference)
        base = next(r for r in report["runs"] if r["sam"] == "none" and r["precision"] == "fp32")["run_dir"]
        data = DataSelection(samples=64, seed=0)
        start = time.perf_counter()
        surface = compute_surface(base, root / "surface", grid=args.grid, data=data, device=device)
        report["surface"] = {"grid": args.grid, "seconds": time.perf_counter() - start,
                             "loss_range": [float(np.nanmin(surface.arrays["loss"])),
                                            float(np.nanmax(surface.arrays["loss"]))]}  # fmt: skip
        start = time.perf_counter()
        hessian, _ = compute_hessian(base, root / "hessian", HessianOptions(top_k=5, trace=True, trace_samples=10),
                                     data=DataSelection(samples=64, seed=0), device=device)  # fmt: skip
        report["hessian"] = {"seconds": time.perf_counter() - start,
                             "eigenvalues": hessian.arrays["eigenvalues"].tolist(),
                             "trace": float(hessian.arrays["trace"])}  # fmt: skip
    for run in report["runs"]:
        run.pop("run_dir")
    lines = [f"# GPU check on {report['name']} (torch {report['torch']})", "",
             "| variant | precision | examples/s | × AdamW time | peak MiB |", "|---|---|---|---|---|"]  # fmt: skip
    for run in report["runs"]:
        adamw = next(r for r in report["runs"] if r["sam"] == "none" and r["precision"] == run["precision"])
        memory = "-" if run["peak_memory_mib"] is None else f"{run['peak_memory_mib']:.0f}"
        lines.append(f"| {run['sam']} | {run['precision']} | {run['examples_per_second']:.1f} | "
                     f"{run['seconds'] / adamw['seconds']:.2f} | {memory} |")  # fmt: skip
    lines += ["", f"CPU vs {device}, fp32, largest relative loss difference over {args.cpu_steps} steps: "
              + ", ".join(f"{k} {v:.1e}" for k, v in report["cpu_vs_device"].items()),
              f"surface {args.grid}x{args.grid}: {report['surface']['seconds']:.1f} s; "
              f"Hessian top-5 + trace: {report['hessian']['seconds']:.1f} s, "
              f"top {report['hessian']['eigenvalues'][0]:.4g}"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_json(RESULTS / "gpu_check.json", report)
        write_text(RESULTS / "gpu_check.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
