"""The one restore context: change a model temporarily, get it back exactly, also when an exception is raised.

Every place that moves weights or flips flags for a while (surfaces' grid cells, loading other weights, the
Hessian's PyHessian session, the Fisher's gradient switch, evaluation in eval mode) goes through :func:`restored`,
so what comes back is decided once: parameter values bitwise (copied from a snapshot, never by subtracting a
perturbation), ``requires_grad`` flags, every submodule's own train/eval flag, and, on request, the ``.grad`` fields
(docs/pitfalls.md §5). The optimizers restore their own perturbation (they depend on torch alone).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from landscape.core.params import check_same_keys_and_shapes, model_parameters


@contextmanager
def restored(model: nn.Module, *, values: bool = True, grads: bool = False) -> Iterator[nn.Module]:
    """Yield ``model``; on exit put back its flags and modes, its values (``values``) and ``.grad`` (``grads``).

    ``values=False`` skips the weight snapshot (one copy of the weights) where the block does not write weights.
    """
    params = model_parameters(model)
    snapshot = {name: p.detach().clone() for name, p in params.items()} if values else None
    saved_grads = {name: p.grad for name, p in params.items()} if grads else None
    flags = {name: p.requires_grad for name, p in params.items()}
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        if snapshot is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(snapshot[name])
        for name, p in params.items():
            p.requires_grad_(flags[name])
            if saved_grads is not None:
                p.grad = saved_grads[name]
        # Set each module's flag directly: ``module.train(mode)`` would recurse and overwrite its children's modes.
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each submodule's own ``training`` flag afterwards."""
    with restored(model, values=False):
        model.eval()
        yield model


@contextmanager
def loaded_parameters(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily copy ``params`` into ``model``'s parameters; yield the model; restore it (:func:`restored`).

    ``params`` must have exactly the model's parameter names and shapes; a tied tensor appears once and so is
    written once. ``.grad`` is not managed. Costs one copy of the weights.
    """
    current = model_parameters(model)
    check_same_keys_and_shapes(current, params, "the model's parameters and the loaded ones")
    with restored(model):
        with torch.no_grad():
            for name, p in current.items():
                p.copy_(params[name])
        yield model
