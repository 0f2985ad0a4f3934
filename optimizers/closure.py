"""The closure contract shared by every optimizer of the toolkit.

``step(closure)``: ``closure()`` re-evaluates the current batch and returns its per-example losses, shape [B],
with the autograd graph attached and no backward done. The optimizer owns everything else: zeroing gradients,
backward, clipping, the base step. ``ClosureOptimizer`` is plain descent; sharpness-aware variants insert their
ascent before the descent through the same contract, so the training loop never changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class BatchClosure:
    """The closure of one batch: ``closure(indices=None)`` -> per-example losses of the batch (or of its rows
    ``indices``), shape [B'], graph attached. ``size`` is B, so an optimizer can choose micro-batches without a forward.
    """

    def __init__(self, losses_of: Callable[[torch.Tensor | None], torch.Tensor], size: int) -> None:
        self.losses_of = losses_of
        self.size = size

    def __call__(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.losses_of(indices)


class NonFiniteLossError(FloatingPointError):
    """The closure returned a NaN or infinite loss; stepping over it would silently corrupt the weights."""


class ClosureOptimizer(torch.optim.Optimizer):
    """Wrap a base optimizer instance; ``param_groups`` and ``state`` are the base's own objects.

    Schedulers therefore act on the base's learning rate, and ``state_dict`` / ``load_state_dict`` round-trip the
    base's state. ``max_grad_norm`` clips the global L2 norm of the final gradient before the base step.
    """

    def __init__(self, base: torch.optim.Optimizer, *, max_grad_norm: float | None = None) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.base = base
        self.max_grad_norm = max_grad_norm
        # Optimizer.__init__ appends the very same group dicts; re-linking afterwards makes sharing explicit.
        super().__init__(base.param_groups, base.defaults)
        self._link_base()

    def _link_base(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self._link_base()

    def state_dict(self) -> dict:
        return self.base.state_dict()

    @staticmethod
    def evaluate(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run the closure with gradients enabled and check its output is finite per-example losses [B]."""
        with torch.enable_grad():
            losses = closure()
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"the closure must return per-example losses of shape [B], got {shape}")
        if not torch.isfinite(losses).all():
            bad = int((~torch.isfinite(losses)).sum())
            raise NonFiniteLossError(f"{bad} of {losses.numel()} per-example losses are not finite")
        return losses

    def descend(self) -> None:
        """Clip the accumulated gradient (global L2 norm) and take the base optimizer's step."""
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        self.base.step()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One descent step on the mean of the closure's per-example losses; returns them detached, shape [B]."""
        if closure is None:
            raise ValueError("step() needs a closure that returns the per-example losses of the current batch")
        self.zero_grad(set_to_none=True)
        losses = self.evaluate(closure)
        with torch.enable_grad():
            losses.mean().backward()
        self.descend()
        return losses.detach()
