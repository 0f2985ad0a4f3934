"""Diagonal empirical Fisher information and the Fisher mask of FSAM.

Zhong et al. 2022, "Improving Sharpness-Aware Minimization with Fisher Mask for Better Generalization on Language
Models" (FSAM), §3.2:

* Eq. 9, the empirical Fisher: ``F̂ = (1/N) Σ_i (∇_w log p(y_i | x_i))²``, one squared gradient per example;
* Eqs. 10–11, the mask: the ``(1 − s)·|w|`` coordinates with the largest ``F̂`` are perturbed (mask 1), the rest not.

``mode="per-example"`` is Eq. 9. Its squared per-example gradients come from one forward and one backward per batch
through the layers' own inputs and output gradients (:mod:`analyses.per_example`: Linear, Embedding, LayerNorm and
GPT-2's Conv1D, each proven exact on two examples first); a parameter that path does not cover is computed with
per-example gradients vectorised by ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``).
``mode="batch-mean"`` is what the authors' public code computes instead, the square
of each mini-batch's mean gradient, ``(1/K) Σ_k (∇_w mean_{i∈B_k} −log p(y_i | x_i))²``; it is here to compare the two.

Both run in eval mode (dropout off): the Fisher is a property of the deterministic model ``p(y | x; w)``, and only then
do the vectorised and the looped computation agree. Nothing else about the model changes: no parameter, no
``requires_grad`` flag, no ``.grad`` field is touched (gradients come from ``torch.func.grad`` or
``torch.autograd.grad``, never ``backward``), so the mask can be refreshed in the middle of a training step without
disturbing that step's gradients.

What the ``vmap`` path requires of the model (a Hugging Face sequence classifier, transformers 5):

* each example is passed with a leading batch dimension of 1 inside the vmapped function;
* the 2-D padding mask is handed to the model as a prepared 4-D additive mask ``[1, 1, 1, T]`` (0 where attended, the
  dtype's minimum at padding). Transformers builds its own 4-D mask with a data-dependent check
  (``padding_mask.all()``) that ``vmap`` cannot trace, and uses a prepared 4-D mask as it is;
* either attention implementation works. SDPA has no ``vmap`` batching rule on CPU, so torch falls back to a loop over
  the examples for the attention kernel (with a performance warning); ``attn_implementation="eager"`` avoids it.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from analyses.per_example import LayerGradients, auto_chunk_size
from landscape.core.errors import ConfigError
from landscape.data.losses import model_inputs
from landscape.models.devices import free_memory
from landscape.models.evaluation import batch_logits, example_loss_function
from landscape.models.state import eval_mode

FISHER_MODES = ("per-example", "batch-mean")


@dataclass(frozen=True)
class FisherResult:
    """A diagonal empirical Fisher.

    ``diagonal`` maps parameter names to float32 tensors of the parameters' shapes (units: squared loss per squared
    parameter unit); ``num_examples`` is N, the examples it averages over; ``mode`` is "per-example" or "batch-mean".
    """

    diagonal: dict[str, torch.Tensor]
    num_examples: int
    mode: str
    chunk_size: int | None = None  # examples per block of per-example gradients (per-example mode)


# ------------------------------------------------------------------------------------------------------------------
# Empirical Fisher


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    mode: str = "per-example",
    chunk_size: int | None = None,
    params: Callable[[str], bool] | None = None,
    state: Mapping[str, np.ndarray] | None = None,
    keep: Callable[[Callable[[], dict[str, np.ndarray]]], None] | None = None,
) -> FisherResult:
    """The diagonal empirical Fisher of ``model`` over the examples of ``batches`` (FSAM Eq. 9, or its batch-mean form).

    ``batches`` are collated batches (``input_ids`` [B, T], optional ``attention_mask`` / ``token_type_ids`` [B, T],
    ``labels`` [B]); they may differ in size. ``−log p(y | x)`` is the cross-entropy for classification and, for
    regression (one output, float labels), the Gaussian negative log-likelihood with unit variance,
    ``0.5·(f(x) − y)²`` up to a constant, whose gradient is ``(f(x) − y)·∇f`` (half the gradient of
    :func:`~landscape.data.losses.per_example_loss`'s squared error).

    ``mode="per-example"``: the layer path holds one batch's activations (as a backward does) and one
    [``chunk_size``, out, in] block of per-example weight gradients at a time on an accelerator (one example's on the
    CPU, where that is faster: :func:`~analyses.per_example.uses_blocks`); the ``vmap`` path, for parameters the
    layer path does not cover, ``chunk_size`` per-example gradients of those parameters. ``params`` selects
    parameters by name among those with ``requires_grad`` (default: all of them). The model is left exactly as it was.
    ``chunk_size`` None: chosen from the device's free memory (:func:`~analyses.per_example.auto_chunk_size`); the
    result's ``chunk_size`` says which. Chunks change only the order of float32 additions (values agree to ~1e-6).

    Resuming: ``keep`` is called before each batch with a function returning the running sums and counts; handed
    back as ``state`` (same model, batches and options), the sums continue from it bitwise.
    """
    _check_mode(mode)
    check_chunk_size(chunk_size)
    selected = _selected_parameters(model, params)
    if mode == "batch-mean":
        return _batch_mean_fisher(model, batches, selected, state, keep)
    device, dtype = _device_and_dtype(selected)
    if chunk_size is None and state is not None and "chunk_size" in state:
        chunk_size = int(state["chunk_size"])  # a resumed Fisher adds in the order it started with: bitwise the same
    if chunk_size is None:
        chunk_size = auto_chunk_size(model, selected, free_memory(device))
    sums = _zeros_like_accumulators(selected)
    first, count, _ = _restore_sums(sums, state)
    layers = LayerGradients(model, selected, _negative_log_likelihood, batch_logits, chunk_size=chunk_size)
    per_example_grads = None  # vmap over grad, built once for the parameters the layer path does not cover
    with eval_mode(model), warnings.catch_warnings():
        # SDPA on CPU has no vmap batching rule: torch loops over it and says so at every call; the values are right.
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        for index, batch in enumerate(batches):
            if index < first:
                continue
            if keep is not None and index > 0:
                keep(
                    lambda index=index, count=count: {
                        **_sums_state(sums, index, count, 0),
                        "chunk_size": np.int64(chunk_size),
                    }
                )
            batch = _checked_batch(batch, index, device)
            size = batch["labels"].shape[0]
            layers.add(batch, sums)
            if layers.uncovered:
                if per_example_grads is None:
                    example_nll = example_loss_function(model, dtype, _negative_log_likelihood)
                    per_example_grads = vmap(grad(example_nll), in_dims=(None, 0))
                rest = {name: selected[name].detach() for name in layers.uncovered}  # it may grow with a batch
                # grad() ignores an enclosing no_grad for its own computation; the no_grad only keeps the ordinary
                # autograd from recording a graph through the model's real parameters.
                with torch.no_grad():
                    for start in range(0, size, chunk_size):
                        chunk = {key: value[start : start + chunk_size] for key, value in batch.items()}
                        grads = per_example_grads(rest, chunk)
                        for name in rest:
                            sums[name].add_(grads[name].to(sums[name].dtype).square().sum(dim=0))
            count += size
    return _result(sums, count, mode, chunk_size)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` itself when it is a positive int or None (automatic); else a ConfigError naming it."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(
            f"chunk_size must be a positive integer or None (chosen from free memory), got {chunk_size!r}"
        )
    return chunk_size


def empirical_fisher_loop(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    params: Callable[[str], bool] | None = None,
) -> FisherResult:
    """Brute-force reference for ``empirical_fisher(mode="per-example")``: one example at a time, ordinary autograd.

    Each example is the batch's row as collated (with its padding); same arguments and result as
    :func:`empirical_fisher`.
    """
    selected = _selected_parameters(model, params)
    device, _ = _device_and_dtype(selected)
    sums = _zeros_like_accumulators(selected)
    count = 0
    # enable_grad: callers such as an optimizer's step() may run under no_grad.
    with eval_mode(model), torch.enable_grad():
        for index, batch in enumerate(batches):
            batch = _checked_batch(batch, index, device)
            for row in range(batch["labels"].shape[0]):
                single = {key: value[row : row + 1] for key, value in batch.items()}
                nll = _negative_log_likelihood(batch_logits(model, single), single["labels"])[0]
                _add_squared_gradient(sums, nll, selected)
                count += 1
    return _result(sums, count, "per-example")


def _batch_mean_fisher(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], selected: dict[str, nn.Parameter], state, keep
) -> FisherResult:
    """(1/K) Σ_k (∇ mean_{i∈B_k} −log p(y_i | x_i))²: the FSAM authors' code, one squared gradient per batch."""
    device, _ = _device_and_dtype(selected)
    sums = _zeros_like_accumulators(selected)
    first, count, num_batches = _restore_sums(sums, state)
    # enable_grad: callers such as an optimizer's step() may run under no_grad.
    with eval_mode(model), torch.enable_grad():
        for index, batch in enumerate(batches):
            if index < first:
                continue
            if keep is not None and index > 0:
                keep(lambda index=index, count=count, n=num_batches: _sums_state(sums, index, count, n))
            batch = _checked_batch(batch, index, device)
            mean_nll = _negative_log_likelihood(batch_logits(model, batch), batch["labels"]).mean()
            _add_squared_gradient(sums, mean_nll, selected)
            count += batch["labels"].shape[0]
            num_batches += 1
    if num_batches == 0:
        raise ConfigError("no batches to compute the Fisher on; expected at least one non-empty batch")
    # Averaged over batches, not examples: each batch contributes one squared mean gradient.
    return FisherResult(
        diagonal={name: total.div_(num_batches).to(torch.float32) for name, total in sums.items()},
        num_examples=count,
        mode="batch-mean",
    )


def _sums_state(sums: dict[str, torch.Tensor], batches_done: int, count: int, num_batches: int) -> dict:
    state = {f"sum-{name}": total.cpu().numpy().copy() for name, total in sums.items()}
    state.update(batches_done=np.int64(batches_done), count=np.int64(count), num_batches=np.int64(num_batches))
    return state


def _restore_sums(sums: dict[str, torch.Tensor], state: Mapping[str, np.ndarray] | None) -> tuple[int, int, int]:
    """Put a saved state's running sums into ``sums``; return (batches done, examples counted, batches counted)."""
    if state is None:
        return 0, 0, 0
    for name, total in sums.items():
        saved = state.get(f"sum-{name}")
        if saved is None or saved.shape != tuple(total.shape):
            raise ConfigError(f"the saved Fisher sums do not match parameter {name}; rerun with --overwrite")
        total.copy_(torch.from_numpy(np.asarray(saved)))  # cpu: copied onto the sums' device
    return int(state["batches_done"]), int(state["count"]), int(state["num_batches"])


def _add_squared_gradient(sums: dict[str, torch.Tensor], loss: torch.Tensor, selected: dict[str, nn.Parameter]) -> None:
    """sums[name] += (∂loss/∂parameter)², with torch.autograd.grad: gradients are returned, never put into .grad."""
    gradients = torch.autograd.grad(loss, list(selected.values()), allow_unused=True)
    for name, gradient in zip(selected, gradients, strict=True):
        if gradient is not None:  # None: the loss does not depend on it (its gradient is zero)
            sums[name].add_(gradient.to(sums[name].dtype).square())


def _negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log p(y | x) per example, shape [B], up to a constant. ``logits`` [B, C]; C == 1 with float labels: regression.

    Regression uses a unit-variance Gaussian, 0.5·(f − y)²: per_example_loss's squared error without the 0.5 would
    scale the Fisher by 4 (which leaves the mask unchanged but not the Fisher values).
    """
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return 0.5 * (logits.squeeze(-1) - labels.to(logits.dtype)).square()
    return F.cross_entropy(logits, labels, reduction="none")


def _check_mode(mode: str) -> None:
    if mode not in FISHER_MODES:
        raise ConfigError(f"Fisher mode {mode!r} is unknown; expected one of {', '.join(FISHER_MODES)}")


def _selected_parameters(model: nn.Module, params: Callable[[str], bool] | None) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (tied weights once, as named_parameters gives them), filtered by ``params``."""
    selected = {
        name: param
        for name, param in model.named_parameters()
        if param.requires_grad and (params is None or params(name))
    }
    if not selected:
        raise ConfigError("no parameters selected for the Fisher; expected at least one with requires_grad")
    floating = [name for name, param in selected.items() if not param.is_floating_point()]
    if floating:
        raise ConfigError(f"parameter {floating[0]} is not floating point; the Fisher needs real-valued parameters")
    return selected


def _device_and_dtype(selected: dict[str, nn.Parameter]) -> tuple[torch.device, torch.dtype]:
    first = next(iter(selected.values()))
    return first.device, first.dtype


def _zeros_like_accumulators(selected: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Running sums of squared gradients, at least float32 (a float16/bfloat16 model sums in float32)."""
    return {
        name: torch.zeros(param.shape, dtype=torch.promote_types(param.dtype, torch.float32), device=param.device)
        for name, param in selected.items()
    }


def _checked_batch(batch: Any, index: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``, after checking it has ``input_ids`` and ``labels`` with one leading batch size."""
    if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ConfigError(f"batch {index} has {keys}; expected a dict with at least input_ids and labels")
    if not all(isinstance(value, torch.Tensor) for value in batch.values()):
        raise ConfigError(f"batch {index} holds something other than tensors; expected a dict of tensors")
    sizes = {key: value.shape[0] if value.ndim else None for key, value in batch.items()}
    size = sizes["labels"]
    if not size or any(other != size for key, other in sizes.items() if key in (*model_inputs(batch), "labels")):
        raise ConfigError(f"batch {index} has batch sizes {sizes}; expected one leading size of at least 1")
    return {key: value.to(device) for key, value in batch.items()}


def _result(sums: dict[str, torch.Tensor], count: int, mode: str, chunk_size: int | None = None) -> FisherResult:
    if count == 0:
        raise ConfigError("no examples to compute the Fisher on; expected at least one non-empty batch")
    # In place: the sums are this function's own, and a second model-sized copy would raise the refresh's peak.
    return FisherResult(
        diagonal={name: total.div_(count).to(torch.float32) for name, total in sums.items()},
        num_examples=count,
        mode=mode,
        chunk_size=chunk_size,
    )


# ------------------------------------------------------------------------------------------------------------------
# Fisher mask (FSAM Eqs. 10–11)


def fisher_mask(diagonal: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The FSAM mask: True at the k coordinates with the largest Fisher values, over all parameters together.

    ``k = round((1 − s)·|w|)`` (Python's round, ties to even), ``|w|`` the number of coordinates in ``diagonal``:
    Eq. 10 (m1, the top k) and Eq. 11 (m0, the rest). Exactly k coordinates are True; among equal values the one
    earlier in the concatenation of the flattened tensors (in ``diagonal``'s order) wins, so ties are deterministic.
    Returns bool tensors of the same names and shapes. ``sparsity`` s must be in [0, 1); s = 0 keeps everything.
    Memory: the mask, and some of the values (:func:`kth_largest`), never a copy of all of them.
    """
    s = check_sparsity(sparsity)
    if not diagonal:
        raise ConfigError("the Fisher diagonal is empty; expected at least one parameter")
    dtype = functools.reduce(torch.promote_types, (value.dtype for value in diagonal.values()))
    scores = [value.detach().to(dtype) for value in diagonal.values()]  # no copy when the dtype is already that
    if not all(bool(torch.isfinite(value).all()) for value in scores):
        raise ConfigError("the Fisher diagonal has non-finite values; expected finite scores")
    total = sum(value.numel() for value in scores)
    k = round((1.0 - s) * total)
    if k >= total:
        keep = [torch.ones(value.shape, dtype=torch.bool, device=value.device) for value in scores]
    elif k == 0:
        keep = [torch.zeros(value.shape, dtype=torch.bool, device=value.device) for value in scores]
    else:
        # Everything above the k-th largest value is kept; of the values equal to it, the first ones by index until
        # k are reached (topk's own tie order is unspecified).
        threshold = kth_largest(scores, k)
        keep = [value > threshold for value in scores]
        missing = k - sum(int(torch.count_nonzero(kept)) for kept in keep)
        for value, kept in zip(scores, keep, strict=True):
            if missing == 0:
                break
            ties = torch.nonzero(value.reshape(-1) == threshold).flatten()[:missing]
            kept.view(-1)[ties] = True
            missing -= len(ties)
    return {name: kept.reshape(value.shape) for (name, value), kept in zip(diagonal.items(), keep, strict=True)}


#: up to this many values, :func:`kth_largest` selects among all of them at once (a copy of that size is small)
DIRECT_SELECTION_MAX = 1 << 20
#: values drawn to bracket the k-th largest before the exact selection
SELECTION_SAMPLE = 1 << 16


def kth_largest(values: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th largest of all the values of ``values`` (tensors of one dtype, any shapes), 1 ≤ k ≤ their number,
    as a 0-d tensor: exactly ``torch.kthvalue`` of their concatenation at rank n − k + 1.

    Above ``DIRECT_SELECTION_MAX`` values no concatenation is made (for MiniLM's 22.7 M Fisher values it and the
    selection's own copy were 180 MB at every mask refresh): a seeded sample of ``SELECTION_SAMPLE`` values brackets
    the answer, every value on the answer's side of the bracket is gathered (the smaller of k and n − k + 1, and six
    standard errors of the sample's quantile more: at most 1.2 % of n), and the selection runs on those. The count
    of the gathered values proves the bracket holds the answer; a bracket that does not is widened, at worst to
    every value, so the result never depends on the sample.
    """
    total = sum(value.numel() for value in values)
    if not 1 <= k <= total:
        raise ConfigError(f"k must be between 1 and the number of values {total}, got {k}")
    rank = total - k + 1  # from the smallest, as kthvalue counts
    if total <= DIRECT_SELECTION_MAX:
        return torch.kthvalue(torch.cat([value.reshape(-1) for value in values]), rank).values
    from_top = k <= rank  # gather the side with fewer values: the k largest, or the `rank` smallest
    needed = k if from_top else rank
    ordered = torch.sort(_sample_values(values, total), descending=from_top).values
    q = needed / total
    for margin in (6.0, 24.0, None):
        # A sample's order statistic misses its population's by about sqrt(m q (1 - q)) places of m: the bound is
        # taken `margin` of those beyond where the answer is expected, on the far side.
        m = len(ordered)
        reach = m if margin is None else math.ceil((q + margin * math.sqrt(q * (1 - q) / m)) * m)
        bound = ordered[reach] if reach < m else None  # None: every value
        candidates = _gather_beyond(values, bound, from_top)
        if candidates.numel() >= needed:
            break
    index = candidates.numel() - k + 1 if from_top else rank
    return torch.kthvalue(candidates, index).values


def _sample_values(values: list[torch.Tensor], total: int) -> torch.Tensor:
    """``SELECTION_SAMPLE`` values drawn uniformly (with replacement) over all coordinates, on the CPU, seeded."""
    generator = torch.Generator().manual_seed(0)
    # cpu: a seeded draw of indices (the CPU generator gives the same sample on every device); each piece is moved
    drawn = torch.randint(total, (SELECTION_SAMPLE,), generator=generator).sort().values
    pieces, offset = [], 0
    for value in values:
        n = value.numel()
        inside = drawn[(drawn >= offset) & (drawn < offset + n)] - offset
        if len(inside):
            pieces.append(value.reshape(-1)[inside.to(value.device)].cpu())
        offset += n
    return torch.cat(pieces)


def _gather_beyond(values: list[torch.Tensor], bound: torch.Tensor | None, from_top: bool) -> torch.Tensor:
    """The values at least ``bound`` (``from_top``) or at most it, concatenated; every value when it is None."""
    if bound is None:
        return torch.cat([value.reshape(-1) for value in values])
    pieces = []
    for value in values:
        flat = value.reshape(-1)
        pieces.append(flat[flat >= bound.to(flat.device)] if from_top else flat[flat <= bound.to(flat.device)])
    return torch.cat(pieces)


def mask_statistics(mask: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Kept fractions of a mask, and its overlap with ``previous`` when given (JSON-able numbers).

    Returns ``kept`` and ``total`` (coordinates), ``kept_fraction`` (overall), ``per_parameter`` (name -> kept
    fraction), ``per_layer`` (:func:`layer_of` -> kept fraction over that layer's coordinates); with ``previous``
    also ``intersection``, ``union``, ``iou`` = |A∩B| / |A∪B| and ``previous_kept_fraction`` = |A∩B| / |B|, the
    fraction of the previous mask's ones still kept (1.0 when ``previous`` keeps nothing).
    """
    _check_mask(mask, "mask")
    kept = sum(int(torch.count_nonzero(value)) for value in mask.values())  # a bool sum would make an int64 copy
    total = sum(value.numel() for value in mask.values())
    stats: dict[str, Any] = {
        "kept": kept,
        "total": total,
        "kept_fraction": _fraction(kept, total),
        "per_parameter": {
            name: _fraction(int(torch.count_nonzero(value)), value.numel()) for name, value in mask.items()
        },
        "per_layer": _per_layer_fraction(mask),
    }
    if previous is not None:
        intersection, union, previous_kept = _overlap(mask, previous)
        stats["intersection"] = intersection
        stats["union"] = union
        stats["iou"] = _fraction(intersection, union)
        stats["previous_kept_fraction"] = _fraction(intersection, previous_kept)
    return stats


# BERT's layer.N, GPT-2's h.N, ALBERT's albert_layers.N (one layer shared across depth), T5's block.N
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:\w+_)?(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``layer.<i>`` for transformer blocks, else the first module name that is not
    the backbone prefix (``embeddings``, ``pooler``, ``classifier``, ...)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return f"layer.{match.group(1)}"
    parts = name.split(".")
    backbones = {"bert", "roberta", "electra", "deberta", "distilbert", "albert", "model", "transformer", "encoder"}
    for part in parts[:-1]:
        if part not in backbones:
            return part
    return parts[0]


def _per_layer_fraction(mask: dict[str, torch.Tensor]) -> dict[str, float]:
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, value in mask.items():
        layer = layer_of(name)
        kept[layer] = kept.get(layer, 0) + int(torch.count_nonzero(value))
        total[layer] = total.get(layer, 0) + value.numel()
    return {layer: _fraction(kept[layer], total[layer]) for layer in total}


def mask_iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Intersection over union of two masks of the same names and shapes, |A∩B| / |A∪B|; 1.0 when both are empty."""
    _check_mask(a, "mask")
    intersection, union, _ = _overlap(a, b)
    return _fraction(intersection, union)


def _overlap(mask: dict[str, torch.Tensor], previous: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(|A∩B|, |A∪B|, |B|) of ``mask`` A and ``previous`` B."""
    _check_mask(previous, "previous mask")
    if mask.keys() != previous.keys():
        diff = sorted(set(mask) ^ set(previous))
        raise ConfigError(f"masks have different parameters (e.g. {diff[0]}); expected the same names")
    intersection = union = previous_kept = 0
    for name, value in mask.items():
        other = previous[name]
        if value.shape != other.shape:
            raise ConfigError(f"mask {name} has shape {tuple(value.shape)} vs {tuple(other.shape)}; expected equal")
        other = other.to(value.device)
        both = int(torch.count_nonzero(value & other))  # count_nonzero: a bool .sum() would make an int64 copy
        intersection += both
        union += int(torch.count_nonzero(value)) + int(torch.count_nonzero(other)) - both
        previous_kept += int(torch.count_nonzero(other))
    return intersection, union, previous_kept


def _check_mask(mask: dict[str, torch.Tensor], what: str) -> None:
    for name, value in mask.items():
        if value.dtype != torch.bool:
            raise ConfigError(f"{what} {name} has dtype {value.dtype}; expected torch.bool")


def _fraction(part: int, whole: int) -> float:
    # An empty whole (no coordinates, an empty union) means nothing differs: report full agreement, never NaN.
    return part / whole if whole else 1.0


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    return value


class EmpiricalFisherMask:
    """FSAM's mask for the trainer (Algorithm 1, lines 6–11): empirical Fisher of the batches, top-(1 − s) coordinates.

    The trainer (``landscape.training.loop.train(..., fisher=EmpiricalFisherMask())``) samples the batches and
    installs the mask; this computes it in eval mode without touching ``.grad``.

    ``replicas`` (data-parallel training): ``batches`` are this process's share of the N_Fisher examples; the
    per-process sums are added over the processes before the top-k, so every process gets the mask of all N.

    ``chunk_size``: examples per block of per-example gradients (None: from the free memory at each refresh); it is
    logged with the mask's statistics as ``fisher_chunk``.
    """

    modes = FISHER_MODES

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = check_chunk_size(chunk_size)

    def __call__(
        self,
        model: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        *,
        mode: str,
        sparsity: float,
        previous: dict[str, torch.Tensor] | None,
        replicas: Any = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        result = empirical_fisher(model, batches, mode=mode, chunk_size=self.chunk_size)
        diagonal = result.diagonal
        if replicas is not None and replicas.world_size > 1:
            # cpu: a count; the replicas move it to their device for the collective
            count = float(replicas.sum(torch.tensor([float(result.num_examples)], dtype=torch.float64)).item())
            diagonal = {name: replicas.sum(value * result.num_examples) / count for name, value in diagonal.items()}
        mask = fisher_mask(diagonal, sparsity)
        statistics = mask_statistics(mask, previous)
        if result.chunk_size is not None:
            statistics["fisher_chunk"] = result.chunk_size
        return mask, statistics
