"""Shared fixtures: a tiny BERT built from a config (never downloaded) and small task files in GLUE layout."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "warm", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "sad", "cold", "grim", "dark"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "story", "and", "film", "plot"]


@pytest.fixture
def one_thread():
    """One torch thread for the test: small products do not wait on busy cores, and reductions run in one order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenisation caches go to a per-session temporary folder, never the user's home."""
    monkeypatch.setenv("LANDSCAPE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))
    monkeypatch.delenv("LANDSCAPE_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT (2 layers, hidden 32) with a vocabulary of a few hundred words."""
    from landscape.models.tiny import build_tiny_model_folder

    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_minilm_vocab_model_dir(tmp_path_factory) -> Path:
    """The same tiny BERT with MiniLM's 30 522-word vocabulary: the one the CLI's pinned losses were recorded with."""
    from landscape.models.tiny import build_tiny_model_folder

    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-bert-minilm-vocab"), vocabulary="minilm")


def sentiment_rows(count: int, seed: int) -> list[tuple[str, int]]:
    """Synthetic SST-2-like sentences whose label is carried by one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_sst2(root: Path, train: int = 48, dev: int = 16) -> Path:
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train.tsv", train, 1), ("dev.tsv", dev, 2)):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in sentiment_rows(count, seed)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "glue").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def _train_tiny_run(root: Path, model_dir: Path, data_dir: Path, **options) -> Path:
    from landscape.training.config import TrainConfig
    from landscape.training.loop import train

    config = TrainConfig(
        task="sst2", model=str(model_dir), data_dir=str(data_dir), out=str(root), lr=1e-3, batch_size=8,
        max_steps=12, save_every=100, seed=5, dropout=0.1, **options,
    )  # fmt: skip
    train(config, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """A finished AdamW run of the tiny BERT on the synthetic SST-2 (dropout 0.1 in its config)."""
    return _train_tiny_run(tmp_path_factory.mktemp("runs") / "adamw", tiny_model_dir, tiny_data_dir)


@pytest.fixture(scope="session")
def tiny_sam_run(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """The same as :func:`tiny_run` with SAM (ρ = 0.05): a second solution of the same task and architecture."""
    return _train_tiny_run(tmp_path_factory.mktemp("runs") / "sam", tiny_model_dir, tiny_data_dir, sam="sam")
