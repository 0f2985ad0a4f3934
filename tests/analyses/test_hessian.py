"""The Hessian operator of a tiny BERT against dense float64 references, its model hygiene, and PyHessian."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.func import functional_call

from analyses.hessian import HessianOperator, name_filter, pyhessian_eigenvalues, pyhessian_trace
from analyses.spectral import lanczos
from landscape.core.errors import ConfigError
from landscape.core.params import model_parameters
from landscape.data.losses import model_inputs, per_example_loss_from_logits
from landscape.models.loading import load_model
from landscape.models.runs import open_run, select_subset

SMALL_BLOCK = r"^classifier\.|encoder\.layer\.1\.output\.LayerNorm\."  # 66 + 64 = 130 scalars
METHODS = ("double-backward", "forward-over-reverse")


@pytest.fixture(scope="module")
def run(tiny_run):
    return open_run(tiny_run)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(run, *, dtype=torch.float64, attn="eager"):
    loaded = load_model(run.model, run.task, seed=3, attn_implementation=attn, dropout=0.1)
    model = loaded.model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), loaded.tokenizer


@pytest.fixture(scope="module")
def model64(run):
    return tiny_model(run)


@pytest.fixture(scope="module")
def uneven(run, model64):
    """12 examples in batches of 5, 5 and 2."""
    return select_subset(run, model64[1], samples=12, seed=0, batch_size=5)


@pytest.fixture(scope="module")
def whole(run, model64):
    """The same 12 examples in one batch."""
    return select_subset(run, model64[1], samples=12, seed=0, batch_size=12)


def dense_reference(model, batch, names, coordinates=None):
    """torch.func.hessian of the mean loss over ``batch`` w.r.t. the flattened ``names`` (or some coordinates)."""
    params = model_parameters(model)
    base = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    index = torch.arange(len(base)) if coordinates is None else torch.as_tensor(coordinates)

    def loss(x):
        flat = base.index_put((index,), x)
        values = {n: t.reshape(params[n].shape) for n, t in zip(names, torch.split(flat, sizes), strict=True)}
        logits = functional_call(model, values, args=(), kwargs=model_inputs(batch)).logits
        return per_example_loss_from_logits(logits, batch["labels"]).mean()

    return torch.func.hessian(loss)(base[index].clone())


def operator_matrix(operator, columns):
    """Columns H e_j of the operator, as a [dim, len(columns)] matrix."""
    out = []
    for j in columns:
        e = torch.zeros(operator.dim, dtype=torch.float64)
        e[j] = 1.0
        out.append(operator.matvec(e))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_hvp_equals_the_dense_float64_hessian(model64, uneven, whole, method):
    model, _ = model64
    operator = HessianOperator(model, uneven, parameter_filter=name_filter(SMALL_BLOCK), method=method)
    assert operator.dim == 130
    reference = dense_reference(model, whole.batches[0], operator.parameter_names)
    assert reference.abs().max() > 1e-3  # a non-trivial Hessian
    if method == "double-backward":  # every column
        torch.testing.assert_close(operator_matrix(operator, range(operator.dim)), reference, rtol=1e-9, atol=1e-11)
    else:  # forward-over-reverse costs more per product here: random probes
        probes = torch.randn(operator.dim, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ours = torch.stack([operator.matvec(p) for p in probes.T], dim=1)
        torch.testing.assert_close(ours, reference @ probes, rtol=1e-9, atol=1e-11)


def test_hvp_on_random_coordinates_of_a_bigger_block(model64, uneven, whole):
    model, _ = model64
    block = r"encoder\.layer\.0\.attention\.self\.(query|key|value)\.weight"
    operator = HessianOperator(model, uneven, parameter_filter=name_filter(block))
    assert operator.dim == 3 * 32 * 32
    coordinates = np.sort(np.random.default_rng(0).choice(operator.dim, 24, replace=False))
    reference = dense_reference(model, whole.batches[0], operator.parameter_names, coordinates)
    ours = operator_matrix(operator, coordinates)[coordinates]
    assert reference.abs().max() > 1e-6
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-12)


def test_uneven_last_batch_gives_the_full_batch_product(model64, uneven, whole):
    model, _ = model64
    assert [len(b["labels"]) for b in uneven.batches] == [5, 5, 2]
    v = torch.randn(HessianOperator(model, whole).dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = HessianOperator(model, whole).matvec(v)
    batched = HessianOperator(model, uneven).matvec(v)
    torch.testing.assert_close(batched, full, rtol=1e-9, atol=1e-12)
    # The mean of the three batch Hessians (each batch weighted equally) is another matrix: the test can tell.
    per_batch = [HessianOperator(model, [b]).matvec(v) for b in uneven.batches]
    assert (sum(per_batch) / 3 - full).norm() > 1e-3 * full.norm()


def test_both_methods_agree_on_the_whole_model_in_float32(run):
    model, tokenizer = tiny_model(run, dtype=torch.float32)
    subset = select_subset(run, tokenizer, samples=8, seed=1, batch_size=8)
    v = torch.randn(HessianOperator(model, subset).dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    products = [HessianOperator(model, subset, method=m).matvec(v) for m in METHODS]
    assert products[0].dtype == torch.float64
    torch.testing.assert_close(products[0], products[1], rtol=1e-4, atol=1e-4 * float(products[0].abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_a_product_written_into_out_equals_a_fresh_one_and_reuses_its_buffers(run, method):
    """``matvec(v, out=)`` fills ``out`` (Lanczos hands it the basis row of the next vector) with the same values
    as a fresh product; a float32 model converts v into one held buffer, the same one at every product."""
    model, tokenizer = tiny_model(run, dtype=torch.float32)
    subset = select_subset(run, tokenizer, samples=8, seed=1, batch_size=4)
    operator = HessianOperator(model, subset, method=method)
    v = torch.randn(operator.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fresh = operator.matvec(v)
    buffer = operator._tangent_buffer.data_ptr()
    out = torch.full((operator.dim,), float("nan"), dtype=torch.float64)
    assert operator.matvec(v, out=out) is out
    torch.testing.assert_close(out, fresh, rtol=1e-6, atol=1e-7 * float(fresh.abs().max()))
    assert operator._tangent_buffer.data_ptr() == buffer
    with pytest.raises(ConfigError, match=r"out must be a float64 vector"):
        operator.matvec(v, out=torch.empty(operator.dim, dtype=torch.float32))


def test_deterministic_with_dropout_in_the_config_and_train_mode(run, uneven):
    model, _ = tiny_model(run)
    assert model.config.hidden_dropout_prob == 0.1
    model.train()
    operator = HessianOperator(model, uneven, parameter_filter=name_filter(SMALL_BLOCK), method="forward-over-reverse")
    v = torch.randn(operator.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first, second = operator.matvec(v), operator.matvec(v)
    assert torch.equal(first, second)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    torch.testing.assert_close(
        HessianOperator(model, uneven, parameter_filter=name_filter(SMALL_BLOCK)).matvec(v),
        first,
        rtol=1e-9,
        atol=1e-12,
    )


def model_state(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.grad for n, p in model.named_parameters()},
    )


def assert_state_equal(model, before):
    params, flags, modes, grads = model_state(model)
    assert all(torch.equal(params[n], before[0][n]) for n in params)
    assert flags == before[1] and modes == before[2]
    assert all(grads[n] is before[3][n] for n in grads)


def mixed_state_model(run):
    model, tokenizer = tiny_model(run, dtype=torch.float32)
    model.train()
    model.bert.encoder.layer[0].eval()  # a submodule in another mode than its parent
    model.classifier.weight.requires_grad_(True)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    return model, tokenizer


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_model_state_restored_after_an_exception(run, method):
    model, tokenizer = mixed_state_model(run)
    subset = select_subset(run, tokenizer, samples=12, seed=0, batch_size=5)
    before = model_state(model)
    calls = []

    def explode_on_second_batch(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise Boom("mid-way")

    handle = model.classifier.register_forward_hook(explode_on_second_batch)
    try:
        operator = HessianOperator(model, subset, method=method)
        with pytest.raises(Boom):
            operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
    finally:
        handle.remove()
    assert_state_equal(model, before)
    operator.matvec(torch.ones(operator.dim, dtype=torch.float64))  # and it works afterwards
    assert_state_equal(model, before)


def test_sdpa_attention_is_refused_with_a_clear_message(run, monkeypatch):
    model, tokenizer = tiny_model(run, attn="sdpa")
    subset = select_subset(run, tokenizer, samples=4, seed=0)
    with pytest.raises(ConfigError, match=r"attn_implementation='sdpa'.*attn_implementation=\"eager\""):
        HessianOperator(model, subset)
    # Past the configuration check, the failed second derivative itself is turned into the same advice.
    monkeypatch.setattr("analyses.hessian.check_attention", lambda model: None)
    for method in METHODS:
        operator = HessianOperator(model, subset, method=method)
        with pytest.raises(ConfigError, match=r"not implemented.*attn_implementation=\"eager\""):
            operator.matvec(torch.ones(operator.dim, dtype=torch.float64))


def test_bad_arguments(model64, uneven):
    model, _ = model64
    with pytest.raises(ConfigError, match="selects no parameter"):
        HessianOperator(model, uneven, parameter_filter=name_filter("nothing-matches"))
    with pytest.raises(ConfigError, match="method must be one of"):
        HessianOperator(model, uneven, method="finite-differences")
    with pytest.raises(ConfigError, match=r"not a regular expression"):
        name_filter("(")
    operator = HessianOperator(model, uneven, parameter_filter=name_filter(SMALL_BLOCK))
    with pytest.raises(ConfigError, match=r"shape \(130,\)"):
        operator.matvec(torch.zeros(3, dtype=torch.float64))


def test_pyhessian_cross_check_agrees_and_restores_the_model(run):
    model, tokenizer = mixed_state_model(run)
    subset = select_subset(run, tokenizer, samples=12, seed=0, batch_size=5)  # PyHessian's dataloader mode
    chosen = name_filter(SMALL_BLOCK)
    before = model_state(model)
    operator = HessianOperator(model, subset, parameter_filter=chosen)
    dense = operator_matrix(operator, range(operator.dim)).numpy()
    exact = np.linalg.eigvalsh((dense + dense.T) / 2)
    top = exact[np.argmax(np.abs(exact))]
    values, vectors = pyhessian_eigenvalues(model, subset, 1, parameter_filter=chosen, max_iter=500, tol=1e-6)
    assert_state_equal(model, before)
    assert vectors.shape == (1, operator.dim)
    assert values[0] == pytest.approx(top, rel=1e-3)
    ours = lanczos(operator, 1, which="LM", tol=1e-5)
    assert ours.eigenvalues[0] == pytest.approx(top, rel=1e-5)
    trace = pyhessian_trace(model, subset, 40, parameter_filter=chosen, seed=0)
    assert_state_equal(model, before)
    assert trace.samples == 40
    assert abs(trace.mean - np.trace(dense)) <= 3 * trace.se


def test_pyhessian_backend_without_the_package_names_the_extra(run, monkeypatch):
    model, tokenizer = tiny_model(run, dtype=torch.float32)
    subset = select_subset(run, tokenizer, samples=4, seed=0)
    monkeypatch.setitem(sys.modules, "pyhessian", None)  # makes `import pyhessian` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'landscape\[pyhessian\]'"):
        pyhessian_eigenvalues(model, subset, 1, parameter_filter=name_filter(SMALL_BLOCK))
