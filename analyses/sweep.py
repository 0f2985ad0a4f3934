"""``landscape sweep``: a grid of training runs (and analyses of each), resumable, one trial at a time.

A spec (YAML) has ``base`` (train options, the keys of a ``--config`` file), ``grid`` (option → list of values: the
cartesian product), optional ``zip`` (option → lists of one length, taken together: one axis) and optional
``analyses`` (command → its options, run on every finished trial into ``TRIAL/analyses/<command>``). Each trial is
the run directory ``OUT/trials/<name>``, named by its own values in the spec's order (``sam=fsam,seed=2``). A rerun
skips finished trials and resumes interrupted ones; a trial that fails is recorded with its error in
``OUT/sweep.json`` and does not stop the others. ``OUT/sweep.json`` (written atomically after every trial) holds the
spec, every trial's options, status, dev metrics and wall time.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from landscape.core.atomic import write_json
from landscape.core.config import build_config, load_yaml
from landscape.core.errors import ConfigError, LandscapeError
from landscape.core.locks import locks_output
from landscape.core.rundir import SWEEP_FILE, TRIALS_DIR, has_run, is_complete, read_run_info
from landscape.data.tasks import get_task, load_split, resolve_data_dir
from landscape.training.config import TrainConfig, refuse_renamed
from landscape.training.loop import time_training_steps, train

ANALYSES = ("surface", "interpolate", "hessian", "fisher", "sharpness")
SPEC_KEYS = ("base", "grid", "zip", "analyses")


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its name (``key=value,...``) and the train options it sets on top of ``base``."""

    name: str
    values: dict[str, Any]


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec at ``path``, checked: known top-level keys, mappings, non-empty lists, zip lists of one length."""
    spec = load_yaml(path)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"sweep spec {path}: unknown key {unknown[0]!r}; expected some of {', '.join(SPEC_KEYS)}")
    for key in SPEC_KEYS:
        if key in spec and not isinstance(spec[key], dict):
            raise ConfigError(f"sweep spec {path}: {key} must be a mapping, got {type(spec[key]).__name__}")
    for key in ("grid", "zip"):
        for option, values in spec.get(key, {}).items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep spec {path}: {key}.{option} must be a non-empty list, got {values!r}")
    lengths = {len(v) for v in spec.get("zip", {}).values()}
    if len(lengths) > 1:
        raise ConfigError(f"sweep spec {path}: the zip lists have different lengths {sorted(lengths)}; expected one")
    axes = [*spec.get("grid", {}), *spec.get("zip", {})]
    both = sorted(set(spec.get("base", {})) & set(axes)) + sorted(set(spec.get("grid", {})) & set(spec.get("zip", {})))
    if both:
        raise ConfigError(f"sweep spec {path}: option {both[0]!r} is set twice (base, grid or zip); set it once")
    for name in spec.get("analyses", {}):
        if name not in ANALYSES:
            raise ConfigError(f"sweep spec {path}: analysis {name!r} is unknown; expected one of {', '.join(ANALYSES)}")
    for section in ("base", "grid", "zip"):
        refuse_renamed(spec.get(section, {}))
    return spec


def trials_of(spec: Mapping[str, Any]) -> list[Trial]:
    """Every trial of ``spec``: the grid's cartesian product times the zip rows, in the spec's order."""
    grid = spec.get("grid", {})
    zipped = spec.get("zip", {})
    rows = [dict(zip(zipped, row, strict=True)) for row in zip(*zipped.values(), strict=True)] if zipped else [{}]
    trials = []
    for combination in itertools.product(*grid.values()):
        for row in rows:
            values = {**dict(zip(grid, combination, strict=True)), **row}
            trials.append(Trial(trial_name(values), values))
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise ConfigError("two trials of the sweep have the same values; a grid or zip list repeats a value")
    return trials


def trial_name(values: Mapping[str, Any]) -> str:
    """``sam=fsam,seed=2``: readable, stable, and a valid folder name (other characters become ``_``)."""
    text = ",".join(f"{key}={value}" for key, value in values.items()) or "base"
    return re.sub(r"[^A-Za-z0-9=,._+-]", "_", text)


def trial_config(spec: Mapping[str, Any], trial: Trial, out: Path) -> TrainConfig:
    """The trial's resolved :class:`TrainConfig` (base, then its values; its run directory under ``out``)."""
    values = {**spec.get("base", {}), **trial.values, "out": str(out / TRIALS_DIR / trial.name)}
    return build_config(TrainConfig, values).resolved()


