"""A checkpoint folder written by the Hugging Face Trainer (not by landscape train) of a tiny RoBERTa goes through
surface, interpolate --init, hessian, fisher, sharpness and report from the CLI, with the numbers the same weights
give through a run directory; bad checkpoints are one line."""

import json
import shutil

import numpy as np
import pytest
from conftest import sentiment_rows
from helpers import exit_status

from landscape.cli.main import main
from landscape.core.results import load_result
from landscape.models.tiny import build_tiny_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """(checkpoint-4 written by transformers.Trainer, the pretrained folder it started from)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    root = tmp_path_factory.mktemp("hf-trainer")
    pretrained = build_tiny_model_folder(root / "roberta", architecture="roberta")
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    model = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=2)
    examples = [
        {**tokenizer(text, truncation=True, max_length=128, return_token_type_ids=False), "labels": label}
        for text, label in sentiment_rows(32, 1)
    ]
    arguments = TrainingArguments(
        output_dir=str(root / "out"), max_steps=4, save_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to=[], use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(
        model=model, args=arguments, train_dataset=examples, data_collator=DataCollatorWithPadding(tokenizer)
    ).train()
    checkpoint = root / "out" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    return checkpoint, pretrained


def as_run_directory(checkpoint, data_dir, path):
    """The same weights as a run directory (what landscape train would have written for them)."""
    path.mkdir()
    shutil.copy(checkpoint / "model.safetensors", path / "final.safetensors")
    config = {"task": "sst2", "model": str(checkpoint), "data_dir": str(data_dir), "max_length": 128, "seed": 0}
    (path / "run.json").write_text(json.dumps({"config": config, "status": "completed"}))
    return path


def test_every_analysis_reads_a_trainer_checkpoint_with_the_run_directory_numbers(
    trainer_checkpoint, tiny_data_dir, tmp_path, capsys
):
    checkpoint, pretrained = trainer_checkpoint
    run = as_run_directory(checkpoint, tiny_data_dir, tmp_path / "run")
    data = ["--task", "sst2", "--data-dir", str(tiny_data_dir), "--samples", "8"]
    out = tmp_path / "analyses"
    for source, name in ((checkpoint, "ckpt"), (run, "run")):
        argv = ["surface", str(source), "--out", str(out / f"surface-{name}"), "--grid", "3", *data]
        assert main(argv) == 0
        argv = ["hessian", str(source), "--out", str(out / f"hessian-{name}"), "--top-k", "1", *data]
        assert main(argv) == 0
    for kind in ("surface", "hessian"):
        ours, reference = load_result(out / f"{kind}-ckpt"), load_result(out / f"{kind}-run")
        for key in ("loss", "eigenvalues"):
            if key in reference.arrays:
                np.testing.assert_array_equal(ours.arrays[key], reference.arrays[key])
    assert main(["fisher", str(checkpoint), "--out", str(out / "fisher"), *data]) == 0
    assert main(["sharpness", str(checkpoint), "--out", str(out / "sharpness"), "--rho", "0.01", "--sigma", "0.01",
                 "--pgd-steps", "1", *data]) == 0  # fmt: skip
    argv = ["interpolate", str(checkpoint), "--init", str(pretrained), "--points", "3",
            "--out", str(out / "interpolation"), *data]  # fmt: skip
    assert main(argv) == 0
    line = load_result(out / "interpolation")
    surface = load_result(out / "surface-ckpt")
    assert line.arrays["loss"][1] == surface.arrays["loss"][1, 1]  # α = 0 and the surface's origin are θ1
    capsys.readouterr()
    for source in (checkpoint, run / "final.safetensors"):  # eval: the same model source as every analysis
        assert main(["eval", str(source), "--task", "sst2", "--data-dir", str(tiny_data_dir), "--json"]) == 0
    from_checkpoint, from_file = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert from_checkpoint["loss"] == from_file["loss"] and from_checkpoint["weights"] == str(checkpoint)
    assert main(["report", *(str(p) for p in sorted(out.iterdir())), "--out", str(tmp_path / "report.html")]) == 0
    assert "hessian" in (tmp_path / "report.html").read_text()
    capsys.readouterr()


def test_bad_checkpoints_are_one_line(trainer_checkpoint, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    checkpoint, _ = trainer_checkpoint
    data = ["--data-dir", str(tiny_data_dir), "--samples", "4", "--out", str(tmp_path / "s"), "--grid", "2"]

    def refused(argv, message):
        assert exit_status(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    refused(["surface", str(checkpoint), *data], "pass --task")
    three = tmp_path / "three-labels"
    shutil.copytree(checkpoint, three)
    config = json.loads((three / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (three / "config.json").write_text(json.dumps(config))
    refused(["surface", str(three), "--task", "sst2", *data], "has a head of 3 labels, task sst2 has 2")
    # eval reads checkpoints through the same model source, so it refuses the same head
    refused(["eval", str(three), "--task", "sst2", "--data-dir", str(tiny_data_dir)], "has a head of 3 labels")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    refused(["surface", str(bare), "--task", "sst2", *data], "or a model checkpoint folder")  # no config.json
    argv = ["interpolate", str(checkpoint), "--task", "sst2", "--init", str(tiny_model_dir), "--points", "3",
            "--data-dir", str(tiny_data_dir), "--samples", "4", "--out", str(tmp_path / "i")]  # fmt: skip
    refused(argv, "--init")  # another architecture (BERT for a RoBERTa checkpoint)
    assert not (tmp_path / "s").exists() and not (tmp_path / "i").exists()


def test_a_hub_name_loads_offline_from_the_hub_cache(trainer_checkpoint, tiny_data_dir, tmp_path):
    """HF_HUB_OFFLINE=1 with a hub cache that holds the model (a cluster node without internet): the hub name
    evaluates as the same folder does. The cache is laid out as huggingface_hub writes it (refs/main naming a
    snapshot); the CLI runs in a subprocess because huggingface_hub reads HF_HUB_CACHE when it is imported. A name
    the cache does not hold is one line, exit 2."""
    import os
    import subprocess
    import sys

    checkpoint, pretrained = trainer_checkpoint
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-roberta-sst2"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(checkpoint, snapshot)
    for tokenizer_file in pretrained.iterdir():  # the Trainer saved no tokenizer: the pretrained folder's
        if "token" in tokenizer_file.name or tokenizer_file.name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_file, snapshot / tokenizer_file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def landscape_eval(source):
        argv = [sys.executable, "-m", "landscape", "eval", str(source), "--task", "sst2", "--data-dir",
                str(tiny_data_dir), "--json"]  # fmt: skip
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    from_hub, from_folder = landscape_eval("someone/tiny-roberta-sst2"), landscape_eval(snapshot)
    assert from_hub.returncode == 0, from_hub.stderr
    assert from_folder.returncode == 0, from_folder.stderr
    hub, folder = json.loads(from_hub.stdout), json.loads(from_folder.stdout)
    assert hub["weights"] == "someone/tiny-roberta-sst2" and hub["loss"] == folder["loss"]
    missing = landscape_eval("someone/not-cached")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "not in the local hub cache" in missing.stderr and "run directory" in missing.stderr
