"""Every listed AutoModelForSequenceClassification family, built tiny from a config in the test, goes through
training (SAM, FSAM), a surface, the Hessian (double backward through eager attention) and the Fisher grouping."""

import re

import numpy as np
import pytest
import torch
from torch.func import functional_call

from analyses.fisher_distribution import module_type
from analyses.hessian import HessianOperator, name_filter
from analyses.spectral import lanczos
from landscape.core.params import model_parameters
from landscape.data.losses import model_inputs, per_example_loss_from_logits
from landscape.geometry.surface import compute_surface
from landscape.models.jobs import DataSelection
from landscape.models.runs import evaluate_subset, load_run_model, open_run
from landscape.models.tiny import ARCHITECTURES, build_tiny_model_folder
from landscape.training.config import TrainConfig
from landscape.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

# The task head's last layer and one LayerNorm early in the network: the Hessian of that block needs the second
# derivative through every later attention layer.
HESSIAN_BLOCK = {
    "bert": r"^classifier\.|encoder\.layer\.0\.attention\.output\.LayerNorm\.weight",
    "roberta": r"^classifier\.out_proj\.|encoder\.layer\.0\.attention\.output\.LayerNorm\.weight",
    "electra": r"^classifier\.out_proj\.|encoder\.layer\.0\.attention\.output\.LayerNorm\.weight",
    "distilbert": r"^classifier\.|transformer\.layer\.0\.sa_layer_norm\.weight",
    "albert": r"^classifier\.|albert_layers\.0\.attention\.LayerNorm\.weight",
    "gpt2": r"^score\.|transformer\.h\.0\.ln_2\.weight",
    "deberta-v2": r"^classifier\.|encoder\.layer\.0\.attention\.output\.LayerNorm\.weight",
}
# Parameters no module type names on purpose: poolers, DeBERTa's relative-position projections.
UNTYPED = r"pooler|pos_key_proj|pos_query_proj|rel_embeddings"


@pytest.fixture(scope="module", params=ARCHITECTURES)
def family(request, tmp_path_factory, tiny_data_dir):
    """(architecture, model folder, a finished SAM run of it)."""
    root = tmp_path_factory.mktemp(request.param)
    folder = build_tiny_model_folder(root / "model", architecture=request.param)
    config = TrainConfig(task="sst2", model=str(folder), data_dir=str(tiny_data_dir), out=str(root / "sam"),
                         lr=1e-3, batch_size=8, max_steps=3, save_every=100, seed=2, sam="sam")  # fmt: skip
    train(config, progress=False)
    return request.param, folder, root / "sam"


def test_fsam_trains_every_family(family, tiny_data_dir, tmp_path):
    from analyses.fisher import EmpiricalFisherMask

    _, folder, _ = family
    config = TrainConfig(task="sst2", model=str(folder), data_dir=str(tiny_data_dir), out=str(tmp_path / "fsam"),
                         lr=1e-3, batch_size=8, max_steps=3, save_every=100, seed=2, sam="fsam", mask_interval=2,
                         fisher_samples=8)  # fmt: skip
    result = train(config, progress=False, fisher=EmpiricalFisherMask())
    assert result.steps == 3 and np.isfinite(result.dev_metrics["loss"])


def test_surface_origin_equals_a_plain_eval(family, tmp_path):
    _, _, run_dir = family
    result = compute_surface(run_dir, tmp_path / "s", dims=1, grid=3, data=DataSelection(samples=8, seed=0))
    run = open_run(run_dir)
    loaded = load_run_model(run)
    subset = DataSelection(samples=8, seed=0).subset(run, loaded.tokenizer)
    assert result.arrays["loss"][1] == evaluate_subset(loaded.model, subset).loss  # a = 0 is θ, bitwise


