"""Sharpness metrics against closed forms (a least-squares model, whose loss is an exact quadratic) and brute force."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from analyses.fisher import empirical_fisher_loop
from analyses.fisher_distribution import gradients_enabled
from analyses.sharpness import (
    SubsetLoss,
    adaptive_sharpness,
    average_sharpness,
    epsilon_sharpness,
    instance_sharpness,
    random_probe_guardedness,
    sharpness_result,
)
from landscape.core.errors import ConfigError
from landscape.data.losses import per_example_loss
from landscape.data.tasks import get_task
from landscape.models.runs import EvalSubset, evaluate_subset, load_run_model, open_run, select_subset

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class LeastSquares(nn.Module):
    """``logits = X θ`` [B, 1]; with float labels the toolkit's loss is ``(x_iᵀθ − y_i)²``: L(θ) is a quadratic with
    gradient ``(2/N) Xᵀ(Xθ − y)`` and Hessian ``H = (2/N) XᵀX``. The features travel as ``input_ids``."""

    def __init__(self, theta: np.ndarray) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(logits=(input_ids @ self.theta)[:, None])


def least_squares_problem(x: np.ndarray, y: np.ndarray, theta: np.ndarray, sizes=(7, 5, 3)):
    """Model and subset over rows of ``x``, cut into uneven batches of ``sizes``."""
    assert sum(sizes) == len(x)
    batches, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        batches.append({"input_ids": torch.tensor(x[rows]), "labels": torch.tensor(y[rows])})
        start += size
    subset = EvalSubset(get_task("stsb"), "dev", 0, len(x), np.arange(len(x)), tuple(batches))
    return LeastSquares(theta), subset


def quadratic_pieces(x, y, theta):
    n = len(x)
    residual = x @ theta - y
    return float(np.mean(residual**2)), 2.0 / n * x.T @ residual, 2.0 / n * x.T @ x


def trust_region_maximum(g: np.ndarray, h: np.ndarray, rho: float) -> float:
    """max_{‖ε‖ ≤ ρ} gᵀε + ½ εᵀHε for a positive semi-definite H: on the sphere, ε = (λI − H)⁻¹g with λ > λ_max
    solving ‖ε(λ)‖ = ρ (the secular equation, by bisection in float64)."""
    eigenvalues, vectors = np.linalg.eigh(h)
    coefficients = vectors.T @ g

    def radius(lam):
        return math.sqrt(np.sum((coefficients / (lam - eigenvalues)) ** 2))

    low = eigenvalues[-1] + 1e-15
    high = eigenvalues[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(400):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if radius(middle) > rho else (low, middle)
    epsilon = vectors @ (coefficients / (0.5 * (low + high) - eigenvalues))
    return float(g @ epsilon + 0.5 * epsilon @ h @ epsilon)


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(15, 5)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])
    y = rng.normal(size=15)
    theta = np.linalg.lstsq(x, y, rcond=None)[0] + 0.02 * rng.normal(size=5)  # near the minimum: curvature dominates
    return x, y, theta


def test_objective_weights_every_example_equally_and_matches_the_closed_form(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    loss, gradient, _ = quadratic_pieces(x, y, theta)
    value, computed = SubsetLoss(model, subset).loss_and_gradient()
    assert value == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(computed["theta"].numpy(), gradient, rtol=1e-10)


def test_one_step_sharpness_is_the_written_out_formula(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    rho = 0.3
    loss, g, _ = quadratic_pieces(x, y, theta)
    epsilon = rho * g / np.linalg.norm(g)
    expected = np.mean((x @ (theta + epsilon) - y) ** 2) - loss
    result = epsilon_sharpness(SubsetLoss(model, subset), rho, steps=0)
    assert result.ascent == pytest.approx(expected, rel=1e-10)
    assert result.pgd == result.ascent
    assert result.perturbation_norm == pytest.approx(rho, rel=1e-12)


def test_projected_ascent_reaches_the_trust_region_maximum(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    _, g, h = quadratic_pieces(x, y, theta)
    for rho in (0.1, 1.0):
        exact = trust_region_maximum(g, h, rho)
        result = epsilon_sharpness(SubsetLoss(model, subset), rho, steps=200, step_size=0.2 * rho)
        assert result.pgd == pytest.approx(exact, rel=1e-6)
        assert result.ascent < exact * (1 - 1e-3)  # the SAM step alone misses the curvature here
        assert result.perturbation_norm == pytest.approx(rho, rel=1e-9)  # convex: the maximum is on the sphere


def test_projected_ascent_never_falls_below_the_one_step_value(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    objective = SubsetLoss(model, subset)
    for steps, step_size in ((1, 5.0), (3, 2.0), (10, None)):  # huge steps overshoot; the best seen is kept
        result = epsilon_sharpness(objective, 0.5, steps=steps, step_size=step_size)
        assert result.pgd >= result.ascent


def test_adaptive_sharpness_written_out_by_hand(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    loss, g, h = quadratic_pieces(x, y, theta)
    rho, eta = 0.2, 0.01
    t = np.abs(theta) + eta
    epsilon = rho * t**2 * g / np.linalg.norm(t * g)  # ASAM's one step, as optimizers.sam perturbs
    one_step = np.mean((x @ (theta + epsilon) - y) ** 2) - loss
    # In u = T⁻¹ε the loss increase is (Tg)ᵀu + ½ uᵀ(THT)u over ‖u‖ ≤ ρ: the same trust-region problem.
    exact = trust_region_maximum(t * g, t[:, None] * h * t[None, :], rho)
    result = adaptive_sharpness(SubsetLoss(model, subset), rho, eta=eta, steps=200, step_size=0.2 * rho)
    assert result.ascent == pytest.approx(one_step, rel=1e-10)
    assert result.pgd == pytest.approx(exact, rel=1e-6)
    assert result.adaptive and result.eta == eta


@pytest.mark.parametrize("theta_scale", [0.0, 0.05])
def test_average_sharpness_of_a_quadratic_is_half_sigma_squared_trace(theta_scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(15, 6))
    y = np.zeros(15)  # L(θ) = ½ θᵀHθ with H = (2/N) XᵀX
    theta = theta_scale * rng.normal(size=6)
    model, subset = least_squares_problem(x, y, theta)
    _, _, h = quadratic_pieces(x, y, theta)
    sigma = 0.1
    result = average_sharpness(SubsetLoss(model, subset), sigma, samples=1000, seed=1)
    expected = 0.5 * sigma**2 * np.trace(h)
    assert abs(result.mean - expected) < 3 * result.se
    assert result.se == pytest.approx(result.values.std(ddof=1) / math.sqrt(1000))
    assert result.se < 0.2 * expected  # the check has teeth: the interval excludes 0 and 2x the answer


def test_average_sharpness_is_seeded_and_uses_common_draws():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(15, 4)), np.zeros(15)
    model, subset = least_squares_problem(x, y, np.zeros(4))  # θ = 0: L(σz) = σ² L(z), exactly quadratic
    objective = SubsetLoss(model, subset)
    first = average_sharpness(objective, 0.1, samples=5, seed=7)
    again = average_sharpness(objective, 0.1, samples=5, seed=7)
    double = average_sharpness(objective, 0.2, samples=5, seed=7)
    other = average_sharpness(objective, 0.1, samples=5, seed=8)
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_allclose(double.values, 4 * first.values, rtol=1e-9)
    assert not np.allclose(other.values, first.values)
    assert math.isnan(average_sharpness(objective, 0.1, samples=1).se)


def test_zero_gradient_gives_zero_not_nan():
    x = np.random.default_rng(1).normal(size=(15, 3))
    model, subset = least_squares_problem(x, np.zeros(15), np.zeros(3))  # θ = 0 = the minimum, gradient exactly 0
    objective = SubsetLoss(model, subset)
    for result in (epsilon_sharpness(objective, 0.1), adaptive_sharpness(objective, 0.1)):
        assert (result.ascent, result.pgd, result.perturbation_norm) == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(instance_sharpness(model, subset, 0.1), np.zeros(15))


def test_instance_sharpness_of_least_squares_in_closed_form(problem):
    x, y, theta = problem
    x = x.copy()
    y = y.copy()
    x[4], y[4] = 0.0, 0.0  # an example whose loss and gradient are exactly zero
    model, subset = least_squares_problem(x, y, theta)
    rho = 0.05
    # l_i = r_i², ∇l_i = 2 r_i x_i, ε_i = ρ sign(r_i) x_i/‖x_i‖: l_i(θ+ε_i) − l_i(θ) = 2ρ|r_i|‖x_i‖ + ρ²‖x_i‖².
    residual, lengths = np.abs(x @ theta - y), np.linalg.norm(x, axis=1)
    expected = 2 * rho * residual * lengths + rho**2 * lengths**2
    computed = instance_sharpness(model, subset, rho, chunk_size=4)
    np.testing.assert_allclose(computed, expected, rtol=1e-9)
    assert computed[4] == 0.0


def test_random_probe_is_delta_sam_equation_3(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    rho = 0.1
    direction = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float32).double().numpy()
    moved = theta + rho * direction / np.linalg.norm(direction)
    expected = (x @ moved - y) ** 2 - (x @ theta - y) ** 2
    np.testing.assert_allclose(random_probe_guardedness(SubsetLoss(model, subset), rho, seed=4), expected, rtol=1e-6)


# --- the tiny BERT ------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tiny_run):
    run = open_run(tiny_run)
    loaded = load_run_model(run)
    subset = select_subset(run, loaded.tokenizer, split="dev", samples=7, seed=1, batch_size=4)
    return loaded.model, subset


def brute_force_instance_sharpness(model: nn.Module, subset: EvalSubset, rho: float) -> np.ndarray:
    """One example at a time on a copy of the model: backward, step ρ ĝ_i in place, evaluate, restore."""
    model = copy.deepcopy(model).eval()
    parameters = list(model.parameters())
    for p in parameters:
        p.requires_grad_(True)
    values = []
    for batch in subset.batches:
        for row in range(batch["labels"].shape[0]):
            single = {key: value[row : row + 1] for key, value in batch.items()}
            loss = per_example_loss(model, single)[0]
            gradients = torch.autograd.grad(loss, parameters)
            length = math.sqrt(sum(float(g.double().square().sum()) for g in gradients))
            saved = [p.detach().clone() for p in parameters]
            with torch.no_grad():
                for p, g in zip(parameters, gradients, strict=True):
                    p.add_(g * (rho / length))
                after = per_example_loss(model, single)[0]
                for p, value in zip(parameters, saved, strict=True):
                    p.copy_(value)
            values.append(float(after) - float(loss.detach()))
    return np.asarray(values)


def test_instance_sharpness_matches_a_brute_force_loop_on_tiny_bert(tiny):
    model, subset = tiny
    computed = instance_sharpness(model, subset, 0.05, chunk_size=3)
    reference = brute_force_instance_sharpness(model, subset, 0.05)
    assert computed.shape == (len(subset),)
    np.testing.assert_allclose(computed, reference, rtol=2e-3, atol=2e-6)
    assert np.all(reference > 0)  # the check compares real loss increases, not zeros


def model_state(model: nn.Module):
    return (
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        [m.training for m in model.modules()],
        [p.grad for p in model.parameters()],
    )


def assert_same_state(model: nn.Module, before) -> None:
    weights, flags, modes, grads = model_state(model)
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[name], before[0][name]) for name in weights)
    assert flags == before[1]
    assert modes == before[2]
    assert all(g is None for g in grads) and all(g is None for g in before[3])


def test_summary_result_on_tiny_bert_and_model_restored(tiny):
    model, subset = tiny
    model.train()
    model.classifier.eval()  # mixed modes, to see each one restored
    next(model.parameters()).requires_grad_(True)  # mixed flags
    before = model_state(model)
    result = sharpness_result(
        model, subset, rho=[0.01, 0.05], sigma=[0.0, 0.01], pgd_steps=1, gaussian_samples=2, chunk_size=4
    )
    assert_same_state(model, before)
    arrays = result.arrays
    assert result.kind == "sharpness"
    for name in ("eps_sharpness_ascent", "eps_sharpness_pgd", "adaptive_sharpness", "adaptive_sharpness_ascent"):
        assert arrays[name].shape == (2,) and np.all(np.isfinite(arrays[name]))
    assert np.all(arrays["eps_sharpness_pgd"] >= arrays["eps_sharpness_ascent"])
    assert np.all(arrays["adaptive_sharpness"] >= arrays["adaptive_sharpness_ascent"])
    assert arrays["eps_sharpness_ascent"][1] > arrays["eps_sharpness_ascent"][0] > 0
    assert arrays["average_sharpness"][0] == 0.0 and arrays["average_sharpness_se"][0] == 0.0
    assert arrays["instance_sharpness"].shape == arrays["instance_probe"].shape == (len(subset),)
    evaluation = evaluate_subset(model, subset)
    assert result.meta["loss"] == pytest.approx(evaluation.loss, rel=1e-12)
    assert SubsetLoss(model, subset).loss() == pytest.approx(evaluation.loss, rel=1e-5)
    with gradients_enabled(model):
        reference = empirical_fisher_loop(model, subset.batches)
    assert result.meta["fisher_trace"] == pytest.approx(
        sum(float(v.double().sum()) for v in reference.diagonal.values()), rel=1e-4
    )
    assert result.meta["metric_name"] == "accuracy"
    assert result.meta["conventions"]["adaptive_eta"] == 0.01
    assert "eigenvalues" not in arrays and "trace" not in arrays


class Interrupt(RuntimeError):
    pass


def interrupt_forward(model: nn.Module, at_call: int):
    """A forward hook on the encoder that raises on its ``at_call``-th call: mid-way, with perturbed weights in."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == at_call:
            raise Interrupt(f"interrupted at forward {at_call}")

    return model.bert.encoder.register_forward_hook(hook)


