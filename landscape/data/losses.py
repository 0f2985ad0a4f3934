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


def model_inputs(batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The subset of ``batch`` the model takes (everything but ``labels``).

    Given the model, ``token_type_ids`` are kept only for architectures with segment embeddings
    (``config.type_vocab_size > 1``: BERT, ELECTRA, ALBERT). RoBERTa has one segment, DeBERTa-v3 none, and
    DistilBERT and GPT-2 take no such input, while a BERT-style tokenizer emits them for sentence pairs: dropping
    them here is the one place the families differ in their inputs.
    """
    keys = MODEL_INPUTS if model is None or uses_token_types(model) else ("input_ids", "attention_mask")
    return {key: batch[key] for key in keys if key in batch}


def uses_token_types(model: nn.Module) -> bool:
    """The model has segment (token type) embeddings to look ``token_type_ids`` up in."""
    return int(getattr(getattr(model, "config", None), "type_vocab_size", 0) or 0) > 1


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss per example, shape [B]. ``logits`` is [B, C]; C == 1 means regression (squared error)."""
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2)
    return F.cross_entropy(logits, labels, reduction="none")


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward ``batch`` through ``model`` and return the loss of each example, shape [B]."""
    logits = model(**model_inputs(batch, model)).logits
    return per_example_loss_from_logits(logits, batch["labels"])
