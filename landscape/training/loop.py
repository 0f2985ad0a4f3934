"""The fine-tuning loop: resumable, deterministic, and agnostic of the optimizer family.

Each step the loop hands the optimizer a closure that re-evaluates the per-example losses of the current batch
(``optimizers.closure`` defines the contract), so sharpness-aware optimizers plug in without touching the loop.

Determinism and resumption: the data order of epoch ``e`` is a permutation drawn from ``numpy`` seeded with
``(seed, e)``, so step ``s`` always sees the same batch; dropout draws from torch's global RNG, whose state is saved
in every checkpoint together with the model, optimizer and scheduler. A resumed run therefore produces bitwise the
same weights as an uninterrupted one, and ``metrics.jsonl`` is cut back to the checkpoint's step before appending.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from landscape.core.atomic import write_json
from landscape.core.config import config_dict
from landscape.core.errors import ConfigError, LandscapeError
from landscape.core.locks import LOCK_FILE, locked_output
from landscape.core.provenance import environment_versions, git_revision
from landscape.core.rundir import (
    DIVERGED,
    FINAL_WEIGHTS,
    INIT_WEIGHTS,
    METRICS_FILE,
    RUN_FILE,
    RUN_FILES,
    MetricsLog,
    has_run,
    is_complete,
    read_run_info,
)
from landscape.data.encoding import EncodedSplit, collate, default_cache_dir, encode_split
from landscape.data.losses import per_example_loss
from landscape.data.tasks import TaskSpec, get_task, load_split, resolve_data_dir, subsample_indices
from landscape.models.devices import autocast_dtype, resolve_device
from landscape.models.evaluation import evaluate
from landscape.models.loading import load_model, load_tokenizer
from landscape.models.planning import median_seconds
from landscape.models.weights import load_weights_into, save_weights
from landscape.training.checkpoints import list_checkpoints, load_training_state, save_training_state
from landscape.training.config import TrainConfig, comparable
from landscape.training.distributed import check_world, data_parallel, on_rank_zero, process_seed, share_of
from landscape.training.init_from import freeze_all_but_head, load_encoder_from
from optimizers import BatchClosure, NonFiniteLossError, SharpnessAware, make_base_optimizer, make_sharpness_optimizer
from optimizers.loss_scale import DynamicLossScale
from optimizers.replicas import SINGLE, Replicas


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    dev_metrics: dict[str, float]
    steps: int
    resumed_from: int | None


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a permutation determined by ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the examples of global step ``step`` (0-based); the last batch of an epoch may be short."""
    steps_per_epoch = math.ceil(num_examples / batch_size)
    epoch, position = divmod(step, steps_per_epoch)
    order = epoch_order(num_examples, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


def subset(split: EncodedSplit, indices: np.ndarray) -> EncodedSplit:
    """The examples ``indices`` of ``split``, in that order."""
    ids = [int(i) for i in indices]
    return EncodedSplit(
        input_ids=[split.input_ids[i] for i in ids],
        token_type_ids=None if split.token_type_ids is None else [split.token_type_ids[i] for i in ids],
        labels=split.labels[ids],
    )


@dataclass
class PreparedData:
    task: TaskSpec
    train: EncodedSplit
    dev: EncodedSplit
    pad_token_id: int
    num_train_available: int


def prepare_data(config: TrainConfig) -> PreparedData:
    """Load, subsample and tokenize the task's train and dev splits (before anything is written)."""
    task = get_task(config.task)
    data_dir = resolve_data_dir(config.data_dir)
    train_examples = load_split(task, "train", data_dir)
    dev_examples = load_split(task, "dev", data_dir)
    tokenizer = load_tokenizer(config.model)
    cache_dir = default_cache_dir()
    train = encode_split(
        train_examples, tokenizer, max_length=config.max_length, cache_dir=cache_dir, cache_tag=f"{task.name}/train"
    )
    dev = encode_split(
        dev_examples, tokenizer, max_length=config.max_length, cache_dir=cache_dir, cache_tag=f"{task.name}/dev"
    )
    if config.train_fraction < 1:
        train = subset(train, subsample_indices(len(train), config.train_fraction, config.seed))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PreparedData(task, train, dev, pad_id, len(train_examples))


def set_train_mode(model: torch.nn.Module, config: TrainConfig) -> None:
    """Training mode; a frozen encoder stays in eval mode (no dropout), so the probe sees fixed features."""
    model.train()
    if config.freeze_encoder:
        model.base_model.eval()


def prepare_run_dir(run_dir: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> bool:
    """Check what ``run_dir`` holds before anything is written; return True when there is a run to resume.

    An existing run is never replaced without ``overwrite``; with ``overwrite`` only the files a run writes are
    deleted. A folder holding other files is refused.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if not run_dir.exists() or (run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}):
        if resume:
            raise ConfigError(f"--resume: {run_dir} does not exist; there is no run to resume")
        return False
    if not run_dir.is_dir():
        raise ConfigError(f"output {run_dir} exists and is not a directory")
    if not has_run(run_dir):
        foreign = [p.name for p in run_dir.iterdir() if p.name not in (*RUN_FILES, LOCK_FILE)]
        if foreign:
            raise ConfigError(
                f"output directory {run_dir} is not empty and holds no run (e.g. {foreign[0]}); choose another --out"
            )
        if resume:
            raise ConfigError(f"--resume: {run_dir} holds no run.json; there is no run to resume")
        return False
    if overwrite:
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return False
    if not resume:
        raise ConfigError(
            f"output directory {run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    previous = read_run_info(run_dir)
    if previous.get("status") == DIVERGED:
        where = previous.get("diverged", {})
        raise ConfigError(
            f"--resume: the run at {run_dir} diverged at step {where.get('step', '?')} "
            f"({where.get('reason', 'non-finite values')}); with the same options it would again: "
            "start a new --out with other options (a lower lr), or --overwrite"
        )
    old, new = comparable(previous["config"]), comparable(config_dict(config))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        key = diff[0]
        raise ConfigError(
            f"--resume: option {key} was {old.get(key)!r} in the run at {run_dir}, now {new.get(key)!r}; "
            "resume with the same options or start a new --out"
        )
    return True


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_step: int | None = None,
    fisher: FisherMaskProvider | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.task`` and write the run directory ``config.out``.

    ``fisher`` builds FSAM's mask (needed when ``config.uses_fisher_mask``): ``analyses.fisher.EmpiricalFisherMask()``.

    ``stop_after_step`` interrupts the run (as a kill would) after that many steps; tests use it for resumption.
    The run directory is locked for the whole call: a second process training into it is refused.
    """
    config = config.resolved()
    check_mask_provider(config, fisher)
    with data_parallel(config.device) as (replicas, device):
        check_world(config.batch_size, config.grad_accum, replicas)
        with locked_output(config.out) if replicas.rank == 0 else nullcontext():
            return _train(
                config,
                resume=resume,
                overwrite=overwrite,
                progress=progress and replicas.rank == 0,
                stop_after_step=stop_after_step,
                fisher=fisher,
                replicas=replicas,
                device=device,
            )


def _train(
    config: TrainConfig,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    stop_after_step: int | None,
    fisher: FisherMaskProvider | None,
    replicas: Replicas,
    device: torch.device,
) -> TrainResult:
    """:func:`train` once ``config`` is resolved and the run directory locked (by rank 0, the one that writes)."""
    started = time.time()
    run_dir = Path(config.out)
    writer = replicas.rank == 0
    data = prepare_data(config)
    resuming = on_rank_zero(
        replicas, lambda: prepare_run_dir(run_dir, config, resume=resume, overwrite=overwrite), str, "True".__eq__
    )

    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    if warmup_steps >= total_steps and total_steps > 1:
        raise ConfigError(f"warm-up ({warmup_steps} steps) must be shorter than training ({total_steps} steps)")

    autocast = autocast_dtype(config.precision)
    loaded = load_model(config.model, data.task, seed=config.seed, dropout=config.dropout)
    model = loaded.model
    # θ0 of a transfer run: the other run's encoder and this task's fresh head (a resumed run reloads its own θ0).
    init_record = load_encoder_from(model, config.init_from) if config.init_from and not resuming else None
    trainable = freeze_all_but_head(model) if config.freeze_encoder else None
    model.to(device)  # before the optimizer is built: its state lives where the parameters do
    optimizer = build_optimizer(config, model, replicas=replicas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / METRICS_FILE) if writer else None
    checkpoints_dir = run_dir / "checkpoints"
    start_step, resumed_from, train_seconds = 0, None, 0.0
    run_info: dict[str, Any] = {
        "config": config_dict(config),
        "versions": environment_versions(),
        "git_revision": git_revision(),
        "seed": config.seed,
        "task": data.task.name,
        "model_path": loaded.path,
        "num_train_examples": len(data.train),
        "num_train_available": data.num_train_available,
        "num_dev_examples": len(data.dev),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "status": "running",
        "command": sys.argv,
        "world_size": replicas.world_size,
    }
    if trainable is not None:
        run_info["trained_parameters"] = trainable
    if resuming:
        previous = read_run_info(run_dir)
        if is_complete(run_dir, previous):
            return TrainResult(run_dir, previous.get("dev_metrics", {}), previous["total_steps"], None)
        run_info["started"] = previous.get("started", started)
        if "init_from" in previous:
            run_info["init_from"] = previous["init_from"]
        found = list_checkpoints(checkpoints_dir)
        if found:
            meta = load_training_state(
                found[-1],
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                rank=replicas.rank,
                world_size=replicas.world_size,
            )
            start_step = resumed_from = meta["step"]
            train_seconds = meta.get("train_seconds", 0.0)
        else:  # killed before the first checkpoint: start over from θ0, which init.safetensors holds
            load_weights_into(model, run_dir / INIT_WEIGHTS)
        if writer:
            log.truncate_after(start_step)
    else:
        run_info["started"] = started
        if init_record is not None:
            run_info["init_from"] = init_record
        if writer:
            save_weights(run_dir / INIT_WEIGHTS, model, {"landscape": "init", "task": data.task.name})
            log.truncate_after(0)
    if writer:
        write_json(run_dir / RUN_FILE, run_info)

    # Dropout draws from the global RNG; seeding it here (a resumed run restores it instead) fixes every mask.
    if resumed_from is None:
        torch.manual_seed(process_seed(config.seed, replicas.rank))
    set_train_mode(model, config)

    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {data.task.name}", disable=not progress)
    dev_metrics: dict[str, float] = {}
    for step in range(start_step, total_steps):
        tick = time.perf_counter()
        if config.uses_fisher_mask and step % config.mask_interval == 0:
            if step == 0 and config.fisher_initial_mask == "random":
                record = install_random_mask(model, optimizer, config)
            else:
                record = refresh_fisher_mask(model, optimizer, data, config, step, fisher, replicas)
            if writer:
                log.append(record)
        indices = share_of(batch_indices(len(data.train), config.batch_size, config.seed, step), replicas)
        batch = collate(data.train, indices, data.pad_token_id)
        lr = optimizer.param_groups[0]["lr"]
        try:
            losses = optimizer.step(batch_closure(model, batch, autocast=autocast))
        except NonFiniteLossError as exc:
            bar.close()
            diverged(run_dir, run_info, step + 1, f"the loss is not finite ({exc})", config, checkpoints_dir, writer)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            bar.close()
            reason = "the weights are not finite after the update"
            diverged(run_dir, run_info, step + 1, reason, config, checkpoints_dir, writer)
        scheduler.step()
        train_seconds += time.perf_counter() - tick
        done = step + 1
        loss = mean_over_replicas(losses, replicas)
        record = {"kind": "train", "step": done, "epoch": step // steps_per_epoch, "loss": loss, "lr": lr}
        if isinstance(optimizer, SharpnessAware):
            record.update(rho=optimizer.last.rho, perturbation_norm=optimizer.last.perturbation_norm)
            record.update(optimizer.last.extra)  # e.g. δ-SAM's negative_weight_fraction
        if optimizer.loss_scale is not None:
            record.update(loss_scale=optimizer.loss_scale.scale, skipped=optimizer.skipped)
        if writer:
            log.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:
            dev_metrics = evaluate(
                model, data.dev, data.task, batch_size=config.eval_batch_size, pad_token_id=data.pad_token_id
            )
            if writer:
                log.append({"kind": "eval", "step": done, "split": "dev", **dev_metrics})
        if done % config.save_every == 0 and done < total_steps:
            # Every process's RNG state goes into the checkpoint (its dropout stream): all of them take part.
            rank_rng = gather_rng_states(replicas)
            if writer:
                save_training_state(
                    checkpoints_dir,
                    done,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"train_seconds": train_seconds},
                    keep=config.keep_checkpoints,
                    rank_rng=rank_rng,
                )
            replicas.barrier()  # a kill after this step finds the checkpoint complete for every process
        if stop_after_step is not None and done >= stop_after_step and done < total_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {done} of {total_steps}")
    bar.close()

    if writer:
        save_weights(run_dir / FINAL_WEIGHTS, model, {"landscape": "final", "task": data.task.name})
    tick = time.perf_counter()
    dev_metrics = evaluate(
        model, data.dev, data.task, batch_size=config.eval_batch_size, pad_token_id=data.pad_token_id
    )
    eval_seconds = time.perf_counter() - tick
    if writer:
        log.append({"kind": "eval", "step": total_steps, "split": "dev", **dev_metrics})
    if not all(math.isfinite(value) for value in dev_metrics.values()):
        if writer:
            (run_dir / FINAL_WEIGHTS).unlink(missing_ok=True)
        bad = ", ".join(f"{k} {v}" for k, v in dev_metrics.items() if not math.isfinite(v))
        reason = f"the dev metrics are not finite ({bad})"
        diverged(run_dir, run_info, total_steps, reason, config, checkpoints_dir, writer)
    run_info.update(
        status="completed",
        dev_metrics=dev_metrics,
        timings={
            "train_seconds": train_seconds,
            "seconds_per_epoch": train_seconds / (total_steps / steps_per_epoch),
            "final_eval_seconds": eval_seconds,
            "wall_seconds_this_session": time.time() - started,
        },
        resumed_from=resumed_from,
    )
    if writer:
        write_json(run_dir / RUN_FILE, run_info)
        # The resumable state only serves an unfinished run; a completed one keeps θ0, θ1 and its metrics.
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
    replicas.barrier()  # every process returns once the run directory is complete
    return TrainResult(run_dir, dev_metrics, total_steps, resumed_from)


def time_training_steps(config: TrainConfig, *, steps: int = 2, fisher: FisherMaskProvider | None = None) -> float:
    """Median seconds of one training step of ``config`` on this machine (its model, data, optimizer, batch size,
    device and precision), after one untimed step; nothing is written. FSAM's mask refreshes (every F_i steps) are
    not in it; with ``fisher`` the first one is made before timing, so the masked step is what is timed."""
    config = config.resolved()
    data = prepare_data(config)
    loaded = load_model(config.model, data.task, seed=config.seed, dropout=config.dropout)
    model = loaded.model.to(resolve_device(config.device))
    optimizer = build_optimizer(config, model)
    if config.uses_fisher_mask and fisher is not None:
        refresh_fisher_mask(model, optimizer, data, config, 0, fisher, SINGLE)
    set_train_mode(model, config)
    autocast = autocast_dtype(config.precision)
    counter = iter(range(steps + 1))

    def one_step() -> None:
        indices = batch_indices(len(data.train), config.batch_size, config.seed, next(counter))
        optimizer.step(batch_closure(model, collate(data.train, indices, data.pad_token_id), autocast=autocast))

    return median_seconds(one_step, steps)


def build_optimizer(
    config: TrainConfig, model: torch.nn.Module, *, replicas: Replicas | None = None
) -> torch.optim.Optimizer:
    """The base optimizer of ``config`` over ``model``, wrapped as its sharpness-aware variant (resolved config);
    with fp16 it carries the loss scale, with ``replicas`` it averages the gradients over them."""
    try:  # the optimizers raise ValueError as torch.optim does; here it is the user's configuration
        base = make_base_optimizer(
            config.optimizer,
            model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        return make_sharpness_optimizer(
            config.sam,
            base,
            named_parameters=model.named_parameters(),
            seed=config.seed,
            max_grad_norm=config.max_grad_norm,
            accumulation=config.grad_accum,
            replicas=replicas,
            loss_scale=DynamicLossScale() if config.precision == "fp16" else None,
            local_ascent=config.local_ascent,
            **config.sharpness_settings(),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def batch_closure(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, autocast: torch.dtype | None = None
) -> BatchClosure:
    """The closure the optimizer calls: per-example losses of ``batch`` or of its rows ``indices``.

    The batch moves to the model's device once; with ``autocast`` (bf16) the forward runs under ``torch.autocast``
    and the losses come back in float32 (cross-entropy autocasts to float32), so ε and the norms stay float32.
    """
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}

    def losses_of(indices: torch.Tensor | None) -> torch.Tensor:
        rows = batch if indices is None else {key: value[indices.to(device)] for key, value in batch.items()}
        if autocast is None:
            return per_example_loss(model, rows)
        with torch.autocast(device.type, dtype=autocast):
            return per_example_loss(model, rows).float()

    return BatchClosure(losses_of, int(batch["labels"].shape[0]))


def mean_over_replicas(losses: torch.Tensor, replicas: Replicas) -> float:
    """The mean of the per-example ``losses`` over every process's share (the global batch's mean loss)."""
    if replicas.world_size == 1:
        return float(losses.mean())
    count = torch.tensor(float(losses.numel()), dtype=torch.float64, device=losses.device)
    total = replicas.sum(torch.stack([losses.double().sum(), count]))
    return float(total[0] / total[1])


def gather_rng_states(replicas: Replicas) -> list[dict[str, torch.Tensor]] | None:
    """Every process's torch (and CUDA) RNG state, in rank order; None for one process (the usual state suffices)."""
    if replicas.world_size == 1:
        return None
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    gathered = {key: replicas.gather_tensors(value) for key, value in states.items()}
    return [{key: gathered[key][rank] for key in states} for rank in range(replicas.world_size)]


def install_random_mask(model: torch.nn.Module, optimizer: SharpnessAware, config: TrainConfig) -> dict[str, Any]:
    """FSAM Algorithm 1, line 1: a random mask of exactly round((1 − s)·|w|) of the trainable coordinates,
    used until the first Fisher refresh at step F_i. Drawn from a generator seeded by (seed, "initial mask"), the
    same on every process and after a resume (the mask itself is in the optimizer's checkpointed state)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for _, p in named)
    keep_count = round((1.0 - config.sparsity) * total)
    seed = int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0])
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:keep_count]  # cpu: seeded draw
    flat = torch.zeros(total, dtype=torch.bool)  # cpu: set_mask moves each part to its parameter's device
    flat[chosen] = True
    parts = torch.split(flat, [p.numel() for _, p in named])
    mask = {name: part.reshape(p.shape) for (name, p), part in zip(named, parts, strict=True)}
    optimizer.set_mask(mask, model.named_parameters())
    return {"kind": "mask", "step": 1, "initial": "random", "kept_fraction": keep_count / total, "coordinates": total}


def refresh_fisher_mask(
    model: torch.nn.Module,
    optimizer: SharpnessAware,
    data: PreparedData,
    config: TrainConfig,
    step: int,
    fisher: FisherMaskProvider,
    replicas: Replicas = SINGLE,
) -> dict[str, Any]:
    """FSAM Algorithm 1, lines 6–11: empirical Fisher on N_Fisher sampled training examples, top-(1−s) mask.

    The examples are drawn without replacement from a generator seeded by (seed, step), so a resumed run draws the
    same ones. The Fisher is computed without touching ``.grad``. Returns the record logged to ``metrics.jsonl``.
    With several processes each computes the Fisher of its share of the examples and the provider sums them
    (``replicas=``), so every process installs the same mask.
    """
    count = min(config.fisher_samples, len(data.train))
    chosen = np.random.default_rng([config.seed, step, 1]).choice(len(data.train), size=count, replace=False)
    if count < replicas.world_size:
        raise ConfigError(
            f"fisher_samples {count} is smaller than the {replicas.world_size} processes; expected at least one "
            "example per process"
        )
    chosen = share_of(chosen, replicas)
    batches = [
        collate(data.train, chosen[start : start + config.batch_size], data.pad_token_id)
        for start in range(0, len(chosen), config.batch_size)
    ]
    previous = optimizer.mask_by_name(model.named_parameters()) or None
    options = {"mode": config.fisher_mode, "sparsity": config.sparsity, "previous": previous}
    if replicas.world_size > 1:  # a provider for one process need not know the keyword
        options["replicas"] = replicas
    # The Fisher gets the memory the steps hold between steps: the optimizer's buffers, and the last step's gradient
    # (dead: every step begins by setting .grad to None; the refresh runs before the step that uses the mask).
    optimizer.release_buffers()
    optimizer.zero_grad(set_to_none=True)
    mask, statistics = fisher(model, batches, **options)
    optimizer.set_mask(mask, model.named_parameters())
    # Logged under the 1-based number of the step that first uses the mask, like the train records.
    return {"kind": "mask", "step": step + 1, "fisher_mode": config.fisher_mode, **statistics}


class FisherMaskProvider(Protocol):
    """What the trainer is handed to build FSAM's mask (``analyses.fisher.EmpiricalFisherMask`` is the one shipped).

    Training sits below the analyses, so it does not import the empirical Fisher: the caller (the CLI, the
    transfer analysis, a user's script) hands a provider in. ``modes`` are the ``fisher_mode`` names it accepts.
    """

    modes: tuple[str, ...]

    def __call__(
        self,
        model: torch.nn.Module,
        batches: list[dict[str, torch.Tensor]],
        *,
        mode: str,
        sparsity: float,
        previous: dict[str, torch.Tensor] | None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The bool mask keyed by parameter name (True = perturbed) and its statistics for ``metrics.jsonl``."""
        ...


def check_mask_provider(config: TrainConfig, fisher: FisherMaskProvider | None) -> None:
    """Refuse, before anything is written, a Fisher-masked run without a provider or with a mode it lacks."""
    if not config.uses_fisher_mask:
        return
    if fisher is None:
        raise ConfigError(
            "FSAM / --fisher-mask needs a Fisher mask provider: pass fisher=analyses.fisher.EmpiricalFisherMask()"
        )
    if config.fisher_mode not in fisher.modes:
        raise ConfigError(f"fisher_mode {config.fisher_mode!r} is unknown; expected one of {', '.join(fisher.modes)}")


class TrainingDiverged(LandscapeError):
    """The loss, the weights or the dev metrics became NaN or infinite: the run stopped, marked ``diverged``."""


def diverged(
    run_dir: Path,
    run_info: dict[str, Any],
    step: int,
    reason: str,
    config: TrainConfig,
    checkpoints_dir: Path,
    writer: bool = True,
) -> NoReturn:
    """Mark the run ``diverged`` in run.json (no final weights, checkpoints kept); raise :class:`TrainingDiverged`.

    Every process raises (they all see the same non-finite values); the ``writer`` (rank 0) writes run.json.
    """
    found = list_checkpoints(checkpoints_dir)
    kept = f"the last finite checkpoint is {found[-1]}" if found else "no checkpoint was written before it"
    run_info.update(status=DIVERGED, diverged={"step": step, "reason": reason})
    if writer:
        write_json(run_dir / RUN_FILE, run_info)
    raise TrainingDiverged(
        f"training diverged at step {step}: {reason}; lower the learning rate (lr {config.lr:g}) or check "
        f"weight_decay / max_grad_norm; {kept}"
    )


class TrainingInterrupted(LandscapeError):
    """Raised by ``stop_after_step``: the run stopped early and can be resumed."""
