"""The training loop on a tiny BERT: run files, θ0, schedule, determinism and bitwise resumption."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analyses.fisher import EmpiricalFisherMask
from landscape.core.errors import ConfigError
from landscape.data.tasks import get_task
from landscape.models.loading import load_model
from landscape.training.config import TrainConfig
from landscape.training.loop import TrainingInterrupted, batch_indices, linear_schedule, train


@pytest.fixture
def config(tiny_model_dir, tiny_data_dir, tmp_path):
    return TrainConfig(
        task="sst2",
        model=str(tiny_model_dir),
        data_dir=str(tiny_data_dir),
        out=str(tmp_path / "run"),
        lr=1e-3,
        batch_size=8,
        max_steps=14,
        save_every=4,
        eval_every=5,
        seed=3,
    )


def assert_bitwise_equal(path_a, path_b):
    """Same names, dtypes, shapes and bytes (safetensors headers may order their metadata differently)."""
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(config):
    result = train(config, progress=False)
    run_dir = result.run_dir
    files = {"run.json", "init.safetensors", "final.safetensors", "metrics.jsonl", ".landscape.lock"}
    assert {p.name for p in run_dir.iterdir()} == files  # the lock file stays: deleting it would race a second writer
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["config"]["lr"] == 1e-3 and info["seed"] == 3
    assert info["versions"]["torch"] == torch.__version__
    assert info["timings"]["train_seconds"] > 0
    records = read_metrics(run_dir)
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 15))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10, 14]
    assert set(result.dev_metrics) == {"loss", "accuracy"}


def test_init_is_the_pretrained_weights_plus_the_seeded_head(config, tiny_model_dir):
    result = train(config, progress=False)
    init = load_file(result.run_dir / "init.safetensors")
    final = load_file(result.run_dir / "final.safetensors")
    fresh = load_model(str(tiny_model_dir), get_task("sst2"), seed=config.seed).model
    for name, param in fresh.named_parameters():
        assert torch.equal(init[name], param.detach()), name
    assert not torch.equal(init["classifier.weight"], final["classifier.weight"])
    other_seed = load_model(str(tiny_model_dir), get_task("sst2"), seed=config.seed + 1).model
    assert not torch.equal(other_seed.classifier.weight, fresh.classifier.weight)
    assert torch.equal(other_seed.bert.embeddings.word_embeddings.weight, fresh.bert.embeddings.word_embeddings.weight)


def test_linear_warmup_then_decay_matches_the_formula():
    factor = linear_schedule(warmup_steps=4, total_steps=20)
    assert [factor(s) for s in range(0, 5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx((20 - 12) / 16)
    assert factor(20) == 0.0


def test_learning_rate_logged_follows_the_schedule(config):
    result = train(replace(config, warmup_steps=4), progress=False)
    lrs = [r["lr"] for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    factor = linear_schedule(4, 14)
    assert lrs == pytest.approx([1e-3 * factor(s) for s in range(14)])


def test_data_order_covers_each_epoch_once():
    steps = [batch_indices(21, 8, seed=5, step=s) for s in range(3)]
    assert [len(b) for b in steps] == [8, 8, 5]
    assert sorted(int(i) for b in steps for i in b) == list(range(21))
    assert torch.equal(torch.as_tensor(batch_indices(21, 8, 5, 4)), torch.as_tensor(batch_indices(21, 8, 5, 4)))
    assert not torch.equal(torch.as_tensor(batch_indices(21, 8, 5, 0)), torch.as_tensor(batch_indices(21, 8, 5, 3)))


@pytest.mark.parametrize("stop_after", [2, 6, 9])
def test_resume_is_bitwise_identical_with_dropout(config, tmp_path, stop_after):
    config = replace(config, dropout=0.2)
    reference = train(replace(config, out=str(tmp_path / "straight")), progress=False)
    with pytest.raises(TrainingInterrupted):
        train(config, progress=False, stop_after_step=stop_after)
    resumed = train(config, resume=True, progress=False)
    assert resumed.resumed_from == (stop_after // 4) * 4 or (stop_after < 4 and resumed.resumed_from is None)
    assert_bitwise_equal(reference.run_dir / "final.safetensors", resumed.run_dir / "final.safetensors")
    records = read_metrics(resumed.run_dir)
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 15)), steps
    reference_records = read_metrics(reference.run_dir)
    assert [r["loss"] for r in records if r["kind"] == "train"] == [
        r["loss"] for r in reference_records if r["kind"] == "train"
    ]
    assert resumed.dev_metrics == reference.dev_metrics


def test_resume_refuses_other_options(config):
    with pytest.raises(TrainingInterrupted):
        train(config, progress=False, stop_after_step=5)
    with pytest.raises(ConfigError, match=r"option lr was 0\.001"):
        train(replace(config, lr=2e-3), resume=True, progress=False)


def test_existing_run_is_never_overwritten_silently(config):
    train(config, progress=False)
    final = Path(config.out) / "final.safetensors"
    before = final.read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, progress=False)
    assert final.read_bytes() == before
    train(replace(config, seed=4), overwrite=True, progress=False)
    assert final.read_bytes() != before


def test_train_fraction_subsamples_with_the_seed(config):
    result = train(replace(config, train_fraction=0.5, max_steps=2), progress=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["num_train_examples"] == 24 and info["num_train_available"] == 48


@pytest.mark.parametrize(
    "options",
    [
        {"sam": "fsam", "mask_interval": 3, "fisher_samples": 8, "sparsity": 0.8},
        {"sam": "delta-sam", "delta_beta": 3.0},
        {"sam": "esam"},
        {"sam": "gsam", "fisher_mask": True, "mask_interval": 5, "fisher_samples": 8},
        {"sam": "fsam", "mask_interval": 5, "fisher_samples": 8, "fisher_initial_mask": "random"},
    ],
    ids=["fsam", "delta-sam", "esam", "f-gsam", "fsam-random-initial-mask"],
)
def test_sharpness_aware_runs_resume_bitwise(config, tmp_path, options):
    """The optimizer's own generator (δ-SAM's directions, ESAM's draws) and the Fisher mask are checkpointed."""
    config = replace(config, dropout=0.1, **options)
    fisher = EmpiricalFisherMask()
    reference = train(replace(config, out=str(tmp_path / "straight")), progress=False, fisher=fisher)
    with pytest.raises(TrainingInterrupted):
        train(config, progress=False, stop_after_step=6, fisher=fisher)
    resumed = train(config, resume=True, progress=False, fisher=fisher)
    assert resumed.resumed_from == 4
    assert_bitwise_equal(reference.run_dir / "final.safetensors", resumed.run_dir / "final.safetensors")
    records = read_metrics(resumed.run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 15))
    assert records == read_metrics(reference.run_dir)


