"""Weight files: the sha256 that names them and checks checkpoint files, and the atomic write."""
import hashlib
from pathlib import Path

import pytest

from rae.weights_io import sha256_file, write_atomically


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
