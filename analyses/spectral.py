"""Spectral algorithms on any symmetric linear operator: Lanczos, power iteration, trace and density estimators.

An *operator* is anything with ``dim`` (int) and ``matvec(v: Tensor[dim] float64) -> Tensor[dim] float64`` for a
symmetric matrix A (a Hessian, or an explicit matrix in tests). Vectors live on ``operator.device`` when it has one,
else on the CPU; the algorithms keep their own vectors (Krylov bases, sketches) in float64.

* :func:`lanczos`: the k extreme eigenpairs by the Lanczos method with full reorthogonalisation (Golub & Van Loan,
  *Matrix Computations*, §10.1). Convergence is judged by the true residual ‖Av − λv‖ of each returned pair, read
  from the products already computed (every coefficient the orthogonalisation removed is recorded, so
  A Q = Q H + β q eᵀ holds to rounding), never by two consecutive estimates agreeing (docs/pitfalls.md §12).
* :func:`power_iteration`: one eigenpair at a time with deflation against the pairs already found; it converges to
  the eigenvalue of largest magnitude (docs/pitfalls.md §11), the method PyHessian uses, kept for comparison.
* :func:`hutchinson`: ``tr(A) ≈ mean_i zᵢᵀ A zᵢ`` with Rademacher ``zᵢ`` (Hutchinson 1990), mean and standard error,
  all samples always drawn (no early stop on a running mean, docs/pitfalls.md §13).
* :func:`hutchpp`: Hutch++ (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1): ``tr(QᵀAQ)`` on a sketched range
  ``Q = orth(AS)`` plus Hutchinson on the deflated rest ``(I − QQᵀ)A(I − QQᵀ)``.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao 2019):
  per random start vector, the tridiagonal ``T`` of m Lanczos steps, ``eigh(T) = (θⱼ, sⱼ)``, nodes ``θⱼ`` with
  weights ``τⱼ = s₁ⱼ²`` (real, summing to one, docs/pitfalls.md §14), broadened by a Gaussian of width σ.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from landscape.core.errors import ConfigError

WHICH = ("LA", "SA", "LM")


class Operator(Protocol):
    """A symmetric linear map on R^dim (float64 vectors in and out)."""

    dim: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class EigenResult:
    """Approximate eigenpairs (λᵢ, vᵢ), i = 1..k, in the order asked for (e.g. largest first for ``which="LA"``).

    ``eigenvalues`` [k]; ``eigenvectors`` [k, dim] float64 unit vectors (or None when not kept); ``residuals`` [k]
    the true ‖Avᵢ − λᵢvᵢ‖ of the products computed (never two consecutive estimates agreeing); ``converged`` [k]
    bool, residual ≤ :func:`thresholds`; ``matvecs``: products with A spent in total.
    """

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor | None
    residuals: np.ndarray
    converged: np.ndarray
    matvecs: int


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate: ``mean`` ± ``se`` (standard error of the mean of the random part).

    ``values`` [samples]: the Rademacher quadratic forms zᵢᵀ A zᵢ (Hutchinson), or those of the deflated matrix
    (Hutch++, whose ``mean`` adds the exact trace on the sketched range); ``matvecs``: products with A spent.
    """

    mean: float
    se: float
    samples: int
    values: np.ndarray
    matvecs: int


def thresholds(tol: float, values: np.ndarray, scale: float) -> np.ndarray:
    """The residual under which each eigenpair counts as converged: ``tol·max(|λᵢ|, scale)``.

    ``scale`` is the largest |eigenvalue| the method has seen (Ritz values, or the pairs found): an estimate of
    ‖A‖ from below. So the test is relative to λ, and relative to the operator's size for an eigenvalue near zero
    (a backward error: the pair is exact for A + E with ‖E‖ ≤ tol·scale). An absolute floor (``max(1, |λ|)``)
    is not unit-free: on a Hessian whose curvature is mostly far below 1, the Rayleigh pair of the random start
    vector, λ ≈ 0 with a residual ≈ 0.02, passed tol 0.1 after one product and was returned as the top
    eigenvalue (8.2 on MiniLM; docs/pitfalls.md §36).
    """
    return tol * np.maximum(np.abs(np.asarray(values, dtype=np.float64)), scale)


