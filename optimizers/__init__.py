"""Optimizers behind the ``torch.optim`` contract, driven by a closure that returns per-example losses.

- :func:`make_base_optimizer` builds AdamW, Adam, AMSGrad, Adagrad or SGD with decay / no-decay groups;
- :class:`ClosureOptimizer` wraps any base optimizer instance: ``step(closure)`` evaluates the per-example
  losses of the current batch, back-propagates their mean, clips, and steps the base optimizer.
  The sharpness-aware family (SAM, ASAM, FSAM, δ-SAM, ...) builds on the same contract.
"""

from optimizers.base import BASE_OPTIMIZERS, make_base_optimizer, parameter_groups
from optimizers.closure import ClosureOptimizer, NonFiniteLossError

__all__ = [
    "BASE_OPTIMIZERS",
    "ClosureOptimizer",
    "NonFiniteLossError",
    "make_base_optimizer",
    "parameter_groups",
]