def test_fisher_mask_refreshes_are_logged_with_the_kept_fraction(config):
    fsam = replace(config, sam="fsam", mask_interval=5, fisher_samples=8, sparsity=0.9)
    with pytest.raises(ConfigError, match="needs a Fisher mask provider"):
        train(fsam, progress=False)
    result = train(fsam, progress=False, fisher=EmpiricalFisherMask())
    masks = [r for r in read_metrics(result.run_dir) if r["kind"] == "mask"]
    assert [r["step"] for r in masks] == [1, 6, 11]
    assert all(r["kept_fraction"] == pytest.approx(0.1, abs=1e-5) for r in masks)
    assert "iou" not in masks[0] and 0 <= masks[1]["iou"] <= 1
    train_records = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert all(0 < r["perturbation_norm"] <= config.rho * (1 + 1e-6) for r in train_records)


def test_fsam_random_initial_mask_is_exact_seeded_and_replaced_at_the_first_refresh(config):
    """FSAM Algorithm 1, line 1: a random mask of round((1 − s)·|w|) coordinates until step F_i."""
    from landscape.training.loop import build_optimizer, install_random_mask

    fsam = replace(config, sam="fsam", mask_interval=5, fisher_samples=8, sparsity=0.9, fisher_initial_mask="random")
    masks = []
    for seed in (3, 3, 4):
        model = load_model(fsam.model, get_task("sst2"), seed=0).model
        optimizer = build_optimizer(replace(fsam, seed=seed).resolved(), model)
        record = install_random_mask(model, optimizer, replace(fsam, seed=seed))
        masks.append(torch.cat([m.reshape(-1) for m in optimizer.masks.values()]))
    total = masks[0].numel()
    assert int(masks[0].sum()) == round(0.1 * total) and record["kept_fraction"] == round(0.1 * total) / total
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])  # seeded by the run's seed
    result = train(fsam, progress=False, fisher=EmpiricalFisherMask())
    records = [r for r in read_metrics(result.run_dir) if r["kind"] == "mask"]
    assert [r["step"] for r in records] == [1, 6, 11]
    assert records[0]["initial"] == "random" and "initial" not in records[1]
    # the first Fisher mask shares about 1 − s of the random one's coordinates (independent draws), not all of them
    assert records[1]["iou"] < 0.5
    with pytest.raises(ConfigError, match="fisher_initial_mask 'zeros' is unknown"):
        replace(fsam, fisher_initial_mask="zeros").resolved()


def test_a_refresh_between_steps_frees_what_the_steps_hold_and_changes_no_step(config):
    """Before the Fisher, the refresh frees the last step's gradient and the optimizer's held buffers (memory the
    Fisher needs at step F_i, beside the optimizer's state). Neither is read again: each step sets .grad to None
    first and refills the buffers, so the steps after it are bitwise those of an optimizer that kept both."""
    import copy

    from landscape.data.encoding import collate
    from landscape.training.loop import batch_closure, build_optimizer, prepare_data, refresh_fisher_mask

    fsam = replace(config, sam="fsam", mask_interval=5, fisher_samples=8, sparsity=0.9, dropout=0.0).resolved()
    data = prepare_data(fsam)
    batches = [collate(data.train, batch_indices(len(data.train), 8, 0, step), data.pad_token_id) for step in (0, 1)]
    model = load_model(fsam.model, get_task("sst2"), seed=0, dropout=0.0).model
    optimizer = build_optimizer(fsam, model)
    refresh_fisher_mask(model, optimizer, data, fsam, 0, EmpiricalFisherMask())
    optimizer.step(batch_closure(model, batches[0]))
    twin_model = copy.deepcopy(model)
    twin = build_optimizer(fsam, twin_model)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict may alias the tensors
    assert any(p.grad is not None for p in model.parameters()) and optimizer._saved_weights
    refresh_fisher_mask(model, optimizer, data, fsam, 5, EmpiricalFisherMask())
    assert all(p.grad is None for p in model.parameters()) and not optimizer._saved_weights
    twin.set_mask(optimizer.mask_by_name(model.named_parameters()), twin_model.named_parameters())
    for net, opt in ((model, optimizer), (twin_model, twin)):
        opt.step(batch_closure(net, batches[1]))
    for (name, a), b in zip(model.named_parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_fisher_mask_without_a_sam_variant_is_refused(config):
    with pytest.raises(ConfigError, match="fisher_mask needs a sharpness-aware variant"):
        train(replace(config, fisher_mask=True), progress=False)
