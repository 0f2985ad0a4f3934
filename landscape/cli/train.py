"""``landscape train``: fine-tune a model on a GLUE/SuperGLUE task (see :mod:`landscape.training.loop`)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from analyses.fisher import FISHER_MODES, EmpiricalFisherMask
from landscape.cli.common import positive_int
from landscape.core.config import build_config, load_yaml, parse_overrides
from landscape.core.errors import ConfigError
from landscape.data.tasks import get_task
from landscape.models.devices import PRECISIONS
from landscape.training.config import INITIAL_MASKS, TrainConfig, refuse_renamed
from landscape.training.distributed import launched_rank
from landscape.training.loop import train
from landscape.training.recipes import RECIPES, recipe_options
from optimizers.base import BASE_OPTIMIZERS
from optimizers.variants import SAM_VARIANTS, VARIANTS

HELP = {
    "task": "task name, case-insensitive (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, boolq, cb, wic, ...)",
    "model": "'minilm' (offline default), a local model folder, or a hub name",
    "data_dir": "folder holding glue/<Task>/ and superglue/<Task>/ (default: $LANDSCAPE_DATA_DIR, else the hub)",
    "out": "run directory (default runs/<task>-<optimizer>-seed<seed>)",
    "optimizer": "base optimizer",
    "lr": "peak learning rate (default: the FSAM paper's Table 10 value for the task)",
    "batch_size": "training batch size",
    "epochs": "training epochs (default: Table 10 for the task)",
    "max_steps": "training steps; overrides --epochs",
    "warmup_ratio": "fraction of the steps with linear warm-up",
    "warmup_steps": "warm-up steps; overrides --warmup-ratio",
    "weight_decay": "weight decay of matrices (never biases or LayerNorm)",
    "max_grad_norm": "clip the global gradient L2 norm to this",
    "momentum": "SGD momentum",
    "max_length": "maximum tokens per example",
    "train_fraction": "train on a seeded subsample of this fraction of the training set (low-resource runs)",
    "seed": "seed of the head, data order, subsample and dropout",
    "eval_every": "evaluate on dev every N steps (0: at the end only)",
    "save_every": "write a resumable checkpoint every N steps",
    "keep_checkpoints": "how many resumable checkpoints to keep",
    "eval_batch_size": "evaluation batch size",
    "dropout": "override the model's hidden and attention dropout",
    "sam": "sharpness-aware variant wrapping the base optimizer (none: the base optimizer alone); "
    + "; ".join(f"{v.name}: {v.title} ({v.paper})" for v in VARIANTS.values() if v.paper),
    "rho": "SAM neighbourhood radius rho (GSAM: its peak)",
    "eta": "ASAM: T = |w| + eta",
    "ascent_fraction": "efficient SAM: ascent gradient from this fraction of the batch",
    "m_sharpness": "m disjoint ascent micro-batches with their own epsilon, descent gradients averaged (each part "
    "descends on itself; with --ascent-fraction < 1 the parts split the ascent micro-batch and each epsilon's "
    "descent is on the whole batch, Bahri et al. Fig. 2)",
    "exact_rho": "Fisher mask: normalise after masking so ||eps|| = rho (default: FSAM Eq. 6, ||eps|| <= rho)",
    "same_dropout": "replay the ascent pass's dropout masks in the descent pass (default: on for ESAM, whose "
    "selection compares the two passes' losses; off for the others)",
    "sparsity": "FSAM s: perturb only the top (1 - s) of coordinates by empirical Fisher",
    "mask_interval": "FSAM F_i: refresh the Fisher mask every N steps",
    "fisher_samples": "FSAM N_Fisher: training examples per Fisher estimate",
    "fisher_mode": "per-example (FSAM Eq. 9) or batch-mean (square of the mean gradient, as the authors' code)",
    "fisher_initial_mask": "FSAM's mask until the first refresh at step F_i: fisher (the Fisher at step 0, default) or "
    "random (Algorithm 1, line 1: a random 1 - s of the coordinates)",
    "fisher_mask": "apply the Fisher mask to another variant (F-ESAM, F-GSAM, ...)",
    "delta_beta": "delta-SAM beta (Eq. 5)",
    "gsam_alpha": "GSAM alpha",
    "rho_min": "GSAM: rho at learning rate 0",
    "esam_beta": "ESAM: probability of perturbing each coordinate",
    "esam_gamma": "ESAM: fraction of the batch used for the descent",
    "looksam_k": "LookSAM: one SAM step every k steps, the reused direction in between",
    "looksam_alpha": "LookSAM: weight alpha of the reused orthogonal direction",
    "delta_weights": "delta-SAM: Eq. 6 weights clipped at 0 and renormalised (default), or literal (may be < 0)",
    "asam_exempt_biases": "ASAM: scale only parameters named *weight*, as the authors' code (default: all)",
    "recipe": "a paper's preset for the task: fsam (FSAM 4.2 / Table 10), delta-sam (delta-SAM Table 3), "
    "bahri (efficient SAM, Alg. 1); options you set win",
    "adam_beta1": "Adam / AdamW / AMSGrad beta1 (FSAM Table 9: 0)",
    "device": "auto (CUDA when available, else MPS, else CPU), cpu, cuda, cuda:N or mps",
    "precision": "fp32, or bf16 / fp16 autocast (weights, optimizer state and SAM's epsilon stay fp32; fp16 with a "
    "dynamic loss scale that skips overflowing steps)",
    "grad_accum": "gradient accumulation: K micro-batches of batch_size / K per step, the same gradient with less "
    "memory (SAM's ascent uses the whole batch; for a per-micro-batch ascent use --m-sharpness K)",
    "local_ascent": "under torchrun: each process takes its own epsilon from its share of the batch "
    "(m-sharpness with m = world size); default: one epsilon from the all-reduced ascent gradient",
    "adam_beta2": "Adam / AdamW / AMSGrad beta2",
    "init_from": "start from the encoder of this .safetensors file or run directory (its final weights); "
    "the head is this task's fresh, seeded one",
    "freeze_encoder": "linear probe: train the classification head only (the encoder is frozen, in eval mode)",
}
CHOICES = {
    "optimizer": BASE_OPTIMIZERS,
    "sam": SAM_VARIANTS,
    "fisher_mode": FISHER_MODES,
    "fisher_initial_mask": INITIAL_MASKS,
    "recipe": RECIPES,
    "precision": PRECISIONS,
    "delta_weights": ("clipped", "literal"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model on a task",
        description="Fine-tune a model on a GLUE/SuperGLUE task. Options come from the defaults, then --config, "
        "then flags, then key=value overrides.",
    )
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _base_type(field.type)
        kwargs: dict = {"default": None, "help": HELP.get(field.name, "")}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if field.name in CHOICES:
            kwargs["choices"] = CHOICES[field.name]
        parser.add_argument(flag, type=kind, **kwargs)
    parser.add_argument("--config", help="YAML file of options (keys as the flags, with _ or -)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the final dev metrics as JSON")
    parser.add_argument(
        "--fisher-chunk",
        type=positive_int,
        help="FSAM: examples per block of per-example gradients in the Fisher (memory for speed; not a training "
        "option: it changes the Fisher only by float32 rounding; default: from the free memory, at most 32)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, applied last")
    parser.set_defaults(run=run)


def _base_type(annotation: object) -> type:
    text = str(annotation)
    for name, kind in (("int", int), ("float", float), ("bool", bool)):
        if text.startswith(name):
            return kind
    return str


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = [field.name for field in dataclasses.fields(TrainConfig)]
    from_file = load_yaml(args.config) if args.config else {}
    overrides = parse_overrides(args.overrides)
    refuse_renamed(from_file)
    refuse_renamed(overrides)
    flags = {name: getattr(args, name) for name in names}
    given = {
        key: value for source in (from_file, flags, overrides) for key, value in source.items() if value is not None
    }
    recipe = given.get("recipe")
    if recipe is None:
        return build_config(TrainConfig, from_file, flags, overrides)
    if not isinstance(given.get("task"), str):
        raise ConfigError("--recipe needs --task: the papers' values depend on the task")
    # defaults < recipe < config file < flags < overrides: the recipe only fills what none of them sets
    return build_config(TrainConfig, recipe_options(recipe, get_task(given["task"]).name), from_file, flags, overrides)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = train(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        fisher=EmpiricalFisherMask(chunk_size=args.fisher_chunk),
    )
    if launched_rank() != 0:  # under torchrun the run is reported once, by rank 0
        return 0
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "dev": result.dev_metrics}, sort_keys=True))
    else:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.dev_metrics.items())
        print(f"run {result.run_dir}: {result.steps} steps; dev {metrics}")
    return 0
