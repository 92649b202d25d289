"""What the Ray cluster can grow to, not only what is up now.

An autoscaling cluster (``cluster.yaml``: GPU workers from 0) has no GPU at submission, yet its
jobs must run on GPUs: the encoder pool, the sampler pool and the trainer ask for GPU workers and
the autoscaler adds the nodes. So jobs decide from the cluster's *capacity*: the node types its
autoscaler may launch and how many of each, read from (first found wins)

1. the cluster config Ray's GCS holds (KubeRay, autoscaler v2 and managed Ray publish it there;
   Ray Train and Ray Data read the same record);
2. the autoscaling config file: ``$RAE_AUTOSCALING_CONFIG``, else the one the head's autoscaler
   monitor was started with (``ray up`` and ``rae cluster local up`` clusters, seen from a driver
   on the head, which is where ``rae submit`` runs it), else ``~/ray_bootstrap_config.yaml``;
3. the nodes up now (a fixed cluster, or a laptop).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUTOSCALING_CONFIG_ENV = "RAE_AUTOSCALING_CONFIG"
_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the config on the head


@dataclass(frozen=True)
class NodeType:
    """One kind of node the autoscaler may launch."""

    name: str
    resources: dict[str, float]
    max_workers: int

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))


@dataclass(frozen=True)
class ClusterCapacity:
    """GPUs up now and the most the cluster may have, with the node types that give them."""

    gpus_now: int
    gpu_nodes_now: int
    node_types: tuple[NodeType, ...]  # () when no autoscaler was found: the cluster is what is up
    source: str                       # where node_types came from, for messages

    @property
    def max_gpus(self) -> int:
        """GPUs the cluster can have at once: its autoscaler's GPU node types at their maximum
        (never less than what is up now)."""
        return max(self.gpus_now, sum(t.gpus * t.max_workers for t in self.node_types))

    @property
    def gpu_node_types(self) -> tuple[NodeType, ...]:
        return tuple(t for t in self.node_types if t.gpus > 0 and t.max_workers > 0)

    def describe_gpus(self) -> str:
        """``GPU nodes: 0 up (0 GPUs), up to 8 of type gpu (1 GPU each) [autoscaler config /x.yaml]``."""
        up = f"GPU nodes: {self.gpu_nodes_now} up ({self.gpus_now} GPUs)"
        if not self.node_types:
            return f"{up}; no autoscaler found, so the cluster is what is up now"
        types = ", ".join(f"{t.max_workers} of type {t.name} ({t.gpus} GPU each)" for t in self.gpu_node_types)
        return f"{up}, up to {types or 'none: no node type has GPUs'} [{self.source}]"

    def describe_node_types(self) -> str:
        """``cpu (CPU=1) x0..2, gpu (CPU=1, GPU=1) x0..2`` for error messages."""
        if not self.node_types:
            return "no autoscaler node types (the cluster is what is up now)"
        return ", ".join(f"{t.name} ({_resources_text(t.resources)}) up to {t.max_workers}" for t in self.node_types)


def cluster_capacity() -> ClusterCapacity:
    """The connected cluster's capacity (call after ``ray.init``)."""
    import ray

    gpu_nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    gpus_now = int(sum(n["Resources"]["GPU"] for n in gpu_nodes))
    node_types, source = _node_types()
    return ClusterCapacity(gpus_now=gpus_now, gpu_nodes_now=len(gpu_nodes), node_types=node_types, source=source)


def _node_types() -> tuple[tuple[NodeType, ...], str]:
    from_gcs = _node_types_from_gcs()
    if from_gcs:
        return from_gcs, "cluster config in Ray's GCS"
    path = _autoscaling_config_path()
    if path is not None:
        try:
            return node_types_from_autoscaling_config(_read_yaml(path)), f"autoscaler config {path}"
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("could not read the autoscaler config %s (%s); deciding from the nodes up now", path, error)
    return (), "nodes up now"


def node_types_from_autoscaling_config(config: dict[str, Any]) -> tuple[NodeType, ...]:
    """Worker node types of a Ray autoscaling config (``cluster.yaml``'s shape). A type's maximum is
    capped by the cluster's ``max_workers``; the head type counts only its own ``resources``."""
    cluster_max = int(config.get("max_workers", 2**31))
    head = config.get("head_node_type")
    types = []
    for name, spec in config.get("available_node_types", {}).items():
        count = 1 if name == head else min(int(spec.get("max_workers", cluster_max)), cluster_max)
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        types.append(NodeType(name=name, resources=resources, max_workers=count))
    return tuple(types)


