"""Base optimizers with the usual fine-tuning parameter groups.

Weight decay applies to matrices (weights of linear layers and embeddings) and never to biases or LayerNorm
parameters. AdamW's decay is decoupled (Loshchilov & Hutter); Adam, AMSGrad, Adagrad and SGD use torch's
coupled L2 ``weight_decay`` with the same groups. Adafactor (Shazeer & Stern 2018; the optimizer of Bahri et al.'s
T5 runs) is ``torch.optim.Adafactor``: factored second moments for matrices, no first moment, updates clipped to
RMS ≤ 1 and scaled by max(1e-3, RMS(θ)); its ``lr`` caps the relative step ρ_t = min(lr, 1/√t) (T5 used 1e-3,
not a BERT AdamW rate), and its decay is decoupled (θ ← θ − lr·λ·θ).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

BASE_OPTIMIZERS = ("adamw", "adam", "amsgrad", "adagrad", "sgd", "adafactor")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation parameters (all 1-D tensors, and anything named like a LayerNorm) get no decay."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: ``decay`` (weight_decay) and ``no_decay`` (0.0); frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [group for group in groups if group["params"]]


def make_base_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.01,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build the base optimizer ``name`` (one of :data:`BASE_OPTIMIZERS`) over ``model``'s trainable parameters."""
    if name not in BASE_OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; expected one of {', '.join(BASE_OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    groups = parameter_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = _fused(name, groups)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **fused)
    if name == "amsgrad":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, amsgrad=True, **fused)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=1e-10, **fused)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"SGD momentum must be in [0, 1), got {momentum}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, **fused)


#: the device types on which torch has a one-kernel ("fused") step for each base optimizer
FUSED_DEVICES = {
    "adamw": {"cpu", "cuda"},
    "adam": {"cpu", "cuda"},
    "amsgrad": {"cpu", "cuda"},
    "sgd": {"cpu", "cuda"},
    "adagrad": {"cpu"},
}


def _fused(name: str, groups: list[dict]) -> dict:
    """``{"fused": True}`` when every parameter lies on a device where torch fuses ``name``'s step, else ``{}``.

    Why: torch's default step on the CPU is a loop of about ten elementwise passes per tensor; the fused kernel makes
    one. AdamW on MiniLM (22.7 M parameters, 1 thread): 32 ms per step fused against 233 ms, a quarter of a whole
    training step (benchmarks/results/optimizer_overhead.md), and spent again by every data-parallel process. The
    update is the same up to float rounding (the kernel orders the arithmetic differently);
    tests/optimizers/test_optimizer_contract.py compares the two.
    """
    devices = {p.device.type for group in groups for p in group["params"]}
    floating = all(p.dtype.is_floating_point for group in groups for p in group["params"])
    return {"fused": True} if floating and devices <= FUSED_DEVICES.get(name, set()) else {}
