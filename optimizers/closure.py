"""The closure contract shared by every optimizer of the toolkit.

``step(closure)``: ``closure()`` re-evaluates the current batch and returns its per-example losses, shape [B],
with the autograd graph attached and no backward done. The optimizer owns everything else: zeroing gradients,
backward, clipping, the base step. ``ClosureOptimizer`` is plain descent; sharpness-aware variants insert their
ascent before the descent through the same contract, so the training loop never changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optimizers.loss_scale import DynamicLossScale
from optimizers.replicas import SINGLE, Replicas


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

    ``accumulation`` K: each backward runs over K micro-batches of the batch (``tensor_split``, sizes differing by
    at most one), one forward and backward at a time, so activation memory is that of b/K examples; the gradient
    is the same as one backward over the batch (the objective is normalised by the whole batch's count).
    ``replicas``: the data-parallel processes (:mod:`optimizers.replicas`); gradients are averaged over them after
    the backward, once per step whatever K. ``loss_scale``: fp16's dynamic loss scale (:mod:`optimizers.loss_scale`);
    a step whose unscaled gradient is not finite is skipped (``skipped`` says so).
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
        accumulation: int = 1,
        replicas: Replicas | None = None,
        loss_scale: DynamicLossScale | None = None,
    ) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"accumulation (gradient accumulation steps) must be an int >= 1, got {accumulation!r}")
        self.base = base
        self.max_grad_norm = max_grad_norm
        self.accumulation = accumulation
        self.replicas = SINGLE if replicas is None else replicas
        self.loss_scale = loss_scale
        self.skipped = False
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
        state_dict = dict(state_dict)
        scale = state_dict.pop("loss_scale", None)
        self.base.load_state_dict(state_dict)
        self._link_base()
        if scale is not None and self.loss_scale is not None:
            self.loss_scale.load_state_dict(scale)

    def state_dict(self) -> dict:
        state = self.base.state_dict()
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def evaluate(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run the closure with gradients enabled and check its output is finite per-example losses [B].

        Finiteness is agreed over the replicas: when one process sees a non-finite loss, every process raises.
        """
        with torch.enable_grad():
            losses = closure()
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"the closure must return per-example losses of shape [B], got {shape}")
        self._agree_finite(losses)
        return losses

    def _agree_finite(self, losses: torch.Tensor | None) -> None:
        bad = 0 if losses is None else int((~torch.isfinite(losses.detach())).sum())
        if self.replicas.agree(bad > 0):
            where = f"{bad} of {losses.numel()} per-example losses" if bad else "per-example losses on another process"
            raise NonFiniteLossError(f"{where} are not finite")

    def micro_batches(self, closure: Callable[..., torch.Tensor], rows: torch.Tensor | None) -> list:
        """The ``accumulation`` micro-batches of ``rows`` (None: the whole batch), as index tensors."""
        if self.accumulation == 1:
            return [rows]
        if rows is None:
            size = getattr(closure, "size", None)
            if not isinstance(size, int) or size <= 0:
                raise ValueError("gradient accumulation needs a closure with an int attribute `size` (batch size)")
            rows = torch.arange(size)  # cpu: row indices; the closure moves them to the batch's device
        return list(rows.tensor_split(self.accumulation))

    def backward_objective(
        self,
        closure: Callable[..., torch.Tensor],
        rows: torch.Tensor | None = None,
        *,
        weigh: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
        group: Replicas | None = None,
    ) -> torch.Tensor:
        """Back-propagate Σ_i c_i l_i over the examples ``rows`` of the batch (None: all); return their losses.

        The coefficients sum to 1 over the examples of ``group`` (default: every replica, the global batch; see
        :mod:`optimizers.replicas` for the factor of the group's size): ``weigh(losses_detached)`` gives this
        process's c (δ-SAM's weights, ESAM's selection; they need the whole batch in one forward), or None for
        uniform c_i = 1/N, which runs over the ``accumulation`` micro-batches. Gradients add up in ``.grad``;
        the caller averages them over the replicas.
        """
        group = self.replicas if group is None else group
        scale = 1.0 if self.loss_scale is None else self.loss_scale.scale
        if weigh is not None or self.accumulation == 1:
            losses = self.evaluate(lambda: closure() if rows is None else closure(rows))
            weights = None if weigh is None else weigh(losses.detach())
            count = losses.numel()
            total = None if weights is not None else self._group_count(count, group)
            with torch.enable_grad():  # step() runs under no_grad; the objective needs the graph of the losses
                if weights is not None:
                    objective = (weights * losses).sum() * group.world_size
                elif total == count * group.world_size:  # W / N = 1 / count: the plain mean
                    objective = losses.mean()
                else:
                    objective = losses.sum() * (group.world_size / total)
                (objective * scale if scale != 1 else objective).backward()
            return losses.detach()
        parts = self.micro_batches(closure, rows)
        # Each micro-batch's sum over the whole batch's count: an average over examples (docs/pitfalls.md §30).
        factor = group.world_size / self._group_count(sum(len(part) for part in parts), group) * scale
        out = []
        for part in parts:
            if len(part) == 0:  # a short batch: the other processes still check this micro-batch's losses
                self._agree_finite(None)
                continue
            losses = self.evaluate(lambda part=part: closure(part))
            with torch.enable_grad():
                (losses.sum() * factor).backward()
            out.append(losses.detach())
        return torch.cat(out)

    @staticmethod
    def _group_count(count: int, group: Replicas) -> int:
        if group.world_size == 1:
            return count
        # cpu: a count; the replicas move it to their device for the collective
        return int(group.sum(torch.tensor([float(count)], dtype=torch.float64)).item())

    def unscaled(self) -> bool:
        """Unscale the gradients (fp16); True when they are finite on every replica (always True without a scale)."""
        if self.loss_scale is None:
            return True
        finite = self.loss_scale.unscale(self.parameters())
        return not self.replicas.agree(not finite)

    def finish(self, *, skipped: bool) -> None:
        """Record whether this step was skipped (an fp16 overflow) and update the loss scale."""
        self.skipped = skipped
        if skipped:
            self.zero_grad(set_to_none=True)
        if self.loss_scale is not None:
            self.loss_scale.update(skipped=skipped)

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
        losses = self.backward_objective(closure)
        self.replicas.average_gradients(self.parameters())
        finite = self.unscaled()
        if finite:
            self.descend()
        self.finish(skipped=not finite)
        return losses
