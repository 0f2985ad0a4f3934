"""Tokenisation of task examples with an on-disk cache, and dynamic-padding collation.

A split is tokenised once per (examples, tokenizer, max_length) and cached as a safetensors file of flat
int32 token arrays plus int64 offsets (no pickle), so a rerun loads it without calling the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from landscape.core.atomic import write_with
from landscape.core.errors import ConfigError, DataError
from landscape.data.tasks import Example

CACHE_DIR_ENV = "LANDSCAPE_CACHE_DIR"
MIN_MAX_LENGTH = 8
MAX_MAX_LENGTH = 100_000
TOKENIZE_BATCH = 1000
# Bump when the cache layout or the tokenisation call changes, so stale files are never read.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids of one split, one unpadded 1-D int64 tensor per example."""

    input_ids: list[torch.Tensor]
    token_type_ids: list[torch.Tensor] | None  # None when the tokenizer has no token types
    labels: torch.Tensor  # [N] int64 class indices, or float32 scores for regression

    def __len__(self) -> int:
        return len(self.input_ids)


def default_cache_dir() -> Path:
    """``$LANDSCAPE_CACHE_DIR``, else ``~/.cache/landscape``."""
    env = os.environ.get(CACHE_DIR_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "landscape"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of everything that determines the token ids the tokenizer produces."""
    state: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "model_input_names": list(getattr(tokenizer, "model_input_names", [])),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and backend is not None:
        backend_state = json.loads(backend.to_str())
        # Each call rewrites the backend's truncation/padding settings (we pass ours explicitly), so they
        # would make the fingerprint change between calls without changing any id.
        backend_state.pop("truncation", None)
        backend_state.pop("padding", None)
        state["backend"] = backend_state
    else:
        state["vocab"] = sorted(tokenizer.get_vocab().items())
        state["special_tokens"] = list(getattr(tokenizer, "all_special_tokens", []))
        state["do_lower_case"] = getattr(tokenizer, "do_lower_case", None)
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def encode_split(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int,
    cache_dir: Path | None,
    cache_tag: str,
) -> EncodedSplit:
    """Tokenise ``examples`` (pairs truncated "longest_first" to ``max_length``, no padding), with caching.

    ``cache_dir`` None disables the cache. ``cache_tag`` (e.g. "mrpc/train") only separates cache entries;
    the entry also depends on the examples' texts and labels, the tokenizer and ``max_length``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ConfigError(f"max_length must be an integer, got {max_length!r}")
    if not MIN_MAX_LENGTH <= max_length <= MAX_MAX_LENGTH:
        raise ConfigError(f"max_length must be in [{MIN_MAX_LENGTH}, {MAX_MAX_LENGTH}], got {max_length}")
    if not examples:
        raise DataError(f"no examples to encode for {cache_tag!r}; expected at least one")
    labels = _labels_tensor(examples)

    path = None
    if cache_dir is not None:
        key = {
            "format": _CACHE_FORMAT,
            "tag": cache_tag,
            "examples": _examples_hash(examples),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        path = Path(cache_dir) / f"{digest}.safetensors"
        arrays = _load_cache(path, len(examples))
        if arrays is not None:
            return _to_split(arrays, labels)

    arrays = _tokenize(examples, tokenizer, max_length)
    if path is not None:
        write_with(path, lambda tmp: save_file(arrays, str(tmp), metadata={"cache_tag": cache_tag}))
    return _to_split(arrays, labels)


def collate(split: EncodedSplit, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch the examples at ``indices``, right-padded to the longest of them.

    Returns ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64 (0 exactly at padding),
    ``token_type_ids`` [B, T] int64 (padding 0) when the split has them, and ``labels`` [B].
    """
    if len(indices) == 0:
        raise ConfigError("cannot collate an empty batch; expected at least one index")
    rows = [split.input_ids[i] for i in indices]
    lengths = torch.tensor([len(row) for row in rows])
    width = int(lengths.max())
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = row
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).to(torch.int64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if split.token_type_ids is not None:
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.int64)
        for b, i in enumerate(indices):
            types = split.token_type_ids[i]
            token_type_ids[b, : len(types)] = types
        batch["token_type_ids"] = token_type_ids
    batch["labels"] = split.labels[torch.as_tensor(list(indices), dtype=torch.int64)]
    return batch


# ----------------------------------------------------------------------------------------------------------


def _labels_tensor(examples: Sequence[Example]) -> torch.Tensor:
    values = [ex.label for ex in examples]
    if any(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    return torch.tensor(values, dtype=torch.int64)


def _examples_hash(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        # Length-prefixed fields so that ("ab", "c") and ("a", "bc") hash differently.
        for part in (ex.text_a, "\x00none" if ex.text_b is None else ex.text_b, repr(ex.label)):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def _tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    pairs = {ex.text_b is not None for ex in examples}
    if len(pairs) > 1:
        raise DataError("examples mix single sentences and sentence pairs; expected one kind per split")
    is_pair = pairs == {True}
    want_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    ids: list[list[int]] = []
    types: list[list[int]] = []
    for start in range(0, len(examples), TOKENIZE_BATCH):
        batch = examples[start : start + TOKENIZE_BATCH]
        encoded = tokenizer(
            [ex.text_a for ex in batch],
            [ex.text_b for ex in batch] if is_pair else None,
            truncation="longest_first",
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=want_types,
        )
        ids.extend(encoded["input_ids"])
        if want_types:
            types.extend(encoded["token_type_ids"])
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {"input_ids": _flat_int32(ids, int(offsets[-1])), "offsets": offsets}
    if want_types:
        arrays["token_type_ids"] = _flat_int32(types, int(offsets[-1]))
    return arrays


def _flat_int32(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter((t for row in rows for t in row), dtype=np.int32, count=total)


def _load_cache(path: Path, count: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unusable (a damaged cache is rebuilt, not fatal)."""
    if not path.is_file():
        return None
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    offsets, ids = arrays.get("offsets"), arrays.get("input_ids")
    if offsets is None or ids is None or offsets.dtype != np.int64 or ids.dtype != np.int32:
        return None
    if len(offsets) != count + 1 or offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0):
        return None
    types = arrays.get("token_type_ids")
    if types is not None and (types.dtype != np.int32 or len(types) != len(ids)):
        return None
    return arrays


def _to_split(arrays: dict[str, np.ndarray], labels: torch.Tensor) -> EncodedSplit:
    sizes = np.diff(arrays["offsets"]).tolist()

    def rows(name: str) -> list[torch.Tensor]:
        # One int64 buffer split into per-example views: cheap, and each view is a 1-D int64 tensor.
        return list(torch.split(torch.from_numpy(arrays[name].astype(np.int64)), sizes))

    types = rows("token_type_ids") if "token_type_ids" in arrays else None
    return EncodedSplit(input_ids=rows("input_ids"), token_type_ids=types, labels=labels)
