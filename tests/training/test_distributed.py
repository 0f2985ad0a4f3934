"""Data-parallel training with the real launcher: ``torchrun`` (``python -m torch.distributed.run``), 2 processes,
gloo on the CPU, the tiny BERT, dropout off. References: one process on the same global batch, and SAM's per-replica
step written out by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from landscape.training.config import TrainConfig
from landscape.training.loop import train
from optimizers.replicas import SINGLE

pytestmark = pytest.mark.slow

# The run moves the weights by ~1e-3 in these few steps; two processes add the gradient halves in another order and
# pad each half to its own longest sentence, which changes float32 rounding only: 1e-5 absolute is 100 times the
# largest difference measured (9.7e-8 for SAM over 6 steps) and 100 times smaller than the update.
ATOL = 1e-5


def options(model_dir: Path, data_dir: Path, out: Path, **extra) -> dict:
    values = {
        "task": "sst2", "model": str(model_dir), "data_dir": str(data_dir), "out": str(out), "lr": 1e-3,
        "batch_size": 8, "max_steps": 4, "save_every": 100, "seed": 5, "dropout": 0.0, "device": "cpu",
    }  # fmt: skip
    values.update(extra)
    return values


def argv_of(values: dict) -> list[str]:
    argv = ["train", "--no-progress"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def environment(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["LANDSCAPE_CACHE_DIR"] = str(tmp_path / "token-cache")
    return env


def torchrun(argv: list[str], tmp_path: Path, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.run(
        [*command, "-m", "landscape", *argv], env=environment(tmp_path), capture_output=True, text=True, timeout=300
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"sam": "sam"},
        {"sam": "fsam", "mask_interval": 2, "fisher_samples": 16, "sparsity": 0.5},
        {"sam": "delta-sam", "delta_beta": 10.0},
        {"sam": "sam", "grad_accum": 2},
        {"sam": "esam", "esam_gamma": 0.5},
        {"sam": "gsam", "gsam_alpha": 0.3},
        {"sam": "looksam", "looksam_k": 2},
        {"sam": "asam", "eta": 0.01},
    ],
    ids=["adamw", "sam", "fsam", "delta-sam", "sam-grad-accum", "esam", "gsam", "looksam", "asam"],
)
def test_two_processes_give_the_weights_of_one_process_on_the_global_batch(
    variant, tiny_model_dir, tiny_data_dir, tmp_path
):
    one = options(tiny_model_dir, tiny_data_dir, tmp_path / "one", **variant)
    train(TrainConfig(**one), progress=False, fisher=_fisher())
    two = options(tiny_model_dir, tiny_data_dir, tmp_path / "two", **variant)
    done = torchrun(argv_of(two), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("4 steps") == 1  # reported once, by rank 0
    moved = max_difference(weights(tmp_path / "one"), load_file(str(tmp_path / "one" / "init.safetensors")))
    assert moved > 100 * ATOL
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < ATOL
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "completed"
    # the logged loss is the global batch's mean, as one process logs it
    losses = {}
    for name in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if r["kind"] == "train"]
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-5)


def _fisher():
    from analyses.fisher import EmpiricalFisherMask

    return EmpiricalFisherMask()


def test_local_ascent_is_each_replicas_own_sam_step_averaged(tiny_model_dir, tiny_data_dir, tmp_path):
    from landscape.data.encoding import collate
    from landscape.data.losses import per_example_loss
    from landscape.data.tasks import get_task
    from landscape.models.loading import load_model
    from landscape.models.weights import load_weights_into
    from landscape.training.loop import batch_indices, prepare_data

    rho, lr = 0.05, 0.1
    common = {"sam": "sam", "rho": rho, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "lr": lr}
    local = options(tiny_model_dir, tiny_data_dir, tmp_path / "local", max_steps=1, local_ascent=True, **common)
    done = torchrun([*argv_of(local), "max_grad_norm=null"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    global_ = options(tiny_model_dir, tiny_data_dir, tmp_path / "global", max_steps=1, **common)
    done = torchrun([*argv_of(global_), "max_grad_norm=null"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # By hand: each replica r takes ε_r = ρ g_r / ‖g_r‖ from its half of the batch, the gradient at w + ε_r on that
    # half; the step descends the mean of the two (SGD, no momentum, no decay, no clipping, lr factor 1 at step 0).
    config = TrainConfig(**local, max_grad_norm=None).resolved()
    data = prepare_data(config)
    model = load_model(config.model, get_task("sst2"), seed=config.seed, dropout=0.0).model
    load_weights_into(model, tmp_path / "local" / "init.safetensors")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    indices = batch_indices(len(data.train), config.batch_size, config.seed, 0)
    descent = [torch.zeros_like(p) for p in params]
    for half in np.array_split(indices, 2):
        batch = collate(data.train, half, data.pad_token_id)
        g = torch.autograd.grad(per_example_loss(model, batch).mean(), params)
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, x in zip(params, g, strict=True):
                p.add_(x * (rho / norm).float())
        g_adv = torch.autograd.grad(per_example_loss(model, batch).mean(), params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        for total, x in zip(descent, g_adv, strict=True):
            total.add_(x / 2)
    with torch.no_grad():
        for p, x in zip(params, descent, strict=True):
            p.sub_(lr * x)
    expected = {name: p.detach() for name, p in model.named_parameters()}
    got, global_weights = weights(tmp_path / "local"), weights(tmp_path / "global")
    assert max(float((got[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    assert max_difference(got, global_weights) > 1e-5  # one global ε is another step


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def test_a_killed_rank_stops_the_run_and_resume_gives_the_uninterrupted_weights(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        pytest.skip("needs /proc to find the launcher's worker processes")
    values = options(tiny_model_dir, tiny_data_dir, tmp_path / "killed", sam="sam", max_steps=60, save_every=5)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    launcher = subprocess.Popen(
        [*command, "-m", "landscape", *argv_of(values)],
        env=environment(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; the launcher stops the other
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "running"

    resumed = torchrun([*argv_of(values), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = torchrun(argv_of({**values, "out": str(tmp_path / "whole")}), tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    info = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert info["resumed_from"] >= 5
    assert max_difference(weights(tmp_path / "killed"), weights(tmp_path / "whole")) < 1e-6


def test_bad_launches_are_refused_with_one_line_and_write_nothing(tiny_model_dir, tiny_data_dir, tmp_path):
    # a global batch the two processes cannot share
    odd = options(tiny_model_dir, tiny_data_dir, tmp_path / "odd", batch_size=7)
    done = torchrun(argv_of(odd), tmp_path)
    assert done.returncode != 0
    # one line from the processes (rank 0's), exit status 2; the rest of stderr is torchrun's own failure report
    assert done.stderr.count("landscape train: error: batch_size 7 is not divisible by the 2 processes") == 1
    assert "exitcode: 2" in done.stderr
    assert "landscape/" not in done.stderr  # no traceback through our code
    assert not (tmp_path / "odd").exists()
    # a checkpoint of one process does not resume under two
    single = options(tiny_model_dir, tiny_data_dir, tmp_path / "single", max_steps=6, save_every=2)
    with pytest.raises(Exception, match="stopped after step"):
        train(TrainConfig(**single), progress=False, stop_after_step=2)
    done = torchrun([*argv_of(single), "--resume"], tmp_path)
    assert done.returncode != 0
    assert "written by 1 process(es), this run has 2" in done.stderr


def test_one_process_collectives_are_identities():
    tensor = torch.arange(4.0)
    whole, mine = SINGLE.gather(tensor)
    assert torch.equal(whole[mine], tensor) and torch.equal(SINGLE.sum(tensor), tensor)
    assert SINGLE.agree(True) and not SINGLE.agree(False)
    assert SINGLE.broadcast_text("x") == "x"
