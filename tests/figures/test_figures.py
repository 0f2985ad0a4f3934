"""figures/: every figure function on small result files written here, grid orientation, masking of non-finite
cells, colours, VTK export read back with meshio, the import boundary, and the ``landscape figures`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.results import Result, save_result

REPO = Path(__file__).resolve().parents[2]
NO_PROVENANCE = {"versions": {}, "git_revision": None}  # save_result would otherwise ask git and import torch


# ---------------------------------------------------------------- small result files, written the way analyses do


def describe_run(path: Path, optimizer: str = "adamw", sam: str = "none", task: str = "cola", seed: int = 1) -> dict:
    label = optimizer if sam == "none" else f"{optimizer}+{sam}"
    return {
        "path": str(path),
        "label": label,
        "task": task,
        "model": "tiny",
        "optimizer": optimizer,
        "sam": sam,
        "seed": seed,
    }


def quadratic_surface(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """loss[j, i] = a[i]² + 3 b[j]² + 0.1: elongated along a, so a transposed plot is visibly wrong."""
    return a[None, :] ** 2 + 3 * b[:, None] ** 2 + 0.1


def save_surface(directory: Path, run: dict, a, b=None, *, nan_cells=(), complete=True) -> Path:
    a = np.asarray(a, dtype=float)
    if b is None:
        loss = a**2 + 0.1
    else:
        b = np.asarray(b, dtype=float)
        loss = quadratic_surface(a, b)
    metric = 0.5 - loss / loss.max()  # an MCC-like metric that goes negative
    done = np.ones(loss.shape, dtype=bool)
    for cell in nan_cells:
        loss[cell], metric[cell], done[cell] = np.nan, np.nan, False
    arrays = {"a": a, "loss": loss, "metric": metric, "done": done}
    if b is not None:
        arrays["b"] = b
    meta = {
        **NO_PROVENANCE,
        "run": run,
        "metric_name": "mcc",
        "dims": 1 if b is None else 2,
        "data": {"task": run["task"], "split": "dev"},
        "complete": complete,
    }
    save_result(Result("surface", arrays, meta), directory)
    return directory


def save_interpolation(directory: Path, run: dict, scale: float) -> Path:
    alpha = np.linspace(-1.5, 0.5, 21)
    loss = scale * (alpha + 0.05) ** 2 + 0.05
    loss[3] = np.nan
    arrays = {"alpha": alpha, "loss": loss, "metric": 0.6 - loss, "done": np.isfinite(loss)}
    save_result(Result("interpolation", arrays, {**NO_PROVENANCE, "run": run, "metric_name": "mcc"}), directory)
    return directory


def save_hessian(directory: Path, run: dict, top: float) -> Path:
    eigenvalues = np.array([top, top / 10, top / 100, -0.5])
    grid = np.linspace(-1, top, 50)
    density = np.exp(-np.abs(grid)) / 10
    density[5] = 0.0
    arrays = {
        "eigenvalues": eigenvalues,
        "residuals": np.full(4, 1e-4),
        "converged": np.array([1, 1, 1, 0], bool),
        "trace": np.array(top * 3),
        "trace_se": np.array(0.5),
        "density_grid": grid,
        "density": density,
    }
    save_result(Result("hessian", arrays, {**NO_PROVENANCE, "run": run, "which": "LA"}), directory)
    return directory


def save_fisher(directory: Path, run: dict) -> Path:
    rng = np.random.default_rng(0)
    layers = np.array(["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler"])
    modules = np.array(["attention.query", "ffn", "classifier"])
    edges = np.linspace(-12, 0, 13)
    arrays = {
        "hist_edges": edges,
        "layer_names": layers,
        "layer_hist": rng.integers(0, 100, (3, 12)),
        "module_types": modules,
        "module_hist": rng.integers(0, 100, (3, 12)),
        "quantile_levels": np.array([0.5, 0.9, 0.99]),
        "layer_quantiles": np.array([[1e-9, 1e-7, 1e-5], [1e-8, 1e-6, 1e-4], [1e-6, 1e-4, 1e-2]]),
        "module_quantiles": np.ones((3, 3)),
        "layer_mask_share": np.array([0.2, 0.3, 0.5]),
        "layer_kept_fraction": np.array([0.05, 0.1, 0.9]),
        "zero_count_layer": np.array([3, 0, 0]),
    }
    meta = {**NO_PROVENANCE, "run": run, "sparsity": 0.9, "fisher_mode": "per-example", "total_trace": 1.5}
    save_result(Result("fisher", arrays, meta), directory)
    return directory


def save_sharpness(directory: Path, run: dict, scale: float) -> Path:
    rho = np.array([0.001, 0.01, 0.05, 0.1])
    sigma = np.array([0.001, 0.01])
    arrays = {
        "rho": rho,
        "eps_sharpness_ascent": scale * rho**2 * 100 - 1e-4,  # slightly negative at the smallest ρ
        "eps_sharpness_pgd": scale * rho**2 * 150,
        "adaptive_sharpness": scale * rho,
        "sigma": sigma,
        "average_sharpness": scale * sigma,
        "average_sharpness_se": sigma / 10,
        "instance_sharpness": np.linspace(0, 1, 8),
    }
    save_result(Result("sharpness", arrays, {**NO_PROVENANCE, "run": run, "loss": 0.3}), directory)
    return directory


def save_transfer(directory: Path, source: dict) -> Path:
    arrays = {
        "targets": np.array(["rte", "mrpc", "cola"]),
        "metric_names": np.array(["accuracy", "f1", "mcc"]),
        "from_source": np.array([0.62, np.nan, -0.05]),
        "from_pretrained": np.array([0.55, 0.81, 0.1]),
    }
    meta = {**NO_PROVENANCE, "source": source, "mode": "finetune"}
    save_result(Result("transfer", arrays, meta), directory)
    return directory


def write_run(path: Path, *, optimizer="adamw", sam="none", task="cola", seed=1, mcc=0.3, **config) -> Path:
    """A finished run directory as ``landscape train`` leaves it (run.json and metrics.jsonl; no weights needed)."""
    path.mkdir(parents=True, exist_ok=True)
    full_config = {
        "task": task,
        "optimizer": optimizer,
        "sam": sam,
        "seed": seed,
        "sparsity": 0.9,
        "mask_interval": 100,
        "train_fraction": 1.0,
        "fisher_mask": False,
        **config,
    }
    info = {
        "config": full_config,
        "task": task,
        "seed": seed,
        "status": "completed",
        "dev_metrics": {"loss": 0.6, "mcc": mcc},
    }
    (path / "run.json").write_text(json.dumps(info))
    records = [{"kind": "train", "step": s, "epoch": 0, "loss": 2.0 * 0.9**s, "lr": 1e-3} for s in range(1, 61)]
    records += [
        {"kind": "eval", "step": s, "split": "dev", "loss": 0.7, "mcc": mcc * s / 60 - 0.05} for s in (20, 40, 60)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_comparison(root: Path) -> list[Path]:
    """Two runs (AdamW, AdamW+FSAM) with every analysis under ``RUN/analyses/``, plus a standalone transfer result."""
    runs = []
    for optimizer, sam, scale in (("adamw", "none", 4.0), ("adamw", "fsam", 1.0)):
        run = write_run(root / f"cola-{sam}", optimizer=optimizer, sam=sam, mcc=0.3 if sam == "none" else 0.35)
        described = describe_run(run, optimizer, sam)
        analyses = run / "analyses"
        save_surface(
            analyses / "surface-2d", described, np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 5), nan_cells=[(4, 6)]
        )
        save_surface(analyses / "surface-1d", described, np.linspace(-1, 1, 9))
        save_interpolation(analyses / "interpolation", described, scale)
        save_hessian(analyses / "hessian", described, 100 * scale)
        save_fisher(analyses / "fisher", described)
        save_sharpness(analyses / "sharpness", described, scale)
        runs.append(run)
    transfer = save_transfer(root / "transfer-cola", describe_run(runs[1], "adamw", "fsam"))
    return [*runs, transfer]


# ---------------------------------------------------------------- tests


def contour_paths(fig):
    """The path vertices of the line contours drawn on the first axes (levels → list of (n, 2) arrays)."""
    from matplotlib.contour import ContourSet

    sets = [c for c in fig.axes[0].collections if isinstance(c, ContourSet)]
    lines = sets[-1]  # contourf first, then the contour lines
    return lines.levels, [path.vertices for path in lines.get_paths()]


def test_contour_is_not_transposed_on_a_non_square_grid(tmp_path):
    from figures import surface_contour

    a, b = np.linspace(-2, 2, 41), np.linspace(-1, 1, 23)  # non-square, b shorter than a
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, b)
    fig = surface_contour(record)
    levels, paths = contour_paths(fig)
    checked = 0
    for level, vertices in zip(levels, paths, strict=True):
        if len(vertices) == 0 or not 0.5 < level < 3.0:
            continue
        x, y = vertices[:, 0], vertices[:, 1]
        # On the ellipse a² + 3b² = level − 0.1: the half-width along a is √3 times the half-height along b.
        np.testing.assert_allclose(np.abs(x).max(), np.sqrt(level - 0.1), rtol=0.05)
        np.testing.assert_allclose(np.abs(y).max(), np.sqrt((level - 0.1) / 3), rtol=0.05)
        np.testing.assert_allclose(x**2 + 3 * y**2 + 0.1, level, rtol=0.05, atol=0.02)
        checked += 1
    assert checked >= 3
    assert fig.axes[0].get_xlim() == (-2.0, 2.0) and fig.axes[0].get_ylim() == (-1.0, 1.0)
    assert "α" in fig.axes[0].get_xlabel() and "β" in fig.axes[0].get_ylabel()


def test_contour_masks_nan_cells_instead_of_filling_them(tmp_path):
    from figures import surface_contour

    a, b = np.linspace(-1, 1, 9), np.linspace(-1, 1, 7)
    hole = [(j, i) for j in (2, 3, 4) for i in (3, 4, 5)]  # a 3 × 3 block around the origin, origin included
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, b, nan_cells=hole)
    fig = surface_contour(record)
    from matplotlib.contour import ContourSet

    filled = next(c for c in fig.axes[0].collections if isinstance(c, ContourSet) and c.filled)
    # The origin (value 0.1 if it were drawn as the true value, 0 if as zero) lies in no filled band.
    assert not any(path.contains_point((0.0, 0.0)) for path in filled.get_paths())
    # A computed point away from the hole does.
    assert any(path.contains_point((-0.9, -0.9)) for path in filled.get_paths())


def test_a_partial_mostly_nan_surface_says_so_on_the_figure(tmp_path):
    from figures import surface_contour

    a, b = np.linspace(-1, 1, 5), np.linspace(-1, 1, 5)
    missing = [(j, i) for j in range(5) for i in range(5) if (j, i) not in ((0, 0), (0, 1), (1, 0), (1, 1))]
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, b, nan_cells=missing, complete=False)
    fig = surface_contour(record)
    assert "(partial: 4/25 cells)" in fig.axes[0].get_title()
    assert any("only 4 of 25 cells finite" in text.get_text() for text in fig.axes[0].texts)
    complete = surface_contour(save_surface(tmp_path / "c", describe_run(tmp_path), a, b))
    assert "partial" not in complete.axes[0].get_title() and not complete.axes[0].texts


def test_surface_3d_keeps_nan_cells_as_gaps_and_orientation(tmp_path):
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from figures import surface_3d

    a, b = np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 4)
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, b, nan_cells=[(1, 2)])
    fig = surface_3d(record)
    fig.canvas.draw()
    surface = next(c for c in fig.axes[0].collections if isinstance(c, Poly3DCollection))
    heights = np.asarray(surface.get_array(), dtype=float)
    assert heights.shape == ((len(b) - 1) * (len(a) - 1) - 4,)  # the four quads touching the NaN point are left out
    assert np.isfinite(heights).all() and heights.min() > 0.1  # nothing drawn at zero
    from figures.landscapes import surface_quads

    quads, _ = surface_quads(a, b, quadratic_surface(a, b))
    np.testing.assert_allclose(quads[..., 2], quads[..., 0] ** 2 + 3 * quads[..., 1] ** 2 + 0.1)  # z at (a, b)
    ax = fig.axes[0]
    assert ax.get_xlim3d()[1] >= 0.99 and ax.get_ylim3d()[1] < 0.6  # α spans [-1, 1], β spans [-0.5, 0.5]


def test_one_row_grid_is_drawn_as_a_curve(tmp_path):
    from figures import surface_3d, surface_contour

    a = np.linspace(-1, 1, 6)
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, [0.0])
    for draw in (surface_contour, surface_3d):
        fig = draw(record)
        (line,) = fig.axes[0].get_lines()
        np.testing.assert_allclose(line.get_xdata(), a)
        np.testing.assert_allclose(line.get_ydata(), a**2 + 0.1)


def test_metric_contour_handles_negative_values(tmp_path):
    from figures import surface_contour

    record = save_surface(tmp_path / "s", describe_run(tmp_path), np.linspace(-1, 1, 5), np.linspace(-1, 1, 4))
    fig = surface_contour(record, values="metric")
    assert min(fig.axes[0].collections[0].levels) < 0  # the metric goes negative; levels follow it, linear scale
    assert fig.axes[1].get_ylabel() == "mcc"  # the colour bar names the metric


def test_surfaces_spanning_decades_flat_or_not_computed(tmp_path):
    from matplotlib.colors import LogNorm
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from figures import surface_3d, surface_contour

    a, b = np.linspace(-2, 2, 9), np.linspace(-1, 1, 5)
    steep = Result("surface", {"a": a, "b": b, "loss": np.exp(3 * (a[None] ** 2 + b[:, None] ** 2)),
                               "metric": np.zeros((5, 9)), "done": np.ones((5, 9), bool)}, {})  # fmt: skip
    assert isinstance(surface_contour(steep).axes[0].collections[0].norm, LogNorm)  # 1 … e^15: log colours
    assert surface_3d(steep).axes[0].get_zlabel() == "log10 loss"
    nothing = Result("surface", {"a": a, "b": b, "loss": np.full((5, 9), np.nan), "metric": np.full((5, 9), np.nan),
                                 "done": np.zeros((5, 9), bool)}, {})  # fmt: skip
    assert "no computed cells" in [t.get_text() for t in surface_contour(nothing).axes[0].texts]
    faces = [c for c in surface_3d(nothing).axes[0].collections if isinstance(c, Poly3DCollection)]
    assert len(faces[0].get_array()) == 0
    flat = Result("surface", {"a": a, "b": b, "loss": np.full((5, 9), 2.0), "metric": np.zeros((5, 9)),
                              "done": np.ones((5, 9), bool)}, {})  # fmt: skip
    low, high = surface_3d(flat).axes[0].get_zlim()
    assert low < 2.0 < high


def test_interpolation_and_1d_curves_share_one_axis_with_fixed_colours(tmp_path):
    from matplotlib.colors import to_hex

    from figures import interpolation_curves, optimizer_colour, surface_curves

    adamw = save_interpolation(tmp_path / "i1", describe_run(tmp_path / "r1"), 400.0)
    fsam = save_interpolation(tmp_path / "i2", describe_run(tmp_path / "r2", sam="fsam"), 1.0)
    fig = interpolation_curves([adamw, fsam])
    loss_ax = fig.axes[0]
    lines = {line.get_label(): line for line in loss_ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"adamw", "adamw+fsam"}
    assert to_hex(lines["adamw"].get_color()) == optimizer_colour("adamw").lower()
    assert to_hex(lines["adamw+fsam"].get_color()) == optimizer_colour("adamw+fsam").lower()
    assert optimizer_colour("adamw") != optimizer_colour("adamw+fsam")
    assert np.isnan(lines["adamw"].get_ydata()[3])  # the non-finite point stays a gap
    assert loss_ax.get_yscale() == "log"  # the losses span four decades
    assert fig.axes[1].get_yscale() == "linear"
    curves = surface_curves([save_surface(tmp_path / "s1", describe_run(tmp_path), np.linspace(-1, 1, 9))])
    np.testing.assert_allclose(curves.axes[0].get_lines()[0].get_xdata(), np.linspace(-1, 1, 9))


def test_training_curves_and_sweeps_read_run_directories(tmp_path):
    from figures import metric_vs_mask_interval, metric_vs_sparsity, metric_vs_train_fraction, training_curves

    runs = [write_run(tmp_path / "adamw", mcc=0.2)]
    for index, (sparsity, interval) in enumerate(((0.5, 10), (0.9, 100), (0.99, 1000))):
        runs.append(
            write_run(
                tmp_path / f"fsam{index}", sam="fsam", sparsity=sparsity, mask_interval=interval, mcc=-0.1 + 0.2 * index
            )
        )
    curves = training_curves(runs[:2])
    assert curves.axes[0].get_yscale() == "log"  # 2 · 0.9^s spans two decades over 60 steps
    eval_line = next(line for line in curves.axes[1].get_lines() if line.get_label() == "adamw")
    np.testing.assert_allclose(eval_line.get_xdata(), [20, 40, 60])
    assert curves.axes[1].get_ylabel() == "dev mcc"

    sparsity = metric_vs_sparsity(runs)
    ax = sparsity.axes[0]
    data = next(line for line in ax.get_lines() if line.get_label() == "adamw+fsam")
    np.testing.assert_allclose(data.get_xdata(), [0.5, 0.9, 0.99])
    np.testing.assert_allclose(data.get_ydata(), [-0.1, 0.1, 0.3])
    reference = next(line for line in ax.get_lines() if line.get_label() == "adamw (reference)")
    np.testing.assert_allclose(reference.get_ydata(), [0.2, 0.2])
    assert metric_vs_mask_interval(runs).axes[0].get_xscale() == "log"  # F_i from 10 to 1000

    fractions = [
        write_run(tmp_path / f"frac{f}", train_fraction=f, mcc=f / 2, seed=s) for f in (0.1, 1.0) for s in (1, 2)
    ]
    fig = metric_vs_train_fraction(fractions)
    line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "adamw")
    np.testing.assert_allclose(line.get_xdata(), [0.1, 1.0])
    np.testing.assert_allclose(line.get_ydata(), [0.05, 0.5])  # the mean over the two seeds


def test_a_sweeps_training_curves_have_one_legend_entry_per_optimizer(tmp_path):
    """Twelve run names beside the axes collapsed the layout (a 12-trial sweep's figure had no room for its axes)."""
    from figures import training_curves
    from figures.runs import MAX_LEGEND_RUNS

    runs = [write_run(tmp_path / f"{sam}{seed}", sam=sam, seed=seed) for sam in ("none", "sam") for seed in range(4)]
    assert len(runs) > MAX_LEGEND_RUNS
    fig = training_curves(runs)
    for ax in fig.axes[:2]:
        assert len([line for line in ax.get_lines() if not line.get_label().startswith("_")]) == 2
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend == ["adamw (4 runs)", "adamw+sam (4 runs)"]
    assert len(training_curves(runs[3:5]).axes[0].get_legend().get_texts()) == 2  # few runs: one entry each


def test_sweeps_over_seeds_draw_bands_and_every_seed(tmp_path):
    from figures.catalogue import figure_specs
    from figures.runs import dev_metric_bands, metric_vs_sam_setting
    from figures.sources import collect

    runs = [write_run(tmp_path / f"rho{rho}-s{seed}", sam="sam", rho=rho, seed=seed, mcc=rho + seed / 100)
            for rho in (0.01, 0.05, 0.1) for seed in (1, 2, 3)]  # fmt: skip
    runs.append(write_run(tmp_path / "adamw", mcc=0.02, rho=0.05))
    fig = metric_vs_sam_setting(runs, "rho")
    ax = fig.axes[0]
    mean = next(line for line in ax.get_lines() if line.get_label() == "adamw+sam")
    np.testing.assert_allclose(mean.get_ydata(), [0.03, 0.07, 0.12])  # mean over the three seeds
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    spread = np.std([0.01, 0.02, 0.03])
    assert band.min() == pytest.approx(0.03 - spread) and band.max() == pytest.approx(0.12 + spread)
    assert sum(len(c.get_offsets()) for c in ax.collections[1:]) == 9  # every seed a dot
    assert any(line.get_label() == "adamw (reference)" for line in ax.get_lines())
    bands = dev_metric_bands(runs)
    labels = [line.get_label() for line in bands.axes[0].get_lines() if not line.get_label().startswith("_")]
    # one band per setting (ρ), over its three seeds; the sweep's settings are not mixed into one band
    assert labels == ["adamw+sam rho=0.01 (n = 3)", "adamw+sam rho=0.05 (n = 3)", "adamw+sam rho=0.1 (n = 3)",
                      "adamw (n = 1)"]  # fmt: skip
    line = next(line for line in bands.axes[0].get_lines() if line.get_label() == labels[0])
    np.testing.assert_allclose(line.get_xdata(), [20, 40, 60])
    stems = [spec.stem for spec in figure_specs(collect(runs))]
    assert "rho-cola" in stems and "dev-bands-cola" in stems


def test_runs_evaluated_once_draw_each_groups_seeds_and_mean_not_an_empty_curve(tmp_path):
    """A sweep without --eval-every has one dev evaluation per run: a curve of one point draws nothing, so each
    group is a column of its seeds' dots with the mean ± std (computed by hand here)."""
    from figures.runs import dev_metric_bands

    runs = []
    for sam, base in (("none", 0.30), ("sam", 0.40)):
        for seed in (1, 2, 3):
            run = write_run(tmp_path / f"{sam}-{seed}", sam=sam, seed=seed, mcc=0.0)
            records = [{"kind": "eval", "step": 60, "split": "dev", "loss": 0.7, "mcc": base + seed / 100}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            runs.append(run)
    ax = dev_metric_bands(runs).axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["adamw\n(n = 3)", "adamw+sam\n(n = 3)"]
    means = [line.get_ydata()[0] for line in ax.get_lines() if line.get_marker() == "o"]
    np.testing.assert_allclose(means, [0.32, 0.42])
    assert sum(len(c.get_offsets()) for c in ax.collections if len(c.get_offsets()) == 3) == 6  # every seed


def test_analyses_figures(tmp_path):
    from figures import fisher_distributions, hessian_spectrum, sharpness_vs_rho, transfer_bars

    runs = [describe_run(tmp_path / "a"), describe_run(tmp_path / "b", sam="sam")]
    hessians = [save_hessian(tmp_path / f"h{i}", run, 100.0 * (i + 1)) for i, run in enumerate(runs)]
    fig = hessian_spectrum(hessians)
    eigen_ax, density_ax = fig.axes
    first = next(line for line in eigen_ax.get_lines() if line.get_label() == "adamw")
    np.testing.assert_allclose(first.get_ydata(), [100, 10, 1, -0.5])  # sorted, largest first
    assert eigen_ax.get_yscale() == "symlog"  # spans decades with a negative eigenvalue
    assert density_ax.get_yscale() == "log"
    assert np.isnan(density_ax.get_lines()[0].get_ydata()[5])  # the zero density is a gap on the log axis

    fig = fisher_distributions(save_fisher(tmp_path / "f", runs[0]))
    hist_ax, quantile_ax, share_ax = fig.axes
    assert hist_ax.get_yscale() == "log" and quantile_ax.get_yscale() == "log"
    assert "log10" in hist_ax.get_xlabel()
    np.testing.assert_allclose([bar.get_height() for bar in share_ax.patches], [0.2, 0.3, 0.5])
    assert [t.get_text() for t in share_ax.get_xticklabels()] == ["encoder.layer.0", "encoder.layer.1", "pooler"]

    fig = sharpness_vs_rho([save_sharpness(tmp_path / f"s{i}", run, 1.0 + i) for i, run in enumerate(runs)])
    assert len(fig.axes) == 4 and fig.axes[0].get_xscale() == "log"  # ρ from 0.001 to 0.1
    assert fig.axes[0].get_xlabel() == "ρ"

    fig = transfer_bars([save_transfer(tmp_path / "t", runs[1])])
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights[:3] == pytest.approx([0.55, 0.81, 0.1])  # pretrained
    assert heights[3] == pytest.approx(0.62) and np.isnan(heights[4]) and heights[5] == pytest.approx(-0.05)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rte\n(accuracy)", "mrpc\n(f1)", "cola\n(mcc)"]


def test_save_figure_writes_vector_pdf_and_png(tmp_path):
    from figures import save_figure, surface_contour

    record = save_surface(tmp_path / "s", describe_run(tmp_path), np.linspace(-1, 1, 5), np.linspace(-1, 1, 3))
    fig = surface_contour(record)
    assert fig.get_size_inches()[0] == pytest.approx(3.3)  # one column
    pdf, png = save_figure(fig, tmp_path / "out" / "contour")
    assert pdf.read_bytes().startswith(b"%PDF") and png.read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_plotly_surface_keeps_orientation_and_nan(tmp_path):
    from figures import surface_plotly, write_surface_html

    a, b = np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 4)
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, b, nan_cells=[(3, 1)])
    (trace,) = surface_plotly(record).data
    np.testing.assert_allclose(trace.x, a)
    np.testing.assert_allclose(trace.y, b)
    z = np.asarray(trace.z, dtype=float)
    assert z.shape == (4, 7)
    np.testing.assert_allclose(z[0, 6], 1.0**2 + 3 * 0.5**2 + 0.1)  # z[j][i] at (a[i], b[j])
    assert np.isnan(z[3, 1]) and np.isfinite(z).sum() == 27
    html = write_surface_html(record, tmp_path / "surface.html").read_text()
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js is inlined, nothing is fetched


