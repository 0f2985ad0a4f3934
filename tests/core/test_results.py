"""The results format: bitwise round trips, NaN + done grids (docs/pitfalls.md §8), orientation, refusing bad files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from landscape.core import results
from landscape.core.errors import CheckpointError, ConfigError
from landscape.core.results import Result, check_grid, load_result, new_grid, pending_cells, save_result


def surface(n_a: int = 7, n_b: int = 5) -> Result:
    """A partly computed 2-D surface over an analytic function, with negative metric values."""
    a, b = np.linspace(-1.0, 1.0, n_a), np.linspace(-0.5, 2.0, n_b)
    loss, done = new_grid((n_b, n_a))
    metric, _ = new_grid((n_b, n_a))
    for j, i in pending_cells(done)[: n_a * n_b - 4]:
        loss[j, i] = a[i] ** 2 + 3 * b[j] ** 2
        metric[j, i] = -a[i] * b[j]  # a metric may be negative: never a "missing" sentinel
        done[j, i] = True
    return Result("surface", {"a": a, "b": b, "loss": loss, "metric": metric, "done": done}, {"seed": 3})


def test_round_trip_is_bitwise_and_meta_is_filled(tmp_path):
    original = surface()
    original_arrays = dict(original.arrays)
    original_arrays["counts"] = np.arange(6, dtype=np.int16).reshape(2, 3)
    original = Result("surface", original_arrays, {"seed": 3, "theta_hash": "abc"})
    saved = save_result(original, tmp_path / "run" / "analyses" / "surface-1")
    loaded = load_result(tmp_path / "run" / "analyses" / "surface-1")

    assert loaded.kind == "surface"
    assert loaded.arrays.keys() == original.arrays.keys()
    for name, array in original.arrays.items():
        back = loaded.arrays[name]
        assert back.dtype == array.dtype and back.shape == array.shape
        assert back.tobytes() == array.tobytes(), name  # bitwise, NaN included
    assert loaded.meta == saved.meta
    meta = loaded.meta
    assert meta["kind"] == "surface" and meta["seed"] == 3 and meta["theta_hash"] == "abc"
    assert {"torch", "numpy", "python"} <= set(meta["versions"])
    assert "git_revision" in meta and meta["saved_at"].endswith("+00:00")
    assert meta["arrays"]["loss"] == {"shape": [5, 7], "dtype": "<f8"}
    assert sorted(p.name for p in (tmp_path / "run" / "analyses" / "surface-1").iterdir()) == [
        "meta.json",
        "result.npz",
    ]


def test_given_meta_is_kept(tmp_path):
    save_result(Result("sweep", {"x": np.zeros(2)}, {"saved_at": "yesterday", "git_revision": "r1"}), tmp_path)
    meta = load_result(tmp_path).meta
    assert meta["saved_at"] == "yesterday" and meta["git_revision"] == "r1"
    with pytest.raises(ConfigError, match="kind"):
        save_result(Result("sweep", {}, {"kind": "surface"}), tmp_path / "other")


def test_grid_nan_and_done_round_trip_and_resume(tmp_path):
    result = surface()
    save_result(result, tmp_path)
    loaded = load_result(tmp_path)
    loss, done = loaded.arrays["loss"], loaded.arrays["done"]
    assert done.dtype == np.bool_ and int(done.sum()) == 31
    assert np.isnan(loss[~done]).all() and np.isfinite(loss[done]).all()
    assert (loaded.arrays["metric"][done] < 0).any()
    # A rerun computes exactly the cells not done, whatever their values.
    assert pending_cells(done) == [(4, 3), (4, 4), (4, 5), (4, 6)]
    check_grid(loaded.arrays)


def test_new_grid_is_nan_and_not_done():
    values, done = new_grid((3, 4))
    assert values.dtype == np.float64 and values.shape == (3, 4) and np.isnan(values).all()
    assert done.dtype == np.bool_ and done.shape == (3, 4) and not done.any()
    line, line_done = new_grid(5)
    assert line.shape == line_done.shape == (5,)
    assert pending_cells(line_done) == [(i,) for i in range(5)]


def test_grid_orientation_on_a_non_square_grid():
    result = surface(7, 5)
    a, b, loss, done = (result.arrays[k] for k in ("a", "b", "loss", "done"))
    assert loss.shape == (len(b), len(a)) == (5, 7)  # rows = b, columns = a
    for j in range(len(b)):
        for i in range(len(a)):
            if done[j, i]:
                assert loss[j, i] == a[i] ** 2 + 3 * b[j] ** 2
    check_grid(result.arrays)
    with pytest.raises(CheckpointError, match=r"expected \(5, 7\)"):
        check_grid({**result.arrays, "loss": loss.T.copy(), "done": done})
    sentinel = loss.copy()
    sentinel[~done] = -1.0
    with pytest.raises(CheckpointError, match="not computed must be NaN"):
        check_grid({**result.arrays, "loss": sentinel})
    one_d, one_done = new_grid(4)
    check_grid({"a": np.arange(4.0), "loss": one_d, "done": one_done})


def test_result_refuses_pickles_bad_names_and_non_json_meta(tmp_path):
    with pytest.raises(ConfigError, match="object"):
        Result("surface", {"x": np.array([{"a": 1}], dtype=object)}, {})
    with pytest.raises(ConfigError, match="kind"):
        Result("bad kind/../x", {}, {})
    with pytest.raises(ConfigError, match="array names"):
        Result("surface", {"a/b": np.zeros(1)}, {})
    save_result(surface(), tmp_path)
    with pytest.raises(ConfigError, match="plain JSON"):
        save_result(Result("surface", {"x": np.zeros(1)}, {"best": float("nan")}), tmp_path)
    assert load_result(tmp_path).arrays.keys() == surface().arrays.keys()  # the previous result is untouched


def test_result_is_frozen_and_owns_its_mappings():
    arrays, meta = {"x": np.zeros(2)}, {"seed": 1}
    result = Result("surface", arrays, meta)
    arrays["y"], meta["seed"] = np.ones(1), 2
    assert set(result.arrays) == {"x"} and result.meta["seed"] == 1
    with pytest.raises(AttributeError):
        result.kind = "other"  # type: ignore[misc]


def test_load_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"no meta\.json"):
        load_result(tmp_path / "nothing")
    save_result(surface(), tmp_path / "r")
    meta_path, npz_path = tmp_path / "r" / "meta.json", tmp_path / "r" / "result.npz"

    npz_path.write_bytes(npz_path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not match"):
        load_result(tmp_path / "r")
    meta = json.loads(meta_path.read_text())
    del meta["arrays_sha256"]  # without the digest the npz reader itself must refuse the torn file
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable npz"):
        load_result(tmp_path / "r")

    npz_path.unlink()
    with pytest.raises(CheckpointError, match=r"no result\.npz"):
        load_result(tmp_path / "r")
    meta_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_result(tmp_path / "r")
    meta_path.write_text("[]")
    with pytest.raises(CheckpointError, match="no 'kind'"):
        load_result(tmp_path / "r")


def test_load_never_unpickles(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    np.savez(folder / "result.npz", x=np.array([{"a": 1}], dtype=object))  # an object array is a pickle
    with zipfile.ZipFile(folder / "result.npz") as archive:
        assert archive.namelist() == ["x.npy"]
    (folder / "meta.json").write_text(json.dumps({"kind": "surface"}))
    with pytest.raises(CheckpointError, match="without pickles"):
        load_result(folder)


def test_interrupted_save_keeps_the_previous_result_and_leaves_no_temporary(tmp_path, monkeypatch):
    first = save_result(surface(), tmp_path)

    def crash(arrays, tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(results, "_write_npz", crash)
    with pytest.raises(OSError, match="disk full"):
        save_result(surface(), tmp_path)
    # The arrays are renamed into place only once written: the previous, consistent pair is still there.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "result.npz"]
    assert load_result(tmp_path).meta["arrays_sha256"] == first.meta["arrays_sha256"]


def test_a_save_killed_between_its_two_renames_loses_nothing_on_resume(tmp_path):
    """save_result renames result.npz, then meta.json; a kill in between leaves new arrays beside the old meta."""
    import shutil

    from landscape.core.results import resume_or_start

    identity = {"grid": [3]}
    loss, done = new_grid(3)
    loss[0], done[0] = 1.5, True
    partial = {"a": np.arange(3.0), "loss": loss.copy(), "done": done.copy()}
    save_result(Result("surface", partial, {"identity": identity, "complete": False}), tmp_path / "r")
    loss[1], done[1] = -2.0, True
    newer = {"a": np.arange(3.0), "loss": loss, "done": done}
    save_result(Result("surface", newer, {"identity": identity, "complete": False}), tmp_path / "next")
    shutil.copyfile(tmp_path / "next" / "result.npz", tmp_path / "r" / "result.npz")  # the first rename only

    with pytest.raises(CheckpointError, match="does not match"):
        load_result(tmp_path / "r")
    resumed = resume_or_start(tmp_path / "r", "surface", identity, overwrite=False)
    assert resumed is not None and resumed.arrays["done"].tolist() == [True, True, False]
    assert resumed.arrays["loss"][1] == -2.0
