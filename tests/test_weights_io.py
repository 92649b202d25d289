"""sha256_file: the digest that names weight files and checks checkpoint files."""
import hashlib
from pathlib import Path

from rae.weights_io import sha256_file


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
