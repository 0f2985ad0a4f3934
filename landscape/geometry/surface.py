"""Loss surfaces and interpolations of a trained run, resumable, through a serial or Ray executor.

- :func:`compute_surface`: loss and metric on a 1-D line or a 2-D grid ``θ + a·d1 + b·d2`` along seeded,
  filter-normalised Gaussian directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets",
  Section 4; FSAM Fig. 4).
- :func:`compute_interpolation`: ``θ(α) = θ1 + α(θ1 − θ0)`` with θ1 the run's final weights and θ0 its
  ``init.safetensors`` (FSAM Fig. 5), another run's final weights, or a random direction.

Both save a result (docs/results.md) after every chunk of cells, with a ``done`` mask; a call with the same
``out`` and parameters computes only the cells not done, so a computation killed at any moment and started
again gives arrays bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape.core.errors import ConfigError
from landscape.core.locks import locks_output
from landscape.core.params import check_same_keys_and_shapes, content_hash
from landscape.core.results import Result, new_grid, save_result
from landscape.geometry.directions import (
    NORMS,
    checkpoint_direction,
    layer_kinds,
    orthogonalize,
    random_direction,
    save_directions,
)
from landscape.geometry.grids import Cell, CellEvaluator, GridJob, chunked, make_executor
from landscape.models.devices import autocast_dtype, resolve_device
from landscape.models.jobs import AnalysisJob, DataSelection
from landscape.models.planning import Plan, median_seconds
from landscape.models.runs import Run, load_run_model, open_run, read_run_weights
from landscape.models.weights import read_safetensors

DIRECTIONS_FILE = "directions.safetensors"
ENDPOINTS = ("init", "run", "random")


# A 200 x 200 surface: beyond it a typo (--grid 100000) is likelier than intent; --max-cells raises the bound.
MAX_CELLS = 40_000


def direction_seed(seed: int, k: int) -> int:
    """The seed of direction ``k`` of a surface drawn with ``seed``: independent streams per direction, so that
    direction 2 of seed s is not direction 1 of seed s + 1."""
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def _linspace(bounds: tuple[float, float], points: int, flag: str) -> np.ndarray:
    low, high = float(bounds[0]), float(bounds[1])
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ConfigError(f"{flag} needs finite A < B, got {low} {high}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"the number of points along {flag} must be an integer >= 2, got {points!r}")
    return np.linspace(low, high, points, dtype=np.float64)


def _progress_bar(total: int, initial: int, enabled: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=what, unit="cell", file=sys.stderr)


def _run_grid(
    *,
    job: AnalysisJob,
    axes: Mapping[str, np.ndarray],
    shape: tuple[int, ...],
    coefficients: Sequence[Cell],
    grid_job: GridJob,
    meta: Mapping[str, Any],
    executor: Any,
    progress: bool,
    chunk_size: int | None,
    save_every: float = 60.0,
) -> Result:
    """Compute the cells of ``shape`` (cell number = flat row-major index) not yet done.

    The partial grid is saved after a chunk when ``save_every`` seconds have passed since the last save (0: after
    every chunk), and at once when anything interrupts the computation, so a kill -9 loses at most ``save_every``
    seconds of cells and an exception (Ctrl-C included) none. ``executor``: a name (``serial``, ``ray``) or an
    object with ``name`` and ``run(job, chunks, on_chunk)``.
    """
    if not (isinstance(save_every, int | float) and math.isfinite(save_every) and save_every >= 0):
        raise ConfigError(f"the save interval must be a number of seconds >= 0, got {save_every!r}")
    existing = job.existing
    if existing is not None:
        loss = np.array(existing.arrays["loss"], dtype=np.float64)
        metric = np.array(existing.arrays["metric"], dtype=np.float64)
        done = np.array(existing.arrays["done"], dtype=bool)
        if loss.shape != shape:
            raise ConfigError(f"{job.out} holds a grid of shape {loss.shape}, expected {shape}; pass --overwrite")
    else:
        loss, done = new_grid(shape)
        metric = np.full(shape, np.nan, dtype=np.float64)
    fixed_meta = {**meta, "executor": executor if isinstance(executor, str) else executor.name}
    cell_seconds: list[float] = []  # this session's cells: what --dry-run's estimate is to be compared with

    def save(complete: bool) -> Result:
        session_meta = dict(fixed_meta)
        if cell_seconds:
            session_meta.update(cell_seconds_median=float(np.median(cell_seconds)), cells_timed=len(cell_seconds))
        return job.save({**axes, "loss": loss, "metric": metric, "done": done}, session_meta, complete=complete)

    flat_done = done.reshape(-1)
    pending = [(number, coefficients[number]) for number in np.flatnonzero(~flat_done).tolist()]
    runner = executor
    if existing is None:
        save(complete=False)  # from now on, a rerun with other parameters is refused
    if pending:
        if chunk_size is None:
            # Serial: one cell per chunk (the save interval decides how often it is written). Ray: a few chunks
            # per worker keeps all busy.
            workers = getattr(runner, "workers", None) or 2
            chunk_size = 1 if runner.name == "serial" else max(1, len(pending) // (4 * workers))
        bar = _progress_bar(flat_done.size, int(flat_done.sum()), progress, job.kind)
        flat_loss, flat_metric = loss.reshape(-1), metric.reshape(-1)
        unsaved = {"cells": 0, "since": time.monotonic()}

        def on_chunk(results: list[tuple]) -> None:
            for number, cell_loss, cell_metric, *seconds in results:
                flat_loss[number], flat_metric[number], flat_done[number] = cell_loss, cell_metric, True
                cell_seconds.extend(seconds)
            unsaved["cells"] += len(results)
            if time.monotonic() - unsaved["since"] >= save_every:
                save(complete=False)
                unsaved.update(cells=0, since=time.monotonic())
            bar.update(len(results))

        try:
            runner.run(grid_job, chunked(pending, chunk_size), on_chunk)
        except BaseException:
            if unsaved["cells"]:  # an interruption keeps every finished cell
                save(complete=False)
            raise
        finally:
            bar.close()
    return save(complete=bool(done.all()))


def check_cells(cells: int, max_cells: int, what: str) -> None:
    """Refuse, before anything is loaded or written, a grid of more than ``max_cells`` cells."""
    if cells > max_cells:
        raise ConfigError(
            f"{what} is {cells:,} cells, more than --max-cells {max_cells:,} (each cell evaluates the whole "
            "example subset); pass a larger --max-cells to compute it anyway"
        )


def _executor(executor: Any, address: str | None, workers: int | None, gpus_per_worker: float) -> Any:
    """The executor object, built before anything is written: an option that cannot work leaves nothing behind."""
    if not isinstance(executor, str):
        return executor
    return make_executor(executor, address=address, workers=workers, gpus_per_worker=gpus_per_worker)


def _precision_identity(precision: str) -> dict[str, str]:
    """fp32 (the default) adds nothing, so results computed before ``--precision`` existed keep their identity."""
    return {} if precision == "fp32" else {"precision": precision}


def _data_identity(run: Run, data: DataSelection) -> dict[str, Any]:
    """The data part of a grid's identity (the format grids on disk were keyed by)."""
    return {
        "task": run.task.name,
        "data_dir": str(run.data_dir),
        "split": data.split,
        "samples": data.samples,
        "data_seed": data.seed,
        "max_length": run.max_length,
        "model": run.model,
    }