@pytest.mark.parametrize(
    "metric",
    [
        lambda model, subset: epsilon_sharpness(SubsetLoss(model, subset), 0.05, steps=3),
        lambda model, subset: adaptive_sharpness(SubsetLoss(model, subset), 0.05, steps=3),
        lambda model, subset: average_sharpness(SubsetLoss(model, subset), 0.01, samples=3),
        lambda model, subset: instance_sharpness(model, subset, 0.05, chunk_size=2),
    ],
    ids=["epsilon", "adaptive", "average", "instance"],
)
def test_model_restored_after_an_exception(tiny, metric):
    model, subset = tiny
    model.train()
    model.bert.embeddings.eval()  # mixed modes, to see each one restored
    model.classifier.weight.requires_grad_(True)  # mixed flags
    before = model_state(model)
    handle = interrupt_forward(model, at_call=4)  # after θ's loss (2 batches), inside a perturbed evaluation
    try:
        with pytest.raises(Interrupt):
            metric(model, subset)
    finally:
        handle.remove()
    assert_same_state(model, before)


def test_bad_values_are_refused(problem):
    x, y, theta = problem
    model, subset = least_squares_problem(x, y, theta)
    objective = SubsetLoss(model, subset)
    with pytest.raises(ConfigError, match=r"rho must be a finite number >= 0, got -0\.1"):
        epsilon_sharpness(objective, -0.1)
    with pytest.raises(ConfigError, match="PGD steps must be an integer >= 0"):
        epsilon_sharpness(objective, 0.1, steps=-1)
    with pytest.raises(ConfigError, match="sigma must be a finite number >= 0, got nan"):
        average_sharpness(objective, float("nan"))
    with pytest.raises(ConfigError, match="Gaussian draws must be a positive integer"):
        average_sharpness(objective, 0.1, samples=0)
    with pytest.raises(ConfigError, match="eta must be"):
        adaptive_sharpness(objective, 0.1, eta=-1.0)
    with pytest.raises(ConfigError, match="selects no parameter"):
        SubsetLoss(model, subset, parameter_filter=lambda name: False)


