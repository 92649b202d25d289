"""`rae cluster local up|down|status`: an autoscaling Ray cluster on this machine, to rehearse the
cluster path (`rae submit`, GPU nodes scaling from zero, node loss) without a cloud account.

See jobs/local_cluster.py for how it works: Ray's fake multi-node provider in private namespaces,
its job server forwarded to a free port on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from jobs.local_cluster import LocalClusterSpec

DEFAULT_DIR = "./rae-local-cluster"
DEFAULTS = LocalClusterSpec()


def _up(args: argparse.Namespace) -> int:
    from jobs.local_cluster import up

    spec = LocalClusterSpec(workdir=Path(args.dir), cpu_workers=args.cpu_workers, gpu_workers=args.gpu_workers,
                            cpus_per_node=args.cpus_per_node, idle_timeout_s=args.idle_timeout_s)
    started = time.monotonic()
    cluster = up(spec)
    folder = shlex.quote(cluster.workdir)
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in cluster.client_env().items())
    print(f"local cluster up in {time.monotonic() - started:.0f} s: job server {cluster.address}")
    print(f"  head: CPU 0 (runs no work); autoscaled from 0: up to {spec.cpu_workers} cpu node(s) and "
          f"{spec.gpu_workers} gpu node(s) of {spec.cpus_per_node} CPU (fake GPUs: no CUDA, code falls back "
          f"to the CPU); idle nodes go after {spec.idle_timeout_s:.0f} s")
    print("next:")
    print(f"  export {exports}")
    print(f"  rae submit --address {cluster.address} --no-upload --wait -- rae encode ...")
    print(f"  rae cluster local status --dir {folder}")
    print(f"  rae cluster local down --dir {folder}")
    print(f"  logs: {cluster.workdir}/*.log and {cluster.temp_dir}/session_*/logs")
    return 0


def _down(args: argparse.Namespace) -> int:
    from jobs.local_cluster import down

    stopped = down(args.dir)
    print(f"local cluster in {Path(args.dir).resolve()} {'stopped' if stopped else 'was not running'}; logs kept")
    return 0


def _status(args: argparse.Namespace) -> int:
    from jobs.local_cluster import load, status

    load(args.dir)  # a folder that never held a cluster is an error; one whose cluster died is "down"
    state = status(args.dir)
    if not state.up:
        print(f"local cluster in {Path(args.dir).resolve()}: down (its processes are gone); "
              f"`rae cluster local down --dir {shlex.quote(args.dir)}` clears it")
        return 1
    alive = [n for n in state.nodes if n.state == "ALIVE"]
    print(f"local cluster up: job server {state.address}; {len(alive)} node(s) alive, "
          f"{len(state.nodes) - len(alive)} gone")
    for node in alive:
        resources = ", ".join(f"{k} {v:g}" for k, v in sorted(node.resources.items()) if k in ("CPU", "GPU"))
        print(f"  {node.node_type:<17} {node.node_id}  {resources or 'no CPU'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from jobs.local_cluster import LocalClusterError

    try:
        return args.cluster_func(args)
    except LocalClusterError as error:  # the machine's or Ray's fault, not a flag: still one line
        print(f"rae cluster local {args.action}: error: {error}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="a local autoscaling Ray cluster to rehearse the cluster path",
        description="rae cluster local up|down|status: an autoscaling Ray cluster on this machine (Ray's fake "
                    "provider; cpu and gpu node types scaling from 0, fake GPUs without CUDA) in private "
                    "namespaces, so it never meets another Ray here. Needs root or user namespaces.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="local", required=True)
    local = kinds.add_parser("local", help="the cluster on this machine",
                             description="Start, stop or inspect the local cluster kept in --dir.")
    actions = local.add_subparsers(dest="action", metavar="up|down|status", required=True)
    for name, func, text in (("up", _up, "start it and print its job server address"),
                             ("down", _down, "stop it (every process inside); keeps the logs"),
                             ("status", _status, "is it up, and its nodes by type")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--dir", default=DEFAULT_DIR, help=f"the cluster's folder: state, config, logs "
                                                               f"(default {DEFAULT_DIR})")
        action.set_defaults(func=_run, cluster_func=func)
        if name == "up":
            action.add_argument("--gpu-workers", type=int, default=DEFAULTS.gpu_workers,
                                help=f"max gpu nodes, one fake GPU each (default {DEFAULTS.gpu_workers})")
            action.add_argument("--cpu-workers", type=int, default=DEFAULTS.cpu_workers,
                                help=f"max cpu nodes (default {DEFAULTS.cpu_workers})")
            action.add_argument("--cpus-per-node", type=int, default=DEFAULTS.cpus_per_node,
                                help=f"CPUs of a worker node (default {DEFAULTS.cpus_per_node})")
            action.add_argument("--idle-timeout-s", type=float, default=DEFAULTS.idle_timeout_s,
                                help=f"an idle worker node is removed after this long (default {DEFAULTS.idle_timeout_s:g})")
