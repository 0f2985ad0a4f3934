"""Sums of squared per-example gradients, Σ_i (∂l_i/∂w)², from one forward and one backward of a whole batch.

The empirical Fisher (FSAM Eq. 9) needs each example's gradient squared before the examples are summed. Computing
the gradients one example at a time (a loop, or ``vmap`` over ``grad``) materialises a dense gradient of every
parameter per example: for MiniLM, 22.7 M numbers per example, 11.7 M of them word-embedding rows that are zero
except for the few tokens the example holds. This module gets the same sums from the layers' own inputs and output
gradients instead, as the per-example gradient literature does (Goodfellow 2015, "Efficient per-example gradient
computations"): a forward hook keeps each layer's input x and output y; one backward of Σ_i l_i gives δ = ∂(Σ l)/∂y;
and since examples do not interact in an eval-mode transformer, the rows of δ belonging to example i are
∂l_i/∂y_i. Then, per example i (positions s of its sequence, every call of the layer included):

* ``nn.Linear`` (y = x Wᵀ + b): ∂l_i/∂W = Σ_s δ_is x_isᵀ (an [out, in] matrix per example, over the positions
  between the first and the last whose δ is not exactly zero), ∂l_i/∂b = Σ_s δ_is; transformers' ``Conv1D`` (GPT-2,
  y = x W + b) is the transpose;
* ``nn.Embedding`` (y = E[t]): ∂l_i/∂E[v] = Σ_{s: t_is = v} δ_is, rows only for the tokens example i holds (a scatter
  over the unique (example, token) pairs), the padding row excluded as its gradient is zero;
* ``nn.LayerNorm`` (y = x̂ ⊙ γ + β): ∂l_i/∂γ = Σ_s δ_is ⊙ x̂_is, ∂l_i/∂β = Σ_s δ_is, with x̂ recomputed from x.

A parameter is taken this way only when it is proven exact, once, on the first ``CHECK_EXAMPLES`` examples: Σ_i of
its per-example gradients must equal its gradient from autograd (relative error ≤ ``CHECK_TOLERANCE``); one the
loss does not depend on (there, hence anywhere: it is the graph's structure) has a zero Fisher. A parameter also
used outside its module's forward (a weight read directly, as DeBERTa reads its relative embeddings) fails the check
and is left to the caller's general path (:data:`LayerGradients.uncovered`), as is every parameter of a layer of
another type (docs/pitfalls.md §34).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHECK_TOLERANCE = 1e-3  # relative; float32 sums of a batch differ from autograd's by ~1e-6, a misattribution by O(1)
#: examples of the first batch the check runs on: two, so that an input the batch shares ([1, ...]) shows as one
CHECK_EXAMPLES = 2
#: the largest automatic chunk (the Fisher benchmark's setting): a larger block costs memory linearly, and the
#: batched products are already large at 32 examples (benchmarks/optimizer_overhead.py --fisher-chunk compares)
MAX_AUTO_CHUNK = 32
#: the share of the free memory the per-example block may take: the rest is the batch's activations and the model's
AUTO_CHUNK_MEMORY_SHARE = 0.125


def auto_chunk_size(model: nn.Module, parameters: Mapping[str, torch.Tensor], free_bytes: int | None) -> int:
    """How many examples' gradients to hold at once, so that one chunk's per-example gradients fit in
    ``AUTO_CHUNK_MEMORY_SHARE`` of ``free_bytes``; between 1 and ``MAX_AUTO_CHUNK`` (that when the free memory is
    unknown). Per example, the larger of: the layer path's [*shape] block of its largest dense weight (embedding tables
    are scattered by row, never held densely), and the general path's gradients of every selected parameter owned by
    a module of no known kind (held together for a chunk by ``vmap``). A parameter that fails the layer path's check
    also joins the general path; it is not foreseen here. MiniLM: 384 × 1536 float32 = 2.4 MB per
    example, so 32 once 600 MB are free.
    """
    selected = {id(p) for p in parameters.values()}
    layer_block, general = 0, 0
    for module in model.modules():
        kind = _kind(module)
        for p in module.parameters(recurse=False):
            if id(p) not in selected:
                continue
            size = p.numel() * p.element_size()
            if kind is None:
                general += size
            elif kind != "embedding":
                layer_block = max(layer_block, size)
    per_example = max(layer_block, general)
    if free_bytes is None or per_example == 0:
        return MAX_AUTO_CHUNK
    return max(1, min(MAX_AUTO_CHUNK, int(AUTO_CHUNK_MEMORY_SHARE * free_bytes) // per_example))


def uses_blocks(device: torch.device) -> bool:
    """Whether the layer path squares blocks of ``chunk_size`` examples' weight gradients (accelerators) rather than
    one example's at a time. On the CPU one [out, in] product stays in cache while it is squared into the sums: for
    one 1536 × 384 layer and 32 examples of 5–23 positions, 12 ms one example at a time against 35 ms in blocks of
    8 (spans cut alike) and 86 ms in one block of the padded batch (one thread, medians of 5, measured here)."""
    return device.type != "cpu"


def _kind(module: nn.Module) -> str | None:
    """The layer type whose per-example gradients this module knows, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.ndim == 2:
        return "conv1d"  # transformers.pytorch_utils.Conv1D, weight [in, out]; matched by name (no import here)
    return None


