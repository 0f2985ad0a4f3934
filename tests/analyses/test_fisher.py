"""Empirical Fisher (FSAM Eq. 9) and Fisher mask (Eqs. 10–11) on a tiny BERT, against hand-written references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyses.fisher import (
    FisherResult,
    empirical_fisher,
    empirical_fisher_loop,
    fisher_mask,
    layer_of,
    mask_iou,
    mask_statistics,
)
from landscape.core.errors import ConfigError
from landscape.data.encoding import EncodedSplit, collate
from landscape.data.losses import model_inputs, per_example_loss
from landscape.data.tasks import get_task
from landscape.models.loading import load_model
from landscape.models.state import eval_mode

# SDPA has no vmap batching rule on CPU; torch warns once and falls back to a loop for the attention kernel.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

BATCH_SIZES = (6, 4)  # uneven on purpose


def make_batches(num_labels: int, *, regression: bool = False, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two collated batches (6 + 4 examples) of random sentences of 5–12 tokens, so rows carry padding."""
    generator = torch.Generator().manual_seed(seed)
    count = sum(BATCH_SIZES)
    lengths = torch.randint(5, 13, (count,), generator=generator).tolist()
    ids = [
        # [CLS] word ids [SEP] of the tiny vocabulary (ids 2 and 3; words from 5 on)
        torch.cat([torch.tensor([2]), torch.randint(5, 400, (n - 2,), generator=generator), torch.tensor([3])])
        for n in lengths
    ]
    types = [
        torch.cat([torch.zeros(n // 2, dtype=torch.int64), torch.ones(n - n // 2, dtype=torch.int64)]) for n in lengths
    ]
    if regression:
        labels = torch.rand(count, generator=generator) * 5
    else:
        labels = torch.randint(0, num_labels, (count,), generator=generator)
    split = EncodedSplit(input_ids=ids, token_type_ids=types, labels=labels)
    first = list(range(BATCH_SIZES[0]))
    return [collate(split, first, 0), collate(split, list(range(BATCH_SIZES[0], count)), 0)]


def load(tiny_model_dir, task: str = "sst2", attn: str | None = None) -> torch.nn.Module:
    return load_model(str(tiny_model_dir), get_task(task), seed=0, attn_implementation=attn).model


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def hand_per_example(model, batches, nll) -> dict[str, torch.Tensor]:
    """(1/N) Σ_i (∇ nll_i)², one example at a time, with plain autograd, dropout off."""
    params = trainable(model)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    with eval_mode(model):
        for batch in batches:
            for i in range(batch["labels"].shape[0]):
                single = {key: value[i : i + 1] for key, value in batch.items()}
                grads = torch.autograd.grad(nll(model, single)[0], list(params.values()))
                for name, g in zip(params, grads, strict=True):
                    sums[name] += g**2
                count += 1
    return {name: total / count for name, total in sums.items()}


def assert_same_diagonal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5):
    assert actual.keys() == expected.keys()
    # The attention key biases have an exactly zero gradient (softmax ignores a shift shared by all keys), so their
    # entries are rounding noise; an absolute floor far below every other entry covers them.
    scale = max(float(v.abs().max()) for v in expected.values())
    for name in expected:
        # Results are float32 whatever the model's dtype.
        assert actual[name].dtype == torch.float32 and actual[name].shape == expected[name].shape, name
        torch.testing.assert_close(
            actual[name].double(), expected[name].double(), rtol=rtol, atol=1e-12 * scale, msg=name
        )


# ------------------------------------------------------------------------------------------------------------------
# Per-example Fisher


@pytest.mark.parametrize("attn", [None, "eager"], ids=["sdpa", "eager"])
def test_per_example_vmap_equals_loop_and_hand_reference(tiny_model_dir, attn):
    model = load(tiny_model_dir, attn=attn).double()
    model.train()  # the Fisher must switch dropout off by itself
    batches = make_batches(2)
    loop = empirical_fisher_loop(model, batches)
    hand = hand_per_example(model, batches, per_example_loss)
    assert loop.num_examples == 10 and loop.mode == "per-example"
    assert_same_diagonal(loop.diagonal, hand)
    for chunk_size in (4, 16):  # 4 splits the first batch into 4 + 2
        vectorised = empirical_fisher(model, batches, chunk_size=chunk_size)
        assert isinstance(vectorised, FisherResult)
        assert vectorised.num_examples == 10 and vectorised.mode == "per-example"
        assert_same_diagonal(vectorised.diagonal, hand)
    assert model.training


def test_per_example_float32_model_close_to_float64(tiny_model_dir):
    model = load(tiny_model_dir)
    batches = make_batches(2)
    single = empirical_fisher(model, batches, chunk_size=8).diagonal
    double = hand_per_example(model.double(), batches, per_example_loss)
    assert_same_diagonal(single, double, rtol=1e-4)


def test_auto_chunk_size_fits_the_largest_dense_block_in_its_share_of_free_memory():
    from analyses.per_example import AUTO_CHUNK_MEMORY_SHARE, MAX_AUTO_CHUNK, auto_chunk_size

    model = torch.nn.Sequential(torch.nn.Embedding(1000, 30), torch.nn.Linear(30, 40), torch.nn.Linear(40, 2))
    params = dict(model.named_parameters())
    block = 40 * 30 * 4  # bytes of one example's [out, in] float32 gradient of the largest Linear (not the table)
    for wanted in (1, 5, MAX_AUTO_CHUNK):
        assert auto_chunk_size(model, params, int(wanted * block / AUTO_CHUNK_MEMORY_SHARE)) == wanted
    assert auto_chunk_size(model, params, int(5.9 * block / AUTO_CHUNK_MEMORY_SHARE)) == 5  # rounded down
    assert auto_chunk_size(model, params, 10) == 1  # never zero
    assert auto_chunk_size(model, params, 10**15) == MAX_AUTO_CHUNK
    assert auto_chunk_size(model, params, None) == MAX_AUTO_CHUNK  # unknown free memory
    only_table = {"0.weight": params["0.weight"]}
    assert auto_chunk_size(model, only_table, 10) == MAX_AUTO_CHUNK  # nothing is held densely per example

    class Scaled(torch.nn.Module):  # a module of no known kind: its parameters take the general (vmap) path
        def __init__(self):
            super().__init__()
            self.gain, self.table = torch.nn.Parameter(torch.ones(50, 40)), torch.nn.Parameter(torch.ones(30, 30))

    odd = torch.nn.Sequential(torch.nn.Linear(30, 40), Scaled())
    general = (50 * 40 + 30 * 30) * 4  # held together per example, more than the Linear's 40 × 30 block
    odd_params = dict(odd.named_parameters())
    assert auto_chunk_size(odd, odd_params, int(7 * general / AUTO_CHUNK_MEMORY_SHARE)) == 7


def test_an_unset_chunk_comes_from_free_memory_and_a_resumed_fisher_keeps_its_chunk(tiny_model_dir, monkeypatch):
    import analyses.fisher as fisher_module
    from analyses.per_example import AUTO_CHUNK_MEMORY_SHARE

    model = load(tiny_model_dir)
    batches = make_batches(2)
    largest = max(p.numel() * 4 for name, p in model.named_parameters() if "embeddings" not in name)
    monkeypatch.setattr(fisher_module, "free_memory", lambda device: int(3 * largest / AUTO_CHUNK_MEMORY_SHARE))
    automatic = empirical_fisher(model, batches)
    assert automatic.chunk_size == 3
    assert_same_diagonal(automatic.diagonal, empirical_fisher(model, batches, chunk_size=16).diagonal, rtol=1e-5)

    states = []
    empirical_fisher(model, batches, keep=lambda state: states.append(state()))
    assert int(states[-1]["chunk_size"]) == 3
    monkeypatch.setattr(fisher_module, "free_memory", lambda device: None)  # the resumed process would pick 32
    resumed = empirical_fisher(model, batches, state=states[-1])
    assert resumed.chunk_size == 3
    for name, value in automatic.diagonal.items():
        assert torch.equal(resumed.diagonal[name], value), name  # bitwise: the same order of additions


def test_params_filter_selects_a_subset(tiny_model_dir):
    model = load(tiny_model_dir)
    batches = make_batches(2)
    full = empirical_fisher(model, batches).diagonal
    head = empirical_fisher(model, batches, params=lambda name: name.startswith("classifier.")).diagonal
    assert set(head) == {"classifier.weight", "classifier.bias"}
    for name in head:
        torch.testing.assert_close(head[name], full[name], rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="no parameters"):
        empirical_fisher(model, batches, params=lambda name: False)


def test_regression_uses_unit_gaussian_likelihood(tiny_model_dir):
    model = load(tiny_model_dir, task="stsb").double()
    batches = make_batches(1, regression=True)

    def gaussian_nll(model, batch):
        prediction = model(**model_inputs(batch)).logits.squeeze(-1)
        return 0.5 * (prediction - batch["labels"].double()) ** 2

    hand = hand_per_example(model, batches, gaussian_nll)
    assert_same_diagonal(empirical_fisher(model, batches, chunk_size=4).diagonal, hand)
    assert_same_diagonal(empirical_fisher_loop(model, batches).diagonal, hand)
    # per_example_loss is the squared error without the 0.5 (its Fisher would be 4 times larger).
    with torch.no_grad():
        torch.testing.assert_close(per_example_loss(model, batches[0]), 2 * gaussian_nll(model, batches[0]))


# ------------------------------------------------------------------------------------------------------------------
# Batch-mean Fisher (the authors' code)


def test_batch_mean_equals_hand_formula_and_differs_from_per_example(tiny_model_dir):
    model = load(tiny_model_dir).double()
    batches = make_batches(2)
    params = trainable(model)
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    with eval_mode(model):
        for batch in batches:
            grads = torch.autograd.grad(per_example_loss(model, batch).mean(), list(params.values()))
            for name, g in zip(params, grads, strict=True):
                expected[name] += g**2 / len(batches)
    result = empirical_fisher(model, batches, mode="batch-mean")
    assert result.mode == "batch-mean" and result.num_examples == 10
    assert_same_diagonal(result.diagonal, expected)

    per_example = empirical_fisher(model, batches).diagonal
    total_batch = sum(float(v.sum()) for v in result.diagonal.values())
    total_example = sum(float(v.sum()) for v in per_example.values())
    # Averaging gradients before squaring cancels most of them: far less mass, and another ranking.
    assert total_batch < 0.5 * total_example
    # Rows of unused tokens and positions in the embeddings are zero in both and dominate; compare the rest.
    dense = [name for name in per_example if "_embeddings." not in name]
    batch_mask = fisher_mask({name: result.diagonal[name] for name in dense}, 0.9)
    example_mask = fisher_mask({name: per_example[name] for name in dense}, 0.9)
    assert mask_iou(batch_mask, example_mask) < 0.99  # 0.956 here: similar, yet other coordinates


def test_bad_arguments(tiny_model_dir):
    model = load(tiny_model_dir)
    batches = make_batches(2)
    with pytest.raises(ConfigError, match="mode"):
        empirical_fisher(model, batches, mode="batch")
    for chunk_size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="chunk_size"):
            empirical_fisher(model, batches, chunk_size=chunk_size)
    for mode in ("per-example", "batch-mean"):
        with pytest.raises(ConfigError, match="no "):
            empirical_fisher(model, [], mode=mode)
    with pytest.raises(ConfigError, match="no examples"):
        empirical_fisher_loop(model, [])


# ------------------------------------------------------------------------------------------------------------------
# The model is left exactly as it was


def snapshot(model):
    return {
        "params": {name: (p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
        "grads": {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()},
        "training": [(m, m.training) for m in model.modules()],
    }


def assert_unchanged(model, before):
    after = dict(model.named_parameters())
    assert after.keys() == before["params"].keys()
    for name, (param, values, requires_grad) in before["params"].items():
        assert after[name] is param, name
        assert param.requires_grad == requires_grad, name
        assert param.detach().numpy().tobytes() == values.numpy().tobytes(), name
    for name, (grad, values) in before["grads"].items():
        assert after[name].grad is grad, name
        if grad is not None:
            assert grad.numpy().tobytes() == values.numpy().tobytes(), name
    for module, training in before["training"]:
        assert module.training == training


def prepared_model(tiny_model_dir):
    """Train mode with one submodule in eval, some .grad fields set, one parameter frozen."""
    model = load(tiny_model_dir)
    model.train()
    model.bert.encoder.layer[1].eval()
    model.bert.pooler.dense.bias.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "layer.0" in name or name.startswith("classifier."):
            p.grad = torch.randn(p.shape, generator=generator)
    return model


def test_model_state_restored(tiny_model_dir):
    model = prepared_model(tiny_model_dir)
    before = snapshot(model)
    batches = make_batches(2)
    for compute in (
        lambda: empirical_fisher(model, batches, chunk_size=4),
        lambda: empirical_fisher(model, batches, mode="batch-mean"),
        lambda: empirical_fisher_loop(model, batches),
    ):
        result = compute()
        assert "bert.pooler.dense.bias" not in result.diagonal  # frozen: not a candidate
        assert_unchanged(model, before)
    with torch.no_grad():  # as inside an optimizer's step()
        empirical_fisher_loop(model, batches)
    assert_unchanged(model, before)


@pytest.mark.parametrize("mode", ["per-example", "batch-mean", "loop"])
def test_model_state_restored_on_exception(tiny_model_dir, mode):
    model = prepared_model(tiny_model_dir)
    before = snapshot(model)
    first, second = make_batches(2)
    good = {key: value[:2] for key, value in first.items()}  # small: only there to fail after some work
    missing_labels = {key: value for key, value in second.items() if key != "labels"}
    out_of_vocab = {**second, "input_ids": second["input_ids"] + 10**6}

    def failing_iterable():
        yield good
        raise RuntimeError("data source failed")

    def compute(batches):
        if mode == "loop":
            return empirical_fisher_loop(model, batches)
        return empirical_fisher(model, batches, mode=mode, chunk_size=4)

    with pytest.raises(ConfigError, match="batch 1"):
        compute([good, missing_labels])
    assert_unchanged(model, before)
    with pytest.raises((IndexError, RuntimeError)):
        compute([good, out_of_vocab])
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="data source failed"):
        compute(failing_iterable())
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------------------------
# Fisher mask


def random_diagonal(seed: int, *, ties: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 4, 2), "c": (1,)}

    def draw(shape):
        if ties:  # few distinct values, so the k-th largest is shared by many coordinates
            return torch.randint(0, 4, shape, generator=generator).float()
        return torch.rand(shape, generator=generator)

    return {name: draw(shape) for name, shape in shapes.items()}


def numpy_reference_mask(diagonal: dict[str, torch.Tensor], sparsity: float) -> np.ndarray:
    flat = np.concatenate([value.numpy().ravel() for value in diagonal.values()])
    k = round((1 - sparsity) * flat.size)
    # A stable sort of the negated values: largest first, equal values in index order.
    order = np.argsort(-flat, kind="stable")[:k]
    expected = np.zeros(flat.size, dtype=bool)
    expected[order] = True
    return expected


@pytest.fixture(params=["direct", "bracketed"])
def selection(request, monkeypatch):
    """The k-th largest among all values at once, or (as above a million values) bracketed by a sample first: a
    sample of 8 here, so that brackets are often wrong and widened."""
    import analyses.fisher as fisher_module

    if request.param == "bracketed":
        monkeypatch.setattr(fisher_module, "DIRECT_SELECTION_MAX", 0)
        monkeypatch.setattr(fisher_module, "SELECTION_SAMPLE", 8)
    return request.param


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99, 0.999])
def test_fisher_mask_keeps_exactly_the_top_k(sparsity, ties, selection):
    for seed in range(3):
        diagonal = random_diagonal(seed, ties=ties)
        mask = fisher_mask(diagonal, sparsity)
        assert mask.keys() == diagonal.keys()
        for name in diagonal:
            assert mask[name].dtype == torch.bool and mask[name].shape == diagonal[name].shape
        total = sum(v.numel() for v in diagonal.values())
        flat = np.concatenate([value.numpy().ravel() for value in mask.values()])
        assert flat.sum() == round((1 - sparsity) * total)
        np.testing.assert_array_equal(flat, numpy_reference_mask(diagonal, sparsity))
        if 0 < flat.sum() < total:  # every kept value is at least every dropped one
            values = np.concatenate([value.numpy().ravel() for value in diagonal.values()])
            assert values[flat].min() >= values[~flat].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fisher_mask_of_signed_scores_and_other_dtypes(dtype, selection):
    """Negative values, −0 = +0 and every float dtype are ordered as the floats are: the same mask as a stable sort
    (numpy, float64) of the same values, ties by index."""
    generator = torch.Generator().manual_seed(4)
    values = (torch.randint(-6, 7, (300,), generator=generator) / 4).to(dtype)  # many ties, negatives, zeros
    values[::17] = -0.0
    diagonal = {"x": values[:120].reshape(10, 12), "y": values[120:]}
    reference = {name: value.double() for name, value in diagonal.items()}
    for sparsity in (0.1, 0.5, 0.77, 0.9):
        flat = np.concatenate([m.numpy().ravel() for m in fisher_mask(diagonal, sparsity).values()])
        np.testing.assert_array_equal(flat, numpy_reference_mask(reference, sparsity))


