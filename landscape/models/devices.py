"""Which device a command computes on (``--device``) and in which precision it trains (``--precision``).

``auto`` is CUDA when available, else Apple's MPS when available, else the CPU. Results are always stored from the
CPU, in the same files whatever the device. Training precision: ``fp32``, or ``bf16`` / ``fp16`` through
``torch.autocast`` (master weights, optimizer state, ε and every norm stay float32). ``fp16`` adds the dynamic loss
scale of :mod:`optimizers.loss_scale`, correct for SAM's two backward passes; bf16 has fp32's range and needs none.
The CPU runs both (torch's CPU autocast has float16 kernels; on the CPU fp16 is slower than bf16 and is there for
testing the GPU path, not for speed).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from landscape.core.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """The torch device ``--device name`` means on this machine; one line naming the problem when it has none."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ConfigError("--device mps: this machine has no MPS device; use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(
                f"--device {name}: expected cuda:0 .. cuda:{torch.cuda.device_count() - 1} on this machine"
            )
        return torch.device(name)
    raise ConfigError(f"--device {name!r} is unknown; expected one of {', '.join(DEVICES)}")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` (None: fp32, no autocast); fp16 needs a loss scale (module doc)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise ConfigError(f"--precision {precision!r} is unknown; expected one of {', '.join(PRECISIONS)}")


def autocast_context(device: torch.device, precision: str) -> Any:
    """The forward passes' context for ``precision`` on ``device``: ``torch.autocast`` for bf16 / fp16, else none.

    Evaluation only (eval, surfaces, interpolations): the loss is computed in float32 from the autocast logits.
    """
    dtype = autocast_dtype(precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take now, or None where it cannot be known.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU: Linux's ``MemAvailable`` (free memory plus
    the page cache the kernel can drop), not ``MemFree``, which a busy page cache makes look nearly full.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # reported in kB
        except (OSError, ValueError, IndexError):
            return None
    return None
