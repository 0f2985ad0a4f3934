"""``landscape hessian`` end to end on the tiny run: the result, its resume rules, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import exit_status

from analyses.hessian import HessianOperator, name_filter
from landscape.cli.main import main
from landscape.core.results import load_result
from landscape.models.runs import load_run_model, open_run, select_subset

BLOCK = r"^classifier\.|encoder\.layer\.1\.output\.LayerNorm\."  # 130 scalars: the dense Hessian is cheap


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_block_hessian(tiny_run, samples: int, seed: int) -> np.ndarray:
    """The Hessian over the block's parameters, column by column, on the examples the command selects."""
    run = open_run(tiny_run)
    loaded = load_run_model(run, attn_implementation="eager")
    subset = select_subset(run, loaded.tokenizer, samples=samples, seed=seed, batch_size=32)
    operator = HessianOperator(loaded.model, subset, parameter_filter=name_filter(BLOCK))
    return torch.stack([operator.matvec(e) for e in torch.eye(operator.dim, dtype=torch.float64)]).numpy()


def test_hessian_command_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "hessian"
    argv = ["hessian", str(tiny_run), "--params", BLOCK, "--top-k", "2", "--samples", "12", "--seed", "1",
            "--tol", "1e-6", "--trace", "--trace-method", "both", "--trace-samples", "24", "--density",
            "--density-steps", "12", "--density-grid", "400", "--progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"written to {out}" in captured.out
    assert "Hessian-vector products:" in captured.err

    result = load_result(out)
    dense = dense_block_hessian(tiny_run, samples=12, seed=1)
    exact = np.linalg.eigvalsh((dense + dense.T) / 2)
    np.testing.assert_allclose(result.arrays["eigenvalues"], exact[::-1][:2], rtol=1e-4, atol=1e-6 * exact.max())
    assert result.arrays["converged"].dtype == bool and result.arrays["converged"].all()
    assert (result.arrays["residuals"] <= 1e-6 * np.maximum(1, np.abs(exact[::-1][:2]))).all()
    trace = np.trace(dense)
    assert abs(float(result.arrays["trace"]) - trace) <= 3 * float(result.arrays["trace_se"])
    assert abs(float(result.arrays["hutchpp_trace"]) - trace) <= 3 * float(result.arrays["hutchpp_trace_se"])
    grid, density = result.arrays["density_grid"], result.arrays["density"]
    assert grid.shape == density.shape == (400,)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-2)

    meta = result.meta
    assert meta["kind"] == "hessian" and meta["complete"] is True
    assert meta["which"] == "LA" and meta["top_k"] == 2 and meta["backend"] == "native"
    assert meta["data"]["samples"] == 12 and meta["data"]["seed"] == 1
    assert meta["run"]["path"] == str(tiny_run)
    assert len(meta["checkpoint_sha256"]) == 64 and meta["wall_time_s"] > 0
    assert meta["parameters"]["dim"] == 130

    saved = (out / "meta.json").read_text()
    assert main(argv) == 0  # same parameters: nothing recomputed
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "meta.json").read_text() == saved

    assert main([*argv[:5], "3", *argv[6:]]) == 2  # --top-k 3: other parameters
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_k was 2, now 3" in err and "--overwrite" in err
    assert json.loads((out / "meta.json").read_text())["top_k"] == 2

    assert main([*argv[:5], "3", *argv[6:], "--overwrite"]) == 0
    assert load_result(out).meta["top_k"] == 3


def test_pyhessian_backend_from_the_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "pyhessian"
    argv = ["hessian", str(tiny_run), "--params", BLOCK, "--top-k", "1", "--samples", "12", "--seed", "1",
            "--backend", "pyhessian", "--max-iter", "300", "--tol", "1e-5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = load_result(out)
    dense = dense_block_hessian(tiny_run, samples=12, seed=1)
    exact = np.linalg.eigvalsh((dense + dense.T) / 2)
    assert result.meta["which"] == "LM" and result.meta["backend"] == "pyhessian"
    assert result.arrays["eigenvalues"][0] == pytest.approx(exact[np.argmax(np.abs(exact))], rel=1e-3)
    assert np.isfinite(result.arrays["residuals"]).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "0"], "expected a positive integer, got 0"),
        (["--which", "largest"], "invalid choice: 'largest'"),
        (["--params", "("], "is not a regular expression"),
        (["--params", "no-such-parameter"], "selects no parameter"),
        (["--backend", "pyhessian", "--which", "LA"], "largest-magnitude eigenvalues only"),
        (["--backend", "pyhessian", "--density"], "torch.eig"),
        (["--tol", "-1"], "expected a positive number, got -1"),
        (["--top-k", "100", "--params", "^classifier\\.bias$"], "--top-k 100 exceeds the 2 selected parameters"),
    ],
)
def test_bad_values_exit_2_with_one_line(tiny_run, tmp_path, capsys, extra, message):
    assert exit_status(["hessian", str(tiny_run), "--samples", "4", "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err
    assert not (tmp_path / "r" / "meta.json").exists()


def test_missing_run_exits_2(tmp_path, capsys):
    assert main(["hessian", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
