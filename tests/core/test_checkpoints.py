"""Safetensors checkpoints: round trip, pickle refusal (without unpickling), architecture mismatch."""

import pickle

import pytest
import torch
from torch import nn

from landscape.core.errors import CheckpointError
from landscape.models.weights import load_weights_into, read_safetensors, save_weights


def small(width: int = 3) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


def test_round_trip_is_bitwise(tmp_path):
    source, target = small(), small()
    target[0].weight.data.add_(1.0)
    save_weights(tmp_path / "w.safetensors", source, {"landscape": "test"})
    load_weights_into(target, tmp_path / "w.safetensors")
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


class _Boom:
    """Unpickling this would create a file: proof that a refused pickle was never loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["weights.bin", "weights.safetensors"])
def test_pickles_are_refused_without_being_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match=r"pickle|not a safetensors"):
        read_safetensors(path)
    assert not marker.exists()


def test_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small().state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        read_safetensors(path)


def test_other_architecture_is_refused_with_the_difference(tmp_path):
    save_weights(tmp_path / "w.safetensors", small(width=3))
    with pytest.raises(CheckpointError, match=r"other shape \(e\.g\. 0\.bias \(3,\) vs \(5,\)\)"):
        load_weights_into(small(width=5), tmp_path / "w.safetensors")
    save_weights(tmp_path / "v.safetensors", nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(CheckpointError, match="missing"):
        load_weights_into(small(width=3), tmp_path / "v.safetensors")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_safetensors(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_safetensors(garbage)


def test_a_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The header length is little-endian: its first byte may be 0x80, pickle's protocol marker."""
    from safetensors.torch import save_file

    path = tmp_path / "d.safetensors"
    for padding in range(300):
        save_file({"x": torch.zeros(2)}, str(path), metadata={"pad": "p" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_safetensors(path)["x"].shape == (2,)


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    from landscape.core.atomic import write_text

    write_text(tmp_path / "report.html", "<p>")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o666 & ~mask