def test_kth_largest_is_exact_whatever_the_sample_and_gathers_little_more_than_the_side_it_needs(monkeypatch):
    import analyses.fisher as fisher_module
    from analyses.fisher import DIRECT_SELECTION_MAX, kth_largest

    generator = torch.Generator().manual_seed(5)
    values = [torch.rand(DIRECT_SELECTION_MAX, generator=generator).square(), torch.rand(700, 900, generator=generator)]
    flat = torch.cat([value.reshape(-1) for value in values])
    total = flat.numel()
    selected: list[int] = []
    real_kthvalue = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda t, k: selected.append(t.numel()) or real_kthvalue(t, k))
    for fraction in (0.1, 0.01, 0.9):  # the top k, or (k above half) the n - k + 1 smallest, are gathered
        k = round(fraction * total)
        selected.clear()
        assert float(kth_largest(values, k)) == float(real_kthvalue(flat, total - k + 1).values)
        # never a copy of all of them: the side needed, and 6 standard errors of the sample's quantile (≤ 1.2 % of n)
        assert len(selected) == 1 and selected[0] <= min(k, total - k + 1) + 0.012 * total
    # A sample that misleads (all of it the largest value, then the smallest) only costs widening: still exact.
    for misleading in (flat.max(), flat.min()):
        monkeypatch.setattr(fisher_module, "_sample_values", lambda v, n, m=misleading: m.repeat(64))
        for fraction in (0.1, 0.9):
            k = round(fraction * total)
            assert float(kth_largest(values, k)) == float(real_kthvalue(flat, total - k + 1).values)
    with pytest.raises(ConfigError, match="k must be between 1"):
        kth_largest(values, 0)


