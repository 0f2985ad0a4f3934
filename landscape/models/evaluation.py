"""The one evaluator: the loss (and logits) of a model over batches, at its own weights or at a parameter dict.

Every consumer of a model's loss goes through here: evaluation on dev (:func:`evaluate`), the analyses' subsets
(``landscape.models.runs.evaluate_subset``), loss surfaces and interpolations (through the latter), sharpness and the
Hessian operator (:func:`batch_losses` with a ``params`` dict). ``params`` is evaluated with
``torch.func.functional_call`` (the model's own tensors are never written; entries it lacks keep the model's value);
``None`` means the model's current weights. Batches move to the model's device here, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from landscape.data.encoding import EncodedSplit, collate
from landscape.data.losses import model_inputs, per_example_loss_from_logits
from landscape.data.metrics import compute_metrics
from landscape.data.tasks import TaskSpec
from landscape.models.state import eval_mode

Batch = dict[str, torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def batch_logits(model: nn.Module, batch: Batch, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [B, C] of ``batch`` (moved to the model's device) at ``params``, or at the model's weights."""
    device = model_device(model)
    inputs = {key: value.to(device) for key, value in model_inputs(batch, model).items()}
    if params is None:
        return model(**inputs).logits
    return functional_call(model, dict(params), args=(), kwargs=inputs, strict=False).logits


def batch_losses(model: nn.Module, batch: Batch, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-example losses [B] of ``batch`` at ``params`` (or the model's weights), with the graph when grad is on."""
    logits = batch_logits(model, batch, params)
    return per_example_loss_from_logits(logits, batch["labels"].to(logits.device))


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 1/0 padding mask -> [B, 1, 1, T] additive mask: 0 where attended, the dtype's minimum at padding.

    The same mask transformers builds for eager attention; prepared here because building it inside the model checks
    ``mask.all()``, data-dependent control flow that ``vmap`` cannot trace. Softmax of the minimum is exactly 0.
    """
    keep = attention_mask.to(dtype)
    return ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]


def example_loss_function(
    model: nn.Module,
    dtype: torch.dtype,
    loss_of_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_loss_from_logits,
) -> Callable[[Mapping[str, torch.Tensor], Batch], torch.Tensor]:
    """f(params, example) -> the scalar loss of one example (a batch row, no batch dimension), for ``torch.func``.

    Made for ``vmap(grad(f), in_dims=(None, 0))``: per-example gradients (empirical Fisher, per-instance sharpness).
    ``loss_of_logits`` maps logits [1, C] and labels [1] to a loss [1] (default: the training loss); the padding
    mask is passed additive (:func:`additive_attention_mask`, in ``dtype``). Parameters absent from ``params``
    are the module's own and act as constants.
    """

    def example_loss(params: Mapping[str, torch.Tensor], example: Batch) -> torch.Tensor:
        batch = {key: value.unsqueeze(0) for key, value in example.items()}  # the model expects a batch of 1
        inputs = model_inputs(batch, model)
        if "attention_mask" in inputs:
            inputs["attention_mask"] = additive_attention_mask(inputs["attention_mask"], dtype)
        logits = functional_call(model, dict(params), args=(), kwargs=inputs, strict=False).logits
        return loss_of_logits(logits, batch["labels"])[0]

    return example_loss


def outputs_over(
    model: nn.Module, batches: Iterable[Batch], params: Mapping[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and per-example losses [N] (float64, CPU) over ``batches``, in eval mode, without gradients.

    The model's train/eval flags are restored afterwards (docs/pitfalls.md §4, 5); its weights are not touched.
    """
    logits_parts, loss_parts = [], []
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            logits = batch_logits(model, batch, params)
            loss_parts.append(per_example_loss_from_logits(logits, batch["labels"].to(logits.device)).double().cpu())
            logits_parts.append(logits.double().cpu())
    if not loss_parts:
        raise ValueError("no batches to evaluate")
    return torch.cat(logits_parts), torch.cat(loss_parts)


def loss_over(model: nn.Module, batches: Iterable[Batch], params: Mapping[str, torch.Tensor] | None = None) -> float:
    """``(1/N) Σ_i l_i`` over every example of ``batches`` (float64: batch sizes cannot weight examples unequally)."""
    return float(outputs_over(model, batches, params)[1].mean())


def split_batches(
    split: EncodedSplit, *, batch_size: int, pad_token_id: int, indices: Sequence[int] | None = None
) -> Iterable[Batch]:
    """``split`` (or its ``indices``) cut into padded batches of ``batch_size``, in order, collated lazily."""
    order = list(range(len(split))) if indices is None else list(indices)
    for start in range(0, len(order), batch_size):
        yield collate(split, order[start : start + batch_size], pad_token_id)


def predict(
    model: nn.Module,
    split: EncodedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    indices: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, C] and per-example losses [N] of ``split`` (or its ``indices``), in eval mode, without gradients."""
    batches = split_batches(split, batch_size=batch_size, pad_token_id=pad_token_id, indices=indices)
    logits, losses = outputs_over(model, batches)
    return logits.numpy(), losses.numpy()


def evaluate(
    model: nn.Module,
    split: EncodedSplit,
    task: TaskSpec,
    *,
    batch_size: int = 64,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """``{"loss": mean per-example loss, <metric>: value, ...}`` of ``model`` on ``split``."""
    logits, losses = predict(model, split, batch_size=batch_size, pad_token_id=pad_token_id)
    predictions = logits[:, 0] if task.is_regression else logits.argmax(axis=1)
    result = {"loss": float(losses.mean())}
    result.update(compute_metrics(task, predictions, split.labels.numpy()))
    return result