def test_vtk_export_reads_back_with_meshio(tmp_path):
    import meshio

    from figures import export_surface_vtk

    a, b = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    record = save_surface(tmp_path / "s", describe_run(tmp_path), a, b, nan_cells=[(2, 1)])
    for suffix in (".vtu", ".vtk"):
        mesh = meshio.read(export_surface_vtk(record, tmp_path / f"surface{suffix}"))
        assert mesh.points.shape == (15, 3)
        np.testing.assert_allclose(mesh.points[2 * 5 + 4], [1.0, 0.5, 0.0])  # point j·n_a + i is (a[i], b[j])
        loss = mesh.point_data["loss"]
        np.testing.assert_allclose(loss[4], 1.0 + 3 * 0.25 + 0.1)  # point 4: (a[4], b[0]) = (1, -0.5)
        assert np.isnan(loss[2 * 5 + 1]) and np.isfinite(loss).sum() == 14
        quads = mesh.cells_dict["quad"]
        assert quads.shape == (8, 4)
        np.testing.assert_array_equal(quads[0], [0, 1, 6, 5])
    line = meshio.read(export_surface_vtk(save_surface(tmp_path / "l", describe_run(tmp_path), a), tmp_path / "l.vtu"))
    assert line.cells_dict["line"].shape == (4, 2)
    with pytest.raises(ConfigError, match=r"\.vtu or \.vtk"):
        export_surface_vtk(record, tmp_path / "surface.xml")


