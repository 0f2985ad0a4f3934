"""Evaluation of a model on an encoded split: mean loss and the task's metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from landscape.data.encoding import EncodedSplit, collate
from landscape.data.losses import model_inputs, per_example_loss_from_logits
from landscape.data.metrics import compute_metrics
from landscape.data.tasks import TaskSpec
from landscape.models.state import eval_mode


def predict(
    model: nn.Module,
    split: EncodedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    indices: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, C] and per-example losses [N] of ``split`` (or its ``indices``), in eval mode, without gradients."""
    order = list(range(len(split))) if indices is None else list(indices)
    logits_parts, loss_parts = [], []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate(split, order[start : start + batch_size], pad_token_id)
            logits = model(**model_inputs(batch)).logits
            loss_parts.append(per_example_loss_from_logits(logits, batch["labels"]).double().numpy())
            logits_parts.append(logits.double().numpy())
    return np.concatenate(logits_parts), np.concatenate(loss_parts)


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
