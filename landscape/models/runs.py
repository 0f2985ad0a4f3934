"""What every analysis of a trained run shares: open the run, load its weights, pick a fixed evaluation subset.

An analysis command (``surface``, ``interpolate``, ``hessian``, ``fisher``, ``sharpness``) takes a run directory
(written by ``landscape train``), takes the task, model, data directory and ``max_length`` from its ``run.json``
(``--task`` / ``--data-dir`` override them), and evaluates on a fixed, seeded subset of one split that is tokenized
and batched once (:class:`EvalSubset`). Batches are padded to their own longest example; the subset's mean loss
weights every example equally whatever the batch sizes (docs/pitfalls.md §10).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.params import model_parameters
from landscape.core.rundir import RUN_FILE, find_run_dir, read_run_info
from landscape.data.encoding import EncodedSplit, collate, default_cache_dir, encode_split
from landscape.data.metrics import compute_metrics
from landscape.data.tasks import TaskSpec, get_task, load_split, resolve_data_dir, seeded_indices
from landscape.models.adapters import adapter_base, check_subspace, is_adapter, load_adapter_model
from landscape.models.devices import resolve_device
from landscape.models.evaluation import outputs_over
from landscape.models.loading import (
    LoadedModel,
    check_compatible,
    hub_name_usable,
    load_model,
    quiet_transformers,
    resolve_model_path,
)
from landscape.models.weights import PICKLE_SUFFIXES, load_weights_into, read_safetensors

SPLITS = ("train", "dev")
WEIGHTS = ("final", "init")


@dataclass(frozen=True)
class Run:
    """What an analysis is run on: a run directory (``source="run"``, what its ``run.json`` says, with the command
    line's overrides applied), or a model checkpoint (``source="checkpoint"``): a Hugging Face folder written by
    ``save_pretrained``, a Trainer ``checkpoint-N/`` folder, or a hub name, whose own weights are θ1 and whose θ0
    (where asked for) is ``init_model``'s encoder with a fresh head seeded by 0, as a run started from it would have;
    or a PEFT adapter folder (``source="adapter"``); or one ``.safetensors`` file (``source="file"``: θ1 is the file,
    the rest is the run directory's it lies in, else ``--task`` and ``--model``'s). ``path`` reopens it.
    """

    path: Path
    config: Mapping[str, Any] = field(hash=False)  # run.json's "config" ({} for a checkpoint)
    task: TaskSpec
    model: str  # alias, folder or hub name of the architecture and tokenizer
    data_dir: Path | None  # None: the hub
    max_length: int
    source: str = "run"  # "run", "checkpoint", "adapter" (a PEFT adapter folder) or "file" (one .safetensors file)
    init_model: str | None = None  # a checkpoint's θ0: the pretrained model it was fine-tuned from (--init)
    subspace: str = "full"  # an adapter's parameter space: "full" (merged) or "adapter" (its weights alone)
    run_dir: Path | None = None  # source "file" (path is the file, θ1): the run directory it lies in, if any

    @property
    def label(self) -> str:
        """A short name for legends: the optimizer and SAM variant (e.g. ``adamw+fsam``), else the folder name."""
        optimizer, sam = self.config.get("optimizer"), self.config.get("sam", "none")
        if optimizer is None:
            return self.path.name
        return optimizer if sam in (None, "none") else f"{optimizer}+{sam}"

    def weights_file(self, which: str = "final") -> Path:
        """``final.safetensors`` (θ1) or ``init.safetensors`` (θ0, the weights before step 1, head included)."""
        if which not in WEIGHTS:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
        if self.source == "adapter":
            raise CheckpointError(f"{self.path} is a PEFT adapter folder: it has no {which}.safetensors file")
        if self.source == "file" and which == "final":
            return self.path
        if self.source == "file" and self.run_dir is None:
            raise CheckpointError(f"{self.path} lies in no run directory: it has no {which}.safetensors beside it")
        if self.source == "checkpoint":
            single = self.path / "model.safetensors"
            if which == "final" and single.is_file():
                return single
            raise CheckpointError(
                f"{self.path} is a model checkpoint, not a run directory: it has no {which}.safetensors file"
                + (" (its weights are sharded)" if which == "final" else "; give θ0 with --init MODEL")
            )
        path = (self.run_dir if self.source == "file" else self.path) / f"{which}.safetensors"
        if not path.is_file():
            hint = " (the run has not finished: resume it with landscape train --resume)" if which == "final" else ""
            raise CheckpointError(f"{self.path} has no {which}.safetensors{hint}")
        return path

    def describe(self) -> dict[str, Any]:
        """JSON-able identification of the run for a result's ``meta``."""
        described = {
            "path": str(self.path),
            "label": self.label,
            "task": self.task.name,
            "model": self.model,
            "optimizer": self.config.get("optimizer"),
            "sam": self.config.get("sam", "none"),
            "seed": self.config.get("seed"),
        }
        if self.source == "adapter":
            described.update(source="adapter", subspace=self.subspace)
        return described


def open_run(
    path: str | Path,
    *,
    task: str | None = None,
    data_dir: str | Path | None = None,
    model: str | None = None,
    init: str | None = None,
    subspace: str = "full",
) -> Run:
    """Read ``path/run.json``; ``task``, ``data_dir`` and ``model`` override the run's own values.

    ``path`` may also be a model checkpoint (see :class:`Run`): then ``task`` is required and ``init`` names the
    pretrained model θ0 comes from; or a PEFT adapter folder, analysed in ``subspace`` (``full``: merged into its
    base; ``adapter``: its own weights alone); or one ``.safetensors`` file (:func:`open_weights_file`).
    """
    check_subspace(subspace)
    if Path(path).is_file():
        return open_weights_file(path, task=task, data_dir=data_dir, model=model)
    if is_adapter(path):
        return open_adapter(path, task=task, data_dir=data_dir, subspace=subspace)
    if subspace != "full":
        raise ConfigError(
            f"--subspace {subspace} is for PEFT adapter folders; {path} is not one (no adapter_config.json)"
        )
    if is_checkpoint(path):
        return open_checkpoint(path, task=task, data_dir=data_dir, init=init)
    if looks_like_hub_name(path):  # offline, and the hub cache does not hold it: say both readings
        raise CheckpointError(
            f"{path} is no run directory here, and as a hub name it is not in the local hub cache, which is all "
            "HF_HUB_OFFLINE=1 allows"
        )
    path = Path(path)
    config = read_run_info(path)["config"]
    task_name = task or config.get("task")
    model_name = model or config.get("model")
    if not task_name or not model_name:
        raise CheckpointError(f"{path / RUN_FILE} names no task or model; pass --task and --model")
    chosen_dir = data_dir if data_dir is not None else config.get("data_dir")
    return Run(
        path=path,
        config=config,
        task=get_task(task_name),
        model=model_name,
        data_dir=resolve_data_dir(chosen_dir),
        max_length=int(config.get("max_length", 128)),
    )


# A source that records no run.json (a checkpoint, an adapter, a lone weights file) is tokenized at this length.
UNRECORDED_MAX_LENGTH = 128


def unrecorded_run(path: str | Path, *, task: TaskSpec, model: str, data_dir: str | Path | None, **source: Any) -> Run:
    """A :class:`Run` of a model source without a run.json: no config, the command line's task and data directory."""
    return Run(path=Path(path), config={}, task=task, model=model, data_dir=resolve_data_dir(data_dir),
               max_length=UNRECORDED_MAX_LENGTH, **source)  # fmt: skip


def open_weights_file(path: str | Path, *, task: str | None, data_dir: str | Path | None, model: str | None) -> Run:
    """A :class:`Run` whose θ1 is one ``.safetensors`` file: inside a run directory (an intermediate
    ``checkpoints/step-N/model.safetensors``, ``init.safetensors``) it is that run's with the file as its weights;
    alone, ``task`` and ``model`` (the architecture) are required. Pickles are refused unopened."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        read_safetensors(path)  # raises: the one refusal of a pickle, before anything is read from it
    run_dir = find_run_dir(path.parent)
    if run_dir is not None:
        run = open_run(run_dir, task=task, data_dir=data_dir, model=model)
        return replace(run, path=path, source="file", run_dir=run_dir)
    if not task or not model:
        missing = " and ".join(flag for flag, value in (("--task", task), ("--model", model)) if not value)
        raise ConfigError(f"{path} belongs to no run (no run.json above it); pass {missing} for its task and model")
    return unrecorded_run(path, task=get_task(task), model=model, data_dir=data_dir, source="file")


def is_checkpoint(path: str | Path) -> bool:
    """``path`` is a model checkpoint rather than a run: a folder with a config.json and no run.json, or a hub name
    (``owner/name``, not an existing path) when the hub may be used."""
    folder = Path(path)
    if folder.is_dir():
        return (folder / "config.json").is_file() and not (folder / RUN_FILE).is_file()
    return looks_like_hub_name(path) and hub_name_usable(str(path))


def looks_like_hub_name(path: str | Path) -> bool:
    """``owner/name`` that is not an existing path."""
    text = str(path)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(path).exists()


def open_checkpoint(path: str | Path, *, task: str | None, data_dir: str | Path | None, init: str | None = None) -> Run:
    """A :class:`Run` for a model checkpoint; its label count and order are checked against ``task``."""
    if not task:
        if not Path(path).exists():  # a mistyped run path reads like a hub name: say both
            raise ConfigError(
                f"{path} does not exist here; as a hub model name it needs --task, as a run directory it needs to exist"
            )
        raise ConfigError(f"{path} is a model checkpoint, not a run directory: pass --task (its data is not recorded)")
    spec = get_task(task)
    model = str(path)
    resolve_model_path(model)  # a folder without safetensors weights (a pickle) is refused here, unopened
    check_labels(model, spec)
    if init is not None:
        resolve_model_path(init)
    return unrecorded_run(path, task=spec, model=model, data_dir=data_dir, source="checkpoint", init_model=init)


def open_adapter(path: str | Path, *, task: str | None, data_dir: str | Path | None, subspace: str) -> Run:
    """A :class:`Run` for a PEFT adapter folder; its base model must be loadable here."""
    if not task:
        raise ConfigError(
            f"{path} is a PEFT adapter folder, not a run directory: pass --task (its data is not recorded)"
        )
    return unrecorded_run(path, task=get_task(task), model=adapter_base(path), data_dir=data_dir, source="adapter",
                          subspace=subspace)  # fmt: skip


def check_labels(model: str, task: TaskSpec) -> None:
    """The checkpoint's classification head must be the task's: as many labels, in the task's order when named."""
    quiet_transformers()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the config of checkpoint {model}: {str(exc).splitlines()[0]}") from exc
    if config.num_labels != task.num_labels:
        raise ConfigError(
            f"checkpoint {model} has a head of {config.num_labels} labels, task {task.name} has {task.num_labels}; "
            "expected a checkpoint fine-tuned on this task"
        )
    names = [str(config.id2label[i]).lower() for i in sorted(config.id2label)]
    generic = all(name == f"label_{i}" for i, name in enumerate(names))
    if task.label_names and not generic and names != [n.lower() for n in task.label_names]:
        raise ConfigError(
            f"checkpoint {model} orders its labels {names}, task {task.name} expects {list(task.label_names)}; "
            "expected the same label order"
        )


def load_run_model(
    run: Run, weights: str = "final", *, attn_implementation: str | None = None, device: str | None = None
) -> LoadedModel:
    """The run's architecture with ``weights`` loaded, in eval mode, gradients off.

    ``attn_implementation="eager"`` for anything that needs double backward (Hessian-vector products): PyTorch's
    fused attention kernels have no second derivative (docs/pitfalls.md §15). Dropout is as in the run's config but is
    never active, because every analysis evaluates in eval mode.
    """
    if run.source == "adapter":
        if weights != "final":
            raise ConfigError(f"{run.path} is a PEFT adapter folder: only its own (final) weights can be analysed")
        loaded = load_adapter_model(run.path, run.task, subspace=run.subspace, attn_implementation=attn_implementation)
    elif run.source == "checkpoint":
        loaded = load_checkpoint_model(run, weights, attn_implementation=attn_implementation)
    else:
        loaded = load_model(
            run.model,
            run.task,
            seed=int(run.config.get("seed", 0)),
            attn_implementation=attn_implementation,
            dropout=run.config.get("dropout"),
        )
        load_weights_into(loaded.model, run.weights_file(weights))
    loaded.model.eval()
    if device is not None:  # --device: the analyses compute there; their results are stored from the CPU
        loaded.model.to(resolve_device(device))
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    return loaded


def load_checkpoint_model(run: Run, weights: str, *, attn_implementation: str | None = None) -> LoadedModel:
    """A checkpoint's model: its own weights (``final``, head included, else refused) or θ0 from ``--init``."""
    if weights == "final":
        loaded = load_model(run.model, run.task, seed=0, attn_implementation=attn_implementation, require_head=True)
        return loaded
    if run.init_model is None:
        raise ConfigError(
            f"{run.path} is a model checkpoint: θ0 needs --init MODEL (the pretrained model it started from)"
        )
    init = load_model(run.init_model, run.task, seed=0, attn_implementation=attn_implementation)
    final = load_model(run.model, run.task, seed=0, attn_implementation=attn_implementation, require_head=True)
    expected = {name: p.detach() for name, p in model_parameters(final.model).items()}
    check_compatible(expected, dict(model_parameters(init.model)), f"--init {run.init_model}")
    return LoadedModel(model=init.model, tokenizer=final.tokenizer, path=init.path)


def read_run_weights(run: Run, model: nn.Module, weights: str = "final") -> dict[str, torch.Tensor]:
    """The run's ``weights`` as a params dict keyed like ``model``'s parameters (checked to match)."""
    expected = {name: p.detach() for name, p in model_parameters(model).items()}
    if run.source not in ("run", "file"):
        found = {name: p.detach().clone() for name, p in model_parameters(load_run_model(run, weights).model).items()}
        check_compatible(expected, found, f"the {weights} weights of {run.path}")
        return {name: found[name].to(expected[name].dtype) for name in expected}
    tensors = read_safetensors(run.weights_file(weights))
    check_compatible(expected, tensors, str(run.weights_file(weights)))
    return {name: tensors[name].to(expected[name].dtype) for name in expected}


@dataclass(frozen=True)
class EvalSubset:
    """A fixed, seeded subset of one split, tokenized once and cut into padded batches.

    ``indices`` [N] are positions in the split, sorted; ``batches`` cover them in order, each a dict of
    ``input_ids``/``attention_mask``/(``token_type_ids``) [B, T] and ``labels`` [B].
    """

    task: TaskSpec
    split: str
    seed: int
    split_size: int
    indices: np.ndarray
    batches: tuple[dict[str, torch.Tensor], ...]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return torch.cat([batch["labels"] for batch in self.batches]).numpy()

    def describe(self) -> dict[str, Any]:
        """JSON-able data selection for a result's ``meta``: enough to select the same examples again."""
        digest = hashlib.sha256(np.asarray(self.indices, dtype=np.int64).tobytes()).hexdigest()
        return {
            "task": self.task.name,
            "split": self.split,
            "samples": len(self.indices),
            "split_size": self.split_size,
            "seed": self.seed,
            "indices_sha256": digest,
        }


def check_selection(*, split: str, samples: int | None, batch_size: int) -> None:
    """The one check of a data selection: a known split, ``samples`` a positive int or None, a positive batch size."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0):
        raise ConfigError(f"samples must be a positive integer (or None for the whole split), got {samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


def choose_indices(split_size: int, samples: int | None, seed: int) -> np.ndarray:
    """``samples`` distinct positions of ``range(split_size)``, drawn with ``seed``, sorted.

    ``samples`` None, or at or above the split's size, means the whole split.
    """
    check_selection(split=SPLITS[0], samples=samples, batch_size=1)
    return seeded_indices(split_size, split_size if samples is None else samples, seed)


def select_subset(
    run: Run,
    tokenizer: Any,
    *,
    split: str = "dev",
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> EvalSubset:
    """Tokenize the run's ``split`` once (cached) and batch a seeded subset of ``samples`` examples."""
    check_selection(split=split, samples=samples, batch_size=batch_size)
    examples = load_split(run.task, split, run.data_dir)
    encoded = encode_split(
        examples,
        tokenizer,
        max_length=run.max_length,
        cache_dir=default_cache_dir(),
        cache_tag=f"{run.task.name}/{split}",
    )
    indices = choose_indices(len(encoded), samples, seed)
    return subset_of(
        encoded, run.task, split, indices, seed=seed, pad_token_id=tokenizer.pad_token_id or 0, batch_size=batch_size
    )


def subset_of(
    encoded: EncodedSplit,
    task: TaskSpec,
    split: str,
    indices: np.ndarray,
    *,
    seed: int,
    pad_token_id: int,
    batch_size: int = 32,
) -> EvalSubset:
    """An :class:`EvalSubset` of ``encoded`` at ``indices`` (sorted), cut into batches of ``batch_size``."""
    indices = np.asarray(indices, dtype=np.int64)
    batches = tuple(
        collate(encoded, indices[start : start + batch_size].tolist(), pad_token_id)
        for start in range(0, len(indices), batch_size)
    )
    return EvalSubset(task=task, split=split, seed=seed, split_size=len(encoded), indices=indices, batches=batches)


@dataclass(frozen=True)
class Evaluation:
    """Mean loss over the subset (every example weighted equally), the task's primary metric and its name."""

    loss: float
    metric: float
    metric_name: str
    per_example_loss: np.ndarray  # [N] float64


def evaluate_subset(model: nn.Module, subset: EvalSubset) -> Evaluation:
    """Loss and primary metric of ``model`` on ``subset``, in eval mode under ``torch.inference_mode``.

    The model's train/eval flags are restored afterwards (docs/pitfalls.md §4, 5); its weights are not touched.
    """
    logits, losses = outputs_over(model, subset.batches)
    per_example = losses.numpy()
    predicted = logits[:, 0].numpy() if subset.task.is_regression else logits.argmax(dim=1).numpy()
    metrics = compute_metrics(subset.task, predicted, subset.labels)
    name = subset.task.primary_metric
    # Mean in float64 over the concatenated per-example losses: batch sizes cannot weight examples unequally.
    return Evaluation(
        loss=float(per_example.mean()), metric=float(metrics[name]), metric_name=name, per_example_loss=per_example
    )
