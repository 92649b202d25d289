"""Weight files on a local disk: read safely (safetensors, or torch files with ``weights_only=True``,
never pickle), written atomically, and named by the sha256 of their bytes."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file; a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped. A file that cannot be read as weights is a ``ValueError``
    naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    loaded = _read_torch_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise ValueError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


_WHAT_TO_PASS = "pass a .safetensors file or a state dict saved with torch.save"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"weights file {path} is not a readable safetensors file ({_first_line(err)}): it is "
                         f"truncated, damaged or not weights at all; download it again or {_WHAT_TO_PASS}") from err


def _read_torch_file(path: Path) -> object:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickles."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise ValueError(f"weights file {path} pickles Python objects besides tensors ({refused.group(1)}), "
                             f"which rae does not load (torch.load weights_only=True); {_WHAT_TO_PASS} "
                             f"of the model's tensors only") from err
        raise ValueError(f"weights file {path} is neither a safetensors file nor a torch file (its bytes are not a "
                         f"torch pickle); {_WHAT_TO_PASS}") from err
    except (RuntimeError, EOFError) as err:  # a damaged zip archive; an empty file
        reason = _first_line(err) or "the file is empty"
        raise ValueError(f"weights file {path} is not a readable torch file ({reason}): it is truncated, damaged "
                         f"or not weights at all; download it again or {_WHAT_TO_PASS}") from err


def _first_line(error: BaseException) -> str:
    """The first sentence of a library's error message, without the advice that follows it."""
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(error).strip())  # torch's C++ location
    return text.splitlines()[0].split(". ")[0].rstrip(".")[:200] if text else ""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a temporary file in the same folder, then rename it over ``path``: readers see
    the old file or the whole new one, and a failed write leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
