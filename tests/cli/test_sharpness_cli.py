"""``landscape sharpness`` end to end on the tiny runs: result written and loadable, reruns, refusals, bad values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import exit_status

from landscape.cli.main import main
from landscape.core.results import load_result

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

FAST = ["--samples", "4", "--pgd-steps", "1", "--gaussian-samples", "2", "--batch-size", "4"]


def test_sharpness_cli_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "sharpness"
    argv = ["sharpness", str(tiny_run), "--rho", "0.01", "0.05", "--sigma", "0.005", "0.01", *FAST, "--out", str(out)]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    result = load_result(out)
    assert result.kind == "sharpness" and result.meta["complete"]
    np.testing.assert_array_equal(result.arrays["rho"], [0.01, 0.05])
    np.testing.assert_array_equal(result.arrays["sigma"], [0.005, 0.01])
    for name in ("eps_sharpness_ascent", "eps_sharpness_pgd", "adaptive_sharpness"):
        assert result.arrays[name].shape == (2,) and np.all(np.isfinite(result.arrays[name]))
    assert np.all(result.arrays["eps_sharpness_pgd"] >= result.arrays["eps_sharpness_ascent"])
    assert result.arrays["average_sharpness"].shape == result.arrays["average_sharpness_se"].shape == (2,)
    assert result.arrays["instance_sharpness"].shape == (4,)
    meta = result.meta
    assert meta["run"]["label"] == "adamw" and meta["data"]["samples"] == 4 and meta["data"]["split"] == "train"
    assert meta["metric_name"] == "accuracy" and meta["fisher_trace"] > 0 and meta["wall_time_s"] > 0
    assert meta["conventions"]["pgd_steps"] == 1 and meta["conventions"]["gaussian_samples"] == 2
    assert len(meta["checkpoint_sha256"]) == 64

    saved_at = json.loads((out / "meta.json").read_text())["saved_at"]
    assert main(argv) == 0  # the same parameters: nothing recomputed
    assert "already complete" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["saved_at"] == saved_at

    other = ["sharpness", str(tiny_run), "--rho", "0.1", *FAST, "--out", str(out)]
    assert main(other) == 2  # other parameters refuse
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rho" in err and "--overwrite" in err
    assert main([*other, "--overwrite"]) == 0
    np.testing.assert_array_equal(load_result(out).arrays["rho"], [0.1])


def test_sharpness_of_the_sam_run_with_the_hessian_trace(tiny_sam_run, tmp_path):
    """The Hessian path loads the model with eager attention (double backward); Lanczos is checked against a closed
    form in test_sharpness.py, where it is cheap."""
    pytest.importorskip("analyses.hessian")
    out = tmp_path / "sam"
    argv = ["sharpness", str(tiny_sam_run), "--rho", "0.05", *FAST, "--pgd-steps", "0", "--trace-samples", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    result = load_result(out)
    assert np.isfinite(result.arrays["trace"]) and result.arrays["trace_se"] >= 0
    assert "eigenvalues" not in result.arrays
    assert result.meta["run"]["label"] == "adamw+sam"
    np.testing.assert_array_equal(result.arrays["eps_sharpness_pgd"], result.arrays["eps_sharpness_ascent"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rho", "-0.1"], "--rho takes finite numbers >= 0, got -0.1"),
        (["--sigma", "nan"], "--sigma takes finite numbers >= 0, got nan"),
        (["--pgd-steps", "-1"], "--pgd-steps takes an integer >= 0, got -1"),
        (["--pgd-step-size", "0"], "--pgd-step-size takes a finite fraction of rho > 0, got 0.0"),
        (["--eta", "-1"], "--eta takes finite numbers >= 0, got -1.0"),
        (["--trace-samples", "1"], "--trace-samples needs at least 2 samples"),
        (["--gaussian-samples", "0"], "expected a positive integer, got 0"),
        (["--rho", "abc"], "invalid float value: 'abc'"),
    ],
)
def test_sharpness_cli_bad_values_exit_2_with_one_line(tiny_run, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert exit_status(["sharpness", str(tiny_run), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_sharpness_cli_missing_run_exits_2(tmp_path, capsys):
    assert main(["sharpness", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
