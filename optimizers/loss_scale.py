"""A dynamic loss scale for fp16 training that is correct for SAM's two backward passes (docs/pitfalls.md §27).

``torch.amp.GradScaler`` unscales an optimizer's gradients once per ``update`` ("unscale_() has already been
called"), and its ``step`` decides about skipping only at the end: a sharpness-aware step needs the ascent
gradient unscaled *before* ε is formed, and a second, separately scaled backward at w + ε. So the optimizers of
this package scale each objective themselves and unscale after each backward (``ClosureOptimizer``):

- every backward is of ``scale · objective`` (both SAM passes, every accumulation micro-batch);
- ε is computed from the unscaled ascent gradient; clipping comes after unscaling;
- a non-finite gradient after unscaling (an fp16 overflow) skips the whole step: no ε is applied (the ascent
  overflowed) or the weights are restored bitwise and the base optimizer does not step (the descent overflowed),
  and the scale is multiplied by ``backoff_factor``; after ``growth_interval`` good steps in a row it is
  multiplied by ``growth_factor`` (GradScaler's defaults and rule).

The scale is part of the optimizer's ``state_dict``, so a resumed run continues with the same scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class DynamicLossScale:
    """The loss scale S (a power of two by default) and its update rule; see the module docstring."""

    def __init__(
        self,
        initial: float = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (math.isfinite(initial) and initial > 0):
            raise ValueError(f"the initial loss scale must be a finite number > 0, got {initial}")
        if not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(
                f"expected growth_factor > 1 and 0 < backoff_factor < 1, got {growth_factor} and {backoff_factor}"
            )
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self.scale = float(initial)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0

    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Divide every ``p.grad`` by the scale in place; True when all of them are finite afterwards."""
        return unscale_gradients(params, self.scale)

    def update(self, *, skipped: bool) -> None:
        """After a step: back off on an overflow, grow after ``growth_interval`` good steps in a row."""
        if skipped:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state.get("good_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def unscale_gradients(params: list[torch.Tensor], scale: float) -> bool:
    """Divide every ``p.grad`` by ``scale`` in place; True when all of them are finite afterwards."""
    finite = True
    for param in params:
        if param.grad is not None:
            param.grad.div_(scale)
            finite = finite and bool(torch.isfinite(param.grad).all())
    return finite
