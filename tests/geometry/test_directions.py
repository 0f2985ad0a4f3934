"""Directions (Li et al. 2018): filter normalisation per layer kind, 1-D parameters, Gaussian draws, tied weights,
Gram–Schmidt, checkpoint and PCA directions, and the directions file (docs/pitfalls.md §1–3).

Every expected norm is recomputed here from the tensors with ``torch.linalg.norm`` along the axis that the layer's
semantics dictates, independently of the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.params import combine, dot, model_parameters, norm
from landscape.geometry.directions import (
    checkpoint_direction,
    layer_kinds,
    load_directions,
    orthogonalize,
    pca_directions,
    random_direction,
    save_directions,
)
from landscape.models.state import loaded_parameters


class Mixed(nn.Module):
    """One layer of each kind, with filters of deliberately unequal norms so that a wrong axis shows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 8)
        self.linear = nn.Linear(8, 6)
        self.conv1d = Conv1D(5, 6)  # transformers' Conv1D(nf=out, nx=in): weight (in=6, out=5)
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.LayerNorm(5)
        self.gate = nn.Parameter(torch.randn(4, 3))  # a bare 2-D parameter
        with torch.no_grad():
            for weight in (self.embed.weight, self.linear.weight, self.conv.weight, self.gate):
                weight.mul_(torch.linspace(0.1, 3.0, weight.shape[0]).reshape(-1, *[1] * (weight.dim() - 1)))
            self.conv1d.weight.normal_().mul_(torch.linspace(0.1, 3.0, 5))  # columns of unequal norm
            self.norm.weight.normal_()
            self.norm.bias.normal_()
            self.conv1d.bias.normal_()  # Conv1D initialises its bias to zeros


def filter_norms(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv1d":
        return torch.linalg.norm(t, dim=0)  # one filter per output column
    return torch.linalg.norm(t.reshape(t.shape[0], -1), dim=1)


def test_layer_kinds_per_module_type():
    assert layer_kinds(Mixed()) == {
        "embed.weight": "embedding",
        "linear.weight": "linear",
        "linear.bias": "1d",
        "conv1d.weight": "conv1d",
        "conv1d.bias": "1d",
        "conv.weight": "conv",
        "conv.bias": "1d",
        "norm.weight": "1d",
        "norm.bias": "1d",
        "gate": "other",
    }


def test_filter_normalisation_matches_the_weights_filter_norms_per_kind():
    model = Mixed()
    kinds = layer_kinds(model)
    theta = model_parameters(model)
    d = random_direction(model, seed=1)
    assert set(d) == set(theta)
    for name, kind in kinds.items():
        assert d[name].shape == theta[name].shape and d[name].dtype == torch.float32
        if kind == "1d":
            continue
        torch.testing.assert_close(filter_norms(d[name], kind), filter_norms(theta[name].detach(), kind))
    # Conv1D's filters are columns: its rows do not get the weights' row norms (a row-wise normaliser would).
    assert not torch.allclose(
        torch.linalg.norm(d["conv1d.weight"], dim=1), torch.linalg.norm(theta["conv1d.weight"].detach(), dim=1)
    )


def test_zero_filters_get_zero_direction_not_nan():
    model = Mixed()
    with torch.no_grad():
        model.linear.weight[2].zero_()
        model.conv1d.weight[:, 1].zero_()
        model.norm.weight.zero_()
    d = random_direction(model, seed=0, ignore_1d=False)
    assert all(torch.isfinite(t).all() for t in d.values())
    assert not d["linear.weight"][2].any() and d["linear.weight"][1].any()
    assert not d["conv1d.weight"][:, 1].any() and d["conv1d.weight"][:, 0].any()
    assert not d["norm.weight"].any()


def test_one_dimensional_parameters_zero_when_ignored_random_and_normalised_once_otherwise():
    model = Mixed()
    theta = model_parameters(model)
    ignored = random_direction(model, seed=3, ignore_1d=True)
    kept = random_direction(model, seed=3, ignore_1d=False)
    one_d = [name for name, kind in layer_kinds(model).items() if kind == "1d"]
    assert len(one_d) == 5
    for name in one_d:
        assert torch.count_nonzero(ignored[name]) == 0
        d, t = kept[name].double(), theta[name].detach().double()
        assert torch.linalg.norm(d).item() == pytest.approx(torch.linalg.norm(t).item(), rel=1e-6)
        cosine = abs(float(d @ t)) / (torch.linalg.norm(d) * torch.linalg.norm(t)).item()
        assert cosine < 0.99, f"{name} is (anti)parallel to the weights"
        # Normalising each element as a filter would give |d_i| = |θ_i|: a sign-flipped copy of the weights.
        assert not torch.allclose(d.abs(), t.abs())
    # The draw does not depend on ignore_1d: the weights' directions are identical.
    for name in set(theta) - set(one_d):
        assert torch.equal(ignored[name], kept[name])


def test_layer_and_model_normalisation():
    model = Mixed()
    theta = {name: p.detach() for name, p in model_parameters(model).items()}
    kinds = layer_kinds(model)
    layer = random_direction(model, seed=5, norm="layer", ignore_1d=False)
    for name in theta:
        assert torch.linalg.norm(layer[name]).item() == pytest.approx(torch.linalg.norm(theta[name]).item(), rel=1e-6)
    whole = random_direction(model, seed=5, norm="model")
    weights = [name for name in theta if kinds[name] != "1d"]
    expected = math.sqrt(sum(theta[name].double().square().sum().item() for name in weights))
    assert norm(whole) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="norm must be one of"):
        random_direction(model, seed=0, norm="unit")