class LayerGradients:
    """Adds Σ_i g_i² of the selected parameters for one batch at a time (see the module's docstring).

    ``selected`` maps names to parameters of ``model`` (each with ``requires_grad``). ``nll(logits, labels) -> [B]``
    is the per-example loss. The first call of :meth:`add` decides which parameters are covered: it proves them on
    the first ``CHECK_EXAMPLES`` examples of its batch (a forward and backward of its own, the only one that asks
    autograd for the parameters' gradients); :attr:`uncovered` then names the rest, for the caller to compute another
    way. Memory: the activations and output gradients of one batch, as an ordinary backward keeps, plus one block of
    per-example weight gradients of one layer: [``chunk_size``, out, in] on an accelerator, one example's [out, in]
    on the CPU (:func:`uses_blocks`). The squares go straight into ``sums``, in the same order in every
    batch, so a Fisher resumed from its running sums is bitwise the uninterrupted one.
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Mapping[str, nn.Parameter],
        nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        logits_of: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
        *,
        chunk_size: int = 16,
    ) -> None:
        self.model, self.nll, self.logits_of, self.chunk_size = model, nll, logits_of, chunk_size
        by_id = {id(p): name for name, p in selected.items()}
        self.selected = dict(selected)
        # module -> (kind, {"weight": name, "bias": name} of its selected parameters)
        self.layers: dict[nn.Module, tuple[str, dict[str, str]]] = {}
        for module in model.modules():
            kind = _kind(module)
            if kind is None:
                continue
            own = {role: by_id[id(p)] for role, p in module.named_parameters(recurse=False) if id(p) in by_id}
            if own:
                self.layers[module] = (kind, own)
        self.checked = False
        self.uncovered: list[str] = []
        self._buffers: dict[tuple, torch.Tensor] = {}

    @property
    def covered(self) -> list[str]:
        return [name for name in self.selected if name not in self.uncovered]

    def add(self, batch: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
        """``sums[name] += Σ_i (∂l_i/∂w_name)²`` over the examples of ``batch``, for the covered parameters."""
        if not self.checked:
            self._check(batch)
        if not self.layers or len(self.uncovered) == len(self.selected):
            return
        batch_size = batch["labels"].shape[0]
        wanted = [module for module, (_, own) in self.layers.items() if set(own.values()) - set(self.uncovered)]
        pairs_of, total = self._forward(batch, batch_size, wanted)
        used = [(module, pair) for module, pairs in pairs_of.items() for pair in pairs]
        if not used:  # no known layer on the loss's path in this batch: nothing to add
            return
        deltas = torch.autograd.grad(total, [output for _, (_, output) in used], allow_unused=True)
        del total
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {module: [] for module in pairs_of}
        for (module, (x, _)), delta in zip(used, deltas, strict=True):
            if delta is not None:
                calls[module].append((x, delta))
        del used, deltas, pairs_of
        for module, (kind, own) in self.layers.items():
            pairs = calls.pop(module, [])  # dropped layer by layer: its inputs and output gradients are freed
            own = {role: name for role, name in own.items() if name not in self.uncovered}
            if not pairs or not own:
                continue
            if any(x.shape[0] != batch_size or d.shape[0] != batch_size for x, d in pairs):
                # a call not batched by example (an input shared by the batch): not per example, leave it
                self.uncovered.extend(own.values())
                continue
            self._squares(module, kind, own, pairs, batch_size, sums)

    # --------------------------------------------------------------------------------------------------------------

    def _forward(
        self, batch: dict[str, torch.Tensor], batch_size: int, modules: list[nn.Module] | None = None
    ) -> tuple[dict, torch.Tensor]:
        """The summed loss of ``batch`` and, per layer of ``modules`` (default: every known one), (input, output) of
        each of its calls."""
        modules = list(self.layers) if modules is None else modules
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {module: [] for module in modules}

        def keep(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad and inputs:
                calls[module].append((inputs[0].detach(), output))

        def per_example_input(module: nn.Module, inputs: tuple) -> tuple | None:
            # BERT looks its position embeddings up with position_ids [1, T], broadcast over the batch afterwards:
            # looked up per example instead (the same values), so that the output's gradient is per example too.
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim >= 1 and inputs[0].shape[0] == 1:
                return (inputs[0].expand(batch_size, *inputs[0].shape[1:]), *inputs[1:])
            return None

        handles = [module.register_forward_hook(keep) for module in modules]
        handles += [
            module.register_forward_pre_hook(per_example_input)
            for module in modules
            if self.layers[module][0] == "embedding" and batch_size > 1
        ]
        try:
            with torch.enable_grad():
                logits = self.logits_of(self.model, batch)
                total = self.nll(logits, batch["labels"]).sum()
        finally:
            for handle in handles:
                handle.remove()
        return calls, total

    def _check(self, batch: dict[str, torch.Tensor]) -> None:
        """Decide :attr:`uncovered`: keep a parameter only where Σ_i g_i equals autograd's batch gradient on the
        first ``CHECK_EXAMPLES`` examples of ``batch``. Which parameters a layer's forward alone reaches is the
        model's structure, the same for any examples; a few keep the check's full gradient small beside the Fisher's
        sums (it is the size of the model)."""
        self.checked = True
        if not self.layers:  # no layer of a known type: everything is the general path's
            self.uncovered = list(self.selected)
            return
        size = batch["labels"].shape[0]
        rows = min(size, CHECK_EXAMPLES)
        few = {key: value[:rows] if value.ndim and value.shape[0] == size else value for key, value in batch.items()}
        pairs_of, total = self._forward(few, rows)
        used = [(module, pair) for module, pairs in pairs_of.items() for pair in pairs]
        grads = torch.autograd.grad(
            total, [output for _, (_, output) in used] + list(self.selected.values()), allow_unused=True
        )
        batch_grads = dict(zip(self.selected, grads[len(used) :], strict=True))
        # The floor: a gradient that is zero in exact arithmetic (BERT's attention key biases: softmax ignores a
        # shift shared by all keys) is rounding noise on both sides; compared at the whole gradient's scale.
        floor = 1e-5 * max((_largest_magnitude(g) for g in batch_grads.values() if g is not None), default=0.0)
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {module: [] for module in pairs_of}
        for (module, (x, _)), delta in zip(used, grads[: len(used)], strict=True):
            if delta is not None:
                calls[module].append((x, delta))
        seen: set[str] = set()
        for module, (kind, own) in self.layers.items():
            pairs = calls[module]
            if not pairs:
                continue
            seen.update(own.values())
            if any(x.shape[0] != rows or d.shape[0] != rows for x, d in pairs):
                self.uncovered.extend(own.values())
                continue
            totals = self._totals(module, kind, own, pairs, rows)
            self._decide({name: batch_grads[name] for name in own.values()}, totals, floor)
        # the parameters no layer of a known type computed: proven only when the loss does not depend on them
        self._decide({name: g for name, g in batch_grads.items() if name not in seen}, {}, floor)

    def _decide(
        self, batch_grads: dict[str, torch.Tensor | None], grad_sums: dict[str, torch.Tensor], floor: float
    ) -> None:
        """Keep a parameter only where Σ_i g_i equals autograd's gradient (the check's proof)."""
        for name, reference in batch_grads.items():
            found = grad_sums.get(name)
            if reference is None:
                # No path from the loss to it: every per-example gradient is zero, and so is its Fisher. Which
                # parameters the loss depends on is the model's structure, the same in every batch.
                if found is not None and _largest_magnitude(found) > 0:
                    self.uncovered.append(name)
                continue
            if found is None:
                if name not in self.uncovered:
                    self.uncovered.append(name)
                continue
            scale = max(_largest_magnitude(reference), floor) or 1.0
            if _largest_magnitude(found.sub_(reference)) > CHECK_TOLERANCE * scale:  # found is the check's own
                self.uncovered.append(name)

    @staticmethod
    def _flat(module: nn.Module, kind: str, pairs: list, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, S, in], δ [B, S, out]) of a Linear, Conv1D or LayerNorm, every call's positions side by side; a
        LayerNorm's x is its normalised input x̂."""
        flat = []
        for x, delta in pairs:
            x = x.to(delta.dtype)
            if kind == "layernorm":
                x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
                features = math.prod(module.normalized_shape)
                flat.append((x.reshape(batch_size, -1, features), delta.reshape(batch_size, -1, features)))
            else:
                flat.append((x.reshape(batch_size, -1, x.shape[-1]), delta.reshape(batch_size, -1, delta.shape[-1])))
        if len(flat) == 1:
            return flat[0]
        return torch.cat([x for x, _ in flat], dim=1), torch.cat([d for _, d in flat], dim=1)

    def _totals(
        self, module: nn.Module, kind: str, own: dict[str, str], pairs: list, batch_size: int
    ) -> dict[str, torch.Tensor]:
        """Σ_i g_i of one layer's parameters ``own`` (role -> name), as the per-example formulas give it."""
        if kind == "embedding":
            if "weight" not in own:
                return {}
            tokens, delta = _embedding_rows(module, pairs, batch_size)
            keep = _unpadded(module, tokens)
            return {own["weight"]: torch.zeros_like(module.weight, dtype=delta.dtype).index_add_(
                0, tokens[keep], delta[keep])}  # fmt: skip
        x, delta = self._flat(module, kind, pairs, batch_size)
        totals = {}
        if "bias" in own:
            totals[own["bias"]] = delta.sum(dim=(0, 1))
        if "weight" in own:
            shape = self.selected[own["weight"]].shape
            if kind == "layernorm":
                totals[own["weight"]] = (delta * x).sum(dim=(0, 1)).reshape(shape)
            else:
                total = delta.flatten(0, 1).T @ x.flatten(0, 1)  # [out, in]
                totals[own["weight"]] = total if kind == "linear" else total.T
        return totals

    def _squares(
        self,
        module: nn.Module,
        kind: str,
        own: dict[str, str],
        pairs: list,
        batch_size: int,
        sums: dict[str, torch.Tensor],
    ) -> None:
        """``sums[name] += Σ_i g_i²`` for one layer's parameters ``own`` (role -> name), every call included."""
        if kind == "embedding":
            if "weight" in own:
                _embedding_squares(module, pairs, batch_size, sums[own["weight"]])
            return
        x, delta = self._flat(module, kind, pairs, batch_size)
        if "bias" in own:
            sums[own["bias"]].add_(delta.sum(dim=1).square().sum(0))
        if "weight" not in own:
            return
        square = sums[own["weight"]]
        if kind == "layernorm":
            square.add_((delta * x).sum(dim=1).square().sum(0).reshape(square.shape))
            return
        # Only the positions whose output gradient is not exactly zero contribute to Σ_s δ_is x_isᵀ: padding, and in
        # the last layer every position but the one the head reads. Each example is cut to the span between its
        # first and last such position (exact: what is cut adds zeros), about half of a padded batch's positions.
        active = delta.ne(0).any(dim=-1)  # [B, S]
        positions = torch.arange(active.shape[1], device=active.device)
        first = torch.where(active, positions, active.shape[1]).amin(dim=1)
        stop = torch.where(active, positions + 1, 0).amax(dim=1)
        spans = [(int(a), int(b)) for a, b in zip(first.tolist(), stop.tolist(), strict=True) if b > a]
        examples = [i for i, (a, b) in enumerate(zip(first.tolist(), stop.tolist(), strict=True)) if b > a]
        if not examples:
            return
        if not uses_blocks(delta.device) or self.chunk_size == 1:
            product = self._buffer(tuple(square.shape), delta)
            for i, (a, b) in zip(examples, spans, strict=True):
                if kind == "linear":  # [out, in]
                    torch.mm(delta[i, a:b].T, x[i, a:b], out=product)
                else:  # conv1d: [in, out]
                    torch.mm(x[i, a:b].T, delta[i, a:b], out=product)
                square.addcmul_(product, product)
            return
        # An accelerator: blocks of examples of similar spans, so that a block's common span wastes little.
        order = sorted(range(len(examples)), key=lambda j: spans[j][1] - spans[j][0])
        block = self._buffer((min(self.chunk_size, len(examples)), *square.shape), delta)
        for start in range(0, len(order), self.chunk_size):
            chosen = order[start : start + self.chunk_size]
            a = min(spans[j][0] for j in chosen)
            b = max(spans[j][1] for j in chosen)
            rows = torch.tensor([examples[j] for j in chosen], device=delta.device)
            per_example = block[: len(chosen)]
            if kind == "linear":  # [chunk, out, in]
                torch.bmm(delta[rows, a:b].transpose(1, 2), x[rows, a:b], out=per_example)
            else:  # conv1d: [chunk, in, out]
                torch.bmm(x[rows, a:b].transpose(1, 2), delta[rows, a:b], out=per_example)
            square.add_(per_example.square_().sum(0))

    def _buffer(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused block for per-example weight gradients: allocating a fresh one per layer and batch costs more
        than the product written into it (3x on the CPU)."""
        key = (shape, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |tensor| without an |tensor| copy (the check compares model-sized gradients)."""
    return float(torch.linalg.vector_norm(tensor, ord=math.inf)) if tensor.numel() else 0.0


def _embedding_rows(module: nn.Embedding, pairs: list, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B, S], output gradients [B, S, H]) of every call of an embedding table, side by side."""
    width = module.weight.shape[1]
    tokens = torch.cat([t.reshape(batch_size, -1) for t, _ in pairs], dim=1)
    delta = torch.cat([d.reshape(batch_size, -1, width) for _, d in pairs], dim=1)
    return tokens, delta


def _unpadded(module: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """Where ``tokens`` are not the padding row, which nn.Embedding gives no gradient."""
    if module.padding_idx is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    return tokens != module.padding_idx


def _embedding_squares(module: nn.Embedding, pairs: list, batch_size: int, square: torch.Tensor) -> None:
    """``square += Σ_i g_i²`` of an embedding table: per example, one row per distinct token it holds (a scatter
    into the rows of those tokens only, never a dense table per example)."""
    tokens, delta = _embedding_rows(module, pairs, batch_size)
    example = torch.arange(batch_size, device=tokens.device).unsqueeze(1).expand_as(tokens)
    keep = _unpadded(module, tokens)
    vocabulary = module.weight.shape[0]
    unique, inverse = torch.unique((example * vocabulary + tokens)[keep], return_inverse=True)
    rows = torch.zeros(len(unique), delta.shape[-1], dtype=delta.dtype, device=delta.device)
    rows.index_add_(0, inverse, delta[keep])  # [distinct (example, token) pairs, H]: each example's own rows
    square.index_add_(0, unique % vocabulary, rows.square().to(square.dtype))
