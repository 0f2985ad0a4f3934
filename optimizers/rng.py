"""Snapshots of the random-number state that dropout draws from, to replay the same masks in a second forward.

Dropout on the CPU draws from torch's global generator, on a GPU from that device's generator; a snapshot holds
both for the devices given, and restoring it makes the next forward draw exactly the masks the snapshot preceded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Snapshot = tuple[torch.Tensor, dict[int, torch.Tensor]]


def snapshot(tensors: Iterable[torch.Tensor]) -> Snapshot:
    """The CPU generator's state and that of every CUDA device holding one of ``tensors``."""
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.get_rng_state(), {index: torch.cuda.get_rng_state(index) for index in cuda}


def restore(state: Snapshot) -> None:
    """Put the generators back to ``state``."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for index, value in cuda.items():
        torch.cuda.set_rng_state(value, index)