def test_directions_are_gaussian_not_uniform():
    layer = nn.Linear(8192, 2)
    d = random_direction(layer, seed=11)["weight"].double().numpy()
    for row in d:  # filter normalisation rescales each row by one factor: its shape stays that of the draw
        z = (row - row.mean()) / row.std()
        assert abs(row.mean()) < 4 * row.std() / math.sqrt(row.size)
        kurtosis = float(np.mean(z**4))
        assert abs(kurtosis - 3.0) < 0.35, kurtosis  # uniform: 1.8
        assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.03  # uniform: 0.577


def test_seeded_reproducible_and_independent_of_registration_order():
    a, b = random_direction(Mixed(), seed=7), random_direction(Mixed(), seed=7)
    other = random_direction(Mixed(), seed=8)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["linear.weight"], other["linear.weight"])

    class Forward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha, self.beta = nn.Linear(3, 4), nn.Linear(4, 5)

    class Backward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.beta, self.alpha = nn.Linear(4, 5), nn.Linear(3, 4)

    first, second = Forward(), Backward()
    second.load_state_dict(first.state_dict())
    d1, d2 = random_direction(first, seed=1, ignore_1d=False), random_direction(second, seed=1, ignore_1d=False)
    for name in d1:
        assert torch.equal(d1[name], d2[name]), name


def test_params_dict_needs_kinds_for_filter_normalisation():
    model = Mixed()
    params = {name: p.detach().clone() for name, p in model_parameters(model).items()}
    with pytest.raises(ConfigError, match="kinds=layer_kinds"):
        random_direction(params, seed=0)
    from_dict = random_direction(params, seed=0, kinds=layer_kinds(model))
    from_model = random_direction(model, seed=0)
    for name in params:
        assert torch.equal(from_dict[name], from_model[name])


