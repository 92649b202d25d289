"""Storage faults as one line a user can act on: a full or read-only disk, a store path that is a
file, missing S3 credentials, an unreachable endpoint. The command line (jobs/cli/app.py) asks
:func:`describe_storage_fault` about any error a command raised, including errors Ray carried back
from a task or a Ray Data UDF."""
from __future__ import annotations

import errno
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator

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
