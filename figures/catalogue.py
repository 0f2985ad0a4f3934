"""Which figures a set of runs and results allows, and writing them all (``landscape figures``).

Results of one kind are compared on one figure per task (interpolations, 1-D surfaces, Hessian spectra, sharpness,
training curves, sweeps); 2-D surfaces and Fisher distributions get one figure each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from matplotlib.figure import Figure

from figures.analyses import fisher_distributions, hessian_spectrum, sharpness_vs_rho, transfer_bars
from figures.correlation import measured, run_points, sharpness_vs_metric
from figures.interactive import write_surface_html
from figures.landscapes import interpolation_curves, shared_range, surface_3d, surface_contour, surface_curves
from figures.runs import (
    SAM_SWEEPS,
    SWEEP_LABELS,
    dev_metric_bands,
    metric_vs_mask_interval,
    metric_vs_sam_setting,
    metric_vs_sparsity,
    metric_vs_train_fraction,
    seed_groups,
    training_curves,
)
from figures.sources import Collection, collect, group_by_task
from figures.style import FORMATS, save_figure, slug
from figures.vtk import export_surface_vtk
from landscape.core.errors import ConfigError
from landscape.core.rundir import has_run


@dataclass(frozen=True)
class FigureSpec:
    """One figure to draw: its file stem, a heading and a one-line caption for the report, and how to draw it."""

    stem: str
    heading: str
    caption: str
    draw: Callable[[], Figure]


def _distinct(values: Iterable) -> int:
    return len({value for value in values if value is not None})


def figure_specs(collection: Collection) -> list[FigureSpec]:
    """Every figure that ``collection`` allows, in report order."""
    specs: list[FigureSpec] = []
    points = run_points(collection)
    if measured(points):  # first: across runs, the question the other figures illustrate one run at a time
        specs.append(
            FigureSpec(
                "sharpness-vs-dev-metric",
                "Sharpness against the dev metric across runs",
                "Each run's sharpness measures (from its hessian, sharpness and surface results) against its final "
                "dev metric; τ: Kendall's τ-b with a 95 % bootstrap interval over runs (Andriushchenko et al. 2023 "
                "ask whether sharpness predicts generalisation for transformers).",
                partial(sharpness_vs_metric, collection),
            )
        )
    # Surfaces of one task share one colour scale and z range: compared side by side, each stretched to its own
    # range would make a sharp and a flat solution look alike.
    ranges = {
        (task, values): shared_range(records, values)
        for task, records in group_by_task(collection.surfaces(2)).items()
        for values in ("loss", "metric")
    }
    for record in collection.surfaces(2):
        name = slug(record.name)
        loss_range, metric_range = ranges[record.task, "loss"], ranges[record.task, "metric"]
        specs.append(
            FigureSpec(
                f"surface-contour-{name}",
                f"Loss contours · {record.label} · {record.task}",
                "2-D loss surface around the solution (0, 0) along two filter-normalised directions "
                "(FSAM Fig. 4); white gaps: cells not computed or not finite; one colour scale for every "
                "surface of the task.",
                partial(surface_contour, record, value_range=loss_range),
            )
        )
        specs.append(
            FigureSpec(
                f"surface-metric-contour-{name}",
                f"{record.metric_name} contours · {record.label}",
                f"The dev {record.metric_name} over the same grid.",
                partial(surface_contour, record, values="metric", value_range=metric_range),
            )
        )
        specs.append(
            FigureSpec(
                f"surface-3d-{name}",
                f"Loss surface · {record.label} · {record.task}",
                "The same surface in 3-D (z range shared by the task's surfaces).",
                partial(surface_3d, record, value_range=loss_range),
            )
        )
    for task, records in group_by_task(collection.surfaces(1)).items():
        specs.append(
            FigureSpec(
                f"surface-1d-{slug(task)}",
                f"1-D loss curves · {task}",
                "Loss and metric along one random filter-normalised direction.",
                partial(surface_curves, records),
            )
        )
    for task, records in group_by_task(collection.of_kind("interpolation")).items():
        specs.append(
            FigureSpec(
                f"interpolation-{slug(task)}",
                f"Linear interpolation θ0 → θ1 · {task}",
                "Loss and metric along θ1 + α(θ1 − θ0) (FSAM Fig. 5); α = 0 is the fine-tuned "
                "solution, α = −1 the initial weights.",
                partial(interpolation_curves, records),
            )
        )
    for task, runs in group_by_task(collection.runs).items():
        if any(run.records for run in runs):
            specs.append(
                FigureSpec(
                    f"training-{slug(task)}",
                    f"Training curves · {task}",
                    "Training loss and dev metric against step (FSAM Fig. 6).",
                    partial(training_curves, runs),
                )
            )
        completed = [run for run in runs if run.dev_metrics]
        evaluated = [run for run in runs if run.records_of("eval")]
        if any(len(group) >= 2 for group in seed_groups(evaluated).values()):  # several seeds of one setting
            specs.append(
                FigureSpec(
                    f"dev-bands-{slug(task)}",
                    f"Dev metric against step over seeds · {task}",
                    "Mean over the runs of each optimizer, band ± one standard deviation over seeds, each seed faint "
                    "(FSAM Fig. 6 with its seeds).",
                    partial(dev_metric_bands, runs),
                )
            )
        sam_runs = [run for run in completed if run.config.get("sam", "none") != "none"]
        for parameter in SAM_SWEEPS:
            # swept: one variant ran at two values or more (not: each variant at its own value, as a zip does)
            if any(
                _distinct(run.config.get(parameter) for run in sam_runs if run.label == label) >= 2
                for label in {run.label for run in sam_runs}
            ):
                specs.append(
                    FigureSpec(
                        f"{parameter.replace('_', '-')}-{slug(task)}",
                        f"Dev metric against {SWEEP_LABELS[parameter]} · {task}",
                        "Bahri et al. Fig. 2: mean over seeds, band ± one standard deviation, each seed a dot; "
                        "dotted: runs without SAM.",
                        partial(metric_vs_sam_setting, completed, parameter),
                    )
                )
        fisher_runs = [run for run in completed if run.uses_fisher_mask]
        if _distinct(run.config.get("sparsity") for run in fisher_runs) >= 2:
            specs.append(
                FigureSpec(
                    f"sparsity-{slug(task)}",
                    f"Dev metric against sparsity s · {task}",
                    "FSAM Fig. 1 / Table 4; dotted: runs without a Fisher mask.",
                    partial(metric_vs_sparsity, completed),
                )
            )
        if _distinct(run.config.get("mask_interval") for run in fisher_runs) >= 2:
            specs.append(
                FigureSpec(
                    f"mask-interval-{slug(task)}",
                    f"Dev metric against mask interval F_i · {task}",
                    "FSAM Fig. 1 / Table 4; dotted: runs without a Fisher mask.",
                    partial(metric_vs_mask_interval, completed),
                )
            )
        if _distinct(run.config.get("train_fraction") for run in completed) >= 2:
            specs.append(
                FigureSpec(
                    f"train-fraction-{slug(task)}",
                    f"Dev metric against training-data fraction · {task}",
                    "FSAM Fig. 2 (low-resource regime).",
                    partial(metric_vs_train_fraction, completed),
                )
            )
    for task, records in group_by_task(collection.of_kind("hessian")).items():
        specs.append(
            FigureSpec(
                f"hessian-{slug(task)}",
                f"Hessian spectrum · {task}",
                "Top eigenvalues of the loss Hessian at the solution (Lanczos) and the spectral density (SLQ).",
                partial(hessian_spectrum, records),
            )
        )
    for record in collection.of_kind("fisher"):
        specs.append(
            FigureSpec(
                f"fisher-{slug(record.name)}",
                f"Fisher information · {record.label} · {record.task}",
                "Empirical Fisher per module type and per layer, and where the FSAM mask falls.",
                partial(fisher_distributions, record),
            )
        )
    for task, records in group_by_task(collection.of_kind("sharpness")).items():
        specs.append(
            FigureSpec(
                f"sharpness-{slug(task)}",
                f"Sharpness against ρ · {task}",
                "Worst-case (ε-) sharpness by one ascent step and by projected ascent, adaptive "
                "sharpness, and average sharpness under Gaussian noise.",
                partial(sharpness_vs_rho, records),
            )
        )
    transfers = collection.of_kind("transfer")
    if transfers:
        specs.append(
            FigureSpec(
                "transfer",
                "Cross-task transfer",
                "Target-task dev metric from the pretrained model and from each fine-tuned source (FSAM Fig. 3).",
                partial(transfer_bars, transfers),
            )
        )
    return specs


def write_figures(
    paths: Iterable[str | os.PathLike[str]] | Collection,
    out_dir: str | os.PathLike[str],
    *,
    formats: Iterable[str] = FORMATS,
    html: bool = True,
    vtk: bool = True,
) -> list[Path]:
    """Write every figure the runs / results in ``paths`` allow into ``out_dir`` (PDF + PNG each), plus one
    interactive HTML per 2-D surface and one ``.vtu`` per surface; returns the files written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; expected a folder for the figures")
    if has_run(out_dir) or (out_dir / "meta.json").is_file():
        raise ConfigError(
            f"--out {out_dir} is a run or result directory; "
            f"figures go to a folder of their own, e.g. {out_dir / 'figures'}"
        )
    collection = paths if isinstance(paths, Collection) else collect(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    written: list[Path] = []
    for spec in figure_specs(collection):
        written += save_figure(spec.draw(), out_dir / spec.stem, formats)
    ranges = {task: shared_range(records) for task, records in group_by_task(collection.surfaces(2)).items()}
    for record in collection.of_kind("surface"):
        if html and "b" in record.arrays:
            target = out_dir / f"surface-3d-{slug(record.name)}.html"
            written.append(write_surface_html(record, target, value_range=ranges[record.task]))
        if vtk:
            written.append(export_surface_vtk(record, out_dir / f"surface-{slug(record.name)}.vtu"))
    return written
