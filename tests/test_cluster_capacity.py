"""Capacity, not current size: encode, sampling and training read what the cluster can grow to from
its autoscaler's node types, and choose their workers from that."""
from pathlib import Path

import pytest
import yaml

from jobs.train.launch import WorkerPlan, parse_num_workers, plan_workers
from jobs.train.process_group import backend_for
from pipelines.cluster_capacity import ClusterCapacity, NodeType, node_types_from_autoscaling_config, parse_count_range

ROOT = Path(__file__).resolve().parents[1]


def capacity_of(config: dict, gpus_now: int = 0) -> ClusterCapacity:
    return ClusterCapacity(gpus_now=gpus_now, gpu_nodes_now=0, node_types=node_types_from_autoscaling_config(config),
                           source="test")


def test_the_projects_cluster_yaml_can_grow_to_64_gpus_from_none():
    capacity = capacity_of(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert {t.name: (t.gpus, t.max_workers) for t in capacity.node_types} == {"head": (0, 1), "gpu": (8, 8), "cpu": (0, 10)}
    assert capacity.max_gpus == 64 and capacity.gpus_now == 0
    assert [t.name for t in capacity.gpu_node_types] == ["gpu"]


def test_a_node_types_maximum_is_capped_by_the_clusters():
    config = {"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "g": {"resources": {"GPU": 2}, "max_workers": 10}}}
    assert capacity_of(config).max_gpus == 6
    assert capacity_of(config, gpus_now=8).max_gpus == 8  # never less than what is up


@pytest.mark.parametrize("text,value", [("4", 4), (4, 4), ("2,8", (2, 8)), ((1, 1), (1, 1)), ([1, 3], (1, 3))])
def test_counts_are_n_or_a_min_max_range(text, value):
    assert parse_count_range(text, "--x") == value


@pytest.mark.parametrize("text", ["0", "8,2", "a", "1,2,3", "-1"])
def test_bad_counts_name_the_flag(text):
    with pytest.raises(ValueError, match=f"--x {text!r}"):
        parse_count_range(text, "--x")


GPU = NodeType("gpu", {"CPU": 1, "GPU": 1}, max_workers=2)
CPU = NodeType("cpu", {"CPU": 1}, max_workers=2)


@pytest.mark.parametrize("num_workers,device,types,gpus_now,plan", [
    ("auto", "auto", (CPU, GPU), 0, (True, (1, 2))),   # GPU workers start at 0 and may reach 2
    ("auto", "auto", (CPU,), 0, (False, 1)),
    ("auto", "auto", (NodeType("g", {"GPU": 1}, 1),), 0, (True, 1)),
    ("auto", "cpu", (CPU, GPU), 0, (False, 1)),
    ("1,2", "auto", (CPU, GPU), 0, (True, (1, 2))),
    ("3", "gpu", (GPU,), 0, (True, 3)),
    ("auto", "auto", (), 4, (True, (1, 4))),            # no autoscaler: the GPUs up now
    ("auto", "auto", (), 0, (False, 1)),
])
def test_training_workers_follow_the_capacity(num_workers, device, types, gpus_now, plan):
    capacity = ClusterCapacity(gpus_now=gpus_now, gpu_nodes_now=gpus_now, node_types=types, source="test")
    chosen = plan_workers(parse_num_workers(num_workers), device, capacity)
    assert (chosen.use_gpu, chosen.num_workers) == plan


def test_training_on_a_cluster_that_cannot_have_a_gpu_fails_at_once_with_device_gpu():
    capacity = ClusterCapacity(gpus_now=0, gpu_nodes_now=0, node_types=(CPU,), source="test")
    with pytest.raises(ValueError, match=r"node types are cpu \(CPU=1\) up to 2"):
        plan_workers("auto", "gpu", capacity)


def test_the_worker_plan_says_where_and_how_many_in_one_line():
    capacity = ClusterCapacity(gpus_now=0, gpu_nodes_now=0, node_types=(CPU, GPU), source="autoscaler config c.yaml")
    assert WorkerPlan(True, (1, 2), capacity).describe() == (
        "training workers: 1..2 (elastic: grows as GPU nodes join, shrinks when one is lost), 1 GPU each; "
        "GPU nodes: 0 up (0 GPUs), up to 2 of type gpu (1 GPU each) [autoscaler config c.yaml]")


def test_the_process_group_backend_is_nccl_only_when_every_worker_has_cuda():
    assert backend_for([True, True]) == "nccl"
    assert backend_for([False, False]) == "gloo"  # logical GPUs without CUDA: train on CPU
    with pytest.raises(RuntimeError, match=r"workers \[1\] of 2 have no usable CUDA"):
        backend_for([True, False])


def test_the_autoscalers_own_launch_failure_reason_is_read_from_its_status(ray_cluster):
    """The status record the autoscaler monitor publishes in the GCS (the shape Ray 2.60 writes)."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from pipelines.actor_pool import gpu_timeout_message
    from pipelines.cluster_capacity import autoscaler_launch_failures

    assert autoscaler_launch_failures() == []  # a cluster without an autoscaler reports nothing
    report = {"autoscaler_report": {"failed_nodes": [["10.0.0.7", "gpu"]], "node_availability_summary": {
        "node_availabilities": {"gpu": {"node_type": "gpu", "is_available": False, "last_checked_timestamp": 1.0,
                                        "unavailable_node_information": {
                                            "category": "InsufficientInstanceCapacity",
                                            "description": "no p5.48xlarge capacity in us-east-1a"}},
                                "cpu": {"node_type": "cpu", "is_available": True, "last_checked_timestamp": 1.0,
                                        "unavailable_node_information": None}}}}}
    _internal_kv_put(ray_constants.DEBUG_AUTOSCALING_STATUS, json.dumps(report), overwrite=True)
    try:
        reason = "node type gpu: InsufficientInstanceCapacity: no p5.48xlarge capacity in us-east-1a"
        assert autoscaler_launch_failures() == [reason]
        assert autoscaler_launch_failures(("cpu",)) == []
        capacity = ClusterCapacity(gpus_now=0, gpu_nodes_now=0, node_types=(CPU, GPU), source="test")
        message = gpu_timeout_message("encoder", "encode", 30, capacity)
        assert "none started within 30s (--gpu-wait-s)" in message and f"The autoscaler reports: {reason}." in message
        assert "node types: cpu (CPU=1) up to 2, gpu (CPU=1, GPU=1) up to 2" in message
    finally:
        _internal_kv_del(ray_constants.DEBUG_AUTOSCALING_STATUS)


def test_the_gpu_request_is_merged_with_other_autoscaling_clients_and_withdrawn(ray_cluster):
    """Ray Data jobs and Ray Train's elastic policy ask the autoscaler through Ray's detached
    coordinator, which re-sends the merged requests of its clients and so overwrote a direct
    `request_resources`: the training launch waited for GPUs the autoscaler was never asked for.
    The launch's request goes through the coordinator: it stands beside another client's, and
    leaves it in place when withdrawn."""
    import json

    from polling import wait_until
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import DefaultAutoscalingCoordinator
    from ray.experimental.internal_kv import _internal_kv_get

    from jobs.train.launch import _GpuRequest

    def requested() -> list[dict]:  # what the autoscaler monitor reads
        raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
        return json.loads(raw) if raw else []

    request = _GpuRequest(2, expire_after_s=120)
    wait_until(lambda: requested().count({"GPU": 1}) == 2, 60, "the GPU request reaching the autoscaler")
    data_job = DefaultAutoscalingCoordinator(requester_id="a-ray-data-job")  # what a Ray Data execution does
    data_job.request_resources([{"CPU": 1}], expire_after_s=120)
    wait_until(lambda: {"CPU": 1} in requested() and requested().count({"GPU": 1}) == 2, 60,
               "both requests standing together")
    request.cancel()
    wait_until(lambda: {"GPU": 1} not in requested() and {"CPU": 1} in requested(), 60,
               "the GPU request withdrawn, the other kept")
    data_job.cancel_request()
