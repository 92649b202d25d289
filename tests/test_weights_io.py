"""Weight files: the sha256 that names them and checks checkpoint files, and the atomic write."""
import hashlib
from pathlib import Path

import pytest
import torch

from rae.weights_io import read_state_dict, sha256_file, write_atomically


def test_digest_of_a_file_larger_than_one_read_block(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * 4096 + 3)  # ~5 MiB: several 1 MiB blocks and a short tail
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == sha256_file(path)


def test_digest_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    path.write_bytes(b"old")
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


class NotATensor:
    """Pickled into a torch file: an object ``torch.load(weights_only=True)`` must refuse."""


@pytest.mark.parametrize("name, content, reason", [
    ("junk.safetensors", b"garbage garbage garbage garbage", "is not a readable safetensors file "
                                                             r"\(Error while deserializing header: header too large\)"),
    ("empty.safetensors", b"", "is not a readable safetensors file"),
    ("junk.pt", b"garbage garbage garbage", "is neither a safetensors file nor a torch file"),
    ("empty.pt", b"", r"is not a readable torch file \(the file is empty\)"),
])
def test_a_file_that_is_not_weights_is_named_with_what_is_wrong(tmp_path: Path, name, content, reason) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^weights file {path} {reason}.*pass a .safetensors file") as raised:
        read_state_dict(path)
    assert "\n" not in str(raised.value)


def test_a_truncated_torch_file_is_named(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save({"weight": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"^weights file {cut} is not a readable torch file "
                                         r"\(PytorchStreamReader failed reading zip archive.*\): it is truncated"):
        read_state_dict(cut)


def test_a_torch_file_pickling_objects_is_refused_naming_the_object(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match=f"^weights file {path} pickles Python objects besides tensors "
                                         r"\(.*NotATensor\), which rae does not load"):
        read_state_dict(path)
