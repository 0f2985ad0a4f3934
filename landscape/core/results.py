"""The one results format of the toolkit: ``<directory>/result.npz`` (arrays) + ``<directory>/meta.json``.

Every analysis (surface, interpolation, Hessian, Fisher, sharpness, transfer) saves a :class:`Result`, and
``figures/`` reads nothing else. Arrays are stored with ``np.savez`` and loaded with ``allow_pickle=False``, so a
result file can never run code; object arrays are refused when saving.

Writes are atomic and ordered: ``result.npz`` is written under a temporary name and renamed, then ``meta.json``
(which records the SHA-256 of ``result.npz``) the same way. A directory with a ``meta.json`` whose digest matches its
``result.npz`` is therefore consistent; :func:`load_result` refuses any other. A kill between the two renames leaves
a complete new ``result.npz`` beside the previous ``meta.json`` of the same computation: :func:`resume_or_start`
resumes from those arrays (nothing computed is lost), everything else refuses them.

Grids (surfaces and sweeps) of Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", are stored as:

- ``a``: shape (n_a,), the coefficients of the first direction; ``b``: shape (n_b,), of the second (2-D only);
- ``loss`` and ``metric``: shape (n_b, n_a) for a 2-D surface, ``loss[j, i]`` at ``θ + a[i]·d1 + b[j]·d2``
  (rows = b, columns = a, as ``matplotlib.contour(a, b, loss)`` expects), or shape (n_a,) for a 1-D curve;
- ``done``: bool, the shape of ``loss``: which cells were computed. A cell not computed is NaN *and* not done;
  a computed cell may hold any value, negative or NaN (a diverged loss), so "missing" is never read from the
  values themselves (docs/pitfalls.md §8). A rerun computes the cells where ``done`` is False.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from landscape.core.atomic import write_text, write_with
from landscape.core.errors import CheckpointError, ConfigError

ARRAYS_FILE = "result.npz"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, eq=False)
class Result:
    """An analysis result: its ``kind`` (e.g. "surface"), named numpy ``arrays`` and JSON ``meta``.

    ``meta`` holds the parameters of the analysis (checkpoint content hash, directions, data selection, seed, wall
    time…); :func:`save_result` adds ``kind``, ``versions``, ``git_revision`` and ``saved_at`` unless given.
    """

    kind: str
    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _NAME.match(self.kind):
            raise ConfigError(f"result kind must be a name such as 'surface', got {self.kind!r}")
        arrays = {}
        for name, value in self.arrays.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"result array names must be plain names (letters, digits, _ . -), got {name!r}")
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise ConfigError(f"result array {name!r} has dtype object; results are stored without pickle")
            arrays[name] = array
        # Own copies of the mappings, so that the caller's dicts cannot change a frozen result behind its back.
        object.__setattr__(self, "arrays", arrays)
        object.__setattr__(self, "meta", dict(self.meta))


def new_grid(shape: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, done)`` for a grid of ``shape``: float64 NaN everywhere and a bool mask of False."""
    return np.full(shape, np.nan, dtype=np.float64), np.zeros(shape, dtype=bool)


def pending_cells(done: np.ndarray) -> list[tuple[int, ...]]:
    """Indices of the cells still to compute, in row-major order (for a 2-D surface: ``(j, i)`` = (b, a))."""
    return [tuple(int(x) for x in index) for index in np.argwhere(~np.asarray(done, dtype=bool))]