@locks_output()
def compute_surface(
    run_path: str | Path,
    out: str | Path,
    *,
    dims: int = 2,
    grid: int | tuple[int, int] = 25,
    range_a: tuple[float, float] = (-1.0, 1.0),
    range_b: tuple[float, float] | None = None,
    norm: str = "filter",
    ignore_1d: bool = True,
    orthogonal: bool = False,
    data: DataSelection | None = None,
    weights: str = "final",
    executor: str = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    chunk_size: int | None = None,
    save_every: float = 60.0,
    max_cells: int = MAX_CELLS,
    device: str = "cpu",
    precision: str = "fp32",
    gpus_per_worker: float = 0.0,
) -> Result:
    """Loss and metric of the run's ``weights`` on a 1-D (``dims=1``) or 2-D grid along random directions.

    ``grid``: points per axis (an int for all axes, or ``(n_a, n_b)``). Directions: zero-mean Gaussian, drawn
    with :func:`direction_seed` ``(seed, k)``, normalised per ``norm`` (``filter``/``layer``/``model``), 1-D
    parameters zero when ``ignore_1d``, the second orthogonalised against the first when ``orthogonal``; saved to
    ``out/directions.safetensors``. Data: ``data`` (default 256 dev examples drawn with seed 0; the seed also
    draws the directions). Returns the ``surface`` result (arrays ``a``, ``b`` for 2-D, ``loss``, ``metric``,
    ``done``; see docs/results.md).
    """
    resolve_device(device)  # a device this machine lacks is refused before anything is computed or written
    autocast_dtype(precision)
    executor = _executor(executor, ray_address, workers, gpus_per_worker)
    if dims not in (1, 2):
        raise ConfigError(f"dims must be 1 or 2, got {dims!r}")
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    n_a, n_b = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    check_cells(n_a * (n_b if dims == 2 else 1), max_cells, f"a {n_a} x {n_b} grid" if dims == 2 else f"{n_a} points")
    a = _linspace(range_a, n_a, "the range of a")
    b = _linspace(range_b or range_a, n_b, "the range of b") if dims == 2 else None
    out = Path(out)
    data = data or DataSelection(split="dev", samples=256)
    seed = data.seed
    run = data.open_run(run_path)
    loaded = load_run_model(run, weights)
    theta = read_run_weights(run, loaded.model, weights)
    checkpoint_sha = content_hash(theta)
    subset = data.subset(run, loaded.tokenizer)
    identity = {
        "kind": "surface",
        "dims": dims,
        "a": a.tolist(),
        "b": None if b is None else b.tolist(),
        "norm": norm,
        "ignore_1d": ignore_1d,
        "orthogonal": orthogonal,
        "direction_seed": seed,
        "weights": weights,
        "checkpoint_sha256": checkpoint_sha,
        **_data_identity(run, data),
        **_precision_identity(precision),
    }
    job = AnalysisJob("surface", out, identity, overwrite=overwrite)
    directions_path = out / DIRECTIONS_FILE
    if job.complete is not None:
        return job.complete
    if job.existing is None or not directions_path.is_file():
        with torch.no_grad():
            kinds = layer_kinds(loaded.model)
            d = [
                random_direction(theta, seed=direction_seed(seed, k), norm=norm, ignore_1d=ignore_1d, kinds=kinds)
                for k in range(dims)
            ]
            if orthogonal and dims == 2:
                d[1] = orthogonalize(d[1], d[0])
        out.mkdir(parents=True, exist_ok=True)
        save_directions(
            directions_path,
            d,
            {
                "kind": "random",
                "seed": seed,
                "norm": norm,
                "ignore_1d": ignore_1d,
                "orthogonal": orthogonal,
                "checkpoint_sha256": checkpoint_sha,
            },
        )
    del loaded, theta  # the executor's workers load their own copies
    if dims == 2:
        assert b is not None
        shape: tuple[int, ...] = (n_b, n_a)
        coefficients = [(float(a[i]), float(b[j])) for j in range(n_b) for i in range(n_a)]
        axes = {"a": a, "b": b}
    else:
        shape, coefficients, axes = (n_a,), [(float(x),) for x in a], {"a": a}
    grid_job = GridJob(
        run_path=str(run.path), weights=weights, directions_file=str(directions_path), data=data, device=device,
        precision=precision,
    )  # fmt: skip
    meta = {
        "dims": dims,
        "run": run.describe(),
        "data": subset.describe(),
        "checkpoint_sha256": checkpoint_sha,
        "metric_name": run.task.primary_metric,
        "precision": precision,
        "weights": weights,
        "directions": {
            "file": DIRECTIONS_FILE,
            "seed": seed,
            "norm": norm,
            "ignore_1d": ignore_1d,
            "orthogonalize": orthogonal,
        },
    }
    return _run_grid(
        job=job,
        axes=axes,
        shape=shape,
        coefficients=coefficients,
        grid_job=grid_job,
        meta=meta,
        executor=executor,
        progress=progress,
        chunk_size=chunk_size,
        save_every=save_every,
    )


