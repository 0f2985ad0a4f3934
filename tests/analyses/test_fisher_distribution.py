"""Fisher distributions (per layer and module type, mask shares, IoU) against hand loops, and ``landscape fisher``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import exit_status

from analyses.fisher_distribution import (
    MODULE_TYPES,
    fisher_diagonal,
    fisher_distributions,
    mask_overlap,
    module_type,
)
from landscape.cli.main import main
from landscape.core.errors import ConfigError
from landscape.core.results import load_result
from landscape.data.losses import model_inputs
from landscape.models.runs import load_run_model, open_run, select_subset

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert.embeddings.word_embeddings.weight", "embeddings"),
        ("bert.embeddings.LayerNorm.weight", "layernorm"),
        ("bert.encoder.layer.0.attention.self.query.weight", "attention.query"),
        ("bert.encoder.layer.1.attention.self.key.bias", "attention.key"),
        ("bert.encoder.layer.0.attention.self.value.weight", "attention.value"),
        ("bert.encoder.layer.0.attention.output.dense.weight", "attention.output"),
        ("bert.encoder.layer.0.attention.output.LayerNorm.bias", "layernorm"),
        ("bert.encoder.layer.0.intermediate.dense.weight", "ffn"),
        ("bert.encoder.layer.0.output.dense.bias", "ffn"),
        ("bert.encoder.layer.0.output.LayerNorm.weight", "layernorm"),
        ("bert.pooler.dense.weight", "other"),
        ("classifier.weight", "classifier"),
        ("roberta.encoder.layer.3.attention.self.query.weight", "attention.query"),
        ("transformer.h.0.attn.c_attn.weight", "attention.qkv"),  # GPT-2 fuses Q, K and V
        ("distilbert.transformer.layer.0.attention.q_lin.weight", "attention.query"),
    ],
)
def test_module_types_from_bert_style_names(name, expected):
    assert module_type(name) == expected
    assert expected in MODULE_TYPES


def hand_layer(name: str) -> str:
    """The tiny BERT's layers, written out: encoder blocks by number, else the first module below ``bert``."""
    match = re.search(r"encoder\.layer\.(\d+)\.", name)
    if match:
        return f"layer.{match.group(1)}"
    return name.split(".")[1] if name.startswith("bert.") else name.split(".")[0]


def hand_fisher(model, batches) -> dict[str, np.ndarray]:
    """FSAM Eq. 9 one example at a time: the mean over examples of the squared gradient of −log p(y | x)."""
    parameters = dict(model.named_parameters())
    for p in parameters.values():
        p.requires_grad_(True)
    sums = {name: np.zeros(p.shape) for name, p in parameters.items()}
    count = 0
    model.eval()
    for batch in batches:
        for row in range(batch["labels"].shape[0]):
            single = {key: value[row : row + 1] for key, value in batch.items()}
            nll = F.cross_entropy(model(**model_inputs(single)).logits, single["labels"])
            for (name, _), g in zip(
                parameters.items(), torch.autograd.grad(nll, list(parameters.values())), strict=True
            ):
                sums[name] += g.double().numpy() ** 2
            count += 1
    for p in parameters.values():
        p.requires_grad_(False)
    return {name: total / count for name, total in sums.items()}


@pytest.fixture
def tiny_fisher(tiny_run):
    run = open_run(tiny_run)
    loaded = load_run_model(run)
    subset = select_subset(run, loaded.tokenizer, split="train", samples=6, seed=2, batch_size=4)
    return loaded.model, subset


def test_distributions_against_a_hand_loop_over_single_examples(tiny_fisher):
    model, subset = tiny_fisher
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    fisher = fisher_diagonal(model, subset.batches)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags  # frozen model left frozen
    reference = hand_fisher(model, subset.batches)
    sparsity = 0.9
    arrays = fisher_distributions(fisher.diagonal, sparsity=sparsity, bins=40)

    layers = list(dict.fromkeys(hand_layer(name) for name in reference))
    assert arrays["layer_names"].tolist() == layers
    by_layer = {
        layer: np.concatenate([v.ravel() for n, v in reference.items() if hand_layer(n) == layer]) for layer in layers
    }
    sizes = np.array([by_layer[layer].size for layer in layers])
    np.testing.assert_array_equal(arrays["layer_sizes"], sizes)
    # Every coordinate is in the histogram or among the exact zeros.
    np.testing.assert_array_equal(arrays["layer_hist"].sum(axis=1) + arrays["zero_count_layer"], sizes)
    np.testing.assert_array_equal(
        arrays["module_hist"].sum(axis=1) + arrays["zero_count_module"], arrays["module_sizes"]
    )
    assert arrays["module_sizes"].sum() == sizes.sum()
    np.testing.assert_array_equal(arrays["zero_count_layer"], [(by_layer[layer] == 0).sum() for layer in layers])
    edges = arrays["hist_edges"]
    # Values below 1e-8 of the largest are float32 rounding noise of cancelling gradient sums, different in the
    # vectorised and the looped computation: compare the bins above, and the quantiles from the 10 % level up.
    largest = max(v.max() for v in reference.values())
    resolved = edges[:-1] >= np.log10(largest) - 8
    levels = arrays["quantile_levels"] >= 0.1
    for i, layer in enumerate(layers):
        values = by_layer[layer]
        expected = np.histogram(np.log10(values[values > 0]), bins=edges)[0]
        assert np.abs(arrays["layer_hist"][i] - expected)[resolved].sum() <= max(2, 1e-3 * values.size)
        np.testing.assert_allclose(
            arrays["layer_quantiles"][i][levels], np.quantile(values, arrays["quantile_levels"][levels]), rtol=2e-3
        )
    # The mask: the top (1 − s) of all coordinates together; its share per layer sums to one.
    everything = np.concatenate([value.ravel() for value in reference.values()])
    owner = np.concatenate([np.full(value.size, layers.index(hand_layer(n))) for n, value in reference.items()])
    keep = round((1 - sparsity) * everything.size)
    kept = np.argsort(-everything, kind="stable")[:keep]  # ties (here: many exact zeros) go to the earlier coordinate
    hand_share = np.bincount(owner[kept], minlength=len(layers)) / keep
    np.testing.assert_allclose(arrays["layer_mask_share"], hand_share, atol=5e-3)
    assert arrays["layer_mask_share"].sum() == pytest.approx(1.0)
    assert (arrays["layer_kept_fraction"] * sizes).sum() == pytest.approx(keep)
    assert arrays["module_types"].tolist() == list(MODULE_TYPES)


