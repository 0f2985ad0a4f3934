"""The Hessian of a model's mean loss over a fixed set of examples, as a linear operator (Hessian-vector products).

``H = ∇²_w L(w)`` with ``L(w) = (1/N) Σᵢ ℓᵢ(w)``, the mean per-example loss over the N examples of an
:class:`landscape.models.runs.EvalSubset`: each batch contributes ``(1/N) Σ_{i∈b} ∇²ℓᵢ``, so batches of unequal size
(an uneven last batch) weigh by their number of examples and the product equals the full-batch one
(docs/pitfalls.md §10).
The model is evaluated in eval mode (dropout off: the operator is deterministic, docs/pitfalls.md §16) through
``torch.func.functional_call`` on detached copies of its parameters that share their storage: the model's
parameters, ``requires_grad`` flags and ``.grad`` are never touched and its train/eval modes are restored after
every product, also when one raises (docs/pitfalls.md §5).

``w`` is the selected parameters (``parameter_filter(name)``) flattened in ``named_parameters()`` order; vectors are
float64 [dim]; products are computed in the model's dtype and returned in float64.

Two ways to compute ``Hv`` (``method``):

* ``"double-backward"``: ``g = ∂L/∂w`` with ``create_graph=True``, then ``Hv = ∂(gᵀv)/∂w`` (reverse over reverse).
  The first-order graph of every batch is kept between products (it is the same for every v) when there are few
  batches, so each product after the first costs one backward pass through the gradient graph; it is rebuilt if a
  parameter changes in place.
* ``"forward-over-reverse"``: ``Hv = jvp(grad(L), (w,), (v,))`` with ``torch.func`` (Pearlmutter 1994's R-operator
  as a forward-mode derivative of the gradient); nothing is kept between products.

``"auto"`` takes the faster here (see docs/hessian.md for the measurement on MiniLM). Hugging Face models with SDPA
attention have no double backward (docs/pitfalls.md §15): load them with ``attn_implementation="eager"``.

A cross-check backend through PyHessian (Yao et al. 2020) is here too: :func:`pyhessian_eigenvalues` and
:func:`pyhessian_trace` feed the same examples to ``pyhessian.hessian``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp

from analyses.spectral import TraceEstimate
from landscape.core.errors import ConfigError
from landscape.core.params import model_parameters
from landscape.data.losses import model_inputs, per_example_loss_from_logits
from landscape.models.evaluation import batch_losses
from landscape.models.state import eval_mode, restored

HVP_METHODS = ("auto", "double-backward", "forward-over-reverse")
# Measured on MiniLM, 32 CoLA examples, 1 thread (docs/hessian.md): the kept-graph double backward is the fastest.
FASTEST_METHOD = "double-backward"
# Kept first-order graphs cost about one gradient (4 bytes per parameter) plus the activations, per batch.
MAX_KEPT_BATCHES = 8

Batch = dict[str, torch.Tensor]


def _batches_of(subset: Any) -> tuple[Batch, ...]:
    batches = tuple(getattr(subset, "batches", subset))
    if not batches:
        raise ConfigError("the Hessian needs at least one batch of examples, got none")
    return batches


def check_attention(model: nn.Module) -> None:
    """Raise :class:`ConfigError` when ``model`` is a Hugging Face model whose attention has no double backward."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager"):
        raise ConfigError(
            f"the model uses attn_implementation={implementation!r}, which has no second derivative; Hessian-vector "
            'products need the model loaded with attn_implementation="eager" '
            '(load_run_model(run, attn_implementation="eager"))'
        )


def _second_derivative_error(exc: RuntimeError) -> ConfigError | None:
    text = str(exc)
    if "derivative" in text and ("not implemented" in text or "scaled_dot_product" in text):
        return ConfigError(
            f"a second derivative is not implemented for an operation of this model ({text.splitlines()[0]}); "
            'with Hugging Face models load them with attn_implementation="eager"'
        )
    return None


