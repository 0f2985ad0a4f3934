"""Bad inputs, crafted files and kills, through the real command: one line and status 2, nothing overwritten or
silently wrong (each case is one the reliability review found failing)."""

import hashlib
import json
import os
import pickle
import shutil
import stat

import numpy as np
import pytest

from landscape.cli.main import main
from landscape.core.results import load_result


def one_line_error(capsys, *argv) -> str:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors exit (status 2, one line) from inside main
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tiny_train(model_dir, data_dir, out, *extra):
    return ["train", "--task", "sst2", "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--batch-size", "8", "--lr", "1e-3", "--seed", "3", "--no-progress", *extra]  # fmt: skip


# --- every float option is checked for finiteness and range before anything is written --------------------------

BAD_FLOATS = [
    ("--weight-decay", "nan", "weight_decay must be a finite number"),
    ("--lr", "inf", "lr must be a finite number"),
    ("--lr", "1e39", "lr must be in (0, 1000]"),
    ("--lr", "-1e-3", "lr must be in (0, 1000], got -0.001"),  # a negative value reaches the check (argparse)
    ("--rho", "nan", "rho must be a finite number"),
    ("--rho", "-0.1", "rho must be >= 0"),
    ("--delta-beta", "inf", "delta_beta must be a finite number"),
    ("--eta", "-1", "eta must be >= 0"),
    ("--gsam-alpha", "nan", "gsam_alpha must be a finite number"),
    ("--max-grad-norm", "nan", "max_grad_norm must be a finite number"),
    ("--warmup-ratio", "nan", "warmup_ratio must be a finite number"),
    ("--esam-beta", "1.5", "esam_beta must be in (0, 1]"),
    ("--esam-gamma", "0", "esam_gamma must be in (0, 1]"),
    ("--momentum", "1.0", "momentum must be in [0, 1)"),
    ("--looksam-alpha", "-0.5", "looksam_alpha must be >= 0"),
    ("--dropout", "nan", "dropout must be a finite number"),
    ("--train-fraction", "inf", "train_fraction must be a finite number"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD_FLOATS)
def test_bad_float_options_are_refused_before_anything_is_written(flag, value, message, tmp_path, capsys):
    out = tmp_path / "run"
    err = one_line_error(capsys, "train", "--task", "sst2", "--out", str(out), flag, value)
    assert message in err
    assert not out.exists()


def test_negative_and_infinite_ranges_are_values_and_refused_by_name(tiny_run, tmp_path, capsys):
    err = one_line_error(capsys, "surface", str(tiny_run), "--out", str(tmp_path / "s"), "--range", "-inf", "inf")
    assert "--range takes finite numbers, got -inf inf" in err
    assert not (tmp_path / "s").exists()


# --- divergence: stop, keep the last finite checkpoint, mark run.json, exit non-zero -------------------------------


def test_a_diverging_run_stops_marked_diverged_and_resume_says_why(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # weight decay 1e3 with lr 1 multiplies the matrices by (1 − 1e3) every step: the weights overflow in a few steps
    argv = tiny_train(tiny_model_dir, tiny_data_dir, out, "--max-steps", "200", "--save-every", "2", "--lr", "1",
                      "--weight-decay", "1000", "--optimizer", "sgd", "--momentum", "0")  # fmt: skip
    err = one_line_error(capsys, *argv)
    assert "training diverged at step" in err and "lower the learning rate" in err and "step-" in err
    info = json.loads((out / "run.json").read_text())  # valid JSON: no NaN literal in it
    assert info["status"] == "diverged" and info["diverged"]["step"] > 2
    assert not (out / "final.safetensors").exists()
    assert list((out / "checkpoints").iterdir())  # the last finite state is kept
    err = one_line_error(capsys, *argv, "--resume")
    assert f"diverged at step {info['diverged']['step']}" in err


# --- nothing is overwritten that landscape did not write ---------------------------------------------------------


def test_report_refuses_foreign_files_and_run_files_but_replaces_its_own(tiny_run, tmp_path, capsys):
    foreign = tmp_path / "notes.html"
    foreign.write_text("<p>my notes</p>")
    err = one_line_error(capsys, "report", str(tiny_run), "--out", str(foreign))
    assert "is not a report written by landscape" in err
    assert foreign.read_text() == "<p>my notes</p>"
    weights = tiny_run / "final.safetensors"
    before = weights.read_bytes()
    assert "is not an .html file" in one_line_error(capsys, "report", str(tiny_run), "--out", str(weights))
    assert weights.read_bytes() == before
    mine = tmp_path / "report.html"
    assert main(["report", str(tiny_run), "--out", str(mine)]) == 0
    assert main(["report", str(tiny_run), "--out", str(mine)]) == 0  # a rerun replaces its own page
    assert main(["report", str(tiny_run), "--out", str(foreign), "--overwrite"]) == 0
    assert "my notes" not in foreign.read_text()
    capsys.readouterr()


def test_figures_and_surfaces_refuse_a_run_directory_as_output(tiny_run, tmp_path, capsys):
    before = sorted(p.name for p in tiny_run.iterdir())
    assert "is a run or result directory" in one_line_error(capsys, "figures", str(tiny_run), "--out", str(tiny_run))
    err = one_line_error(capsys, "surface", str(tiny_run), "--out", str(tiny_run), "--grid", "2", "--samples", "4")
    assert "is a run directory" in err
    assert sorted(p.name for p in tiny_run.iterdir()) == before
    existing = tmp_path / "file"
    existing.write_text("x")
    err = one_line_error(capsys, "surface", str(tiny_run), "--out", str(existing), "--grid", "2", "--samples", "4")
    assert "is not a directory" in err and existing.read_text() == "x"


def test_an_output_below_a_file_is_one_line(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, *tiny_train(tiny_model_dir, tiny_data_dir, tmp_path / "file" / "run"))
    assert "cannot create the output directory" in err


# --- bounded work --------------------------------------------------------------------------------------------------


def test_a_huge_grid_is_refused_up_front_and_leaves_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    err = one_line_error(capsys, "surface", str(tiny_run), "--out", str(out), "--grid", "100000", "100000")
    assert "10,000,000,000 cells, more than --max-cells 40,000" in err
    assert not out.exists()


def test_non_finite_cells_store_a_nan_metric_and_the_summary_counts_them(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    # ±1e30 along a filter-normalised direction overflows the weights: the far cells' losses are not finite.
    argv = ["surface", str(tiny_run), "--out", str(out), "--dims", "1", "--grid", "3", "--samples", "8",
            "--range", "-1e30", "1e30"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out
    result = load_result(out)
    loss, metric = result.arrays["loss"], result.arrays["metric"]
    bad = ~np.isfinite(loss)
    assert bad[0] and bad[2] and np.isfinite(loss[1])
    assert np.isnan(metric[bad]).all() and np.isfinite(metric[1])
    assert f"{int(bad.sum())} cells with a non-finite loss" in line


# --- eval and run.json readers --------------------------------------------------------------------------------------


def test_eval_refuses_max_length_zero(tiny_run, capsys):
    assert "expected a positive integer, got 0" in one_line_error(capsys, "eval", str(tiny_run), "--max-length", "0")


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"status": "completed"}'])
def test_corrupt_run_json_is_one_line_for_eval_surface_and_resume(content, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "run.json").write_text(content)
    for argv in (["eval", str(run)], ["surface", str(run), "--out", str(tmp_path / "s"), "--grid", "2"]):
        assert "run.json" in one_line_error(capsys, *argv)


# --- pickles are refused without being opened, on every path --------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def pickle_model_folder(tmp_path, tiny_model_dir):
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    return folder, marker


def test_pickled_model_weights_are_refused_unopened(tiny_model_dir, tiny_data_dir, tiny_run, tmp_path, capsys):
    folder, marker = pickle_model_folder(tmp_path, tiny_model_dir)
    err = one_line_error(capsys, *tiny_train(folder, tiny_data_dir, tmp_path / "run", "--max-steps", "1"))
    assert "pickled weights are refused without being opened" in err
    crafted = tmp_path / "crafted-run"  # the same folder named by a run.json someone handed over
    shutil.copytree(tiny_run, crafted)
    info = json.loads((crafted / "run.json").read_text())
    info["config"]["model"] = str(folder)
    (crafted / "run.json").write_text(json.dumps(info))
    err = one_line_error(capsys, "surface", str(crafted), "--out", str(tmp_path / "s"), "--grid", "2")
    assert "pickled weights are refused without being opened" in err
    assert not marker.exists()


# --- files: the umask's mode, and equal runs give equal bytes -------------------------------------------------------


def test_equal_runs_write_equal_weight_files_with_the_umask_mode(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    digests = []
    for name in ("a", "b"):
        assert main(tiny_train(tiny_model_dir, tiny_data_dir, tmp_path / name, "--max-steps", "2")) == 0
        digests.append(hashlib.sha256((tmp_path / name / "final.safetensors").read_bytes()).hexdigest())
    capsys.readouterr()
    assert digests[0] == digests[1]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("final.safetensors", "init.safetensors", "run.json"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o666 & ~umask
