"""The sharpness-aware core: one optimizer that runs a variant's pieces (:mod:`optimizers.pieces`).

One step, for a batch B whose per-example losses the closure returns (``closure(indices=None) -> Tensor[B']``):

1. ascent: per-example losses l_i(w) on the ascent examples (all of B, a micro-batch of a ≤ b examples for
   efficient SAM, Bahri et al. 2022, or each of m disjoint micro-batches for m-sharpness), weighted uniformly or by
   an instance-weighting piece (δ-SAM), back-propagated: g;
2. perturbation: ε = ρ · s(g) / ‖n(g)‖₂ with one global norm over every parameter group, s = n = g transformed by
   the variant's ascent pieces in order (SAM, Foret et al. 2021, has none but the Fisher mask, which does nothing
   until a mask is installed). A zero gradient gives ε = 0;
3. descent: w is saved, w + ε is set, the closure's losses at w + ε give the gradient (on the examples a descent
   piece selects), then w is restored by copying the saved tensors (never by subtracting ε); descent pieces may
   combine that gradient with g (GSAM) or skip the perturbed pass and reuse a stored direction (LookSAM);
4. the base optimizer steps on that gradient (after optional clipping), so its decoupled weight decay never enters ε.

Hyperparameters (``rho`` and the pieces' own) are entries of each ``param_groups`` dict: a scheduler can drive them,
``state_dict`` saves them, and a checkpoint written before they moved there gets the construction values on load.

Dropout: the two passes draw independent dropout masks unless ``same_dropout=True``, which replays the RNG state of
the ascent forward for the descent forward (identical masks when both passes see the same examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from optimizers import pieces as piece_classes
from optimizers import rng
from optimizers.closure import ClosureOptimizer
from optimizers.loss_scale import DynamicLossScale
from optimizers.pieces import Ascent, FisherMask, Piece, global_norm, same_layout
from optimizers.replicas import SINGLE, Replicas
from optimizers.variants import CORE_SETTINGS, VARIANTS, get_variant


@dataclass
class StepReport:
    """What the last step did, for logging and tests."""

    rho: float = 0.0
    perturbation_norm: float = 0.0
    ascent_examples: int = 0
    descent_examples: int = 0
    perturbed: bool = True
    skipped: bool = False  # fp16: the unscaled gradient was not finite, the step was not taken
    instance_weights: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class SavedWeights:
    """What :meth:`SharpnessAware.perturb` saved: the moved parameters and their values before ε, in order.
    ``buffered``: the values are the optimizer's held buffers (reused next step), not copies of their own."""

    params: list[torch.Tensor]
    values: list[torch.Tensor]
    buffered: bool


