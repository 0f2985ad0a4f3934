"""The registry of the sharpness-aware family: each variant's pieces, paper and figure colour (torch-free).

Everything that lists variants reads :data:`VARIANTS`: the trainer and the CLI's ``--sam`` choices and options,
the figures' colours (``figures`` imports this module without torch) and the conformance suite of the tests.
Adding a variant is one line here, plus a piece in :mod:`optimizers.pieces` when it needs a new one (LookSAM
needed :class:`~optimizers.pieces.LookAhead`); :func:`optimizers.sam.make_sharpness_optimizer` builds any entry.

Efficient SAM (Bahri et al. 2022) is any variant with ``ascent_fraction < 1`` (or ``m_sharpness > 1``), options of
the core, not a variant. The Fisher mask composes with every variant (F-ESAM, F-GSAM, ...): each lists the
``FisherMask`` piece, which does nothing until the trainer installs a mask; ``fsam`` is SAM whose mask the trainer
installs and refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: settings of the core that every variant accepts, besides its pieces' hyperparameters and options
CORE_SETTINGS = ("rho", "ascent_fraction", "m_sharpness", "same_dropout")


@dataclass(frozen=True)
class Variant:
    """One entry of the registry.

    ``pieces`` names the classes of :mod:`optimizers.pieces` in the order the step runs them; ``mask``: the trainer
    installs and refreshes a Fisher mask; ``colour``: its colour in every figure (Okabe–Ito palette).
    """

    name: str
    title: str
    paper: str
    colour: str
    pieces: tuple[str, ...] | None  # None: the base optimizer alone
    mask: bool = False
    same_dropout: bool = False  # the trainer's default: replay the ascent's dropout masks in the descent pass

    @property
    def settings(self) -> tuple[str, ...]:
        """Names of its pieces' hyperparameters and options, in order (imports torch: the pieces are tensor code)."""
        from optimizers import pieces

        classes = [getattr(pieces, piece) for piece in self.pieces or ()]
        return tuple(name for cls in classes for name in (*cls.hyperparameters, *cls.options))


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("none", "base optimizer", "", "#000000", None),
        Variant("sam", "SAM", "Foret et al. 2021", "#0072B2", ("FisherMask",)),
        Variant("asam", "ASAM", "Kwon et al. 2021", "#E69F00", ("WeightScaled", "FisherMask")),
        # ESAM selects the examples whose loss rose most from w to w + ε: with two dropout masks, that is mostly
        # the masks' difference, so its two passes share them by default.
        Variant(
            "esam",
            "ESAM",
            "Du et al. 2022",
            "#56B4E9",
            ("FisherMask", "BernoulliKeep", "DataSelection"),
            same_dropout=True,
        ),
        Variant("gsam", "GSAM", "Zhuang et al. 2022", "#CC79A7", ("FisherMask", "SurrogateGap")),
        Variant("fsam", "FSAM", "Zhong et al. 2022", "#D55E00", ("FisherMask",), mask=True),
        Variant("delta-sam", "δ-SAM", "Zhou et al. 2022", "#009E73", ("InstanceReweighting", "FisherMask")),
        Variant("looksam", "LookSAM", "Liu et al. 2022", "#F0E442", ("FisherMask", "LookAhead")),
    )
}
SAM_VARIANTS = tuple(VARIANTS)


def get_variant(name: str) -> Variant:
    """The registry entry ``name``; ``ValueError`` names the choices."""
    if name not in VARIANTS:
        raise ValueError(f"sam variant {name!r} is unknown; expected one of {', '.join(SAM_VARIANTS)}")
    return VARIANTS[name]
