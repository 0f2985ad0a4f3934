"""Optimizers behind the ``torch.optim`` contract, driven by a closure that returns per-example losses.

- :func:`make_base_optimizer` builds AdamW, Adam, AMSGrad, Adagrad or SGD with decay / no-decay groups;
- :class:`ClosureOptimizer` wraps any base optimizer instance: ``step(closure)`` evaluates the per-example
  losses of the current batch, back-propagates their mean, clips, and steps the base optimizer;
- :class:`SharpnessAware` is the SAM family on the same contract; :func:`make_sharpness_optimizer` builds a
  variant by name (:data:`SAM_VARIANTS`).
"""

from optimizers.base import BASE_OPTIMIZERS, make_base_optimizer, parameter_groups
from optimizers.closure import BatchClosure, ClosureOptimizer, NonFiniteLossError
from optimizers.family import SAM_VARIANTS, make_sharpness_optimizer
from optimizers.sam import SharpnessAware, StepReport, delta_sam_weights

__all__ = [
    "BASE_OPTIMIZERS",
    "SAM_VARIANTS",
    "BatchClosure",
    "ClosureOptimizer",
    "NonFiniteLossError",
    "SharpnessAware",
    "StepReport",
    "delta_sam_weights",
    "make_base_optimizer",
    "make_sharpness_optimizer",
    "parameter_groups",
]
