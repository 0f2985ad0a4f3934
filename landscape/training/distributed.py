"""Data-parallel training over torch.distributed: the processes ``torchrun`` (or any launcher that sets its
environment: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts.

``torchrun --nproc-per-node N -m landscape train …`` runs the same command in N processes. Each takes a
contiguous share of every global batch (``np.array_split`` of the step's indices, so the global batch is the one
a single process would see); the optimizer all-reduces gradients at the points the algorithm defines
(:mod:`optimizers.replicas` says which and why); rank 0 alone writes run.json, metrics, checkpoints and weights.
Backend: NCCL when the processes compute on CUDA, gloo on the CPU. Every process evaluates the whole dev set (the
weights are identical on every process, so are the metrics): no gather, and no rank waits on another to finish.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch

from landscape.core.errors import ConfigError, LandscapeError
from landscape.models.devices import resolve_device
from optimizers.replicas import SINGLE, ProcessGroupReplicas, Replicas

T = TypeVar("T")

#: how long a collective waits for a missing process before failing (a killed rank makes torchrun stop the others
#: much sooner; this bounds a hang when a launcher does not)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def launched_world_size() -> int:
    """The number of processes the launcher started (1 outside ``torchrun``)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} in the environment: expected a positive integer (set by torchrun)")
    return int(value)


def launched_rank() -> int:
    """This process's rank among those the launcher started (0 outside ``torchrun``)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def process_device(name: str, local_rank: int) -> torch.device:
    """This process's device: ``auto`` / ``cuda`` under a launcher means one GPU per process, ``cuda:LOCAL_RANK``."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process with LOCAL_RANK {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        return device
    device = resolve_device(name)
    if device.type == "mps":
        raise ConfigError("--device mps: data-parallel training needs CPU (gloo) or CUDA (NCCL) processes")
    return device


@contextmanager
def data_parallel(device_name: str) -> Iterator[tuple[Replicas, torch.device]]:
    """The replicas and this process's device: a process group when a launcher started several processes.

    The group is created here and destroyed on exit unless the caller had created one already (a user's script).
    """
    world = launched_world_size()
    if world == 1:
        yield SINGLE, resolve_device(device_name)
        return
    import torch.distributed as dist

    device = process_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield ProcessGroupReplicas(device), device
    finally:
        if created:
            dist.destroy_process_group()


def share_of(indices: np.ndarray, replicas: Replicas) -> np.ndarray:
    """This process's contiguous share of the global batch ``indices`` (sizes differ by at most one)."""
    if replicas.world_size == 1:
        return indices
    return np.array_split(indices, replicas.world_size)[replicas.rank]


def process_seed(seed: int, rank: int) -> int:
    """The seed of this process's dropout RNG: the run's seed on rank 0, an independent stream on the others."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def check_world(batch_size: int, grad_accum: int, replicas: Replicas) -> None:
    """Refuse a global batch the processes cannot share equally, or shares accumulation cannot split equally."""
    world = replicas.world_size
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} is not divisible by the {world} processes torchrun started; "
            f"expected a multiple of {world} (each process takes batch_size / {world} examples)"
        )
    if (batch_size // world) % grad_accum:
        raise ConfigError(
            f"grad_accum {grad_accum} does not divide each process's share of the batch ({batch_size // world} = "
            f"batch_size {batch_size} / {world} processes); expected equal micro-batches"
        )


def on_rank_zero(
    replicas: Replicas, decide: Callable[[], T], encode: Callable[[T], str], decode: Callable[[str], T]
) -> T:
    """Run ``decide`` on rank 0 alone (it reads or writes the run directory) and hand its result or its error,
    as one line, to every process, so that all of them go on or stop together."""
    if replicas.world_size == 1:
        return decide()
    message = ""
    if replicas.rank == 0:
        try:
            message = json.dumps({"value": encode(decide())})
        except LandscapeError as exc:
            message = json.dumps({"error": str(exc), "kind": type(exc).__name__})
            replicas.broadcast_text(message)
            raise
    message = replicas.broadcast_text(message)
    answer = json.loads(message)
    if "error" in answer:
        raise ConfigError(answer["error"])
    return decode(answer["value"])
