"""Hessian, sharpness and Fisher resume after a kill from their last kept unit or partial state, and give bitwise the
arrays of an uninterrupted run (as surfaces do): kill -9 of the real command mid-Lanczos, and interruptions right
after each kind of save (a finished unit, a partial Lanczos / Hutchinson / Fisher-sum state)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import exit_status, kill_9_when

from landscape.cli.main import main
from landscape.core.results import load_result
from landscape.models import jobs

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def assert_bitwise_equal(resumed: Path, straight: Path) -> None:
    a, b = load_result(resumed), load_result(straight)
    assert a.meta["complete"] and b.meta["complete"]
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), name
        assert a.arrays[name].dtype == b.arrays[name].dtype, name
    assert not any(name.startswith(("unit--", "partial--")) for name in a.arrays)  # the progress is gone
    for key in ("loss", "metric", "metric_name"):
        assert a.meta.get(key) == b.meta.get(key), key


def _partial_steps(out: Path) -> int:
    try:
        result = load_result(out, accept_newer_arrays=True)
    except Exception:  # not written yet, or mid-write
        return -1
    alphas = result.arrays.get("partial--eigen--alphas")
    return -1 if alphas is None else len(alphas)


def test_kill_9_mid_lanczos_then_rerun_gives_bitwise_the_uninterrupted_hessian(tiny_run, tmp_path):
    args = ["hessian", str(tiny_run), "--top-k", "2", "--max-iter", "60", "--tol", "1e-12", "--trace",
            "--trace-samples", "6", "--samples", "8", "--checkpoint-every", "0", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    kill_9_when([*args, "--out", str(out)], lambda: _partial_steps(out) >= 8)
    assert 0 < _partial_steps(out) < 60, "the kill must land mid-Lanczos for this test to mean anything"
    assert main([*args, "--out", str(out)]) == 0
    assert_bitwise_equal(out, tmp_path / "straight")
    assert load_result(out).meta["resumed_units"] == 1


class Killed(BaseException):
    """Stands for a kill right after a save (BaseException: nothing in the analysis catches it)."""


def interrupt_when(monkeypatch, condition) -> None:
    """Make the first save after which ``condition(progress)`` holds the last thing the analysis does."""
    original = jobs.Progress._save

    def save(self):
        original(self)
        if condition(self):
            raise Killed

    monkeypatch.setattr(jobs.Progress, "_save", save)


def partial_named(name: str, at_least: int = 1):
    def condition(progress) -> bool:
        if progress._partial is None or progress._partial[0] != name:
            return False
        arrays = progress._partial[1]
        done = (
            len(arrays["alphas"])
            if "alphas" in arrays
            else len(arrays.get("values", [])) or int(arrays.get("batches_done", 0))
        )
        return done >= at_least

    return condition


SHARPNESS = ["--rho", "0.01", "0.05", "--sigma", "0.01", "--samples", "6", "--pgd-steps", "2", "--gaussian-samples",
             "2", "--batch-size", "3", "--top-k", "1", "--trace-samples", "3", "--checkpoint-every", "0"]  # fmt: skip
SHARPNESS_STOPS = {
    "after-eval": lambda p: set(p.units) == {"evaluation"},
    "mid-rho": lambda p: "epsilon-1" in p.units,
    "mid-lanczos": partial_named("eigen", at_least=3),
    "mid-hutchinson": partial_named("trace", at_least=2),
}


@pytest.mark.parametrize("stop", list(SHARPNESS_STOPS))
def test_sharpness_resumes_after_any_save_bitwise(stop, tiny_run, tmp_path, monkeypatch):
    assert main(["sharpness", str(tiny_run), *SHARPNESS, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        interrupt_when(patch, SHARPNESS_STOPS[stop])
        with pytest.raises(Killed):
            main(["sharpness", str(tiny_run), *SHARPNESS, "--out", str(out)])
    partial = load_result(out)
    assert not partial.meta["complete"] and partial.meta["progress"]["units"]
    assert main(["sharpness", str(tiny_run), *SHARPNESS, "--out", str(out)]) == 0
    assert_bitwise_equal(out, tmp_path / "straight")
    assert load_result(out).meta["resumed_units"] >= 1


FISHER_STOPS = {
    "sums-after-1-batch": partial_named("fisher", at_least=1),
    "one-diagonal": lambda p: list(p.units) == ["fisher"],
    "compare-sums": partial_named("compare", at_least=2),
}


@pytest.mark.parametrize("stop", list(FISHER_STOPS))
def test_fisher_resumes_from_its_running_sums_bitwise(stop, tiny_run, tiny_sam_run, tmp_path, monkeypatch):
    args = ["fisher", str(tiny_run), "--samples", "12", "--batch-size", "3", "--compare", str(tiny_sam_run),
            "--checkpoint-every", "0"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        interrupt_when(patch, FISHER_STOPS[stop])
        with pytest.raises(Killed):
            main([*args, "--out", str(out)])
    assert not load_result(out).meta["complete"]
    assert main([*args, "--out", str(out)]) == 0
    assert_bitwise_equal(out, tmp_path / "straight")
    straight, resumed = load_result(tmp_path / "straight"), load_result(out)
    assert resumed.meta["compare"] == straight.meta["compare"]
    assert resumed.meta["num_examples"] == straight.meta["num_examples"] == 12


def test_a_negative_checkpoint_interval_is_one_line(tiny_run, tmp_path, capsys):
    assert exit_status(["fisher", str(tiny_run), "--checkpoint-every", "-1", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "argument --checkpoint-every: expected a number >= 0, got -1" in err and err.count("\n") == 1, err
    assert not (tmp_path / "f").exists()