@locks_output()
def compute_interpolation(
    run_path: str | Path,
    out: str | Path,
    *,
    to: str | Path | None = None,
    random: bool = False,
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    points: int = 21,
    norm: str = "filter",
    ignore_1d: bool = True,
    data: DataSelection | None = None,
    init: str | None = None,
    executor: str = "serial",
    ray_address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    chunk_size: int | None = None,
    save_every: float = 60.0,
    max_cells: int = MAX_CELLS,
    device: str = "cpu",
    precision: str = "fp32",
    gpus_per_worker: float = 0.0,
) -> Result:
    """``L(θ1 + α(θ1 − θ0))`` for ``points`` values of α in ``alpha_range`` (FSAM Fig. 5).

    θ1 is the run's final weights. θ0 is, by default, the run's ``init.safetensors`` (the pretrained encoder
    plus the seeded head the run started from); with ``to``, the final weights of that other run (same
    architecture and head, else :class:`CheckpointError`); with ``random``, ``θ1 − θ0`` is replaced by a seeded
    random direction normalised per ``norm``. α = 0 gives θ1 and α = −1 gives θ0, bitwise. For a model checkpoint
    (not a run directory) θ0 is ``init``'s encoder with a fresh head seeded by 0 (``landscape.models.runs.Run``).
    """
    resolve_device(device)
    autocast_dtype(precision)
    executor = _executor(executor, ray_address, workers, gpus_per_worker)
    if to is not None and random:
        raise ConfigError("choose either another run (--to) or a random direction (--random), not both")
    check_cells(points, max_cells, f"{points} points")
    alpha = _linspace(alpha_range, points, "--alpha")
    out = Path(out)
    data = data or DataSelection(split="dev", samples=256)
    seed = data.seed
    run = open_run(run_path, task=data.task, data_dir=data.data_dir, init=init)
    loaded = load_run_model(run, "final")
    theta1 = read_run_weights(run, loaded.model, "final")
    endpoint = "random" if random else ("run" if to is not None else "init")
    if endpoint == "init":
        theta0: dict[str, torch.Tensor] | None = read_run_weights(run, loaded.model, "init")
        theta0_desc: dict[str, Any] = {"run": str(run.path), "weights": "init"}
    elif endpoint == "run":
        other = data.open_run(to)
        other_tensors = read_safetensors(other.weights_file("final"))  # names and shapes checked on the next line
        check_same_keys_and_shapes(theta1, other_tensors, f"the final weights of {run.path} and {other.path}")
        theta0 = {name: other_tensors[name].to(theta1[name].dtype) for name in theta1}
        theta0_desc = {"run": str(other.path), "weights": "final", "label": other.label}
    else:
        theta0, theta0_desc = None, {"random": True, "seed": seed, "norm": norm, "ignore_1d": ignore_1d}
    theta1_sha = content_hash(theta1)
    identity = {
        "kind": "interpolation",
        "alpha": alpha.tolist(),
        "endpoint": endpoint,
        "theta1_sha256": theta1_sha,
        "theta0_sha256": None if theta0 is None else content_hash(theta0),
        **({"norm": norm, "ignore_1d": ignore_1d, "direction_seed": seed} if random else {}),
        **_data_identity(run, data),
        **_precision_identity(precision),
    }
    job = AnalysisJob("interpolation", out, identity, overwrite=overwrite)
    if job.complete is not None:
        return job.complete
    subset = data.subset(run, loaded.tokenizer)
    directions_path = out / DIRECTIONS_FILE
    if job.existing is None or not directions_path.is_file():
        if theta0 is None:
            direction = random_direction(
                theta1, seed=direction_seed(seed, 0), norm=norm, ignore_1d=ignore_1d, kinds=layer_kinds(loaded.model)
            )
        else:
            direction = checkpoint_direction(theta0, theta1, dtype=torch.float64)
        out.mkdir(parents=True, exist_ok=True)
        save_directions(directions_path, [direction], {"kind": endpoint, "theta1_sha256": theta1_sha})
    del loaded, theta0
    grid_job = GridJob(
        run_path=str(run.path), weights="final", directions_file=str(directions_path), data=data, device=device,
        precision=precision,
    )  # fmt: skip
    meta = {
        "run": run.describe(),
        "data": subset.describe(),
        "checkpoint_sha256": theta1_sha,
        "metric_name": run.task.primary_metric,
        "precision": precision,
        "endpoint": endpoint,
        "theta1": {"run": str(run.path), "weights": "final", "label": run.label},
        "theta0": theta0_desc,
    }
    return _run_grid(
        job=job,
        axes={"alpha": alpha},
        shape=(len(alpha),),
        coefficients=[(float(x),) for x in alpha],
        grid_job=grid_job,
        meta=meta,
        executor=executor,
        progress=progress,
        chunk_size=chunk_size,
        save_every=save_every,
    )


