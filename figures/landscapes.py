"""Loss landscapes: 2-D contours and 3-D surfaces (FSAM Fig. 4), 1-D surfaces and interpolations (FSAM Fig. 5).

Grid orientation follows docs/results.md: ``loss[j, i]`` is the value at ``θ + a[i]·d1 + b[j]·d2`` (rows = b,
columns = a), which is what ``contourf(a, b, loss)`` and ``plot_surface(*meshgrid(a, b), loss)`` expect. Cells that
are not finite (not computed, or a diverged loss) are masked: they leave a gap, never a zero.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.mplot3d.art3d import Poly3DCollection

from figures.sources import ResultRecord, as_result_record, legend_labels
from figures.style import PANEL_HEIGHT_IN, apply_scale, choose_scale, finite, new_figure, optimizer_style, styled
from landscape.core.errors import ConfigError
from landscape.core.results import Result

Source = ResultRecord | Result | str | os.PathLike[str]
X_LABEL = "α (along direction 1)"
Y_LABEL = "β (along direction 2)"


def _value_name(record: ResultRecord, values: str) -> str:
    if values == "loss":
        return "loss"
    if values == "metric":
        return record.metric_name
    raise ConfigError(f"values must be 'loss' or 'metric', got {values!r}")


def _grid(record: ResultRecord, values: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(a, b, z)`` of a 2-D surface with non-finite cells as NaN; z has shape (len(b), len(a))."""
    if "b" not in record.arrays:
        raise ConfigError(f"{record.path} is a 1-D surface; plot it with surface_curves")
    a, b = finite(record.arrays["a"]), finite(record.arrays["b"])
    z = finite(record.arrays[values])
    if z.shape != (len(b), len(a)):
        raise ConfigError(f"{record.path}: {values} has shape {z.shape}, expected {(len(b), len(a))} (rows = b)")
    return a, b, z


def _title(record: ResultRecord) -> str:
    """Label and task; a grid not yet complete says how much of it is there, as the interactive figure does."""
    title = f"{record.label} · {record.task}"
    done = record.arrays.get("done")
    if done is not None and not record.meta.get("complete", True):
        done = np.asarray(done)
        title += f" (partial: {int(done.sum())}/{done.size} cells)"
    return title


