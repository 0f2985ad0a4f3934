"""Cross-task transfer on tiny models: the trainer's init_from / freeze_encoder, the transfer result, resumption, CLI.

The source run is ``tiny_run`` (the tiny BERT fine-tuned on synthetic SST-2, two labels). The targets are two
synthetic tasks written here: STS-B (regression, a head of another shape) and RTE (two labels, a head of the same
shape as the source's, which must still start fresh).
"""

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import analyses.transfer as transfer_module
from analyses.transfer import TransferRecipe, parse_targets, transfer
from landscape.cli.main import main
from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.results import load_result
from landscape.data.tasks import get_task
from landscape.models.loading import load_model
from landscape.models.runs import open_run
from landscape.training.config import TrainConfig
from landscape.training.init_from import freeze_all_but_head
from landscape.training.loop import TrainingInterrupted, set_train_mode, train

WORDS = ["cat", "dog", "sun", "tree", "river", "stone", "bird", "cloud", "house", "road", "lamp", "field"]
HEAD = ["classifier.bias", "classifier.weight"]
RECIPE = TransferRecipe(lr=5e-3, max_steps=4, batch_size=8, seed=11)


def pair_rows(count: int, seed: int) -> list[tuple[str, str, int]]:
    """Sentence pairs sharing ``k`` of their 4 words, k in 0..4 (the STS-B score; RTE: entailment when k = 4)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        first = rng.sample(WORDS, 4)
        shared = rng.randint(0, 4)
        others = [w for w in WORDS if w not in first]
        second = first[:shared] + rng.sample(others, 4 - shared)
        rng.shuffle(second)
        rows.append((" ".join(first), " ".join(second), shared))
    return rows


def write_pair_tasks(root: Path) -> Path:
    """Synthetic STS-B (score = shared words) and RTE (entailment = every word shared) in the GLUE layout."""
    for name, count, seed in (("train.tsv", 40, 3), ("dev.tsv", 16, 4)):
        rows = pair_rows(count, seed)
        stsb = ["index\tsentence1\tsentence2\tscore"] + [f"{i}\t{a}\t{b}\t{k:.1f}" for i, (a, b, k) in enumerate(rows)]
        rte = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{a}\t{b}\t{'entailment' if k >= 3 else 'not_entailment'}" for i, (a, b, k) in enumerate(rows)
        ]
        for folder, lines in (("STS-B", stsb), ("RTE", rte)):
            (root / "glue" / folder).mkdir(parents=True, exist_ok=True)
            (root / "glue" / folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pair_data_dir(tmp_path_factory) -> Path:
    return write_pair_tasks(tmp_path_factory.mktemp("pair-data"))


@pytest.fixture
def target_config(tiny_model_dir, pair_data_dir, tmp_path) -> TrainConfig:
    return TrainConfig(
        task="stsb", model=str(tiny_model_dir), data_dir=str(pair_data_dir), out=str(tmp_path / "target"),
        lr=5e-3, batch_size=8, max_steps=6, save_every=3, seed=7, dropout=0.1,
    )  # fmt: skip


def encoder_names(tensors) -> list[str]:
    return sorted(name for name in tensors if name not in HEAD)


def assert_same_tensors(a, b, names):
    for name in names:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# --- the trainer: init_from and freeze_encoder ------------------------------------------------------------


@pytest.mark.parametrize("task", ["stsb", "rte"])
def test_init_from_starts_from_the_source_encoder_and_a_fresh_seeded_head(target_config, tiny_run, task):
    config = replace(target_config, task=task, init_from=str(tiny_run), max_steps=1)
    train(config, progress=False)
    theta0 = load_file(Path(config.out) / "init.safetensors")
    source = load_file(tiny_run / "final.safetensors")
    names = encoder_names(theta0)
    assert len(names) > 30 and set(names) <= set(source)
    assert_same_tensors(theta0, source, names)
    fresh = dict(load_model(config.model, get_task(task), seed=config.seed).model.named_parameters())
    assert_same_tensors(theta0, {n: fresh[n].detach() for n in HEAD}, HEAD)
    # The source's head (trained on SST-2) is not used, also when its shape would fit (RTE has two labels too).
    assert not torch.equal(theta0["classifier.weight"], source["classifier.weight"])
    record = json.loads((Path(config.out) / "run.json").read_text())["init_from"]
    assert record["file"] == str(tiny_run / "final.safetensors")
    assert record["loaded"] == names and record["kept_fresh"] == HEAD
    assert record["not_used"] == {name: list(source[name].shape) for name in HEAD}


def test_init_from_refuses_another_encoder_and_writes_nothing(target_config, tiny_run, tmp_path):
    source = load_file(tiny_run / "final.safetensors")
    widened = dict(source, **{"bert.pooler.dense.bias": torch.zeros(48)})
    save_file(widened, str(tmp_path / "widened.safetensors"))
    dropped = {k: v for k, v in source.items() if k != "bert.encoder.layer.1.output.dense.weight"}
    save_file(dropped, str(tmp_path / "dropped.safetensors"))
    for bad, expected in (("widened", "1 of other shape (e.g. bert.pooler.dense.bias (48,) vs (32,))"),
                          ("dropped", "1 missing (e.g. bert.encoder.layer.1.output.dense.weight)")):  # fmt: skip
        config = replace(target_config, init_from=str(tmp_path / f"{bad}.safetensors"))
        with pytest.raises(CheckpointError, match="encoder does not fit the model") as caught:
            train(config, progress=False)
        assert expected in str(caught.value)
        assert not Path(config.out).exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape("holds no final.safetensors (the run has not finished)")):
        train(replace(target_config, init_from=str(unfinished)), progress=False)


def test_freeze_encoder_trains_the_head_alone(target_config, tiny_run):
    config = replace(target_config, task="rte", init_from=str(tiny_run), freeze_encoder=True, max_steps=6)
    train(config, progress=False)
    run_dir = Path(config.out)
    theta0, theta1 = load_file(run_dir / "init.safetensors"), load_file(run_dir / "final.safetensors")
    assert_same_tensors(theta0, theta1, encoder_names(theta0))
    assert_same_tensors(theta1, load_file(tiny_run / "final.safetensors"), encoder_names(theta0))
    for name in HEAD:
        assert not torch.equal(theta0[name], theta1[name]), f"{name} did not train"
    assert json.loads((run_dir / "run.json").read_text())["trained_parameters"] == HEAD


def test_a_frozen_encoder_trains_in_eval_mode(tiny_model_dir):
    model = load_model(str(tiny_model_dir), get_task("rte"), seed=0, dropout=0.1).model
    assert freeze_all_but_head(model) == HEAD
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == HEAD
    set_train_mode(model, TrainConfig(task="rte", freeze_encoder=True))
    assert not any(module.training for module in model.bert.modules())
    assert model.training and model.dropout.training and model.classifier.training
    set_train_mode(model, TrainConfig(task="rte"))
    assert all(module.training for module in model.modules())


def test_a_probe_from_another_run_resumes_bitwise(target_config, tiny_run, tmp_path):
    """From a checkpoint (save_every 3), with the optimizer state of the head alone; a restart from θ0 (no
    checkpoint yet) is covered by the interrupted transfer below."""
    config = replace(target_config, init_from=str(tiny_run), freeze_encoder=True)
    straight = train(replace(config, out=str(tmp_path / "straight")), progress=False)
    with pytest.raises(TrainingInterrupted):
        train(config, progress=False, stop_after_step=4)
    resumed = train(config, resume=True, progress=False)
    assert resumed.resumed_from == 3
    a, b = load_file(straight.run_dir / "final.safetensors"), load_file(resumed.run_dir / "final.safetensors")
    assert a.keys() == b.keys()
    assert_same_tensors(a, b, sorted(a))
    assert not torch.equal(
        a["classifier.weight"], load_file(straight.run_dir / "init.safetensors")["classifier.weight"]
    )
    info = json.loads((resumed.run_dir / "run.json").read_text())
    assert info["init_from"]["loaded"] == encoder_names(a)


def test_runs_written_before_the_new_options_still_resume(target_config, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(target_config, progress=False, stop_after_step=4)
    run_json = Path(target_config.out) / "run.json"
    info = json.loads(run_json.read_text())
    for key in ("init_from", "freeze_encoder"):
        del info["config"][key]
    run_json.write_text(json.dumps(info))
    assert train(target_config, resume=True, progress=False).resumed_from == 3
    with pytest.raises(ConfigError, match="option freeze_encoder was False"):
        train(replace(target_config, freeze_encoder=True), resume=True, progress=False)


# --- the transfer analysis ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_transfer(tiny_run, pair_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "stsb-rte"
    return transfer(tiny_run, "stsb,rte", recipe=RECIPE, out=out, data_dir=pair_data_dir), out


def eval_json(path, capsys) -> dict:
    assert main(["eval", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_transfer_result_equals_a_direct_eval_of_its_runs(finished_transfer, tiny_run, capsys):
    result, out = finished_transfer
    assert load_result(out).meta["arrays_sha256"] == result.meta["arrays_sha256"]
    assert list(result.arrays["targets"]) == ["stsb", "rte"]
    assert list(result.arrays["metric_names"]) == ["pearson", "accuracy"]
    assert result.arrays["done"].tolist() == [True, True]
    for i, target in enumerate(["stsb", "rte"]):
        metric = result.arrays["metric_names"][i]
        for arm, array in (("source", "from_source"), ("pretrained", "from_pretrained")):
            evaluated = eval_json(out / "runs" / f"{target}-{arm}", capsys)
            assert evaluated["task"] == target
            assert result.arrays[array][i] == pytest.approx(evaluated[metric], rel=1e-9, abs=1e-12)
    meta = result.meta
    assert meta["complete"] is True and meta["mode"] == "finetune" and meta["wall_time_s"] > 0
    assert meta["source"] == open_run(tiny_run).describe()
    assert meta["recipe"]["lr"] == 5e-3 and meta["recipe"]["max_steps"] == 4 and meta["recipe"]["optimizer"] == "adamw"


def test_both_arms_share_the_recipe_and_head_and_differ_in_the_encoder(finished_transfer, tiny_run):
    _, out = finished_transfer
    source_arm = load_file(out / "runs" / "rte-source" / "init.safetensors")
    pretrained_arm = load_file(out / "runs" / "rte-pretrained" / "init.safetensors")
    assert_same_tensors(source_arm, pretrained_arm, HEAD)
    names = encoder_names(source_arm)
    assert_same_tensors(source_arm, load_file(tiny_run / "final.safetensors"), names)
    assert_same_tensors(pretrained_arm, load_file(tiny_run / "init.safetensors"), names)
    assert not all(torch.equal(source_arm[n], pretrained_arm[n]) for n in names)
    configs = [
        json.loads((out / "runs" / f"rte-{arm}" / "run.json").read_text())["config"] for arm in ("source", "pretrained")
    ]
    differing = sorted(k for k in configs[0] if configs[0][k] != configs[1].get(k))
    assert differing == ["init_from", "out"]


def test_interrupted_transfer_resumes_and_skips_finished_targets(
    finished_transfer, tiny_run, pair_data_dir, tmp_path, monkeypatch
):
    reference, _ = finished_transfer
    real_train = transfer_module.train
    calls = []

    def interrupted_train(config, **kwargs):
        calls.append((Path(config.out).name, kwargs.get("resume")))
        if len(calls) == 3:  # the first run of the second target: killed after 2 of its 4 steps
            return real_train(config, stop_after_step=2, **kwargs)
        return real_train(config, **kwargs)

    out = tmp_path / "transfer"
    monkeypatch.setattr(transfer_module, "train", interrupted_train)
    with pytest.raises(TrainingInterrupted):
        transfer(tiny_run, ["stsb", "rte"], recipe=RECIPE, out=out, data_dir=pair_data_dir)
    partial = load_result(out)
    assert partial.meta["complete"] is False and partial.arrays["done"].tolist() == [True, False]
    assert np.isnan(partial.arrays["from_source"][1]) and np.isnan(partial.arrays["from_pretrained"][1])
    assert partial.arrays["from_source"][0] == reference.arrays["from_source"][0]

    calls.clear()
    finished_mtime = (out / "runs" / "stsb-source" / "final.safetensors").stat().st_mtime_ns
    resumed = transfer(tiny_run, ["stsb", "rte"], recipe=RECIPE, out=out, data_dir=pair_data_dir)
    assert calls == [("rte-source", True), ("rte-pretrained", False)]
    assert (out / "runs" / "stsb-source" / "final.safetensors").stat().st_mtime_ns == finished_mtime
    assert resumed.meta["complete"] is True
    for name in ("from_source", "from_pretrained"):
        assert resumed.arrays[name].tolist() == reference.arrays[name].tolist()
    assert resumed.meta["wall_time_s"] > partial.meta["wall_time_s"]

    calls.clear()
    again = transfer(tiny_run, ["stsb", "rte"], recipe=RECIPE, out=out, data_dir=pair_data_dir)
    assert calls == [] and again.meta["arrays_sha256"] == resumed.meta["arrays_sha256"]


def test_other_parameters_are_refused_unless_overwrite(tiny_run, pair_data_dir, tmp_path):
    out = tmp_path / "transfer"
    recipe = replace(RECIPE, max_steps=2)
    transfer(tiny_run, ["rte"], recipe=recipe, out=out, data_dir=pair_data_dir)
    with pytest.raises(ConfigError, match=re.escape("holds a result with other parameters (recipe was")):
        transfer(tiny_run, ["rte"], recipe=replace(recipe, lr=1e-3), out=out, data_dir=pair_data_dir)
    replaced = transfer(tiny_run, ["rte"], recipe=replace(recipe, lr=1e-3), out=out, data_dir=pair_data_dir,
                        overwrite=True)  # fmt: skip
    assert replaced.meta["recipe"]["lr"] == 1e-3
    assert json.loads((out / "runs" / "rte-source" / "run.json").read_text())["config"]["lr"] == 1e-3


def test_probe_mode_keeps_each_arms_encoder(tiny_run, pair_data_dir, tmp_path):
    out = tmp_path / "probe"
    result = transfer(tiny_run, ["stsb"], mode="probe", recipe=RECIPE, out=out, data_dir=pair_data_dir)
    assert result.meta["mode"] == "probe" and result.meta["recipe"]["lr"] == 5e-3
    assert np.isfinite(result.arrays["from_source"]).all() and np.isfinite(result.arrays["from_pretrained"]).all()
    for arm, start in (("source", "final"), ("pretrained", "init")):
        theta1 = load_file(out / "runs" / f"stsb-{arm}" / "final.safetensors")
        encoder = load_file(tiny_run / f"{start}.safetensors")
        assert_same_tensors(theta1, encoder, encoder_names(theta1))
    assert TransferRecipe().resolved("probe").lr == 1e-3 and TransferRecipe().resolved("finetune").lr == 5e-5


# --- inputs and the command line -------------------------------------------------------------------------


def test_targets_are_canonical_and_checked():
    assert parse_targets("CoLA, sts-b,RTE") == ["cola", "stsb", "rte"]
    with pytest.raises(ConfigError, match="given twice: rte"):
        parse_targets(["rte", "RTE"])
    with pytest.raises(ConfigError, match="no target task"):
        parse_targets(" , ")


def test_cli_prints_the_table(tiny_run, pair_data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["transfer", "--source", str(tiny_run), "--targets", "rte", "--data-dir", str(pair_data_dir),
            "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = load_result(out)
    assert f"transfer result written to {out}" in printed
    row = next(line for line in printed.splitlines() if line.startswith("rte"))
    assert row.split()[:4] == [
        "rte", "accuracy", f"{result.arrays['from_source'][0]:.4f}", f"{result.arrays['from_pretrained'][0]:.4f}"
    ]  # fmt: skip
    assert result.meta["recipe"]["max_steps"] == 2 and result.meta["recipe"]["batch_size"] == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--targets", "cola,foo,rte,bar"], "unknown target task(s) 'foo', 'bar'; known tasks: cola, sst2, mrpc"),
        (["--targets", "rte", "--train-fraction", "0"], "--train-fraction must be in (0, 1], got 0.0"),
        (["--targets", "rte", "--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--targets", "rte", "--max-steps", "0"], "expected a positive integer, got 0"),
        (["--targets", "rte", "--mode", "frozen"], "invalid choice: 'frozen'"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(tiny_run, pair_data_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert (
        exit_code(["transfer", "--source", str(tiny_run), "--data-dir", str(pair_data_dir), "--out", str(out), *extra])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def exit_code(args) -> int:
    """``main``'s status; argparse's own errors leave through SystemExit."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code)


def test_cli_refuses_a_source_that_is_not_a_run(pair_data_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["transfer", "--source", str(tmp_path), "--targets", "rte", "--out", str(out)]) == 2
    assert "has no run.json; expected the --out folder of landscape train" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_a_target_without_data(tiny_run, pair_data_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    args = ["transfer", "--source", str(tiny_run), "--targets", "rte,mrpc", "--data-dir", str(pair_data_dir)]
    assert main([*args, "--out", str(out)]) == 2
    assert "MRPC" in capsys.readouterr().err
    assert not out.exists()