def test_summary_of_least_squares_with_hessian_and_fisher_in_closed_form():
    pytest.importorskip("analyses.hessian")
    rng = np.random.default_rng(11)
    x = rng.normal(size=(15, 4)) * np.array([2.0, 1.0, 0.5, 0.25])
    y = rng.normal(size=15)
    theta = rng.normal(size=4)
    model, subset = least_squares_problem(x, y, theta)
    _, _, h = quadratic_pieces(x, y, theta)
    result = sharpness_result(model, subset, rho=[0.1], sigma=[0.1], pgd_steps=1, gaussian_samples=2,
                              top_k=2, trace_samples=200, seed=3)  # fmt: skip
    np.testing.assert_allclose(result.arrays["eigenvalues"], np.linalg.eigvalsh(h)[::-1][:2], rtol=1e-6)
    assert abs(float(result.arrays["trace"]) - np.trace(h)) < 3 * float(result.arrays["trace_se"])
    # FSAM Eq. 9 with the regression likelihood 0.5·r²: per-example gradient r_i x_i, so tr F̂ = mean r_i² ‖x_i‖².
    residual = x @ theta - y
    assert result.meta["fisher_trace"] == pytest.approx(
        np.mean(residual**2 * np.sum(x**2, axis=1)), rel=1e-6
    )  # F̂ is stored in float32
    assert result.meta["metric_name"] == "pearson"
