"""What determines a fine-tuning run: :class:`TrainConfig`, the papers' recipes, and old configs' names.

A config is stored in ``run.json`` as the dict of its fields; :func:`upgrade_config` reads a dict written by an
earlier version (renamed options) so that old runs still resume, load and plot.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from landscape.core.errors import ConfigError
from landscape.core.rundir import RENAMED_OPTIONS, upgrade_config
from landscape.data.tasks import get_task
from landscape.models.devices import autocast_dtype, resolve_device
from landscape.training.recipes import DEFAULT_RECIPE, PAPER_RECIPES, RECIPES, with_recipe
from optimizers import pieces
from optimizers.base import BASE_OPTIMIZERS
from optimizers.variants import CORE_SETTINGS, SAM_VARIANTS, get_variant

#: FSAM's mask before the first refresh: the Fisher of step 0 (the default), or Algorithm 1's random one (line 1)
INITIAL_MASKS = ("fisher", "random")

# A learning rate above this is a typo (1e39 overflows float32 weights at the first step); divergence at smaller
# ones is caught by the loop, which stops and marks the run "diverged".
MAX_LEARNING_RATE = 1e3


def refuse_renamed(options: dict[str, Any]) -> None:
    """A user's option under an old name fails with one line naming the new one."""
    for old, new in RENAMED_OPTIONS.items():
        if old in options:
            raise ConfigError(f"option {old!r} is now called {new!r}; rename it in the config or command line")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a fine-tuning run. ``None`` means "the task's paper default" where noted."""

    task: str
    model: str = "minilm"
    data_dir: str | None = None
    out: str | None = None  # default: runs/<task>-[<sam>-]<optimizer>-seed<seed>
    optimizer: str = "adamw"
    lr: float | None = None  # default: FSAM Table 10 for the task
    batch_size: int = 16
    epochs: int | None = None  # default: FSAM Table 10 for the task
    max_steps: int | None = None  # overrides epochs when given
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio when given
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    momentum: float = 0.9  # SGD only
    adam_beta1: float = 0.9  # Adam / AdamW / AMSGrad (FSAM Table 9 runs beta1 = 0)
    adam_beta2: float = 0.999
    max_length: int = 128
    train_fraction: float = 1.0
    seed: int = 42
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 200
    keep_checkpoints: int = 1
    eval_batch_size: int = 64
    dropout: float | None = None  # None: the model config's dropout
    device: str = "auto"  # auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps; a run may resume elsewhere
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (master weights and SAM's arithmetic stay fp32)
    grad_accum: int = 1  # micro-batches of batch_size / grad_accum per step (one gradient, less memory)
    local_ascent: bool = False  # data parallel: each process its own epsilon (m-sharpness with m = world size)
    # --- the sharpness-aware family (optimizers.variants); "none" is the base optimizer alone
    sam: str = "none"
    rho: float = 0.05
    eta: float = 0.01  # ASAM: T = |w| + eta
    ascent_fraction: float = 1.0  # efficient SAM: ascent on this fraction of the batch
    m_sharpness: int = 1  # m disjoint ascent micro-batches
    exact_rho: bool = False  # Fisher mask: normalise after masking (||eps|| = rho) instead of Eq. 6
    same_dropout: bool | None = None  # replay the ascent's dropout masks in the descent; None: the variant's default
    sparsity: float = 0.9  # FSAM s: perturb the top (1 - s) of coordinates by empirical Fisher
    mask_interval: int = 100  # FSAM F_i: refresh the mask every this many steps
    fisher_samples: int = 128  # FSAM N_Fisher
    fisher_mode: str = "per-example"  # "per-example" (paper Eq. 9) or "batch-mean" (authors' code)
    fisher_initial_mask: str = "fisher"  # the mask of steps 1..F_i: the Fisher at step 0, or "random" (Alg. 1 line 1)
    fisher_mask: bool = False  # apply the Fisher mask to another variant (F-ESAM, F-GSAM, ...); implied by fsam
    delta_beta: float = 5.0  # delta-SAM beta (Eq. 5); before 2026-12 named "beta"
    gsam_alpha: float = 0.1
    rho_min: float = 0.0  # GSAM: rho at learning rate 0
    esam_beta: float = 0.6  # ESAM: probability of perturbing a coordinate
    esam_gamma: float = 0.5  # ESAM: fraction of the batch selected for the descent
    looksam_k: int = 5  # LookSAM: a SAM step every k steps
    looksam_alpha: float = 0.7  # LookSAM: weight of the reused orthogonal direction
    delta_weights: str = "clipped"  # delta-SAM: Eq. 6 weights clipped at 0 and renormalised, or "literal"
    asam_exempt_biases: bool = False  # ASAM: scale only parameters named *weight* (the authors' code)
    recipe: str | None = None  # the paper preset the options were completed from (TrainConfig.from_recipe, --recipe)
    # --- transfer (analyses.transfer): start from another run's encoder, optionally train the head alone
    init_from: str | None = None  # .safetensors file or run directory (its final.safetensors) giving the encoder
    freeze_encoder: bool = False  # linear probe: only the classification head is trained

    @classmethod
    def from_recipe(cls, recipe: str, task: str, **options: Any) -> TrainConfig:
        """A config of paper preset ``recipe`` (``landscape.training.recipes``) for ``task``; ``options`` win."""
        values = with_recipe({"task": task, **options}, recipe, get_task(task).name)
        return cls(**values, recipe=recipe)

    def resolved(self) -> TrainConfig:
        """Fill the task-dependent defaults (lr, epochs, out) and validate every value."""
        task = get_task(self.task)
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"recipe {self.recipe!r} is unknown; expected one of {', '.join(RECIPES)}")
        config = self
        lr, epochs = PAPER_RECIPES.get(task.name, DEFAULT_RECIPE)
        if config.same_dropout is None and config.sam in SAM_VARIANTS:
            config = replace(config, same_dropout=get_variant(config.sam).same_dropout)
        config = replace(
            config,
            task=task.name,
            lr=config.lr if config.lr is not None else lr,
            epochs=config.epochs if config.epochs is not None else epochs,
        )
        if config.data_dir:  # absolute, so that analyses started from another folder find the run's data
            config = replace(config, data_dir=str(Path(config.data_dir).expanduser().resolve()))
        if config.out is None:
            variant = "" if config.sam == "none" else f"{config.sam}-"
            config = replace(config, out=f"runs/{task.name}-{variant}{config.optimizer}-seed{config.seed}")
        config.validate()
        return config

    def validate(self) -> None:
        for field in fields(self):  # NaN passes every comparison below, and inf is no learning rate
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be a finite number, got {value}")
        positive = {
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "save_every": self.save_every,
            "keep_checkpoints": self.keep_checkpoints,
            "eval_batch_size": self.eval_batch_size,
            "epochs": self.epochs,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be > 0, got {self.max_steps}")
        if self.lr is not None and not 0 < self.lr <= MAX_LEARNING_RATE:
            raise ConfigError(f"lr must be in (0, {MAX_LEARNING_RATE:g}], got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 (or null for no clipping), got {self.max_grad_norm}")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.optimizer not in BASE_OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; expected one of {', '.join(BASE_OPTIMIZERS)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sam not in SAM_VARIANTS:  # the pieces' own ranges are checked when the optimizer is built
            raise ConfigError(f"sam {self.sam!r} is unknown; expected one of {', '.join(SAM_VARIANTS)}")
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("mask_interval", "fisher_samples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        resolve_device(self.device)  # refuses an unknown device or one this machine lacks, before anything is written
        autocast_dtype(self.precision)
        if self.fisher_initial_mask not in INITIAL_MASKS:
            raise ConfigError(
                f"fisher_initial_mask {self.fisher_initial_mask!r} is unknown; "
                f"expected one of {', '.join(INITIAL_MASKS)}"
            )
        if not isinstance(self.fisher_mode, str) or not self.fisher_mode:
            raise ConfigError(f"fisher_mode must be a non-empty name, got {self.fisher_mode!r}")
        for name in ("momentum", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("rho", "eta", "delta_beta", "gsam_alpha", "rho_min", "looksam_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("esam_beta", "esam_gamma", "ascent_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.rho_min > self.rho:
            raise ConfigError(f"rho_min must be <= rho = {self.rho}, got {self.rho_min}")
        for name in ("m_sharpness", "looksam_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be an int >= 1, got {self.grad_accum!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"grad_accum {self.grad_accum} does not divide batch_size {self.batch_size}; "
                "expected micro-batches of equal size batch_size / grad_accum"
            )
        if self.grad_accum > 1 and self.sam != "none":
            whole = [name for name in get_variant(self.sam).pieces or () if getattr(pieces, name).whole_batch]
            if whole:
                raise ConfigError(
                    f"--grad-accum {self.grad_accum} with --sam {self.sam}: {self.sam} weighs or selects examples "
                    "from the losses of the whole batch, which accumulation never holds at once; use --grad-accum 1"
                )
        if self.local_ascent and self.sam == "none":
            raise ConfigError("--local-ascent keeps each process's own epsilon: it needs a sharpness-aware --sam")
        if self.uses_fisher_mask and self.sam == "none":
            raise ConfigError("fisher_mask needs a sharpness-aware variant (--sam); it masks the perturbation")

    @property
    def uses_fisher_mask(self) -> bool:
        return get_variant(self.sam).mask or self.fisher_mask

    def sharpness_settings(self) -> dict[str, Any]:
        """The options of the sharpness-aware core and of this variant's pieces, under their one name."""
        names = (*CORE_SETTINGS, *get_variant(self.sam).settings)
        return {name: getattr(self, name) for name in names}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config that must match for ``--resume`` (paths may be spelled differently).

    Options added to :class:`TrainConfig` after a run was written take their defaults, so older runs still resume.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    # A run may resume on another device (its arithmetic is the same); the world size is checked by the trainer.
    ignored = ("out", "data_dir", "device")
    return {k: v for k, v in {**defaults, **upgrade_config(config)}.items() if k not in ignored}
