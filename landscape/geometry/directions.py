"""Directions in parameter space for loss surfaces: random (filter-normalised), checkpoint and PCA directions.

Follows Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets": a random direction is drawn from a
zero-mean Gaussian and *filter-normalised* (Section 4), so that each filter of the direction has the norm of the
same filter of the weights θ and the surface does not depend on the scale invariance of the network; the
trajectory of an optimiser is shown in the plane of the top-2 PCA directions of its checkpoints (Section 7).

A direction is a ``dict[str, Tensor]`` with θ's keys and shapes (``named_parameters()`` names: tied weights,
e.g. input embeddings shared with an MLM decoder, appear once, so θ + d perturbs the shared tensor once). Its
dtype is float32, or float64 for a float64 θ: a bf16/fp16 θ would otherwise lose the direction's low bits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.params import Params, check_same_keys_and_shapes, dot, model_parameters
from landscape.models.weights import read_safetensors, write_safetensors

KINDS = ("linear", "embedding", "conv1d", "conv", "1d", "other")
NORMS = ("filter", "layer", "model")
# The dimension that indexes the filters of each kind; the rest of the tensor is one filter.
FILTER_DIM = {"linear": 0, "embedding": 0, "conv": 0, "conv1d": 1, "other": 0}
METADATA_KEY = "landscape.directions"
# Elements per block when streaming the trajectory matrix through the Gram product of the PCA.
_PCA_BLOCK = 1 << 20


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """The kind of every parameter of ``model`` (keys as ``named_parameters()``), which decides its filters.

    - ``"linear"``: ``nn.Linear`` weight, shape (out, in): a filter is a row (one output unit);
    - ``"embedding"``: ``nn.Embedding`` weight, shape (vocab, dim): a filter is a row (one token's vector);
    - ``"conv1d"``: transformers' ``Conv1D`` (GPT-2), weight shape (in, out): a filter is a column;
    - ``"conv"``: ``nn.Conv1d/2d/3d`` weight, shape (out, in/groups, *kernel): a filter is ``weight[i]``;
    - ``"1d"``: any parameter with at most one dimension (biases, LayerNorm): one filter (Li et al. ignore these);
    - ``"other"``: any other ≥2-D parameter (a bare ``nn.Parameter``, a transposed convolution): rows, as in the
      paper's reference code, for want of knowing the layer's semantics.

    A tied tensor takes the kind of the module that owns its first name (an MLM decoder tied to the input
    embeddings is "embedding"; both are (vocab, dim) with one token per row, so the filters are the same).
    """
    conv1d_type: type | None
    try:  # transformers is a dependency, but parameter math should not need it to import
        from transformers.pytorch_utils import Conv1D as conv1d_type
    except ImportError:  # pragma: no cover
        conv1d_type = None

    params = model_parameters(model)
    kinds: dict[str, str] = {}
    for prefix, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            name = f"{prefix}.{local}" if prefix else local
            if name not in params or name in kinds:
                continue  # a tied tensor's second name, or already classified
            if param.dim() <= 1:
                kind = "1d"
            elif local == "weight" and isinstance(module, nn.Linear):
                kind = "linear"
            elif local == "weight" and isinstance(module, nn.Embedding | nn.EmbeddingBag):
                kind = "embedding"
            elif local == "weight" and conv1d_type is not None and isinstance(module, conv1d_type):
                kind = "conv1d"
            elif local == "weight" and isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                kind = "conv"
            else:
                kind = "other"
            kinds[name] = kind
    return {name: kinds[name] for name in params}


def _direction_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rescale_filters(d: torch.Tensor, theta: torch.Tensor, filter_dim: int | None) -> torch.Tensor:
    """``d_f ← d_f / ‖d_f‖ · ‖θ_f‖`` for every filter ``f`` (float64); ``filter_dim=None``: the tensor is one filter.

    A filter of θ with zero norm (or a zero draw) gets a zero direction instead of 0/0 = NaN.
    """
    if d.numel() == 0:
        return d
    if filter_dim is None or d.dim() == 0:
        rows_d, rows_t = d.reshape(1, -1), theta.reshape(1, -1)
    else:
        rows_d = d.movedim(filter_dim, 0).reshape(d.shape[filter_dim], -1)
        rows_t = theta.movedim(filter_dim, 0).reshape(theta.shape[filter_dim], -1)
    norm_d = torch.linalg.vector_norm(rows_d, dim=1)
    norm_t = torch.linalg.vector_norm(rows_t, dim=1)
    factor = torch.where(norm_d > 0, norm_t / norm_d.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    scaled = rows_d * factor[:, None]
    if filter_dim is None or d.dim() == 0:
        return scaled.reshape(d.shape)
    moved_shape = (d.shape[filter_dim], *[s for i, s in enumerate(d.shape) if i != filter_dim])
    return scaled.reshape(moved_shape).movedim(0, filter_dim)


def random_direction(
    model_or_params: nn.Module | Mapping[str, torch.Tensor],
    *,
    seed: int,
    norm: str = "filter",
    ignore_1d: bool = True,
    kinds: Mapping[str, str] | None = None,
) -> Params:
    """A normalised zero-mean Gaussian direction for θ (the model's parameters, or a params dict).

    Draws come from a CPU ``torch.Generator`` seeded with ``seed``, tensor after tensor in sorted-name order, one
    draw for *every* parameter (also the ignored 1-D ones), so the direction of a weight depends only on the seed
    and the names and shapes, not on the device, registration order or ``ignore_1d``. Normalisation, in float64:

    - ``"filter"`` (Li et al. Section 4): each filter rescaled to the norm of the same filter of θ;
    - ``"layer"``: each tensor rescaled to ``‖θ_layer‖``;
    - ``"model"``: the whole direction rescaled to ``‖θ‖`` (over the parameters the direction does not zero).

    1-D parameters (biases, LayerNorm): with ``ignore_1d`` exactly zero (the paper's choice); otherwise random and
    normalised once as a single filter, ``‖d_p‖ = ‖θ_p‖`` (not a copy of θ_p). ``kinds`` (see :func:`layer_kinds`)
    is inferred from a model; with a params dict and ``norm="filter"`` it must be given, because the layout of a
    2-D tensor (rows for ``nn.Linear``, columns for ``Conv1D``) cannot be read from its shape.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if isinstance(model_or_params, nn.Module):
        theta = {name: p.detach() for name, p in model_parameters(model_or_params).items()}
        if kinds is None:
            kinds = layer_kinds(model_or_params)
    else:
        theta = {name: t.detach() for name, t in model_or_params.items()}
        if kinds is None:
            if norm == "filter" and any(t.dim() > 1 for t in theta.values()):
                raise ConfigError(
                    "filter normalisation of a params dict needs kinds=layer_kinds(model): the filters of a "
                    "2-D tensor are rows for nn.Linear and columns for Conv1D"
                )
            kinds = {name: "1d" if t.dim() <= 1 else "other" for name, t in theta.items()}
    missing = sorted(set(theta) - set(kinds))
    if missing:
        raise ConfigError(f"kinds has no entry for {len(missing)} parameters (e.g. {missing[0]!r})")
    unknown = sorted({kinds[name] for name in theta} - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown parameter kind {unknown[0]!r}; expected one of {', '.join(KINDS)}")

    # One tensor at a time in sorted-name order, cast to the direction's dtype at once: peak memory is the
    # direction plus one float64 tensor, not a float64 copy of the model.
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    kept_theta_sq, kept_d_sq = 0.0, 0.0  # squared norms for norm="model", over the parameters not zeroed
    for name in sorted(theta):
        t = theta[name]
        draw = torch.randn(t.shape, generator=generator, dtype=torch.float32)  # cpu: seeded draw, moved below
        # A 1-D parameter counts by its shape, whatever module owns it (a scalar gate, a bias).
        is_1d = kinds[name] == "1d" or t.dim() <= 1
        d = draw.to(device=t.device, dtype=torch.float64)
        if is_1d and ignore_1d:
            d = torch.zeros_like(d)
        elif norm == "filter":
            d = _rescale_filters(d, t.to(torch.float64), None if is_1d else FILTER_DIM[kinds[name]])
        elif norm == "layer":
            d = _rescale_filters(d, t.to(torch.float64), None)
        else:
            kept_theta_sq += float(t.to(torch.float64).square().sum())
            kept_d_sq += float(d.square().sum())
        out[name] = d.to(_direction_dtype(t.dtype))

    if norm == "model":
        factor = math.sqrt(kept_theta_sq / kept_d_sq) if kept_d_sq > 0 else 0.0
        out = {name: (d.to(torch.float64) * factor).to(d.dtype) for name, d in out.items()}
    return {name: out[name] for name in theta}


def orthogonalize(d2: Mapping[str, torch.Tensor], d1: Mapping[str, torch.Tensor]) -> Params:
    """Gram–Schmidt: ``d2 − (⟨d2, d1⟩ / ⟨d1, d1⟩)·d1`` in the flattened parameter space (float64 accumulation).

    Optional for the second direction of a surface; ``d1`` is untouched. Random high-dimensional directions are
    already nearly orthogonal (Li et al. use them as drawn); note that the result is no longer exactly
    filter-normalised.
    """
    d11 = dot(d1, d1)
    if d11 == 0.0:
        raise ConfigError("cannot orthogonalize against a zero direction")
    coefficient = dot(d2, d1) / d11
    return {
        name: (t.detach().to(torch.float64) - coefficient * d1[name].detach().to(t.device, torch.float64)).to(t.dtype)
        for name, t in d2.items()
    }


def checkpoint_direction(
    theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None
) -> Params:
    """``θ1 − θ0``, the direction of an interpolation between two checkpoints of the same architecture and head.

    The difference is taken in float64 and stored in ``dtype`` (default: the directions' float dtype of the two
    weights). Interpolation keeps float64 (exact for float32 weights), so ``θ1 + (−1)·(θ1 − θ0)`` rounds back to θ0.
    Raises :class:`CheckpointError` naming the first differing parameter (another architecture, another head).
    """
    check_same_keys_and_shapes(theta0, theta1, "the two checkpoints θ0 and θ1")
    out: Params = {}
    for name, t1 in theta1.items():
        t0 = theta0[name].detach().to(t1.device)
        target = dtype or _direction_dtype(torch.promote_types(t0.dtype, t1.dtype))
        out[name] = (t1.detach().to(torch.float64) - t0.to(torch.float64)).to(target)
    return out


def _trajectory_blocks(rows: Sequence[Mapping[str, torch.Tensor]], final: Mapping[str, torch.Tensor]):
    """Yield ``(name, start, stop, X)`` with ``X = θ_i − θ_final`` restricted to one block of one tensor, shape
    (n, stop − start), float64 on CPU: the trajectory matrix is never held whole, only n × block at a time."""
    for name in sorted(final):
        ref = final[name].detach().to("cpu", torch.float64).reshape(-1)
        flats = [row[name].detach().reshape(-1) for row in rows]
        for start in range(0, ref.numel(), _PCA_BLOCK):
            stop = min(start + _PCA_BLOCK, ref.numel())
            block = torch.stack([f[start:stop].to("cpu", torch.float64) for f in flats]) - ref[start:stop]
            yield name, start, stop, block


def pca_directions(
    trajectory: Sequence[Mapping[str, torch.Tensor]],
    final: Mapping[str, torch.Tensor],
    k: int = 2,
    *,
    center: bool = True,
) -> tuple[list[Params], np.ndarray]:
    """Top-``k`` principal directions of an optimisation trajectory (Li et al. Section 7).

    The data are the rows ``θ_i − θ_final`` (n checkpoints × P parameters), centred over the checkpoints as in a
    standard PCA unless ``center=False``. Memory stays O(n² + n·block): the n × n Gram matrix is accumulated in
    float64 block by block, eigendecomposed, and each direction is ``Xᵀu_k / √λ_k``.

    Returns ``k`` directions, each of unit Euclidean norm over the whole model (so the coordinates of a point
    along them are distances in parameter space, ``⟨θ_i − θ_final, v_k⟩``), signed so that the largest-magnitude
    entry of the eigenvector ``u_k`` is positive (deterministic), and ``explained_variance_ratio`` of shape
    (k,): ``λ_k / Σλ``, the fraction of the trajectory's (centred) variance along each direction.
    """
    n = len(trajectory)
    if n < 2:
        raise ConfigError(f"PCA of a trajectory needs at least 2 checkpoints besides the final one, got {n}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    for i, row in enumerate(trajectory):
        check_same_keys_and_shapes(final, row, f"the final checkpoint and trajectory checkpoint {i}")

    gram = torch.zeros(n, n, dtype=torch.float64)  # cpu: n x n (checkpoints), trajectories are read from disk
    for _, _, _, block in _trajectory_blocks(trajectory, final):
        gram += block @ block.T
    if center:
        # Centring the rows of X is H X with H = I − 11ᵀ/n, so its Gram matrix is H G H.
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n  # cpu: beside the Gram matrix
        gram = h @ gram @ h
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending, symmetric by construction
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    total = float(eigenvalues.clamp_min(0).sum())
    rank_tolerance = max(total, 0.0) * n * torch.finfo(torch.float64).eps * 10
    rank = int((eigenvalues > rank_tolerance).sum())
    if rank < k:
        raise ConfigError(
            f"the trajectory spans {rank} dimension(s) ({n} checkpoints, centred={center}); cannot take k={k} "
            "principal directions"
        )
    u = eigenvectors[:, :k]
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    u = u * signs
    lam = eigenvalues[:k]

    # Xᵀu is the same whether or not X is centred, because the u_k with λ_k > 0 of H G H are orthogonal to 1.
    flat: list[dict[str, torch.Tensor]] = [
        # cpu: the PCA directions are built from checkpoints on disk, as results are stored
        {name: torch.empty(final[name].numel(), dtype=torch.float64) for name in final}
        for _ in range(k)
    ]
    for name, start, stop, block in _trajectory_blocks(trajectory, final):
        projected = u.T @ block / lam.sqrt()[:, None]  # (k, block)
        for j in range(k):
            flat[j][name][start:stop] = projected[j]
    directions = [
        {
            name: flat[j][name]
            .reshape(final[name].shape)
            .to(device=final[name].device, dtype=_direction_dtype(final[name].dtype))
            for name in final
        }
        for j in range(k)
    ]
    ratio = (lam / total).numpy() if total > 0 else np.zeros(k)
    return directions, ratio


def save_directions(
    path: str | Path, directions: Sequence[Mapping[str, torch.Tensor]], metadata: Mapping[str, Any]
) -> None:
    """Write ``directions`` to one safetensors file (``d0/<name>``, ``d1/<name>``, …), atomically.

    ``metadata`` (JSON-serialisable; e.g. ``seed``, ``norm``, ``ignore_1d``, ``kind`` = "random" | "checkpoint" |
    "pca", the content hash of θ) goes into the file's header with the number of directions.
    """
    if not directions:
        raise ConfigError("save_directions needs at least one direction")
    for i, direction in enumerate(directions[1:], start=1):
        check_same_keys_and_shapes(directions[0], direction, f"directions 0 and {i}")
    tensors = {
        f"d{i}/{name}": t.detach().to("cpu").contiguous().clone()
        for i, direction in enumerate(directions)
        for name, t in direction.items()
    }
    try:
        header = json.dumps({**metadata, "count": len(directions)}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"direction metadata must be plain JSON (numbers, strings, lists, dicts): {exc}") from exc
    write_safetensors(path, tensors, {"format": "pt", METADATA_KEY: header})


def load_directions(path: str | Path) -> tuple[list[Params], dict[str, Any]]:
    """Read a file written by :func:`save_directions`: ``(directions, metadata)``; refuses anything else."""
    tensors = read_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"directions file {path} is not readable: {exc}") from exc
    if header is None:
        raise CheckpointError(f"{path} is a safetensors file but not a directions file (no {METADATA_KEY} header)")
    try:
        metadata = json.loads(header)
        count = int(metadata.pop("count"))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"directions file {path} has a malformed {METADATA_KEY} header: {exc}") from exc
    directions: list[Params] = [{} for _ in range(count)]
    for key, tensor in tensors.items():
        index, _, name = key.partition("/")
        if not (index.startswith("d") and index[1:].isdigit() and int(index[1:]) < count and name):
            raise CheckpointError(f"directions file {path} has an unexpected tensor {key!r}")
        directions[int(index[1:])][name] = tensor
    for i, direction in enumerate(directions[1:], start=1):
        check_same_keys_and_shapes(directions[0], direction, f"directions 0 and {i} in {path}")
    return directions, metadata
