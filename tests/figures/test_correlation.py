"""Sharpness against the dev metric across runs: Kendall's τ-b against its definition counted pair by pair, the
bootstrap interval, the pairing of runs with their results (also inside a sweep), and the figure first in the
catalogue."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from figures.catalogue import figure_specs
from figures.correlation import kendall_tau, run_points, sharpness_vs_metric, tau_interval
from figures.sources import collect
from landscape.core.results import Result, save_result


def tau_b_by_pairs(x, y) -> float:
    """(C − D) / √((n₀ − n₁)(n₀ − n₂)): C, D concordant / discordant pairs, n₁, n₂ pairs tied in x / in y."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tied_x += dx == 0
        tied_y += dy == 0
        if dx * dy > 0:
            concordant += 1
        elif dx * dy < 0:
            discordant += 1
    n0 = len(x) * (len(x) - 1) / 2
    return (concordant - discordant) / math.sqrt((n0 - tied_x) * (n0 - tied_y))


def test_kendall_tau_is_tau_b_counted_pair_by_pair():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9)
    assert kendall_tau(x, y) == pytest.approx(tau_b_by_pairs(x, y), abs=1e-12)
    tied_x, tied_y = np.array([1, 1, 2, 3, 3, 4.0]), np.array([2, 1, 1, 5, 4, 4.0])
    assert kendall_tau(tied_x, tied_y) == pytest.approx(tau_b_by_pairs(tied_x, tied_y), abs=1e-12)
    assert math.isnan(kendall_tau([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))  # a constant variable has no τ


def test_the_bootstrap_interval_is_seeded_ordered_and_exact_for_a_monotone_relation():
    x = np.arange(8.0)
    assert tau_interval(x, 3 * x + 1) == (1.0, 1.0)  # every non-degenerate resample is perfectly concordant
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=12), rng.normal(size=12)
    low, high = tau_interval(a, b, seed=3)
    assert -1 <= low <= kendall_tau(a, b) <= high <= 1
    assert tau_interval(a, b, seed=3) == (low, high)
    assert all(math.isnan(v) for v in tau_interval([1.0, 2.0], [2.0, 1.0]))  # two runs: no interval


def write_run(folder: Path, label: tuple[str, str], accuracy: float, sharpness: float, eigenvalue: float) -> Path:
    folder.mkdir(parents=True)
    optimizer, sam = label
    config = {"task": "sst2", "optimizer": optimizer, "sam": sam, "seed": 1}
    info = {"config": config, "task": "sst2", "status": "completed", "dev_metrics": {"accuracy": accuracy}}
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "accuracy": accuracy}) + "\n")
    run = {"path": str(folder), "optimizer": optimizer, "sam": sam, "task": "sst2", "label": f"{optimizer}+{sam}"}
    arrays = {"rho": np.array([0.05]), "eps_sharpness_pgd": np.array([sharpness]),
              "eigenvalues": np.array([eigenvalue, eigenvalue / 2])}  # fmt: skip
    save_result(Result("sharpness", arrays, {"run": run, "metric_name": "accuracy"}), folder / "analyses" / "sharpness")
    return folder


def test_runs_are_paired_with_their_own_results_and_the_figure_comes_first(tmp_path):
    accuracy = [0.80, 0.84, 0.845, 0.90, 0.88]
    sharpness = [0.30, 0.20, 0.25, 0.05, 0.10]
    eigenvalue = [5.0, 9.0, 1.0, 4.0, 2.0]
    sweep = tmp_path / "sweep" / "trials"
    for i, (acc, sh, ev) in enumerate(zip(accuracy, sharpness, eigenvalue, strict=True)):
        write_run(sweep / f"seed-{i}", ("adamw", "sam" if i % 2 else "none"), acc, sh, ev)
    collection = collect([tmp_path / "sweep"])  # a sweep directory reads as its trials
    points = {p.path.name: p for p in run_points(collection)}
    assert len(points) == 5
    assert points["seed-3"].metric == 0.90 and points["seed-3"].measures["ε-sharpness (PGD)"] == 0.05
    assert points["seed-1"].measures["top Hessian eigenvalue"] == 9.0
    specs = figure_specs(collection)
    assert specs[0].stem == "sharpness-vs-dev-metric"
    fig = sharpness_vs_metric(collection)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    expected = kendall_tau(sharpness, accuracy)
    assert expected == pytest.approx(-0.8)  # 9 of the 10 pairs discordant: flatter runs generalise better here
    assert any(title.startswith(f"τ = {expected:.2f} [") and title.endswith("n = 5") for title in titles)
    assert len(titles) == 2  # the two measures these results hold


def test_without_measures_the_figure_says_what_to_run(tmp_path):
    from landscape.core.errors import ConfigError

    for i in range(3):
        folder = tmp_path / f"run-{i}"
        folder.mkdir()
        info = {"config": {"task": "sst2"}, "task": "sst2", "dev_metrics": {"accuracy": 0.5 + i / 10}}
        (folder / "run.json").write_text(json.dumps(info))
    collection = collect(sorted(tmp_path.iterdir()))
    assert all(spec.stem != "sharpness-vs-dev-metric" for spec in figure_specs(collection))
    with pytest.raises(ConfigError, match="run hessian, sharpness or a 2-D surface"):
        sharpness_vs_metric(collection)
