"""Sharpness of a solution θ on a fixed, seeded evaluation subset: worst-case, adaptive, average and per-instance.

Every metric is a loss increase over ``L(θ) = (1/N) Σ_i l_i(θ)``, the mean per-example loss of the subset
(:func:`landscape.data.losses.per_example_loss_from_logits`: cross-entropy, squared error for regression), each example
weighted equally whatever the batch sizes, the model in eval mode (dropout off). The model is evaluated through
``torch.func.functional_call`` on parameter dicts, so its weights and ``.grad`` fields are never written; its
train/eval flags (and the ``requires_grad`` flags, switched on only while the summary computes the Fisher) are
restored on exit, also after an exception. Parameters are all of ``named_parameters()`` (tied weights once), or those
a ``parameter_filter(name)`` selects; one global L2 norm over them all.

* ε-sharpness (Foret et al. 2021, SAM; FSAM Eqs. 1–4): ``max_{‖ε‖₂ ≤ ρ} L(θ + ε) − L(θ)``, estimated by
  (a) one ascent step ``ε = ρ g/‖g‖``, g = ∇L(θ) (FSAM Eq. 4, δ-SAM §2.1), and (b) projected gradient ascent started
  from that step: ``ε ← Π_ρ(ε + α ∇L(θ+ε)/‖∇L(θ+ε)‖)``, Π_ρ the projection onto the ball, keeping the largest value
  seen, so (b) ≥ (a) always. A zero gradient gives ε = 0 and a sharpness of exactly 0.
* adaptive sharpness (Kwon et al. 2021, ASAM, as the ``asam`` variant's ``optimizers.pieces.WeightScaled`` has it):
  the same maximum over the normalised ball ``‖T⁻¹ε‖₂ ≤ ρ`` with ``T = |θ| + η`` element-wise (η = 0.01); the one
  step is ``ε = ρ T²g / ‖Tg‖``; the projected ascent runs in the normalised variable ``u = T⁻¹ε`` (gradient ``T∇L``).
* average sharpness: ``E_δ[L(θ + δ)] − L(θ)``, δ ~ N(0, σ²I), the Monte-Carlo mean over seeded draws and its
  standard error ``std/√M`` (NaN for a single draw). For a quadratic it is ``½σ² tr(H)``.
* per-instance sharpness (δ-SAM §2.2, the terms of R_inst): ``s_i = max_{‖ε_i‖ ≤ ρ} l_i(θ + ε_i) − l_i(θ)``, each
  instance with its own perturbation, estimated as the paper does for Eq. 2 by one ascent step on the instance alone,
  ``ε_i = ρ ∇l_i/‖∇l_i‖``. It is the quantity δ-SAM's guardedness estimates for its reweighting; δ-SAM's cheap
  estimator itself (Eq. 3, a random direction shared by the batch) is :func:`random_probe_guardedness`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad_and_value, vmap

from landscape.core.errors import ConfigError
from landscape.core.locks import locks_output
from landscape.core.params import Params, combine, content_hash, model_parameters, norm
from landscape.core.results import Result
from landscape.models.evaluation import batch_losses, example_loss_function, outputs_over
from landscape.models.jobs import AnalysisJob, DataSelection, NoProgress, Progress, evaluation_arrays, evaluation_meta
from landscape.models.runs import EvalSubset, evaluate_subset, load_run_model
from landscape.models.state import eval_mode

ADAPTIVE_ETA = 0.01  # ASAM's η, also the default of optimizers.pieces.WeightScaled
DEFAULT_PGD_STEPS = 10
PGD_STEP_SCALE = 2.5  # default step α = 2.5·ρ / steps (Madry et al. 2018): the walk can cross the ball


# ------------------------------------------------------------------------------------------------------------------
# The objective


class SubsetLoss:
    """``L(θ) = (1/N) Σ_i l_i(θ)`` over the examples of ``subset``, for parameter dicts θ.

    ``theta`` holds the model's current parameters (detached, sharing storage, never written); a ``params`` argument
    of ``None`` means θ. Losses are accumulated in float64. The value and gradient at θ are computed once and cached
    (:meth:`at_theta`); the model must not change while the object is in use.
    """

    def __init__(
        self, model: nn.Module, subset: EvalSubset, *, parameter_filter: Callable[[str], bool] | None = None
    ) -> None:
        if len(subset) == 0 or not subset.batches:
            raise ConfigError("the evaluation subset is empty; expected at least one example")
        self.model = model
        self.subset = subset
        self.theta: Params = {
            name: p.detach()
            for name, p in model_parameters(model).items()
            if parameter_filter is None or parameter_filter(name)
        }
        if not self.theta:
            raise ConfigError("the parameter filter selects no parameter; expected at least one")
        floating = [name for name, t in self.theta.items() if not t.is_floating_point()]
        if floating:
            raise ConfigError(f"parameter {floating[0]} is not floating point; sharpness needs real parameters")
        self.device = next(iter(self.theta.values())).device
        self._cached: tuple[float, Params] | None = None
        self._cached_loss: float | None = None

    def __len__(self) -> int:
        return len(self.subset)

    def _batches(self):
        for batch in self.subset.batches:
            yield {key: value.to(self.device) for key, value in batch.items()}

    def per_example_losses(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``l_i(params)`` for every example of the subset, in its order, float64 [N]."""
        return outputs_over(self.model, self._batches(), self.theta if params is None else params)[1]

    def loss(self, params: Mapping[str, torch.Tensor] | None = None) -> float:
        """``L(params)``, the mean of :meth:`per_example_losses`."""
        return float(self.per_example_losses(params).mean())

    def loss_and_gradient(self, params: Mapping[str, torch.Tensor] | None = None) -> tuple[float, Params]:
        """``(L(params), ∇L(params))``; the gradient is float64, keyed like ``theta``. ``.grad`` is not touched."""
        params = self.theta if params is None else params
        leaves = {name: t.detach().requires_grad_(True) for name, t in params.items()}
        total = 0.0
        gradient = {name: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for name, t in leaves.items()}
        with eval_mode(self.model), torch.enable_grad():
            for batch in self._batches():
                losses = batch_losses(self.model, batch, leaves)
                total += float(losses.detach().double().sum())
                # Each batch's sum divided by N: every example weighs 1/N, whatever the batch sizes
                # (docs/pitfalls.md §10).
                parts = torch.autograd.grad(losses.sum() / len(self), list(leaves.values()), allow_unused=True)
                for name, part in zip(leaves, parts, strict=True):
                    if part is not None:
                        gradient[name].add_(part.double())
        return total / len(self), gradient

    def at_theta(self) -> tuple[float, Params]:
        """``(L(θ), ∇L(θ))``, computed once."""
        if self._cached is None:
            self._cached = self.loss_and_gradient()
            self._cached_loss = self._cached[0]
        return self._cached

    def loss_at_theta(self) -> float:
        """``L(θ)``, computed once (without a gradient unless :meth:`at_theta` ran)."""
        if self._cached_loss is None:
            self._cached_loss = self.loss()
        return self._cached_loss


