"""Figures from result files only: matplotlib paper figures (PDF + PNG), interactive plotly HTML, VTK for ParaView,
and the HTML report. This package never imports model code (no torch, no transformers); it reads ``result.npz`` +
``meta.json`` result directories and run directories' ``run.json`` / ``metrics.jsonl`` (docs/results.md).

Modules: ``style`` (sizes, the colour of each optimizer, scales, saving), ``sources`` (reading), ``landscapes``
(surfaces, interpolation), ``runs`` (training curves, sweeps), ``analyses`` (Hessian, Fisher, sharpness, transfer),
``interactive`` (plotly), ``vtk`` (meshio), ``catalogue`` (every figure a set of inputs allows), ``report`` (HTML).
"""

from figures.analyses import fisher_distributions, hessian_spectrum, sharpness_vs_rho, transfer_bars
from figures.catalogue import figure_specs, write_figures
from figures.interactive import surface_plotly, write_surface_html
from figures.landscapes import interpolation_curves, surface_3d, surface_contour, surface_curves
from figures.report import build_report, metrics_table
from figures.runs import (
    metric_vs_hyperparameter,
    metric_vs_mask_interval,
    metric_vs_sparsity,
    metric_vs_train_fraction,
    training_curves,
)
from figures.sources import collect, read_result, read_run
from figures.style import optimizer_colour, optimizer_style, save_figure
from figures.vtk import export_surface_vtk, surface_mesh

__all__ = [
    "build_report",
    "collect",
    "export_surface_vtk",
    "figure_specs",
    "fisher_distributions",
    "hessian_spectrum",
    "interpolation_curves",
    "metric_vs_hyperparameter",
    "metric_vs_mask_interval",
    "metric_vs_sparsity",
    "metric_vs_train_fraction",
    "metrics_table",
    "optimizer_colour",
    "optimizer_style",
    "read_result",
    "read_run",
    "save_figure",
    "sharpness_vs_rho",
    "surface_3d",
    "surface_contour",
    "surface_curves",
    "surface_mesh",
    "surface_plotly",
    "training_curves",
    "transfer_bars",
    "write_figures",
    "write_surface_html",
]
