"""Per-example losses: the contract every consumer of the loss builds on.

``per_example_loss(model, batch) -> Tensor[B]``: cross-entropy for classification, squared error for regression
(STS-B). Consumers that need a mean take it themselves; δ-SAM (instance weights), ESAM (instance selection), the
empirical Fisher (per-example gradients) and per-instance sharpness need the per-example form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of ``batch`` the model takes (everything but ``labels``)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss per example, shape [B]. ``logits`` is [B, C]; C == 1 means regression (squared error)."""
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2)
    return F.cross_entropy(logits, labels, reduction="none")


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward ``batch`` through ``model`` and return the loss of each example, shape [B]."""
    logits = model(**model_inputs(batch)).logits
    return per_example_loss_from_logits(logits, batch["labels"])