# ------------------------------------------------------------------------------------------------------------------
# Worst case in a ball: ε-sharpness and adaptive sharpness


@dataclass(frozen=True)
class WorstCaseSharpness:
    """Loss increases at radius ``rho``: ``ascent`` after the one ascent step, ``pgd`` the best of the projected ascent.

    ``perturbation_norm`` is ‖ε‖₂ in parameter space of the point that gave ``pgd``; ``steps`` and ``step_size`` (α,
    in the units of the ball) describe the ascent; ``adaptive`` says whether the ball is ASAM's, with ``eta``.
    """

    rho: float
    ascent: float
    pgd: float
    perturbation_norm: float
    steps: int
    step_size: float
    adaptive: bool
    eta: float | None


def epsilon_sharpness(
    objective: SubsetLoss, rho: float, *, steps: int = DEFAULT_PGD_STEPS, step_size: float | None = None
) -> WorstCaseSharpness:
    """ε-sharpness ``max_{‖ε‖₂≤ρ} L(θ+ε) − L(θ)``: one SAM step ``ε = ρg/‖g‖`` and ``steps`` projected ascent steps.

    ``step_size`` α (default ``2.5ρ/steps``) is the L2 length of each normalised-gradient step before projection.
    """
    return _projected_ascent(objective, rho, scale=None, steps=steps, step_size=step_size, eta=None)