def test_hessian_top_eigenvalue_equals_the_dense_float64_reference(family):
    architecture, _, run_dir = family
    run = open_run(run_dir)
    loaded = load_run_model(run, attn_implementation="eager")
    model = loaded.model.double()
    subset = DataSelection(samples=6, seed=0, batch_size=6).subset(run, loaded.tokenizer)
    operator = HessianOperator(model, subset, parameter_filter=name_filter(HESSIAN_BLOCK[architecture]))
    params = model_parameters(model)
    names = operator.parameter_names
    assert any("norm" in n.lower() or "ln_" in n for n in names)  # the block reaches inside the network
    base = torch.cat([params[n].detach().reshape(-1) for n in names])
    batch = subset.batches[0]

    def loss(flat):
        values = dict(zip(names, torch.split(flat, [params[n].numel() for n in names]), strict=True))
        values = {n: v.reshape(params[n].shape) for n, v in values.items()}
        logits = functional_call(model, values, args=(), kwargs=model_inputs(batch, model), strict=False).logits
        return per_example_loss_from_logits(logits, batch["labels"]).mean()

    dense = torch.func.hessian(loss)(base.clone())
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    top = lanczos(operator, 1, which="LA", tol=1e-8, seed=0, return_eigenvectors=False)
    assert top.eigenvalues[0] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_per_example_fisher_by_layer_hooks_equals_the_per_example_loop(family):
    """The Fisher's one-backward layer path (analyses.per_example) against one example at a time, float64: the word
    embeddings and every Linear are taken by the layer path in every family (the check would drop a wrong one),
    except DeBERTa's relative-position projections, whose input (the relative embeddings) the batch shares."""
    from analyses.fisher import _negative_log_likelihood, empirical_fisher, empirical_fisher_loop
    from analyses.per_example import LayerGradients
    from landscape.models.evaluation import batch_logits

    run = open_run(family[2])
    loaded = load_run_model(run)
    model = loaded.model.double()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    batches = DataSelection(samples=10, seed=0, batch_size=6).subset(run, loaded.tokenizer).batches  # 6 + 4
    fast, loop = empirical_fisher(model, batches, chunk_size=4), empirical_fisher_loop(model, batches)
    scale = max(float(value.abs().max()) for value in loop.diagonal.values())
    for name, expected in loop.diagonal.items():
        torch.testing.assert_close(fast.diagonal[name].double(), expected.double(), rtol=1e-5, atol=1e-10 * scale,
                                   msg=name)  # fmt: skip
    layers = LayerGradients(model, dict(model.named_parameters()), _negative_log_likelihood, batch_logits)
    layers.add(batches[0], {name: torch.zeros_like(p) for name, p in model.named_parameters()})
    table = model.get_input_embeddings().weight
    word_embeddings = next(name for name, p in model.named_parameters() if p is table)
    shared_input = re.compile("pos_key_proj|pos_query_proj")
    linear = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not shared_input.search(name)]  # fmt: skip
    assert word_embeddings in layers.covered
    assert all(f"{name}.weight" in layers.covered for name in linear), set(layers.uncovered)


def test_every_parameter_has_its_module_type(family):
    run_dir = family[2]
    model = load_run_model(open_run(run_dir)).model

    untyped = [n for n in model_parameters(model) if module_type(n) == "other" and not re.search(UNTYPED, n)]
    assert untyped == []
    kinds = {module_type(n) for n in model_parameters(model)}
    assert {"layernorm", "ffn", "attention.output", "embeddings", "classifier"} <= kinds
    assert {"attention.query", "attention.key", "attention.value"} <= kinds or "attention.qkv" in kinds


def test_sentence_pairs_reach_families_without_segment_embeddings(family, tmp_path):
    """A BERT-style tokenizer gives pairs token_type_ids of 1: dropped for RoBERTa, DistilBERT, GPT-2, DeBERTa-v3."""
    folder = family[1]
    rte = tmp_path / "data" / "glue" / "RTE"
    rte.mkdir(parents=True)
    label = ("not_entailment", "entailment")
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tthe cat was good\tthe dog was {('bad', 'good')[i % 2]}\t{label[i % 2]}" for i in range(8)
    ]
    for name in ("train.tsv", "dev.tsv"):
        (rte / name).write_text("\n".join(rows) + "\n")
    config = TrainConfig(task="rte", model=str(folder), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                         lr=1e-3, batch_size=4, max_steps=2, save_every=100, seed=2)  # fmt: skip
    assert np.isfinite(train(config, progress=False).dev_metrics["loss"])