def test_fisher_mask_zero_sparsity_keeps_everything_and_bad_sparsity_fails():
    diagonal = random_diagonal(0, ties=True)
    assert all(bool(m.all()) for m in fisher_mask(diagonal, 0).values())
    for bad in (-0.1, 1.0, 1.5, math.nan, math.inf, True, "0.5", None):
        with pytest.raises(ConfigError, match="sparsity"):
            fisher_mask(diagonal, bad)
    with pytest.raises(ConfigError, match="non-finite"):
        fisher_mask({"w": torch.tensor([1.0, math.nan])}, 0.5)
    with pytest.raises(ConfigError, match="empty"):
        fisher_mask({}, 0.5)


def test_fisher_mask_of_a_real_fisher(tiny_model_dir):
    model = load(tiny_model_dir)
    diagonal = empirical_fisher(model, make_batches(2)).diagonal
    total = sum(v.numel() for v in diagonal.values())
    mask = fisher_mask(diagonal, 0.9)
    assert sum(int(m.sum()) for m in mask.values()) == round(0.1 * total)
    assert mask_statistics(mask)["kept_fraction"] == pytest.approx(0.1, abs=1 / total)


def test_mask_statistics_and_iou_by_hand():
    a = {"w": torch.tensor([[True, False], [True, True]]), "b": torch.tensor([False, False, True])}
    b = {"w": torch.tensor([[True, True], [False, True]]), "b": torch.tensor([False, True, False])}
    # a has 4 ones, b has 4; both: w[0,0], w[1,1] -> 2; either: w (4) + b (2) -> 6.
    stats = mask_statistics(a, previous=b)
    assert stats == {
        "kept": 4,
        "total": 7,
        "kept_fraction": 4 / 7,
        "per_parameter": {"w": 3 / 4, "b": 1 / 3},
        "per_layer": {"w": 3 / 4, "b": 1 / 3},  # single-word names are their own layer
        "intersection": 2,
        "union": 6,
        "iou": 2 / 6,
        "previous_kept_fraction": 2 / 4,
    }
    assert all(type(v) in (int, float) for v in stats.values() if not isinstance(v, dict))
    assert mask_iou(a, b) == pytest.approx(1 / 3) and mask_iou(b, a) == pytest.approx(1 / 3)
    assert mask_iou(a, a) == 1.0
    assert set(mask_statistics(a)) == {"kept", "total", "kept_fraction", "per_parameter", "per_layer"}
    empty = {name: torch.zeros_like(value) for name, value in a.items()}
    assert mask_iou(empty, empty) == 1.0
    with pytest.raises(ConfigError, match="different parameters"):
        mask_iou(a, {"w": b["w"]})
    with pytest.raises(ConfigError, match="shape"):
        mask_iou(a, {"w": b["w"], "b": torch.tensor([True])})
    with pytest.raises(ConfigError, match="bool"):
        mask_statistics({"w": torch.ones(2)})


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("bert.encoder.layer.3.attention.self.query.weight", "layer.3"),
        ("bert.embeddings.word_embeddings.weight", "embeddings"),
        ("bert.pooler.dense.bias", "pooler"),
        ("classifier.weight", "classifier"),
        ("roberta.encoder.layer.11.output.LayerNorm.bias", "layer.11"),
    ],
)
def test_layer_of_names_the_block(name, layer):
    assert layer_of(name) == layer


def test_per_layer_kept_fraction_counts_coordinates():
    mask = {
        "bert.encoder.layer.0.a.weight": torch.tensor([True, False, False, False]),
        "bert.encoder.layer.0.b.bias": torch.tensor([True, True]),
        "classifier.weight": torch.tensor([False, False]),
    }
    stats = mask_statistics(mask)
    assert stats["per_layer"] == {"layer.0": pytest.approx(3 / 6), "classifier": 0.0}
