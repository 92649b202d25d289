"""fsspec URLs for every artifact: resolve, join, list, and write files atomically.

Credentials and endpoints come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...)
or from explicit ``storage_options`` passed through to fsspec; nothing here reads a secret itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

StorageOptions = dict[str, Any]


def resolve(url: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for ``url`` (a bare path means the local disk)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"expected a non-empty storage URL or path, got {url!r}")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL (with protocol) of ``path`` on ``fs``."""
    return fs.unstrip_protocol(path)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for filesystems other processes (Ray workers) cannot see, such as ``memory://``."""
    return isinstance(fs, MemoryFileSystem)


def is_local_disk(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing so readers see either the old file or the whole new one.

    On a local disk the data goes to a temporary sibling that is renamed over the target on success
    (a killed writer leaves only a ``.tmp-*`` file nobody reads), and a write the disk refuses (full,
    read-only) names ``path``. Object stores (S3, GCS) publish an
    object only when its upload completes, so writing in place is already atomic there.
    """
    if is_local_disk(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if err.errno is None or err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror, path) from err  # a failed write() names no file: name it
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as handle:
            yield handle


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with open_atomic(fs, path) as handle:
        handle.write(data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read().decode())


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists, without a stale listing cache (s3fs caches directory listings).

    Only "not found" is False: ``fs.exists`` also answers False when the storage cannot be asked at all
    (s3fs, for a bucket on an unreachable endpoint), which reads as a missing file; here that raises.
    """
    fs.invalidate_cache(path)
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    return True
