"""--device and --precision: every analysis with --device cpu explicitly, a missing device refused in one line,
and bf16 autocast training on the CPU tracking fp32."""

import json

import numpy as np
import pytest
import torch
from helpers import exit_status

from landscape.cli.main import main
from landscape.models.devices import autocast_dtype, resolve_device


def test_devices_resolve_or_are_refused_with_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    from landscape.core.errors import ConfigError

    for name, message in (("tpu", "unknown"), ("cuda:x", "CUDA" if not torch.cuda.is_available() else "cuda:0")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp16") is torch.float16  # with the loss scale of optimizers.loss_scale
    with pytest.raises(ConfigError, match="expected one of fp32, bf16, fp16"):
        autocast_dtype("fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    for argv in (["train", "--task", "sst2", "--out", str(tmp_path / "run"), "--device", "cuda"],
                 ["surface", str(tiny_run), "--out", str(tmp_path / "s"), "--device", "cuda", "--grid", "2"],
                 ["eval", str(tiny_run), "--device", "cuda:0"]):  # fmt: skip
        assert exit_status(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "CUDA is not available" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def test_every_analysis_runs_with_an_explicit_cpu_device(tiny_run, tmp_path, capsys):
    common = ["--samples", "4", "--device", "cpu"]
    for argv in (
        ["surface", str(tiny_run), "--grid", "2", "--out", str(tmp_path / "surface")],
        ["interpolate", str(tiny_run), "--points", "3", "--out", str(tmp_path / "interpolation")],
        ["hessian", str(tiny_run), "--top-k", "1", "--out", str(tmp_path / "hessian")],
        ["fisher", str(tiny_run), "--out", str(tmp_path / "fisher")],
        ["sharpness", str(tiny_run), "--rho", "0.01", "--sigma", "0.01", "--pgd-steps", "1",
         "--out", str(tmp_path / "sharpness")],
    ):  # fmt: skip
        assert main([*argv, *common]) == 0, argv
    assert main(["eval", str(tiny_run), "--device", "cpu", "--json"]) == 0
    capsys.readouterr()


def test_bf16_autocast_training_on_the_cpu_tracks_fp32(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = ["train", "--task", "sst2", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
                "--out", str(out), "--batch-size", "8", "--lr", "1e-3", "--max-steps", "6", "--seed", "1",
                "--dropout", "0", "--sam", "sam", "--precision", precision, "--device", "cpu",
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = np.array([r["loss"] for r in records if r["kind"] == "train"])
        info = json.loads((out / "run.json").read_text())
        assert info["config"]["precision"] == precision
    capsys.readouterr()
    # bf16 keeps 8 bits of mantissa: per-step training losses within 0.1 % of fp32's over these 6 steps (measured
    # 3.4e-5 at most on this seed), and not identical (autocast really ran).
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=1e-3)
    assert not np.array_equal(losses["bf16"], losses["fp32"])


def test_bf16_evaluation_in_eval_and_surfaces_tracks_fp32_and_is_part_of_the_identity(tiny_run, tmp_path, capsys):
    from landscape.core.results import load_result

    losses = {}
    for precision in ("fp32", "bf16"):
        assert main(["eval", str(tiny_run), "--device", "cpu", "--precision", precision, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["precision"] == precision
        out = tmp_path / f"surface-{precision}"
        argv = ["surface", str(tiny_run), "--grid", "3", "--samples", "8", "--no-progress", "--precision", precision]
        assert main([*argv, "--out", str(out)]) == 0
        capsys.readouterr()
        result = load_result(out)
        assert result.meta["precision"] == precision
        losses[precision] = (printed["loss"], result.arrays["loss"])
    capsys.readouterr()
    # bf16 logits carry 8 bits of mantissa: losses within 1 % of fp32's, and not identical (autocast ran)
    np.testing.assert_allclose(losses["bf16"][0], losses["fp32"][0], rtol=1e-2)
    np.testing.assert_allclose(losses["bf16"][1], losses["fp32"][1], rtol=1e-2)
    assert not np.array_equal(losses["bf16"][1], losses["fp32"][1])
    # another precision in the same --out is another result: refused without --overwrite
    other = ["surface", str(tiny_run), "--grid", "3", "--samples", "8", "--no-progress", "--out"]
    assert exit_status([*other, str(tmp_path / "surface-bf16"), "--precision", "fp32"]) == 2
    assert "precision" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpus-per-worker", "1"], "--gpus-per-worker is only for --executor ray"),
        (["--precision", "fp8"], "invalid choice"),
    ],
)
def test_grid_options_that_cannot_work_are_one_line_and_write_nothing(flags, message, tiny_run, tmp_path, capsys):
    out = tmp_path / "surface"
    assert exit_status(["surface", str(tiny_run), "--grid", "2", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_the_demo_computes_every_stage_on_its_device(tmp_path):
    from landscape.demo import QUICK, plan

    stages = plan(tmp_path, task="sst2", model="minilm", data_dir=None, budget=QUICK, seed=1, device="cpu")
    computing = [stage for stage in stages if stage.argv[0] not in ("figures", "report")]
    assert computing and all("--device" in stage.argv for stage in computing)
    assert all(stage.argv[stage.argv.index("--device") + 1] == "cpu" for stage in computing)