def test_inputs_that_are_not_runs_or_results_are_refused(tmp_path):
    from figures import collect, surface_contour

    with pytest.raises(CheckpointError, match="does not exist"):
        collect([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run directory"):
        collect([tmp_path / "empty"])
    hessian = save_hessian(tmp_path / "h", describe_run(tmp_path), 1.0)
    with pytest.raises(ConfigError, match="expected a 'surface' result"):
        surface_contour(hessian)
    broken = write_run(tmp_path / "broken")
    (broken / "metrics.jsonl").write_text('{"kind": "train"}\nnot json\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2"):
        collect([broken])


def test_catalogue_lists_every_figure_the_inputs_allow(tmp_path):
    from figures import collect, figure_specs

    stems = {spec.stem for spec in figure_specs(collect(write_comparison(tmp_path)))}
    assert stems == {
        "surface-contour-cola-none.surface-2d",
        "surface-metric-contour-cola-none.surface-2d",
        "surface-3d-cola-none.surface-2d",
        "surface-contour-cola-fsam.surface-2d",
        "surface-metric-contour-cola-fsam.surface-2d",
        "surface-3d-cola-fsam.surface-2d",
        "surface-1d-cola",
        "interpolation-cola",
        "training-cola",
        "hessian-cola",
        "fisher-cola-none.fisher",
        "fisher-cola-fsam.fisher",
        "sharpness-cola",
        "transfer",
    }
    # Sweeps appear once the runs hold two values of an option: here s, not F_i (equal) nor the data fraction.
    sweep = [write_run(tmp_path / f"s{s}", sam="fsam", sparsity=s, mcc=s) for s in (0.5, 0.9)]
    assert {spec.stem for spec in figure_specs(collect(sweep))} == {"training-cola", "sparsity-cola"}


def test_figures_command_writes_the_files_and_prints_them(tmp_path, capsys):
    from landscape.cli.main import main

    run = write_run(tmp_path / "cola-fsam", sam="fsam")
    save_surface(run / "analyses" / "surface-2d", describe_run(run, sam="fsam"), np.linspace(-1, 1, 5), [-1, 0, 1])
    save_interpolation(tmp_path / "interpolation", describe_run(run, sam="fsam"), 1.0)  # a result given directly
    out = tmp_path / "figs"
    assert main(["figures", str(run), str(tmp_path / "interpolation"), "--out", str(out), "--formats", "png"]) == 0
    printed = capsys.readouterr().out.split()
    assert all(Path(p).is_file() for p in printed)
    assert {Path(p).name for p in printed} == {
        "surface-contour-cola-fsam.surface-2d.png",
        "surface-metric-contour-cola-fsam.surface-2d.png",
        "surface-3d-cola-fsam.surface-2d.png",
        "interpolation-cola.png",
        "training-cola.png",
        "surface-3d-cola-fsam.surface-2d.html",
        "surface-cola-fsam.surface-2d.vtu",
    }

    assert main(["figures", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere does not exist" in err
    assert main(["figures", str(out), "--out", str(out)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_figures_package_imports_nothing_from_the_model_side():
    """Figures colour by the (torch-free) variant registry, optimizers.variants, and import nothing heavier."""
    modules = sorted(p.stem for p in (REPO / "figures").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys, importlib\n"
        "import figures\n"
        f"for name in {modules!r}: importlib.import_module('figures.' + name)\n"
        "import landscape.cli.figures\n"
        "heavy = [m for m in ('torch', 'transformers', 'landscape.models', 'landscape.training', 'landscape.geometry',"
        " 'optimizers.sam', 'optimizers.pieces', 'analyses') if m in sys.modules]\n"
        "print(len(sys.argv) and ','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(modules) >= 8
    assert done.stdout.strip() == "", f"figures imported model-side modules: {done.stdout.strip()}"


def test_surfaces_of_one_task_share_one_colour_scale_and_z_range(tmp_path):
    from figures.catalogue import figure_specs
    from figures.interactive import surface_plotly
    from figures.landscapes import shared_range
    from figures.sources import collect

    a = b = np.linspace(-1, 1, 5)
    flat = save_surface(tmp_path / "flat", describe_run(tmp_path / "r1"), a, b)  # loss 0.1 .. 4.1
    sharp = save_surface(tmp_path / "sharp", describe_run(tmp_path / "r2", sam="sam"), 2 * a, 2 * b)  # .. 16.1
    collection = collect([flat, sharp])
    low, high = shared_range(collection.surfaces(2))
    assert (low, high) == pytest.approx((0.1, 16.1))
    contours = [s for s in figure_specs(collection) if s.stem.startswith("surface-contour-")]
    assert len(contours) == 2
    for spec in contours:
        fig = spec.draw()
        mappable = next(ax for ax in fig.axes if ax.collections).collections[0]
        assert (mappable.norm.vmin, mappable.norm.vmax) == pytest.approx((low, high))  # not each its own range
    for record in collection.surfaces(2):
        trace = surface_plotly(record, value_range=(low, high)).data[0]
        assert (trace.cmin, trace.cmax) == (low, high)
    three_d = [s for s in figure_specs(collection) if s.stem.startswith("surface-3d-")]
    limits = {tuple(np.round(s.draw().axes[0].get_zlim(), 9)) for s in three_d}
    assert len(limits) == 1  # one z range for both