def _degenerate_grid(ax, a: np.ndarray, b: np.ndarray, z: np.ndarray, record: ResultRecord, name: str) -> None:
    """A grid one cell wide has no area: draw its single row (or column) as a curve."""
    x, y, xlabel = (a, z[0], X_LABEL) if len(b) == 1 else (b, z[:, 0], Y_LABEL)
    ax.plot(x, y, **optimizer_style(record.label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name)
    apply_scale(ax, "y", y)
    ax.set_title(f"{_title(record)} (grid {len(b)}×{len(a)})")


def shared_range(sources: Sequence[Source], values: str = "loss") -> tuple[float, float] | None:
    """The (min, max) of the finite cells of several 2-D surfaces: one colour scale and z range for all of them,
    so that surfaces compared side by side are not each stretched to their own range (None: no finite cell)."""
    cells = [finite(as_result_record(s, "surface").arrays[values]).ravel() for s in sources]
    cells = [c[np.isfinite(c)] for c in cells]
    cells = [c for c in cells if c.size]
    if not cells:
        return None
    joined = np.concatenate(cells)
    return float(joined.min()), float(joined.max())


@styled
def surface_contour(
    source: Source, *, values: str = "loss", levels: int = 16, value_range: tuple[float, float] | None = None
) -> Figure:
    """FSAM Fig. 4 (left): filled contours of a 2-D surface; x = α along direction 1, y = β along direction 2,
    colour = loss (or the metric), on a log colour scale when the values span two decades. The solution θ is at
    (0, 0), marked with a cross. ``value_range``: the colour scale's (min, max), shared by surfaces compared side
    by side (:func:`shared_range`); default the surface's own."""
    record = as_result_record(source, "surface")
    name = _value_name(record, values)
    a, b, z = _grid(record, values)
    fig, (ax,) = new_figure(height=2.8)
    if len(a) < 2 or len(b) < 2:
        _degenerate_grid(ax, a, b, z, record, name)
        return fig
    masked = np.ma.masked_invalid(z)
    if masked.count() == 0:
        ax.text(0.5, 0.5, "no computed cells", ha="center", va="center", transform=ax.transAxes)
    else:
        low, high = (float(masked.min()), float(masked.max())) if value_range is None else value_range
        norm = None
        if choose_scale(masked.compressed() if value_range is None else np.array(value_range)) == "log":
            norm = LogNorm(low, high)
            contour_levels = np.geomspace(low, high, levels)
        elif high > low:
            contour_levels = MaxNLocator(levels).tick_values(low, high)
        else:  # a constant surface: one band around the value
            spread = 1e-9 * (abs(low) + 1)
            contour_levels = np.array([low - spread, high + spread])
        filled = ax.contourf(a, b, masked, levels=contour_levels, norm=norm, cmap="viridis", extend="neither")
        ax.contour(a, b, masked, levels=filled.levels, colors="black", linewidths=0.3, alpha=0.6, norm=norm)
        colourbar = fig.colorbar(filled, ax=ax, shrink=0.9)
        colourbar.set_label(name)
        if masked.count() < z.size / 2:  # mostly NaN: the colours describe a few cells, say so where they show
            ax.text(0.5, 0.97, f"only {masked.count()} of {z.size} cells finite", ha="center", va="top",
                    transform=ax.transAxes, fontsize=7, color="black", backgroundcolor="white")  # fmt: skip
    if a.min() <= 0 <= a.max() and b.min() <= 0 <= b.max():
        ax.plot([0], [0], marker="+", color="white", markersize=7, markeredgewidth=1.5, linestyle="none")
    ax.set_xlim(np.nanmin(a), np.nanmax(a))
    ax.set_ylim(np.nanmin(b), np.nanmax(b))
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(_title(record))
    return fig


def surface_quads(a: np.ndarray, b: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quads of a grid whose four corners are all finite, as (n, 4, 3) vertices in (α, β, z), and each quad's
    mean height; a quad touching a non-finite cell is left out, so the surface has a hole there."""
    corners = np.stack([z[:-1, :-1], z[:-1, 1:], z[1:, 1:], z[1:, :-1]], axis=-1)  # (n_b - 1, n_a - 1, 4)
    keep = np.isfinite(corners).all(axis=-1)
    grid_a, grid_b = np.meshgrid(a, b)  # (n_b, n_a), the layout of z: rows = b
    xs = np.stack([grid_a[:-1, :-1], grid_a[:-1, 1:], grid_a[1:, 1:], grid_a[1:, :-1]], axis=-1)
    ys = np.stack([grid_b[:-1, :-1], grid_b[:-1, 1:], grid_b[1:, 1:], grid_b[1:, :-1]], axis=-1)
    quads = np.stack([xs[keep], ys[keep], corners[keep]], axis=-1)
    return quads, corners[keep].mean(axis=-1)


@styled
def surface_3d(source: Source, *, values: str = "loss", value_range: tuple[float, float] | None = None) -> Figure:
    """FSAM Fig. 4 (right): the 2-D surface drawn in 3-D; x = α, y = β, height = loss (log10 of it when the values
    span two decades, since 3-D axes have no log scale). Non-finite cells are transparent gaps. ``value_range``:
    the z range and colour scale shared with other surfaces (:func:`shared_range`); default the surface's own."""
    record = as_result_record(source, "surface")
    name = _value_name(record, values)
    a, b, z = _grid(record, values)
    if len(a) < 2 or len(b) < 2:
        fig, (ax,) = new_figure()
        _degenerate_grid(ax, a, b, z, record, name)
        return fig
    fig, (ax,) = new_figure(height=3.0, projection="3d")
    positive = z[np.isfinite(z)] if value_range is None else np.array(value_range)
    log = choose_scale(positive) == "log"
    if log:
        z = np.log10(z)
        name = f"log10 {name}"
    quads, heights = surface_quads(a, b, z)
    if value_range is not None:
        shared = np.log10(np.array(value_range)) if log else np.array(value_range)
        norm = Normalize(float(shared[0]), float(shared[1]))
    else:
        norm = Normalize(*(np.nanmin(heights), np.nanmax(heights)) if len(heights) else (0, 1))
    faces = Poly3DCollection(
        quads, facecolors=colormaps["viridis"](norm(heights)), edgecolors=(0, 0, 0, 0.2), linewidths=0.1
    )
    faces.set_array(heights)  # the height behind each face's colour, for the colour bar (and for tests)
    faces.set_cmap("viridis")
    faces.set_norm(norm)
    ax.add_collection3d(faces)
    ax.set_xlim(a.min(), a.max())
    ax.set_ylim(b.min(), b.max())
    if len(heights):
        low, high = (float(np.nanmin(z)), float(np.nanmax(z))) if value_range is None else (norm.vmin, norm.vmax)
        spread = high - low or 1e-9 * (abs(low) + 1)  # a flat surface still gets a z range
        ax.set_zlim(low - 0.02 * spread, high + 0.02 * spread)
    else:
        ax.text2D(0.5, 0.5, "no computed cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("α", labelpad=-6)
    ax.set_ylabel("β", labelpad=-6)
    ax.set_zlabel(name, labelpad=2)
    ax.set_box_aspect(None, zoom=0.88)  # keeps the z label inside the figure
    ax.tick_params(pad=-2)
    ax.view_init(elev=30, azim=-60)
    ax.set_title(_title(record))
    return fig


def _curves(records: Sequence[ResultRecord], x_name: str, x_label: str, panels: Sequence[str]) -> Figure:
    fig, axes = new_figure(len(panels), 1, height=PANEL_HEIGHT_IN * len(panels) * 0.85, sharex=True)
    labels = legend_labels(records)
    for ax, values in zip(axes, panels, strict=True):
        plotted = []
        for record, label in zip(records, labels, strict=True):
            x = finite(record.arrays[x_name])
            y = finite(record.arrays[values])
            style = optimizer_style(record.label)
            if len(x) > 25:
                style["marker"] = None
            ax.plot(x, y, label=label, **style)
            plotted.append(y)
        if values == "loss":  # a metric stays linear: it is bounded and may be negative
            apply_scale(ax, "y", np.concatenate(plotted) if plotted else np.array([]))
        metric_names = sorted({record.metric_name for record in records})
        ax.set_ylabel("loss" if values == "loss" else " / ".join(metric_names))
    axes[-1].set_xlabel(x_label)
    axes[0].legend(loc="best")
    tasks = sorted({record.task for record in records})
    axes[0].set_title(" / ".join(tasks))
    return fig


@styled
def surface_curves(sources: Sequence[Source], *, panels: Sequence[str] = ("loss", "metric")) -> Figure:
    """1-D surfaces of several runs on one axis (Li et al. 2018 Fig. 1 style); x = α along the random direction,
    y = loss (log scale when it spans two decades) and, in a second panel, the metric."""
    records = [as_result_record(source, "surface") for source in sources]
    for record in records:
        if "b" in record.arrays:
            raise ConfigError(f"{record.path} is a 2-D surface; plot it with surface_contour or surface_3d")
    return _curves(records, "a", "α (along the direction)", panels)


@styled
def interpolation_curves(sources: Sequence[Source], *, panels: Sequence[str] = ("loss", "metric")) -> Figure:
    """FSAM Fig. 5: 1-D linear interpolation θ(α) = θ1 + α(θ1 − θ0) of several runs on one axis; x = α (0 is the
    fine-tuned θ1, −1 the initial θ0, both marked), y = loss (log scale when it spans two decades) and the metric."""
    records = [as_result_record(source, "interpolation") for source in sources]
    fig = _curves(records, "alpha", "α   (θ1 + α(θ1 − θ0); 0 = θ1, −1 = θ0)", panels)
    fig.axes[0].set_title(fig.axes[0].get_title(), pad=12)  # room for the θ0 / θ1 marks above the axes
    alphas = np.concatenate([finite(r.arrays["alpha"]) for r in records])
    for ax in fig.axes:
        for where, text in ((0.0, "θ1"), (-1.0, "θ0")):
            if np.nanmin(alphas) <= where <= np.nanmax(alphas):
                ax.axvline(where, color="0.6", linewidth=0.6, linestyle=":", zorder=0)
                if ax is fig.axes[0]:
                    ax.annotate(
                        text,
                        (where, 1.0),
                        xycoords=("data", "axes fraction"),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="0.4",
                    )
    return fig