class HessianOperator:
    """``v ↦ Hv`` for the Hessian of the mean per-example loss of ``model`` over ``subset`` (module docstring).

    ``subset``: an EvalSubset (or any sequence of batches: dicts of ``input_ids``, ``attention_mask``, ...,
    ``labels``). ``parameter_filter(name) -> bool`` selects parameters (default: all). ``dim``: the number of
    selected scalars; ``parameter_names``: the selected names, in the order of the flattened vector.
    ``keep_graph`` (double backward only): keep each batch's first-order graph between products; default when
    there are at most ``MAX_KEPT_BATCHES`` batches.
    """

    def __init__(
        self,
        model: nn.Module,
        subset: Any,
        *,
        parameter_filter: Callable[[str], bool] | None = None,
        method: str = "auto",
        keep_graph: bool | None = None,
    ):
        if method not in HVP_METHODS:
            raise ConfigError(f"method must be one of {', '.join(HVP_METHODS)}, got {method!r}")
        check_attention(model)
        self.model = model
        self.batches = _batches_of(subset)
        self.num_examples = sum(int(batch["labels"].shape[0]) for batch in self.batches)
        parameters = model_parameters(model)
        selected = [name for name in parameters if parameter_filter is None or parameter_filter(name)]
        if not selected:
            raise ConfigError("the parameter filter selects no parameter; expected at least one parameter name")
        self.parameter_names: tuple[str, ...] = tuple(selected)
        self._parameters = {name: parameters[name] for name in selected}
        self._shapes = [parameters[name].shape for name in selected]
        self._sizes = [parameters[name].numel() for name in selected]
        self.dim = int(sum(self._sizes))
        first = parameters[selected[0]]
        self.device, self.dtype = first.device, first.dtype
        self.method = FASTEST_METHOD if method == "auto" else method
        self.keep_graph = len(self.batches) <= MAX_KEPT_BATCHES if keep_graph is None else bool(keep_graph)
        self._graphs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None  # (gradients, leaves)
        self._graph_versions: list[int] | None = None
        self._tangent_buffer: torch.Tensor | None = None  # [dim] in the model's dtype, reused by every product
        self.matvecs = 0
        self.matvec_seconds = 0.0  # wall time inside matvec: what --dry-run's seconds per product estimates

    # --- vectors <-> parameter blocks ------------------------------------------------------------------------

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """[dim] → one tensor per selected parameter (its shape, the model's dtype and device).

        Views of ``v`` when it already has the model's dtype and device; otherwise views of a buffer the operator
        keeps (a fresh [dim] tensor per product costs more to fault in than the conversion itself)."""
        if v.dtype != self.dtype or v.device != self.device:
            if self._tangent_buffer is None:
                self._tangent_buffer = torch.empty(self.dim, dtype=self.dtype, device=self.device)
            v = self._tangent_buffer.copy_(v)
        blocks = torch.split(v, self._sizes)
        return [block.reshape(shape) for block, shape in zip(blocks, self._shapes, strict=True)]

    def flatten(self, blocks: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor per selected parameter (None: zeros) → [dim] float64, written into ``out`` (float64 [dim])
        or one new vector (a conversion per block then a concatenation would allocate and touch 12 bytes per
        parameter more)."""
        flat = torch.empty(self.dim, dtype=torch.float64, device=self.device) if out is None else out
        for piece, block in zip(torch.split(flat, self._sizes), blocks, strict=True):
            if block is None:
                piece.zero_()
            else:
                piece.copy_(block.reshape(-1))
        return flat

    # --- the product -----------------------------------------------------------------------------------------

    def matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``Hv`` for ``v`` [dim] (any float dtype; computed in the model's dtype) → [dim] float64, written into
        ``out`` when given (float64 [dim] on the operator's device, not sharing ``v``'s storage)."""
        if v.shape != (self.dim,):
            raise ConfigError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        if out is not None and (out.shape != (self.dim,) or out.dtype != torch.float64 or out.device != self.device):
            raise ConfigError(
                f"out must be a float64 vector of shape ({self.dim},) on {self.device}, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        start = time.perf_counter()
        tangents = self.split(v)
        try:
            with eval_mode(self.model):
                if self.method == "double-backward":
                    blocks = self._double_backward(tangents)
                else:
                    blocks = self._forward_over_reverse(tangents)
        except RuntimeError as exc:
            error = _second_derivative_error(exc)
            if error is not None:
                raise error from exc
            raise
        self.matvecs += 1
        result = self.flatten(blocks, out)
        self.matvec_seconds += time.perf_counter() - start
        return result

    def _batch_loss(self, values: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """(1/N) Σ_{i∈batch} ℓᵢ with the selected parameters set to ``values``: this batch's share of L."""
        return batch_losses(self.model, batch, values).sum() / self.num_examples

    def _versions(self) -> list[int]:
        return [p._version for p in self._parameters.values()]

    def _gradient_graph(self, batch: Batch) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """This batch's share of ∂L/∂w, with its graph (``create_graph``), and the leaves it is a function of."""
        with torch.enable_grad():
            leaves = [self._parameters[name].detach().requires_grad_(True) for name in self.parameter_names]
            loss = self._batch_loss(dict(zip(self.parameter_names, leaves, strict=True)), batch)
            gradients = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return list(gradients), leaves

    def release(self) -> None:
        """Free the kept first-order graphs (they are rebuilt on the next product)."""
        self._graphs = self._graph_versions = None

    def _double_backward(self, tangents: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.keep_graph and (self._graphs is None or self._graph_versions != self._versions()):
            self.release()  # first product, or the weights changed in place since the graphs were built
            self._graphs = [self._gradient_graph(batch) for batch in self.batches]
            self._graph_versions = self._versions()
        total: list[torch.Tensor | None] = [None] * len(tangents)  # a batch's products are ours: summed in place
        for index, batch in enumerate(self.batches):
            gradients, leaves = self._graphs[index] if self.keep_graph else self._gradient_graph(batch)
            # A gradient that does not depend on w (or a parameter the loss does not use) adds nothing.
            pairs = [(g, t) for g, t in zip(gradients, tangents, strict=True) if g is not None and g.requires_grad]
            if not pairs:
                continue
            with torch.enable_grad():
                products = torch.autograd.grad(
                    [g for g, _ in pairs],
                    leaves,
                    grad_outputs=[t for _, t in pairs],
                    retain_graph=self.keep_graph,
                    allow_unused=True,
                )
            for i, product in enumerate(products):
                if product is not None:
                    total[i] = product if total[i] is None else total[i].add_(product)
        return total

    def _forward_over_reverse(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        primals = {name: self._parameters[name].detach() for name in self.parameter_names}
        tangent_map = dict(zip(self.parameter_names, tangents, strict=True))
        total = [torch.zeros_like(t) for t in tangents]
        for batch in self.batches:
            gradient = grad(lambda values, batch=batch: self._batch_loss(values, batch))
            _, product = jvp(gradient, (primals,), (tangent_map,))
            for i, name in enumerate(self.parameter_names):
                total[i] += product[name]
        return total


def name_filter(pattern: str | None) -> Callable[[str], bool] | None:
    """A parameter filter from a regular expression (``re.search`` on the name); None selects everything."""
    import re

    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"parameter pattern {pattern!r} is not a regular expression: {exc}") from exc
    return lambda name: compiled.search(name) is not None


# --- PyHessian cross-check -----------------------------------------------------------------------------------


class _PackedModel(nn.Module):
    """PyHessian calls ``model(inputs)`` with one tensor and reads ``inputs.size(0)``; a Hugging Face classifier
    takes keyword tensors and returns an output object. Inputs are packed as [B, K, T] (K = input_ids,
    attention_mask, token_type_ids, in that order, as present) and unpacked here; the logits are returned."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.model(**{key: packed[:, i] for i, key in enumerate(self.keys)}).logits


def _pack(batch: Batch, model: nn.Module) -> tuple[torch.Tensor, tuple[str, ...]]:
    inputs = model_inputs(batch, model)
    keys = tuple(inputs)
    return torch.stack([inputs[key] for key in keys], dim=1), keys


@contextlib.contextmanager
def _pyhessian_session(
    model: nn.Module, subset: Any, parameter_filter: Callable[[str], bool] | None, seed: int
) -> Iterator[Any]:
    """A ``pyhessian.hessian`` on ``subset`` for the selected parameters; the model is restored on exit.

    PyHessian differentiates every parameter with ``requires_grad`` and runs ``backward(create_graph=True)``,
    which fills ``.grad``: flags are set to the filter for the session, ``.grad`` fields and the train/eval modes
    are put back afterwards, and its draws (global torch RNG) are seeded inside a forked RNG state.
    """
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as exc:  # a cross-check backend, not a dependency of the toolkit
        raise ConfigError("--backend pyhessian needs PyHessian: pip install 'landscape[pyhessian]'") from exc

    check_attention(model)
    batches = _batches_of(subset)
    parameters = model_parameters(model)
    device = next(iter(parameters.values())).device
    # PyHessian fills .grad and needs requires_grad on the block: flags, grads and modes come back on exit.
    with restored(model, values=False, grads=True):
        for name, p in parameters.items():
            p.requires_grad_(parameter_filter is None or parameter_filter(name))
            p.grad = None
        packed = [(_pack(batch, model), batch["labels"]) for batch in batches]
        wrapper = _PackedModel(model, packed[0][0][1])

        def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return per_example_loss_from_logits(logits, labels).mean()

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.filterwarnings(
                "ignore", message="Using backward\\(\\) with create_graph=True"
            )  # .grad reset below
            if len(packed) == 1:
                (inputs, _), labels = packed[0]
                session = PyHessian(wrapper, criterion, data=(inputs, labels), cuda=device.type == "cuda")
            else:
                loader = [(inputs, labels) for (inputs, _), labels in packed]
                session = PyHessian(wrapper, criterion, dataloader=loader, cuda=device.type == "cuda")
            yield session


def pyhessian_eigenvalues(
    model: nn.Module,
    subset: Any,
    top_k: int,
    *,
    parameter_filter: Callable[[str], bool] | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[np.ndarray, torch.Tensor]:
    """PyHessian's ``eigenvalues(maxIter, tol, top_n)``: power iteration with deflation (largest magnitude).

    Its stopping rule is two consecutive estimates within ``tol`` relative, not a residual. Returns the eigenvalues
    [k] and the eigenvectors flattened in :class:`HessianOperator`'s order, [k, dim] float64, for residual checks.
    """
    with _pyhessian_session(model, subset, parameter_filter, seed) as session:
        values, vectors = session.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_k)
        flat = torch.stack([torch.cat([block.detach().reshape(-1) for block in vector]) for vector in vectors])
    return np.asarray(values, dtype=np.float64), flat.to(torch.float64)


def pyhessian_trace(
    model: nn.Module,
    subset: Any,
    samples: int,
    *,
    parameter_filter: Callable[[str], bool] | None = None,
    seed: int = 0,
) -> TraceEstimate:
    """PyHessian's Hutchinson ``trace`` with exactly ``samples`` Rademacher vectors.

    Its own stopping rule ``|mean − previous| / (previous + 1e-6) < tol`` is met at once by a negative running mean
    (docs/pitfalls.md §13); ``tol=-inf`` disables it, so all ``samples`` are drawn.
    """
    with _pyhessian_session(model, subset, parameter_filter, seed) as session:
        values = np.asarray(session.trace(maxIter=samples, tol=-math.inf), dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return TraceEstimate(mean=float(values.mean()), se=se, samples=len(values), values=values, matvecs=len(values))
