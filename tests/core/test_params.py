"""Parameter-space math: exact grid points (docs/pitfalls.md §9), float64 reductions, hashing, restoring a model
(docs/pitfalls.md §5).

References are computed independently in numpy float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from landscape.core.errors import CheckpointError
from landscape.core.params import (
    add,
    check_same_keys_and_shapes,
    combine,
    content_hash,
    dot,
    norm,
    scale,
    sub,
    zeros_like,
)
from landscape.models.state import loaded_parameters


def random_params(seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (50, 40), "b": (40,), "e": (30, 7)}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def ulps(x: np.ndarray, reference64: np.ndarray) -> float:
    """Largest error of float32 ``x`` against a float64 reference, in units of the float32 spacing there."""
    spacing = np.spacing(np.abs(reference64).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(x.astype(np.float64) - reference64) / spacing))


def test_combine_is_exact_while_an_in_place_walk_drifts():
    theta = random_params(0, {"w": (20000,)})
    d1 = random_params(1, {"w": (20000,)})
    t64, d64 = theta["w"].double().numpy(), d1["w"].double().numpy()
    coefficients = np.linspace(-1.0, 1.0, 101)  # 100 steps of a 1-D sweep
    step = coefficients[1] - coefficients[0]

    walk = theta["w"].clone()
    walk.add_(d1["w"], alpha=float(coefficients[0]))
    combine_error, walk_error = 0.0, 0.0
    for i, a in enumerate(coefficients):
        if i:
            walk.add_(d1["w"], alpha=float(step))
        reference = t64 + a * d64
        point = combine(theta, [(float(a), d1)])["w"]
        assert point.dtype == torch.float32
        combine_error = max(combine_error, ulps(point.numpy(), reference))
        walk_error = max(walk_error, ulps(walk.numpy(), reference))
    # combine rounds once (≤ half an ulp); the walk accumulates one rounding per step.
    assert combine_error <= 0.5 + 1e-6
    assert walk_error > 4.0, walk_error


def test_combine_two_directions_on_a_grid_matches_float64():
    theta, d1, d2 = random_params(0), random_params(1), random_params(2)
    for a in np.linspace(-0.5, 1.0, 10):
        for b in np.linspace(-1.0, 0.3, 10):
            point = combine(theta, [(float(a), d1), (float(b), d2)])
            for name in theta:
                reference = theta[name].double().numpy() + a * d1[name].double().numpy() + b * d2[name].double().numpy()
                assert ulps(point[name].numpy(), reference) <= 0.5 + 1e-6


def test_combine_is_pure_and_zero_coefficients_give_theta_bitwise():
    theta, d1 = random_params(0), random_params(1)
    before = {name: t.clone() for name, t in theta.items()}
    d1_before = {name: t.clone() for name, t in d1.items()}
    point = combine(theta, [(0.0, d1), (0.0, d1)])
    for name in theta:
        assert torch.equal(point[name], before[name])
        assert point[name].data_ptr() != theta[name].data_ptr()
    add(theta, d1, 0.3)
    for name in theta:
        assert torch.equal(theta[name], before[name]) and torch.equal(d1[name], d1_before[name])


def test_combine_keeps_low_precision_dtype_and_rounds_once():
    theta = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)}
    d = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(4))}
    point = combine(theta, [(0.01, d)])["w"]
    assert point.dtype == torch.bfloat16
    reference = (theta["w"].double() + 0.01 * d["w"].double()).to(torch.bfloat16)
    assert torch.equal(point, reference)


def test_add_sub_scale_zeros_against_numpy():
    a, b = random_params(0), random_params(1)
    for name in a:
        an, bn = a[name].double().numpy(), b[name].double().numpy()
        np.testing.assert_allclose(add(a, b, -2.5)[name].numpy(), an - 2.5 * bn, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(sub(a, b)[name].numpy(), (a[name].numpy() - b[name].numpy()))
        np.testing.assert_allclose(scale(a, 3.0)[name].numpy(), 3.0 * an, rtol=1e-7)
        zero = zeros_like(a)[name]
        assert zero.shape == a[name].shape and zero.dtype == a[name].dtype and not zero.any()


def test_dot_and_norm_accumulate_in_float64():
    a, b = random_params(0), random_params(1)
    flat_a = np.concatenate([a[name].double().numpy().ravel() for name in sorted(a)])
    flat_b = np.concatenate([b[name].double().numpy().ravel() for name in sorted(b)])
    assert dot(a, b) == pytest.approx(float(flat_a @ flat_b), rel=1e-12)
    assert norm(a) == pytest.approx(float(np.linalg.norm(flat_a)), rel=1e-12)
    # Large float32 tensors: a float32 accumulation would lose digits that float64 keeps. 1e-9 admits any float64
    # summation order (one thread sums sequentially: up to n·ε ≈ 1e-10 relative for n = 1e6; it had failed at
    # 1e-12 with OMP_NUM_THREADS=1) and is 20x below a float32 accumulation's error here (torch's own float32 sum
    # gives 1000200.0625, 2e-8 relative).
    big = {"x": torch.full((1_000_000,), 1.0001)}
    assert dot(big, big) == pytest.approx(1_000_000 * float(np.float32(1.0001)) ** 2, rel=1e-9)


def test_check_same_keys_and_shapes_counts_and_names_the_differences():
    a = {"b": torch.zeros(2), "c": torch.zeros(3, 4)}
    check_same_keys_and_shapes(a, {"b": torch.ones(2), "c": torch.ones(3, 4)}, "x")
    with pytest.raises(CheckpointError, match=r"1 of other shape \(e.g. c \(3, 5\) vs \(3, 4\)\)"):
        check_same_keys_and_shapes(a, {"b": torch.zeros(2), "c": torch.zeros(3, 5)}, "θ0 and θ1")
    with pytest.raises(CheckpointError, match=r"^θ0 and θ1: 1 unexpected \(e.g. a\); expected the same architecture"):
        check_same_keys_and_shapes(a, {"a": torch.zeros(1), **a}, "θ0 and θ1")
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. b\)"):
        check_same_keys_and_shapes(a, {"c": torch.zeros(3, 4)}, "x")
    with pytest.raises(CheckpointError):
        dot(a, {"b": torch.zeros(2)})


def test_content_hash_sees_names_dtypes_shapes_and_every_bit():
    params = random_params(0)
    same = {name: t.clone() for name, t in reversed(list(params.items()))}
    assert content_hash(params) == content_hash(same)
    flipped = {name: t.clone() for name, t in params.items()}
    flipped["w"].view(torch.int32)[3, 5] ^= 1  # one bit of one value
    renamed = {("v" if name == "w" else name): t for name, t in params.items()}
    reshaped = {**params, "w": params["w"].reshape(40, 50)}
    retyped = {**params, "b": params["b"].double()}
    hashes = {content_hash(p) for p in (params, flipped, renamed, reshaped, retyped)}
    assert len(hashes) == 5
    assert content_hash({"x": torch.tensor(0.0)}) != content_hash({"x": torch.tensor(-0.0)})
    assert len(content_hash({"x": torch.tensor([1, 2], dtype=torch.bfloat16)})) == 64


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.second = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.1))


def test_loaded_parameters_restores_weights_flags_and_modes_after_an_exception():
    torch.manual_seed(0)
    model = Small()
    model.train()
    model.drop.eval()  # a mixed state that model.train()/eval() would not reproduce
    model.second[1].eval()
    model.first.bias.requires_grad_(False)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    target = {name: torch.full_like(p, 0.25) for name, p in model.named_parameters()}

    with pytest.raises(RuntimeError, match="mid-way"), loaded_parameters(model, target) as loaded:
        assert loaded is model
        for name, p in model.named_parameters():
            assert torch.equal(p, target[name])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(not p.requires_grad)
        with torch.no_grad():
            model.second[0].weight.mul_(7.0)
        raise RuntimeError("failure mid-way")

    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), name
        assert p.requires_grad == flags[name], name
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_loaded_parameters_refuses_other_shapes_and_touches_nothing():
    model = Small()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bad = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    bad["first.weight"] = torch.zeros(3, 5)
    with pytest.raises(CheckpointError, match=r"first\.weight"), loaded_parameters(model, bad):
        pass
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
