"""The sharpness-aware family behind one optimizer: SAM, ASAM, efficient SAM, ESAM, GSAM, FSAM and δ-SAM.

One step, for a batch B whose per-example losses the closure returns (``closure(indices=None) -> Tensor[B']``):

1. ascent: per-example losses l_i(w) on the ascent examples (all of B, a micro-batch of a ≤ b examples, or each
   of m disjoint micro-batches for m-sharpness), weighted uniformly or by δ-SAM's g'_i, back-propagated: g;
2. perturbation: ε = ρ · s(g) / ‖n(g)‖₂ with one global norm over every parameter group, where the pieces are
   SAM s = g, n = g (Foret et al. 2021); ASAM s = T²g, n = Tg with T = |w| + η (Kwon et al. 2021); a Fisher mask m
   multiplies s (FSAM Eq. 6, n unmasked so ‖ε‖ ≤ ρ; ``exact_rho`` masks n too so ‖ε‖ = ρ); ESAM's stochastic weight
   perturbation multiplies s by a Bernoulli(β) mask / β (Du et al. 2022). A zero gradient gives ε = 0;
3. descent: w is saved, w + ε is set, the closure's losses at w + ε give the gradient (on all of B, or on ESAM's
   γ·|B| examples whose loss rose most), then w is restored by copying the saved tensors (never by subtracting ε);
   GSAM (Zhuang et al. 2022) replaces it by g_adv − α g_⊥ with g_⊥ the part of g orthogonal to g_adv, and its ρ
   follows the learning-rate schedule;
4. the base optimizer steps on that gradient (after optional clipping), so its decoupled weight decay never enters ε.

Dropout: the two passes draw independent dropout masks unless ``same_dropout=True``, which replays the RNG state of
the ascent forward for the descent forward (identical masks when both passes see the same examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from optimizers.closure import ClosureOptimizer


@dataclass
class StepReport:
    """What the last step did, for logging and tests."""

    rho: float = 0.0
    perturbation_norm: float = 0.0
    ascent_examples: int = 0
    descent_examples: int = 0
    instance_weights: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)


class SharpnessAware(ClosureOptimizer):
    """Sharpness-aware minimisation around any base optimizer instance (see the module docstring).

    Args:
        base: the base optimizer (AdamW, Adam, AMSGrad, Adagrad, SGD, ...); its ``param_groups`` and ``state`` are
            shared, so LR schedulers and ``state_dict`` work through this wrapper.
        rho: neighbourhood radius ρ (L2). GSAM: the peak ρ, reached at the peak learning rate.
        adaptive: ASAM's scaling with T = |w| + ``eta``.
        ascent_fraction: efficient SAM (Bahri et al. 2022, Alg. 1): the ascent gradient from the first
            ``ceil(fraction · b)`` examples of the batch (the batch order is already random); descent on all of it.
        m_sharpness: m disjoint ascent micro-batches, each with its own ε and descent on itself; the descent
            gradients are averaged weighted by micro-batch size (= the plain average for equal sizes).
        exact_rho: with a Fisher mask, normalise the masked gradient so ‖ε‖ = ρ (instead of Eq. 6's ≤ ρ).
        swp_keep: ESAM stochastic weight perturbation: keep each coordinate with this probability β.
        sds_fraction: ESAM sharpness-sensitive data selection: descend on this fraction γ of the batch, the
            examples with the largest l_i(w + ε) − l_i(w).
        delta_beta: δ-SAM's β (Eqs. 3–6): instance weights of the ascent from the guardedness of each example.
        gsam_alpha: GSAM's α; also makes ρ follow the learning rate: ρ_t = rho_min + (ρ − rho_min) · lr_t / lr_peak.
        same_dropout: replay the ascent's RNG state for the descent forward (identical dropout masks).
        seed: seed of the optimizer's own generator (δ-SAM's random direction, ESAM's Bernoulli masks); its state
            is part of ``state_dict`` so a resumed run draws the same numbers.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        ascent_fraction: float = 1.0,
        m_sharpness: int = 1,
        exact_rho: bool = False,
        swp_keep: float | None = None,
        sds_fraction: float | None = None,
        delta_beta: float | None = None,
        gsam_alpha: float | None = None,
        rho_min: float = 0.0,
        same_dropout: bool = False,
        seed: int = 0,
        max_grad_norm: float | None = None,
    ) -> None:
        _check(rho >= 0 and math.isfinite(rho), f"rho must be a finite number >= 0, got {rho}")
        _check(eta >= 0, f"eta must be >= 0, got {eta}")
        _check(0 < ascent_fraction <= 1, f"ascent_fraction must be in (0, 1], got {ascent_fraction}")
        _check(isinstance(m_sharpness, int) and m_sharpness >= 1, f"m_sharpness must be an int >= 1, got {m_sharpness}")
        _check(m_sharpness == 1 or ascent_fraction == 1, "use either ascent_fraction < 1 or m_sharpness > 1, not both")
        _check(swp_keep is None or 0 < swp_keep <= 1, f"swp_keep (ESAM beta) must be in (0, 1], got {swp_keep}")
        _check(
            sds_fraction is None or 0 < sds_fraction <= 1,
            f"sds_fraction (ESAM gamma) must be in (0, 1], got {sds_fraction}",
        )
        _check(
            sds_fraction is None or (ascent_fraction == 1 and m_sharpness == 1),
            "ESAM's data selection needs the losses at w of the whole batch: use it with ascent_fraction = 1 and m = 1",
        )
        _check(delta_beta is None or delta_beta >= 0, f"delta-SAM beta must be >= 0, got {delta_beta}")
        _check(gsam_alpha is None or gsam_alpha >= 0, f"GSAM alpha must be >= 0, got {gsam_alpha}")
        _check(0 <= rho_min <= rho, f"rho_min must be in [0, rho], got {rho_min}")
        super().__init__(base, max_grad_norm=max_grad_norm)
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self.ascent_fraction = ascent_fraction
        self.m_sharpness = m_sharpness
        self.exact_rho = exact_rho
        self.swp_keep = swp_keep
        self.sds_fraction = sds_fraction
        self.delta_beta = delta_beta
        self.gsam_alpha = gsam_alpha
        self.rho_min = rho_min
        self.same_dropout = same_dropout
        self.generator = torch.Generator().manual_seed(seed)
        self.masks: dict[int, torch.Tensor] = {}  # parameter position -> bool mask (FSAM)
        self.last = StepReport()

    # --- masks (FSAM) ----------------------------------------------------------------------------------------

    def set_mask(self, mask: Mapping[str, torch.Tensor], named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Install a coordinate mask keyed by parameter name (True = perturbed); parameters absent are not perturbed.

        The mask is computed elsewhere (``analyses.fisher.fisher_mask``); this only stores it, as bool tensors.
        """
        by_id = {id(p): name for name, p in named_parameters}
        masks: dict[int, torch.Tensor] = {}
        for position, param in enumerate(self.parameters()):
            name = by_id.get(id(param))
            if name is None:
                raise ValueError("set_mask: a parameter of the optimizer is missing from named_parameters")
            if name in mask:
                value = mask[name]
                if value.shape != param.shape:
                    raise ValueError(f"mask of {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                masks[position] = value.to(device=param.device, dtype=torch.bool).clone()
            else:
                masks[position] = torch.zeros_like(param, dtype=torch.bool)
        self.masks = masks

    def mask_by_name(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The installed mask keyed by parameter name (empty when none is installed)."""
        position = {id(p): i for i, p in enumerate(self.parameters())}
        return {name: self.masks[position[id(p)]] for name, p in named_parameters if position.get(id(p)) in self.masks}

    # --- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self.base.state_dict()
        state["sharpness"] = {"generator": self.generator.get_state(), "masks": dict(self.masks)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.generator.set_state(extra["generator"])
            self.masks = {int(k): v.to(torch.bool) for k, v in extra["masks"].items()}

    # --- the step ------------------------------------------------------------------------------------------------

    def current_rho(self) -> float:
        """ρ of this step: constant, or (GSAM) proportional to the learning rate's progress to its peak."""
        if self.gsam_alpha is None:
            return self.rho
        group = self.param_groups[0]
        peak = group.get("initial_lr", group["lr"])
        progress = group["lr"] / peak if peak > 0 else 0.0
        return self.rho_min + (self.rho - self.rho_min) * progress

    @torch.no_grad()
    def step(self, closure: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One sharpness-aware step; returns the per-example losses at w of the ascent examples, detached."""
        if closure is None:
            raise ValueError("step() needs a closure that returns the per-example losses of the current batch")
        params = self.parameters()
        rho = self.current_rho()
        report = StepReport(rho=rho)
        chunks = self._ascent_chunks(closure)
        batch_total = sum(len(c) for c in chunks) if self.m_sharpness > 1 else None
        accumulated: list[torch.Tensor | None] | None = None
        losses_at_w = []
        for chunk in chunks:
            self.zero_grad(set_to_none=True)
            # δ-SAM's probe runs first: perturbing the weights in place after the ascent forward would invalidate
            # that forward's autograd graph. Its losses at w are the ascent's own, so the probe is its only cost.
            probe = self._random_probe(closure, chunk, rho, params)
            rng_before = torch.get_rng_state() if self.same_dropout else None
            losses = self.evaluate(lambda chunk=chunk: closure(chunk))
            losses_at_w.append(losses.detach())
            report.ascent_examples += losses.numel()
            weights = None if probe is None else delta_sam_weights(probe - losses.detach(), self.delta_beta)
            report.instance_weights = weights
            with torch.enable_grad():
                (losses.mean() if weights is None else (weights * losses).sum()).backward()
            # zero_grad(set_to_none) below drops these tensors from .grad without writing to them: no copy needed.
            ascent_grads = [p.grad for p in params]
            epsilon = self.perturbation(params, ascent_grads, rho)
            report.perturbation_norm = global_norm([e for e in epsilon if e is not None])
            descent_chunk = chunk if self.m_sharpness > 1 else None
            with self.perturbed(params, epsilon):
                self.zero_grad(set_to_none=True)
                if rng_before is not None:
                    torch.set_rng_state(rng_before)
                perturbed = self.evaluate(lambda descent_chunk=descent_chunk: closure(descent_chunk))
                selected = self._select(perturbed.detach(), losses.detach())
                report.selected = selected
                report.descent_examples += perturbed.numel() if selected is None else selected.numel()
                with torch.enable_grad():
                    (perturbed.mean() if selected is None else perturbed[selected].mean()).backward()
            if self.gsam_alpha is not None:
                self._gsam_combine(params, ascent_grads)
            share = 1.0 if batch_total is None else len(chunk) / batch_total
            accumulated = _accumulate(accumulated, params, share)
        for param, grad in zip(params, accumulated or [], strict=True):
            param.grad = grad
        self.last = report
        self.descend()
        return torch.cat(losses_at_w)

    def _ascent_chunks(self, closure: Callable[..., torch.Tensor]) -> list[torch.Tensor | None]:
        if self.ascent_fraction == 1 and self.m_sharpness == 1:
            return [None]
        size = getattr(closure, "size", None)
        if not isinstance(size, int) or size <= 0:
            raise ValueError("efficient SAM / m-sharpness needs a closure with an int attribute `size` (batch size)")
        if self.m_sharpness > 1:
            return [chunk for chunk in torch.arange(size).tensor_split(min(self.m_sharpness, size)) if len(chunk)]
        return [torch.arange(max(1, math.ceil(self.ascent_fraction * size)))]

    def _random_probe(self, closure, chunk, rho, params) -> torch.Tensor | None:
        """δ-SAM Eq. 3: per-example losses l_j(w + ρ ê/‖ê‖), ê ~ N(0, I), without gradients (None if not δ-SAM)."""
        if self.delta_beta is None:
            return None
        directions = [torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device) for p in params]
        norm = global_norm(directions)
        epsilon = [rho * d / norm for d in directions] if norm > 0 else [None] * len(params)
        with self.perturbed(params, epsilon):
            return closure(chunk).detach()

    def perturbation(self, params, grads, rho) -> list[torch.Tensor | None]:
        """ε per parameter (None where zero), with one global norm over all parameters."""
        numerators, norm_terms = [], []
        for position, (param, grad) in enumerate(zip(params, grads, strict=True)):
            if grad is None:
                numerators.append(None)
                continue
            scale = (param.detach().abs() + self.eta) if self.adaptive else None
            numerator = grad * scale * scale if scale is not None else grad.clone()
            norm_term = grad * scale if scale is not None else grad
            mask = self.masks.get(position)
            if mask is not None:
                numerator.mul_(mask)
                if self.exact_rho:
                    norm_term = norm_term * mask
            if self.swp_keep is not None and self.swp_keep < 1:
                keep = torch.rand(param.shape, generator=self.generator) < self.swp_keep
                numerator.mul_(keep.to(numerator.device)).div_(self.swp_keep)
            numerators.append(numerator)
            norm_terms.append(norm_term)
        norm = global_norm(norm_terms)
        if rho == 0 or norm == 0 or not math.isfinite(norm):
            return [None] * len(params)
        return [None if n is None else n.mul_(rho / norm) for n in numerators]

    def _select(self, perturbed: torch.Tensor, at_w: torch.Tensor) -> torch.Tensor | None:
        """ESAM's sharpness-sensitive data selection: indices of the γ·|B| largest loss increases."""
        if self.sds_fraction is None or self.sds_fraction == 1:
            return None
        count = max(1, math.ceil(self.sds_fraction * perturbed.numel()))
        return torch.topk(perturbed - at_w, count, sorted=False).indices.sort().values

    def _gsam_combine(self, params, ascent_grads) -> None:
        """GSAM: the final gradient g_adv − α g_⊥ with g = g_∥ + g_⊥ decomposed along g_adv."""
        adv = [p.grad for p in params]
        pairs = [(g, a) for g, a in zip(ascent_grads, adv, strict=True) if g is not None and a is not None]
        dot = sum(float(torch.vdot(g.flatten(), a.flatten())) for g, a in pairs)
        adv_sq = sum(float(torch.vdot(a.flatten(), a.flatten())) for _, a in pairs)
        coefficient = dot / adv_sq if adv_sq > 0 else 0.0
        for g, a in pairs:
            orthogonal = g - coefficient * a
            a.sub_(self.gsam_alpha * orthogonal)

    @contextmanager
    def perturbed(self, params, epsilon):
        """Add ε to the parameters; on exit copy the saved values back (bitwise restore), also on exceptions."""
        saved = [(p, p.detach().clone()) for p, e in zip(params, epsilon, strict=True) if e is not None]
        try:
            for param, eps in zip(params, epsilon, strict=True):
                if eps is not None:
                    param.add_(eps)
            yield
        finally:
            for param, value in saved:
                param.copy_(value)


def delta_sam_weights(guardedness: torch.Tensor, beta: float) -> torch.Tensor:
    """δ-SAM instance weights g'_i from the loss changes a_i under a random perturbation (Eqs. 4–6), shape [N].

    g_i = |a_i| / Σ|a|; ā = mean(a); a_s = Σ g_i a_i; r = β |ā| / |a_s|; g'_i = (g_i − 1/N) r + 1/N (Σ g' = 1).
    Degenerate batches (all a_i = 0, or a_s = 0) get uniform weights 1/N: there is nothing to reweight by.
    """
    a = guardedness.double()
    n = a.numel()
    uniform = torch.full_like(a, 1.0 / n)
    total = a.abs().sum()
    if total == 0:
        return uniform.to(guardedness.dtype)
    g = a.abs() / total
    a_mean = a.mean()
    a_s = (g * a).sum()
    if a_s == 0:
        return uniform.to(guardedness.dtype)
    r = beta * a_mean.abs() / a_s.abs()
    return ((g - 1.0 / n) * r + 1.0 / n).to(guardedness.dtype)


def global_norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm over a list of tensors: per-tensor norms in their dtype, combined in float64 (no upcast copies)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


def _accumulate(accumulated, params, share):
    grads = [None if p.grad is None else p.grad * share if share != 1 else p.grad for p in params]
    if accumulated is None:
        return grads
    return [a if g is None else g if a is None else a + g for a, g in zip(accumulated, grads, strict=True)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
