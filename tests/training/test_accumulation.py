"""``--grad-accum K`` in the trainer (K micro-batches give the step of one batch), fp16 training on the CPU, and
the refusals of options that cannot work together."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import exit_status
from safetensors.torch import load_file

from landscape.training.config import TrainConfig
from landscape.training.loop import train


def run_options(model_dir, data_dir, out, **extra) -> dict:
    values = {
        "task": "sst2", "model": str(model_dir), "data_dir": str(data_dir), "out": str(out), "lr": 1e-3,
        "batch_size": 8, "max_steps": 4, "save_every": 100, "seed": 3, "dropout": 0.0, "device": "cpu",
    }  # fmt: skip
    return {**values, **extra}


@pytest.mark.parametrize("sam", ["none", "sam"])
def test_grad_accum_gives_the_weights_of_one_batch(sam, tiny_model_dir, tiny_data_dir, tmp_path):
    finals = {}
    for k in (1, 4):
        out = tmp_path / f"k{k}"
        train(TrainConfig(**run_options(tiny_model_dir, tiny_data_dir, out, sam=sam, grad_accum=k)), progress=False)
        finals[k] = load_file(str(out / "final.safetensors"))
    init = load_file(str(tmp_path / "k1" / "init.safetensors"))
    moved = max(float((finals[1][k] - init[k]).abs().max()) for k in init)
    difference = max(float((finals[1][k] - finals[4][k]).abs().max()) for k in init)
    # micro-batches of 2 are padded to their own longest sentence and summed in another order: float32 rounding
    assert moved > 1e-3 and difference < 1e-5


def test_fp16_training_on_the_cpu_runs_with_its_loss_scale_and_tracks_fp32(tiny_model_dir, tiny_data_dir, tmp_path):
    losses = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        train(TrainConfig(**run_options(tiny_model_dir, tiny_data_dir, out, sam="sam", precision=precision)),
              progress=False)  # fmt: skip
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["kind"] == "train"]
        losses[precision] = np.array([r["loss"] for r in steps])
        if precision == "fp16":
            assert all(r["loss_scale"] == 2.0**16 and r["skipped"] is False for r in steps)
            assert all(t.dtype == torch.float32 for t in load_file(str(out / "final.safetensors")).values())
    # fp16's 11-bit mantissa: per-step losses within 0.5 % of fp32's, and not identical (autocast ran in fp16)
    np.testing.assert_allclose(losses["fp16"], losses["fp32"], rtol=5e-3)
    assert not np.array_equal(losses["fp16"], losses["fp32"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grad-accum", "3"], "grad_accum 3 does not divide batch_size 8"),
        (["--grad-accum", "0"], "grad_accum must be an int >= 1"),
        (["--grad-accum", "2", "--sam", "delta-sam"], "weighs or selects examples from the losses of the whole"),
        (["--local-ascent"], "--local-ascent keeps each process's own epsilon: it needs a sharpness-aware --sam"),
        (["--precision", "fp8"], "invalid choice"),
    ],
)
def test_options_that_cannot_work_together_are_one_line_and_write_nothing(
    flags, message, tiny_model_dir, tiny_data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--task", "sst2", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
            "--out", str(out), "--batch-size", "8", "--max-steps", "2", "--no-progress", *flags]  # fmt: skip
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not out.exists()