def adaptive_sharpness(
    objective: SubsetLoss,
    rho: float,
    *,
    eta: float = ADAPTIVE_ETA,
    steps: int = DEFAULT_PGD_STEPS,
    step_size: float | None = None,
) -> WorstCaseSharpness:
    """ASAM's adaptive sharpness ``max_{‖T⁻¹ε‖₂≤ρ} L(θ+ε) − L(θ)``, ``T = |θ| + η`` element-wise.

    One step ``ε = ρT²g/‖Tg‖`` (as the ``asam`` variant, :class:`optimizers.pieces.WeightScaled`), then projected
    ascent in ``u = T⁻¹ε``: ``u ← Π_ρ(u + α Tg/‖Tg‖)``. ``step_size`` α is in u's units (default ``2.5ρ/steps``).
    """
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"eta must be a finite number >= 0, got {eta!r}")
    scale = {name: t.detach().double().abs() + float(eta) for name, t in objective.theta.items()}
    return _projected_ascent(objective, rho, scale=scale, steps=steps, step_size=step_size, eta=float(eta))


def _projected_ascent(
    objective: SubsetLoss,
    rho: float,
    *,
    scale: Params | None,
    steps: int,
    step_size: float | None,
    eta: float | None,
) -> WorstCaseSharpness:
    """Normalised-gradient ascent on u with ε = T·u (T = 1 without ``scale``), ‖u‖ ≤ ρ, from the one-step point."""
    rho = _check_radius(rho, "rho")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"PGD steps must be an integer >= 0, got {steps!r}")
    alpha = PGD_STEP_SCALE * rho / max(steps, 1) if step_size is None else _check_radius(step_size, "step size")
    loss0, gradient = objective.at_theta()

    def report(ascent: float, pgd: float, eps_norm: float) -> WorstCaseSharpness:
        return WorstCaseSharpness(rho, ascent, pgd, eps_norm, steps, alpha, scale is not None, eta)

    def to_epsilon(u: Params) -> Params:
        return dict(u) if scale is None else {name: scale[name] * value for name, value in u.items()}

    def ascent_direction(g: Params) -> tuple[Params, float]:  # ∇_u L = T·g and its norm
        scaled = g if scale is None else {name: scale[name] * value for name, value in g.items()}
        return scaled, norm(scaled)

    direction, length = ascent_direction(gradient)
    if rho == 0.0 or length == 0.0 or not math.isfinite(length):
        # No first-order ascent direction: at a stationary point ε = 0 and nothing rises; a non-finite gradient: NaN.
        flat = 0.0 if math.isfinite(length) else math.nan
        return report(flat, flat, 0.0)
    u = {name: value * (rho / length) for name, value in direction.items()}
    epsilon = to_epsilon(u)
    if steps == 0:
        ascent = objective.loss(combine(objective.theta, [(1.0, epsilon)])) - loss0
        return report(ascent, ascent, norm(epsilon))
    value, g = objective.loss_and_gradient(combine(objective.theta, [(1.0, epsilon)]))
    ascent = best = value - loss0
    best_norm = norm(epsilon)
    for step in range(1, steps + 1):
        direction, length = ascent_direction(g)
        if length == 0.0 or not math.isfinite(length) or math.isnan(best):
            break  # a stationary point of the ascent, or a diverged loss (reported as is)
        u = {name: coordinate + (alpha / length) * direction[name] for name, coordinate in u.items()}
        radius = norm(u)
        if radius > rho:  # Π_ρ: back onto the sphere along the ray
            u = {name: coordinate * (rho / radius) for name, coordinate in u.items()}
        epsilon = to_epsilon(u)
        point = combine(objective.theta, [(1.0, epsilon)])
        if step < steps:
            value, g = objective.loss_and_gradient(point)
        else:
            value = objective.loss(point)
        increase = value - loss0
        if math.isnan(increase) or increase > best:
            best, best_norm = increase, norm(epsilon)
    return report(ascent, best, best_norm)


# ------------------------------------------------------------------------------------------------------------------
# Average sharpness under Gaussian perturbations


@dataclass(frozen=True)
class AverageSharpness:
    """``mean`` of ``L(θ+δ_m) − L(θ)`` over the ``values`` [M] of M draws δ_m ~ N(0, σ²I), and its standard error."""

    sigma: float
    mean: float
    se: float
    values: np.ndarray


def gaussian_draw(theta: Mapping[str, torch.Tensor], generator: torch.Generator) -> Params:
    """One standard normal tensor per parameter (float32, drawn on the CPU in ``theta``'s order, then moved)."""
    return {
        name: torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device) for name, t in theta.items()
    }