def _node_types_from_gcs() -> tuple[NodeType, ...]:
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as error:  # private API: never let it break a job
        log.debug("no cluster config from the GCS: %s", error)
        return ()
    if config is None:
        return ()
    return tuple(NodeType(name=group.name, resources=dict(group.resources),
                          max_workers=group.max_count if group.max_count >= 0 else 2**31)
                 for group in config.node_group_configs)


def _autoscaling_config_path() -> Path | None:
    named = os.environ.get(AUTOSCALING_CONFIG_ENV)
    if named:
        return Path(named).expanduser()
    from_monitor = _monitor_config_path()
    if from_monitor is not None:
        return from_monitor
    bootstrap = Path(_BOOTSTRAP_CONFIG).expanduser()
    return bootstrap if bootstrap.is_file() else None


def _monitor_config_path() -> Path | None:
    """The ``--autoscaling-config`` of the autoscaler monitor of the cluster this driver is connected
    to: a monitor on this node, in this network namespace, serving this cluster's GCS address."""
    import psutil
    import ray

    gcs_address = ray.get_runtime_context().gcs_address
    own_network = _network_namespace("self")
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if not any(part.endswith("monitor.py") for part in cmdline[:3]):
            continue
        if f"--gcs-address={gcs_address}" not in cmdline or _network_namespace(process.info["pid"]) != own_network:
            continue
        for part in cmdline:
            if part.startswith("--autoscaling-config="):
                path = Path(part.split("=", 1)[1]).expanduser()
                if path.is_file():
                    return path
    return None


def _network_namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    text = path.read_text()
    config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError("not a mapping")
    return config


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "no resources"


def parse_count_range(value: str | int | tuple[int, int] | list[int], what: str) -> int | tuple[int, int]:
    """``"4"`` or 4 -> 4; ``"2,8"`` or (2, 8) -> (2, 8), an elastic range. ``what`` names the flag in errors."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, (tuple, list)):
        values = list(value)
    else:
        try:
            values = [int(part.strip()) for part in str(value).split(",")]
        except ValueError:
            raise ValueError(f"{what} {value!r}: expected N or MIN,MAX (integers)") from None
    if len(values) == 1 and values[0] >= 1:
        return values[0]
    if len(values) == 2 and 1 <= values[0] <= values[1]:
        return (values[0], values[1])
    raise ValueError(f"{what} {value!r}: expected N >= 1 or MIN,MAX with 1 <= MIN <= MAX")


def autoscaler_launch_failures(node_types: tuple[str, ...] | None = None) -> list[str]:
    """The autoscaler's own reasons why nodes (of ``node_types``, default all) failed to launch, from
    the status its monitor publishes in the GCS; [] when it reports none or there is no autoscaler."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
        report = json.loads(raw).get("autoscaler_report") or {} if raw else {}
    except Exception as error:  # private API: a missing report must not hide the real error
        log.debug("no autoscaler report: %s", error)
        return []
    reasons = []
    availabilities = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for name, record in sorted(availabilities.items()):
        info = record.get("unavailable_node_information") or {}
        if (node_types is None or name in node_types) and not record.get("is_available", True) and info:
            reasons.append(f"node type {name}: {info.get('category', 'launch failed')}: {info.get('description', '')}".strip())
    failed = [node_type for _, node_type in report.get("failed_nodes") or [] if node_types is None or node_type in node_types]
    if failed and not reasons:
        reasons.append(f"{len(failed)} node(s) of type {', '.join(sorted(set(failed)))} failed to start")
    return reasons


def parse_actor_count(text: str) -> int | tuple[int, int]:
    """argparse type of ``--num-actors``: N or MIN,MAX (a refusal said as argparse says it,
    ``argument --num-actors: '0': expected ...``, rather than ``invalid parse_actor_count value``)."""
    try:
        return parse_count_range(text, "--num-actors")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an actor count N >= 1, or MIN,MAX with "
                                         f"1 <= MIN <= MAX (a pool that grows as GPU nodes join)") from None
