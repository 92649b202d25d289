"""A local autoscaling Ray cluster: Ray's fake multi-node provider, in private namespaces.

``rae cluster local up`` rehearses the cluster path on one machine: a CPU-only head (runs no work)
and ``cpu`` / ``gpu`` worker node types that the autoscaler launches from zero when tasks ask for
them and removes after an idle timeout, like cluster.yaml on a cloud. The GPUs are logical only
(the worker sees CUDA_VISIBLE_DEVICES, there is no CUDA), so GPU code falls back to the CPU.

Why namespaces: the fake provider's worker nodes dial the GCS on port 6379 (hard-coded), and Ray
keeps its sessions under /tmp/ray; either would collide with any other Ray on the machine. So the
cluster runs under ``unshare --fork --pid --net --mount-proc`` (jobs/namespaces.py): its own
loopback, its own PID 1 (killing it kills everything inside, which is all ``down`` needs), and
/tmp/ray bind-mounted from the cluster's folder. The job server (8265 inside) is reached through a
forwarder on a free host port (jobs/netns_forward.py). Needs root, or unprivileged user namespaces.

Token authentication is on, with a token of the cluster's own (auth_token in its folder). Ray's
clients send a token only when RAY_AUTH_MODE=token, so host-side clients use ``client_env()`` (for
`rae submit`, `ray job ...`) or ``job_client()``.

The cluster's folder holds cluster.json (the state, ``LocalCluster``), autoscaler.yaml, namespace.sh,
auth_token and the logs: namespace.log, ray-start.log, forwarder.log, Ray's own in ray/session_*/logs.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from jobs import namespaces

HEAD_NODE_TYPE = "ray.head.default"  # the fake provider hard-codes its head's type name
NODE_TYPE_LABEL = "rae/node-type"    # set on each worker node, so `status` can name its type
DASHBOARD_PORT = 8265
STATE_FILE = "cluster.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
NODE_PROVIDER = "jobs.local_provider.LocalNodeProvider"  # imported by the head's autoscaler
HEAD_START_TIMEOUT_S = 300.0         # `ray start --head` took ~10 s on an idle 2-core machine; up to 3 tries loaded
STOP_TIMEOUT_S = 30.0
AGENT_PORT = 52365                   # the head's dashboard agent (ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)

# The namespace's script. Its PID 1 ends up being the reaper below: orphans (a killed node's workers)
# are re-parented to it, and without a wait() they would linger as zombies that look alive to tests.
NAMESPACE_SCRIPT = """\
set -eu
ip link set lo up
mkdir -p "$RAE_LC_DIR/ray" /tmp/ray
mount --bind "$RAE_LC_DIR/ray" /tmp/ray
# Ray gives a starting node a fixed 30 s to register with its GCS; a loaded machine can miss that, so
# that failure (and only that one) is retried after clearing the attempt's processes (this namespace's).
for attempt in 1 2 3; do
    status=0
    echo "attempt $attempt" >> "$RAE_LC_DIR/ray-start.log"
    ray start --head --num-cpus=0 --object-store-memory={head_object_store} --disable-usage-stats \\
        --autoscaling-config="$RAE_LC_DIR/autoscaler.yaml" --include-dashboard=true \\
        --dashboard-host=127.0.0.1 --dashboard-port={dashboard_port} >> "$RAE_LC_DIR/ray-start.log" 2>&1 || status=$?
    [ "$status" -eq 0 ] && break
    grep -q "timed out during startup" "$RAE_LC_DIR/ray-start.log" || break
    ray stop --force >> "$RAE_LC_DIR/ray-start.log" 2>&1 || true
done
echo $status > "$RAE_LC_DIR/head.rc.tmp" && mv "$RAE_LC_DIR/head.rc.tmp" "$RAE_LC_DIR/head.rc"
exec {python} -c 'import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)'
"""


class LocalClusterError(RuntimeError):
    """The local cluster could not start or be reached; the message names the log to read."""


@dataclass(frozen=True)
class LocalClusterSpec:
    workdir: Path = Path("rae-local-cluster")  # state, config and logs; one cluster per folder
    cpu_workers: int = 2                        # max `cpu` nodes (the autoscaler starts them from 0)
    gpu_workers: int = 2                        # max `gpu` nodes, each with one logical GPU
    cpus_per_node: int = 2                      # logical CPUs per worker node (the head has 0): one for an
                                                # actor or train worker, one for the data tasks beside it
    idle_timeout_s: float = 30.0                # an idle worker node is removed after this long
    object_store_mb: int = 256                  # per node; Ray's default (30% of RAM each) is huge here
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables for every process inside


@dataclass(frozen=True)
class LocalCluster:
    """A running cluster, as recorded in its folder's cluster.json."""
    workdir: str
    address: str             # the job server, forwarded to the host: http://127.0.0.1:PORT
    namespace_pid: int       # host pid of the namespace's PID 1
    pid_namespace: str       # e.g. "pid:[4026532178]", to recognise the cluster's processes
    forwarder_pid: int
    temp_dir: str            # Ray's temp dir (/tmp/ray inside the namespace)
    config_path: str
    token_path: str          # the cluster's auth token (Ray >= 2.59 token authentication)
    logs: dict[str, str]

    def client_env(self) -> dict[str, str]:
        """Variables a host-side Ray client (`rae submit`, `ray job ...`) needs for this cluster.
        An exported RAY_AUTH_TOKEN (another cluster's) would take precedence: unset it."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, "RAY_API_SERVER_ADDRESS": self.address}

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}

    def job_client(self):
        """A JobSubmissionClient for this cluster that sends its token, whatever RAY_AUTH_MODE says."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.auth_headers())


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    node_type: str           # "cpu", "gpu" or HEAD_NODE_TYPE
    state: str               # ALIVE or DEAD
    resources: dict[str, float]


