"""SAM inside the Hugging Face Trainer equals SAM in our trainer: same model, data order, schedule, dropout off."""

import pytest
import torch
from safetensors.torch import load_file

from landscape.core.params import model_parameters
from landscape.models.loading import load_model
from landscape.training.config import TrainConfig
from landscape.training.loop import batch_indices, prepare_data, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", ["sam", "fsam"])
def test_the_trainer_with_sam_gives_our_trainers_weights(variant, tiny_model_dir, tiny_data_dir, tmp_path):
    from analyses.fisher import EmpiricalFisherMask

    fsam = {"mask_interval": 2, "fisher_samples": 8}
    config, trainer = _trainer_pair(variant, tiny_model_dir, tiny_data_dir, tmp_path, steps=4, batch=8,
                                    precision="fp32", config_options=fsam,
                                    trainer_options={**fsam, "fisher": EmpiricalFisherMask()})  # fmt: skip
    train(config, progress=False, fisher=EmpiricalFisherMask())
    ours = load_file(str(tmp_path / "ours" / "final.safetensors"))
    trainer.train()
    theirs = model_parameters(trainer.model)
    assert set(theirs) == set(ours)
    for name, value in theirs.items():  # float32 on two code paths (the Trainer's loss mean, its clipping): 1e-5
        torch.testing.assert_close(value.detach(), ours[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        ours["classifier.weight"], load_file(str(tmp_path / "ours" / "init.safetensors"))["classifier.weight"]
    )


def _trainer_pair(variant, tiny_model_dir, tiny_data_dir, tmp_path, *, steps, batch, precision, config_options=None,
                  trainer_options=None):  # fmt: skip
    """Our trainer's config (not run), and a SharpnessAwareTrainer (not trained) on the examples our loop would
    take, in its order; FSAM draws its Fisher examples from the training set, in order, as our loop does."""
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithPadding, TrainingArguments

    from landscape.training.hf_trainer import SharpnessAwareTrainer

    config = TrainConfig(task="sst2", model=str(tiny_model_dir), data_dir=str(tiny_data_dir),
                         out=str(tmp_path / "ours"), lr=1e-3, batch_size=batch, max_steps=steps, warmup_steps=0,
                         save_every=100, seed=3, dropout=0.0, sam=variant, rho=0.05, precision=precision,
                         **(config_options or {})).resolved()  # fmt: skip
    data = prepare_data(config)
    order = [int(i) for step in range(steps) for i in batch_indices(len(data.train), batch, config.seed, step)]

    def example(i):
        return {"input_ids": data.train.input_ids[i], "token_type_ids": data.train.token_type_ids[i],
                "labels": int(data.train.labels[i])}  # fmt: skip

    examples = [example(i) for i in order]
    loaded = load_model(config.model, data.task, seed=config.seed, dropout=0.0)

    class InOrder(SharpnessAwareTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0, seed=config.seed,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, dataloader_drop_last=False, fp16=precision == "fp16",
    )  # fmt: skip
    trainer = InOrder(model=loaded.model, args=arguments, train_dataset=examples,
                      data_collator=DataCollatorWithPadding(loaded.tokenizer), sam=variant,
                      sam_settings={"rho": 0.05}, fisher_dataset=[example(i) for i in range(len(data.train))],
                      **(trainer_options or {}))  # fmt: skip
    if precision == "fp16":
        # accelerate runs fp16 on the CPU as plain fp32 (no autocast, no scaler); switch on what it does on CUDA:
        # autocast of the model's forward (applied when the Trainer prepares the model) and a GradScaler.
        assert trainer.accelerator.scaler is None
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    return config, trainer


@pytest.mark.parametrize("variant", ["sam", "gsam"])
def test_fp16_in_the_trainer_gives_our_fp16_trainers_weights(variant, tiny_model_dir, tiny_data_dir, tmp_path):
    """fp16 autocast on the CPU with the Trainer's GradScaler: both SAM passes scaled, ε from the unscaled ascent,
    the descent unscaled once by the scaler (GSAM: its combination of the two gradients, both unscaled, then scaled
    back). Our trainer (its own dynamic loss scale, the same initial 2^16) on the same examples reaches the same
    weights: both run the same fp16 kernels on the same inputs, so the difference is the fp32 rounding of the two
    code paths (1e-5, as in the fp32 test above). δ-SAM is left out: its weights divide differences of nearly equal
    losses, which turns that rounding into differences of ~1e-5 relative even in fp32."""
    config, trainer = _trainer_pair(variant, tiny_model_dir, tiny_data_dir, tmp_path, steps=4, batch=8,
                                    precision="fp16")  # fmt: skip
    train(config, progress=False)
    ours = load_file(str(tmp_path / "ours" / "final.safetensors"))
    dtypes = set()
    query = trainer.model.bert.encoder.layer[0].attention.self.query
    query.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    trainer.train()
    assert dtypes == {torch.float16}  # the Trainer's forward ran under fp16 autocast
    assert trainer.accelerator.scaler.get_scale() == 2.0**16  # no overflow in 4 steps: the scale never moved
    for name, value in model_parameters(trainer.model).items():
        torch.testing.assert_close(value.detach(), ours[name], rtol=1e-5, atol=1e-6, msg=name)
    init = load_file(str(tmp_path / "ours" / "init.safetensors"))
    assert not torch.equal(ours["classifier.weight"], init["classifier.weight"])


def test_an_fp16_overflow_in_the_trainer_skips_the_step_and_backs_off(tiny_model_dir, tiny_data_dir, tmp_path):
    """A scale of 2^100 overflows fp16 in the ascent backward: no ε, the weights stay bitwise what they were, the
    Trainer's scaler skips its optimizer step and halves the scale; the next step (2^99, still overflowing) too."""
    _, trainer = _trainer_pair("sam", tiny_model_dir, tiny_data_dir, tmp_path, steps=2, batch=8,
                                    precision="fp16")  # fmt: skip
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = {name: value.detach().clone() for name, value in model_parameters(trainer.model).items()}
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**98
    assert trainer.sharpness_optimizer(trainer.model).skipped
    for name, value in model_parameters(trainer.model).items():
        assert torch.equal(value.detach(), before[name]), name