def check_grid(arrays: Mapping[str, np.ndarray], values: tuple[str, ...] = ("loss", "metric")) -> None:
    """Check the grid layout documented above; raise :class:`CheckpointError` on the first violation.

    ``values`` are the names of the value arrays present (those missing are skipped); every one must have the
    grid's shape, and be NaN wherever ``done`` is False.
    """
    if "a" not in arrays or "done" not in arrays:
        raise CheckpointError("a grid needs the arrays 'a' and 'done'")
    a = np.asarray(arrays["a"])
    shape = (len(np.asarray(arrays["b"])), len(a)) if "b" in arrays else (len(a),)
    done = np.asarray(arrays["done"])
    if done.dtype != np.bool_ or done.shape != shape:
        raise CheckpointError(f"grid 'done' must be bool of shape {shape} (rows = b, columns = a), got {done.shape}")
    for name in values:
        if name not in arrays:
            continue
        value = np.asarray(arrays[name])
        if value.shape != shape:
            raise CheckpointError(f"grid {name!r} has shape {value.shape}, expected {shape} (rows = b, columns = a)")
        if not np.isnan(value[~done]).all():
            raise CheckpointError(f"grid {name!r} has values in cells not marked done; not computed must be NaN")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_npz(arrays: Mapping[str, np.ndarray], tmp: Path) -> None:
    # Through a file handle: given a name, np.savez would append ".npz" to the temporary file's name.
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def save_result(result: Result, directory: str | os.PathLike[str]) -> Result:
    """Write ``result`` to ``directory`` (created if needed) atomically; return it with the completed ``meta``."""
    if result.meta.get("kind", result.kind) != result.kind:
        raise ConfigError(f"result meta says kind {result.meta['kind']!r} but the result is {result.kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"kind": result.kind, "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # Versions and revision cost a git call: a caller that saves often (a resumable grid) passes them in meta.
    if "versions" not in result.meta or "git_revision" not in result.meta:
        from landscape.core.provenance import environment_versions, git_revision  # imports torch: only when needed

        meta.setdefault("versions", result.meta.get("versions") or environment_versions())
        meta.setdefault("git_revision", result.meta.get("git_revision") or git_revision())
    meta.update(result.meta)
    # Serialise before touching the directory, so that bad metadata does not cost the previous result.
    meta["format_version"] = FORMAT_VERSION
    meta["arrays"] = {name: {"shape": list(v.shape), "dtype": v.dtype.str} for name, v in result.arrays.items()}
    try:
        json.dumps(meta, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"result meta must be plain JSON (NaN belongs in the arrays): {exc}") from exc

    # Arrays first, meta.json (with their digest) last: each rename is atomic, and a kill between them leaves a
    # digest mismatch that load_result detects.
    write_with(directory / ARRAYS_FILE, lambda tmp: _write_npz(result.arrays, tmp))
    meta["arrays_sha256"] = _sha256(directory / ARRAYS_FILE)
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n"
    write_text(directory / META_FILE, text)
    return Result(result.kind, result.arrays, json.loads(text))


def load_result(directory: str | os.PathLike[str], *, accept_newer_arrays: bool = False) -> Result:
    """Read a result written by :func:`save_result`; a missing, incomplete or corrupt one raises CheckpointError.

    ``accept_newer_arrays``: when ``result.npz`` does not match the digest in ``meta.json`` (a save killed between
    its two renames), return the arrays anyway with that meta (for :func:`resume_or_start` only).
    """
    directory = Path(directory)
    meta_path, arrays_path = directory / META_FILE, directory / ARRAYS_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} has no {META_FILE}: not a result directory, or its save was interrupted")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not readable JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        raise CheckpointError(f"{meta_path} has no 'kind'; not a result written by this toolkit")
    if not arrays_path.is_file():
        raise CheckpointError(f"{directory} has {META_FILE} but no {ARRAYS_FILE}")
    expected = meta.get("arrays_sha256")
    if expected is not None and _sha256(arrays_path) != expected and not accept_newer_arrays:
        raise CheckpointError(f"{arrays_path} does not match its {META_FILE} (modified, or an interrupted save)")
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        message = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{arrays_path} is not a readable npz without pickles: {message}") from exc
    try:
        return Result(meta["kind"], arrays, meta)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc


def _plain(value: Any) -> Any:
    """``value`` as the JSON round trip gives it back, for comparing identities read from disk with new ones."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def resume_or_start(directory: str | os.PathLike[str], kind: str, identity: Mapping[str, Any], *, overwrite: bool):
    """The result already in ``directory`` to resume from, or None to start afresh.

    ``identity`` holds every parameter that determines the result's values (checkpoint hash, grid, directions,
    data selection...). A result of the same kind and identity is returned (complete or not, see its
    ``meta["complete"]``); another one raises :class:`ConfigError` naming the first differing parameter, unless
    ``overwrite``, which deletes it.
    """
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        return None
    try:
        existing = load_result(directory, accept_newer_arrays=True)
    except CheckpointError:
        if not overwrite:
            raise
        existing = None
    if existing is not None and existing.kind == kind and existing.meta.get("identity") == _plain(identity):
        return existing
    if not overwrite:
        old = existing.meta.get("identity", {}) if existing is not None else {}
        new = _plain(identity)
        if existing is not None and existing.kind != kind:
            difference = f"it holds a {existing.kind!r} result, not {kind!r}"
        else:
            key = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), "?")
            difference = f"{key} was {old.get(key)!r}, now {new.get(key)!r}"
        raise ConfigError(f"{directory} holds a result with other parameters ({difference}); "
                          "choose another --out or pass --overwrite")  # fmt: skip
    (directory / META_FILE).unlink(missing_ok=True)
    (directory / ARRAYS_FILE).unlink(missing_ok=True)
    return None
