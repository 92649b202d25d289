"""A TCP forwarder from a socket in the host's network into a port inside another network namespace.

The local cluster (jobs/local_cluster.py) runs Ray in a private network namespace, so its job server
on 127.0.0.1:8265 is unreachable from the host. This process bridges it: it is handed a listening
socket already bound in the host's network (``--listen-fd``; a socket keeps the namespace it was made
in), then moves itself into the cluster's network namespace with setns(2), so every outgoing socket
it makes afterwards connects to the namespace's loopback.

Python 3.11 has no ``os.setns``, hence ctypes. setns changes the namespace of the calling thread
only, so it runs in the main thread before any other thread exists, and every upstream socket is
created in the main thread too (the handler threads only connect and copy bytes).

    python jobs/netns_forward.py --listen-fd 3 --netns /proc/1234/ns/net --target 127.0.0.1:8265
"""
from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000  # <sched.h>
CLONE_NEWUSER = 0x10000000
CHUNK = 1 << 16


def enter_namespace(path: str, kind: int) -> None:
    """Move the calling thread into the namespace at ``path`` (e.g. /proc/<pid>/ns/net), and check."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, kind) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)
    # Verify rather than trust: a forwarder left in the host network would silently reach whatever
    # else listens on the target port there (another Ray's dashboard, say).
    here = os.readlink(f"/proc/thread-self/ns/{os.path.basename(path)}")
    if here != os.readlink(path):
        raise OSError(f"setns({path}) returned but this thread is still in {here}")


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes until ``source`` closes, then half-close ``sink`` so the other side sees EOF."""
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _bridge(client: socket.socket, upstream: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream.connect(target)
    except OSError as error:
        print(f"netns_forward: cannot reach {target[0]}:{target[1]} in the namespace: {error}", file=sys.stderr)
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def serve(listener: socket.socket, target: tuple[str, int]) -> None:
    """Accept forever; each connection gets a fresh upstream socket made here, in the main thread."""
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        threading.Thread(target=_bridge, args=(client, upstream, target), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-fd", type=int, required=True, help="an inherited, listening TCP socket")
    parser.add_argument("--netns", required=True, help="the namespace to connect into, e.g. /proc/PID/ns/net")
    parser.add_argument("--userns", help="join this user namespace first (a cluster started without root)")
    parser.add_argument("--target", default="127.0.0.1:8265", help="HOST:PORT inside the namespace")
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    listener = socket.socket(fileno=args.listen_fd)
    if args.userns:  # must come first: the network namespace belongs to it (and needs one thread)
        enter_namespace(args.userns, CLONE_NEWUSER)
    enter_namespace(args.netns, CLONE_NEWNET)
    print(f"netns_forward: {listener.getsockname()} -> {args.target} in {args.netns}", file=sys.stderr, flush=True)
    serve(listener, (host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
