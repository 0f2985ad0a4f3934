"""PEFT (LoRA) adapter folders as analysis inputs: the full space is the base with W + (α/r)·B·A merged in (checked
against that sum written out), the adapter space holds the adapter's weights alone, both give the same loss at θ and
different surfaces around it, and bad adapter folders are one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import exit_status

from landscape.cli.main import main
from landscape.core.results import load_result

peft = pytest.importorskip("peft", reason="PEFT adapters need the peft package (a test extra)")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:There is a performance drop:UserWarning")

RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter (query and value of every layer, r = 4, α = 8) on the tiny BERT, with non-zero B and head."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"])
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(folder))
    return folder


def open_adapter(adapter_dir, tiny_data_dir, subspace):
    from landscape.models.runs import load_run_model, open_run

    run = open_run(adapter_dir, task="sst2", data_dir=tiny_data_dir, subspace=subspace)
    return run, load_run_model(run).model


def test_full_space_is_the_base_with_the_lora_product_added(adapter_dir, tiny_model_dir, tiny_data_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    _, merged = open_adapter(adapter_dir, tiny_data_dir, "full")
    base_model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    base = {name: p.detach() for name, p in base_model.named_parameters()}
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged_params = dict(merged.named_parameters())
    checked = 0
    for name, a in adapter.items():
        if "lora_A" not in name:
            continue
        module = name.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]  # bert.encoder...query
        b = adapter[name.replace("lora_A", "lora_B")]
        expected = base[f"{module}.weight"] + (ALPHA / RANK) * b @ a
        torch.testing.assert_close(merged_params[f"{module}.weight"], expected, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked == 4  # query and value of two layers
    head = next(k for k in adapter if "classifier" in k and k.endswith("weight"))
    torch.testing.assert_close(merged_params["classifier.weight"], adapter[head])


def test_adapter_space_holds_the_adapter_weights_alone(adapter_dir, tiny_data_dir):
    _, model = open_adapter(adapter_dir, tiny_data_dir, "adapter")
    names = [name for name, _ in model.named_parameters()]
    assert names and all("lora_" in name or "modules_to_save" in name for name in names)
    assert len(names) == 8 + 2  # A and B of four modules, the head's weight and bias
    assert sum(p.numel() for _, p in model.named_parameters()) < 5000  # a slice of the 48.9 k weights


def test_both_spaces_give_the_same_loss_at_theta_and_different_surfaces(adapter_dir, tiny_data_dir, tmp_path, capsys):
    results = {}
    for subspace in ("full", "adapter"):
        out = tmp_path / subspace
        argv = ["surface", str(adapter_dir), "--task", "sst2", "--data-dir", str(tiny_data_dir), "--grid", "5",
                "--samples", "16", "--subspace", subspace, "--no-progress", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        results[subspace] = load_result(out)
    capsys.readouterr()
    full, adapter = results["full"].arrays["loss"], results["adapter"].arrays["loss"]
    assert full[2, 2] == pytest.approx(adapter[2, 2], rel=1e-5)  # θ itself: merged or not, the same function
    assert not np.allclose(full, adapter, rtol=1e-3)  # other directions, other neighbourhoods
    assert results["adapter"].meta["run"]["subspace"] == "adapter"
    sharp = ["sharpness", str(adapter_dir), "--task", "sst2", "--data-dir", str(tiny_data_dir), "--samples", "8",
             "--rho", "0.05", "--sigma", "0.01", "--pgd-steps", "1", "--gaussian-samples", "2",
             "--subspace", "adapter", "--no-progress", "--out", str(tmp_path / "sharpness")]  # fmt: skip
    assert main(sharp) == 0
    assert load_result(tmp_path / "sharpness").meta["num_parameters"] < 5000


def test_bad_adapter_inputs_are_one_line_and_write_nothing(adapter_dir, tiny_run, tiny_data_dir, tmp_path, capsys):
    broken_base = tmp_path / "no-base"
    shutil.copytree(adapter_dir, broken_base)
    config = json.loads((broken_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "missing-model")
    (broken_base / "adapter_config.json").write_text(json.dumps(config))
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    data = ["--data-dir", str(tiny_data_dir), "--grid", "2", "--no-progress"]
    cases = [
        ([str(broken_base), "--task", "sst2"], "is not available here"),
        ([str(pickled), "--task", "sst2"], "adapter_model.bin is a pickle and is never opened"),
        ([str(adapter_dir)], "pass --task"),
        ([str(adapter_dir), "--task", "cb"], "does not fit its base model"),
        ([str(tiny_run), "--subspace", "adapter"], "--subspace adapter is for PEFT adapter folders"),
    ]
    for index, (args, message) in enumerate(cases):
        out = tmp_path / f"out-{index}"
        assert exit_status(["surface", *args, *data, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
        assert not out.exists()
