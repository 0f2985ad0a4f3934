"""Cross-task transfer (FSAM Fig. 3, following Xu et al. 2021): does a fine-tuned encoder help on other tasks?

For each target task, two runs with one fixed :class:`TransferRecipe` (same optimizer, schedule, steps, seed, and
so the same freshly seeded head and data order): one starts from the source run's encoder, one from the
pretrained model the source run started from. Both are evaluated on the target's dev split; the result holds the
target's primary metric for each.

``mode="finetune"`` trains every parameter; ``mode="probe"`` trains the classification head alone on the frozen
encoder (a linear probe of the representation; the encoder is kept in eval mode, so without dropout).

The training runs live under ``<out>/runs/<target>-source/`` and ``<out>/runs/<target>-pretrained/``. A rerun
with the same parameters skips finished runs and resumes unfinished ones from their last checkpoint; the result
is saved after each finished target (``complete`` false, NaN and ``done`` False for the targets still to do).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from analyses.fisher import EmpiricalFisherMask
from landscape.core.errors import ConfigError, DataError
from landscape.core.locks import locks_output
from landscape.core.params import content_hash
from landscape.core.results import Result
from landscape.core.rundir import has_run, is_complete, read_run_info
from landscape.data.tasks import get_task, load_split, resolve_data_dir, task_names
from landscape.models.jobs import AnalysisJob
from landscape.models.runs import open_run
from landscape.models.weights import read_safetensors
from landscape.training.config import TrainConfig
from landscape.training.loop import TrainResult, prepare_run_dir, train

MODES = ("finetune", "probe")
ARMS = ("source", "pretrained")
DEFAULT_TARGETS = ("cola", "mrpc", "stsb", "rte")
# Peak learning rate when the recipe gives none: the whole model, or the head alone on a frozen encoder.
DEFAULT_LR = {"finetune": 5e-5, "probe": 1e-3}


@dataclass(frozen=True)
class TransferRecipe:
    """The one training recipe of every run of a transfer experiment (both arms, every target).

    The defaults are sized for a CPU: 100 steps of 16 examples per run (``max_steps`` overrides ``epochs``),
    10 % linear warm-up then linear decay, AdamW with weight decay 0.01 on matrices, gradients clipped to norm 1.
    ``lr`` None means :data:`DEFAULT_LR` of the mode.
    """

    optimizer: str = "adamw"
    lr: float | None = None
    epochs: int | None = None
    max_steps: int | None = 100
    batch_size: int = 16
    train_fraction: float = 1.0
    max_length: int = 128
    seed: int = 42
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01

    def resolved(self, mode: str) -> TransferRecipe:
        """The recipe with the mode's learning rate filled in and every value checked."""
        check_mode(mode)
        recipe = replace(self, lr=self.lr if self.lr is not None else DEFAULT_LR[mode])
        if recipe.epochs is None and recipe.max_steps is None:
            raise ConfigError("the transfer recipe needs epochs or max_steps")
        return recipe


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"transfer mode {mode!r} is unknown; expected one of {', '.join(MODES)}")


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """Canonical task names of ``targets`` (a list, or one comma-separated string); every unknown one is named."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [name for name in names if name]
    if not names:
        raise ConfigError("no target task given; expected e.g. cola,mrpc,stsb,rte")
    canonical, unknown = [], []
    for name in names:
        try:
            canonical.append(get_task(name).name)
        except DataError:
            unknown.append(name)
    if unknown:
        listed = ", ".join(repr(name) for name in unknown)
        raise ConfigError(f"unknown target task(s) {listed}; known tasks: {', '.join(task_names())}")
    repeated = sorted({name for name in canonical if canonical.count(name) > 1})
    if repeated:
        raise ConfigError(f"target task(s) given twice: {', '.join(repeated)}")
    return canonical


def run_config(
    source_run: Any, target: str, arm: str, mode: str, recipe: TransferRecipe, out: Path, data_dir: Path | None
) -> TrainConfig:
    """The trainer's config of one run: ``arm`` "source" starts from the source run's final weights."""
    return TrainConfig(
        task=target,
        model=source_run.model,
        data_dir=None if data_dir is None else str(data_dir),
        out=str(out / "runs" / f"{target}-{arm}"),
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        warmup_ratio=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        max_length=recipe.max_length,
        train_fraction=recipe.train_fraction,
        seed=recipe.seed,
        init_from=str(source_run.weights_file("final")) if arm == "source" else None,
        freeze_encoder=mode == "probe",
    )


def finished_run_metrics(config: TrainConfig) -> dict[str, float] | None:
    """The dev metrics of the run at ``config.out`` if it finished with this config, else None (train it)."""
    run_dir = Path(config.out)
    if not has_run(run_dir):
        return None
    prepare_run_dir(run_dir, config.resolved(), resume=True, overwrite=False)  # refuses a run of other options
    info = read_run_info(run_dir)
    if is_complete(run_dir, info):
        return info["dev_metrics"]
    return None


def train_arm(config: TrainConfig, *, progress: bool) -> dict[str, float]:
    """Dev metrics of one run: read from a finished run, else trained (resumed when the run was interrupted)."""
    metrics = finished_run_metrics(config)
    if metrics is not None:
        return metrics
    resume = has_run(config.out)
    result: TrainResult = train(config, resume=resume, progress=progress, fisher=EmpiricalFisherMask())
    return result.dev_metrics


def json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics for ``meta.json``, which holds no NaN: a non-finite value (Pearson of constant predictions) is null."""
    return {name: float(value) if np.isfinite(value) else None for name, value in metrics.items()}


