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
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithPadding, TrainingArguments

    from analyses.fisher import EmpiricalFisherMask
    from landscape.training.hf_trainer import SharpnessAwareTrainer

    steps, batch = 4, 8
    config = TrainConfig(task="sst2", model=str(tiny_model_dir), data_dir=str(tiny_data_dir),
                         out=str(tmp_path / "ours"),
                         lr=1e-3, batch_size=batch, max_steps=steps, warmup_steps=0, save_every=100, seed=3,
                         dropout=0.0, sam=variant, rho=0.05, mask_interval=2, fisher_samples=8).resolved()  # fmt: skip
    train(config, progress=False, fisher=EmpiricalFisherMask())
    ours = load_file(str(tmp_path / "ours" / "final.safetensors"))

    data = prepare_data(config)  # the same encoded examples, in our loop's order
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
        remove_unused_columns=False, dataloader_drop_last=False,
    )  # fmt: skip
    trainer = InOrder(
        model=loaded.model, args=arguments, train_dataset=examples,
        data_collator=DataCollatorWithPadding(loaded.tokenizer), sam=variant, sam_settings={"rho": 0.05},
        fisher=EmpiricalFisherMask(), mask_interval=2, fisher_samples=8,
        fisher_dataset=[example(i) for i in range(len(data.train))],  # FSAM draws from the training set, in order
    )  # fmt: skip
    trainer.train()
    theirs = model_parameters(trainer.model)
    assert set(theirs) == set(ours)
    for name, value in theirs.items():  # float32 on two code paths (the Trainer's loss mean, its clipping): 1e-5
        torch.testing.assert_close(value.detach(), ours[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        ours["classifier.weight"], load_file(str(tmp_path / "ours" / "init.safetensors"))["classifier.weight"]
    )
