"""The SAM family inside the Hugging Face Trainer: :class:`SharpnessAwareTrainer`.

The Trainer keeps its own loop, base optimizer, scheduler, clipping, logging, checkpoints and autocast. Only its
``training_step`` changes: one sharpness-aware step of a registry variant (:mod:`optimizers.variants`) on the
micro-batch (ascent, ε, the pass at w + ε, the bitwise restore; δ-SAM's weights, ESAM's selection, GSAM's
decomposition, LookSAM's reuse as in our own trainer) leaves the descent gradient in ``.grad``; the Trainer then
clips, steps its optimizer and its scheduler exactly as for plain training. GSAM's ρ follows the Trainer's learning
rate. FSAM's mask is refreshed every ``mask_interval`` optimizer steps from ``fisher_samples`` training examples.

Gradient accumulation (``gradient_accumulation_steps = K``): each micro-batch takes its own ε, and the K descent
gradients are averaged — m-sharpness with m = K. bf16 autocast works as in the Trainer.

fp16: the Trainer's ``GradScaler`` unscales once, at its optimizer step, which SAM cannot wait for (ε must come from
the unscaled ascent gradient). So both backward passes are scaled by the scaler's current scale S, the core unscales
each one itself (ε from the unscaled ascent gradient, as :mod:`optimizers.loss_scale` does in our trainer), and the
descent gradient is handed back multiplied by S again: the scaler then unscales it exactly once, clips after
unscaling, and skips or steps and updates S by its own rule. An overflow in either pass (weights already restored
bitwise by the core, no ε applied) leaves an infinite gradient, so the scaler skips that optimizer step and backs
off, as it does for plain training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Trainer

from landscape.core.errors import ConfigError
from landscape.data.losses import model_inputs, per_example_loss_from_logits
from optimizers import BatchClosure, make_sharpness_optimizer
from optimizers.loss_scale import unscale_gradients


class _HeldGroups(torch.optim.Optimizer):
    """Parameter groups for the sharpness-aware core, whose own base step does nothing: the Trainer steps its own."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        super().__init__([{"params": params, "initial_lr": lr}], {"lr": lr})

    def step(self, closure: Any = None) -> None:
        return None


