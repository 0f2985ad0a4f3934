"""Resumable training state on disk (``checkpoints/step-N/``), safetensors only, never unpickled.

``model.safetensors``; ``state.safetensors`` with every tensor of the optimizer's state and the RNG states;
``state.json`` with the rest (optimizer scalars and parameter groups, scheduler, step, timings), tensors referenced
by name. The folder is written under a temporary name and renamed, so a listed checkpoint is complete.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from landscape.core.atomic import write_json, write_with
from landscape.core.errors import CheckpointError
from landscape.models.weights import load_weights_into, read_safetensors, save_weights

CHECKPOINT_PREFIX = "step-"


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, scalars) into tensors keyed by path and a JSON skeleton.

    Tensors are replaced by ``{"__tensor__": path}``; dicts with non-string keys (an optimizer's ``state`` is
    keyed by parameter index) are stored as ``{"__items__": [[key, value], ...]}`` so the keys keep their type.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(key, str) for key in node):
                return {key: walk(value, f"{path}/{key}") for key, value in node.items()}
            return {"__items__": [[key, walk(value, f"{path}/{key}")] for key, value in node.items()]}
        if isinstance(node, list | tuple):
            return [walk(value, f"{path}/{i}") for i, value in enumerate(node)]
        return node

    return tensors, walk(tree, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__items__"}:
            return {key: unflatten_state(tensors, value) for key, value in skeleton["__items__"]}
        return {key: unflatten_state(tensors, value) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, value) for value in skeleton]
    return skeleton


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states (torch, numpy, python) as tensors + JSON."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # cpu: RNG states are CPU byte tensors by torch's definition
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(keys, dtype=np.uint32).copy())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its generator
        tensors.update({f"cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    rest = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": _to_json(random.getstate())}
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda/{i}"] for i in range(len(tensors)) if f"cuda/{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy(), pos, has_gauss, cached))
    random.setstate(_from_json(rest["python"]))


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, tuple | list) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def save_training_state(
    folder: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    keep: int,
    rank_rng: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``folder/step-<step>/`` atomically (temporary folder, then rename) and keep the newest ``keep``.

    ``rank_rng``: with several data-parallel processes, each one's torch (and CUDA) RNG state in rank order
    (their dropout streams); ``state.json`` then records the world size, which a resume must match.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors", model)
    opt_tensors, opt_rest = flatten_state(optimizer.state_dict(), "optimizer")
    rng_tensors, rng_rest = rng_state()
    tensors = dict(opt_tensors)
    tensors.update({f"rng/{k}": v for k, v in rng_tensors.items()})
    for rank, states in enumerate(rank_rng or []):
        tensors.update({f"rank-rng/{rank}/{k}": v.detach().cpu().contiguous() for k, v in states.items()})
    world = {"world_size": len(rank_rng)} if rank_rng else {}
    write_with(tmp / "state.safetensors", lambda path: save_file(tensors, str(path)))
    write_json(
        tmp / "state.json",
        {"step": step, "optimizer": opt_rest, "scheduler": scheduler.state_dict(), "rng": rng_rest, **world, **extra},
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def load_training_state(
    checkpoint: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``checkpoint``; return the JSON part (step, extra).

    A checkpoint written by ``world_size`` data-parallel processes resumes only with as many: each process's share
    of the batches and its dropout stream depend on it (rank ``rank`` restores its own RNG state).
    """
    try:
        meta = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint} has no readable state.json: {exc}") from exc
    written_by = int(meta.get("world_size", 1))
    if written_by != world_size:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written by {written_by} process(es), this run has {world_size}: resume "
            f"with torchrun --nproc-per-node {written_by}"
            + (" (or without torchrun)" if written_by == 1 else "")
            + "; each process's share of the batches and its dropout stream depend on the count"
        )
    load_weights_into(model, checkpoint / "model.safetensors")
    tensors = read_safetensors(checkpoint / "state.safetensors")
    optimizer.load_state_dict(unflatten_state(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state({k.removeprefix("rng/"): v for k, v in tensors.items() if k.startswith("rng/")}, meta["rng"])
    if world_size > 1:  # this process's own dropout stream (numpy's and python's global RNGs are not drawn from)
        torch.set_rng_state(tensors[f"rank-rng/{rank}/torch"])
        cuda = tensors.get(f"rank-rng/{rank}/cuda")
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
    return meta
