"""Optimizers behind the ``torch.optim`` contract, driven by a closure that returns per-example losses.

- :func:`make_base_optimizer` builds AdamW, Adam, AMSGrad, Adagrad or SGD with decay / no-decay groups;
- :class:`ClosureOptimizer` wraps any base optimizer instance: ``step(closure)`` evaluates the per-example
  losses of the current batch, back-propagates their mean, clips, and steps the base optimizer;
- :class:`DynamicLossScale` (fp16) and :class:`Replicas` (data-parallel processes) are what a step may be handed;
- :class:`SharpnessAware` is the sharpness-aware core on the same contract, running a variant's pieces
  (:mod:`optimizers.pieces`); :func:`make_sharpness_optimizer` builds an entry of the registry
  (:data:`VARIANTS`, :mod:`optimizers.variants`) by name.

The names resolve on first use, so that ``optimizers.variants`` (the registry) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BASE_OPTIMIZERS": "optimizers.base",
    "make_base_optimizer": "optimizers.base",
    "parameter_groups": "optimizers.base",
    "BatchClosure": "optimizers.closure",
    "ClosureOptimizer": "optimizers.closure",
    "NonFiniteLossError": "optimizers.closure",
    "delta_sam_weights": "optimizers.pieces",
    "DynamicLossScale": "optimizers.loss_scale",
    "ProcessGroupReplicas": "optimizers.replicas",
    "Replicas": "optimizers.replicas",
    "SharpnessAware": "optimizers.sam",
    "StepReport": "optimizers.sam",
    "make_sharpness_optimizer": "optimizers.sam",
    "SAM_VARIANTS": "optimizers.variants",
    "VARIANTS": "optimizers.variants",
    "get_variant": "optimizers.variants",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'optimizers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
