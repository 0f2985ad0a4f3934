"""``landscape hessian RUN``: top eigenvalues, trace and spectral density of the loss Hessian at a run's weights."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from analyses.hessian import HVP_METHODS, HessianOperator, name_filter, pyhessian_eigenvalues, pyhessian_trace
from analyses.spectral import (
    WHICH,
    broadened_density,
    default_sigma,
    density_grid,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_quadrature,
)
from landscape.cli.common import add_data_arguments, add_output_arguments, positive_int, run_from_args
from landscape.core.errors import ConfigError
from landscape.core.params import content_hash, model_parameters
from landscape.core.results import Result, resume_or_start, save_result
from landscape.models.runs import WEIGHTS, evaluate_subset, load_run_model, select_subset

KIND = "hessian"
BACKENDS = ("native", "pyhessian")
TRACE_METHODS = ("hutchinson", "hutchpp", "both")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hessian",
        help="Hessian eigenvalues, trace and spectral density of a run",
        description="The Hessian of the mean loss over a fixed, seeded subset of examples, in eval mode, at a run's "
        "weights: top-k eigenvalues by Lanczos with explicit residuals, Hutchinson / Hutch++ trace, and the spectral "
        "density by stochastic Lanczos quadrature. The model is loaded with eager attention (double backward).",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory written by landscape train")
    parser.add_argument("--weights", choices=WEIGHTS, default="final", help="final (θ1, default) or init (θ0)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="number of eigenvalues (default 5)")
    parser.add_argument(
        "--which",
        choices=WHICH,
        help="LA largest algebraic (default, native), SA smallest algebraic, LM largest magnitude "
        "(the only one PyHessian's power iteration finds, and its default)",
    )
    parser.add_argument(
        "--tol",
        type=positive_float,
        default=1e-3,
        help="eigenpair converged when ‖Hv − λv‖ ≤ tol·max(1, |λ|) (default 1e-3)",
    )
    parser.add_argument(
        "--max-iter",
        type=positive_int,
        help="Lanczos steps (default max(2k + 20, 40)); PyHessian: iterations per eigenvalue (100)",
    )
    parser.add_argument("--trace", action="store_true", help="estimate the trace")
    parser.add_argument(
        "--trace-method",
        choices=TRACE_METHODS,
        default="hutchinson",
        help="Hutchinson (trace, trace_se), Hutch++ (hutchpp_trace) or both (default hutchinson)",
    )
    parser.add_argument(
        "--trace-samples",
        type=positive_int,
        default=30,
        help="Hutchinson vectors, and Hutch++'s budget of products (default 30)",
    )
    parser.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    parser.add_argument("--density-steps", type=positive_int, default=80, help="Lanczos steps per vector (80)")
    parser.add_argument("--density-vectors", type=positive_int, default=1, help="random start vectors (1)")
    parser.add_argument("--density-grid", type=positive_int, default=1000, help="grid points (1000)")
    parser.add_argument(
        "--density-sigma",
        type=positive_float,
        help="Gaussian broadening width in eigenvalue units (default 1%% of the nodes' range)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="native",
        help="native (ours) or pyhessian (cross-check: eigenvalues and Hutchinson trace only)",
    )
    parser.add_argument("--method", choices=HVP_METHODS, default="auto", help="Hessian-vector product (default auto)")
    parser.add_argument(
        "--params",
        metavar="REGEX",
        help="only the parameters whose name matches (re.search), e.g. 'classifier|encoder.layer.5'",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="examples per batch (default 32)")
    add_data_arguments(parser, samples=128)
    add_output_arguments(parser)
    parser.set_defaults(run=run)


class _ShowProgress:
    """The operator, printing the number of products done on stderr (``--progress``)."""

    def __init__(self, operator: HessianOperator):
        self.operator, self.dim, self.device = operator, operator.dim, operator.device

    def matvec(self, v):
        out = self.operator.matvec(v)
        print(f"\rHessian-vector products: {self.operator.matvecs}", end="", file=sys.stderr, flush=True)
        return out


def _check_backend(args: argparse.Namespace) -> str:
    """The ``which`` to use; refuses what the PyHessian backend cannot do."""
    if args.backend == "native":
        return args.which or "LA"
    if args.which not in (None, "LM"):
        raise ConfigError(
            f"--backend pyhessian finds largest-magnitude eigenvalues only (power iteration); "
            f"got --which {args.which}, expected LM or --backend native"
        )
    if args.density:
        raise ConfigError(
            "--backend pyhessian has no working density: pyhessian 0.1 calls torch.eig, which PyTorch 2 "
            "removed; use --backend native for --density"
        )
    if args.trace and args.trace_method != "hutchinson":
        raise ConfigError(
            f"--backend pyhessian has no Hutch++; got --trace-method {args.trace_method}, expected hutchinson"
        )
    return "LM"


def identity_of(args: argparse.Namespace, which: str, checkpoint: str, data: dict[str, Any]) -> dict[str, Any]:
    """Every parameter that determines the values of the result."""
    density_options = {
        "steps": args.density_steps,
        "vectors": args.density_vectors,
        "grid": args.density_grid,
        "sigma": args.density_sigma,
    }
    return {
        "checkpoint_sha256": checkpoint,
        "weights": args.weights,
        "data": data,
        "batch_size": args.batch_size,
        "params": args.params,
        "backend": args.backend,
        "method": args.method,
        "top_k": args.top_k,
        "which": which,
        "tol": args.tol,
        "max_iter": args.max_iter,
        "trace": {"method": args.trace_method, "samples": args.trace_samples} if args.trace else None,
        "density": density_options if args.density else None,
        "seed": args.seed,
    }


def run(args: argparse.Namespace) -> int:
    which = _check_backend(args)
    parameter_filter = name_filter(args.params)
    analysed = run_from_args(args.run_dir, args)
    loaded = load_run_model(analysed, args.weights, attn_implementation="eager")
    model = loaded.model
    subset = select_subset(
        analysed, loaded.tokenizer, split=args.split, samples=args.samples, seed=args.seed, batch_size=args.batch_size
    )
    checkpoint = content_hash(model_parameters(model))
    identity = identity_of(args, which, checkpoint, subset.describe())
    out = Path(args.out)
    existing = resume_or_start(out, KIND, identity, overwrite=args.overwrite)
    if existing is not None and existing.meta.get("complete"):
        print(f"{out}: complete with these parameters, nothing to do")
        return 0

    started = time.perf_counter()
    operator = HessianOperator(model, subset, parameter_filter=parameter_filter, method=args.method)
    if args.top_k > operator.dim:
        raise ConfigError(f"--top-k {args.top_k} exceeds the {operator.dim} selected parameters")
    shown_operator = _ShowProgress(operator) if args.progress else operator
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    if args.backend == "native":
        eigen = lanczos(
            shown_operator,
            args.top_k,
            which=which,
            max_iter=args.max_iter,
            tol=args.tol,
            seed=args.seed,
            return_eigenvectors=False,
        )
        eigenvalues, residuals, converged = eigen.eigenvalues, eigen.residuals, eigen.converged
    else:
        eigenvalues, vectors = pyhessian_eigenvalues(
            model,
            subset,
            args.top_k,
            parameter_filter=parameter_filter,
            max_iter=args.max_iter or 100,
            tol=args.tol,
            seed=args.seed,
        )
        # Scored with our operator: the explicit residual of each returned pair.
        residuals = np.array(
            [float((operator.matvec(v) - value * v).norm()) for value, v in zip(eigenvalues, vectors, strict=True)]
        )
        converged = residuals <= args.tol * np.maximum(1.0, np.abs(eigenvalues))
    arrays.update(eigenvalues=eigenvalues, residuals=residuals, converged=converged)

    if args.trace:
        if args.backend == "pyhessian":
            estimate = pyhessian_trace(
                model, subset, args.trace_samples, parameter_filter=parameter_filter, seed=args.seed
            )
        else:
            wanted = args.trace_method != "hutchpp"
            estimate = hutchinson(shown_operator, args.trace_samples, seed=args.seed) if wanted else None
        if estimate is not None:
            arrays.update(trace=np.float64(estimate.mean), trace_se=np.float64(estimate.se))
        if args.trace_method in ("hutchpp", "both"):
            plus = hutchpp(shown_operator, args.trace_samples, seed=args.seed)
            arrays.update(hutchpp_trace=np.float64(plus.mean), hutchpp_trace_se=np.float64(plus.se))

    if args.density:
        nodes, weights = lanczos_quadrature(
            shown_operator, vectors=args.density_vectors, steps=args.density_steps, seed=args.seed
        )
        sigma = args.density_sigma or default_sigma(nodes)
        grid = density_grid(nodes, sigma, args.density_grid)
        arrays.update(
            density_grid=grid,
            density=broadened_density(nodes, weights, grid, sigma),
            density_nodes=nodes,
            density_weights=weights,
        )
        meta["density"] = {
            "steps": args.density_steps,
            "vectors": args.density_vectors,
            "grid": args.density_grid,
            "sigma": sigma,
        }

    if args.progress:
        print(file=sys.stderr)
    evaluation = evaluate_subset(model, subset)
    meta.update(
        identity=identity,
        complete=True,
        run=analysed.describe(),
        data=subset.describe(),
        checkpoint_sha256=checkpoint,
        weights=args.weights,
        which=which,
        top_k=args.top_k,
        tol=args.tol,
        backend=args.backend,
        hvp_method=operator.method,
        parameters={"pattern": args.params, "names": len(operator.parameter_names), "dim": operator.dim},
        trace_method=args.trace_method if args.trace else None,
        trace_samples=args.trace_samples if args.trace else None,
        matvecs=operator.matvecs,
        loss=evaluation.loss,
        metric=evaluation.metric,
        metric_name=evaluation.metric_name,
        wall_time_s=time.perf_counter() - started,
    )
    save_result(Result(KIND, arrays, meta), out)
    shown = ", ".join(
        f"{value:.6g}{'' if ok else ' (not converged)'}" for value, ok in zip(eigenvalues, converged, strict=True)
    )
    print(f"eigenvalues ({which}): {shown}")
    if "trace" in arrays:
        trace, se = float(arrays["trace"]), float(arrays["trace_se"])
        print(f"trace (Hutchinson, {args.trace_samples} samples): {trace:.6g} ± {se:.2g}")
    if "hutchpp_trace" in arrays:
        print(f"trace (Hutch++, {args.trace_samples} products): {float(arrays['hutchpp_trace']):.6g}")
    print(f"hessian result written to {out}")
    return 0
