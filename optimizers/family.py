"""Names of the optimizer family and how each is built from a base optimizer.

| name        | what it is                                                                         |
|-------------|------------------------------------------------------------------------------------|
| none        | the base optimizer alone                                                           |
| sam         | SAM (Foret et al. 2021)                                                            |
| asam        | adaptive SAM, T = abs(w) + η (Kwon et al. 2021)                                    |
| esam        | stochastic weight perturbation (β) + sharpness-sensitive data selection (γ)        |
| gsam        | surrogate-gap guided SAM (α), ρ following the learning rate (Zhuang et al. 2022)   |
| fsam        | SAM with a Fisher mask on ε, refreshed by the trainer (FSAM paper, Eq. 6)          |
| delta-sam   | SAM with instance-reweighted ascent (δ-SAM paper, Eqs. 3–6)                        |

Efficient SAM (Bahri et al. 2022) is any of them with ``ascent_fraction < 1`` (or ``m_sharpness > 1``); the Fisher
mask composes with every variant (F-ESAM, F-GSAM, ...) through ``SharpnessAware.set_mask``.
"""

from __future__ import annotations

import torch

from optimizers.closure import ClosureOptimizer
from optimizers.sam import SharpnessAware

SAM_VARIANTS = ("none", "sam", "asam", "esam", "gsam", "fsam", "delta-sam")


def make_sharpness_optimizer(
    variant: str,
    base: torch.optim.Optimizer,
    *,
    rho: float = 0.05,
    eta: float = 0.01,
    ascent_fraction: float = 1.0,
    m_sharpness: int = 1,
    exact_rho: bool = False,
    esam_beta: float = 0.6,
    esam_gamma: float = 0.5,
    beta: float = 5.0,
    gsam_alpha: float = 0.1,
    rho_min: float = 0.0,
    same_dropout: bool = False,
    seed: int = 0,
    max_grad_norm: float | None = None,
) -> ClosureOptimizer:
    """Wrap ``base`` as the named ``variant`` (one of :data:`SAM_VARIANTS`)."""
    if variant not in SAM_VARIANTS:
        raise ValueError(f"sam variant {variant!r} is unknown; expected one of {', '.join(SAM_VARIANTS)}")
    if variant == "none":
        return ClosureOptimizer(base, max_grad_norm=max_grad_norm)
    options = {
        "rho": rho,
        "eta": eta,
        "ascent_fraction": ascent_fraction,
        "m_sharpness": m_sharpness,
        "exact_rho": exact_rho,
        "rho_min": rho_min,
        "same_dropout": same_dropout,
        "seed": seed,
        "max_grad_norm": max_grad_norm,
    }
    if variant == "asam":
        options["adaptive"] = True
    elif variant == "esam":
        options.update(swp_keep=esam_beta, sds_fraction=esam_gamma)
    elif variant == "gsam":
        options["gsam_alpha"] = gsam_alpha
    elif variant == "delta-sam":
        options["delta_beta"] = beta
    return SharpnessAware(base, **options)