def analysis_argv(command: str, trial_dir: Path, options: Mapping[str, Any] | None) -> list[str]:
    """The ``landscape`` command line of one analysis of a trial (options as ``--key value``, True as a flag)."""
    argv = [command, str(trial_dir), "--out", str(trial_dir / "analyses" / command)]
    for key, value in (options or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


# What a step's cost depends on: trials equal in these share one measured (or timed) seconds-per-step; seeds, ρ,
# β, learning rates and the like do not change the work a step does.
COST_OPTIONS = (
    "task", "model", "sam", "batch_size", "max_length", "ascent_fraction", "m_sharpness", "grad_accum",
    "precision", "device", "fisher_mask", "fisher_samples", "mask_interval", "looksam_k", "freeze_encoder",
)  # fmt: skip


def cost_key(config: TrainConfig) -> tuple:
    """The options of ``config`` that change what one training step costs (:data:`COST_OPTIONS`)."""
    return tuple(getattr(config, name) for name in COST_OPTIONS)


def plan(spec: Mapping[str, Any], out: Path, *, calibrate: bool = False, fisher: Any = None) -> list[dict[str, Any]]:
    """For ``--dry-run``: each trial's name, state, steps and seconds per step: measured by a finished trial of the
    same cost (:func:`cost_key`), or with ``calibrate`` timed now (:func:`~landscape.training.loop.time_training_steps`,
    once per cost, nothing written); ``seconds_source`` says which ("finished trials" or "timed now")."""
    measured: dict[tuple, tuple[float, str]] = {}
    rows = []
    for trial in trials_of(spec):
        config = trial_config(spec, trial, out)
        run_dir = Path(config.out)
        state = "done" if has_run(run_dir) and is_complete(run_dir) else "started" if has_run(run_dir) else "to do"
        if state == "done":
            info = read_run_info(run_dir)
            timings, steps = info.get("timings", {}), info.get("total_steps")
            if timings.get("train_seconds") and steps:
                measured[cost_key(config)] = (float(timings["train_seconds"]) / float(steps), "finished trials")
        rows.append({"name": trial.name, "state": state, "sam": config.sam, "config": config,
                     "steps": planned_steps(config)})  # fmt: skip
    for row in rows:
        key = cost_key(row["config"])
        if key not in measured and calibrate and row["state"] != "done":
            measured[key] = (time_training_steps(row["config"], fisher=fisher), "timed now")
        row["seconds_per_step"], row["seconds_source"] = measured.get(key, (None, None))
    return rows


def planned_steps(config: TrainConfig) -> int | None:
    """The trial's number of steps: ``max_steps``, or epochs × batches of its (subsampled) training set."""
    if config.max_steps:
        return config.max_steps
    try:
        examples = len(load_split(get_task(config.task), "train", resolve_data_dir(config.data_dir)))
    except LandscapeError:  # its data is not reachable: the trial itself will say so
        return None
    kept = max(1, round(config.train_fraction * examples)) if config.train_fraction < 1 else examples
    return math.ceil(kept / config.batch_size) * int(config.epochs or 1)


@locks_output()
def run_sweep(
    spec_path: str | Path,
    out: str | Path,
    *,
    dispatch: Callable[[Sequence[str]], int] | None = None,
    progress: Callable[[str], None] = lambda line: print(line, flush=True),
    fisher: Any = None,
    executor: str = "serial",
    ray_address: str | None = None,
    cpus_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
) -> dict[str, Any]:
    """Train every trial of the spec (skipping finished ones) and run its analyses; return the sweep record.

    ``dispatch`` runs a ``landscape`` command line (``landscape.cli.main.main``; the CLI hands it in), needed only
    when the spec has ``analyses``. ``fisher``: the FSAM mask provider (``analyses.fisher.EmpiricalFisherMask()``).
    ``executor="ray"``: one Ray task per trial (``cpus_per_trial`` CPUs, which is also its torch thread count, and
    ``gpus_per_trial`` GPUs; ``ray_address`` joins a cluster, else a local one is started and stopped), the record
    written as each trial finishes; every trial is the same function of its config as in the serial executor.
    """
    out = Path(out)
    spec = read_spec(spec_path)
    trials = trials_of(spec)
    configs = {trial.name: trial_config(spec, trial, out) for trial in trials}  # every trial checked before training
    if spec.get("analyses") and dispatch is None:
        raise ConfigError("the spec has analyses: run_sweep needs dispatch=landscape.cli.main.main")
    if executor not in ("serial", "ray"):
        raise ConfigError(f"executor must be serial or ray, got {executor!r}")
    if executor == "serial" and (ray_address is not None or gpus_per_trial):
        raise ConfigError("--ray-address and --gpus-per-trial are only for --executor ray")
    record: dict[str, Any] = {"spec": spec, "trials": {trial.name: None for trial in trials}}
    started = time.perf_counter()
    done = 0

    def finished(trial: Trial, entry: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        record["trials"][trial.name] = entry
        write_json(out / SWEEP_FILE, {**record, "trials": {k: v for k, v in record["trials"].items() if v}})
        state = "skipped (done)" if entry.get("skipped") else entry["status"]
        detail = f": {entry['error']}" if entry["status"] == "failed" else ""
        progress(f"[{done}/{len(trials)}] {trial.name} {state}{detail}; {len(trials) - done} to go")

    analyses = dict(spec.get("analyses", {}))
    if executor == "serial":
        for trial in trials:
            finished(trial, run_trial(trial, configs[trial.name], analyses, dispatch, fisher))
    else:
        _run_on_ray(trials, configs, analyses, dispatch, fisher, finished, ray_address, cpus_per_trial, gpus_per_trial)
    record["seconds"] = time.perf_counter() - started
    write_json(out / SWEEP_FILE, record)
    return record


def run_trial(
    trial: Trial, config: TrainConfig, analyses: Mapping[str, Any], dispatch: Callable | None, fisher: Any
) -> dict[str, Any]:
    """Train one trial (resuming it when interrupted; nothing to do when complete) and run its analyses."""
    run_dir = Path(config.out)
    entry: dict[str, Any] = {"values": trial.values, "run_dir": str(run_dir)}
    tick = time.perf_counter()
    try:
        skipped = has_run(run_dir) and is_complete(run_dir)
        result = train(config, resume=has_run(run_dir), progress=False, fisher=fisher)
        entry.update(status="completed", dev_metrics=result.dev_metrics, skipped=skipped)
        for command, options in analyses.items():
            code = dispatch(analysis_argv(command, run_dir, options))  # type: ignore[misc]
            if code != 0:
                raise LandscapeError(f"landscape {command} exited with status {code}")
    except LandscapeError as exc:  # a user-level failure of this trial; the others still run
        entry.update(status="failed", error=str(exc))
    entry["seconds"] = time.perf_counter() - tick
    return entry


def _trial_on_a_worker(trial, config, analyses, dispatch, fisher, threads):
    import torch

    torch.set_num_threads(threads)
    return run_trial(trial, config, analyses, dispatch, fisher)


def _run_on_ray(trials, configs, analyses, dispatch, fisher, finished, address, cpus, gpus) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'landscape[ray]' (or pip install ray)") from None
    if not (isinstance(cpus, int) and cpus >= 1) or not gpus >= 0:
        raise ConfigError(f"expected --cpus-per-trial >= 1 and --gpus-per-trial >= 0, got {cpus} and {gpus}")
    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        options.update({"address": address} if address else {"num_cpus": max(cpus, os.cpu_count() or 1)})
        try:
            ray.init(**options)
        except Exception as exc:  # a bad address, a cluster of another Ray version...
            raise ConfigError(f"cannot start or join Ray (address {address!r}): {exc}") from exc
    try:
        if gpus > float(ray.cluster_resources().get("GPU", 0)):
            raise ConfigError(f"--gpus-per-trial {gpus:g}: the Ray cluster has no GPU to give a trial")
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_trial_on_a_worker)
        pending = {task.remote(trial, configs[trial.name], analyses, dispatch, fisher, cpus): trial for trial in trials}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(ready[0])
            finished(trial, ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


def iter_trial_dirs(sweep_dir: Path) -> Iterator[Path]:
    """The run directories of a sweep's trials, in name order."""
    trials = sweep_dir / TRIALS_DIR
    if trials.is_dir():
        yield from sorted(p for p in trials.iterdir() if has_run(p))