def estimate_surface(
    run_path: str | Path,
    *,
    dims: int = 2,
    grid: int | tuple[int, int] = 25,
    data: DataSelection | None = None,
    weights: str = "final",
    device: str = "cpu",
    precision: str = "fp32",
    repeats: int = 3,
    save_every: float = 60.0,
) -> Plan:
    """The :class:`~landscape.models.planning.Plan` of a surface (``--dry-run``): one cell is one evaluation of the
    subset at a grid point, timed on the run's own model and examples; nothing is written."""
    data = data or DataSelection()
    n_a, n_b = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    cells = n_a * (n_b if dims == 2 else 1)
    run = data.open_run(run_path)
    loaded = load_run_model(run, weights, device=device)
    subset = data.subset(run, loaded.tokenizer)
    zero = {name: torch.zeros_like(p) for name, p in loaded.model.named_parameters()}
    with CellEvaluator(loaded.model, subset, [zero] * dims, precision=precision) as evaluator:
        per_cell = median_seconds(lambda: evaluator([0.5] * dims), repeats)
    # The grid is saved at most every ``save_every`` seconds: time such a save too (into a temporary folder) and
    # count the share of it that falls on a cell.
    shape = (n_b, n_a) if dims == 2 else (n_a,)
    grid_arrays = {"loss": np.zeros(shape), "metric": np.zeros(shape), "done": np.zeros(shape, dtype=bool)}
    with tempfile.TemporaryDirectory() as scratch:
        meta = {"versions": {}, "git_revision": None}
        save = median_seconds(lambda: save_result(Result("surface", grid_arrays, meta), scratch), repeats)
    per_cell += save * min(1.0, per_cell / save_every) if save_every > 0 else save
    return Plan(f"surface of {run.path} ({len(subset)} examples)", "cells", cells, per_cell, repeats)
