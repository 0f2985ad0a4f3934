"""Interactive 3-D surfaces with plotly, as self-contained HTML (plotly.js embedded: works offline).

``z[j][i]`` of a plotly surface is drawn at ``(x[i], y[j])``, the same layout as ``loss[j, i]`` at ``(a[i], b[j])``,
so the arrays go in untransposed. Non-finite cells go in as NaN, which plotly leaves as gaps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from figures.sources import ResultRecord, as_result_record
from figures.style import finite
from landscape.core.atomic import write_text
from landscape.core.errors import ConfigError
from landscape.core.results import Result

Source = ResultRecord | Result | str | os.PathLike[str]


def surface_plotly(
    source: Source, *, values: str = "loss", value_range: tuple[float, float] | None = None
) -> go.Figure:
    """FSAM Fig. 4 as an interactive plotly surface: x = α (direction 1), y = β (direction 2), z = loss or metric.

    ``value_range``: the colour scale and z axis shared with the other surfaces shown beside it."""
    record = as_result_record(source, "surface")
    if "b" not in record.arrays:
        raise ConfigError(f"{record.path} is a 1-D surface; an interactive 3-D surface needs a 2-D one")
    if values not in ("loss", "metric"):
        raise ConfigError(f"values must be 'loss' or 'metric', got {values!r}")
    a, b, z = finite(record.arrays["a"]), finite(record.arrays["b"]), finite(record.arrays[values])
    name = "loss" if values == "loss" else record.metric_name
    figure = go.Figure(
        go.Surface(
            x=a,
            y=b,
            z=z,
            colorscale="Viridis",
            **({} if value_range is None else {"cmin": value_range[0], "cmax": value_range[1]}),
            colorbar={"title": {"text": name}},
            name=record.label,
            hovertemplate="α=%{x:.3g}<br>β=%{y:.3g}<br>" + name + "=%{z:.4g}<extra></extra>",
        )
    )
    finite_cells = int(np.isfinite(z).sum())
    figure.update_layout(
        title={"text": f"{record.label} · {record.task} ({finite_cells} of {z.size} cells computed)"},
        scene={
            "xaxis_title": "α (direction 1)",
            "yaxis_title": "β (direction 2)",
            "zaxis": {"title": {"text": name}, **({} if value_range is None else {"range": list(value_range)})},
        },
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        height=520,
    )
    return figure


def surface_html_fragment(
    source: Source, *, values: str = "loss", include_plotlyjs: bool = True, div_id=None, value_range=None
) -> str:
    """A ``<div>`` with the interactive surface, for embedding; ``include_plotlyjs`` inlines plotly.js (needed once
    per page)."""
    return surface_plotly(source, values=values, value_range=value_range).to_html(
        full_html=False, include_plotlyjs=include_plotlyjs, div_id=div_id, config={"displaylogo": False}
    )


def write_surface_html(source: Source, path: str | os.PathLike[str], *, values: str = "loss", value_range=None) -> Path:
    """Write the interactive surface as one self-contained HTML file (plotly.js inlined, no network), atomically."""
    path = Path(path)
    html = surface_plotly(source, values=values, value_range=value_range).to_html(
        full_html=True, include_plotlyjs=True, config={"displaylogo": False}
    )
    write_text(path, html)
    return path