def test_zero_counts_mask_share_and_iou_by_hand():
    diagonal = {
        "bert.encoder.layer.0.attention.self.query.weight": torch.tensor([[0.0, 3e-3], [3e-2, 0.0]]),
        "bert.encoder.layer.1.output.dense.weight": torch.tensor([5.0, 0.0, 2.0]),
        "classifier.bias": torch.tensor([4.0]),
    }
    arrays = fisher_distributions(diagonal, sparsity=0.5, bins=4)  # keeps round(0.5 · 8) = 4: 5, 4, 2, 3e-2
    assert arrays["layer_names"].tolist() == ["layer.0", "layer.1", "classifier"]
    np.testing.assert_array_equal(arrays["zero_count_layer"], [2, 1, 0])
    np.testing.assert_allclose(arrays["layer_mask_share"], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(arrays["layer_kept_fraction"], [0.25, 2 / 3, 1.0])
    np.testing.assert_allclose(arrays["hist_edges"], [-3, -2, -1, 0, 1])
    np.testing.assert_array_equal(arrays["layer_hist"], [[1, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 1]])
    module = dict(zip(arrays["module_types"].tolist(), arrays["module_sizes"].tolist(), strict=True))
    assert module["attention.query"] == 4 and module["ffn"] == 3 and module["classifier"] == 1 and module["other"] == 0
    other = {name: value.clone() for name, value in diagonal.items()}
    other["classifier.bias"] = torch.tensor([0.0])  # its mask: 5, 2, 3e-2, 3e-3 instead of 5, 4, 2, 3e-2
    overlap = mask_overlap(diagonal, other, sparsity=0.5)
    assert overlap["iou"] == pytest.approx(3 / 5)
    assert overlap["layer_iou"] == {"layer.0": pytest.approx(1 / 2), "layer.1": 1.0, "classifier": 0.0}
    assert mask_overlap(diagonal, diagonal, sparsity=0.5)["iou"] == 1.0
    with pytest.raises(ConfigError, match="sparsity must be in"):
        fisher_distributions(diagonal, sparsity=1.0)


# --- landscape fisher -------------------------------------------------------------------------------------------


def test_fisher_cli_end_to_end(tiny_run, tiny_sam_run, tmp_path, capsys):
    out = tmp_path / "fisher"
    argv = ["fisher", str(tiny_run), "--samples", "6", "--sparsity", "0.99", "--bins", "20", "--out", str(out)]
    assert main([*argv, "--compare", str(tiny_sam_run)]) == 0
    assert str(out) in capsys.readouterr().out
    result = load_result(out)
    assert result.kind == "fisher" and result.meta["complete"]
    layers = result.arrays["layer_names"].tolist()
    assert result.arrays["layer_hist"].shape == (len(layers), 20)
    assert result.meta["sparsity"] == 0.99 and result.meta["fisher_mode"] == "per-example"
    assert result.meta["run"]["label"] == "adamw" and result.meta["compare"]["run"]["label"] == "adamw+sam"
    assert (
        0.0 <= result.meta["compare"]["iou"] < 1.0
    )  # s = 0.99 keeps fewer than the nonzero scores: the masks of two solutions differ
    assert set(result.meta["compare"]["layer_iou"]) == set(layers)
    assert result.meta["total_trace"] > 0

    saved_at = json.loads((out / "meta.json").read_text())["saved_at"]
    assert main([*argv, "--compare", str(tiny_sam_run)]) == 0  # same parameters: skipped
    assert "already complete" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["saved_at"] == saved_at

    assert main([*argv, "--sparsity", "0.5"]) == 2  # other parameters refuse
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err

    same = tmp_path / "same"
    assert main(["fisher", str(tiny_run), "--samples", "6", "--compare", str(tiny_run), "--out", str(same)]) == 0
    assert load_result(same).meta["compare"]["iou"] == 1.0  # a run with itself
    versus_init = tmp_path / "init"
    assert (
        main(["fisher", str(tiny_run), "--samples", "6", "--compare-weights", "init", "--out", str(versus_init)]) == 0
    )
    assert load_result(versus_init).meta["compare"]["weights"] == "init"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.5"], "--sparsity takes a number in [0, 1), got 1.5"),
        (["--sparsity", "nan"], "--sparsity takes a number in [0, 1), got nan"),
        (["--samples", "0"], "expected a positive integer, got 0"),
        (["--compare", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    ],
)
def test_fisher_cli_bad_values_exit_2_with_one_line(tiny_run, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert exit_status(["fisher", str(tiny_run), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (out / "meta.json").exists()
