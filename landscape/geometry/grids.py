"""Evaluating a grid of points θ + Σ_k c_k·d_k: the cell evaluator, the executors and the resumable driver.

A surface or interpolation is a list of cells, each a tuple of coefficients ``(c_1, ..., c_K)`` along ``K``
directions. A :class:`GridJob` says, with plain picklable values only, how to build the evaluator (which run,
weights, directions file and example subset), so that a Ray worker can build its own copy once and then evaluate
any chunk of cells. Every cell is computed from θ (never by walking the grid, docs/pitfalls.md §9) and
independently of the others, so the values do not depend on the executor or on where a resumed computation restarted.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from landscape.core.errors import ConfigError
from landscape.core.params import check_same_keys_and_shapes, model_parameters
from landscape.geometry.directions import load_directions
from landscape.models.devices import autocast_context, autocast_dtype
from landscape.models.jobs import DataSelection
from landscape.models.runs import EvalSubset, evaluate_subset, load_run_model, read_run_weights
from landscape.models.state import restored

Cell = tuple[float, ...]
CellResult = tuple[int, float, float, float]  # (cell number, loss, metric, seconds the cell took)
EXECUTORS = ("serial", "ray")


class CellEvaluator:
    """Loss and metric of ``model`` at ``θ + Σ_k c_k·d_k`` on a fixed example subset.

    Use as a context manager: on exit, also after an exception, the model's parameters are restored bitwise from
    a snapshot, and its ``requires_grad`` flags and every submodule's train/eval mode are restored
    (``landscape.models.state.restored``, docs/pitfalls.md §5).
    Every cell is written from θ (never by stepping from the previous cell, docs/pitfalls.md §9) as
    ``p = θ + c_1·d_1``, then ``p += c_2·d_2``, in the common dtype of θ and the directions: float32 for the random
    directions of float32 weights (within about one ulp of the float64 value, at a third of the cost), float64 for
    the interpolation direction θ1 − θ0, so that α = −1 gives θ0 exactly. Zero coefficients are skipped and the
    origin is θ bitwise. Evaluation runs in eval mode under ``torch.inference_mode`` (docs/pitfalls.md §4).
    """

    def __init__(
        self,
        model: nn.Module,
        subset: EvalSubset,
        directions: Sequence[Mapping[str, torch.Tensor]],
        theta: Mapping[str, torch.Tensor] | None = None,
        precision: str = "fp32",
        only_read_rows: bool = True,
    ) -> None:
        self.model = model
        self.subset = subset
        self.precision = precision
        autocast_dtype(precision)  # an unknown precision is refused before any cell
        self._parameters = model_parameters(model)
        current = {name: p.detach() for name, p in self._parameters.items()}
        theta = current if theta is None else theta
        check_same_keys_and_shapes(current, theta, "the model's parameters and θ")
        for k, direction in enumerate(directions):
            check_same_keys_and_shapes(current, direction, f"the model's parameters and direction {k}")
        # θ and the directions on the model's device (a grid point is written there), θ in the model's dtype
        self._theta = {
            name: theta[name].detach().to(device=current[name].device, dtype=current[name].dtype, copy=True)
            for name in current
        }
        self._directions = [{name: d[name].detach().to(current[name].device) for name in current} for d in directions]
        self._saved: AbstractContextManager[nn.Module] | None = None
        # What a cell must write. A parameter whose every direction is zero (biases and LayerNorm under
        # --ignore-1d) stays θ once written. Of an embedding table, only the rows the subset looks up can change
        # the loss (MiniLM: 11.7 M of its 22.7 M weights are word embeddings, most for tokens the subset lacks);
        # the first evaluation records them (:meth:`_record_rows`) and later cells write those rows alone
        # (docs/pitfalls.md §35).
        self._moving = [name for name in current if any(bool(d[name].any()) for d in self._directions)]
        self._rows: dict[str, torch.Tensor] | None = None if only_read_rows else {}
        self._full_point_written = False

    def __enter__(self) -> CellEvaluator:
        self._saved = restored(self.model)
        self._saved.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        saved, self._saved = self._saved, None
        assert saved is not None
        saved.__exit__(*exc_info)

    def set_point(self, coefficients: Sequence[float]) -> None:
        """Write ``θ + Σ_k c_k·d_k`` into the model's parameters (inside the context only).

        After the first evaluation, the rows of an embedding table that the subset never looks up stay θ: they
        cannot change the loss, and writing them is most of a small model's cell.
        """
        if self._saved is None:
            raise RuntimeError("CellEvaluator must be used as a context manager, which restores the model")
        if len(coefficients) != len(self._directions):
            raise ConfigError(f"a cell needs {len(self._directions)} coefficients, got {len(coefficients)}")
        terms = [(float(c), direction) for c, direction in zip(coefficients, self._directions, strict=True) if c != 0]
        rows = self._rows or {}
        names = self._moving if self._full_point_written else list(self._parameters)
        with torch.no_grad():
            for name in names:
                p, theta = self._parameters[name], self._theta[name]
                index = rows.get(name) if self._full_point_written else None
                if index is not None:  # only the rows the subset reads, computed as the full point computes them
                    point = theta.index_select(0, index)
                    for c, direction in terms:
                        point.add_(direction[name].index_select(0, index), alpha=c)
                    p.index_copy_(0, index, point)
                elif not terms:  # the origin: θ itself, bitwise
                    p.copy_(theta)
                else:
                    (c, first), *rest = terms
                    torch.add(theta, first[name], alpha=c, out=p)
                    for c, direction in rest:
                        p.add_(direction[name], alpha=c)
        self._full_point_written = True

    def __call__(self, coefficients: Sequence[float]) -> tuple[float, float]:
        """``(loss, metric)`` at the cell (mean per-example loss, the task's primary metric)."""
        self.set_point(coefficients)
        device = next(iter(self._parameters.values())).device
        recording = self._rows is None
        with autocast_context(device, self.precision), self._record_rows() if recording else nullcontext():
            result = evaluate_subset(self.model, self.subset)
        # Where the loss is NaN or infinite the logits are too: a metric of their argmax (MCC 0.0, say) is no value.
        return result.loss, result.metric if math.isfinite(result.loss) else math.nan

    @contextmanager
    def _record_rows(self) -> Iterator[None]:
        """Record which rows each embedding table is looked up at during one evaluation of the subset, then put θ
        back into the other rows. A table whose weight is also reachable otherwise (shared with another module, or
        never looked up through its forward, as DeBERTa reads its relative embeddings) keeps every row."""
        by_id = {id(p): name for name, p in self._parameters.items()}
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        tables = {
            module: by_id[id(module.weight)]
            for module in self.model.modules()
            if isinstance(module, nn.Embedding) and owners.get(id(module.weight)) == 1 and id(module.weight) in by_id
            and by_id[id(module.weight)] in self._moving
        }  # fmt: skip
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in tables.values()}

        def record(module: nn.Module, inputs: tuple) -> None:
            seen[tables[module]].append(inputs[0].detach().reshape(-1))

        handles = [module.register_forward_pre_hook(record) for module in tables]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._rows = {}
        with torch.no_grad():
            for name, looked_up in seen.items():
                if not looked_up:
                    continue
                index = torch.unique(torch.cat(looked_up))
                p = self._parameters[name]
                unread = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
                unread[index] = False
                p[unread] = self._theta[name][unread]
                self._rows[name] = index


