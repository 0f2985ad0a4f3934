"""``landscape hessian RUN``: top eigenvalues, trace and spectral density of the loss Hessian at a run's weights."""

from __future__ import annotations

import argparse

from analyses.curvature import BACKENDS, TRACE_METHODS, HessianOptions, compute_hessian
from analyses.hessian import HVP_METHODS
from analyses.spectral import WHICH
from landscape.cli.common import (
    RUN_HELP,
    add_checkpoint_argument,
    add_data_arguments,
    add_output_arguments,
    add_weights_argument,
    data_selection,
    positive_float,
    positive_int,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hessian",
        help="Hessian eigenvalues, trace and spectral density of a run",
        description="The Hessian of the mean loss over a fixed, seeded subset of examples, in eval mode, at a run's "
        "weights: top-k eigenvalues by Lanczos with true residuals, Hutchinson / Hutch++ trace, and the spectral "
        "density by stochastic Lanczos quadrature. The model is loaded with eager attention (double backward).",
    )
    parser.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    add_weights_argument(parser)
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
        help="eigenpair converged when ‖Hv − λv‖ ≤ tol·max(|λ|, largest |λ| seen) (default 1e-3)",
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
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="time a few Hessian-vector products, print the cost, write nothing"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = HessianOptions(
        top_k=args.top_k,
        which=args.which,
        tol=args.tol,
        max_iter=args.max_iter,
        trace=args.trace,
        trace_method=args.trace_method,
        trace_samples=args.trace_samples,
        density=args.density,
        density_steps=args.density_steps,
        density_vectors=args.density_vectors,
        density_grid=args.density_grid,
        density_sigma=args.density_sigma,
        backend=args.backend,
        method=args.method,
        params=args.params,
    )
    if args.dry_run:
        from analyses.curvature import estimate_hessian

        plan = estimate_hessian(args.run_dir, options, data=data_selection(args), weights=args.weights,
                                device=args.device)  # fmt: skip
        print(plan.describe())
        return 0
    result, skipped = compute_hessian(
        args.run_dir, args.out, options, data=data_selection(args), weights=args.weights,
        overwrite=args.overwrite, progress=args.progress, device=args.device,
        checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    if skipped:
        print(f"{args.out}: complete with these parameters, nothing to do")
        return 0
    arrays = result.arrays
    shown = ", ".join(
        f"{value:.6g}{'' if ok else ' (not converged)'}"
        for value, ok in zip(arrays["eigenvalues"], arrays["converged"], strict=True)
    )
    print(f"eigenvalues ({result.meta['which']}): {shown}")
    if "trace" in arrays:
        trace, se = float(arrays["trace"]), float(arrays["trace_se"])
        print(f"trace (Hutchinson, {args.trace_samples} samples): {trace:.6g} ± {se:.2g}")
    if "hutchpp_trace" in arrays:
        print(f"trace (Hutch++, {args.trace_samples} products): {float(arrays['hutchpp_trace']):.6g}")
    print(f"hessian result written to {args.out}")
    return 0