def _device(operator: Operator) -> torch.device:
    return torch.device(getattr(operator, "device", "cpu"))


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _writes_into(operator: Operator) -> bool:
    """Whether ``operator.matvec`` takes ``out=`` (a float64 [dim] tensor it writes ``Av`` into and returns)."""
    try:
        return "out" in inspect.signature(operator.matvec).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _apply(operator: Operator, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A v`` as a float64 tensor the caller owns (the algorithms update it in place).

    With ``out`` (float64 [dim], not ``v``'s storage) the product lands there: an operator that takes ``out=``
    writes it directly, any other's result is copied. On a 22.7 M-parameter Hessian a fresh float64 vector costs
    about as much to fault in as several copies into memory already touched (docs/hessian.md), hence the reuse.
    """
    result = operator.matvec(v, out=out) if out is not None and _writes_into(operator) else operator.matvec(v)
    if result.shape != v.shape:
        raise ConfigError(f"operator.matvec returned shape {tuple(result.shape)} for input {tuple(v.shape)}")
    if out is not None:
        return result if result.data_ptr() == out.data_ptr() else out.copy_(result)
    result = result.to(torch.float64)
    return result.clone() if result.data_ptr() == v.data_ptr() else result


def _rademacher(count: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[count, dim] float64 of independent ±1 entries."""
    signs = torch.randint(0, 2, (count, dim), generator=generator, dtype=torch.int8)  # cpu: seeded draws, moved
    return (signs.to(torch.float64) * 2 - 1).to(device)


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w`` minus its projection on the orthonormal rows of ``basis`` [m, dim], in place (``w`` is returned)."""
    return _orthogonalize_with_norm(w, basis)[0]


def _orthogonalize_with_norm(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, float, np.ndarray]:
    """:func:`_orthogonalize`, ‖w‖ after it (the norm its test computes anyway: one pass over dim saved), and the
    coefficients removed along each row of ``basis`` [m] (all passes summed: ``w_before = w_after + basisᵀ c``).

    Classical Gram–Schmidt, repeated once when the pass removed most of ``w`` (the criterion of Daniel, Gragg,
    Kaufman, Stewart 1976: ‖w_after‖ < ‖w_before‖/√2), which keeps ``w`` orthogonal to working accuracy. (One pass
    with a laxer criterion is not enough inside Lanczos: a rounding error along a converged Ritz vector of
    eigenvalue λ₁ grows by λ₁/|λ| at every later product; tests/analyses/test_hessian_spectral.py shows it.)
    """
    before = float(torch.linalg.vector_norm(w))
    removed = np.zeros(basis.shape[0])
    if basis.shape[0] == 0:
        return w, before, removed
    for _ in range(2):
        coefficients = basis @ w
        w.addmv_(basis.T, coefficients, alpha=-1.0)
        removed += coefficients.cpu().numpy()
        after = float(torch.linalg.vector_norm(w))
        if after >= before / math.sqrt(2):
            break
        before = after
    return w, after, removed


class _Lanczos:
    """Lanczos with full reorthogonalisation, one step at a time.

    After m steps: ``basis`` [m, dim] orthonormal rows q₁..q_m, ``alphas`` [m], ``betas`` [m] with
    A qⱼ = β_{j−1} q_{j−1} + αⱼ qⱼ + βⱼ q_{j+1}; ``betas[-1]`` is the norm of the next residual (0 on breakdown:
    the Krylov space is invariant, and the next step restarts from a fresh random vector orthogonal to it, so T
    becomes block diagonal and repeated eigenvalues can still be found).

    Besides T, every step records what it removed from its product, so that the computed quantities satisfy
    A Q_m = Q_m H_m + β_m q_{m+1} e_mᵀ + D_m exactly up to float64 rounding of the vector operations:
    ``coefficients`` [capacity, capacity], column j = the components of A qⱼ removed along q₁..qⱼ (α, β and every
    reorthogonalisation pass: the tiny ones that T leaves out are where a product in float32 is not quite
    symmetric), and ``dropped`` [capacity], the norm of the part of A qⱼ left out at a breakdown (the columns of
    D). :meth:`residuals` reads the true residual of a Ritz pair from them, without another product.
    """

    def __init__(self, operator: Operator, start: torch.Tensor, capacity: int, generator: torch.Generator):
        self.operator = operator
        self.generator = generator
        self.device = start.device
        self.storage = torch.empty((capacity, operator.dim), dtype=torch.float64, device=self.device)
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.coefficients = np.zeros((capacity, capacity))
        self.dropped = np.zeros(capacity)
        self.matvecs = 0
        torch.div(start, torch.linalg.vector_norm(start), out=self.storage[0])
        self.exhausted = False  # the whole space is spanned

    @property
    def steps(self) -> int:
        return len(self.alphas)

    @property
    def basis(self) -> torch.Tensor:
        return self.storage[: self.steps]

    def step(self) -> None:
        m = self.steps
        q = self.storage[m]  # the next vector was written into this row by the previous step
        capacity = self.storage.shape[0]
        # The product goes straight into the next row, where it becomes q_{m+1} in place: no fresh vector per step.
        w = _apply(self.operator, q, out=self.storage[m + 1] if m + 1 < capacity else None)
        self.matvecs += 1
        alpha = float(torch.dot(q, w))
        column = np.zeros(m + 1)
        # The three-term recurrence removes the large components (α along q, β along the previous q, in one pass
        # over the two rows); the full pass then only removes rounding errors.
        if m > 0 and self.betas[m - 1] != 0.0:
            recurrence = torch.tensor([self.betas[m - 1], alpha], dtype=w.dtype, device=w.device)
            w.addmv_(self.storage[m - 1 : m + 1].T, recurrence, alpha=-1.0)
            column[m - 1] = self.betas[m - 1]
        else:
            w.sub_(q, alpha=alpha)
        column[m] = alpha
        w, beta, removed = _orthogonalize_with_norm(w, self.storage[: m + 1])
        self.coefficients[: m + 1, m] = column + removed
        self.alphas.append(alpha)
        scale = max(abs(alpha), *(abs(b) for b in self.betas), beta, 1e-300)
        if m + 1 >= min(self.operator.dim, capacity):
            self.exhausted = m + 1 >= self.operator.dim  # the whole space is spanned
            if self.exhausted:  # what is left of w is rounding; it stays in the residuals as dropped
                self.dropped[m] = beta
            self.betas.append(0.0 if self.exhausted else beta)
            return
        if beta <= 1e-12 * scale:  # invariant subspace: restart orthogonally, with a zero coupling in T
            self.betas.append(0.0)
            self.dropped[m] = beta
            fresh = _rademacher(1, self.operator.dim, self.generator, self.device)[0]
            fresh = _orthogonalize(fresh, self.storage[: m + 1])
            torch.div(fresh, torch.linalg.vector_norm(fresh), out=self.storage[m + 1])
            return
        self.betas.append(beta)
        w.div_(beta)  # w is storage[m + 1]: the next vector

    def residuals(self, coords: np.ndarray, values: np.ndarray) -> np.ndarray:
        """‖A y − θ y‖ for the Ritz vectors y = Q s, s the columns of ``coords`` [m, k], θ = ``values`` [k].

        From A Q = Q H + β_m q_{m+1} e_mᵀ + D (class docstring) with [Q, q_{m+1}] orthonormal:
        A y − θ y = Q (H s − θ s) + β_m s_m q_{m+1} + D s, so the residual is
        √(‖H s − θ s‖² + (β_m s_m)²), plus at most Σⱼ |sⱼ| ‖dⱼ‖ when a breakdown dropped something (a bound then,
        of the order of 1e-12 ‖A‖). It is the residual of the products actually computed, not an estimate from
        T alone (which would miss the products' asymmetry), and it costs no product.
        """
        m = self.steps
        hessenberg = self.coefficients[:m, :m].copy()
        hessenberg[np.arange(1, m), np.arange(m - 1)] = self.betas[: m - 1]
        inside = hessenberg @ coords - coords * values
        outside = self.betas[m - 1] * coords[m - 1]
        return np.sqrt((inside**2).sum(axis=0) + outside**2) + np.abs(coords).T @ self.dropped[:m]

    def state(self) -> dict[str, np.ndarray]:
        """Everything the next steps depend on: the basis and the next vector, T's entries and the recorded
        coefficients, the generator."""
        m = self.steps
        return {
            "basis": self.storage[: m + 1].cpu().numpy(),
            "alphas": np.asarray(self.alphas, dtype=np.float64),
            "betas": np.asarray(self.betas, dtype=np.float64),
            "coefficients": self.coefficients[:m, :m].copy(),
            "dropped": self.dropped[:m].copy(),
            "matvecs": np.int64(self.matvecs),
            "exhausted": np.bool_(self.exhausted),
            "generator": self.generator.get_state().numpy(),
        }

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from :meth:`state`'s values (a resumed analysis computes bitwise what it would have)."""
        rows = torch.from_numpy(np.asarray(state["basis"], dtype=np.float64)).to(self.device)
        if rows.shape[1] != self.operator.dim or rows.shape[0] > self.storage.shape[0]:
            raise ConfigError(f"the saved Lanczos state has shape {tuple(rows.shape)}, not one of this operator")
        self.storage[: rows.shape[0]] = rows
        self.alphas = [float(x) for x in state["alphas"]]
        self.betas = [float(x) for x in state["betas"]]
        m = len(self.alphas)
        self.coefficients[:m, :m] = np.asarray(state["coefficients"], dtype=np.float64)
        self.dropped[:m] = np.asarray(state["dropped"], dtype=np.float64)
        self.matvecs = int(state["matvecs"])
        self.exhausted = bool(state["exhausted"])
        # cpu: a generator state is a CPU byte tensor
        self.generator.set_state(torch.from_numpy(np.asarray(state["generator"], dtype=np.uint8).copy()))

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues [m] (ascending) and eigenvectors [m, m] (columns) of the symmetric tridiagonal T."""
        diagonal = np.asarray(self.alphas, dtype=np.float64)
        if len(diagonal) == 1:
            return diagonal.copy(), np.ones((1, 1))
        return eigh_tridiagonal(diagonal, np.asarray(self.betas[: len(diagonal) - 1], dtype=np.float64))


def _select(values: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted values, in reporting order."""
    if which == "LA":
        order = np.argsort(-values, kind="stable")
    elif which == "SA":
        order = np.argsort(values, kind="stable")
    else:
        order = np.argsort(-np.abs(values), kind="stable")
    return order[:k]


def _check_which(which: str) -> str:
    if which not in WHICH:
        raise ConfigError(
            f"which must be one of {', '.join(WHICH)} (largest algebraic, smallest algebraic, "
            f"largest magnitude), got {which!r}"
        )
    return which


def _start_vector(operator: Operator, generator: torch.Generator) -> torch.Tensor:
    """A seeded Gaussian [dim] float64, drawn in float32: a start needs no more precision, and float64 normal draws
    cost three times as much (a second per start on 22.7 M parameters, a tenth of a top-1 Hessian run)."""
    draws = torch.randn(operator.dim, generator=generator, dtype=torch.float32)  # cpu: seeded draws, moved
    return draws.to(device=_device(operator), dtype=torch.float64)


def lanczos(
    operator: Operator,
    k: int,
    *,
    which: str = "LA",
    max_iter: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    return_eigenvectors: bool = True,
    state: Mapping[str, np.ndarray] | None = None,
    keep: Callable[[Callable[[], dict[str, np.ndarray]]], None] | None = None,
) -> EigenResult:
    """The k eigenpairs of A selected by ``which`` (LA largest algebraic, SA smallest, LM largest magnitude).

    Runs at most ``max_iter`` Lanczos steps (default ``min(dim, max(2k + 20, 40))``) from a seeded Gaussian start.
    After each step the true residuals ‖Ay − θy‖ of the k wanted Ritz pairs are read from the products already
    computed (:meth:`_Lanczos.residuals`: no extra product); it stops when all k are below :func:`thresholds`
    (scale: the largest |Ritz value|), or after ``max_iter`` steps with the unconverged pairs flagged. Every
    product is a Lanczos step: ``matvecs`` = steps.
    Memory: the float64 basis, ``max_iter × dim × 8`` bytes (rows are touched as the steps reach them).

    Resuming: ``keep`` is called before every step with a function that returns the iteration's state; handed back
    as ``state`` (same operator, k, which, max_iter, tol and seed), the iteration continues from it bitwise.
    """
    k = _check_positive("k", k)
    _check_which(which)
    dim = _check_positive("operator.dim", operator.dim)
    if k > dim:
        raise ConfigError(f"k must be at most the operator's dimension {dim}, got {k}")
    if not tol > 0:
        raise ConfigError(f"tol must be > 0, got {tol}")
    max_iter = min(dim, max(2 * k + 20, 40)) if max_iter is None else _check_positive("max_iter", max_iter)
    max_iter = max(min(max_iter, dim), k)
    generator = torch.Generator().manual_seed(seed)
    krylov = _Lanczos(operator, _start_vector(operator, generator), max_iter, generator)
    # A state saved before the coefficients were recorded cannot give residuals: such an analysis starts over.
    if state is not None and "coefficients" in state:
        krylov.restore(state)
    while True:
        if keep is not None and krylov.steps > 0:
            keep(krylov.state)
        krylov.step()
        m = krylov.steps
        if m < k:
            continue
        finished = m >= max_iter or krylov.exhausted
        if krylov.betas[-1] == 0.0 and not finished:  # T holds an invariant block only: go on
            continue
        ritz_values, ritz_coords = krylov.ritz()
        chosen = _select(ritz_values, k, which)
        coords, values = ritz_coords[:, chosen], ritz_values[chosen]
        residuals = krylov.residuals(coords, values)
        converged = residuals <= thresholds(tol, values, float(np.abs(ritz_values).max()))
        if not (converged.all() or finished):
            continue
        vectors = None
        if return_eigenvectors:
            vectors = torch.as_tensor(coords.T.copy(), device=krylov.device) @ krylov.basis  # [k, dim]
            norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
            vectors /= norms  # ‖Q s‖ = 1 up to rounding: Q is orthonormal to working accuracy
        return EigenResult(
            eigenvalues=values.copy(),
            eigenvectors=vectors,
            residuals=residuals,
            converged=converged,
            matvecs=krylov.matvecs,
        )


def power_iteration(
    operator: Operator, k: int, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0
) -> EigenResult:
    """k eigenpairs of largest magnitude, one after another, each by power iteration with deflation.

    For pair j: v ← normalise(P A P v) with P the projector orthogonal to the j−1 vectors already found, λ = vᵀAv.
    Stops when the residual of the deflated operator ‖PAv − λv‖ ≤ :func:`thresholds` (scale: the largest |λ| of
    the pairs so far, this one's current estimate included; a residual, not two consecutive estimates), or after
    ``max_iter`` products. The reported residual is the explicit ‖Av − λv‖ of the
    returned v with the undeflated A (free: Av is the last product), and ``converged`` is judged on it: a deflated
    pair inherits the error of the pairs found before it (about their residual), so it may be flagged unconverged
    although its deflated residual met ``tol``.
    """
    k = _check_positive("k", k)
    max_iter = _check_positive("max_iter", max_iter)
    dim = _check_positive("operator.dim", operator.dim)
    if k > dim:
        raise ConfigError(f"k must be at most the operator's dimension {dim}, got {k}")
    generator = torch.Generator().manual_seed(seed)
    found = torch.empty((0, dim), dtype=torch.float64, device=_device(operator))
    values, residuals, matvecs = [], [], 0
    for _ in range(k):
        v = _orthogonalize(_start_vector(operator, generator), found)
        v = v / torch.linalg.vector_norm(v)
        for _ in range(max_iter):
            image = _apply(operator, v)
            matvecs += 1
            value = float(torch.dot(v, image))
            full_residual = float(torch.linalg.vector_norm(image - value * v))
            deflated = _orthogonalize(image, found)
            scale = max([abs(value), *(abs(found_value) for found_value in values)])
            if float(torch.linalg.vector_norm(deflated - value * v)) <= float(thresholds(tol, value, scale)):
                break
            norm = torch.linalg.vector_norm(deflated)
            if float(norm) == 0.0:  # v is in the null space of PAP: it is an eigenvector with eigenvalue 0
                break
            v = deflated / norm
        values.append(value)
        residuals.append(full_residual)
        found = torch.cat([found, v[None]])
    values_array, residual_array = np.asarray(values), np.asarray(residuals)
    return EigenResult(
        eigenvalues=values_array,
        eigenvectors=found,
        residuals=residual_array,
        converged=residual_array <= thresholds(tol, values_array, float(np.abs(values_array).max())),
        matvecs=matvecs,
    )


def hutchinson(
    operator: Operator,
    samples: int,
    *,
    seed: int = 0,
    state: Mapping[str, np.ndarray] | None = None,
    keep: Callable[[Callable[[], dict[str, np.ndarray]]], None] | None = None,
) -> TraceEstimate:
    """Hutchinson's trace estimate from ``samples`` Rademacher vectors; se = std(ddof=1)/√samples (NaN for 1).

    Resuming as :func:`lanczos`: ``keep`` receives the samples done and the generator's state after each sample.
    """
    samples = _check_positive("samples", samples)
    generator = torch.Generator().manual_seed(seed)
    values = np.empty(samples)
    start = 0
    if state is not None:
        start = len(state["values"])
        values[:start] = state["values"]
        # cpu: a generator state is a CPU byte tensor
        generator.set_state(torch.from_numpy(np.asarray(state["generator"], dtype=np.uint8).copy()))
    for i in range(start, samples):
        if keep is not None and i > 0:
            keep(lambda i=i: {"values": values[:i].copy(), "generator": generator.get_state().numpy()})
        z = _rademacher(1, operator.dim, generator, _device(operator))[0]
        values[i] = float(torch.dot(z, _apply(operator, z)))
    se = float(values.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.nan
    return TraceEstimate(mean=float(values.mean()), se=se, samples=samples, values=values, matvecs=samples)


def hutchpp(operator: Operator, matvecs: int, *, seed: int = 0) -> TraceEstimate:
    """Hutch++ with a budget of ``matvecs`` products (at least 3): Meyer et al. 2021, Algorithm 1.

    s = ⌊matvecs/3⌋ sketch vectors S, Q = orth(AS) [dim, s]; exact part tr(QᵀAQ) (s products); the remaining
    ``matvecs − 2s`` Rademacher vectors G estimate tr((I−QQᵀ)A(I−QQᵀ)) by Hutchinson, which gives ``values`` and
    ``se`` (the sketched part is not random given Q, so the standard error is the residual part's).
    """
    matvecs = _check_positive("matvecs", matvecs)
    if matvecs < 3:
        raise ConfigError(f"hutchpp needs at least 3 products (sketch, projection, residual), got {matvecs}")
    dim, device = operator.dim, _device(operator)
    generator = torch.Generator().manual_seed(seed)
    sketch_size = min(matvecs // 3, dim)
    residual_samples = matvecs - 2 * sketch_size
    sketch = _rademacher(sketch_size, dim, generator, device)
    range_images = torch.stack([_apply(operator, s) for s in sketch])  # rows: A sᵢ
    q, _ = torch.linalg.qr(range_images.T)  # [dim, s], orthonormal columns
    basis = q.T.contiguous()  # [s, dim]
    exact_part = sum(float(torch.dot(row, _apply(operator, row))) for row in basis)
    values = np.empty(residual_samples)
    for i in range(residual_samples):
        g = _orthogonalize(_rademacher(1, dim, generator, device)[0], basis)
        values[i] = float(torch.dot(g, _orthogonalize(_apply(operator, g), basis)))
    se = float(values.std(ddof=1) / math.sqrt(residual_samples)) if residual_samples > 1 else math.nan
    return TraceEstimate(
        mean=exact_part + float(values.mean()),
        se=se,
        samples=residual_samples,
        values=values,
        matvecs=2 * sketch_size + residual_samples,
    )


def lanczos_quadrature(operator: Operator, *, vectors: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of stochastic Lanczos quadrature: ([vectors, m], [vectors, m]), m ≤ ``steps``.

    Each start vector is Rademacher, normalised. Weights are the squared first components of the eigenvectors of
    the symmetric tridiagonal T (``scipy.linalg.eigh_tridiagonal``, a symmetric solver): real, non-negative, each
    row summing to one. A row that stopped early (the whole space was spanned) is padded with weight 0.
    """
    vectors = _check_positive("vectors", vectors)
    steps = _check_positive("steps", steps)
    steps = min(steps, operator.dim)
    generator = torch.Generator().manual_seed(seed)
    nodes = np.zeros((vectors, steps))
    weights = np.zeros((vectors, steps))
    for row in range(vectors):
        start = _rademacher(1, operator.dim, generator, _device(operator))[0]
        krylov = _Lanczos(operator, start, steps, generator)
        while krylov.steps < steps and not krylov.exhausted:
            krylov.step()
            if krylov.betas[-1] == 0.0:  # invariant subspace: the quadrature is exact, stop
                break
        theta, coords = krylov.ritz()
        m = len(theta)
        nodes[row, :m] = theta
        nodes[row, m:] = theta[-1]
        weights[row, :m] = coords[0, :] ** 2
    return nodes, weights


def broadened_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """(1/n_v) Σ_l Σ_j τ_lj 𝒩(t; θ_lj, σ²) at every t of ``grid`` [g] (Ghorbani et al. 2019, Eq. 7)."""
    gaussians = np.exp(-0.5 * ((grid[None, None, :] - nodes[..., None]) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return np.einsum("lj,ljg->g", weights, gaussians) / nodes.shape[0]


def default_sigma(nodes: np.ndarray) -> float:
    """1 % of the nodes' range (1e-3 when all nodes coincide): the broadening width when none is given."""
    span = float(nodes.max() - nodes.min())
    return 0.01 * span if span > 0 else 1e-3


def density_grid(nodes: np.ndarray, sigma: float, points: int) -> np.ndarray:
    """``points`` evenly spaced values from the smallest node − 5σ to the largest + 5σ."""
    return np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, _check_positive("grid", points))


def spectral_density(
    operator: Operator,
    *,
    vectors: int = 1,
    steps: int = 80,
    grid: int | Sequence[float] | np.ndarray = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The eigenvalue density of A by stochastic Lanczos quadrature, broadened by a Gaussian of width ``sigma``.

    ``grid``: the evaluation points, or their number (then :func:`density_grid`, so the density integrates to ≈ 1
    when the spacing is well below σ). ``sigma`` in eigenvalue units; default :func:`default_sigma`.
    Returns (grid [g], density [g]).
    """
    nodes, weights = lanczos_quadrature(operator, vectors=vectors, steps=steps, seed=seed)
    sigma = default_sigma(nodes) if sigma is None else sigma
    if not sigma > 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid_values = density_grid(nodes, sigma, grid)
    else:
        grid_values = np.asarray(grid, dtype=np.float64)
        if grid_values.ndim != 1 or len(grid_values) < 2:
            raise ConfigError(
                f"grid must be a number of points or a 1-D array of points, got shape {grid_values.shape}"
            )
    return grid_values, broadened_density(nodes, weights, grid_values, sigma)
