"""The ADM evaluation suite's sample file: one .npz whose `arr_0` is uint8 (N, H, W, 3)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["write_adm_npz", "read_adm_npz", "iter_adm_npz"]


def _check(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: ADM samples must be uint8, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{where}: ADM samples must be NHWC with 3 channels (N, H, W, 3), got shape {arr.shape}")
    return arr


def write_adm_npz(path: str | Path, images: np.ndarray | Iterable[np.ndarray]) -> Path:
    """Write uint8 NHWC images (one array, or an iterable of (B, H, W, 3) batches) as `arr_0`.

    Uses np.savez (uncompressed), the format `np.load(path)["arr_0"]` in the ADM evaluator reads."""
    arr = images if isinstance(images, np.ndarray) else np.concatenate([_check(np.asarray(b), "batch") for b in images])
    _check(arr, str(path))
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"ADM sample files end in .npz, got {path}")
    np.savez(path, arr_0=arr)
    return path


def read_adm_npz(path: str | Path) -> np.ndarray:
    """Load `arr_0` from an ADM sample file and validate it (uint8, (N, H, W, 3))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ADM sample file not found: {path}")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no 'arr_0' (keys: {data.files}); not an ADM sample/reference batch")
        return _check(data["arr_0"], str(path))


def iter_adm_npz(path: str | Path, batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield (B, H, W, 3) uint8 batches of an ADM sample file."""
    arr = read_adm_npz(path)
    for i in range(0, len(arr), batch_size):
        yield arr[i:i + batch_size]
