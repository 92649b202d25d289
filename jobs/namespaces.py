"""Linux namespaces and /proc, the mechanics under the local cluster (jobs/local_cluster.py).

Commands to create private PID + network + mount namespaces (``unshare``) and to run a command in
them (``nsenter``), as root or, without root, inside a user namespace; and the /proc reading that
finds, watches and stops the processes in them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


def use_user_namespace() -> bool:
    """Without root, a user namespace of our own grants the rights (mounts, network) inside."""
    return os.geteuid() != 0


def unshare_argv() -> list[str]:
    """Run a command as PID 1 of new PID, network and mount namespaces (with /proc of its own)."""
    userns = ["--user", "--map-root-user"] if use_user_namespace() else []
    return ["unshare", *userns, "--fork", "--pid", "--net", "--mount-proc"]


def nsenter_argv(ns_pid: int) -> list[str]:
    """Run a command in the namespaces of host process ``ns_pid``."""
    userns = ["--user"] if use_user_namespace() else []
    return ["nsenter", "-t", str(ns_pid), *userns, "--net", "--pid", "--mount"]


def check_namespaces_allowed(what: str) -> None:
    """One clear line (naming ``what`` needs them) when this machine cannot make the namespaces."""
    missing = [tool for tool in ("unshare", "nsenter", "ip", "mount") if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(f"{what} needs Linux with util-linux and iproute2; missing: {', '.join(missing)}")
    probe = subprocess.run([*unshare_argv(), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise PermissionError(f"{what} cannot create private PID/network/mount namespaces ({probe.stderr.strip()}): "
                              f"run it as root, or enable unprivileged user namespaces (sysctl "
                              f"user.max_user_namespaces > 0; in a container: --privileged, or a seccomp profile "
                              f"that allows unshare)")


def alive(pid: int) -> bool:
    """Running; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def parent(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def pid_namespace(pid: int) -> str:
    """The PID namespace of host process ``pid``, e.g. "pid:[4026532178]"."""
    return os.readlink(f"/proc/{pid}/ns/pid")


def pids_in(namespace: str) -> list[int]:
    """Host pids of the live processes in a PID namespace (as named by ``pid_namespace``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "pid") == namespace and alive(int(entry.name)):
                    pids.append(int(entry.name))
    return sorted(pids)


def first_child(pid: int) -> int | None:
    """A child of ``pid`` (``unshare --fork`` has exactly one: the new namespace's PID 1)."""
    with contextlib.suppress(FileNotFoundError):  # absent when the kernel lacks CONFIG_PROC_CHILDREN
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0]) if children else None
    return next((int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit() and parent(int(entry.name)) == pid),
                None)


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of ``pid``."""
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    return True
    return False


def kill_and_wait(pids: list[int], timeout_s: float) -> None:
    """SIGKILL ``pids`` and return once none runs; TimeoutError naming the survivors otherwise.
    SIGKILL of a namespace's PID 1 kills every process in the namespace."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        survivors = [pid for pid in pids if alive(pid)]
        if not survivors:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {survivors} still run {timeout_s:.0f} s after SIGKILL")
        time.sleep(0.1)