def metric_value(metrics: dict[str, dict[str, dict[str, float | None]]], target: str, arm: str, name: str) -> float:
    """One stored metric, NaN where the target is not done or the value was not finite."""
    value = metrics.get(target, {}).get(arm, {}).get(name)
    return np.nan if value is None else float(value)


@locks_output()
def transfer(
    source_run: str | Path,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    *,
    mode: str = "finetune",
    recipe: TransferRecipe | None = None,
    out: str | Path,
    data_dir: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Result:
    """Train every target from ``source_run``'s encoder and from the pretrained model; return the ``transfer`` result.

    ``data_dir`` defaults to the source run's. A rerun with the same ``out`` and parameters resumes; other
    parameters are refused unless ``overwrite`` (which also deletes the runs under ``out/runs``).
    """
    check_mode(mode)
    recipe = (recipe or TransferRecipe()).resolved(mode)
    names = parse_targets(targets)
    source = open_run(source_run, data_dir=data_dir)
    source_weights = source.weights_file("final")
    chosen_data = resolve_data_dir(data_dir) if data_dir is not None else source.data_dir
    for name in names:  # missing or malformed data fails here, before any training
        for split in ("train", "dev"):
            load_split(get_task(name), split, chosen_data)
    out = Path(out)
    configs = {
        (name, arm): run_config(source, name, arm, mode, recipe, out, chosen_data) for name in names for arm in ARMS
    }
    for config in configs.values():  # every option is checked before anything is written
        config.resolved()
    identity = {
        "source_sha256": content_hash(read_safetensors(source_weights)),
        "model": source.model,
        "targets": names,
        "mode": mode,
        "recipe": asdict(recipe),
    }
    job = AnalysisJob("transfer", out, identity, overwrite=overwrite)
    if job.existing is None and overwrite:
        shutil.rmtree(out / "runs", ignore_errors=True)  # runs of the replaced result must not be resumed
    if job.complete is not None:
        return job.complete
    existing_runs = {} if job.existing is None else job.existing.meta.get("runs", {})
    metrics: dict[str, dict[str, dict[str, float]]] = {k: v for k, v in existing_runs.items() if k in names}

    def save(complete: bool) -> Result:
        primary = [get_task(name).primary_metric for name in names]
        values = {
            arm: np.array(
                [metric_value(metrics, n, arm, m) for n, m in zip(names, primary, strict=True)],
                dtype=np.float64,
            )
            for arm in ARMS
        }
        arrays = {
            "targets": np.array(names, dtype=str),
            "metric_names": np.array(primary, dtype=str),
            "from_source": values["source"],
            "from_pretrained": values["pretrained"],
            "done": np.array([name in metrics for name in names], dtype=bool),
        }
        meta = {
            "source": source.describe(),
            "checkpoint_sha256": identity["source_sha256"],
            "mode": mode,
            "recipe": asdict(recipe),
            "data_dir": None if chosen_data is None else str(chosen_data),
            "runs": metrics,
        }
        return job.save(arrays, meta, complete=complete)

    result = save(complete=len(metrics) == len(names))
    for name in names:
        if name in metrics:
            continue
        dev = {arm: train_arm(configs[name, arm], progress=progress) for arm in ARMS}
        metrics[name] = {arm: json_safe(values) for arm, values in dev.items()}
        result = save(complete=len(metrics) == len(names))
    return result


def format_table(result: Result) -> str:
    """The result as a text table: one row per target, its metric from the source and from the pretrained model."""
    arrays = result.arrays
    source = result.meta.get("source", {})
    rows = [
        f"source {source.get('label', '?')} on {source.get('task', '?')} ({source.get('path', '?')}), "
        f"mode {result.meta.get('mode')}",
        f"{'target':<14}{'metric':<10}{'from source':>13}{'from pretrained':>17}{'difference':>12}",
    ]
    for i, name in enumerate(arrays["targets"]):
        a, b = float(arrays["from_source"][i]), float(arrays["from_pretrained"][i])
        rows.append(f"{name:<14}{arrays['metric_names'][i]:<10}{a:>13.4f}{b:>17.4f}{a - b:>+12.4f}")
    return "\n".join(rows)
