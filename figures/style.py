"""The look shared by every figure: one-column size, fonts, the fixed colour of each optimizer, axis scales, saving.

Colours follow the SAM variant of a run's label (``adamw+fsam`` → ``fsam``) and line styles its base optimizer, from
the Okabe–Ito palette (readable by colour-blind readers and in greyscale print), so that the same optimizer has the
same colour in every figure of every report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator

from landscape.core.atomic import write_with
from optimizers.variants import VARIANTS

COLUMN_WIDTH_IN = 3.3  # one column of a two-column paper
PANEL_HEIGHT_IN = 2.3

# SAM variant → colour (Okabe–Ito), from the optimizer registry. "none" is the plain base optimizer.
VARIANT_COLOURS = {name: variant.colour for name, variant in VARIANTS.items()}
# Labels outside the table get one of these, chosen from the label's characters so that it never changes.
SPARE_COLOURS = ("#882255", "#44AA99", "#999933", "#AA4499", "#332288", "#117733", "#88CCEE", "#DDCC77")
# Base optimizer → line style.
OPTIMIZER_LINESTYLES = {"adamw": "-", "adam": "--", "amsgrad": "-.", "adagrad": ":", "sgd": (0, (5, 1, 1, 1))}
OPTIMIZER_MARKERS = {"adamw": "o", "adam": "s", "amsgrad": "^", "adagrad": "v", "sgd": "D"}

RC_PARAMS = {
    "font.size": 8,
    "axes.titlesize": 8,
    "figure.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "savefig.dpi": 300,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text, editable and searchable
    "figure.constrained_layout.use": True,
}
FORMATS = ("pdf", "png")


def split_label(label: str) -> tuple[str, str]:
    """``"adamw+fsam"`` → ``("adamw", "fsam")``; ``"adamw"`` → ``("adamw", "none")``."""
    optimizer, _, variant = label.partition("+")
    return optimizer, (variant or "none")


def run_label(optimizer: str | None, sam: str | None) -> str:
    """The label of a run from its ``optimizer`` and ``sam`` config values, as ``Run.label`` builds it."""
    optimizer = optimizer or "?"
    return optimizer if sam in (None, "", "none") else f"{optimizer}+{sam}"


def optimizer_colour(label: str) -> str:
    """The fixed colour of an optimizer label (by its SAM variant; unknown variants by a stable checksum)."""
    _, variant = split_label(label)
    if variant in VARIANT_COLOURS:
        return VARIANT_COLOURS[variant]
    return SPARE_COLOURS[sum(variant.encode()) % len(SPARE_COLOURS)]


def optimizer_style(label: str) -> dict:
    """Matplotlib keyword arguments (colour, line style, marker) for the runs of one optimizer label."""
    optimizer, _ = split_label(label)
    return {
        "color": optimizer_colour(label),
        "linestyle": OPTIMIZER_LINESTYLES.get(optimizer, "-"),
        "marker": OPTIMIZER_MARKERS.get(optimizer, "o"),
    }


@contextmanager
def paper_style() -> Iterator[None]:
    """Small fonts and thin lines that stay readable at one-column width (~3.3 in)."""
    with plt.rc_context(RC_PARAMS):
        yield


def styled(function):
    """Run a figure function under :func:`paper_style` (fonts are read when each text is created)."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        with paper_style():
            return function(*args, **kwargs)

    return wrapper


def new_figure(
    rows: int = 1, cols: int = 1, *, height: float | None = None, sharex: bool = False, **subplot_kw
) -> tuple[Figure, np.ndarray]:
    """A one-column figure with ``rows × cols`` panels; the axes come back as a flat array."""
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH_IN, height or PANEL_HEIGHT_IN * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharex=sharex, subplot_kw=subplot_kw or None)
    return fig, axes.ravel()


def finite(values) -> np.ndarray:
    """``values`` as float64 with ±inf turned into NaN, so plots leave gaps instead of drawing or clipping them."""
    array = np.array(values, dtype=np.float64)
    array[~np.isfinite(array)] = np.nan
    return array


def choose_scale(values: Iterable[float], *, decades: float = 2.0) -> str:
    """``"log"`` when the finite values are positive and span at least ``decades`` decades, ``"symlog"`` when they
    change sign and their magnitudes span that much, else ``"linear"``."""
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    array = array[np.isfinite(array)]
    if array.size < 2:
        return "linear"
    magnitudes = np.abs(array[array != 0])
    if magnitudes.size < 2 or np.log10(magnitudes.max() / magnitudes.min()) < decades:
        return "linear"
    return "log" if (array > 0).all() else "symlog"


def apply_scale(ax, axis: str, values, *, decades: float = 2.0) -> str:
    """Set ``ax``'s ``axis`` ("x" or "y") to :func:`choose_scale` of ``values``; returns the scale."""
    scale = choose_scale(values, decades=decades)
    kwargs = {}
    if scale == "symlog":
        array = np.abs(np.asarray(values, dtype=np.float64).ravel())
        array = array[np.isfinite(array) & (array > 0)]
        kwargs["linthresh"] = float(np.percentile(array, 10)) if array.size else 1.0
    (ax.set_xscale if axis == "x" else ax.set_yscale)(scale, **kwargs)
    if scale == "log":  # at most ~6 labelled decades, so that a one-column panel stays readable
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(LogLocator(base=10, numticks=6))
    return scale


def save_figure(fig: Figure, stem: str | os.PathLike[str], formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``stem.pdf`` (vector) and ``stem.png`` (300 dpi), each atomically; returns the paths."""
    written = []
    for fmt in formats:
        path = Path(f"{os.fspath(stem)}.{fmt}")
        with paper_style():
            write_with(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt))
        written.append(path)
    return written


def slug(text: str) -> str:
    """``text`` reduced to letters, digits, ``.``, ``_``, ``-`` and ``+`` for use in file names."""
    cleaned = "".join(c if c.isalnum() or c in "._+-" else "-" for c in text).strip("-.")
    return cleaned or "figure"
