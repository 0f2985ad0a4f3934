"""Model weights on disk: safetensors only, written atomically, never unpickled.

``init.safetensors``, ``final.safetensors`` and ``checkpoints/step-N/model.safetensors`` hold the model's
``named_parameters()`` (tied weights once), keyed by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from landscape.core.atomic import write_with
from landscape.core.errors import CheckpointError
from landscape.core.params import model_parameters
from landscape.models.loading import check_compatible

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the model's parameters to ``path`` (safetensors) atomically."""
    # to("cpu", copy=True): a snapshot, on the CPU whatever the device (the files are the same)
    tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model_parameters(model).items()}
    write_safetensors(path, tensors, {"format": "pt", **(metadata or {})})


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """``safetensors.torch.save_file`` made atomic and deterministic: equal tensors and metadata give equal bytes.

    The library writes the metadata in its hash map's order, which changes from one process to the next; the
    header is rewritten in place with the metadata keys sorted (the same bytes, reordered: no offset moves;
    docs/pitfalls.md §33).
    """

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_metadata_in_place(tmp)

    write_with(path, write)


def sort_metadata_in_place(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted; the tensors' entries keep their order."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw, object_pairs_hook=dict)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        stripped = raw.rstrip(b" ")
        if len(text) != len(stripped) or sorted(text) != sorted(stripped):
            return  # not the compact layout this rewrite assumes: leave the file as the library wrote it
        handle.seek(8)
        handle.write(text.ljust(length, b" "))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a missing file) is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; expected a .safetensors file or a run directory")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # A safetensors file is an 8-byte little-endian header length then "{"; the length's first byte may be 0x80,
    # so the pickle markers (zip "PK", protocol byte 0x80) only count when the JSON header is absent.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    pickle_marker = head[:2] == b"PK" or head[:1] == b"\x80"
    if path.suffix.lower() in PICKLE_SUFFIXES or (pickle_marker and not looks_safetensors):
        raise CheckpointError(
            f"checkpoint {path} is a pickle file; only safetensors are loaded (pickles can run arbitrary code)"
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"checkpoint {path} is not a safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Copy the weights stored at ``path`` into ``model`` after checking names and shapes match."""
    found = read_safetensors(path)
    params = model_parameters(model)
    check_compatible(params, found, str(path))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(found[name])