class SharpnessAware(ClosureOptimizer):
    """Sharpness-aware minimisation around any base optimizer instance (see the module docstring).

    Args:
        base: the base optimizer (AdamW, Adam, AMSGrad, Adagrad, SGD, ...); its ``param_groups`` and ``state`` are
            shared, so LR schedulers and ``state_dict`` work through this wrapper.
        pieces: the variant's pieces, in order (``optimizers.variants`` lists each variant's); default: SAM's.
        rho: neighbourhood radius ρ (L2), the default of every group's ``"rho"``. GSAM: the peak ρ.
        ascent_fraction: efficient SAM (Bahri et al. 2022, Alg. 1): the ascent gradient from the first
            ``ceil(fraction · b)`` examples of the batch (the batch order is already random); descent on all of it.
        m_sharpness: m disjoint ascent micro-batches, each with its own ε. With ``ascent_fraction`` 1 (Foret et al.'s
            m-sharpness) each descends on itself and the descent gradients are averaged weighted by micro-batch
            size; with ``ascent_fraction`` < 1 (Bahri et al. Fig. 2: m parts of a/m examples) each ε's descent is
            on the whole batch and the m gradients are averaged.
        same_dropout: replay the ascent's RNG state for the descent forward (identical dropout masks).
        local_ascent: with several data-parallel replicas, each takes its own ε from its own share of the batch
            (m-sharpness with m = world size, as Foret et al. trained) and the descent gradients are averaged;
            by default the ascent gradient is averaged first, so ε is the one of the global batch.
        seed: seed of the optimizer's own generator (δ-SAM's random direction, ESAM's Bernoulli masks); its state
            is part of ``state_dict`` so a resumed run draws the same numbers.
        named_parameters: the model's ``named_parameters()``, so that masks are keyed by name (else set_mask
            learns the names).
        hyperparameters: values of the pieces' hyperparameters (``eta``, ``esam_beta``, ...); a name no piece
            declares is refused.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        pieces: Sequence[Piece] | None = None,
        *,
        rho: float = 0.05,
        ascent_fraction: float = 1.0,
        m_sharpness: int = 1,
        same_dropout: bool = False,
        local_ascent: bool = False,
        seed: int = 0,
        max_grad_norm: float | None = None,
        accumulation: int = 1,
        replicas: Replicas | None = None,
        loss_scale: DynamicLossScale | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        **hyperparameters: float,
    ) -> None:
        _check(0 < ascent_fraction <= 1, f"ascent_fraction must be in (0, 1], got {ascent_fraction}")
        _check(isinstance(m_sharpness, int) and m_sharpness >= 1, f"m_sharpness must be an int >= 1, got {m_sharpness}")
        super().__init__(
            base, max_grad_norm=max_grad_norm, accumulation=accumulation, replicas=replicas, loss_scale=loss_scale
        )
        self.pieces = list(pieces) if pieces is not None else [FisherMask()]
        whole = [type(piece).__name__ for piece in self.pieces if piece.whole_batch]
        _check(
            accumulation == 1 or not whole,
            f"{', '.join(whole)} weighs or selects examples from the losses of the whole batch, which gradient "
            "accumulation never holds at once: use accumulation = 1 (a smaller batch, or m_sharpness for a "
            "per-micro-batch ascent)",
        )
        declared = {"rho": rho}
        for piece in self.pieces:
            declared.update(piece.hyperparameters)
        unknown = sorted(set(hyperparameters) - set(declared))
        if unknown:
            raise TypeError(
                f"hyperparameter(s) {', '.join(unknown)} belong to no piece of this variant; "
                f"it has {', '.join(sorted(declared))}"
            )
        self._hyperparameters = {**declared, "rho": rho, **hyperparameters}
        self._install_hyperparameters()
        for piece in self.pieces:
            piece.check_core(ascent_fraction=ascent_fraction, m_sharpness=m_sharpness)
        self.ascent_fraction = ascent_fraction
        self.m_sharpness = m_sharpness
        self.same_dropout = same_dropout
        self.local_ascent = local_ascent
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_taken = 0
        # Where perturb saves w, kept from step to step (per parameter, in the order of parameters()): a fresh copy
        # each step costs page faults on the CPU (glibc maps every block over 32 MiB anew, e.g. a vocabulary
        # table), several times the copy itself. A perturbation inside another one clones instead.
        self._saved_weights: list[torch.Tensor | None] = []
        self._perturbed = False
        self._names: dict[int, str] = {}
        if named_parameters is not None:
            self._learn_names(named_parameters)
        self.last = StepReport()

    # --- hyperparameters -----------------------------------------------------------------------------------------

    @property
    def _combines(self) -> bool:
        """A piece combines the descent gradient with the ascent gradient (GSAM, LookSAM): keep the latter."""
        return any(type(piece).combine is not Piece.combine for piece in self.pieces)

    def _install_hyperparameters(self) -> None:
        """Give every group (and the defaults, for groups added later) each hyperparameter it lacks; check them."""
        for group in [*self.param_groups, self.defaults]:
            for name, value in self._hyperparameters.items():
                group.setdefault(name, value)
        for group in self.param_groups:
            self.check_group(group)

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Refuse out-of-range hyperparameters in ``group`` with ``ValueError`` naming the value."""
        rho = group["rho"]
        _check(isinstance(rho, int | float) and rho >= 0 and math.isfinite(rho), f"rho must be >= 0, got {rho}")
        for piece in self.pieces:
            piece.check(group)

    def radius(self, group: Mapping[str, Any]) -> float:
        """ρ of this step for ``group``: its ``"rho"``, passed through the pieces' schedules (GSAM)."""
        rho = group["rho"]
        for piece in self.pieces:
            rho = piece.rho(rho, group)
        return rho

    # --- names and masks (FSAM) ------------------------------------------------------------------------------

    def _learn_names(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        by_id = {id(p): name for name, p in named_parameters}
        missing = [i for i, p in enumerate(self.parameters()) if id(p) not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) of the optimizer are missing from named_parameters")
        self._names = {id(p): by_id[id(p)] for p in self.parameters()}

    def names(self) -> list[str | None]:
        """The name of each parameter, in the optimizer's order (None until named_parameters is given)."""
        return [self._names.get(id(p)) for p in self.parameters()]

    def _mask_piece(self) -> FisherMask:
        for piece in self.pieces:
            if isinstance(piece, FisherMask):
                return piece
        raise ValueError("this variant has no Fisher mask piece: add optimizers.pieces.FisherMask to its pieces")

    def set_mask(self, mask: Mapping[str, torch.Tensor], named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Install a coordinate mask keyed by parameter name (True = perturbed); parameters absent are not perturbed.

        The mask is computed elsewhere (``analyses.fisher.fisher_mask``); this only stores it, as bool tensors.
        """
        named = list(named_parameters)
        self._learn_names(named)
        ours = {id(p) for p in self.parameters()}
        self._mask_piece().set(mask, [(name, p) for name, p in named if id(p) in ours])

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The installed Fisher mask keyed by parameter name (empty when none is installed)."""
        return next((p.masks for p in self.pieces if isinstance(p, FisherMask)), {})

    def mask_by_name(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The installed mask for ``named_parameters``, in their order (empty when none is installed)."""
        masks = self.masks
        return {name: masks[name] for name, _ in named_parameters if name in masks}

    # --- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # the base's, and the loss scale
        pieces = {f"{i}:{type(p).__name__}": p.state_dict() for i, p in enumerate(self.pieces)}
        state["sharpness"] = {
            "generator": self.generator.get_state(),
            "steps_taken": self.steps_taken,
            "pieces": {key: value for key, value in pieces.items() if value},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness", None)
        super().load_state_dict(state_dict)
        self._install_hyperparameters()  # a checkpoint from before they lived in param_groups lacks them
        if extra is None:
            return
        self.generator.set_state(extra["generator"])
        self.steps_taken = int(extra.get("steps_taken", 0))
        saved = extra.get("pieces", {})
        for i, piece in enumerate(self.pieces):
            piece.load_state_dict(saved.get(f"{i}:{type(piece).__name__}", {}))
        if "masks" in extra:  # the format of earlier versions: masks keyed by parameter position
            self._load_positional_masks(extra["masks"])

    def _load_positional_masks(self, masks: Mapping[Any, torch.Tensor]) -> None:
        if not masks:
            return
        names = self.names()
        if any(name is None for name in names):
            raise ValueError(
                "this checkpoint keys its Fisher mask by parameter position: "
                "build the optimizer with named_parameters= to load it"
            )
        self._mask_piece().masks = {names[int(k)]: v.to(torch.bool) for k, v in masks.items()}

    # --- the step ------------------------------------------------------------------------------------------------

    def perturbation(
        self, params: list[torch.Tensor], grads: list[torch.Tensor | None], *, in_place: bool = False
    ) -> list[torch.Tensor | None]:
        """ε per parameter (None where zero) from the ascent gradients, with one global norm over all parameters.

        ``in_place``: ε may take the gradients' own storage (the caller needs them no more), which saves SAM one
        copy of the weights' size in memory."""
        groups = [group for group in self.param_groups for _ in group["params"]]
        ascent = Ascent(
            params=params,
            names=self.names(),
            groups=groups,
            numerators=list(grads),
            norm_terms=list(grads),
            generator=self.generator,
        )
        for piece in self.pieces:
            piece.ascent(ascent)
        norm = global_norm([n for n in ascent.norm_terms if n is not None])
        self._epsilon_norm = 0.0
        if norm == 0 or not math.isfinite(norm):
            return [None] * len(params)
        epsilon = []
        for numerator, grad, group, mask in zip(ascent.numerators, grads, groups, ascent.masks, strict=True):
            rho = self.radius(group)
            if numerator is None or rho == 0:
                epsilon.append(None)
                continue
            # still the gradient and wanted afterwards (GSAM, LookSAM): a new tensor; else scaled where it is
            value = numerator * (rho / norm) if numerator is grad and not in_place else numerator.mul_(rho / norm)
            # masked_fill_ and not mul_: a product with a bool tensor converts it to a float copy first (on the CPU)
            epsilon.append(value if mask is None else value.masked_fill_(mask.logical_not(), 0.0))
        radii = {self.radius(group) for group in groups}
        unmasked = all(mask is None for mask in ascent.masks)
        numerators_are_norm_terms = all(n is t for n, t in zip(ascent.numerators, ascent.norm_terms, strict=True))
        if len(radii) == 1 and unmasked and numerators_are_norm_terms:
            self._epsilon_norm = radii.pop()  # ε = ρ·n/‖n‖: its norm is ρ, no pass over ε needed
        else:
            self._epsilon_norm = global_norm([e for e in epsilon if e is not None])
        return epsilon

    def perturb(self, epsilon: list[torch.Tensor | None]) -> SavedWeights:
        """Add ε to the parameters in place; returns the saved values that :meth:`restore` copies back."""
        moved = [(i, p, e) for i, (p, e) in enumerate(zip(self.parameters(), epsilon, strict=True)) if e is not None]
        targets = [p for _, p, _ in moved]
        if not moved:
            return SavedWeights([], [], buffered=False)
        if self._perturbed:  # a perturbation inside another: the held buffers are in use, take copies
            saved = SavedWeights(targets, [p.detach().clone() for p in targets], buffered=False)
        else:
            buffers = self._saved_weights
            buffers.extend([None] * (len(epsilon) - len(buffers)))
            for i, p, _ in moved:
                if not same_layout(buffers[i], p):
                    buffers[i] = torch.empty_like(p, memory_format=torch.contiguous_format)
            saved = SavedWeights(targets, [buffers[i] for i, _, _ in moved], buffered=True)
            torch._foreach_copy_(saved.values, targets)
        torch._foreach_add_(targets, [e for _, _, e in moved])
        self._perturbed = self._perturbed or saved.buffered
        return saved

    def release_buffers(self) -> None:
        """Free what the steps hold from one step to the next (the saved-weight buffers, the pieces' draws), e.g.
        before a memory-hungry computation between steps (FSAM's Fisher); the next step allocates them again."""
        if self._perturbed:
            raise RuntimeError("release_buffers() inside a perturbation: the saved weights are still needed")
        self._saved_weights = []
        for piece in self.pieces:
            piece.release_buffers()

    def restore(self, saved: SavedWeights) -> None:
        """Copy the values :meth:`perturb` saved back (a bitwise restore: w + ε − ε is not w in floating point)."""
        if saved.params:
            torch._foreach_copy_(saved.params, saved.values)
        if saved.buffered:
            self._perturbed = False

    @contextmanager
    def perturbed(self, epsilon: list[torch.Tensor | None]):
        """Parameters at w + ε (ε in the order of :meth:`parameters`) inside the block, restored bitwise on exit,
        also on exceptions."""
        saved = self.perturb(epsilon)
        try:
            yield
        finally:
            self.restore(saved)

    @torch.no_grad()
    def step(self, closure: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One sharpness-aware step; returns the per-example losses at w of the ascent examples, detached."""
        if closure is None:
            raise ValueError("step() needs a closure that returns the per-example losses of the current batch")
        for group in self.param_groups:
            self.check_group(group)
        params = self.parameters()
        first_group = self.param_groups[0]
        report = StepReport(rho=self.radius(first_group))
        perturbs = all(piece.perturbs(self) for piece in self.pieces)
        report.perturbed = perturbs
        # Over whom the ascent's coefficients (and ESAM's selection, δ-SAM's normalisation) range: the global
        # batch, or with local_ascent this process's share, each replica then running the variant on its own.
        group = SINGLE if self.local_ascent else self.replicas
        chunks = self._ascent_chunks(closure)
        # Foret's m-sharpness (the whole batch split in m): each part descends on itself, weighted by its size.
        # Inside efficient SAM's micro-batch (Bahri et al.): every part's point descends on the whole batch, and
        # the m gradients are averaged ("averaging the SAM-gradients at each of these points", §3).
        own_descent = self.m_sharpness > 1 and self.ascent_fraction == 1
        batch_total = sum(len(c) for c in chunks) if own_descent else None
        accumulated: list[torch.Tensor | None] | None = None
        losses_at_w: list[torch.Tensor] = []
        for chunk in chunks:
            self.zero_grad(set_to_none=True)
            # δ-SAM's probe runs first: perturbing the weights in place after the ascent forward would invalidate
            # that forward's autograd graph. Its losses at w are the ascent's own, so the probe is its only cost.
            weighting = [(piece, piece.instance_probe(self, closure, chunk)) for piece in self.pieces]
            weighting = [(piece, probe) for piece, probe in weighting if probe is not None]
            rng_before = rng.snapshot(params) if self.same_dropout else None
            weigh = self._instance_weigh(weighting, first_group, group, report) if weighting else None
            losses = self.backward_objective(closure, chunk, weigh=weigh, group=group)
            losses_at_w.append(losses)
            report.ascent_examples += losses.numel()
            if not self.local_ascent:
                self.replicas.average_gradients(params)
            if not self.unscaled():  # fp16 overflow in the ascent: no ε, no step
                return self._skip(report, losses_at_w)
            if not perturbs:
                for piece in self.pieces:
                    piece.reuse(params, first_group)
                if self.local_ascent:
                    self.replicas.average_gradients(params)
                report.perturbation_norm = 0.0
                report.descent_examples += losses.numel()
                accumulated = [p.grad for p in params]
                continue
            # zero_grad(set_to_none) below drops these tensors from .grad without writing to them: no copy needed.
            # Only GSAM / LookSAM combine with the ascent gradient afterwards; otherwise ε takes its storage.
            ascent_grads = [p.grad for p in params]
            epsilon = self.perturbation(params, ascent_grads, in_place=not self._combines)
            if not self._combines:
                ascent_grads = [None] * len(params)
            report.perturbation_norm = self._epsilon_norm
            descent_chunk = chunk if own_descent else None
            saved = self.perturb(epsilon)
            # ε is in the weights now and nothing reads it again: dropped here, its memory (SAM's: the ascent
            # gradient's own) is free before the descent backward allocates its gradient, one copy of the weights
            # less at the step's peak.
            del epsilon
            try:
                self.zero_grad(set_to_none=True)
                if rng_before is not None:
                    rng.restore(rng_before)
                select = self._selection_weigh(losses, first_group, group, report)
                perturbed = self.backward_objective(closure, descent_chunk, weigh=select, group=group)
                if report.selected is None:
                    report.descent_examples += perturbed.numel()
                # Global SAM averages before GSAM's / LookSAM's combination (both nonlinear in the gradient), so
                # every replica combines the same two gradients; a local ascent combines its own, then averages.
                if not self.local_ascent:
                    self.replicas.average_gradients(params)
                finite = self.unscaled()
            finally:
                self.restore(saved)
            if not finite:  # fp16 overflow at w + ε: the weights are restored (above), no step
                return self._skip(report, losses_at_w)
            for piece in self.pieces:
                piece.combine(params, ascent_grads, first_group)
            if self.local_ascent:
                self.replicas.average_gradients(params)
            share = len(chunk) / batch_total if batch_total is not None else 1.0 / len(chunks)
            accumulated = _accumulate(accumulated, params, share)
        for param, grad in zip(params, accumulated or [], strict=True):
            param.grad = grad
        self.last = report
        self.steps_taken += 1
        self.descend()
        self.finish(skipped=False)
        return torch.cat(losses_at_w)

    def _skip(self, report: StepReport, losses_at_w: list[torch.Tensor]) -> torch.Tensor:
        report.skipped = True
        self.last = report
        self.finish(skipped=True)
        return torch.cat(losses_at_w)

    @staticmethod
    def _instance_weigh(weighting, hyperparameters, group, report) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ascent's coefficients from the instance-weighting pieces (δ-SAM), normalised over ``group``'s batch."""

        def weigh(losses: torch.Tensor) -> torch.Tensor:
            weights = None
            for piece, probe in weighting:
                probe_all, mine = group.gather(probe)
                losses_all, _ = group.gather(losses)
                weights_all = piece.instance_weights(probe_all, losses_all, hyperparameters)
                report.extra.update(piece.statistics(weights_all))
                weights = weights_all[mine]
            report.instance_weights = weights
            return weights

        return weigh

    def _selection_weigh(self, at_w, hyperparameters, group, report) -> Callable | None:
        """The descent's coefficients from a selecting piece (ESAM: 1/|S| on the selected examples of ``group``'s
        batch, 0 elsewhere); None when no piece selects (uniform, and micro-batches allowed)."""
        if not any(piece.selects for piece in self.pieces):
            return None

        def weigh(perturbed: torch.Tensor) -> torch.Tensor | None:
            perturbed_all, mine = group.gather(perturbed)
            at_w_all, _ = group.gather(at_w)
            selected = None
            for piece in self.pieces:
                selected = piece.select(perturbed_all, at_w_all, hyperparameters)
                if selected is not None:
                    break
            report.selected = selected
            if selected is None:
                return None
            report.descent_examples += selected.numel()
            coefficients = torch.zeros_like(perturbed_all)
            coefficients[selected] = 1.0 / selected.numel()
            return coefficients[mine]

        return weigh

    def _ascent_chunks(self, closure: Callable[..., torch.Tensor]) -> list[torch.Tensor | None]:
        if self.ascent_fraction == 1 and self.m_sharpness == 1:
            return [None]
        size = getattr(closure, "size", None)
        if not isinstance(size, int) or size <= 0:
            raise ValueError("efficient SAM / m-sharpness needs a closure with an int attribute `size` (batch size)")
        ascent_rows = max(1, math.ceil(self.ascent_fraction * size))
        rows = torch.arange(ascent_rows)  # cpu: row indices (the closure moves them to the batch's device)
        return [chunk for chunk in rows.tensor_split(min(self.m_sharpness, ascent_rows)) if len(chunk)]


def _accumulate(accumulated, params, share):
    grads = [None if p.grad is None else p.grad * share if share != 1 else p.grad for p in params]
    if accumulated is None:
        return grads
    return [a if g is None else g if a is None else a + g for a, g in zip(accumulated, grads, strict=True)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def make_sharpness_optimizer(
    variant: str,
    base: torch.optim.Optimizer,
    *,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    seed: int = 0,
    max_grad_norm: float | None = None,
    accumulation: int = 1,
    replicas: Replicas | None = None,
    loss_scale: DynamicLossScale | None = None,
    local_ascent: bool = False,
    **settings: Any,
) -> ClosureOptimizer:
    """Wrap ``base`` as the registry's ``variant`` (:data:`optimizers.variants.VARIANTS`).

    ``settings`` are the core's (``rho``, ``ascent_fraction``, ``m_sharpness``, ``same_dropout``), the pieces'
    hyperparameters (``eta``, ``esam_beta``, ``esam_gamma``, ``gsam_alpha``, ``rho_min``, ``delta_beta``,
    ``looksam_k``, ``looksam_alpha``) and their options (``exact_rho``, ``asam_exempt_biases``, ``delta_weights``).
    One the variant does not read (``esam_beta`` for SAM) is ignored, so a caller can hand one full configuration
    to any variant; a name that is nobody's is refused. ``accumulation``, ``replicas`` and ``loss_scale`` are
    :class:`~optimizers.closure.ClosureOptimizer`'s; ``local_ascent`` needs a sharpness-aware variant.
    """
    entry = get_variant(variant)
    known = set(CORE_SETTINGS) | {name for v in VARIANTS.values() for name in v.settings}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown sharpness-aware setting(s) {', '.join(unknown)}; expected some of {sorted(known)}")
    shared = {"max_grad_norm": max_grad_norm, "accumulation": accumulation, "replicas": replicas}
    shared["loss_scale"] = loss_scale
    if entry.pieces is None:
        if local_ascent:
            raise ValueError("local_ascent (--local-ascent) keeps each replica's own ε: it needs a SAM variant")
        return ClosureOptimizer(base, **shared)
    built = []
    for name in entry.pieces:
        cls = getattr(piece_classes, name)
        built.append(cls(**{option: settings[option] for option in cls.options if option in settings}))
    options = {option for name in entry.pieces for option in getattr(piece_classes, name).options}
    chosen = {
        name: settings[name] for name in (*CORE_SETTINGS, *entry.settings) if name in settings and name not in options
    }
    return SharpnessAware(
        base, built, seed=seed, local_ascent=local_ascent, named_parameters=named_parameters, **shared, **chosen
    )
