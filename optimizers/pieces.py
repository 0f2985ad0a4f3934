"""The pieces a sharpness-aware step is composed of (:class:`optimizers.sam.SharpnessAware` runs them).

A step's ascent builds ε = ρ · s(g) / ‖n(g)‖₂ from the ascent gradient g, with one global norm over every
parameter: it starts from s = n = g and lets each *ascent piece* transform the pair, in the order the variant lists
them; the normalisation to radius ρ comes last and is the core's. *Descent-side* pieces act around the descent
pass (which examples it uses, how its gradient is combined with g, whether it runs at all), and an *instance
weighting* piece reweights the ascent's per-example losses. Every piece is a :class:`Piece` that overrides only the
hooks it needs; its hyperparameters live in the optimizer's ``param_groups`` (so a scheduler or a user may change
them between steps, and ``state_dict`` saves them), with the defaults it declares in ``hyperparameters``.

- ascent pieces: :class:`WeightScaled` (ASAM, Kwon et al. 2021: s ← T²s, n ← Tn, T = abs(w) + η);
  :class:`FisherMask` (FSAM Eq. 6: s ← m ⊙ s, also n ← m ⊙ n with ``exact_rho``; masks keyed by parameter name);
  :class:`BernoulliKeep` (ESAM's stochastic weight perturbation, Du et al. 2022: s ← s ⊙ Bernoulli(β) / β);
- descent pieces: :class:`DataSelection` (ESAM: descend on the γ·b examples whose loss rose most under ε);
  :class:`SurrogateGap` (GSAM, Zhuang et al. 2022: g_adv − α g_⊥, ρ following the learning rate);
  :class:`LookAhead` (LookSAM, Liu et al. 2022: a SAM step every k steps, g + α (‖g‖/‖g_v‖) g_v in between);
- instance weighting: :class:`InstanceReweighting` (δ-SAM Eqs. 3–6: ascent on Σ g'_i l_i, g' from a probe).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from optimizers import rng


@dataclass
class Ascent:
    """What the ascent pieces transform, one entry per parameter (None where the parameter has no gradient).

    ``numerators`` is s(g) and ``norm_terms`` n(g); both start as the gradients themselves (no copy), so a piece
    replaces an entry with a new tensor and never writes into one in place. ``groups[i]`` is the parameter group of
    ``params[i]``, where the pieces read their hyperparameters; ``generator`` is the optimizer's own.
    """

    params: list[torch.Tensor]
    names: list[str | None]
    groups: list[dict[str, Any]]
    numerators: list[torch.Tensor | None]
    norm_terms: list[torch.Tensor | None]
    generator: torch.Generator
    #: 0/1 masks the numerators are multiplied by last, after the norm and in place (None: no mask; default: none
    #: for every parameter). Products with 0 or 1 are exact in any order, and every piece's transform is
    #: elementwise, so a masking piece gives the same ε without a tensor g ⊙ m beside g (one copy of the weights
    #: less at FSAM's peak).
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.masks:
            self.masks = [None] * len(self.params)


def same_layout(held: torch.Tensor | None, like: torch.Tensor) -> bool:
    """Whether a tensor held from step to step can still take values shaped like ``like`` (shape, dtype, device)."""
    return held is not None and held.shape == like.shape and held.dtype == like.dtype and held.device == like.device


class Piece:
    """One composable part of a sharpness-aware step; every hook is a no-op unless a piece overrides it."""

    #: hyperparameter name -> default; installed in every parameter group that lacks it.
    hyperparameters: ClassVar[dict[str, float]] = {}
    #: constructor options (not schedulable: they choose a form, not a value), set from settings of these names
    options: ClassVar[tuple[str, ...]] = ()
    #: its coefficients need the losses of the whole batch before any backward (no gradient accumulation)
    whole_batch: ClassVar[bool] = False
    #: it overrides :meth:`select` (the descent's examples are chosen from the losses of the whole batch)
    selects: ClassVar[bool] = False

    def check(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming a hyperparameter of ``group`` that is out of range."""

    def check_core(self, *, ascent_fraction: float, m_sharpness: int) -> None:
        """Raise ``ValueError`` if the piece cannot work with these core options."""

    def rho(self, rho: float, group: Mapping[str, Any]) -> float:
        """The radius of this step for ``group`` (a schedule); ``rho`` is the group's configured value."""
        return rho

    def instance_probe(self, optimizer: Any, closure: Callable, chunk: torch.Tensor | None) -> torch.Tensor | None:
        """Per-example losses of a probe taken before the ascent forward (None: this piece does not weight)."""
        return None

    def instance_weights(self, probe: torch.Tensor, losses: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
        """The ascent's per-example weights, shape [B'], from the probe and the losses at w (both detached)."""
        raise NotImplementedError

    def statistics(self, weights: torch.Tensor) -> dict[str, float]:
        """Numbers about the weights for the step's log (``StepReport.extra``)."""
        return {}

    def ascent(self, ascent: Ascent) -> None:
        """Transform ``ascent.numerators`` / ``ascent.norm_terms`` (see :class:`Ascent`)."""

    def perturbs(self, optimizer: Any) -> bool:
        """Whether this step takes the perturbed pass (False: :meth:`reuse` makes the gradient instead)."""
        return True

    def reuse(self, params: list[torch.Tensor], group: Mapping[str, Any]) -> None:
        """On a step without perturbed pass, turn the ascent gradient in ``p.grad`` into the descent gradient."""

    def select(self, perturbed: torch.Tensor, at_w: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor | None:
        """Indices of the examples the descent uses (None: all of them)."""
        return None

    def combine(self, params: list[torch.Tensor], ascent_grads: list, group: Mapping[str, Any]) -> None:
        """After the descent backward: change ``p.grad`` (the gradient at w + ε) using the ascent gradient."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def release_buffers(self) -> None:
        """Free storage held from step to step for speed only (not state: the next step rebuilds it)."""


def _in_range(group: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = True) -> None:
    value = group[name]
    ok = (low < value if low_open else low <= value) and value <= high and math.isfinite(value)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")


class WeightScaled(Piece):
    """ASAM (Kwon et al. 2021): the perturbation region scales with the weights, T = abs(w) + η (η = ``eta``).

    ``exempt_biases``: as the authors' code, only parameters whose name contains ``weight`` are scaled; the others
    (biases) keep T = 1. By default every parameter is scaled, as the paper's T_w writes it.
    """

    hyperparameters: ClassVar[dict[str, float]] = {"eta": 0.01}
    options: ClassVar[tuple[str, ...]] = ("asam_exempt_biases",)

    def __init__(self, *, asam_exempt_biases: bool = False) -> None:
        self.exempt_biases = asam_exempt_biases

    def check(self, group):
        if not group["eta"] >= 0:
            raise ValueError(f"eta must be >= 0, got {group['eta']}")

    def ascent(self, ascent):
        for i, (param, numerator) in enumerate(zip(ascent.params, ascent.numerators, strict=True)):
            if numerator is None:
                continue
            if self.exempt_biases:
                name = ascent.names[i]
                if name is None:
                    raise ValueError("asam_exempt_biases needs the parameters' names: pass named_parameters=")
                if "weight" not in name:
                    continue
            scale = param.detach().abs().add_(ascent.groups[i]["eta"])
            ascent.numerators[i] = torch.mul(numerator, scale).mul_(scale)
            ascent.norm_terms[i] = ascent.norm_terms[i] * scale


class FisherMask(Piece):
    """FSAM Eq. 6: ε = ρ (g ⊙ m) / ‖g‖ with a bool mask m per parameter, keyed by parameter name.

    The mask is computed elsewhere (``analyses.fisher``) and installed with :meth:`set`; until then this piece does
    nothing, and parameters without a mask entry are not perturbed. ``exact_rho`` masks the norm too, so ‖ε‖ = ρ
    instead of Eq. 6's ‖ε‖ ≤ ρ.
    """

    options: ClassVar[tuple[str, ...]] = ("exact_rho",)

    def __init__(self, *, exact_rho: bool = False) -> None:
        self.exact_rho = exact_rho
        self.masks: dict[str, torch.Tensor] = {}

    def set(self, mask: Mapping[str, torch.Tensor], named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Install ``mask`` (True = perturbed); parameters of ``named_parameters`` absent from it get all-False."""
        masks = {}
        for name, param in named_parameters:
            if name in mask:
                value = mask[name]
                if value.shape != param.shape:
                    raise ValueError(f"mask of {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                masks[name] = value.to(device=param.device, dtype=torch.bool).clone()
            else:
                masks[name] = torch.zeros_like(param, dtype=torch.bool)
        self.masks = masks

    def ascent(self, ascent):
        if not self.masks:
            return
        for i, (name, numerator) in enumerate(zip(ascent.names, ascent.numerators, strict=True)):
            mask = self.masks.get(name) if name is not None else None
            if numerator is None or mask is None:
                continue
            held = ascent.masks[i]
            ascent.masks[i] = mask if held is None else held & mask
            if self.exact_rho:
                ascent.norm_terms[i] = ascent.norm_terms[i] * mask

    def state_dict(self):
        return {"masks": dict(self.masks)}

    def load_state_dict(self, state):
        self.masks = {str(name): value.to(torch.bool) for name, value in state.get("masks", {}).items()}


class BernoulliKeep(Piece):
    """ESAM's stochastic weight perturbation (Du et al. 2022): keep each coordinate of s with probability β
    (``esam_beta``) and divide by β, so E[ε] is SAM's; the draws come from the optimizer's generator."""

    hyperparameters: ClassVar[dict[str, float]] = {"esam_beta": 0.6}

    def check(self, group):
        _in_range(group, "esam_beta", 0.0, 1.0)

    def ascent(self, ascent):
        entries = zip(ascent.params, ascent.numerators, ascent.groups, strict=True)
        for i, (param, numerator, group) in enumerate(entries):
            keep_probability = group["esam_beta"]
            if numerator is None or keep_probability >= 1:
                continue
            # cpu: drawn from the optimizer's CPU generator (the same draws on every device), moved next line
            keep = torch.rand(param.shape, generator=ascent.generator) < keep_probability
            ascent.numerators[i] = (numerator * keep.to(numerator.device)).div_(keep_probability)


class DataSelection(Piece):
    """ESAM's sharpness-sensitive data selection: the descent uses the ceil(γ·b) examples (γ = ``esam_gamma``)
    with the largest l_i(w + ε) − l_i(w)."""

    hyperparameters: ClassVar[dict[str, float]] = {"esam_gamma": 0.5}
    whole_batch: ClassVar[bool] = True
    selects: ClassVar[bool] = True

    def check(self, group):
        _in_range(group, "esam_gamma", 0.0, 1.0)

    def check_core(self, *, ascent_fraction, m_sharpness):
        if ascent_fraction != 1 or m_sharpness != 1:
            raise ValueError(
                "ESAM's data selection needs the losses at w of the whole batch: "
                "use it with ascent_fraction = 1 and m = 1"
            )

    def select(self, perturbed, at_w, group):
        fraction = group["esam_gamma"]
        if fraction == 1:
            return None
        count = max(1, math.ceil(fraction * perturbed.numel()))
        return torch.topk(perturbed - at_w, count, sorted=False).indices.sort().values


class SurrogateGap(Piece):
    """GSAM (Zhuang et al. 2022): descend on g_adv − α g_⊥, where g = g_∥ + g_⊥ is the ascent gradient decomposed
    along g_adv (α = ``gsam_alpha``); ρ follows the learning rate: ρ_t = ρ_min + (ρ − ρ_min) · lr_t / lr_peak."""

    hyperparameters: ClassVar[dict[str, float]] = {"gsam_alpha": 0.1, "rho_min": 0.0}

    def check(self, group):
        if not group["gsam_alpha"] >= 0:
            raise ValueError(f"gsam_alpha must be >= 0, got {group['gsam_alpha']}")
        if not 0 <= group["rho_min"] <= group["rho"]:
            raise ValueError(f"rho_min must be in [0, rho = {group['rho']}], got {group['rho_min']}")

    def rho(self, rho, group):
        peak = group.get("initial_lr", group["lr"])
        progress = group["lr"] / peak if peak > 0 else 0.0
        return group["rho_min"] + (rho - group["rho_min"]) * progress

    def combine(self, params, ascent_grads, group):
        adv = [p.grad for p in params]
        pairs = [(g, a) for g, a in zip(ascent_grads, adv, strict=True) if g is not None and a is not None]
        dot = sum(float(torch.vdot(g.flatten(), a.flatten())) for g, a in pairs)
        adv_sq = sum(float(torch.vdot(a.flatten(), a.flatten())) for _, a in pairs)
        coefficient = dot / adv_sq if adv_sq > 0 else 0.0
        alpha = group["gsam_alpha"]
        for g, a in pairs:
            orthogonal = g - coefficient * a
            a.sub_(alpha * orthogonal)


class LookAhead(Piece):
    """LookSAM (Liu et al. 2022, Alg. 1): every k-th step (k = ``looksam_k``, counting from the first) is a SAM
    step that also stores g_v = g_s − (g·g_s / ‖g‖²) g, the part of the SAM gradient g_s orthogonal to the plain
    gradient g; the k − 1 steps in between take no perturbed pass and descend on g + α (‖g‖ / ‖g_v‖) g_v
    (α = ``looksam_alpha``). g_v is this piece's state, one tensor per parameter position (like torch's state).
    """

    hyperparameters: ClassVar[dict[str, float]] = {"looksam_k": 5, "looksam_alpha": 0.7}

    def __init__(self) -> None:
        self.directions: dict[int, torch.Tensor] = {}  # parameter position -> g_v

    def check(self, group):
        k = group["looksam_k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"looksam_k must be an int >= 1, got {k!r}")
        if not group["looksam_alpha"] >= 0:
            raise ValueError(f"looksam_alpha must be >= 0, got {group['looksam_alpha']}")

    def check_core(self, *, ascent_fraction, m_sharpness):
        if ascent_fraction != 1 or m_sharpness != 1:
            raise ValueError("LookSAM reuses the full-batch gradient: use it with ascent_fraction = 1 and m = 1")

    def perturbs(self, optimizer):
        return optimizer.steps_taken % optimizer.param_groups[0]["looksam_k"] == 0 or not self.directions

    def combine(self, params, ascent_grads, group):
        pairs = [(i, p, g) for i, (p, g) in enumerate(zip(params, ascent_grads, strict=True)) if g is not None]
        pairs = [(i, p, g) for i, p, g in pairs if p.grad is not None]
        dot = sum(float(torch.vdot(g.flatten(), p.grad.flatten())) for _, p, g in pairs)
        g_sq = sum(float(torch.vdot(g.flatten(), g.flatten())) for _, _, g in pairs)
        coefficient = dot / g_sq if g_sq > 0 else 0.0
        directions = {i: param.grad - coefficient * g for i, param, g in pairs}
        # When g_s is parallel to g (ρ = 0, a quadratic bowl), g_v is the rounding error of g_s − c·g; rescaled to
        # α‖g‖ it would add a random direction. Below a few hundred ulps of ‖g_s‖ it is taken to be zero.
        g_s_norm = global_norm([p.grad for _, p, _ in pairs])
        dtype = pairs[0][1].grad.dtype if pairs else torch.float32
        if global_norm(list(directions.values())) <= 256 * torch.finfo(dtype).eps * g_s_norm:
            directions = {i: torch.zeros_like(g_v) for i, g_v in directions.items()}
        self.directions = directions

    def reuse(self, params, group):
        stored = [(p, self.directions[i]) for i, p in enumerate(params) if p.grad is not None and i in self.directions]
        v_norm = global_norm([g_v for _, g_v in stored])
        if v_norm == 0:  # g_s was parallel to g: the orthogonal part to add is zero
            return
        factor = group["looksam_alpha"] * global_norm([p.grad for p, _ in stored]) / v_norm
        for param, g_v in stored:
            param.grad.add_(g_v.to(param.grad.device), alpha=factor)

    def state_dict(self):
        return {"directions": {str(i): g_v for i, g_v in self.directions.items()}}

    def load_state_dict(self, state):
        self.directions = {int(i): g_v for i, g_v in state.get("directions", {}).items()}


class InstanceReweighting(Piece):
    """δ-SAM (Eqs. 3–6): the ascent descends Σ g'_i l_i instead of the mean, with g'_i from the loss changes
    a_i = l_i(w + ρ ê/‖ê‖) − l_i(w) under one random Gaussian direction ê (β = ``delta_beta``).

    Dropout: the probe forward at w + ρê/‖ê‖ and the ascent forward at w draw the *same* dropout masks (the RNG
    state is replayed), so a_i measures the weight perturbation and not the difference of two masks, which on a
    tiny BERT with dropout 0.1 was ~20 times larger (docs/pitfalls.md §25). ``delta_weights``: ``"clipped"``
    (default) sets the negative g'_i that Eq. 6 gives when r > 1 to 0 and renormalises to Σ g' = 1, since a
    reweighted risk needs weights ≥ 0;
    ``"literal"`` keeps Eq. 6 as printed (docs/pitfalls.md §26). The fraction of negative g'_i is logged per step.
    """

    hyperparameters: ClassVar[dict[str, float]] = {"delta_beta": 5.0}
    options: ClassVar[tuple[str, ...]] = ("delta_weights",)
    whole_batch: ClassVar[bool] = True
    WEIGHTINGS = ("clipped", "literal")

    def __init__(self, *, delta_weights: str = "clipped") -> None:
        if delta_weights not in self.WEIGHTINGS:
            raise ValueError(f"delta_weights must be one of {', '.join(self.WEIGHTINGS)}, got {delta_weights!r}")
        self.clipped = delta_weights == "clipped"
        self._negative = 0.0
        self.guardedness: torch.Tensor | None = None  # the last step's a_j, for logs and tests
        # ê's storage, kept from step to step: drawing into held tensors costs half of drawing fresh ones on the
        # CPU (a fresh block over 32 MiB is mapped anew each time, and its pages fault in as the draws fill it).
        self._draws: list[torch.Tensor] = []  # cpu: what the optimizer's CPU generator fills
        self._directions: list[torch.Tensor] = []  # on each parameter's device (the draws themselves on the CPU)

    def check(self, group):
        if not group["delta_beta"] >= 0:
            raise ValueError(f"delta_beta must be >= 0, got {group['delta_beta']}")

    def instance_probe(self, optimizer, closure, chunk):
        params = optimizer.parameters()
        radius = optimizer.radius(optimizer.param_groups[0])
        directions = self._draw(params, optimizer.generator)
        norm = global_norm(directions)
        if norm > 0:
            torch._foreach_mul_(directions, radius / norm)
        epsilon = directions if norm > 0 else [None] * len(params)
        masks = rng.snapshot(params)
        with optimizer.perturbed(epsilon):
            probe = closure(chunk).detach()
        rng.restore(masks)  # the ascent forward at w, next, draws the probe's dropout masks
        return probe

    def release_buffers(self):
        self._draws, self._directions = [], []

    def _draw(self, params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """ê ~ N(0, I) shaped like ``params``, drawn from the optimizer's CPU generator (the same draws on every
        device, and the numbers ``torch.randn(shape, generator=generator)`` gives), into the held tensors."""
        fits = len(self._directions) == len(params) and all(
            same_layout(d, p) for d, p in zip(self._directions, params, strict=True)
        )
        if not fits:
            self._draws = [torch.empty(p.shape, dtype=p.dtype) for p in params]  # cpu: the generator's device
            self._directions = [
                draw if p.device.type == "cpu" else torch.empty_like(p)
                for draw, p in zip(self._draws, params, strict=True)
            ]
        for draw, direction in zip(self._draws, self._directions, strict=True):
            draw.normal_(generator=generator)
            if direction is not draw:
                direction.copy_(draw)
        return self._directions

    def instance_weights(self, probe, losses, group):
        self.guardedness = probe - losses
        weights = delta_sam_weights(self.guardedness, group["delta_beta"])
        self._negative = float((weights < 0).double().mean())
        if self.clipped and self._negative > 0:
            weights = weights.clamp(min=0)
            weights = weights / weights.sum()
        return weights

    def statistics(self, weights):
        return {"negative_weight_fraction": self._negative}


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
    """L2 norm over a list of tensors: per-tensor norms in their dtype (one fused ``_foreach_norm`` per device and
    dtype), combined in float64 (no upcast copies) with one host synchronisation per device."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_kind.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    total = 0.0
    for group in by_kind.values():
        norms = torch.stack(torch._foreach_norm(group)).double()
        total += float(norms.square().sum())
    return math.sqrt(total)