class TiedToy(nn.Module):
    """Input embeddings shared with the output projection, as in a language model with tied embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))


def test_tied_weights_get_one_direction_and_are_perturbed_once():
    model = TiedToy()
    assert list(model_parameters(model)) == ["embed.weight"]
    assert layer_kinds(model) == {"embed.weight": "embedding"}
    theta = {name: p.detach().clone() for name, p in model_parameters(model).items()}
    d = random_direction(model, seed=0)
    assert list(d) == ["embed.weight"]
    ids = torch.tensor([1, 4, 7])
    moved = theta["embed.weight"] + d["embed.weight"]  # the shared tensor moved once
    expected = moved[ids] @ moved.T
    with loaded_parameters(model, combine(theta, [(1.0, d)])):
        assert model.out.weight is model.embed.weight
        torch.testing.assert_close(model.embed.weight.detach(), moved)
        torch.testing.assert_close(model(ids).detach(), expected)
    assert torch.equal(model.embed.weight.detach(), theta["embed.weight"])


def test_tied_bert_mlm_embeddings_once():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    kinds = layer_kinds(model)
    assert kinds["bert.embeddings.word_embeddings.weight"] == "embedding"
    assert kinds["bert.encoder.layer.0.attention.self.query.weight"] == "linear"
    assert kinds["bert.encoder.layer.0.output.LayerNorm.weight"] == "1d"
    assert "cls.predictions.decoder.weight" not in kinds

    theta = {name: p.detach().clone() for name, p in model_parameters(model).items()}
    d = random_direction(model, seed=2)
    assert set(d) == set(theta) and "cls.predictions.decoder.weight" not in d
    name = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(filter_norms(d[name], "embedding"), filter_norms(theta[name], "embedding"))
    ids = torch.tensor([[2, 5, 9, 3]])
    with loaded_parameters(model, combine(theta, [(0.5, d)])):
        torch.testing.assert_close(decoder.weight.detach(), theta[name] + 0.5 * d[name])
        model(input_ids=ids)
    assert torch.equal(decoder.weight.detach(), theta[name])


def test_orthogonalize_gives_zero_dot_and_keeps_d1():
    model = Mixed()
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    d1_before = {name: t.clone() for name, t in d1.items()}
    d2_orth = orthogonalize(d2, d1)
    assert abs(dot(d2_orth, d1)) < 1e-6 * norm(d1) * norm(d2_orth)
    for name in d1:
        assert torch.equal(d1[name], d1_before[name])
    # Only a multiple of d1 was removed.
    c = dot(d2, d1) / dot(d1, d1)
    for name in d1:
        torch.testing.assert_close(d2_orth[name], d2[name] - c * d1[name])
    with pytest.raises(ConfigError, match="zero direction"):
        orthogonalize(d2, {name: torch.zeros_like(t) for name, t in d1.items()})


def test_checkpoint_direction_and_mismatches():
    theta0 = {"encoder.weight": torch.randn(4, 3), "classifier.weight": torch.randn(2, 4)}
    theta1 = {name: t + 0.5 for name, t in theta0.items()}
    d = checkpoint_direction(theta0, theta1)
    for name in theta0:
        torch.testing.assert_close(d[name], theta1[name] - theta0[name])
    other_head = {**theta1, "classifier.weight": torch.randn(3, 4)}
    with pytest.raises(CheckpointError, match=r"1 of other shape \(e.g. classifier.weight \(3, 4\) vs \(2, 4\)\)"):
        checkpoint_direction(theta0, other_head)
    other_arch = {"decoder.weight": torch.randn(4, 3), "classifier.weight": torch.randn(2, 4)}
    with pytest.raises(CheckpointError, match=r"decoder\.weight"):
        checkpoint_direction(theta0, other_arch)


def test_pca_recovers_the_dominant_direction_of_a_trajectory():
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (30, 20), "b": (20,), "c": (7, 3, 2)}
    final = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}

    def unit() -> dict[str, torch.Tensor]:
        v = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
        n = norm(v)
        return {name: t / n for name, t in v.items()}

    u, w = unit(), unit()
    w = orthogonalize(w, u)
    w = {name: t / norm(w) for name, t in w.items()}
    steps = np.linspace(1.0, 0.0, 12, endpoint=False)
    trajectory = []
    for s in steps:  # a curved path into the final point: large along u, small along w, tiny noise
        point = {name: final[name].double() + 5.0 * s * u[name] + 0.8 * np.sin(3 * s) * w[name] for name in shapes}
        noise = {
            name: 1e-3 * torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()
        }
        trajectory.append({name: (point[name] + noise[name]).float() for name in shapes})

    directions, ratio = pca_directions(trajectory, final, k=2)
    assert len(directions) == 2 and ratio.shape == (2,)
    for direction in directions:
        assert direction.keys() == final.keys() and norm(direction) == pytest.approx(1.0, rel=1e-6)
    assert abs(dot(directions[0], u)) > 0.99
    assert abs(dot(directions[1], w)) > 0.99
    assert abs(dot(directions[0], directions[1])) < 1e-6

    # Independent reference: the SVD of the centred dense matrix of θ_i − θ_final.
    matrix = np.stack(
        [
            np.concatenate([(row[n].double() - final[n].double()).numpy().ravel() for n in sorted(shapes)])
            for row in trajectory
        ]
    )
    singular = np.linalg.svd(matrix - matrix.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(ratio, (singular**2 / np.sum(singular**2))[:2], rtol=1e-6)
    assert ratio[0] > 0.9


def test_pca_fails_clearly_without_enough_checkpoints():
    final = {"w": torch.zeros(5)}
    with pytest.raises(ConfigError, match="at least 2 checkpoints"):
        pca_directions([{"w": torch.ones(5)}], final)
    # Two points on a line span one (centred) dimension.
    with pytest.raises(ConfigError, match="spans 1 dimension"):
        pca_directions([{"w": torch.ones(5)}, {"w": 2 * torch.ones(5)}], final, k=2)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. v\)"):
        pca_directions([{"w": torch.ones(5)}, {"v": torch.ones(5)}], final, k=1)


def test_directions_file_round_trip_is_bitwise(tmp_path):
    model = Mixed()
    directions = [random_direction(model, seed=1), random_direction(model, seed=2, ignore_1d=False)]
    directions.append({name: t.double() for name, t in directions[0].items()})
    metadata = {"seed": 1, "norm": "filter", "ignore_1d": True, "kind": "random", "theta": "abc"}
    path = tmp_path / "sub" / "directions.safetensors"
    save_directions(path, directions, metadata)
    assert sorted(p.name for p in path.parent.iterdir()) == ["directions.safetensors"]  # no temporary left
    loaded, loaded_meta = load_directions(path)
    assert loaded_meta == metadata
    assert len(loaded) == 3
    for original, back in zip(directions, loaded, strict=True):
        assert original.keys() == back.keys()
        for name in original:
            assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name])


def test_directions_file_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match="not a directions file"):
        load_directions(weights)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_directions(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_directions(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError):
        save_directions(tmp_path / "x.safetensors", [], {})
    with pytest.raises(CheckpointError):
        save_directions(tmp_path / "x.safetensors", [{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], {})