@dataclass(frozen=True)
class ClusterStatus:
    up: bool
    address: str | None
    nodes: list[NodeStatus]  # alive and dead; empty when down


def autoscaling_config(spec: LocalClusterSpec) -> dict:
    """The fake provider's autoscaler config: node types named like cluster.yaml's, head with CPU 0."""
    store = spec.object_store_mb * 2**20

    def worker(max_workers: int, gpus: int) -> dict:
        resources = {"CPU": spec.cpus_per_node, **({"GPU": gpus} if gpus else {}), "object_store_memory": store}
        return {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": max_workers}

    types = {HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
             "cpu": worker(spec.cpu_workers, 0), "gpu": worker(spec.gpu_workers, 1)}
    for name in ("cpu", "gpu"):
        types[name]["labels"] = {NODE_TYPE_LABEL: name}
    config = {
        "cluster_name": "rae-local",
        "max_workers": spec.cpu_workers + spec.gpu_workers,
        "idle_timeout_minutes": spec.idle_timeout_s / 60.0,
        # Ray's fake provider, replacing a node whose raylet died as a cloud would (jobs/local_provider.py).
        "provider": {"type": "external", "module": NODE_PROVIDER, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
    }
    for commands in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                     "head_start_ray_commands", "worker_start_ray_commands"):
        config[commands] = []
    return config


def namespace_env(spec: LocalClusterSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment inside: the caller's, this venv's bin first on PATH (a job's `python -m
    jobs.cli.app` must be this project's python), offline hub, the cluster's own auth token, the
    fake provider's switches."""
    workdir = spec.workdir.resolve()
    env = {k: v for k, v in environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", os.defpath)])
    env["HF_HUB_OFFLINE"] = "1"
    # The head's autoscaler imports this project's node provider (jobs.local_provider).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), environ.get("PYTHONPATH")) if p)
    env.update(spec.env)
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(workdir / "auth_token"), RAE_LC_DIR=str(workdir))
    return env


def up(spec: LocalClusterSpec, timeout_s: float = HEAD_START_TIMEOUT_S) -> LocalCluster:
    """Start the cluster detached from this process (it outlives it) and return once a job submitted
    to its address is accepted: the namespace, then the head, then the forwarder, then the job server."""
    preflight()
    workdir = spec.workdir.resolve()
    _claim(workdir)
    deadline = time.monotonic() + timeout_s
    logs = {name: str(workdir / f"{name}.log") for name in ("namespace", "ray-start", "forwarder")}
    logs["ray"] = str(workdir / "ray" / "session_*" / "logs")
    token_path, config_path, script = _write_files(spec, workdir)

    with open(logs["namespace"], "wb") as log:
        unshare = subprocess.Popen([*namespaces.unshare_argv(), "bash", str(script)], env=namespace_env(spec, os.environ),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=workdir)
    ns_pid = _wait_for(lambda: namespaces.first_child(unshare.pid) or _fail_if_exited(unshare, logs["namespace"]),
                       deadline, "the namespace's first process", logs["namespace"])
    pid_namespace = namespaces.pid_namespace(ns_pid)
    try:
        rc = _wait_for(lambda: _read_int(workdir / "head.rc") if namespaces.alive(ns_pid) else _died(logs["namespace"]),
                       deadline, "`ray start --head`", logs["ray-start"])
        if rc != 0:
            raise LocalClusterError(f"the head failed to start (ray start exit {rc}): "
                                    f"{_last_line(logs['ray-start'])}; see {logs['ray-start']}")
        port, forwarder_pid = _start_forwarder(ns_pid, logs["forwarder"])
    except BaseException:
        namespaces.kill_and_wait([ns_pid], STOP_TIMEOUT_S)
        raise
    cluster = LocalCluster(workdir=str(workdir), address=f"http://127.0.0.1:{port}", namespace_pid=ns_pid,
                           pid_namespace=pid_namespace, forwarder_pid=forwarder_pid, temp_dir=str(workdir / "ray"),
                           config_path=str(config_path), token_path=str(token_path), logs=logs)
    (workdir / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))
    try:
        # Jobs are handed to the head's dashboard agent, which starts after the dashboard: waiting for
        # both means a job submitted as soon as up() returns is accepted.
        _wait_for(lambda: namespaces.listening(ns_pid, AGENT_PORT) and _answers(cluster), deadline,
                  f"the job server at {cluster.address} and the head's dashboard agent", logs["ray"])
    except BaseException:
        down(workdir)
        raise
    return cluster


def down(workdir: str | os.PathLike) -> bool:
    """Stop the cluster in ``workdir`` and its forwarder; idempotent. True if anything was running.
    Logs are kept; the state file goes."""
    workdir = Path(workdir).resolve()
    cluster = _load(workdir)
    if cluster is None:
        return False
    pids = [pid for pid in (cluster.namespace_pid, cluster.forwarder_pid) if _is_ours(cluster, pid)]
    # `unshare`, the parent of the namespace's PID 1, exits with it; waiting for it too reaps it when
    # it is our child (in tests), so no zombie outlives the cluster.
    unshare = namespaces.parent(cluster.namespace_pid) if cluster.namespace_pid in pids else None
    with contextlib.suppress(OSError):
        if unshare is not None and Path(f"/proc/{unshare}/comm").read_text().strip() == "unshare":
            pids.append(unshare)
    namespaces.kill_and_wait(pids, STOP_TIMEOUT_S)
    left = namespace_pids(cluster)
    if left:
        raise LocalClusterError(f"processes {left} of the cluster in {workdir} outlived its PID 1 {cluster.namespace_pid}")
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return bool(pids)


def status(workdir: str | os.PathLike) -> ClusterStatus:
    """Whether the cluster is up, its address, and its nodes with their types (via the job server)."""
    cluster = _load(Path(workdir).resolve())
    if cluster is None or not _is_ours(cluster, cluster.namespace_pid):
        return ClusterStatus(up=False, address=None, nodes=[])
    if not _is_ours(cluster, cluster.forwarder_pid):
        raise LocalClusterError(f"the cluster in {cluster.workdir} runs but its forwarder to the job server has "
                                f"gone (see {cluster.logs['forwarder']}); restart it with down, then up")
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=cluster.address, headers=cluster.auth_headers())
    listed = client.list(StateResource.NODES, options=ListApiOptions(limit=1000), raise_on_missing_output=False)
    nodes = [NodeStatus(node_id=n.node_id, state=n.state, resources=dict(n.resources_total),
                        node_type=HEAD_NODE_TYPE if n.is_head_node else n.labels.get(NODE_TYPE_LABEL, "?"))
             for n in listed]
    return ClusterStatus(up=True, address=cluster.address, nodes=sorted(nodes, key=lambda n: n.node_id))


def alive_node_ids(workdir: str | os.PathLike, node_type: str) -> list[str]:
    """Ids of the cluster's live nodes of ``node_type`` ("cpu", "gpu", HEAD_NODE_TYPE)."""
    return [n.node_id for n in status(workdir).nodes if n.node_type == node_type and n.state == "ALIVE"]


def load(workdir: str | os.PathLike) -> LocalCluster:
    """The running cluster recorded in ``workdir``; FileNotFoundError naming the folder if none."""
    cluster = _load(Path(workdir).resolve())
    if cluster is None:
        raise FileNotFoundError(f"no local cluster in {Path(workdir).resolve()} (no {STATE_FILE}); "
                                f"start one with `rae cluster local up --dir {workdir}`")
    return cluster


def exec_inside(cluster: LocalCluster, argv: Sequence[str], **run_kwargs) -> subprocess.CompletedProcess:
    """Run a command inside the cluster's namespaces (its network, PIDs and /tmp/ray), e.g. a python
    that calls ``ray.init()``. Keyword arguments go to subprocess.run (check, capture_output...); ``env``
    is added to this process's environment, with this venv first on PATH and the cluster's token."""
    run_kwargs.setdefault("cwd", cluster.workdir)
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    inside = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
              "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}"}  # the forwarded port is the host's
    run_kwargs["env"] = {**environ, **cluster.client_env(), **inside, **run_kwargs.get("env", {})}
    return subprocess.run([*namespaces.nsenter_argv(cluster.namespace_pid), "--", *argv], **run_kwargs)


def raylet_pids(cluster: LocalCluster, node_type: str | None = None) -> dict[str, int]:
    """Host pids of the cluster's raylets, by node id, optionally only of one node type ("cpu",
    "gpu", HEAD_NODE_TYPE). Killing one (SIGKILL) is how a test loses a node. A fake worker's raylet
    carries its type in RAY_NODE_TYPE_NAME and its id in --node_id=; the head's has no type variable."""
    found = {}
    for pid in namespace_pids(cluster):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"/raylet"):
            continue
        node_id = next(a.split(b"=", 1)[1].decode() for a in argv if a.startswith(b"--node_id="))
        kind = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RAY_NODE_TYPE_NAME=")), HEAD_NODE_TYPE)
        if node_type is None or kind == node_type:
            found[node_id] = pid
    return found


def namespace_pids(cluster: LocalCluster) -> list[int]:
    """Host pids of every live process of the cluster (its PID namespace; zombies excluded)."""
    return namespaces.pids_in(cluster.pid_namespace)


@contextlib.contextmanager
def running(spec: LocalClusterSpec) -> Iterator[LocalCluster]:
    """``with running(spec) as cluster:`` up, then down however the block ends."""
    cluster = up(spec)
    try:
        yield cluster
    finally:
        down(spec.workdir)


# The steps of up and down.

def _claim(workdir: Path) -> None:
    """Make ``workdir`` ready for a new cluster: refuse one that is up, clear what a dead one left."""
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = _load(workdir)
    if cluster is not None:
        if _is_ours(cluster, cluster.namespace_pid):
            raise FileExistsError(f"a local cluster is already up in {workdir}; stop it with "
                                  f"`rae cluster local down --dir {workdir}`")
        down(workdir)
    for leftover in ("head.rc", "head.rc.tmp"):
        (workdir / leftover).unlink(missing_ok=True)


def _write_files(spec: LocalClusterSpec, workdir: Path) -> tuple[Path, Path, Path]:
    """A fresh auth token (owner-only), the autoscaler config and the namespace's script."""
    token_path, config_path, script = workdir / "auth_token", workdir / "autoscaler.yaml", workdir / "namespace.sh"
    token_path.unlink(missing_ok=True)
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    config_path.write_text(yaml.safe_dump(autoscaling_config(spec), sort_keys=False))
    script.write_text(NAMESPACE_SCRIPT.format(head_object_store=spec.object_store_mb * 2**20,
                                              dashboard_port=DASHBOARD_PORT, python=shlex.quote(sys.executable)))
    return token_path, config_path, script


def preflight() -> None:
    """One clear line when this machine cannot host the cluster (PermissionError: no right to make the
    namespaces; FileNotFoundError: a tool is missing), before anything starts."""
    namespaces.check_namespaces_allowed("rae cluster local")


def _start_forwarder(ns_pid: int, log_path: str) -> tuple[int, int]:
    """Bind a free port on the host's loopback here (so it is in the host network), hand the socket to
    a detached forwarder that moves into the namespace's network. Returns (port, forwarder pid)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    argv = [sys.executable, str(Path(__file__).with_name("netns_forward.py")), "--listen-fd", str(listener.fileno()),
            "--netns", f"/proc/{ns_pid}/ns/net", "--target", f"127.0.0.1:{DASHBOARD_PORT}"]
    if namespaces.use_user_namespace():
        argv += ["--userns", f"/proc/{ns_pid}/ns/user"]
    with listener, open(log_path, "wb") as log:
        forwarder = subprocess.Popen(argv, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return listener.getsockname()[1], forwarder.pid


def _is_ours(cluster: LocalCluster, pid: int) -> bool:
    """Whether ``pid`` is still this cluster's PID 1 or forwarder (and not a reused pid)."""
    try:
        if pid == cluster.namespace_pid:
            return namespaces.pid_namespace(pid) == cluster.pid_namespace and namespaces.alive(pid)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return f"/proc/{cluster.namespace_pid}/ns/net".encode() in argv and namespaces.alive(pid)
    except OSError:
        return False


def _fail_if_exited(process: subprocess.Popen, log_path: str) -> None:
    if process.poll() is not None:
        _died(log_path)


def _died(log_path: str) -> None:
    raise LocalClusterError(f"the cluster's namespace exited during start-up: {_last_line(log_path)}; see {log_path}")


# Small helpers.

def _wait_for(condition: Callable[[], object], deadline: float, what: str, log_path: str | None):
    """Poll ``condition`` until it returns something other than None/False, or the deadline passes."""
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            hint = f"; see {log_path}" if log_path else ""
            raise LocalClusterError(f"timed out waiting for {what}{hint}")
        time.sleep(0.2)


def _answers(cluster: LocalCluster) -> bool:
    try:
        cluster.job_client().list_jobs()
    except (ConnectionError, RuntimeError, OSError):
        return False
    return True


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: str) -> str:
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def _load(workdir: Path) -> LocalCluster | None:
    try:
        return LocalCluster(**json.loads((workdir / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None
