"""Distributions of the diagonal empirical Fisher over layers and module types, and the FSAM mask they induce.

The Fisher is FSAM's Eq. 9, ``F̂ = (1/N) Σ_i (∇_w log p(y_i | x_i))²`` per coordinate, from per-example gradients:
:func:`analyses.fisher.empirical_fisher` (``mode="per-example"``), the same code the FSAM optimizer's mask uses, on a
fixed, seeded subset, in eval mode. From it (Zhong et al. 2022, FSAM §3.2 and their Fig. 4-style analyses):

* log10 histograms per layer and per module type, on one set of edges spanning every positive value (exact zeros,
  which a log scale cannot show, are counted apart: histogram counts + zero counts = coordinates of the group);
* quantiles of the raw Fisher values (zeros included) per layer and per module type;
* the FSAM mask (Eqs. 10–11, :func:`analyses.fisher.fisher_mask`: the top ``(1 − s)·|w|`` coordinates over all
  parameters together): the share of its kept coordinates in each layer (sums to 1) and each layer's kept fraction;
* the IoU ``|A∩B| / |A∪B|`` of the masks of two checkpoints or two runs (same examples), overall and per layer.

Layers are :func:`analyses.fisher.layer_of` (``layer.<i>`` for transformer blocks, else ``embeddings``, ``pooler``,
``classifier``…). Module types come from one table of name patterns per family (:data:`MODULE_PATTERNS`):
BERT, RoBERTa, ELECTRA and MiniLM (``attention.self.query``, ``attention.output.dense``, ``intermediate.dense``),
DeBERTa-v2/v3 (``query_proj``…), ALBERT (``attention.query``, ``attention.dense``, ``ffn``, ``ffn_output``),
DistilBERT (``q_lin``, ``out_lin``, ``ffn.lin1``) and GPT-2 (the fused ``attn.c_attn`` → ``attention.qkv``,
``attn.c_proj``, ``mlp.c_fc``); any LayerNorm (``LayerNorm``, ``layer_norm``, ``ln_1``) → ``layernorm``; token and
position embeddings (``embeddings``, ``wte``, ``wpe``, ALBERT's projection) → ``embeddings``; the task head
(``classifier``, ``pre_classifier``, GPT-2's ``score``) → ``classifier``; everything else (a pooler) → ``other``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analyses.fisher import (
    FISHER_MODES,
    FisherResult,
    check_chunk_size,
    check_sparsity,
    empirical_fisher,
    fisher_mask,
    layer_of,
    mask_iou,
)
from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.locks import locks_output
from landscape.core.params import check_same_keys_and_shapes, content_hash, model_parameters
from landscape.core.results import Result
from landscape.models.jobs import AnalysisJob, DataSelection
from landscape.models.runs import WEIGHTS, load_run_model, open_run
from landscape.models.state import restored

MODULE_TYPES = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.qkv",
    "attention.output",
    "ffn",
    "embeddings",
    "layernorm",
    "classifier",
    "other",
)
QUANTILE_LEVELS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
DEFAULT_BINS = 60

# (module type, pattern searched in the parameter name), first match wins; the families' spellings side by side.
MODULE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        ("layernorm", r"layernorm|layer_norm|(?:^|\.)ln_(?:\d|f)\."),
        ("attention.query", r"(?:^|\.)attention\.(?:self\.)?(?:query|query_proj|q_lin)\."),
        ("attention.key", r"(?:^|\.)attention\.(?:self\.)?(?:key|key_proj|k_lin)\."),
        ("attention.value", r"(?:^|\.)attention\.(?:self\.)?(?:value|value_proj|v_lin)\."),
        ("attention.qkv", r"(?:^|\.)attn\.c_attn\."),
        (
            "attention.output",
            r"(?:^|\.)(?:attention\.output\.dense|attention\.out_lin|attention\.dense|attn\.c_proj)\.",
        ),
        ("ffn", r"(?:^|\.)(?:intermediate\.dense|output\.dense|ffn\.lin[12]|ffn|ffn_output|mlp\.c_fc|mlp\.c_proj)\."),
        ("embeddings", r"(?:^|\.)(?:embeddings|wte|wpe|embedding_hidden_mapping_in)\."),
        ("classifier", r"(?:^|\.)(?:classifier|pre_classifier|score)\."),
    )
)


def module_type(name: str) -> str:
    """The module type of a parameter from its name (one of :data:`MODULE_TYPES`; see the module doc)."""
    for kind, pattern in MODULE_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


# ------------------------------------------------------------------------------------------------------------------
# The Fisher of a loaded run model


@contextmanager
def gradients_enabled(model: nn.Module, parameter_filter: Callable[[str], bool] | None = None) -> Iterator[None]:
    """Turn ``requires_grad`` on for the selected parameters (all by default); restore every flag on exit."""
    with restored(model, values=False):
        for name, p in model.named_parameters():
            if parameter_filter is None or parameter_filter(name):
                p.requires_grad_(True)
        yield


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    parameter_filter: Callable[[str], bool] | None = None,
    mode: str = "per-example",
    chunk_size: int | None = None,
    state: Mapping[str, np.ndarray] | None = None,
    keep: Callable | None = None,
) -> FisherResult:
    """:func:`analyses.fisher.empirical_fisher` of a model whose parameters may be frozen (as analyses load them).

    The selected parameters (all by default) take part whatever their ``requires_grad``; flags are restored after.
    ``state`` / ``keep``: resuming, as :func:`~analyses.fisher.empirical_fisher`.
    """
    with gradients_enabled(model, parameter_filter):
        return empirical_fisher(
            model, batches, mode=mode, chunk_size=chunk_size, params=parameter_filter, state=state, keep=keep
        )


def fisher_unit(
    model: nn.Module, batches: list, mode: str, store: Any, name: str, chunk_size: int | None = None
) -> tuple[dict, int]:
    """The Fisher diagonal of ``model`` as the progress unit ``name`` of ``store`` (running sums kept while it runs);
    returns (diagonal as float32 tensors, number of examples). ``chunk_size``: as :func:`fisher_diagonal`."""

    def compute() -> dict[str, np.ndarray]:
        fisher = fisher_diagonal(
            model,
            batches,
            mode=mode,
            chunk_size=chunk_size,
            state=store.partial(name),
            keep=lambda state: store.keep(name, state),
        )
        arrays = {f"diagonal-{key}": value.cpu().numpy() for key, value in fisher.diagonal.items()}
        return {**arrays, "num_examples": np.int64(fisher.num_examples)}

    arrays = store.unit(name, compute)
    stored = {key[len("diagonal-") :]: value for key, value in arrays.items() if key.startswith("diagonal-")}
    # cpu: the distributions are numpy statistics of the stored diagonal
    diagonal = {key: torch.from_numpy(value) for key, value in stored.items()}
    return diagonal, int(arrays["num_examples"])


# ------------------------------------------------------------------------------------------------------------------
# Distributions


def _groups(names: Iterable[str], key: Callable[[str], str], order: Sequence[str] | None = None) -> dict[str, list]:
    groups: dict[str, list[str]] = {group: [] for group in order or ()}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return groups


def log10_edges(diagonal: Mapping[str, torch.Tensor], bins: int = DEFAULT_BINS) -> np.ndarray:
    """``bins + 1`` equally spaced edges in log10 from the floor of the smallest positive value's log10 to the ceiling
    of the largest's (``[-1, 0]`` split evenly when nothing is positive)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"the number of histogram bins must be a positive integer, got {bins!r}")
    low, high = math.inf, -math.inf
    for value in diagonal.values():
        positive = value[value > 0]
        if positive.numel():
            low = min(low, float(positive.min()))
            high = max(high, float(positive.max()))
    if not math.isfinite(low):
        return np.linspace(-1.0, 0.0, bins + 1)
    start, stop = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return np.linspace(start, stop if stop > start else start + 1, bins + 1)


