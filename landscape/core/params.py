"""Parameter-space math on ``dict[str, Tensor]``, the toolkit's representation of a point θ or a direction d.

Keys are ``named_parameters()`` names (tied weights once, see :func:`landscape.models.weights.model_parameters`).
Every function is pure: inputs are never modified, results are new tensors. Linear combinations are evaluated in
float64 and rounded once to the output dtype, so a grid point ``θ + a·d1 + b·d2`` of a loss surface (Li et al. 2018,
"Visualizing the Loss Landscape of Neural Nets") is the correctly rounded value however far it lies from θ; walking
the grid with in-place ``add_`` would instead accumulate one rounding error per step (docs/pitfalls.md §9).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from landscape.core.errors import CheckpointError

Params = dict[str, torch.Tensor]


def model_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters keyed by name, tied weights once (``named_parameters`` de-duplicates)."""
    return {name: param for name, param in model.named_parameters()}


def key_shape_differences(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``found`` from fitting ``expected``: ``["2 missing (e.g. a)", "1 unexpected (e.g. b)",
    "1 of other shape (e.g. c (3, 5) vs (3, 4))"]`` (found's shape first), empty when the two match."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{name} {tuple(found[name].shape)} vs {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(found))
        if found[name].shape != expected[name].shape
    ]
    return [
        f"{len(names)} {kind} (e.g. {names[0]})"
        for names, kind in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of other shape"))
        if names
    ]


def check_same_keys_and_shapes(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], what: str
) -> None:
    """The one key and shape check: raise :class:`CheckpointError` ``"<what>: <differences>; expected the same
    architecture and head"`` when ``found`` does not have exactly ``expected``'s names and shapes."""
    problems = key_shape_differences(expected, found)
    if problems:
        raise CheckpointError(f"{what}: {', '.join(problems)}; expected the same architecture and head")


def combine(theta: Mapping[str, torch.Tensor], terms: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> Params:
    """``θ + Σ_k c_k·d_k`` for ``terms = [(c_1, d_1), (c_2, d_2), ...]``, each tensor in θ's dtype and device.

    Computed from θ every time, in float64, and rounded once: for a surface grid point use
    ``combine(θ, [(a, d1), (b, d2)])``, never a running sum. Shapes: each ``d_k[name]`` has ``θ[name]``'s shape.
    """
    for k, (_, direction) in enumerate(terms):
        check_same_keys_and_shapes(theta, direction, f"θ and direction {k}")
    out: Params = {}
    for name, t in theta.items():
        acc = t.detach().to(torch.float64)
        for coefficient, direction in terms:
            c = float(coefficient)
            if c != 0.0:  # skipping exact zeros keeps θ bitwise at the origin, even if a direction has inf/NaN
                acc = acc + c * direction[name].detach().to(device=t.device, dtype=torch.float64)
        out[name] = acc.to(t.dtype)
    return out


def add(theta: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], scale: float) -> Params:
    """``θ + scale·d`` (float64, rounded once to θ's dtype); see :func:`combine`."""
    return combine(theta, [(scale, direction)])


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    """``a − b`` tensor by tensor, in the promoted dtype of each pair (one IEEE operation: correctly rounded)."""
    check_same_keys_and_shapes(a, b, "the operands of sub")
    return {name: a[name].detach() - b[name].detach().to(a[name].device) for name in a}


def scale(a: Mapping[str, torch.Tensor], s: float) -> Params:
    """``s·a`` in ``a``'s dtypes."""
    return {name: t.detach() * float(s) for name, t in a.items()}


def zeros_like(a: Mapping[str, torch.Tensor]) -> Params:
    """Zeros with ``a``'s names, shapes, dtypes and devices."""
    return {name: torch.zeros_like(t) for name, t in a.items()}


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``⟨a, b⟩`` over all parameters, accumulated in float64 in sorted-name order (deterministic)."""
    check_same_keys_and_shapes(a, b, "the operands of dot")
    total = 0.0
    for name in sorted(a):
        x = a[name].detach().reshape(-1).to(torch.float64)
        y = b[name].detach().reshape(-1).to(device=x.device, dtype=torch.float64)
        total += float(torch.dot(x, y))
    return total


def norm(a: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm ``‖a‖`` over all parameters (float64)."""
    return math.sqrt(dot(a, a))


def content_hash(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over sorted names, dtypes, shapes and raw bytes: identifies a checkpoint's content.

    Two dicts hash equal exactly when they hold bitwise equal tensors under the same names (``-0.0`` and ``0.0``
    differ, as do NaN payloads); where the tensors live (CPU or GPU) does not matter.
    """
    digest = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu").contiguous().reshape(-1)
        # Every field is length-prefixed so that no two different dicts serialise to the same byte stream.
        header = f"{name}\0{t.dtype}\0{tuple(params[name].shape)}\0{t.numel() * t.element_size()}\0".encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