@dataclass(frozen=True)
class GridJob:
    """Everything a worker needs to build a :class:`CellEvaluator`, as plain values (picklable for Ray).

    θ is the run's ``weights`` file; the directions are read from ``directions_file``; the examples are ``data``'s.
    """

    run_path: str
    weights: str
    directions_file: str
    data: DataSelection
    device: str = "cpu"
    precision: str = "fp32"

    @contextmanager
    def evaluator(self) -> Iterator[CellEvaluator]:
        """Load the run's model, θ, the directions and the subset once; yield an entered evaluator."""
        run = self.data.open_run(self.run_path)
        loaded = load_run_model(run, self.weights, device=self.device)
        theta = read_run_weights(run, loaded.model, self.weights)
        directions, _ = load_directions(self.directions_file)
        subset = self.data.subset(run, loaded.tokenizer)
        with CellEvaluator(loaded.model, subset, directions, theta, precision=self.precision) as evaluator:
            yield evaluator


def run_chunk(evaluator: CellEvaluator, chunk: Sequence[tuple[int, Cell]]) -> list[CellResult]:
    """Evaluate ``chunk`` (cell numbers with their coefficients) in order, timing each cell."""
    results = []
    for number, cell in chunk:
        start = time.perf_counter()
        loss, metric = evaluator(cell)
        results.append((number, loss, metric, time.perf_counter() - start))
    return results


