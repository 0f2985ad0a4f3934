"""``landscape sharpness RUN``: ε-sharpness, adaptive, average and per-instance sharpness, curvature, Fisher trace."""

from __future__ import annotations

import argparse
import math

from landscape.cli.common import (
    RUN_HELP,
    add_checkpoint_argument,
    add_data_arguments,
    add_output_arguments,
    add_weights_argument,
    data_selection,
    positive_int,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sharpness",
        help="sharpness metrics of a run's weights (one result)",
        description="Worst-case loss increase in an L2 ball of radius rho (one SAM step and projected gradient "
        "ascent), the same in ASAM's normalised ball, the mean loss increase under N(0, sigma^2 I) perturbations, "
        "per-instance sharpness (delta-SAM), and optionally the Hessian's top eigenvalues and trace, on a fixed "
        "seeded subset in eval mode. Conventions: docs/sharpness.md.",
    )
    parser.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    parser.add_argument(
        "--rho",
        type=float,
        nargs="+",
        default=[0.05],
        metavar="R",
        help="radii of the L2 ball and of ASAM's normalised ball (default 0.05)",
    )
    parser.add_argument(
        "--sigma",
        type=float,
        nargs="+",
        default=[0.01],
        metavar="S",
        help="standard deviations of the Gaussian perturbations (default 0.01)",
    )
    parser.add_argument(
        "--pgd-steps", type=int, default=10, help="projected ascent steps after the SAM step (default 10)"
    )
    parser.add_argument(
        "--pgd-step-size",
        type=float,
        metavar="F",
        help="each ascent step's length as a fraction of rho (default 2.5 / steps)",
    )
    parser.add_argument("--gaussian-samples", type=positive_int, default=8, help="Gaussian draws per sigma (default 8)")
    parser.add_argument("--eta", type=float, default=0.01, help="ASAM's eta in T = |w| + eta (default 0.01)")
    parser.add_argument(
        "--instance-rho", type=float, help="radius of the per-instance sharpness (default: first --rho)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="Hessian top eigenvalues by Lanczos (default 0: none)")
    parser.add_argument(
        "--trace-samples", type=int, default=0, help="Hutchinson samples of the Hessian trace (default 0: none)"
    )
    add_weights_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="evaluation batch size (default 32)")
    add_data_arguments(parser, samples=256, split="train")
    add_output_arguments(parser)
    add_checkpoint_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from analyses.sharpness import compute_sharpness
    from landscape.core.errors import ConfigError

    for flag, values in (
        ("--rho", args.rho),
        ("--sigma", args.sigma),
        ("--eta", [args.eta]),
        ("--instance-rho", [] if args.instance_rho is None else [args.instance_rho]),
    ):
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            raise ConfigError(f"{flag} takes finite numbers >= 0, got {bad[0]}")
    if args.pgd_step_size is not None and not (math.isfinite(args.pgd_step_size) and args.pgd_step_size > 0):
        raise ConfigError(f"--pgd-step-size takes a finite fraction of rho > 0, got {args.pgd_step_size}")
    for flag, value in (
        ("--pgd-steps", args.pgd_steps),
        ("--top-k", args.top_k),
        ("--trace-samples", args.trace_samples),
    ):
        if value < 0:
            raise ConfigError(f"{flag} takes an integer >= 0, got {value}")
    if args.trace_samples == 1:
        raise ConfigError("--trace-samples needs at least 2 samples for a standard error (or 0 for none), got 1")
    data = data_selection(args)
    data.open_run(args.run_dir)  # refuses a bad run directory before anything is loaded
    result, skipped = compute_sharpness(
        args.run_dir,
        args.out,
        checkpoint_every=args.checkpoint_every,
        rho=args.rho,
        sigma=args.sigma,
        pgd_steps=args.pgd_steps,
        pgd_step_size=args.pgd_step_size,
        gaussian_samples=args.gaussian_samples,
        eta=args.eta,
        instance_rho=args.instance_rho,
        top_k=args.top_k,
        trace_samples=args.trace_samples,
        data=data,
        weights=args.weights,
        overwrite=args.overwrite,
        device=args.device,
        progress=args.progress,
    )
    pgd = ", ".join(
        f"rho {r:g}: {v:.4g}" for r, v in zip(result.arrays["rho"], result.arrays["eps_sharpness_pgd"], strict=True)
    )
    state = "already complete, nothing recomputed" if skipped else "written"
    print(f"sharpness result {state}: {args.out} (loss {result.meta['loss']:.4g}; eps-sharpness {pgd})")
    return 0
