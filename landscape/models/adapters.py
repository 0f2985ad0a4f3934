"""PEFT adapter folders (LoRA and the other ``peft`` methods) as analysis inputs, in one of two parameter spaces.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained``
writes it) holds only the adapter and the trained head (``modules_to_save``); its base model is the one
``base_model_name_or_path`` names (an alias such as ``minilm``, a local folder or a hub name). Two subspaces:

- ``full``: the adapter merged into the base weights (``merge_and_unload``): a plain model whose every weight is
  perturbed, as for any fine-tuned checkpoint;
- ``adapter``: the unmerged model, whose only parameters are the adapter's (``lora_A``, ``lora_B``, the trained
  head...); the base weights become buffers, so every analysis (directions, Hessian, Fisher, sharpness) ranges over
  the adapter space alone. Flat in one is not flat in the other: the adapter space is a low-dimensional slice
  through the full one, scaled by LoRA's α/r.

``adapter_model.bin`` (a pickle) is refused without being opened, as every other pickle.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from landscape.core.errors import CheckpointError, ConfigError
from landscape.data.tasks import TaskSpec
from landscape.models.loading import LoadedModel, load_model, resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SUBSPACES = ("full", "adapter")


def is_adapter(path: str | Path) -> bool:
    """``path`` is a PEFT adapter folder."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_subspace(subspace: str) -> str:
    if subspace not in SUBSPACES:
        raise ConfigError(f"--subspace {subspace!r} is unknown; expected one of {', '.join(SUBSPACES)}")
    return subspace


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder names, checked to be loadable here (one line when it is not)."""
    folder = Path(path)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not readable JSON: {str(exc).splitlines()[0]}") from exc
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; expected a PEFT adapter")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = (
            " (adapter_model.bin is a pickle and is never opened)" if (folder / "adapter_model.bin").exists() else ""
        )
        raise CheckpointError(
            f"adapter folder {folder} has no {ADAPTER_WEIGHTS}{pickled}; expected safetensors weights"
        )
    try:
        resolve_model_path(str(base))
    except ConfigError as exc:
        raise ConfigError(f"the base model {base!r} of adapter {folder} is not available here: {exc}") from exc
    return str(base)


def load_adapter_model(
    path: str | Path, task: TaskSpec, *, subspace: str, attn_implementation: str | None = None
) -> LoadedModel:
    """The base model with the adapter of ``path`` applied, in ``subspace`` (see the module docstring)."""
    check_subspace(subspace)
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"{path} is a PEFT adapter folder: reading it needs peft (pip install peft)") from None
    base_name = adapter_base(path)
    base = load_model(base_name, task, seed=0, attn_implementation=attn_implementation)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; the answer is right
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base.model, str(path), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes of another base or another label count
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"adapter {path} does not fit its base model {base_name} with a {task.num_labels}-label head: {first}"
        ) from exc
    if subspace == "full":
        return LoadedModel(model=model.merge_and_unload(), tokenizer=base.tokenizer, path=str(path))
    keep_only_adapter_parameters(model)
    return LoadedModel(model=model, tokenizer=base.tokenizer, path=str(path))


def keep_only_adapter_parameters(model: nn.Module) -> list[str]:
    """Turn every parameter that does not train with the adapter into a buffer of the same name and value;
    return the names of the parameters left (the adapter space)."""
    kept = []
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if param.requires_grad:
                kept.append(f"{module_name}.{name}" if module_name else name)
                continue
            del module._parameters[name]
            module.register_buffer(name, param.detach(), persistent=False)
    if not kept:
        raise ConfigError("the adapter has no trainable parameters; expected LoRA (or other PEFT) weights")
    return kept