class SerialExecutor:
    """Evaluates every chunk in this process, in order."""

    name = "serial"

    def run(self, job: GridJob, chunks: Sequence[Sequence[tuple[int, Cell]]], on_chunk: Callable) -> None:
        with job.evaluator() as evaluator:
            for chunk in chunks:
                on_chunk(run_chunk(evaluator, chunk))


class RayExecutor:
    """Evaluates chunks on Ray actors, each of which builds its evaluator once (checkpoint and directions loaded
    once per worker), and hands finished chunks back as they complete.

    ``address`` None starts a local Ray instance (stopped again afterwards); otherwise it joins that cluster.
    ``threads_per_worker`` sets ``torch.set_num_threads`` in each worker.
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        workers: int | None = None,
        threads_per_worker: int = 1,
        gpus_per_worker: float = 0.0,
    ):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray, which is not installed: pip install 'landscape[ray]' (or pip install ray)"
            ) from None
        if workers is not None and workers <= 0:
            raise ConfigError(f"the number of Ray workers must be > 0, got {workers}")
        if not (math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
            raise ConfigError(f"--gpus-per-worker must be a number >= 0, got {gpus_per_worker}")
        if gpus_per_worker > 0 and address is None and torch.cuda.device_count() < gpus_per_worker:
            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker:g}: this machine has {torch.cuda.device_count()} GPU(s) for "
                "the local Ray cluster; use 0 for CPU workers, or --ray-address of a cluster with GPUs"
            )
        self.address = address
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gpus_per_worker = gpus_per_worker

    def run(self, job: GridJob, chunks: Sequence[Sequence[tuple[int, Cell]]], on_chunk: Callable) -> None:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            # Workers are started with this interpreter, so they import the installed project as the driver does.
            init_kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if self.address is None:
                init_kwargs["num_cpus"] = self.workers or os.cpu_count() or 1
            else:
                init_kwargs["address"] = self.address
            try:
                ray.init(**init_kwargs)
            except Exception as exc:  # a bad address, a cluster of another Ray version...
                raise ConfigError(f"cannot start or join Ray (address {self.address!r}): {exc}") from exc
        try:
            count = self.workers or max(1, int(ray.available_resources().get("CPU", 1)))
            if self.gpus_per_worker > 0:  # refused here: Ray would otherwise wait forever for GPUs nobody has
                gpus = float(ray.cluster_resources().get("GPU", 0))
                if gpus < self.gpus_per_worker:
                    raise ConfigError(
                        f"--gpus-per-worker {self.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPU(s); "
                        "use 0 for CPU workers"
                    )
                count = self.workers or max(1, int(gpus // self.gpus_per_worker))
            count = max(1, min(count, len(chunks)))
            actor_class = ray.remote(num_cpus=1, num_gpus=self.gpus_per_worker)(_RayCellWorker)
            actors = [actor_class.remote(job, self.threads_per_worker) for _ in range(count)]
            pending: dict[Any, Any] = {}
            queue = list(chunks)
            for actor in actors:  # one chunk in flight per actor, refilled as each finishes
                if queue:
                    pending[actor.run.remote(queue.pop(0))] = actor
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(finished[0])
                on_chunk(ray.get(finished[0]))
                if queue:
                    pending[actor.run.remote(queue.pop(0))] = actor
        finally:
            if started_here:
                ray.shutdown()


class _RayCellWorker:
    """A Ray actor holding one evaluator for its lifetime."""

    def __init__(self, job: GridJob, threads: int) -> None:
        torch.set_num_threads(threads)
        self._context = job.evaluator()
        self._evaluator = self._context.__enter__()

    def run(self, chunk: Sequence[tuple[int, Cell]]) -> list[CellResult]:
        return run_chunk(self._evaluator, chunk)


def make_executor(
    name: str,
    *,
    address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    gpus_per_worker: float = 0.0,
):
    """``"serial"`` or ``"ray"``; see :class:`SerialExecutor` and :class:`RayExecutor`."""
    if name == "serial":
        if address is not None:
            raise ConfigError("--ray-address is only for --executor ray")
        if gpus_per_worker:
            raise ConfigError("--gpus-per-worker is only for --executor ray (the serial executor uses --device)")
        return SerialExecutor()
    if name == "ray":
        return RayExecutor(
            address=address, workers=workers, threads_per_worker=threads, gpus_per_worker=gpus_per_worker
        )
    raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")


def chunked(cells: Sequence[tuple[int, Cell]], size: int) -> list[list[tuple[int, Cell]]]:
    """Consecutive chunks of ``size`` cells (the last may be shorter)."""
    return [list(cells[start : start + size]) for start in range(0, len(cells), size)]