def _group_values(diagonal: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    if not names:
        return np.zeros(0, dtype=np.float64)
    return torch.cat([diagonal[name].detach().reshape(-1).double().cpu() for name in names]).numpy()


def _histogram_and_quantiles(values: np.ndarray, edges: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    positive = values[values > 0]
    counts = np.histogram(np.log10(positive), bins=edges)[0].astype(np.int64)
    quantiles = np.quantile(values, levels) if values.size else np.full(len(levels), np.nan)
    return counts, quantiles, int((values == 0).sum())


def fisher_distributions(
    diagonal: Mapping[str, torch.Tensor],
    *,
    sparsity: float,
    bins: int = DEFAULT_BINS,
    quantile_levels: Sequence[float] = QUANTILE_LEVELS,
) -> dict[str, np.ndarray]:
    """The arrays of a ``fisher`` result (docs/results.md) from a Fisher diagonal (name → tensor, any shapes).

    ``hist_edges`` [n+1] (log10 of F̂), ``layer_names`` [L], ``layer_sizes`` [L], ``layer_hist`` [L, n],
    ``layer_quantiles`` [L, Q], ``zero_count_layer`` [L], ``module_types`` [M], ``module_sizes`` [M],
    ``module_hist`` [M, n], ``module_quantiles`` [M, Q], ``zero_count_module`` [M], ``quantile_levels`` [Q],
    ``layer_mask_share`` [L] (share of the top-(1−s) mask's kept coordinates in each layer; NaN if it keeps none) and
    ``layer_kept_fraction`` [L]. Quantiles are of the raw values (not log10), zeros included.
    """
    levels = np.asarray(quantile_levels, dtype=np.float64)
    if levels.ndim != 1 or not levels.size or not np.all((levels >= 0) & (levels <= 1)):
        raise ConfigError(f"quantile levels must be numbers in [0, 1], got {list(quantile_levels)}")
    values = {name: value.detach() for name, value in diagonal.items()}
    if not values:
        raise ConfigError("the Fisher diagonal is empty; expected at least one parameter")
    bad = [name for name, value in values.items() if not bool(torch.isfinite(value).all()) or bool((value < 0).any())]
    if bad:
        raise CheckpointError(f"the Fisher of {bad[0]} has negative or non-finite values (a diverged checkpoint?)")
    edges = log10_edges(values, bins)
    mask = fisher_mask(values, sparsity)
    kept_total = sum(int(m.sum()) for m in mask.values())
    arrays: dict[str, Any] = {"hist_edges": edges, "quantile_levels": levels}
    for prefix, plural, groups in (
        ("layer", "layer_names", _groups(values, layer_of)),
        ("module", "module_types", _groups(values, module_type, MODULE_TYPES)),
    ):
        hists, quantiles, zeros, sizes = [], [], [], []
        for names in groups.values():
            group = _group_values(values, names)
            counts, group_quantiles, zero_count = _histogram_and_quantiles(group, edges, levels)
            hists.append(counts)
            quantiles.append(group_quantiles)
            zeros.append(zero_count)
            sizes.append(group.size)
        arrays[plural] = np.asarray(list(groups), dtype=str)
        arrays[f"{prefix}_sizes"] = np.asarray(sizes, dtype=np.int64)
        arrays[f"{prefix}_hist"] = np.asarray(hists, dtype=np.int64).reshape(len(groups), len(edges) - 1)
        arrays[f"{prefix}_quantiles"] = np.asarray(quantiles, dtype=np.float64).reshape(len(groups), len(levels))
        arrays[f"zero_count_{prefix}"] = np.asarray(zeros, dtype=np.int64)
        if prefix == "layer":
            kept = np.asarray([sum(int(mask[n].sum()) for n in names) for names in groups.values()], dtype=np.int64)
            arrays["layer_kept"] = kept
            arrays["layer_kept_fraction"] = kept / np.maximum(np.asarray(sizes, dtype=np.float64), 1)
            arrays["layer_mask_share"] = kept / kept_total if kept_total else np.full(len(kept), np.nan)
    return arrays


def mask_overlap(
    diagonal: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *, sparsity: float
) -> dict[str, Any]:
    """IoU of the FSAM masks (sparsity s) of two Fisher diagonals: ``iou`` overall and ``layer_iou`` (layer → IoU).

    Each mask is the top ``(1 − s)`` of its own model over all parameters (Eq. 10); the layer IoU restricts both masks
    to the layer's coordinates. Equal diagonals give 1.0 everywhere.
    """
    check_same_keys_and_shapes(diagonal, other, "the two Fisher diagonals")
    first, second = fisher_mask(dict(diagonal), sparsity), fisher_mask(dict(other), sparsity)
    layer_iou = {
        layer: mask_iou({n: first[n] for n in names}, {n: second[n] for n in names})
        for layer, names in _groups(first, layer_of).items()
    }
    return {"iou": mask_iou(first, second), "layer_iou": layer_iou}


# ------------------------------------------------------------------------------------------------------------------
# The fisher result of a run


@locks_output()
def compute_fisher(
    run_path: str | Path,
    out: str | Path,
    *,
    sparsity: float = 0.9,
    compare: str | Path | None = None,
    compare_weights: str | None = None,
    weights: str = "final",
    mode: str = "per-example",
    bins: int = DEFAULT_BINS,
    data: DataSelection | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    checkpoint_every: float = 60.0,
    chunk_size: int | None = None,
) -> tuple[Result, bool]:
    """The ``fisher`` result of the run's ``weights`` on the examples ``data`` selects, saved to ``out``.

    ``chunk_size``: examples per block of per-example gradients (None: from the device's free memory); it trades
    memory for speed and changes the values only by float32 rounding, so it is not part of the result's identity.

    Resumable: the running sums are kept every ``checkpoint_every`` seconds and each finished diagonal at once; a
    rerun after a kill gives bitwise the arrays of an uninterrupted run.

    ``data`` defaults to 128 training examples drawn with seed 0.

    With ``compare`` (another run; default the same run when only ``compare_weights`` is given) the mask IoU with its
    ``compare_weights`` (default ``final``) on the same examples goes into ``meta["compare"]``. Returns
    ``(result, skipped)``: a complete result of the same parameters in ``out`` is returned as it is; one of other
    parameters raises :class:`ConfigError` unless ``overwrite``.
    """
    if mode not in FISHER_MODES:
        raise ConfigError(f"Fisher mode {mode!r} is unknown; expected one of {', '.join(FISHER_MODES)}")
    if compare_weights is not None and compare_weights not in WEIGHTS:
        raise ConfigError(f"compare weights must be one of {', '.join(WEIGHTS)}, got {compare_weights!r}")
    check_sparsity(sparsity)
    check_chunk_size(chunk_size)
    log10_edges({}, bins)  # validates the number of bins
    data = data or DataSelection(split="train", samples=128)
    run = data.open_run(run_path)
    loaded = load_run_model(run, weights, device=device)
    subset = data.subset(run, loaded.tokenizer)
    identity: dict[str, Any] = {
        "kind": "fisher",
        "weights": weights,
        "checkpoint_sha256": content_hash(model_parameters(loaded.model)),
        "data": subset.describe(),
        "sparsity": float(sparsity),
        "fisher_mode": mode,
        "bins": bins,
        "quantile_levels": list(QUANTILE_LEVELS),
    }
    other_run = other_model = None
    if compare is not None or compare_weights is not None:
        other_run = open_run(run.path if compare is None else compare, task=run.task.name, data_dir=run.data_dir)
        if other_run.model != run.model:
            raise ConfigError(
                f"--compare needs a run of the same model: {run.path} uses {run.model!r}, "
                f"{other_run.path} uses {other_run.model!r}"
            )
        other_model = load_run_model(other_run, compare_weights or "final", device=device).model
        check_same_keys_and_shapes(
            model_parameters(loaded.model),
            model_parameters(other_model),
            f"the parameters of {run.path} and --compare {other_run.path}",
        )
        identity["compare"] = {  # the content identifies the checkpoint: another spelling of its path is the same
            "weights": compare_weights or "final",
            "checkpoint_sha256": content_hash(model_parameters(other_model)),
        }
    job = AnalysisJob("fisher", out, identity, overwrite=overwrite)
    if job.complete is not None:
        return job.complete, True
    store = job.progress(every_seconds=checkpoint_every)
    diagonal, num_examples = fisher_unit(loaded.model, subset.batches, mode, store, "fisher", chunk_size)
    arrays = fisher_distributions(diagonal, sparsity=sparsity, bins=bins)
    meta: dict[str, Any] = {
        "run": run.describe(),
        "data": subset.describe(),
        "weights": weights,
        "checkpoint_sha256": identity["checkpoint_sha256"],
        "sparsity": float(sparsity),
        "fisher_mode": mode,
        "num_examples": num_examples,
        "total_trace": float(sum(float(v.double().sum()) for v in diagonal.values())),
        "resumed_units": store.resumed_units,
    }
    if other_model is not None and other_run is not None:
        other, _ = fisher_unit(other_model, subset.batches, mode, store, "compare", chunk_size)
        meta["compare"] = {
            "run": other_run.describe(),
            "weights": identity["compare"]["weights"],
            "checkpoint_sha256": identity["compare"]["checkpoint_sha256"],
            "total_trace": float(sum(float(v.double().sum()) for v in other.values())),
            **mask_overlap(diagonal, other, sparsity=sparsity),
        }
    return job.save(arrays, meta), False
