"""`rae cluster local`: an autoscaling fake-provider Ray cluster in private namespaces.

The fast tests check the autoscaler config, the CLI's errors and the forwarder into a namespace.
The slow ones share one cluster (the ``local_cluster`` fixture in conftest.py) and walk its life in
order: the host reaches the job server, a num_gpus=1 task makes the autoscaler launch a gpu node
from zero, the idle node goes away, and ``down`` leaves no process behind. Measured on the 2-core
dev machine, idle: 8-10 s to the job server, 7.5 s to the gpu node, the 30 s idle timeout to scale
down (16-30 s to the job server while another Ray test ran); the module takes ~1 min.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import require_namespaces
from polling import wait_until
from ray_lines import without_ray_lines

from jobs import namespaces
from jobs.cli.app import main
from jobs.local_cluster import (
    alive_node_ids,
    HEAD_NODE_TYPE,
    LocalClusterSpec,
    autoscaling_config,
    down,
    exec_inside,
    namespace_env,
    namespace_pids,
    raylet_pids,
    status,
)

pytestmark = pytest.mark.timeout(600)  # the slow tests take ~1 min on an idle 2-core machine

ROOT = Path(__file__).resolve().parents[1]
GPU_TASK = ("import os, ray; ray.init(); "
            "print('visible:', ray.get(ray.remote(num_gpus=1)(lambda: os.environ['CUDA_VISIBLE_DEVICES']).remote()))")


def _alive(cluster, node_type: str) -> list[str]:
    return alive_node_ids(cluster.workdir, node_type)


# Fast: the config, the CLI and the forwarder; no Ray cluster.

def test_autoscaling_config_validates_against_rays_own_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(autoscaling_config(LocalClusterSpec()), schema)


def test_node_types_mirror_cluster_yaml_and_scale_from_zero():
    config = autoscaling_config(LocalClusterSpec(cpu_workers=3, gpu_workers=1, cpus_per_node=2, idle_timeout_s=45))
    types = config["available_node_types"]
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    assert set(types) - {HEAD_NODE_TYPE} == set(real) - {"head"} == {"cpu", "gpu"}
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert (types["cpu"]["min_workers"], types["cpu"]["max_workers"]) == (0, 3)
    assert (types["gpu"]["min_workers"], types["gpu"]["max_workers"]) == (0, 1)
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["CPU"] == 2
    assert "GPU" not in types["cpu"]["resources"]
    assert config["idle_timeout_minutes"] == 0.75
    assert config["provider"] == {"type": "external", "module": "jobs.local_provider.LocalNodeProvider",
                                  "use_node_id_as_ip": True, "disable_node_updaters": True,
                                  "disable_launch_config_check": True}


def test_namespace_runs_this_venv_offline_and_forwards_the_callers_variables():
    env = namespace_env(LocalClusterSpec(env={"RAE_CACHE_DIR": "/cache"}),
                        {"PATH": "/usr/bin", "WANDB_MODE": "disabled", "RAY_ADDRESS": "10.0.0.1:6379"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["HF_HUB_OFFLINE"] == "1" and env["WANDB_MODE"] == "disabled" and env["RAE_CACHE_DIR"] == "/cache"
    assert "RAY_ADDRESS" not in env  # another cluster's address must not leak into this one
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # the head's autoscaler imports jobs.local_provider


def test_status_of_a_folder_without_a_cluster_is_a_one_line_error(tmp_path, capsys):
    assert main(["cluster", "local", "status", "--dir", str(tmp_path)]) == 2
    err = without_ray_lines(capsys.readouterr().err)
    assert err.count("\n") == 1 and f"no local cluster in {tmp_path}" in err and "rae cluster local up" in err


def test_down_without_a_cluster_does_nothing(tmp_path):
    assert down(tmp_path) is False


def test_the_forwarder_reaches_the_port_inside_the_namespace_not_the_hosts(tmp_path):
    require_namespaces()
    host = socket.create_server(("127.0.0.1", 0))  # the same port on the host: must not be the one reached
    port = host.getsockname()[1]
    server = f"import socket; c, _ = socket.create_server(('127.0.0.1', {port})).accept(); c.sendall(b'inside')"
    unshare = subprocess.Popen([*namespaces.unshare_argv(), "sh", "-c", f'ip link set lo up && exec {sys.executable} -c "{server}"'])
    ns_pid = wait_until(lambda: namespaces.first_child(unshare.pid), 30, "the namespace")
    listener = socket.create_server(("127.0.0.1", 0))
    forwarder = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "netns_forward.py"), "--listen-fd", str(listener.fileno()),
                                  "--netns", f"/proc/{ns_pid}/ns/net", "--target", f"127.0.0.1:{port}"],
                                 pass_fds=(listener.fileno(),))
    try:
        wait_until(lambda: namespaces.listening(ns_pid, port), 30, "the server in the namespace")
        with socket.create_connection(listener.getsockname(), timeout=30) as client:
            assert client.recv(16) == b"inside"
    finally:
        namespaces.kill_and_wait([ns_pid, forwarder.pid], 30)
        unshare.wait()
        host.close()
        listener.close()


# Slow: one cluster for the rest of the module, in this order.

@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    measured: dict[str, float] = {}
    yield measured
    print("\nlocal cluster timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))


@pytest.fixture(scope="module")
def cluster(local_cluster_spec, timings, request):
    started = time.monotonic()
    cluster = request.getfixturevalue("local_cluster")
    timings["up"] = time.monotonic() - started
    return cluster


@pytest.mark.slow
def test_the_host_reaches_the_job_server_through_the_forwarder(cluster):
    assert cluster.address.startswith("http://127.0.0.1:")
    assert cluster.job_client().list_jobs() == []
    state = status(cluster.workdir)
    assert state.up and [n.node_type for n in state.nodes] == [HEAD_NODE_TYPE]
    assert list(raylet_pids(cluster)) == [state.nodes[0].node_id]


@pytest.mark.slow
def test_a_gpu_task_launches_a_gpu_node_from_zero(cluster, timings):
    assert _alive(cluster, "gpu") == []
    client = cluster.job_client()
    started = time.monotonic()
    job_id = client.submit_job(entrypoint=f"python -c {GPU_TASK!r}")

    def ended() -> str | None:
        if "gpu node up" not in timings and _alive(cluster, "gpu"):
            timings["gpu node up"] = time.monotonic() - started
        job_status = str(client.get_job_status(job_id)).split(".")[-1]
        return job_status if job_status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    final = wait_until(ended, 240, "the GPU job to end")
    timings["gpu job"] = time.monotonic() - started
    timings["job ended at"] = time.monotonic()
    logs = client.get_job_logs(job_id)
    assert final == "SUCCEEDED", logs[-3000:]
    assert "visible: 0" in logs  # a logical GPU: CUDA_VISIBLE_DEVICES is set, there is no CUDA
    launched = [n for n in status(cluster.workdir).nodes if n.node_type == "gpu"]
    assert len(launched) == 1
    assert set(raylet_pids(cluster, "gpu")) <= {launched[0].node_id}  # gone already only if the node idled out


@pytest.mark.slow
def test_inside_the_namespace_ray_init_finds_the_cluster(cluster):
    result = exec_inside(cluster, [sys.executable, "-c", "import ray; ray.init(); print(len(ray.nodes()))"],
                         capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) >= 1


@pytest.mark.slow
def test_an_idle_gpu_node_is_removed_after_the_idle_timeout(cluster, local_cluster_spec, timings):
    wait_until(lambda: not _alive(cluster, "gpu"), local_cluster_spec.idle_timeout_s + 120, "the idle gpu node to go")
    timings["gpu job end -> node gone"] = time.monotonic() - timings.pop("job ended at")
    wait_until(lambda: raylet_pids(cluster, "gpu") == {}, 60, "the removed node's raylet to exit")  # GCS marks it dead first
    assert _alive(cluster, HEAD_NODE_TYPE)


@pytest.mark.slow
def test_a_gpu_node_whose_raylet_dies_is_replaced_while_its_resources_are_requested(cluster, timings):
    """A lost node leaves the provider's list, as on a cloud (jobs/local_provider.py). Ray's fake
    provider kept it, and a standing request for a GPU (what a training job's wait makes) counted the
    dead node as meeting it: no replacement was ever launched."""
    def request(gpus: int) -> None:
        script = ("import sys, ray; from ray.autoscaler.sdk import request_resources; ray.init(); "
                  "request_resources(bundles=[{'GPU': 1}] * int(sys.argv[1]))")
        done = exec_inside(cluster, [sys.executable, "-c", script, str(gpus)], capture_output=True, text=True,
                           timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]

    request(1)
    try:
        first = wait_until(lambda: _alive(cluster, "gpu"), 240, "a gpu node for the request")[0]
        os.kill(raylet_pids(cluster, "gpu")[first], 9)
        lost_at = time.monotonic()
        replacement = wait_until(lambda: [n for n in _alive(cluster, "gpu") if n != first], 300, "a replacement gpu node")
        timings["gpu node lost -> replacement up"] = time.monotonic() - lost_at
        assert replacement
        wait_until(lambda: first not in _alive(cluster, "gpu"), 120, "the lost node marked dead")
    finally:
        request(0)


@pytest.mark.slow
def test_down_leaves_no_process_of_the_cluster(cluster):
    assert namespace_pids(cluster)
    assert down(cluster.workdir) is True
    assert namespace_pids(cluster) == []
    with pytest.raises(ConnectionRefusedError):  # the forwarder has gone too
        socket.create_connection(("127.0.0.1", int(cluster.address.rsplit(":", 1)[1])), timeout=5)
    assert status(cluster.workdir).up is False
    assert down(cluster.workdir) is False
    assert Path(cluster.logs["ray-start"]).exists()  # logs are kept
