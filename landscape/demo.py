"""The end-to-end demo: fine-tune with AdamW, SAM, FSAM and δ-SAM, analyse every run, draw the figures, write a report.

Each stage is one ``landscape`` command run in this process (so the demo does exactly what a user would type),
and each is skipped when its output is already complete: a finished run is ``rundir.is_complete``, a finished
analysis a result whose ``meta.json`` says ``complete``. An interrupted demo started again therefore resumes
where it stopped; the training and surface stages themselves resume mid-way.

Layout under ``out``::

    runs/<optimizer>/                 a training run (run.json, init/final.safetensors, metrics.jsonl)
    runs/<optimizer>/analyses/<name>/ its analyses: interpolation, surface, hessian, fisher, sharpness
    figures/                          every figure (PDF, PNG, interactive HTML)
    report.html                       the self-contained report
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from landscape.core.errors import ConfigError
from landscape.core.rundir import has_run, is_complete, read_run_info

# The optimizers the demo compares: (folder name, `landscape train` options).
OPTIMIZERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("adamw", ("--optimizer", "adamw")),
    ("sam", ("--optimizer", "adamw", "--sam", "sam")),
    ("fsam", ("--optimizer", "adamw", "--sam", "fsam")),
    ("delta-sam", ("--optimizer", "adamw", "--sam", "delta-sam")),
)


@dataclass(frozen=True)
class Budget:
    """How much of everything the demo computes; :data:`FULL` fits 15 minutes on 2 CPU cores (SST-2, MiniLM)."""

    train_steps: int
    batch_size: int
    lr: float
    eval_every: int
    max_length: int
    fisher_samples: int  # FSAM's N_Fisher per mask refresh
    mask_interval: int  # FSAM's F_i
    samples: int  # examples of the surface and the interpolation (dev split)
    curvature_samples: int  # examples of the Hessian, Fisher and sharpness analyses (per-example gradients: costly)
    interpolation_points: int
    grid: int  # the 2-D surface is grid × grid
    top_k: int
    hessian_max_iter: int  # Lanczos steps
    trace_samples: int
    rho: tuple[float, ...]
    sigma: tuple[float, ...]
    gaussian_samples: int
    pgd_steps: int


FULL = Budget(
    train_steps=80,
    batch_size=16,
    lr=1e-4,  # 80 steps: at 5e-5 SAM and FSAM were still at chance level (51 %, 52 % dev accuracy)
    eval_every=40,
    max_length=64,
    fisher_samples=32,
    mask_interval=40,
    samples=32,
    curvature_samples=16,
    interpolation_points=11,
    grid=7,
    top_k=2,
    hessian_max_iter=20,
    trace_samples=4,
    rho=(0.01, 0.05),
    sigma=(0.005,),
    gaussian_samples=2,
    pgd_steps=2,
)
QUICK = Budget(
    train_steps=4,
    batch_size=8,
    lr=5e-5,
    eval_every=2,
    max_length=32,
    fisher_samples=8,
    mask_interval=2,
    samples=16,
    curvature_samples=8,
    interpolation_points=5,
    grid=3,
    top_k=2,
    hessian_max_iter=6,
    trace_samples=3,
    rho=(0.05,),
    sigma=(0.005,),
    gaussian_samples=2,
    pgd_steps=2,
)


@dataclass(frozen=True)
class Stage:
    """One command of the demo: its label, its ``landscape`` argv, and how to tell it is already done."""

    label: str
    argv: tuple[str, ...]
    is_done: Callable[[], bool]


def _result_complete(directory: Path) -> bool:
    meta = directory / "meta.json"
    if not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text(encoding="utf-8")).get("complete", True))
    except ValueError:
        return False


def plan(
    out: Path, *, task: str, model: str, data_dir: str | None, budget: Budget, seed: int, device: str = "auto"
) -> list[Stage]:
    """Every stage of the demo, in order; training and every analysis compute on ``device``."""
    data = ["--data-dir", data_dir] if data_dir else []
    stages: list[Stage] = []
    runs = []
    for name, options in OPTIMIZERS:
        run = out / "runs" / name
        runs.append(run)
        argv = [
            "train",
            "--task",
            task,
            "--model",
            model,
            *data,
            *options,
            "--out",
            str(run),
            "--max-steps",
            str(budget.train_steps),
            "--batch-size",
            str(budget.batch_size),
            "--lr",
            str(budget.lr),
            "--eval-every",
            str(budget.eval_every),
            "--max-length",
            str(budget.max_length),
            "--seed",
            str(seed),
            "--fisher-samples",
            str(budget.fisher_samples),
            "--mask-interval",
            str(budget.mask_interval),
        ]
        argv += ["--device", device]
        if has_run(run):
            argv.append("--resume")
        stages.append(Stage(f"train {name}", tuple(argv), lambda run=run: is_complete(run)))
    common = ["--seed", str(seed), "--device", device]
    surface_data = ["--samples", str(budget.samples)]
    curvature_data = ["--samples", str(budget.curvature_samples)]
    for run in runs:
        analyses = run / "analyses"
        name = run.name
        per_run = [
            ("interpolation", ["interpolate", str(run), "--points", str(budget.interpolation_points), *surface_data]),
            ("surface", ["surface", str(run), "--grid", str(budget.grid), *surface_data]),
            (
                "hessian",
                [
                    "hessian",
                    str(run),
                    "--top-k",
                    str(budget.top_k),
                    "--max-iter",
                    str(budget.hessian_max_iter),
                    "--trace",
                    "--trace-samples",
                    str(budget.trace_samples),
                    *curvature_data,
                ],
            ),
            ("fisher", ["fisher", str(run), *curvature_data]),
            (
                "sharpness",
                [
                    "sharpness",
                    str(run),
                    "--rho",
                    *map(str, budget.rho),
                    "--sigma",
                    *map(str, budget.sigma),
                    "--gaussian-samples",
                    str(budget.gaussian_samples),
                    "--pgd-steps",
                    str(budget.pgd_steps),
                    *curvature_data,
                ],
            ),
        ]
        for kind, argv in per_run:
            target = analyses / kind
            stages.append(
                Stage(f"{kind} {name}", (*argv, *common, "--out", str(target)), lambda t=target: _result_complete(t))
            )
    # Figures and report are cheap and always redrawn from the results.
    run_args = [str(run) for run in runs]
    stages.append(Stage("figures", ("figures", *run_args, "--out", str(out / "figures")), lambda: False))
    stages.append(Stage("report", ("report", *run_args, "--out", str(out / "report.html")), lambda: False))
    return stages


def run_demo(
    out: str | Path,
    *,
    task: str = "sst2",
    model: str = "minilm",
    data_dir: str | None = None,
    quick: bool = False,
    seed: int = 42,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    dispatch: Callable[[list[str]], int],
) -> Path:
    """Run (or resume) every stage; return the path of the report. Raises :class:`ConfigError` on a failed stage.

    ``dispatch(argv) -> exit status`` runs one ``landscape`` command in-process (``landscape.cli.main.main``).
    """

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    budget = QUICK if quick else FULL
    stages = plan(out, task=task, model=model, data_dir=data_dir, budget=budget, seed=seed, device=device)
    started = time.perf_counter()
    for number, stage in enumerate(stages, start=1):
        prefix = f"[{number}/{len(stages)}] {stage.label}"
        if stage.is_done():
            log(f"{prefix}: already done, skipped")
            continue
        log(f"{prefix} ...")
        stage_start = time.perf_counter()
        code = dispatch(list(stage.argv))
        if code != 0:
            raise ConfigError(f"demo stage '{stage.label}' failed (exit {code}): landscape {' '.join(stage.argv)}")
        log(
            f"{prefix}: done in {time.perf_counter() - stage_start:.0f} s (total {time.perf_counter() - started:.0f} s)"
        )
    return out / "report.html"


def summary(out: str | Path, names: Sequence[str] = tuple(name for name, _ in OPTIMIZERS)) -> list[dict[str, object]]:
    """Per run: dev metric, surface loss spread, top Hessian eigenvalue and trace, read back from the results."""
    import numpy as np

    from landscape.core.results import load_result

    rows = []
    for name in names:
        run = Path(out) / "runs" / name
        row: dict[str, object] = {"run": name}
        run_json = read_run_info(run)
        row.update({f"dev_{k}": v for k, v in (run_json.get("dev_metrics") or {}).items()})
        surface = load_result(run / "analyses" / "surface")
        loss = np.asarray(surface.arrays["loss"])
        centre = loss[loss.shape[0] // 2, loss.shape[1] // 2]
        row["surface_loss_origin"] = float(centre)
        row["surface_mean_rise"] = float(np.nanmean(loss) - centre)  # lower: a flatter surface
        hessian = load_result(run / "analyses" / "hessian")
        row["top_eigenvalue"] = float(np.max(hessian.arrays["eigenvalues"]))
        if "trace" in hessian.arrays:
            row["trace"] = float(hessian.arrays["trace"])
        rows.append(row)
    return rows
