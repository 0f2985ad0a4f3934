"""Tiny models built from a config, for tests and smoke runs: nothing is downloaded.

``build_tiny_model_folder`` writes a 2-layer encoder (width 32; BERT or six other families) and its tokenizer to a
folder that loads like any pretrained checkpoint (no classification head: loading it for a task initialises one).
Its default vocabulary is small (:func:`small_vocabulary`: a few hundred common English words plus every letter and
digit, alone and as a ``##`` continuation, so any text still tokenizes): the embeddings then hold about 14 k of its
parameters instead of the ~1 M that MiniLM's 30 522-row vocabulary gives, so Fisher and Hessian tests work on the
coordinates that matter. ``vocabulary="minilm"`` keeps MiniLM's tokenizer (the CLI's pinned smoke run used it).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from landscape.models.loading import load_tokenizer, quiet_transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Common English words and those of the tests' synthetic tasks; the order fixes the token ids.
_WORDS = """
the of and a to in is was it for on that with as at by this be from or an are not but have had his her they
you he she we i my me our your their them there what which who when where why how all any some no yes one two
three four five six seven eight nine ten more most many much very so too also just only than then now here
out up down over under into about after before again against between through during while because if would
could should can will may might must do does did done make made take took get got go went come came see saw
know knew think thought say said tell told give gave find found feel felt seem look looked want use used work
day time year way man men woman women child children people world life hand part place case week company
system program question number night point home water room mother father area money story fact month lot right
study book eye job word business issue side kind head house service friend power hour game line end member law
car city community name president team minute idea kid body information back parent face others level office
door health person art war history party result change morning reason research girl guy moment air teacher
force education good great fine lovely superb happy warm bright bad awful poor dull sad cold grim dark movie
really quite film plot new old big small long short high low early late young same different real best better
worst worse little own other last first next few every each both such well even still never always often
cat dog sun tree river stone bird cloud house road lamp field red blue green black white sentence entailment
"""
COMMON_WORDS = tuple(_WORDS.split())


def small_vocabulary() -> list[str]:
    """The tiny tokenizer's vocabulary, ids in list order: special tokens, words, characters, ``##`` characters."""
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = [*SPECIAL_TOKENS, *COMMON_WORDS, *characters, *(f"##{c}" for c in characters)]
    return list(dict.fromkeys(tokens))  # first occurrence wins: "a" and "i" are both words and characters


#: the families built by :func:`build_tiny_model_folder` (``AutoModelForSequenceClassification`` model types)
ARCHITECTURES = ("bert", "roberta", "distilbert", "electra", "albert", "gpt2", "deberta-v2")


def tiny_config(architecture: str, vocab_size: int, pad_token_id: int):
    """A 2-layer, width-32 config of ``architecture`` (one of :data:`ARCHITECTURES`), random and tiny."""
    from transformers import AutoConfig

    common = {"vocab_size": vocab_size, "pad_token_id": pad_token_id}
    sizes = {
        "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "roberta": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                    "type_vocab_size": 1},
        "electra": {"hidden_size": 32, "embedding_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64},
        "albert": {"hidden_size": 32, "embedding_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "intermediate_size": 64},
        "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512},
        "deberta-v2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "type_vocab_size": 0, "relative_attention": True, "position_buckets": 16,
                       "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1},
    }  # fmt: skip
    if architecture not in sizes:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    return AutoConfig.for_model(architecture, **common, **sizes[architecture])


def build_tiny_model_folder(folder: str | Path, *, vocabulary: str = "small", architecture: str = "bert") -> Path:
    """Write a tiny random encoder (2 layers, width 32, seed 0) of ``architecture`` and its tokenizer to ``folder``.

    ``vocabulary``: ``"small"`` (:func:`small_vocabulary`, lower-cased WordPiece) or ``"minilm"`` (MiniLM's). Every
    family gets the same WordPiece tokenizer: the tests exercise the models, and a BERT-style tokenizer's
    ``token_type_ids`` are exactly what families without segments must ignore.
    """
    quiet_transformers()
    from transformers import AutoModel, BertTokenizer

    if vocabulary == "small":
        tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(small_vocabulary())}, do_lower_case=True)
    elif vocabulary == "minilm":
        tokenizer = load_tokenizer("minilm")
    else:
        raise ValueError(f"vocabulary must be 'small' or 'minilm', got {vocabulary!r}")
    folder = Path(folder)
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config(architecture, tokenizer.vocab_size, tokenizer.pad_token_id)).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return folder
