"""The tiny test model: a small vocabulary that still tokenizes any ASCII text, and far fewer coordinates."""

from landscape.models.tiny import build_tiny_model_folder, small_vocabulary


def test_small_vocabulary_tokenizes_any_text_without_unknown_tokens(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = build_tiny_model_folder(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    vocabulary = small_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) and 300 <= len(vocabulary) <= 600
    assert tokenizer.vocab_size == len(vocabulary) == model.config.vocab_size
    text = "The movie was really superb, 10/10 -- Zyzzyva's quixotic plot!"
    tokens = tokenizer.tokenize(text)
    assert "[UNK]" not in tokens and tokens[:4] == ["the", "movie", "was", "really"]
    # Words outside the vocabulary fall back to characters: zyzzyva -> z ##y ##z ##z ##y ##v ##a
    assert tokens[tokens.index("z") : tokens.index("z") + 7] == ["z", "##y", "##z", "##z", "##y", "##v", "##a"]
    embeddings = model.embeddings.word_embeddings.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert embeddings == len(vocabulary) * 32 and total < 60_000  # MiniLM's vocabulary gave 977 k of 1.01 M


def test_the_minilm_vocabulary_is_kept_for_the_pinned_run(tmp_path):
    from transformers import AutoTokenizer

    folder = build_tiny_model_folder(tmp_path / "tiny", vocabulary="minilm")
    assert AutoTokenizer.from_pretrained(folder).vocab_size == 30522
