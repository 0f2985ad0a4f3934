"""Export of landscape surfaces to VTK for ParaView, through meshio (no hand-written XML).

A 2-D surface becomes a flat structured grid: point ``j·n_a + i`` at ``(a[i], b[j], 0)``, quads between neighbouring
points, and ``loss``, ``metric`` and ``done`` as point data (NaN kept: not computed or diverged). In ParaView, "Warp By
Scalar" on ``loss`` lifts it into a 3-D surface. A 1-D surface (or a grid one cell wide) becomes a polyline.
"""

from __future__ import annotations

import os
from pathlib import Path

import meshio
import numpy as np

from figures.sources import ResultRecord, as_result_record
from landscape.core.atomic import write_with
from landscape.core.errors import ConfigError
from landscape.core.results import Result

Source = ResultRecord | Result | str | os.PathLike[str]
VTK_FORMATS = {".vtu": "vtu", ".vtk": "vtk"}


def surface_mesh(source: Source) -> meshio.Mesh:
    """The surface as a :class:`meshio.Mesh`: points in (α, β, 0), quads (or lines), point data loss/metric/done."""
    record = as_result_record(source, "surface")
    arrays = record.arrays
    a = np.asarray(arrays["a"], dtype=np.float64)
    b = np.asarray(arrays["b"], dtype=np.float64) if "b" in arrays else np.zeros(1)
    n_a, n_b = len(a), len(b)
    grid_a, grid_b = np.meshgrid(a, b)  # (n_b, n_a): point j·n_a + i is (a[i], b[j])
    points = np.column_stack([grid_a.ravel(), grid_b.ravel(), np.zeros(n_a * n_b)])
    index = np.arange(n_a * n_b).reshape(n_b, n_a)
    if n_a > 1 and n_b > 1:
        quads = np.stack(
            [index[:-1, :-1].ravel(), index[:-1, 1:].ravel(), index[1:, 1:].ravel(), index[1:, :-1].ravel()], axis=1
        )
        cells = [("quad", quads)]
    else:
        line = index.ravel()
        cells = [("line", np.column_stack([line[:-1], line[1:]]))] if len(line) > 1 else [("vertex", line[:, None])]
    point_data = {}
    for name in ("loss", "metric"):
        if name in arrays:
            point_data[name] = np.asarray(arrays[name], dtype=np.float64).reshape(-1)
    if "done" in arrays:
        point_data["done"] = np.asarray(arrays["done"], dtype=np.uint8).reshape(-1)
    return meshio.Mesh(points, cells, point_data=point_data)


def export_surface_vtk(source: Source, path: str | os.PathLike[str]) -> Path:
    """Write the surface as ``.vtu`` (VTK XML unstructured grid) or legacy ``.vtk``, chosen by the suffix, atomically;
    open it in ParaView."""
    path = Path(path)
    file_format = VTK_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise ConfigError(f"{path}: a VTK file must end in .vtu or .vtk")
    mesh = surface_mesh(source)
    write_with(path, lambda tmp: meshio.write(tmp, mesh, file_format=file_format))
    return path
