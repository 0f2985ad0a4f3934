"""Start a run from another run's encoder (``--init-from``) and train the head alone (``--freeze-encoder``).

Used by the cross-task transfer analysis (``analyses.transfer``): θ0 is the source run's encoder with this task's
fresh, seeded head; a linear probe then freezes the encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.params import content_hash, key_shape_differences, model_parameters
from landscape.core.rundir import FINAL_WEIGHTS, has_run
from landscape.models.weights import read_safetensors


def head_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the task head's parameters: those outside the pretrained base model (``model.base_model_prefix``).

    For BERT these are ``classifier.weight`` and ``classifier.bias``; the pooler belongs to the encoder.
    """
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        raise ConfigError(f"cannot tell the head from the encoder of {type(model).__name__} (no base model prefix)")
    return [name for name in model_parameters(model) if not name.startswith(prefix + ".")]


def init_weights_file(source: str | Path) -> Path:
    """The ``.safetensors`` file that ``--init-from`` designates: the file itself, or a run's final weights."""
    path = Path(source)
    if path.is_dir():
        final = path / FINAL_WEIGHTS
        if not final.is_file():
            hint = " (the run has not finished)" if has_run(path) else ""
            raise CheckpointError(f"--init-from {path} holds no final.safetensors{hint}; expected a finished run")
        return final
    if not path.exists():
        raise CheckpointError(f"--init-from {path} does not exist; expected a .safetensors file or a run directory")
    return path


def load_encoder_from(model: torch.nn.Module, source: str | Path) -> dict[str, Any]:
    """Copy the encoder weights of ``source`` into ``model``; the head keeps its fresh, seeded values.

    Every encoder parameter must be in ``source`` with the same shape, and ``source`` may hold no other encoder
    tensor (else :class:`CheckpointError`: another architecture). Tensors of ``source`` outside the encoder (the
    source task's head, whatever its shape) are not used. Returns the record that ``run.json`` keeps.
    """
    path = init_weights_file(source)
    found = read_safetensors(path)
    params = model_parameters(model)
    head = set(head_parameter_names(model))
    prefix = model.base_model_prefix + "."
    encoder = {name: param for name, param in params.items() if name not in head}
    # The source's own head (any shape) is not used: compare the encoder tensors only.
    problems = key_shape_differences(encoder, {name: t for name, t in found.items() if name.startswith(prefix)})
    if problems:
        raise CheckpointError(
            f"--init-from {path}: its encoder does not fit the model ({', '.join(problems)}); "
            "expected weights of the same architecture"
        )
    with torch.no_grad():
        for name, param in encoder.items():
            param.copy_(found[name])
    return {
        "file": str(path),
        "source_sha256": content_hash(found),
        "loaded": sorted(encoder),
        "kept_fresh": sorted(head),
        "not_used": {name: list(found[name].shape) for name in sorted(set(found) - set(encoder))},
    }


def freeze_all_but_head(model: torch.nn.Module) -> list[str]:
    """Turn off ``requires_grad`` outside the head (linear probe); return the names still trained."""
    head = set(head_parameter_names(model))
    for name, param in model_parameters(model).items():
        param.requires_grad_(name in head)
    return sorted(head)
