"""The ``hessian`` result of a run: top eigenvalues, trace and spectral density of the loss Hessian at its weights.

The Hessian is that of the mean loss over a :class:`~landscape.models.jobs.DataSelection` of examples, in eval
mode, for the parameters ``params`` selects (:func:`analyses.hessian.name_filter`), through
:class:`analyses.hessian.HessianOperator` (native) or PyHessian (a cross-check backend: eigenvalues and Hutchinson
trace only). The algorithms are :mod:`analyses.spectral`'s. ``docs/hessian.md`` describes the result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.hessian import HessianOperator, name_filter, pyhessian_eigenvalues, pyhessian_trace
from analyses.spectral import (
    broadened_density,
    default_sigma,
    density_grid,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_quadrature,
    thresholds,
)
from landscape.core.errors import ConfigError
from landscape.core.locks import locks_output
from landscape.core.params import content_hash, model_parameters
from landscape.core.results import Result
from landscape.models.jobs import AnalysisJob, DataSelection, evaluation_arrays, evaluation_meta
from landscape.models.planning import Plan, median_seconds
from landscape.models.runs import evaluate_subset, load_run_model

KIND = "hessian"
BACKENDS = ("native", "pyhessian")
TRACE_METHODS = ("hutchinson", "hutchpp", "both")


@dataclass(frozen=True)
class HessianOptions:
    """What to compute. ``which``: LA (largest algebraic, the native default), SA, or LM (largest magnitude, the only
    one PyHessian finds); ``tol``: an eigenpair is converged when ‖Hv − λv‖ ≤ tol·max(|λ|, the largest |eigenvalue|
    seen) (``analyses.spectral.thresholds``); ``max_iter``: Lanczos steps (default max(2k + 20, 40); PyHessian:
    iterations per eigenvalue, 100); ``density_sigma``: the Gaussian broadening in eigenvalue units (default 1 % of
    the nodes' range); ``method``: the Hessian-vector product (``analyses.hessian.HVP_METHODS``)."""

    top_k: int = 5
    which: str | None = None
    tol: float = 1e-3
    max_iter: int | None = None
    trace: bool = False
    trace_method: str = "hutchinson"
    trace_samples: int = 30
    density: bool = False
    density_steps: int = 80
    density_vectors: int = 1
    density_grid: int = 1000
    density_sigma: float | None = None
    backend: str = "native"
    method: str = "auto"
    params: str | None = None

    def resolved_which(self) -> str:
        """The ``which`` to use; refuses what the PyHessian backend cannot do."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.trace_method not in TRACE_METHODS:
            raise ConfigError(f"trace method must be one of {', '.join(TRACE_METHODS)}, got {self.trace_method!r}")
        if self.backend == "native":
            return self.which or "LA"
        if self.which not in (None, "LM"):
            raise ConfigError(
                f"--backend pyhessian finds largest-magnitude eigenvalues only (power iteration); "
                f"got --which {self.which}, expected LM or --backend native"
            )
        if self.density:
            raise ConfigError(
                "--backend pyhessian has no working density: pyhessian 0.1 calls torch.eig, which PyTorch 2 "
                "removed; use --backend native for --density"
            )
        if self.trace and self.trace_method != "hutchinson":
            raise ConfigError(
                f"--backend pyhessian has no Hutch++; got --trace-method {self.trace_method}, expected hutchinson"
            )
        return "LM"

    def identity(
        self, which: str, checkpoint: str, weights: str, data: DataSelection, described: dict[str, Any]
    ) -> dict[str, Any]:
        """Every parameter that determines the values of the result (the format results on disk were keyed by)."""
        density_options = {
            "steps": self.density_steps,
            "vectors": self.density_vectors,
            "grid": self.density_grid,
            "sigma": self.density_sigma,
        }
        return {
            "checkpoint_sha256": checkpoint,
            "weights": weights,
            "data": described,
            "batch_size": data.batch_size,
            "params": self.params,
            "backend": self.backend,
            "method": self.method,
            "top_k": self.top_k,
            "which": which,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "trace": {"method": self.trace_method, "samples": self.trace_samples} if self.trace else None,
            "density": density_options if self.density else None,
            "seed": data.seed,
        }


class _ShowProgress:
    """The operator, printing the number of products done on stderr."""

    def __init__(self, operator: HessianOperator):
        self.operator, self.dim, self.device = operator, operator.dim, operator.device

    def matvec(self, v, out=None):
        out = self.operator.matvec(v, out=out)
        print(f"\rHessian-vector products: {self.operator.matvecs}", end="", file=sys.stderr, flush=True)
        return out


@locks_output()
def compute_hessian(
    run_path: str | Path,
    out: str | Path,
    options: HessianOptions | None = None,
    *,
    data: DataSelection | None = None,
    weights: str = "final",
    overwrite: bool = False,
    progress: bool = False,
    device: str = "cpu",
    checkpoint_every: float = 60.0,
) -> tuple[Result, bool]:
    """The ``hessian`` result of the run's ``weights``, saved to ``out``; returns ``(result, skipped)``.

    Resumable: every estimate (eigenpairs, trace, density, the evaluation) is kept in ``out`` when done, and the
    Lanczos / Hutchinson state every ``checkpoint_every`` seconds; a rerun after a kill continues from there and
    gives bitwise the arrays of an uninterrupted run.

    ``data`` defaults to 128 dev examples drawn with seed 0 (the seed also draws the start and probe vectors).
    A complete result of the same identity in ``out`` is returned as it is; one of other parameters raises
    :class:`ConfigError` unless ``overwrite``. The model is loaded with eager attention (double backward).
    """
    options = options or HessianOptions()
    data = data or DataSelection(split="dev", samples=128)
    which = options.resolved_which()
    parameter_filter = name_filter(options.params)
    run = data.open_run(run_path)
    loaded = load_run_model(run, weights, attn_implementation="eager", device=device)
    model = loaded.model
    subset = data.subset(run, loaded.tokenizer)
    checkpoint = content_hash(model_parameters(model))
    job = AnalysisJob(
        KIND, out, options.identity(which, checkpoint, weights, data, subset.describe()), overwrite=overwrite
    )
    if job.complete is not None:
        return job.complete, True

    operator = HessianOperator(model, subset, parameter_filter=parameter_filter, method=options.method)
    if options.top_k > operator.dim:
        raise ConfigError(f"--top-k {options.top_k} exceeds the {operator.dim} selected parameters")
    shown = _ShowProgress(operator) if progress else operator
    # Each estimate is a unit of the job's progress: a rerun after a kill skips the finished ones and continues
    # Lanczos and Hutchinson from their last kept state (every ``checkpoint_every`` seconds), bitwise.
    store = job.progress(every_seconds=checkpoint_every)
    seed = data.seed

    def keeper(name):
        return lambda state: store.keep(name, state)

    def eigenpairs() -> dict[str, np.ndarray]:
        if options.backend == "native":
            eigen = lanczos(
                shown, options.top_k, which=which, max_iter=options.max_iter, tol=options.tol, seed=seed,
                return_eigenvectors=False, state=store.partial("eigen"), keep=keeper("eigen"),
            )  # fmt: skip
            return {"eigenvalues": eigen.eigenvalues, "residuals": eigen.residuals, "converged": eigen.converged,
                    "matvecs": np.int64(eigen.matvecs)}  # fmt: skip
        values, vectors = pyhessian_eigenvalues(
            model, subset, options.top_k, parameter_filter=parameter_filter, max_iter=options.max_iter or 100,
            tol=options.tol, seed=seed,
        )  # fmt: skip
        # Scored with our operator: the explicit residual of each returned pair.
        residuals = np.array(
            [float((operator.matvec(v) - value * v).norm()) for value, v in zip(values, vectors, strict=True)]
        )
        converged = residuals <= thresholds(options.tol, values, float(np.abs(values).max()))
        return {"eigenvalues": values, "residuals": residuals, "converged": converged,
                "matvecs": np.int64(len(values))}  # fmt: skip

    def hutchinson_trace() -> dict[str, np.ndarray]:
        if options.backend == "pyhessian":
            estimate = pyhessian_trace(
                model, subset, options.trace_samples, parameter_filter=parameter_filter, seed=seed
            )
        else:
            estimate = hutchinson(
                shown, options.trace_samples, seed=seed, state=store.partial("trace"), keep=keeper("trace")
            )
        return {"trace": np.float64(estimate.mean), "trace_se": np.float64(estimate.se),
                "matvecs": np.int64(options.trace_samples)}  # fmt: skip

    def hutchpp_trace() -> dict[str, np.ndarray]:
        plus = hutchpp(shown, options.trace_samples, seed=seed)
        return {"hutchpp_trace": np.float64(plus.mean), "hutchpp_trace_se": np.float64(plus.se),
                "matvecs": np.int64(options.trace_samples)}  # fmt: skip

    def quadrature() -> dict[str, np.ndarray]:
        nodes, node_weights = lanczos_quadrature(
            shown, vectors=options.density_vectors, steps=options.density_steps, seed=seed
        )
        return {"nodes": nodes, "weights": node_weights, "matvecs": np.int64(nodes.size)}

    units: dict[str, dict[str, np.ndarray]] = {}
    units["eigen"] = store.unit("eigen", eigenpairs)
    arrays: dict[str, np.ndarray] = {key: units["eigen"][key] for key in ("eigenvalues", "residuals", "converged")}
    meta: dict[str, Any] = {}
    if options.trace:
        if options.backend == "pyhessian" or options.trace_method != "hutchpp":
            units["trace"] = store.unit("trace", hutchinson_trace)
            arrays.update(trace=units["trace"]["trace"], trace_se=units["trace"]["trace_se"])
        if options.backend != "pyhessian" and options.trace_method in ("hutchpp", "both"):
            units["hutchpp"] = store.unit("hutchpp", hutchpp_trace)
            arrays.update({key: units["hutchpp"][key] for key in ("hutchpp_trace", "hutchpp_trace_se")})

    if options.density:
        units["density"] = store.unit("density", quadrature)
        nodes, node_weights = units["density"]["nodes"], units["density"]["weights"]
        sigma = options.density_sigma or default_sigma(nodes)
        grid = density_grid(nodes, sigma, options.density_grid)
        arrays.update(
            density_grid=grid,
            density=broadened_density(nodes, node_weights, grid, sigma),
            density_nodes=nodes,
            density_weights=node_weights,
        )
        meta["density"] = {
            "steps": options.density_steps,
            "vectors": options.density_vectors,
            "grid": options.density_grid,
            "sigma": sigma,
        }

    if progress:
        print(file=sys.stderr)
    evaluation = store.unit("evaluation", lambda: evaluation_arrays(evaluate_subset(model, subset)))
    meta.update(
        run=run.describe(),
        data=subset.describe(),
        checkpoint_sha256=checkpoint,
        weights=weights,
        which=which,
        top_k=options.top_k,
        tol=options.tol,
        backend=options.backend,
        hvp_method=operator.method,
        parameters={"pattern": options.params, "names": len(operator.parameter_names), "dim": operator.dim},
        trace_method=options.trace_method if options.trace else None,
        trace_samples=options.trace_samples if options.trace else None,
        matvecs=int(sum(int(unit["matvecs"]) for unit in units.values())),
        matvecs_this_session=operator.matvecs,
        # beside --dry-run's estimate: the mean seconds of one product this session (start-up and saves excluded)
        product_seconds_mean=operator.matvec_seconds / operator.matvecs if operator.matvecs else None,
        resumed_units=store.resumed_units,
        **evaluation_meta(evaluation),
    )
    return job.save(arrays, meta), False


def estimate_hessian(
    run_path: str | Path,
    options: HessianOptions | None = None,
    *,
    data: DataSelection | None = None,
    weights: str = "final",
    device: str = "cpu",
    repeats: int = 2,
) -> Plan:
    """The :class:`~landscape.models.planning.Plan` of :func:`compute_hessian` (``--dry-run``): Hessian-vector
    products timed on the run's model and examples, times the products the options ask for at most (Lanczos
    ``max_iter``, its residuals costing none, the trace probes, the density's vectors × steps); nothing is written."""
    options = options or HessianOptions()
    data = data or DataSelection(split="dev", samples=128)
    run = data.open_run(run_path)
    loaded = load_run_model(run, weights, attn_implementation="eager", device=device)
    subset = data.subset(run, loaded.tokenizer)
    operator = HessianOperator(
        loaded.model, subset, parameter_filter=name_filter(options.params), method=options.method
    )
    k = options.top_k
    lanczos_steps = options.max_iter or min(operator.dim, max(2 * k + 20, 40))
    products = lanczos_steps
    if options.trace:
        products += options.trace_samples * (2 if options.trace_method == "both" else 1)
    if options.density:
        products += options.density_vectors * options.density_steps
    vector = torch.ones(operator.dim, dtype=torch.float64, device=operator.device)  # any vector: the cost is the same
    per_product = median_seconds(lambda: operator.matvec(vector), repeats)
    operator.release()
    what = f"Hessian of {run.path} ({operator.dim} parameters, {len(subset)} examples)"
    return Plan(what, "Hessian-vector products", products, per_product, repeats, bound=True)
