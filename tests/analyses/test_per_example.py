"""The layer path of per-example squared gradients (analyses.per_example) on hand-built models: exact where the
layers are used only through their forward and batched by example, and left to the general path where they are not
(a weight also read directly, an input the batch shares), with the same Fisher either way."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from analyses.fisher import _negative_log_likelihood, empirical_fisher, empirical_fisher_loop
from analyses.per_example import LayerGradients
from landscape.models.evaluation import batch_logits


class Classifier(nn.Module):
    """Embedding (padding row 0) → LayerNorm → mean over the sequence → Linear; optionally two departures from a
    clean layer: ``direct`` adds h·Wᵀ with the head's weight read outside its forward, ``shared`` adds a Linear of a
    buffer the batch shares ([1, H], broadcast)."""

    def __init__(self, *, direct: bool = False, shared: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.offset = nn.Linear(6, 3)
        self.register_buffer("constant", torch.randn(1, 6))
        self.direct, self.shared = direct, shared

    def forward(self, input_ids, attention_mask=None):
        h = self.norm(self.embed(input_ids))
        if attention_mask.ndim == 4:  # the general (vmap) path hands the additive [B, 1, 1, T] form, 0 = attended
            attention_mask = attention_mask[:, 0, 0, :] == 0
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1)
        logits = self.head(pooled)
        if self.direct:
            logits = logits + pooled @ self.head.weight.T
        if self.shared:
            logits = logits + self.offset(self.constant)
        return SimpleNamespace(logits=logits)


def batches() -> list[dict[str, torch.Tensor]]:
    """Two batches (5 + 3 examples) with repeated tokens inside an example and padding (id 0) at the ends."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for size in (5, 3):
        ids = torch.randint(1, 8, (size, 7), generator=generator)  # few ids: tokens repeat within an example
        mask = torch.ones_like(ids)
        ids[:, 5:], mask[:, 5:] = 0, 0
        labels = torch.randint(0, 3, (size,), generator=generator)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def coverage(model: nn.Module) -> list[str]:
    layers = LayerGradients(model, dict(model.named_parameters()), _negative_log_likelihood, batch_logits)
    layers.add(batches()[0], {name: torch.zeros_like(p) for name, p in model.named_parameters()})
    return sorted(layers.uncovered)


def assert_fisher_equals_loop(model: nn.Module) -> None:
    fast, loop = empirical_fisher(model, batches(), chunk_size=2), empirical_fisher_loop(model, batches())
    for name, expected in loop.diagonal.items():
        torch.testing.assert_close(fast.diagonal[name], expected, rtol=1e-5, atol=1e-12, msg=name)


def test_every_layer_of_a_clean_model_is_exact_including_repeated_tokens_and_the_padding_row():
    model = Classifier().double()
    assert coverage(model) == []
    assert_fisher_equals_loop(model)
    fisher = empirical_fisher(model, batches()).diagonal
    assert float(fisher["offset.weight"].abs().max()) == 0.0  # the loss does not depend on it
    assert float(fisher["embed.weight"][0].abs().max()) == 0.0  # the padding row has no gradient
    assert float(fisher["embed.weight"][1:8].min()) > 0.0 and float(fisher["embed.weight"][8:].abs().max()) == 0.0


def test_a_weight_also_read_outside_its_forward_fails_the_check_and_is_still_right():
    model = Classifier(direct=True).double()
    assert "head.weight" in coverage(model) and "head.bias" not in coverage(model)
    assert_fisher_equals_loop(model)


def test_a_layer_whose_input_the_batch_shares_is_left_to_the_general_path():
    model = Classifier(shared=True).double()
    assert {"offset.weight", "offset.bias"} <= set(coverage(model))
    assert_fisher_equals_loop(model)


class TokenMixer(nn.Module):
    """Embedding → a Linear at every position → tanh → LayerNorm → masked mean → Linear head: the per-position
    Linear is where examples are cut to the span of positions whose output gradient is not zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(20, 5, padding_idx=0)
        self.mix = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.norm(torch.tanh(self.mix(self.embed(input_ids))))
        if attention_mask.ndim == 4:
            attention_mask = attention_mask[:, 0, 0, :] == 0
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        return SimpleNamespace(logits=self.head((h * weights).sum(1) / weights.sum(1)))


def padded_both_ways() -> list[dict[str, torch.Tensor]]:
    """Examples padded at the end, at the start, masked inside, and not at all (positions 0–8)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 20, (6, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    mask[2, 3:5] = 0  # a hole inside: inside the span, it adds zeros
    mask[3, 1:] = 0  # one position
    mask[4, :3], mask[4, 7:] = 0, 0  # both ends
    ids = ids * mask
    labels = torch.randint(0, 3, (6,), generator=generator)
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def test_examples_cut_to_their_span_equal_the_loop_one_at_a_time_and_in_blocks(monkeypatch):
    """On the CPU each example is one product; on an accelerator examples go in blocks of similar spans. Both cut
    every example to the positions between its first and last non-zero output gradient, which must not change the
    values: padding on either side, a hole inside, one position."""
    import analyses.per_example as per_example

    model = TokenMixer().double()
    loop = empirical_fisher_loop(model, padded_both_ways()).diagonal
    assert float(loop["mix.weight"].abs().max()) > 0
    for blocks, chunk_size in ((False, 4), (True, 1), (True, 2), (True, 4), (True, 16)):
        monkeypatch.setattr(per_example, "uses_blocks", lambda device, blocks=blocks: blocks)
        layers = LayerGradients(model, dict(model.named_parameters()), _negative_log_likelihood, batch_logits)
        sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        layers.add(padded_both_ways()[0], sums)
        assert layers.uncovered == []
        fast = empirical_fisher(model, padded_both_ways(), chunk_size=chunk_size).diagonal
        for name, expected in loop.items():  # float32 results; a position cut wrongly is off by O(1)
            where = f"{name}, blocks {blocks}, chunk {chunk_size}"
            torch.testing.assert_close(fast[name], expected, rtol=1e-6, atol=1e-12, msg=where)
            torch.testing.assert_close(sums[name].float() / 6, expected, rtol=1e-6, atol=1e-12, msg=where)


def test_the_check_runs_on_two_examples_and_only_its_pass_asks_for_the_parameters_gradients(monkeypatch):
    """The proof needs autograd's gradient of every parameter (the model's size again, beside the Fisher's sums): it
    is taken once, on two examples, and never in the passes that add squares."""
    model = Classifier().double()
    asked: list[tuple[int, int]] = []  # (examples in the pass, parameters asked for)
    real_grad = torch.autograd.grad
    parameters = {id(p) for p in model.parameters()}

    def spy(outputs, inputs, *args, **kwargs):
        asked.append((outputs.shape[0] if outputs.ndim else -1, sum(id(t) in parameters for t in inputs)))
        return real_grad(outputs, inputs, *args, **kwargs)

    sizes = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    monkeypatch.setattr(torch.autograd, "grad", spy)
    layers = LayerGradients(model, dict(model.named_parameters()), _negative_log_likelihood, batch_logits)
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batch in batches():
        layers.add(batch, sums)
    assert sizes == [2, 5, 3]  # the check's two examples, then the batches of 5 and 3
    assert [count for _, count in asked] == [len(parameters), 0, 0]