def average_sharpness(objective: SubsetLoss, sigma: float, *, samples: int = 8, seed: int = 0) -> AverageSharpness:
    """``E_δ[L(θ+δ)] − L(θ)``, δ = σ z, z ~ N(0, I), estimated from ``samples`` draws seeded with ``seed``.

    The same seed gives the same z for every σ (common random numbers: a curve over σ is smooth). Standard error
    ``std(ddof=1)/√M``; NaN when ``samples`` is 1.
    """
    sigma = _check_radius(sigma, "sigma")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"the number of Gaussian draws must be a positive integer, got {samples!r}")
    loss0 = objective.loss_at_theta()
    generator = torch.Generator().manual_seed(int(seed))
    values = np.empty(samples, dtype=np.float64)
    for m in range(samples):
        z = gaussian_draw(objective.theta, generator)
        values[m] = 0.0 if sigma == 0 else objective.loss(combine(objective.theta, [(sigma, z)])) - loss0
    se = float(values.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.nan
    return AverageSharpness(sigma=sigma, mean=float(values.mean()), se=se, values=values)


# ------------------------------------------------------------------------------------------------------------------
# Per-instance sharpness (δ-SAM)


def instance_sharpness(
    model: nn.Module,
    subset: EvalSubset,
    rho: float,
    *,
    parameter_filter: Callable[[str], bool] | None = None,
    chunk_size: int = 8,
) -> np.ndarray:
    """Per-instance sharpness ``s_i = l_i(θ + ρ∇l_i/‖∇l_i‖) − l_i(θ)``, float64 [N] in the subset's order.

    δ-SAM §2.2: the terms ``max_{‖ε_i‖≤ρ} l_i(θ+ε_i) − l_i(θ)`` of R_inst, each instance with its own perturbation
    from one ascent step on the instance alone (Eq. 2), the quantity δ-SAM's guardedness estimates. An example with a
    zero gradient has s_i = 0. Vectorised with ``torch.func`` over ``chunk_size`` examples: memory grows with
    ``2 × chunk_size × number of parameters``. Each example is its batch's row as collated (with its padding).
    """
    rho = _check_radius(rho, "rho")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    objective = SubsetLoss(model, subset, parameter_filter=parameter_filter)
    theta = objective.theta
    dtype = next(iter(theta.values())).dtype

    example_loss = example_loss_function(model, dtype)
    gradients_and_losses = vmap(grad_and_value(example_loss), in_dims=(None, 0))
    perturbed_losses = vmap(example_loss, in_dims=(0, 0))
    values: list[torch.Tensor] = []
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        # SDPA on CPU has no vmap batching rule: torch loops over it and says so at every call; the values are right.
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        for batch in objective._batches():
            size = batch["labels"].shape[0]
            for start in range(0, size, chunk_size):
                chunk = {key: value[start : start + chunk_size] for key, value in batch.items()}
                grads, at_theta = gradients_and_losses(dict(theta), chunk)
                squared = sum(g.double().square().flatten(1).sum(dim=1) for g in grads.values())
                lengths = squared.sqrt()  # ‖∇l_i‖ over all parameters, [C]
                factor = torch.where(lengths > 0, rho / lengths.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
                points = {  # θ + ε_i for every example i of the chunk, [C, *shape], rounded once from float64
                    name: (t.double() + _expand(factor, grads[name]) * grads[name].double()).to(t.dtype)
                    for name, t in theta.items()
                }
                after = perturbed_losses(points, chunk)
                increase = after.double() - at_theta.double()
                values.append(torch.where(lengths > 0, increase, 0.0).cpu())
    return torch.cat(values).numpy()


def _expand(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, *([1] * (like.ndim - 1)))


def random_probe_guardedness(objective: SubsetLoss, rho: float, *, seed: int = 0) -> np.ndarray:
    """δ-SAM Eq. 3: ``a_j = l_j(θ + ρ ê/‖ê‖) − l_j(θ)``, ê ~ N(0, I) seeded, one direction for all examples, [N]."""
    rho = _check_radius(rho, "rho")
    direction = gaussian_draw(objective.theta, torch.Generator().manual_seed(int(seed)))
    length = norm(direction)
    if rho == 0 or length == 0:
        return np.zeros(len(objective), dtype=np.float64)
    at_theta = objective.per_example_losses()
    return (objective.per_example_losses(combine(objective.theta, [(rho / length, direction)])) - at_theta).numpy()


# ------------------------------------------------------------------------------------------------------------------
# The sharpness result


def sharpness_result(
    model: nn.Module,
    subset: EvalSubset,
    *,
    rho: Sequence[float],
    sigma: Sequence[float],
    pgd_steps: int = DEFAULT_PGD_STEPS,
    pgd_step_size: float | None = None,
    gaussian_samples: int = 8,
    eta: float = ADAPTIVE_ETA,
    instance_rho: float | None = None,
    top_k: int = 0,
    trace_samples: int = 0,
    seed: int = 0,
    parameter_filter: Callable[[str], bool] | None = None,
    chunk_size: int = 8,
    progress: bool = False,
    store: Progress | None = None,
) -> Result:
    """Every sharpness metric of ``model`` on ``subset`` as one ``sharpness`` :class:`Result` (docs/results.md).

    Arrays: ``rho`` [R], ``eps_sharpness_ascent``, ``eps_sharpness_pgd``, ``adaptive_sharpness`` (projected ascent)
    and ``adaptive_sharpness_ascent`` (one step) [R]; ``sigma`` [S], ``average_sharpness``, ``average_sharpness_se``
    [S]; ``instance_sharpness`` and ``instance_probe`` (δ-SAM Eq. 3) [N] at ``instance_rho`` (default ``rho[0]``);
    with ``top_k`` > 0 ``eigenvalues``, ``eigenvalue_residuals``, ``eigenvalue_converged`` [k] (Lanczos, largest
    algebraic); with ``trace_samples`` > 0 ``trace``, ``trace_se`` (Hutchinson). The Hessian needs the model loaded
    with eager attention. ``pgd_step_size`` is a fraction of each ρ (default 2.5/steps). Meta: ``loss``, ``metric``,
    ``metric_name``, ``fisher_trace`` (Σ of the empirical Fisher diagonal, FSAM Eq. 9), ``conventions``,
    ``checkpoint_sha256``, ``data``, ``wall_time_s``. The model is left as it was.

    ``store``: a job's :class:`~landscape.models.jobs.Progress`; every metric is a unit of it (and Lanczos and
    Hutchinson keep their partial state), so a rerun after a kill skips what was done, bitwise.
    """
    from tqdm.auto import tqdm

    from analyses.fisher_distribution import fisher_diagonal

    rhos = _check_values(rho, "rho")
    sigmas = _check_values(sigma, "sigma")
    instance_rho = rhos[0] if instance_rho is None else _check_radius(instance_rho, "instance rho")
    for value, what in ((top_k, "top_k"), (trace_samples, "trace_samples")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{what} must be an integer >= 0, got {value!r}")
    if pgd_step_size is not None:
        _check_radius(pgd_step_size, "PGD step size")
    started = time.perf_counter()
    store = NoProgress() if store is None else store
    objective = SubsetLoss(model, subset, parameter_filter=parameter_filter)
    total_tasks = 2 * len(rhos) + len(sigmas) + 3 + (top_k > 0) + (trace_samples > 0)
    bar = tqdm(total=total_tasks, disable=not progress, desc="sharpness", unit="metric")

    def counted(name, compute):  # one tick of the bar per unit, computed or found done
        arrays = store.unit(name, compute)
        bar.update()
        return arrays

    try:
        evaluation = evaluation_meta(counted("evaluation", lambda: evaluation_arrays(evaluate_subset(model, subset))))
        ascent, pgd, adaptive, adaptive_one = [], [], [], []
        for i, r in enumerate(rhos):
            step = None if pgd_step_size is None else pgd_step_size * r

            def plain_unit(r=r, step=step):
                plain = epsilon_sharpness(objective, r, steps=pgd_steps, step_size=step)
                return {"ascent": np.float64(plain.ascent), "pgd": np.float64(plain.pgd)}

            def scaled_unit(r=r, step=step):
                scaled = adaptive_sharpness(objective, r, eta=eta, steps=pgd_steps, step_size=step)
                return {"pgd": np.float64(scaled.pgd), "ascent": np.float64(scaled.ascent)}

            plain = counted(f"epsilon-{i}", plain_unit)
            ascent.append(float(plain["ascent"]))
            pgd.append(float(plain["pgd"]))
            scaled = counted(f"adaptive-{i}", scaled_unit)
            adaptive.append(float(scaled["pgd"]))
            adaptive_one.append(float(scaled["ascent"]))
        averages = []
        for i, s in enumerate(sigmas):

            def average_unit(s=s):
                average = average_sharpness(objective, s, samples=gaussian_samples, seed=seed)
                return {"mean": np.float64(average.mean), "se": np.float64(average.se)}

            averages.append(counted(f"average-{i}", average_unit))

        def instance_unit():
            return {
                "sharpness": instance_sharpness(
                    model, subset, instance_rho, parameter_filter=parameter_filter, chunk_size=chunk_size
                ),
                "probe": random_probe_guardedness(objective, instance_rho, seed=seed),
            }

        per_instance = counted("instance", instance_unit)

        def fisher_unit():
            fisher = fisher_diagonal(model, subset.batches, parameter_filter=parameter_filter)
            trace = float(sum(float(v.double().sum()) for v in fisher.diagonal.values()))
            return {"trace": np.float64(trace), "mode": np.asarray(fisher.mode)}

        fisher = counted("fisher", fisher_unit)
        arrays: dict[str, np.ndarray] = {
            "rho": np.asarray(rhos, dtype=np.float64),
            "eps_sharpness_ascent": np.asarray(ascent, dtype=np.float64),
            "eps_sharpness_pgd": np.asarray(pgd, dtype=np.float64),
            "adaptive_sharpness": np.asarray(adaptive, dtype=np.float64),
            "adaptive_sharpness_ascent": np.asarray(adaptive_one, dtype=np.float64),
            "sigma": np.asarray(sigmas, dtype=np.float64),
            "average_sharpness": np.asarray([float(a["mean"]) for a in averages], dtype=np.float64),
            "average_sharpness_se": np.asarray([float(a["se"]) for a in averages], dtype=np.float64),
            "instance_sharpness": per_instance["sharpness"],
            "instance_probe": per_instance["probe"],
        }
        arrays.update(_hessian_arrays(model, subset, top_k, trace_samples, seed, parameter_filter, bar, store))
    finally:
        bar.close()
    meta = {
        **evaluation,
        "fisher_trace": float(fisher["trace"]),
        "fisher_mode": str(fisher["mode"]),
        "conventions": {
            "loss": "mean per-example loss over the subset (cross-entropy; squared error for regression), eval mode",
            "pgd_steps": pgd_steps,
            "pgd_step_size": "2.5/steps of rho" if pgd_step_size is None else f"{pgd_step_size} of rho",
            "pgd_start": "the one-step SAM point; best value kept",
            "gaussian_samples": gaussian_samples,
            "gaussian_seed": seed,
            "adaptive_eta": float(eta),
            "adaptive_scale": "T = |theta| + eta, elementwise",
            "instance_rho": instance_rho,
            "instance_sharpness": "l_i(theta + rho g_i/|g_i|) - l_i(theta), per-example gradient g_i",
            "instance_probe": "delta-SAM Eq. 3 with one seeded Gaussian direction",
            "hessian": {"which": "LA", "top_k": top_k, "trace_samples": trace_samples, "seed": seed},
            "parameters": "all named parameters" if parameter_filter is None else "filtered",
        },
        "num_parameters": int(sum(t.numel() for t in objective.theta.values())),
        "checkpoint_sha256": content_hash(model_parameters(model)),
        "data": subset.describe(),
        "wall_time_s": time.perf_counter() - started,
        "resumed_units": store.resumed_units,
    }
    return Result("sharpness", arrays, meta)


def _hessian_arrays(model, subset, top_k, trace_samples, seed, parameter_filter, bar, store) -> dict[str, np.ndarray]:
    """Top eigenvalues (Lanczos, largest algebraic) and Hutchinson trace of the :mod:`analyses.hessian` operator."""
    if top_k == 0 and trace_samples == 0:
        return {}
    from analyses.hessian import HessianOperator
    from analyses.spectral import hutchinson, lanczos

    operator = HessianOperator(model, subset, parameter_filter=parameter_filter)

    def keeper(name):
        return lambda state: store.keep(name, state)

    def eigen_unit():
        eigen = lanczos(operator, top_k, which="LA", seed=seed, state=store.partial("eigen"), keep=keeper("eigen"))
        return {
            "eigenvalues": np.asarray(eigen.eigenvalues, dtype=np.float64),
            "eigenvalue_residuals": np.asarray(eigen.residuals, dtype=np.float64),
            "eigenvalue_converged": np.asarray(eigen.converged, dtype=bool),
        }

    def trace_unit():
        estimate = hutchinson(operator, trace_samples, seed=seed, state=store.partial("trace"), keep=keeper("trace"))
        return {
            "trace": np.asarray(float(estimate.mean), dtype=np.float64),
            "trace_se": np.asarray(float(estimate.se), dtype=np.float64),
        }

    arrays: dict[str, np.ndarray] = {}
    try:
        if top_k > 0:
            arrays.update(store.unit("eigen", eigen_unit))
            bar.update()
        if trace_samples > 0:
            arrays.update(store.unit("trace", trace_unit))
            bar.update()
    finally:
        operator.release()  # the kept first-order graphs hold a gradient's worth of memory per batch
    return arrays


@locks_output()
def compute_sharpness(
    run_path: str | Path,
    out: str | Path,
    *,
    rho: Sequence[float],
    sigma: Sequence[float],
    pgd_steps: int = DEFAULT_PGD_STEPS,
    pgd_step_size: float | None = None,
    gaussian_samples: int = 8,
    eta: float = ADAPTIVE_ETA,
    instance_rho: float | None = None,
    top_k: int = 0,
    trace_samples: int = 0,
    data: DataSelection | None = None,
    weights: str = "final",
    overwrite: bool = False,
    progress: bool = False,
    device: str = "cpu",
    checkpoint_every: float = 60.0,
) -> tuple[Result, bool]:
    """Load the run's ``weights``, compute :func:`sharpness_result` and save it to ``out``; ``(result, skipped)``.

    Resumable: each metric is kept in ``out`` when done (Lanczos / Hutchinson state every ``checkpoint_every``
    seconds); a rerun after a kill gives bitwise the arrays of an uninterrupted run.

    ``data`` defaults to 256 training examples drawn with seed 0; its seed also seeds the random draws.

    A complete result of the same parameters already in ``out`` is returned as it is (``skipped`` True); one of other
    parameters raises :class:`ConfigError` unless ``overwrite``. The model is loaded with eager attention when the
    Hessian is asked for (double backward).
    """
    rhos, sigmas = _check_values(rho, "rho"), _check_values(sigma, "sigma")
    data = data or DataSelection(split="train", samples=256)
    seed = data.seed
    run = data.open_run(run_path)
    needs_hessian = top_k > 0 or trace_samples > 0
    loaded = load_run_model(run, weights, attn_implementation="eager" if needs_hessian else None, device=device)
    subset = data.subset(run, loaded.tokenizer)
    checkpoint = content_hash(model_parameters(loaded.model))
    identity = {
        "kind": "sharpness",
        "weights": weights,
        "checkpoint_sha256": checkpoint,
        "data": subset.describe(),
        "rho": rhos,
        "sigma": sigmas,
        "pgd_steps": pgd_steps,
        "pgd_step_size": pgd_step_size,
        "gaussian_samples": gaussian_samples,
        "eta": float(eta),
        "instance_rho": rhos[0] if instance_rho is None else float(instance_rho),
        "top_k": top_k,
        "trace_samples": trace_samples,
        "seed": seed,
    }
    job = AnalysisJob("sharpness", out, identity, overwrite=overwrite)
    if job.complete is not None:
        return job.complete, True
    result = sharpness_result(
        loaded.model,
        subset,
        rho=rhos,
        sigma=sigmas,
        pgd_steps=pgd_steps,
        pgd_step_size=pgd_step_size,
        gaussian_samples=gaussian_samples,
        eta=eta,
        instance_rho=instance_rho,
        top_k=top_k,
        trace_samples=trace_samples,
        seed=seed,
        progress=progress,
        store=job.progress(every_seconds=checkpoint_every),
    )
    meta = {**result.meta, "run": run.describe(), "weights": weights}
    return job.save(result.arrays, meta), False


# ------------------------------------------------------------------------------------------------------------------
# Checks


def _check_radius(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value}")
    return value


def _check_values(values: Sequence[float], what: str) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    values = [_check_radius(v, what) for v in values]
    if not values:
        raise ConfigError(f"expected at least one value of {what}")
    return values