class _TrainerLossScale:
    """The Trainer's ``torch.amp.GradScaler`` seen as the core's loss scale (see the module docstring).

    ``scale`` is the scaler's current S (it changes only at the Trainer's optimizer step); ``update`` does nothing,
    the scaler updates itself when the Trainer steps. The Trainer saves the scaler in its checkpoints.
    """

    def __init__(self, scaler: Any, device: torch.device) -> None:
        self.scaler, self.device = scaler, device

    @property
    def scale(self) -> float:
        # scaler.scale(·) and not get_scale(): the scaler creates its scale tensor on its first scale() call, on the
        # device of what it scales (the gradients' device), and its unscale_ (the Trainer's clipping) needs it.
        return float(self.scaler.scale(torch.ones((), dtype=torch.float32, device=self.device)))

    def unscale(self, params: list[torch.Tensor]) -> bool:
        return unscale_gradients(params, self.scale)

    def update(self, *, skipped: bool) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class SharpnessAwareTrainer(Trainer):
    """``transformers.Trainer`` whose training step is the registry's ``sam`` variant (default ``"sam"``).

    ``sam_settings``: the variant's settings (``rho``, ``eta``, ``delta_beta``...). ``fisher``: an FSAM mask
    provider (``analyses.fisher.EmpiricalFisherMask()``) for ``fsam``, with ``mask_interval``, ``fisher_samples``,
    ``sparsity``, ``fisher_mode`` and ``fisher_dataset`` (the examples drawn from, default the training set; drawn
    with the generator seeded by (seed, step) our trainer uses).
    """

    def __init__(
        self,
        *args: Any,
        sam: str = "sam",
        sam_settings: dict[str, Any] | None = None,
        fisher: Any = None,
        mask_interval: int = 100,
        fisher_samples: int = 128,
        sparsity: float = 0.9,
        fisher_mode: str = "per-example",
        fisher_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sam_variant, self.sam_settings = sam, dict(sam_settings or {})
        self.fisher, self.mask_interval, self.fisher_samples = fisher, mask_interval, fisher_samples
        self.sparsity, self.fisher_mode = sparsity, fisher_mode
        self.fisher_dataset = fisher_dataset  # where FSAM draws its N_Fisher examples (default: the training set)
        self._sharpness: Any = None
        self._mask_step: int | None = None

    def sharpness_optimizer(self, model: torch.nn.Module) -> Any:
        """The sharpness-aware core over the trainable parameters (built once)."""
        if self._sharpness is None:
            params = [p for p in model.parameters() if p.requires_grad]
            held = _HeldGroups(params, self.args.learning_rate)
            self._sharpness = make_sharpness_optimizer(
                self.sam_variant, held, named_parameters=model.named_parameters(), seed=self.args.seed,
                loss_scale=self._loss_scale(params[0].device), **self.sam_settings,
            )  # fmt: skip
        return self._sharpness

    def _loss_scale(self, device: torch.device) -> _TrainerLossScale | None:
        # accelerate runs fp16 through autocast and a GradScaler on CUDA (and other accelerators); on the CPU it
        # runs neither (plain fp32), and then there is nothing to scale here either.
        if not self.args.fp16 or not getattr(self.accelerator, "native_amp", False):
            return None
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not hasattr(scaler, "scale"):
            raise ConfigError(
                "SharpnessAwareTrainer: fp16 needs the Trainer's torch.amp.GradScaler, and this set-up has none "
                f"({type(scaler).__name__}); use bf16 or fp32"
            )
        return _TrainerLossScale(scaler, device)

    def _refresh_mask(self, model: torch.nn.Module, optimizer: Any) -> None:
        step = self.state.global_step
        if self._mask_step == step or step % self.mask_interval:
            return
        if self.fisher is None:
            raise ConfigError("SharpnessAwareTrainer(sam='fsam') needs fisher=analyses.fisher.EmpiricalFisherMask()")
        dataset = self.fisher_dataset if self.fisher_dataset is not None else self.train_dataset
        count = min(self.fisher_samples, len(dataset))
        chosen = np.random.default_rng([self.args.seed, step, 1]).choice(len(dataset), size=count, replace=False)
        size = self.args.per_device_train_batch_size
        batches = [
            dict(self.data_collator([dataset[int(i)] for i in chosen[start : start + size]]))
            for start in range(0, count, size)
        ]
        previous = optimizer.mask_by_name(model.named_parameters()) or None
        optimizer.release_buffers()  # as our trainer: the Fisher gets the memory held between steps
        mask, _ = self.fisher(model, batches, mode=self.fisher_mode, sparsity=self.sparsity, previous=previous)
        optimizer.set_mask(mask, model.named_parameters())
        self._mask_step = step
        model.train()

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        optimizer = self.sharpness_optimizer(model)
        if self.sam_variant == "fsam" or self.sam_settings.get("fisher_mask"):
            self._refresh_mask(model, optimizer)
        for group in optimizer.param_groups:  # GSAM's ρ follows the Trainer's schedule
            group["lr"] = self._get_learning_rate()
        params = optimizer.parameters()
        earlier = [p.grad for p in params]  # what the earlier micro-batches of this accumulation step left

        def losses_of(indices: torch.Tensor | None) -> torch.Tensor:
            rows = inputs if indices is None else {key: value[indices] for key, value in inputs.items()}
            with self.compute_loss_context_manager():
                logits = model(**model_inputs(rows, model)).logits
            return per_example_loss_from_logits(logits.float(), rows["labels"])

        # fp16: S before the step, the one both passes were scaled by (the scaler changes it only when stepping).
        scale = 1.0 if optimizer.loss_scale is None else optimizer.loss_scale.scale
        losses = optimizer.step(BatchClosure(losses_of, int(inputs["labels"].shape[0])))
        share = 1.0 / self.args.gradient_accumulation_steps
        with torch.no_grad():
            if optimizer.skipped:  # an fp16 overflow: the Trainer's scaler must skip this optimizer step too
                for param, before in zip(params, earlier, strict=True):
                    param.grad = before
                params[0].grad = torch.full_like(params[0], float("inf"))
                return losses.mean().detach() * share
            for param, before in zip(params, earlier, strict=True):
                # scaled back by S: the scaler unscales the accumulated gradient once, at its step
                grad = None if param.grad is None else param.grad * (share * scale)
                param.grad = before if grad is None else grad if before is None else before + grad
        return losses.mean().detach() * share
