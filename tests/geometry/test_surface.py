"""Surfaces and interpolations: docs/pitfalls.md §4-9 against plain evaluations, an analytic loss and an
uninterrupted run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import kill_9_when
from safetensors.torch import save_file
from torch import nn

from landscape.cli.main import main
from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.results import load_result
from landscape.data.tasks import get_task
from landscape.geometry.grids import CellEvaluator
from landscape.geometry.surface import _run_grid, compute_interpolation, compute_surface
from landscape.models.jobs import AnalysisJob, DataSelection
from landscape.models.runs import EvalSubset, evaluate_subset, load_run_model, open_run, select_subset
from landscape.models.weights import read_safetensors


def tiny_subset(run_dir, samples=12, seed=0):
    run = open_run(run_dir)
    loaded = load_run_model(run)
    return loaded, select_subset(run, loaded.tokenizer, samples=samples, seed=seed, batch_size=5)


# --- docs/pitfalls.md §4: eval mode, origin equals a plain evaluation, bitwise repeatable with dropout ----------------


def test_origin_equals_plain_eval_mode_evaluation_and_repeats_bitwise(tiny_run, tmp_path):
    assert json.loads((tiny_run / "run.json").read_text())["config"]["dropout"] == 0.1
    result = compute_surface(tiny_run, tmp_path / "s", grid=3, data=DataSelection(samples=12, seed=1, batch_size=5))
    loaded, subset = tiny_subset(tiny_run, samples=12, seed=1)
    loaded.model.train()  # evaluate_subset must switch dropout off by itself
    plain = evaluate_subset(loaded.model, subset)
    assert result.arrays["a"][1] == 0.0 and result.arrays["b"][1] == 0.0
    assert result.arrays["loss"][1, 1] == plain.loss
    assert result.arrays["metric"][1, 1] == plain.metric
    again = compute_surface(tiny_run, tmp_path / "again", grid=3, data=DataSelection(samples=12, seed=1, batch_size=5))
    assert again.arrays["loss"].tobytes() == result.arrays["loss"].tobytes()
    assert loaded.model.training  # the model's own mode came back


# --- docs/pitfalls.md §5: the model exactly restored, also after an exception mid-grid --------------------------------


def test_cell_evaluator_restores_weights_flags_and_modes_after_an_exception(tiny_run, monkeypatch):
    loaded, subset = tiny_subset(tiny_run)
    model = loaded.model
    model.train()
    model.bert.encoder.eval()  # mixed modes must come back per module, not as one flag
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name.startswith("classifier"))
    before = {name: p.detach().clone() for name, p in params.items()}
    modes = {name: m.training for name, m in model.named_modules()}
    direction = {name: torch.randn_like(p) for name, p in params.items()}

    calls = {"n": 0}
    real = evaluate_subset

    def failing(model_, subset_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker died")
        return real(model_, subset_)

    monkeypatch.setattr("landscape.geometry.grids.evaluate_subset", failing)
    with pytest.raises(RuntimeError, match="worker died"), CellEvaluator(model, subset, [direction]) as evaluator:
        for c in (0.5, -0.5, 1.0):
            evaluator((c,))
    for name, p in params.items():
        assert p.detach().numpy().tobytes() == before[name].numpy().tobytes(), name
        assert p.requires_grad == name.startswith("classifier"), name
    assert {name: m.training for name, m in model.named_modules()} == modes


# --- docs/pitfalls.md §6: orientation of a non-square grid over an analytic loss --------------------------------------


class AnalyticModel(nn.Module):
    """Regression "model" with two weights (x, y): example 0 predicts x, example 1 predicts √3·y (labels 0), so the
    mean squared error is (x² + 3y²) / 2."""

    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        which = input_ids[:, 0]
        prediction = torch.where(which == 0, self.xy[0], np.sqrt(3.0) * self.xy[1])
        return SimpleNamespace(logits=prediction.unsqueeze(1))


class InProcessExecutor:
    name = "serial"

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def run(self, job, chunks, on_chunk):
        for chunk in chunks:
            on_chunk([(number, *self.evaluator(cell)) for number, cell in chunk])


def test_non_square_grid_matches_the_formula_at_the_labelled_coordinates(tmp_path):
    task = get_task("stsb")
    batch = {
        "input_ids": torch.tensor([[0], [1]]),
        "attention_mask": torch.ones(2, 1, dtype=torch.int64),
        "labels": torch.zeros(2, dtype=torch.float32),
    }
    subset = EvalSubset(task=task, split="dev", seed=0, split_size=2, indices=np.arange(2), batches=(batch,))
    model = AnalyticModel()
    d1 = {"xy": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    d2 = {"xy": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    a, b = np.linspace(-1.0, 2.0, 7), np.linspace(-0.5, 1.5, 5)
    coefficients = [(float(a[i]), float(b[j])) for j in range(5) for i in range(7)]
    with CellEvaluator(model, subset, [d1, d2]) as evaluator:
        result = _run_grid(job=AnalysisJob("surface", tmp_path / "g", {"test": 1}), axes={"a": a, "b": b},
                           shape=(5, 7), coefficients=coefficients, grid_job=None, meta={},
                           executor=InProcessExecutor(evaluator), progress=False,
                           chunk_size=4)  # fmt: skip
    stored = load_result(tmp_path / "g")
    assert stored.arrays["loss"].shape == (5, 7) and stored.meta["complete"]
    expected = (a[None, :] ** 2 + 3 * b[:, None] ** 2) / 2  # rows b, columns a
    np.testing.assert_allclose(stored.arrays["loss"], expected, rtol=1e-6, atol=1e-9)
    assert stored.arrays["loss"][4, 0] == pytest.approx((1.0 + 3 * 1.5**2) / 2, rel=1e-6)  # a = -1, b = 1.5
    assert result.arrays["done"].all()


# --- docs/pitfalls.md §7: interpolation endpoints exact ---------------------------------------------------------------


def test_interpolation_endpoints_are_the_two_checkpoints_exactly(tiny_run, tmp_path):
    result = compute_interpolation(tiny_run, tmp_path / "i", points=3, data=DataSelection(samples=12))
    assert list(result.arrays["alpha"]) == [-1.0, 0.0, 1.0]
    run = open_run(tiny_run)
    final = load_run_model(run, "final")
    init = load_run_model(run, "init")
    subset = select_subset(run, final.tokenizer, samples=12, seed=0)
    assert result.arrays["loss"][1] == evaluate_subset(final.model, subset).loss
    assert result.arrays["loss"][0] == evaluate_subset(init.model, subset).loss
    assert result.meta["theta0"]["weights"] == "init" and result.meta["endpoint"] == "init"


def test_interpolation_between_two_runs_reaches_the_other_run(tiny_run, tiny_sam_run, tmp_path):
    result = compute_interpolation(tiny_run, tmp_path / "i", to=tiny_sam_run, points=3, data=DataSelection(samples=12))
    run = open_run(tiny_sam_run)
    other = load_run_model(run, "final")
    subset = select_subset(run, other.tokenizer, samples=12, seed=0)
    assert result.arrays["loss"][0] == evaluate_subset(other.model, subset).loss
    assert result.meta["theta0"]["label"] == "adamw+sam"


def test_mismatched_checkpoints_give_a_clear_error(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    tensors = read_safetensors(other / "final.safetensors")
    tensors["classifier.weight"] = torch.zeros(3, tensors["classifier.weight"].shape[1])  # a 3-class head
    tensors["classifier.bias"] = torch.zeros(3)
    save_file(tensors, str(other / "final.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 of other shape \(e.g. classifier\.bias \(3,\) vs \(2,\)\)"):
        compute_interpolation(tiny_run, tmp_path / "i", to=other, points=3, data=DataSelection(samples=4))


# --- docs/pitfalls.md §8/9 and resumption ----------------------------------------------------------------------------


def test_unfinished_cells_are_nan_and_not_done_and_a_rerun_completes_them(tiny_run, tmp_path, monkeypatch):
    reference = compute_surface(tiny_run, tmp_path / "ref", grid=(4, 3), data=DataSelection(samples=8))
    calls = {"n": 0}
    real = evaluate_subset

    def dies_after_five(model, subset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(model, subset)

    monkeypatch.setattr("landscape.geometry.grids.evaluate_subset", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        compute_surface(tiny_run, tmp_path / "s", grid=(4, 3), data=DataSelection(samples=8))
    partial = load_result(tmp_path / "s")
    assert not partial.meta["complete"] and partial.arrays["done"].sum() == 5
    assert np.isnan(partial.arrays["loss"][~partial.arrays["done"]]).all()
    assert np.isnan(partial.arrays["metric"][~partial.arrays["done"]]).all()
    monkeypatch.setattr("landscape.geometry.grids.evaluate_subset", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(model, subset):
        counted["n"] += 1
        return real(model, subset)

    monkeypatch.setattr("landscape.geometry.grids.evaluate_subset", counting)
    resumed = compute_surface(tiny_run, tmp_path / "s", grid=(4, 3), data=DataSelection(samples=8))
    assert counted["n"] == 12 - 5  # only the missing cells
    assert resumed.arrays["loss"].tobytes() == reference.arrays["loss"].tobytes()
    assert resumed.arrays["metric"].tobytes() == reference.arrays["metric"].tobytes()


def _done_count(out: Path) -> int:
    try:
        return int(load_result(out).arrays["done"].sum())
    except Exception:  # mid-write by the other process: try again
        return -1


def test_kill_9_then_rerun_gives_bitwise_the_uninterrupted_arrays(tiny_run, tmp_path):
    args = ["surface", str(tiny_run), "--grid", "7", "--samples", "8", "--no-progress", "--checkpoint-every", "0"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    straight = load_result(tmp_path / "straight")
    out = tmp_path / "killed"
    kill_9_when([*args, "--out", str(out)], lambda: _done_count(out) >= 5)
    partial = load_result(out, accept_newer_arrays=True)  # the kill may land between the two renames of a save
    assert 0 < partial.arrays["done"].sum() < 49, "the kill must land mid-grid for this test to mean anything"
    assert main([*args, "--out", str(out)]) == 0
    resumed = load_result(out)
    assert resumed.meta["complete"]
    for name in ("loss", "metric", "done", "a", "b"):
        assert resumed.arrays[name].tobytes() == straight.arrays[name].tobytes(), name


# --- executors ----------------------------------------------------------------------------------------------


def test_serial_and_ray_give_identical_arrays(tiny_run, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'landscape[ray]')")
    serial = compute_surface(tiny_run, tmp_path / "serial", grid=(3, 4), data=DataSelection(samples=12))
    ray_result = compute_surface(tiny_run, tmp_path / "ray", grid=(3, 4), data=DataSelection(samples=12),
                                 executor="ray", workers=2, chunk_size=2)  # fmt: skip
    assert ray_result.meta["executor"] == "ray" and ray_result.meta["complete"]
    for name in ("loss", "metric", "done"):
        assert ray_result.arrays[name].tobytes() == serial.arrays[name].tobytes(), name


def test_gpus_per_worker_without_gpus_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'landscape[ray]')")
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without GPUs")
    out = tmp_path / "s"
    argv = ["surface", str(tiny_run), "--grid", "2", "--samples", "4", "--executor", "ray", "--workers", "1",
            "--gpus-per-worker", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--gpus-per-worker 1: this machine has 0 GPU(s)" in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_ray_is_a_clear_error(monkeypatch):
    from landscape.geometry.grids import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ConfigError, match=r"pip install 'landscape\[ray\]'"):
        make_executor("ray")


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_surface_prints_where_it_wrote_resumes_and_refuses_other_parameters(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["surface", str(tiny_run), "--grid", "3", "--samples", "1000", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    result = load_result(out)
    assert result.meta["data"]["samples"] == result.meta["data"]["split_size"] == 16  # 1000 >= 16: all
    assert main(args) == 0  # complete: nothing recomputed
    assert main([*args[:-3], "--seed", "3", "--out", str(out)]) == 2
    assert "other parameters" in capsys.readouterr().err
    assert main([*args, "--seed", "3", "--overwrite"]) == 0
    assert load_result(out).meta["identity"]["direction_seed"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", "1"], "--grid"),
        (["--range", "1", "-1"], "A < B"),
        (["--samples", "0"], "positive integer"),
        (["--norm", "weird"], "invalid choice"),
    ],
)
def test_cli_surface_bad_values_exit_2_with_one_line(tiny_run, tmp_path, capsys, extra, message):
    try:
        code = main(["surface", str(tiny_run), "--out", str(tmp_path / "s"), *extra])
    except SystemExit as exc:  # argparse's own errors exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_weights_file_of_a_run_is_analysed_as_that_run_with_those_weights(tiny_run, tmp_path, capsys):
    """An intermediate checkpoint's model.safetensors, or init.safetensors, is a model source of its own: the
    surface of ``RUN/init.safetensors`` is the surface of ``RUN --weights init``, value for value."""
    base = ["--grid", "3", "--samples", "6", "--no-progress"]
    assert main(["surface", str(tiny_run / "init.safetensors"), *base, "--out", str(tmp_path / "file")]) == 0
    assert main(["surface", str(tiny_run), "--weights", "init", *base, "--out", str(tmp_path / "run")]) == 0
    from_file, from_run = load_result(tmp_path / "file"), load_result(tmp_path / "run")
    np.testing.assert_array_equal(from_file.arrays["loss"], from_run.arrays["loss"])
    assert from_file.meta["checkpoint_sha256"] == from_run.meta["checkpoint_sha256"]
    capsys.readouterr()
    lone = tmp_path / "lone.safetensors"
    shutil.copy(tiny_run / "init.safetensors", lone)
    assert main(["surface", str(lone), *base, "--out", str(tmp_path / "lone")]) == 2
    assert "pass --task and --model" in capsys.readouterr().err and not (tmp_path / "lone").exists()


def test_cli_interpolate_task_override_and_missing_run(tiny_run, tmp_path, capsys):
    assert main(["interpolate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["interpolate", str(tiny_run), "--to", str(tiny_run), "--random", "--out", str(tmp_path / "i")]) == 2
    assert "not both" in capsys.readouterr().err
    out = tmp_path / "i2"
    assert (
        main(["interpolate", str(tiny_run), "--points", "3", "--samples", "4", "--out", str(out), "--no-progress"]) == 0
    )
    assert load_result(out).meta["data"]["task"] == "sst2"


def test_a_cell_does_not_depend_on_the_cells_before_it(tiny_run):
    """docs/pitfalls.md §9: a point is written from θ, so after 50 other cells it is bitwise what it is when computed
    first,
    and within float32 rounding of the float64 combination."""
    from landscape.core.params import combine

    loaded, subset = tiny_subset(tiny_run)
    model = loaded.model
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    d1, d2 = ({name: torch.randn(t.shape, generator=generator) for name, t in theta.items()} for _ in range(2))
    with CellEvaluator(model, subset, [d1, d2]) as evaluator:
        evaluator.set_point((0.3, -0.7))
        first = {name: p.detach().clone() for name, p in model.named_parameters()}
        for step in np.linspace(-1, 1, 50):
            evaluator.set_point((step, 0.1 * step))
        evaluator.set_point((0.3, -0.7))
        reference = combine(theta, [(0.3, d1), (-0.7, d2)])
        for name, p in model.named_parameters():
            assert p.detach().numpy().tobytes() == first[name].numpy().tobytes(), name
            torch.testing.assert_close(p.detach(), reference[name], rtol=2e-7, atol=2e-7)


def test_cells_write_only_the_embedding_rows_the_subset_reads_with_bitwise_the_same_losses(tiny_run):
    """After the first evaluation a cell writes only the word-embedding rows of tokens in the subset (and skips
    parameters whose directions are zero); the losses are bitwise those of writing every weight, and the rows no
    example reads hold θ."""
    loaded, subset = tiny_subset(tiny_run)
    model = loaded.model
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    d1, d2 = ({name: torch.randn(t.shape, generator=generator) for name, t in theta.items()} for _ in range(2))
    for d in (d1, d2):
        d["bert.embeddings.LayerNorm.bias"].zero_()  # a direction that is zero in one parameter (--ignore-1d's)
    cells = [(0.3, -0.7), (0.0, 0.0), (-1.0, 0.5), (0.25, 0.0)]
    with CellEvaluator(model, subset, [d1, d2], only_read_rows=False) as evaluator:
        everything = [evaluator(cell) for cell in cells]
    with CellEvaluator(model, subset, [d1, d2]) as evaluator:
        restricted = [evaluator(cell) for cell in cells]
        assert "bert.embeddings.LayerNorm.bias" not in evaluator._moving  # never written again after the first cell
        table = "bert.embeddings.word_embeddings.weight"
        read = evaluator._rows[table]
        tokens = torch.unique(torch.cat([batch["input_ids"].reshape(-1) for batch in subset.batches]))
        assert torch.equal(read, tokens) and len(read) < theta[table].shape[0]
        unread = torch.ones(theta[table].shape[0], dtype=torch.bool)
        unread[read] = False
        current = dict(model.named_parameters())
        assert torch.equal(current[table].detach()[unread], theta[table][unread])
        expected = theta[table][read] + 0.25 * d1[table][read]
        assert torch.equal(current[table].detach()[read], expected)
    assert restricted == everything
