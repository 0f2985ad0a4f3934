"""The closure contract and base optimizers, against plain torch loops written out here."""

import copy

import pytest
import torch
from torch import nn

from optimizers import BASE_OPTIMIZERS, ClosureOptimizer, NonFiniteLossError, make_base_optimizer, parameter_groups


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 3)
        self.LayerNorm = nn.LayerNorm(3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.linear(self.embed(ids).mean(1)))


def make_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)


def per_example(model, ids, labels):
    return nn.functional.cross_entropy(model(ids), labels, reduction="none")


def test_groups_exclude_biases_and_layernorm_from_decay():
    net = TinyNet()
    groups = parameter_groups(net.named_parameters(), 0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay == {"embed.weight", "linear.weight"}
    assert no_decay == {"linear.bias", "LayerNorm.weight", "LayerNorm.bias"}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_closure_step_equals_plain_torch_loop(name, clip):
    torch.manual_seed(0)
    ours_net = TinyNet()
    ref_net = copy.deepcopy(ours_net)
    ours = ClosureOptimizer(make_base_optimizer(name, ours_net, lr=0.1), max_grad_norm=clip)
    ref = make_base_optimizer(name, ref_net, lr=0.1)
    for step in range(5):
        ids, labels = make_batch(step)
        ours.step(lambda ids=ids, labels=labels: per_example(ours_net, ids, labels))
        ref.zero_grad()
        per_example(ref_net, ids, labels).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(ref_net.parameters()), clip)
        ref.step()
    for (name_a, a), (_, b) in zip(ours_net.named_parameters(), ref_net.named_parameters(), strict=True):
        assert torch.equal(a, b), name_a


def test_scheduler_acts_on_the_base_and_state_dict_round_trips():
    net = TinyNet()
    base = make_base_optimizer("adamw", net, lr=1.0)
    opt = ClosureOptimizer(base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    ids, labels = make_batch(0)
    opt.step(lambda: per_example(net, ids, labels))
    sched.step()
    assert base.param_groups[0]["lr"] == 0.5 and opt.param_groups is base.param_groups
    saved = copy.deepcopy(opt.state_dict())
    twin_net = copy.deepcopy(net)
    twin = ClosureOptimizer(make_base_optimizer("adamw", twin_net, lr=1.0))
    twin.load_state_dict(saved)
    assert twin.state is twin.base.state and twin.param_groups is twin.base.param_groups
    assert twin.param_groups[0]["lr"] == 0.5
    ids, labels = make_batch(1)
    opt.step(lambda: per_example(net, ids, labels))
    twin.step(lambda: per_example(twin_net, ids, labels))
    for a, b in zip(net.parameters(), twin_net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_is_reported_and_weights_untouched():
    net = TinyNet()
    before = [p.detach().clone() for p in net.parameters()]
    opt = ClosureOptimizer(make_base_optimizer("sgd", net, lr=0.1))
    ids, labels = make_batch(0)
    with pytest.raises(NonFiniteLossError, match="not finite"):
        opt.step(lambda: per_example(net, ids, labels) * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_closure_must_return_per_example_losses():
    net = TinyNet()
    opt = ClosureOptimizer(make_base_optimizer("sgd", net, lr=0.1))
    ids, labels = make_batch(0)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        opt.step(lambda: per_example(net, ids, labels).mean())
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "learning rate"),
        ({"lr": 1e-3, "weight_decay": -1.0}, "weight decay"),
        ({"lr": -1}, "learning rate"),
    ],
)
def test_bad_hyper_parameters_are_refused(kwargs, message):
    # torch.optim's convention: ValueError (the training layer turns it into a ConfigError, the CLI into one line)
    with pytest.raises(ValueError, match=message):
        make_base_optimizer("adamw", TinyNet(), **kwargs)
    with pytest.raises(ValueError, match="expected one of"):
        make_base_optimizer("lamb", TinyNet(), lr=1e-3)


def test_adafactor_first_step_is_the_written_out_update():
    """Shazeer & Stern (2018) Alg. 4 as torch documents it, step t = 1 (β̂₂ = 1 − 1^τ = 0: the moments are G²'s),
    in float64: V = R Cᵀ / ΣR with R, C the row and column sums of G²; U = G / √V (ε₁ ≪ every entry here);
    Û = U / max(1, RMS(U)); θ ← θ(1 − lr·λ) − max(ε₂, RMS(θ))·min(lr, 1)·Û; a vector's V is G² itself."""
    torch.manual_seed(3)
    net = nn.Linear(5, 4).double()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    lr, decay = 0.05, 0.01
    optimizer = make_base_optimizer("adafactor", net, lr=lr, weight_decay=decay)
    x = torch.randn(7, 5, dtype=torch.float64)
    loss = net(x).square().mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
    optimizer.step()

    def rms(t):
        return t.square().mean().sqrt()

    for name, param in net.named_parameters():
        g, theta = grads[name], before[name]
        if g.dim() > 1:
            squared = g.square()
            rows, cols = squared.sum(dim=1), squared.sum(dim=0)
            v = torch.outer(rows, cols) / rows.sum()
            weight_decay = decay
        else:
            v = g.square()
            weight_decay = 0.0  # biases are in the no-decay group
        u = g / v.sqrt()
        u = u / max(1.0, float(rms(u)))
        alpha = max(1e-3, float(rms(theta))) * min(lr, 1.0)
        expected = theta * (1 - lr * weight_decay) - alpha * u
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["adamw", "adam", "amsgrad", "adagrad", "sgd"])
def test_cpu_base_optimizers_take_the_fused_step_and_match_torch_loop(name):
    """The fused kernel (one pass per tensor) is chosen on the CPU and updates like torch's elementwise loop."""
    torch.manual_seed(0)
    net = TinyNet()
    loop_net, initial = copy.deepcopy(net), copy.deepcopy(net)
    fused = make_base_optimizer(name, net, lr=0.1)
    assert all(group["fused"] for group in fused.param_groups)
    loop = make_base_optimizer(name, loop_net, lr=0.1)
    for group in loop.param_groups:  # the same optimizer, stepped by torch's per-tensor loop (read at each step)
        group.update(fused=False, foreach=False)
    for step in range(5):
        ids, labels = make_batch(step)
        for optimizer, model in ((fused, net), (loop, loop_net)):
            optimizer.zero_grad()
            per_example(model, ids, labels).mean().backward()
            optimizer.step()
    for (key, a), (_, b) in zip(net.named_parameters(), loop_net.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.equal(net.linear.weight, initial.linear.weight)  # it did move: the comparison is not vacuous
    assert all(group["fused"] is False for group in loop.param_groups)
