"""fsspec URLs for every artifact: resolve, join, list, and write files atomically.

Credentials and endpoints come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...)
or from explicit ``storage_options`` passed through to fsspec; nothing here reads a secret itself.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
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


# ---------------------------------------------------------------- faults as one line

_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                "ProxyConnectionError")


def is_bare_os_error(error: BaseException) -> bool:
    """An OSError as the OS raised it (``[Errno 17] File exists: '…'``), not one whose message we wrote."""
    return isinstance(error, OSError) and error.errno is not None and error.filename is not None


def describe_storage_fault(error: BaseException, urls: Iterable[str] = ()) -> str | None:
    """One line naming the location and what to do, for a storage fault anywhere among ``error``'s causes
    (through Ray's task and UDF wrappers); None when there is none.

    ``urls`` are the locations the command was given: a missing S3 credential or an unreachable endpoint
    names no object, so the message names the command's remote URLs; an OS error names its own path.
    """
    remote = ", ".join(u for u in urls if "://" in u and not u.startswith(("file://", "memory://"))) or "S3"
    for cause in _causes(error):
        if type(cause).__module__.startswith("botocore"):
            line = _s3_fault({cls.__name__ for cls in type(cause).__mro__}, str(cause), remote)
        elif is_bare_os_error(cause):
            line = _os_fault(cause)
        else:
            line = _fault_in_worker_traceback(_worker_traceback(cause), remote)
        if line is not None:
            return line
    return None


def _s3_fault(names: set[str], message: str, remote: str) -> str | None:
    if names & set(_NO_CREDENTIALS):
        return (f"no S3 credentials for {remote} ({message}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE) in the environment of this command and of the cluster's nodes")
    if names & set(_UNREACHABLE):
        url = re.search(r'endpoint URL: "([^"]+)"', message)
        endpoint = _endpoint(url.group(1)) if url else "(from AWS_ENDPOINT_URL)"
        return (f"cannot reach the S3 endpoint {endpoint} for {remote}: check AWS_ENDPOINT_URL (unset means AWS "
                f"itself) and that the endpoint is up and reachable from here")
    return None


_WORKER_OS_ERROR = re.compile(r"^\w*Error: \[Errno (\d+)\] (.+?): '(.+)'$", re.MULTILINE)
_WORKER_BOTOCORE_ERROR = re.compile(r"^botocore\.exceptions\.(\w+): (.*)$", re.MULTILINE)


def _worker_traceback(error: BaseException) -> str | None:
    """The worker's traceback text a Ray error carries (its ``str`` for the ``RayTaskError(X)`` form)."""
    if isinstance(getattr(error, "traceback_str", None), str):
        return error.traceback_str
    return str(error) if type(error).__module__.startswith("ray.") else None


def _fault_in_worker_traceback(text: object, remote: str) -> str | None:
    """The storage fault in a Ray worker's traceback text, the deepest first. Ray Data raises a UDF's
    error as "UDF failed to process a data block" *from* it, and an exception's cause does not survive
    pickling to the driver: only the worker's formatted traceback still holds it."""
    if not isinstance(text, str):
        return None
    for match in reversed(list(_WORKER_BOTOCORE_ERROR.finditer(text))):
        line = _s3_fault({match.group(1)}, match.group(2), remote)
        if line is not None:
            return line
    for match in reversed(list(_WORKER_OS_ERROR.finditer(text))):
        line = _os_fault(OSError(int(match.group(1)), match.group(2), match.group(3)))
        if line is not None:
            return line
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it wraps: ``__cause__``, ``__context__`` and Ray's ``cause``, each once."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        ray_cause = getattr(current, "cause", None)
        pending.extend(c for c in (current.__cause__, current.__context__, ray_cause) if isinstance(c, BaseException))


def _endpoint(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


def _os_fault(error: OSError) -> str | None:
    path = os.fsdecode(error.filename)
    if error.errno == errno.EEXIST and os.path.isfile(path):
        return f"{path} is a file where a folder is needed: choose another location, or move the file away"
    if error.errno == errno.ENOTDIR:
        blocker = next((p for p in _ancestors(path) if os.path.isfile(p)), "a part of it")
        return (f"{blocker} is a file where a folder is needed (to hold {path}): choose another location, "
                f"or move the file away")
    if error.errno == errno.EROFS:
        return f"cannot write {path}: its file system is read-only; choose a writable location"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot use {path}: permission denied; choose a location this user may write, or change its permissions"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write {path}: no space left on its device (or the disk quota is used up); free space or "
                f"choose another location, then rerun the same command: finished work is kept")
    if error.errno == errno.ENOENT:
        parent = os.path.dirname(path.rstrip("/"))
        if os.path.isdir(parent) and _holds_no_storage(parent):
            return (f"cannot create {path}: {parent} is on a virtual file system (such as /proc or /sys) that holds "
                    f"no files of its own; choose a folder on a disk")
        return f"{path}: no such file or folder"
    return None


def _ancestors(path: str) -> Iterator[str]:
    path = os.path.dirname(path.rstrip("/"))
    while path and path != os.path.dirname(path):
        yield path
        path = os.path.dirname(path)


def _holds_no_storage(folder: str) -> bool:
    """True on kernel file systems (proc, sysfs): they report no blocks at all."""
    try:
        return os.statvfs(folder).f_blocks == 0
    except OSError:
        return False
