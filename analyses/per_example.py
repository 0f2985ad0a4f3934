"""Sums of squared per-example gradients, Σ_i (∂l_i/∂w)², from one forward and one backward of a whole batch.

The empirical Fisher (FSAM Eq. 9) needs each example's gradient squared before the examples are summed. Computing
the gradients one example at a time (a loop, or ``vmap`` over ``grad``) materialises a dense gradient of every
parameter per example: for MiniLM, 22.7 M numbers per example, 11.7 M of them word-embedding rows that are zero
except for the few tokens the example holds. This module gets the same sums from the layers' own inputs and output
gradients instead, as the per-example gradient literature does (Goodfellow 2015, "Efficient per-example gradient
computations"): a forward hook keeps each layer's input x and output y; one backward of Σ_i l_i gives δ = ∂(Σ l)/∂y;
and since examples do not interact in an eval-mode transformer, the rows of δ belonging to example i are
∂l_i/∂y_i. Then, per example i (positions s of its sequence, every call of the layer included):

* ``nn.Linear`` (y = x Wᵀ + b): ∂l_i/∂W = Σ_s δ_is x_isᵀ (an [out, in] matrix per example, in chunks of examples),
  ∂l_i/∂b = Σ_s δ_is; transformers' ``Conv1D`` (GPT-2, y = x W + b) is the transpose;
* ``nn.Embedding`` (y = E[t]): ∂l_i/∂E[v] = Σ_{s: t_is = v} δ_is, rows only for the tokens example i holds (a scatter
  over the unique (example, token) pairs), the padding row excluded as its gradient is zero;
* ``nn.LayerNorm`` (y = x̂ ⊙ γ + β): ∂l_i/∂γ = Σ_s δ_is ⊙ x̂_is, ∂l_i/∂β = Σ_s δ_is, with x̂ recomputed from x.

A parameter is taken this way only when the first batch proves it exact: Σ_i of its per-example gradients must equal
its batch gradient from autograd (relative error ≤ ``CHECK_TOLERANCE``); one the loss does not depend on (in the first
batch, hence in every batch) has a zero Fisher. A parameter also used outside its module's
forward (a weight read directly, as DeBERTa reads its relative embeddings) fails the check and is left to the caller's
general path (:data:`LayerGradients.uncovered`), as is every parameter of a layer of another type
(docs/pitfalls.md §34).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHECK_TOLERANCE = 1e-3  # relative; float32 sums of a batch differ from autograd's by ~1e-6, a misattribution by O(1)
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
    on the first batch also joins the general path; it is not foreseen here. MiniLM: 384 × 1536 float32 = 2.4 MB per
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
    is the per-example loss. The first call of :meth:`add` decides which parameters are covered and checks them;
    :attr:`uncovered` then names the rest, for the caller to compute another way. Memory: the activations of one
    batch, as an ordinary backward keeps, plus one [chunk, out, in] block of per-example weight gradients.
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
        self._floor = 0.0

    @property
    def covered(self) -> list[str]:
        return [name for name in self.selected if name not in self.uncovered]

    def add(self, batch: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
        """``sums[name] += Σ_i (∂l_i/∂w_name)²`` over the examples of ``batch``, for the covered parameters."""
        if not self.layers:  # no layer of a known type: everything is the general path's
            self.uncovered = list(self.selected)
            self.checked = True
            return
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {module: [] for module in self.layers}

        def keep(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad and inputs:
                calls[module].append((inputs[0].detach(), output))

        batch_size = batch["labels"].shape[0]

        def per_example_input(module: nn.Module, inputs: tuple) -> tuple | None:
            # BERT looks its position embeddings up with position_ids [1, T], broadcast over the batch afterwards:
            # looked up per example instead (the same values), so that the output's gradient is per example too.
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim >= 1 and inputs[0].shape[0] == 1:
                return (inputs[0].expand(batch_size, *inputs[0].shape[1:]), *inputs[1:])
            return None

        handles = [module.register_forward_hook(keep) for module in self.layers]
        handles += [
            module.register_forward_pre_hook(per_example_input)
            for module, (kind, _) in self.layers.items()
            if kind == "embedding" and batch_size > 1
        ]
        try:
            with torch.enable_grad():
                logits = self.logits_of(self.model, batch)
                total = self.nll(logits, batch["labels"]).sum()
        finally:
            for handle in handles:
                handle.remove()
        used = [(module, index) for module, seen in calls.items() for index in range(len(seen))]
        outputs = [calls[module][index][1] for module, index in used]
        check = [] if self.checked else list(self.selected.values())
        if not outputs and not check:  # no known layer on the loss's path in this batch: nothing to add
            return
        grads = torch.autograd.grad(total, [*outputs, *check], allow_unused=True)
        deltas: dict[nn.Module, list[torch.Tensor | None]] = {module: [] for module in calls}
        for (module, _), delta in zip(used, grads[: len(outputs)], strict=True):
            deltas[module].append(delta)
        # Layer by layer, each parameter's squares of the batch are summed apart and then added to ``sums`` once:
        # on the first batch they wait for that layer's check, every batch adds in the same order (so a Fisher
        # resumed from its running sums, whose first batch is then another, is bitwise the uninterrupted one), and
        # no more than one layer's temporaries are alive at a time.
        batch_grads = None if self.checked else dict(zip(self.selected, grads[len(outputs) :], strict=True))
        if batch_grads is not None:
            # The floor: a gradient that is zero in exact arithmetic (BERT's attention key biases: softmax ignores
            # a shift shared by all keys) is rounding noise on both sides; compared at the whole gradient's scale.
            self._floor = 1e-5 * max((float(g.abs().max()) for g in batch_grads.values() if g is not None), default=0.0)
        seen: set[str] = set()
        for module, (kind, own) in self.layers.items():
            pairs = [(x, d) for (x, _), d in zip(calls.pop(module), deltas.pop(module), strict=True) if d is not None]
            own = {role: name for role, name in own.items() if name not in self.uncovered}
            if not pairs or not own:
                continue
            if any(x.shape[0] != batch_size or d.shape[0] != batch_size for x, d in pairs):
                # a call not batched by example (an input shared by the batch): not per example, leave it
                self.uncovered.extend(own.values())
                continue
            into: dict[str, torch.Tensor] = {}
            totals: dict[str, torch.Tensor] | None = None if batch_grads is None else {}
            self._layer(module, kind, own, pairs, batch_size, into, totals)
            if totals is not None:
                self._decide({name: batch_grads[name] for name in own.values()}, totals)
                seen.update(own.values())
            for name, square in into.items():
                if name not in self.uncovered:
                    sums[name].add_(square.to(sums[name].dtype))
        if batch_grads is not None:  # the parameters no layer of a known type computed
            self._decide({name: g for name, g in batch_grads.items() if name not in seen}, {})
            self.checked = True

    def _decide(self, batch_grads: dict[str, torch.Tensor | None], grad_sums: dict[str, torch.Tensor]) -> None:
        """Keep a parameter only where Σ_i g_i equals autograd's batch gradient (the first batch's proof)."""
        for name, reference in batch_grads.items():
            found = grad_sums.get(name)
            if reference is None:
                # No path from the loss to it: every per-example gradient is zero, and so is its Fisher. Which
                # parameters the loss depends on is the model's structure, the same in every batch.
                if found is not None and float(found.abs().max()) > 0:
                    self.uncovered.append(name)
                continue
            if found is None:
                if name not in self.uncovered:
                    self.uncovered.append(name)
                continue
            scale = max(float(reference.abs().max()), self._floor) or 1.0
            if float((found - reference).abs().max()) > CHECK_TOLERANCE * scale:
                self.uncovered.append(name)

    def _layer(
        self,
        module: nn.Module,
        kind: str,
        own: dict[str, str],
        pairs: list,
        batch_size: int,
        into: dict[str, torch.Tensor],
        totals: dict[str, torch.Tensor] | None,
    ) -> None:
        """``into[name] += Σ_i g_i²`` for one layer's parameters ``own`` (role -> name), every call of the layer
        included; with ``totals`` (the check), also ``totals[name] = Σ_i g_i``."""

        def square_of(name: str, like: torch.Tensor) -> torch.Tensor:
            if name not in into:
                into[name] = torch.zeros(self.selected[name].shape, dtype=like.dtype, device=like.device)
            return into[name]

        if kind == "embedding":
            if "weight" in own:
                self._embedding(module, pairs, batch_size, square_of(own["weight"], pairs[0][1]), own["weight"], totals)
            return
        flat = []  # (x [B, S, in], δ [B, S, out]) per call, positions flattened
        for x, delta in pairs:
            x = x.to(delta.dtype)
            if kind == "layernorm":
                x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
                features = math.prod(module.normalized_shape)
                flat.append((x.reshape(batch_size, -1, features), delta.reshape(batch_size, -1, features)))
            else:
                flat.append((x.reshape(batch_size, -1, x.shape[-1]), delta.reshape(batch_size, -1, delta.shape[-1])))
        x = torch.cat([x for x, _ in flat], dim=1) if len(flat) > 1 else flat[0][0]
        delta = torch.cat([d for _, d in flat], dim=1) if len(flat) > 1 else flat[0][1]
        if "bias" in own:
            per_example = delta.sum(dim=1)  # [B, out]
            square_of(own["bias"], delta).add_(per_example.square().sum(0).to(into[own["bias"]].dtype))
            if totals is not None:
                totals[own["bias"]] = per_example.sum(0)
        if "weight" not in own:
            return
        name = own["weight"]
        shape = self.selected[name].shape
        square = square_of(name, delta)
        if kind == "layernorm":
            per_example = (delta * x).sum(dim=1)  # [B, D]
            square.add_(per_example.square().sum(0).reshape(shape).to(square.dtype))
            if totals is not None:
                totals[name] = per_example.sum(0).reshape(shape)
            return
        buffer = self._buffer((min(self.chunk_size, batch_size), *shape), delta)
        for start in range(0, batch_size, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, batch_size))
            per_example = buffer[: rows.stop - rows.start]
            if kind == "linear":  # [chunk, out, in]
                torch.bmm(delta[rows].transpose(1, 2), x[rows], out=per_example)
            else:  # conv1d: [chunk, in, out]
                torch.bmm(x[rows].transpose(1, 2), delta[rows], out=per_example)
            square.add_(per_example.square_().sum(0).to(square.dtype))
        if totals is not None:
            total = delta.flatten(0, 1).T @ x.flatten(0, 1)  # Σ_i g_i: the batch gradient
            totals[name] = total if kind == "linear" else total.T

    def _buffer(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused block for per-example weight gradients: allocating a fresh [chunk, out, in] per layer and batch
        costs more than the product written into it (3x on the CPU)."""
        key = (shape, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def _embedding(
        self,
        module: nn.Embedding,
        pairs: list,
        batch_size: int,
        square: torch.Tensor,
        name: str,
        totals: dict[str, torch.Tensor] | None,
    ) -> None:
        """``square += Σ_i g_i²`` of an embedding table: per example, one row per distinct token it holds (a scatter
        into the rows of those tokens only, never a dense table per example)."""
        width = module.weight.shape[1]
        tokens = torch.cat([t.reshape(batch_size, -1) for t, _ in pairs], dim=1)  # [B, S]
        delta = torch.cat([d.reshape(batch_size, -1, width) for _, d in pairs], dim=1)  # [B, S, H]
        example = torch.arange(batch_size, device=tokens.device).unsqueeze(1).expand_as(tokens)
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if module.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            keep = tokens != module.padding_idx
        vocabulary = module.weight.shape[0]
        unique, inverse = torch.unique((example * vocabulary + tokens)[keep], return_inverse=True)
        rows = torch.zeros(len(unique), width, dtype=delta.dtype, device=delta.device)
        rows.index_add_(0, inverse, delta[keep])  # [distinct (example, token) pairs, H]: each example's own rows
        token_of_row = unique % vocabulary
        square.index_add_(0, token_of_row, rows.square().to(square.dtype))
        if totals is not None:
            totals[name] = torch.zeros_like(module.weight, dtype=delta.dtype).index_add_(0, token_of_row, rows)
