"""Spectral algorithms against explicit symmetric matrices with known spectra (numpy.linalg as the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.spectral import (
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_quadrature,
    power_iteration,
    spectral_density,
)
from landscape.core.errors import ConfigError


class MatrixOperator:
    """An explicit symmetric matrix as an operator; counts its products."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        self.dim = self.matrix.shape[0]
        self.products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.matrix @ v


pytestmark = pytest.mark.usefixtures("one_thread")


def with_spectrum(eigenvalues, seed: int = 0) -> np.ndarray:
    """Q diag(λ) Qᵀ with a random orthogonal Q."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, dtype=np.float64)) @ q.T


def indefinite(n: int = 120, seed: int = 1) -> np.ndarray:
    """Eigenvalues {−5, 3, 1} and n − 3 others spread in [−0.9, 0.9]."""
    rest = np.random.default_rng(seed).uniform(-0.9, 0.9, n - 3)
    return with_spectrum(np.concatenate([[-5.0, 3.0, 1.0], rest]), seed=seed)


def explicit_residual(matrix: np.ndarray, value: float, vector: torch.Tensor) -> float:
    v = vector.numpy()
    return float(np.linalg.norm(matrix @ v - value * v))


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_top_k_matches_eigvalsh(which):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((150, 150))
    matrix = (a + a.T) / 2
    exact = np.linalg.eigvalsh(matrix)
    key = {"LA": -exact, "SA": exact, "LM": -np.abs(exact)}[which]
    expected = exact[np.argsort(key, kind="stable")][:4]
    result = lanczos(MatrixOperator(matrix), 4, which=which, tol=1e-8, max_iter=150)
    np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-9, atol=1e-9)
    assert result.converged.all()
    for value, vector, residual in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True):
        assert residual == pytest.approx(explicit_residual(matrix, value, vector), rel=1e-6, abs=1e-12)
        assert residual <= 1e-8 * max(1.0, abs(value))


def test_lanczos_basis_stays_orthonormal_on_a_fast_converging_spectrum():
    """Eigenvalues from 1e8 down to 1: the top pair converges in a few steps, after which each product is almost
    all along the basis (‖w after‖ ≪ ‖Aq‖), the case one Gram–Schmidt pass leaves unorthogonal."""
    matrix = with_spectrum(np.geomspace(1e8, 1.0, 80), seed=5)
    states = []
    lanczos(MatrixOperator(matrix), 1, which="LA", tol=1e-300, max_iter=80, keep=lambda state: states.append(state()))
    basis = states[-1]["basis"]
    assert basis.shape[0] >= 70  # it ran (almost) to the whole space
    loss = np.abs(basis @ basis.T - np.eye(basis.shape[0])).max()
    assert loss < 1e-12, loss
    t = np.diag(states[-1]["alphas"]) + np.diag(states[-1]["betas"][:-1], 1) + np.diag(states[-1]["betas"][:-1], -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(t)[-3:], [1e8 * 10 ** (-8 * 2 / 79), 1e8 * 10 ** (-8 / 79), 1e8])


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_a_small_absolute_residual_near_zero_is_not_convergence(method):
    """A Hessian-like spectrum: one eigenvalue 0.5, the rest within 1e-4 of zero. A random unit vector's Rayleigh
    pair is λ ≈ 0 with a residual ≈ 0.5/√n ≈ 0.011, under tol = 0.1 in absolute terms; it must not be returned."""
    n = 2000
    rest = np.random.default_rng(2).uniform(-1e-4, 1e-4, n - 1)
    matrix = with_spectrum(np.concatenate([[0.5], rest]), seed=2)
    if method == "lanczos":
        result = lanczos(MatrixOperator(matrix), 1, which="LA", tol=0.1)
    else:
        result = power_iteration(MatrixOperator(matrix), 1, tol=0.1)
    assert result.eigenvalues[0] == pytest.approx(0.5, rel=0.1)
    assert result.converged.all()
    assert result.residuals[0] <= 0.1 * abs(result.eigenvalues[0])


def test_largest_is_ambiguous_on_an_indefinite_operator():
    matrix = indefinite()
    assert lanczos(MatrixOperator(matrix), 1, which="LM", tol=1e-8).eigenvalues[0] == pytest.approx(-5, abs=1e-7)
    assert lanczos(MatrixOperator(matrix), 1, which="LA", tol=1e-8).eigenvalues[0] == pytest.approx(3, abs=1e-7)
    assert lanczos(MatrixOperator(matrix), 1, which="SA", tol=1e-8).eigenvalues[0] == pytest.approx(-5, abs=1e-7)
    top_two = lanczos(MatrixOperator(matrix), 2, which="LA", tol=1e-8).eigenvalues
    np.testing.assert_allclose(top_two, [3, 1], atol=1e-7)


def test_power_iteration_finds_the_largest_magnitude_with_deflation():
    matrix = indefinite()
    result = power_iteration(MatrixOperator(matrix), 3, max_iter=2000, tol=1e-6, seed=2)
    np.testing.assert_allclose(result.eigenvalues, [-5, 3, 1], atol=1e-5)
    for value, vector, residual in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True):
        assert residual == pytest.approx(explicit_residual(matrix, value, vector), rel=1e-6, abs=1e-12)
    # The first pair meets the tolerance; the deflated ones inherit its error (a residual of about tol·|λ₁|).
    assert result.converged[0]
    assert (result.residuals <= 10 * 1e-6 * 5).all()


def test_unconverged_pairs_are_reported_as_such():
    # A clustered top of the spectrum and 6 steps cannot resolve 3 eigenpairs to 1e-10.
    values = np.concatenate([[10.0, 9.99, 9.98], np.linspace(-1, 9.9, 297)])
    matrix = with_spectrum(values, seed=4)
    operator = MatrixOperator(matrix)
    result = lanczos(operator, 3, which="LA", tol=1e-10, max_iter=6)
    assert not result.converged.any()
    for value, vector, residual in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True):
        assert residual == pytest.approx(explicit_residual(matrix, value, vector), rel=1e-6)
        assert residual > 1e-10 * abs(value)
    assert result.matvecs == operator.products == 6  # the residuals come from the basis's own products


def test_power_iteration_without_convergence_is_flagged():
    values = np.concatenate([[10.0, -9.999], np.linspace(-1, 1, 48)])
    result = power_iteration(MatrixOperator(with_spectrum(values)), 1, max_iter=20, tol=1e-8)
    assert not result.converged[0]
    assert result.matvecs == 20


def test_lanczos_finds_a_repeated_eigenvalue_and_small_operators():
    values = np.array([4.0, 4.0, 2.0, 1.0, 0.5, -1.0])
    result = lanczos(MatrixOperator(with_spectrum(values)), 3, which="LA", tol=1e-10)
    np.testing.assert_allclose(result.eigenvalues, [4, 4, 2], atol=1e-8)
    assert result.converged.all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_hutchinson_within_three_standard_errors(sign):
    values = sign * np.random.default_rng(5).uniform(0.2, 3.0, 200)
    matrix = with_spectrum(values, seed=5)
    exact = float(np.trace(matrix))
    for seed in range(4):
        estimate = hutchinson(MatrixOperator(matrix), 60, seed=seed)
        assert estimate.samples == len(estimate.values) == 60  # all samples drawn, also with a negative mean
        assert estimate.se > 0
        assert abs(estimate.mean - exact) <= 3 * estimate.se
        assert estimate.se == pytest.approx(np.std(estimate.values, ddof=1) / np.sqrt(60))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_hutchpp_within_three_standard_errors_and_better_on_decaying_spectra(sign):
    values = sign * 50.0 * 0.7 ** np.arange(200)  # fast decay: Hutch++'s case
    matrix = with_spectrum(values, seed=6)
    exact = float(np.trace(matrix))
    for seed in range(4):
        plus = hutchpp(MatrixOperator(matrix), 60, seed=seed)
        plain = hutchinson(MatrixOperator(matrix), 60, seed=seed)
        assert plus.matvecs == 60
        assert abs(plus.mean - exact) <= 3 * plus.se
        assert abs(plus.mean - exact) < abs(plain.mean - exact)
        assert plus.se < plain.se / 10


def test_hutchpp_is_exact_on_a_low_rank_matrix():
    matrix = with_spectrum(np.concatenate([[7.0, -3.0, 2.0], np.zeros(97)]), seed=7)
    estimate = hutchpp(MatrixOperator(matrix), 12, seed=0)
    assert estimate.mean == pytest.approx(6.0, abs=1e-10)
    assert estimate.se < 1e-10


def test_slq_weights_are_real_and_sum_to_one():
    matrix = indefinite(80)
    nodes, weights = lanczos_quadrature(MatrixOperator(matrix), vectors=3, steps=20, seed=0)
    assert nodes.shape == weights.shape == (3, 20)
    assert np.isrealobj(weights) and (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    # Gauss quadrature from a unit start vector: the extreme nodes converge to the extreme eigenvalues.
    assert nodes.min() == pytest.approx(-5, abs=1e-6) and nodes.max() == pytest.approx(3, abs=1e-6)


def test_slq_density_matches_the_exact_broadened_spectrum():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((400, 400))
    matrix = (a + a.T) / np.sqrt(2 * 400)  # Wigner: semicircle on [−2, 2]
    exact = np.linalg.eigvalsh(matrix)
    sigma = 0.15
    grid = np.linspace(-3, 3, 601)
    grid_out, density = spectral_density(MatrixOperator(matrix), vectors=10, steps=40, grid=grid, sigma=sigma, seed=1)
    reference = np.exp(-0.5 * ((grid[:, None] - exact[None, :]) / sigma) ** 2).sum(1) / (
        len(exact) * sigma * np.sqrt(2 * np.pi)
    )
    np.testing.assert_array_equal(grid_out, grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    assert np.trapezoid(np.abs(density - reference), grid) < 0.08  # L1 distance of two densities (max 2)
    # The first moments of the quadrature equal tr(Aᵖ)/n in expectation.
    for power in (1, 2):
        moment = np.trapezoid(density * grid**power, grid)
        assert moment == pytest.approx(np.mean(exact**power), abs=0.05)


def test_slq_default_grid_integrates_to_one():
    grid, density = spectral_density(MatrixOperator(indefinite(60)), vectors=2, steps=30, seed=0)
    assert len(grid) == len(density) == 1000
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)


def test_bad_arguments_name_the_value():
    operator = MatrixOperator(np.eye(4))
    with pytest.raises(ConfigError, match="which must be one of"):
        lanczos(operator, 1, which="largest")
    with pytest.raises(ConfigError, match="at most the operator's dimension 4"):
        lanczos(operator, 5)
    with pytest.raises(ConfigError, match="samples must be a positive integer, got 0"):
        hutchinson(operator, 0)
    with pytest.raises(ConfigError, match="at least 3"):
        hutchpp(operator, 2)


class AsymmetricOperator(MatrixOperator):
    """A symmetric matrix plus a small non-symmetric error, the way a product computed in float32 is only nearly
    symmetric; ``out=`` is taken, as the Hessian operator takes it."""

    def __init__(self, matrix: np.ndarray, error: float, seed: int = 0):
        super().__init__(matrix)
        noise = np.random.default_rng(seed).standard_normal(matrix.shape)
        self.matrix = self.matrix + error * torch.as_tensor(noise)  # not symmetric

    def matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.products += 1
        return torch.mv(self.matrix, v, out=out)


def test_lanczos_residuals_are_those_of_the_products_not_of_t_alone():
    """The residual read from the recorded coefficients equals the explicit ‖Ay − θy‖ of the operator that was
    applied, also when that operator is not quite symmetric, where T's own bound |β_m s_m| sees nothing of it."""
    from analyses.spectral import _Lanczos, _select, _start_vector

    matrix = indefinite(n=100, seed=3)
    operator = AsymmetricOperator(matrix, error=1e-5)
    result = lanczos(operator, 3, which="LM", tol=1e-12, max_iter=60)
    applied = operator.matrix.numpy()
    for value, vector, residual in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True):
        assert residual == pytest.approx(explicit_residual(applied, value, vector), rel=1e-6)
    assert not result.converged.any()  # the asymmetry bounds the residual from below: flagged, not hidden
    assert result.matvecs == operator.products == 60  # no product spent on the residuals

    generator = torch.Generator().manual_seed(0)
    krylov = _Lanczos(AsymmetricOperator(matrix, error=1e-5), _start_vector(operator, generator), 60, generator)
    for _ in range(60):
        krylov.step()
    values, coords = krylov.ritz()
    chosen = _select(values, 3, "LM")
    t_bound = np.abs(krylov.betas[-1] * coords[-1, chosen])
    np.testing.assert_allclose(krylov.residuals(coords[:, chosen], values[chosen]), result.residuals, rtol=1e-9)
    assert (t_bound < result.residuals / 100).all()  # T alone would have called these pairs converged


def test_a_resumed_lanczos_without_recorded_coefficients_starts_over():
    """A state saved by a version that kept no coefficients cannot give residuals: the iteration starts again and
    returns what a fresh one does."""
    matrix = indefinite(n=80, seed=4)
    states = []
    fresh = lanczos(MatrixOperator(matrix), 2, which="LA", tol=1e-8, keep=lambda state: states.append(state()))
    old = {key: value for key, value in states[5].items() if key not in ("coefficients", "dropped")}
    resumed = lanczos(MatrixOperator(matrix), 2, which="LA", tol=1e-8, state=old)
    np.testing.assert_array_equal(resumed.eigenvalues, fresh.eigenvalues)
    assert resumed.matvecs == fresh.matvecs
