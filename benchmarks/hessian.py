"""Top Hessian eigenvalues of MiniLM on 32 real CoLA examples: our Lanczos against PyHessian's power iteration.

In one process, on the pretrained ``minilm`` (eager attention, eval mode, the classification head initialised from
seed 0, float32) and one fixed batch of 32 CoLA dev examples (seeded choice, ``--data-dir``):

* **HVP method.** The wall time of one Hessian-vector product over the whole model (22.7 M parameters) by double
  backward with the first-order graph kept between products, by double backward rebuilding it every time, and by
  forward-over-reverse (``torch.func.jvp`` of ``grad``); median of ``--hvp-repeats`` after one warm-up each.
* **Reference.** Our Lanczos, largest magnitude (PyHessian's power iteration converges to the largest magnitude),
  top 5, at ``--reference-tol``: its eigenvalues score both methods.
* **Top-1 and top-5.** Our ``lanczos(operator, k, which="LM")`` at each of ``--top1-tols`` for top-1 (top-5 at
  ``--top5-tol``; each from a fresh operator so the graph building is timed) and ``pyhessian.hessian(...)
  .eigenvalues(top_n=k)`` (maxIter 100) at each of ``--py-tols`` (its default 1e-3 always; its constructor's
  forward/backward timed); every configuration once per repetition, interleaved; median wall time of ``--repeats``
  runs (``--top5-repeats`` for top-5, 0 skips it), the eigenvalues each returns, and the residual
  ‖Hv − λv‖ / |λ| of every returned pair (ours as Lanczos reports it, from its recorded products; PyHessian's
  computed afterwards, untimed, with one product of our operator per pair).

Goals: top-5 by ours in ≤ 0.33 × PyHessian's time with every relative residual ≤ 1e-2; top-1 by ours at
``--top1-tol`` (default 1e-2: a residual that bounds the relative eigenvalue error by 1 %, chosen before the run)
in ≤ 1.0 × PyHessian's time at its default tol, with an eigenvalue error (against the reference) no larger than
PyHessian's. The other tols show each method's time against its error.

Run from the repository root (the machine is shared: one thread, load average printed at start and end), with
PyTorch's huge pages on as the ``landscape`` command sets them (``landscape/cli/__init__.py``; both methods run
under the same setting, which the report records)::

    HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1 .venv/bin/python benchmarks/hessian.py --data-dir ../shared/data \\
        --threads 1 --repeats 3 --top5-repeats 1 --reference-max-iter 45

(about 13 minutes on the shared 2-core machine, 6.5 of them in PyHessian's top-5, hence one top-5 repetition; the
reference's Krylov basis peaks at 45 × 182 MB). Writes ``benchmarks/results/hessian.json`` (atomically) and
``hessian.md`` beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.hessian import HessianOperator, pyhessian_eigenvalues
from analyses.spectral import lanczos
from landscape.core.atomic import write_text
from landscape.core.provenance import environment_versions
from landscape.data.encoding import default_cache_dir, encode_split
from landscape.data.tasks import get_task, load_split
from landscape.models.loading import load_model
from landscape.models.runs import choose_indices, subset_of


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def relative_residuals(operator: HessianOperator, values: np.ndarray, vectors: torch.Tensor) -> list[float]:
    """‖Hv − λv‖ / |λ| for each pair (v normalised first), one product each."""
    out = []
    for value, vector in zip(values, vectors, strict=True):
        vector = vector / vector.norm()
        out.append(float((operator.matvec(vector) - float(value) * vector).norm()) / abs(float(value)))
    return out


def errors_against(values: np.ndarray, reference: np.ndarray) -> list[float]:
    """|λᵢ − λᵢ(reference)| with both in decreasing magnitude (a missed eigenvalue shows as a large error)."""
    ordered = np.asarray(values)[np.argsort(-np.abs(values), kind="stable")]
    return [float(abs(value - expected)) for value, expected in zip(ordered, reference, strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the top-1 runs")
    parser.add_argument("--top5-repeats", type=int, default=2, help="repetitions of the top-5 runs")
    parser.add_argument("--hvp-repeats", type=int, default=3)
    parser.add_argument("--top1-tol", type=float, default=1e-2, help="ours' tol in the top-1 goal")
    parser.add_argument(
        "--top1-tols", default="1e-1,3e-2,1e-2,1e-3", help="ours' tols for the top-1 table (must hold --top1-tol)"
    )
    parser.add_argument("--py-tols", default="1e-2,1e-3", help="PyHessian's tols for the top-1 table (holds 1e-3)")
    parser.add_argument("--top5-tol", type=float, default=1e-2)
    parser.add_argument("--reference-tol", type=float, default=1e-4)
    parser.add_argument("--reference-max-iter", type=int, default=60, help="caps the basis: 60 × 182 MB")
    parser.add_argument("--out", default="benchmarks/results/hessian.json")
    args = parser.parse_args()
    args.top1_tols = sorted({*(float(t) for t in args.top1_tols.split(",")), args.top1_tol}, reverse=True)
    args.py_tols = sorted({*(float(t) for t in args.py_tols.split(",")), 1e-3}, reverse=True)

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        print("THP_MEM_ALLOC_ENABLE is not 1: not the setting the landscape command runs with", flush=True)
    task = get_task("cola")
    loaded = load_model("minilm", task, seed=0, attn_implementation="eager")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    encoded = encode_split(
        load_split(task, "dev", args.data_dir),
        loaded.tokenizer,
        max_length=128,
        cache_dir=default_cache_dir(),
        cache_tag="cola/dev",
    )
    indices = choose_indices(len(encoded), args.samples, args.seed)
    subset = subset_of(
        encoded,
        task,
        "dev",
        indices,
        seed=args.seed,
        pad_token_id=loaded.tokenizer.pad_token_id or 0,
        batch_size=args.samples,
    )
    tokens = tuple(subset.batches[0]["input_ids"].shape)
    print(f"batch {tokens} of CoLA dev, threads {torch.get_num_threads()}", flush=True)

    # --- HVP methods -----------------------------------------------------------------------------------------
    probe = torch.randn(
        HessianOperator(model, subset).dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    hvp: dict[str, Any] = {}
    products = {}
    for label, options in (
        ("double-backward, graph kept", {"method": "double-backward", "keep_graph": True}),
        ("double-backward, graph rebuilt", {"method": "double-backward", "keep_graph": False}),
        ("forward-over-reverse", {"method": "forward-over-reverse"}),
    ):
        operator = HessianOperator(model, subset, **options)
        first, products[label] = timed(lambda operator=operator: operator.matvec(probe))
        times = [timed(lambda operator=operator: operator.matvec(probe))[0] for _ in range(args.hvp_repeats)]
        hvp[label] = {"first_s": first, "times_s": times, "median_s": statistics.median(times)}
        print(f"HVP {label}: first {first:.2f} s, median {statistics.median(times):.2f} s {times}", flush=True)
        del operator
    base = products["double-backward, graph kept"]
    for label, product in products.items():
        hvp[label]["relative_difference"] = float((product - base).norm() / base.norm())

    # --- reference ---------------------------------------------------------------------------------------------
    operator = HessianOperator(model, subset)
    started = time.perf_counter()
    reference = lanczos(
        operator, 5, which="LM", tol=args.reference_tol, max_iter=args.reference_max_iter, return_eigenvectors=False
    )
    reference_time = time.perf_counter() - started
    print(
        f"reference ({reference_time:.0f} s, {reference.matvecs} products): {reference.eigenvalues} "
        f"relative residuals {reference.residuals / np.abs(reference.eigenvalues)}",
        flush=True,
    )
    del operator

    # --- top-1 and top-5 ---------------------------------------------------------------------------------------
    # Every configuration runs once per repetition, interleaved, so that a change of load shifts all of them.
    configurations = [(1, "ours", tol) for tol in args.top1_tols] + [(1, "pyhessian", tol) for tol in args.py_tols]
    if args.top5_repeats > 0:
        configurations += [(5, "ours", args.top5_tol), (5, "pyhessian", 1e-3)]
    runs: dict[tuple[int, str, float], dict[str, Any]] = {c: {"times_s": []} for c in configurations}
    for repetition in range(max(args.repeats, args.top5_repeats)):
        for k, method, tol in configurations:
            if repetition >= (args.repeats if k == 1 else args.top5_repeats):
                continue
            run = runs[(k, method, tol)]
            if method == "ours":
                operator = HessianOperator(model, subset)
                seconds, ours = timed(lambda operator=operator, k=k, tol=tol: lanczos(operator, k, which="LM", tol=tol))
                del operator
                values, residuals = ours.eigenvalues, list(ours.residuals / np.abs(ours.eigenvalues))
                run["matvecs"] = ours.matvecs
            else:
                seconds, (values, vectors) = timed(
                    lambda k=k, tol=tol: pyhessian_eigenvalues(model, subset, k, tol=tol, max_iter=100)
                )
                scorer = HessianOperator(model, subset)
                residuals = relative_residuals(scorer, values, vectors)  # untimed: PyHessian reports none
                del scorer, vectors
            run["times_s"].append(seconds)
            run.update(eigenvalues=np.asarray(values).tolist(), relative_residuals=residuals)
            print(f"top-{k} {method} tol {tol:g}: {seconds:.1f} s {values} residuals {residuals}", flush=True)
    rows = []
    for (k, method, tol), run in runs.items():
        run.update(
            k=k,
            method=method,
            tol=tol,
            errors=errors_against(np.asarray(run["eigenvalues"]), reference.eigenvalues),
            median_s=statistics.median(run["times_s"]),
        )
        rows.append(run)

    ours1, py1 = runs[(1, "ours", args.top1_tol)], runs[(1, "pyhessian", 1e-3)]
    goals = {
        "top1_time_ratio_le_1.0": bool(ours1["median_s"] <= py1["median_s"]),
        "top1_error_le_pyhessian": bool(ours1["errors"][0] <= py1["errors"][0]),
    }
    ratios = {"top1": ours1["median_s"] / py1["median_s"]}
    if args.top5_repeats > 0:
        ours5, py5 = runs[(5, "ours", args.top5_tol)], runs[(5, "pyhessian", 1e-3)]
        ratios["top5"] = ours5["median_s"] / py5["median_s"]
        goals["top5_time_ratio_le_0.33"] = bool(ratios["top5"] <= 0.33)
        goals["top5_relative_residuals_le_1e-2"] = bool(max(ours5["relative_residuals"]) <= 1e-2)
    load_end = os.getloadavg()
    print(f"load average at end: {load_end}", flush=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')} "
        ".venv/bin/python benchmarks/hessian.py " + shlex.join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "versions": environment_versions(),
        "data": {"task": "cola", "split": "dev", "samples": len(indices), "seed": args.seed, "batch_shape": tokens},
        "hvp": hvp,
        "reference": {
            "eigenvalues": reference.eigenvalues.tolist(),
            "tol": args.reference_tol,
            "relative_residuals": (reference.residuals / np.abs(reference.eigenvalues)).tolist(),
            "converged": reference.converged.tolist(),
            "matvecs": reference.matvecs,
            "seconds": reference_time,
        },
        "results": rows,
        "compared": {"top1_ours_tol": args.top1_tol, "top1_pyhessian_tol": 1e-3, "top5_ours_tol": args.top5_tol},
        "time_ratios": ratios,
        "goals": goals,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(report, indent=2, default=lambda value: value.item()) + "\n")
    markdown = render(report)
    write_text(out.with_suffix(".md"), markdown)
    print(markdown)


def render(report: dict[str, Any]) -> str:
    def numbers(values: list[float], fmt: str = ".5g") -> str:
        return ", ".join(format(v, fmt) for v in values)

    lines = [
        "# Hessian top eigenvalues: our Lanczos vs PyHessian (MiniLM, 32 CoLA dev examples)",
        "",
        f"`{report['command']}`, {report['date']}; {report['machine']['threads']} torch thread(s) on "
        f"{report['machine']['cpus']} shared cores, load average {report['machine']['load_average_start'][0]:.2f} "
        f"at start, {report['machine']['load_average_end'][0]:.2f} at end. Batch {report['data']['batch_shape']}.",
        "",
        "## Hessian-vector product (22.7 M parameters)",
        "",
        "| method | first product (s) | median of the next (s) | relative difference to the first row |",
        "|---|---|---|---|",
    ]
    for label, row in report["hvp"].items():
        lines.append(f"| {label} | {row['first_s']:.2f} | {row['median_s']:.2f} | {row['relative_difference']:.1e} |")
    ref = report["reference"]
    lines += [
        "",
        f"Reference: our Lanczos, LM, top 5, tol {ref['tol']:g}: {numbers(ref['eigenvalues'], '.6g')} "
        f"(relative residuals {numbers(ref['relative_residuals'], '.1e')}, {ref['matvecs']} products, "
        f"{ref['seconds']:.0f} s).",
        "",
        "## Top-k, largest magnitude",
        "",
        "| k | method | median time (s) | runs (s) | products | eigenvalues | error vs reference | ‖Hv − λv‖/\\|λ\\| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {"ours": "ours: Lanczos", "pyhessian": "PyHessian: power iteration"}
    for r in report["results"]:
        lines.append(
            f"| {r['k']} | {labels[r['method']]} (tol {r['tol']:g}) | {r['median_s']:.1f} | "
            f"{numbers(r['times_s'], '.1f')} | {r.get('matvecs', 'n/a')} | {numbers(r['eigenvalues'], '.6g')} | "
            f"{numbers(r['errors'], '.1e')} | {numbers(r['relative_residuals'], '.1e')} |"
        )
    goals, ratios, compared = report["goals"], report["time_ratios"], report["compared"]
    verdict = {True: "PASS", False: "FAIL"}
    lines += [
        "",
        f"## Goals (ours at tol {compared['top1_ours_tol']:g} for top-1, {compared['top5_ours_tol']:g} for top-5; "
        "PyHessian at its default tol 1e-3)",
        "",
        "Our tol bounds the relative residual ‖Hv − λv‖/|λ|, which bounds the eigenvalue's relative error by the "
        "same amount (symmetric H); PyHessian's tol bounds the change between two consecutive estimates.",
        "",
    ]
    if "top5" in ratios:
        lines += [
            f"- top-5 time ≤ 0.33 × PyHessian: ratio {ratios['top5']:.2f}: {verdict[goals['top5_time_ratio_le_0.33']]}",
            f"- top-5 every relative residual ≤ 1e-2: {verdict[goals['top5_relative_residuals_le_1e-2']]}",
        ]
    lines += [
        f"- top-1 time ≤ 1.0 × PyHessian: ratio {ratios['top1']:.2f}: {verdict[goals['top1_time_ratio_le_1.0']]}",
        f"- top-1 error ≤ PyHessian's: {verdict[goals['top1_error_le_pyhessian']]}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
