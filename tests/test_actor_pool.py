"""The actor-pool decision shared by encode and sample: GPU or CPU, and how many, from what the
cluster can grow to (its autoscaler's node types), not from the GPUs up at submission."""
import pytest

from pipelines.actor_pool import ActorPool, plan_actor_pool
from pipelines.cluster_capacity import ClusterCapacity, NodeType

GPU_TYPE = NodeType("gpu", {"CPU": 192, "GPU": 8}, max_workers=8)
CPU_TYPE = NodeType("cpu", {"CPU": 64}, max_workers=10)


def fixed(gpus: int) -> ClusterCapacity:
    """A cluster without an autoscaler: what is up is all there is."""
    return ClusterCapacity(gpus_now=gpus, gpu_nodes_now=gpus, node_types=(), source="nodes up now")


def autoscaled(gpus_now: int, *types: NodeType) -> ClusterCapacity:
    return ClusterCapacity(gpus_now=gpus_now, gpu_nodes_now=gpus_now // 8, node_types=types, source="test config")


@pytest.mark.parametrize("device,capacity,use_gpu,sizes", [
    ("auto", fixed(0), False, (1, 1)),
    ("auto", fixed(4), True, (1, 4)),
    ("gpu", fixed(0), True, (1, 1)),          # no autoscaler known: waits for a GPU someone may add
    ("gpu", fixed(2), True, (1, 2)),
    ("cpu", fixed(4), False, (1, 1)),
    # cluster.yaml at submission: no GPU up, 8 GPU nodes of 8 possible -> GPUs, a pool of 1..64
    ("auto", autoscaled(0, GPU_TYPE, CPU_TYPE), True, (1, 64)),
    ("auto", autoscaled(16, GPU_TYPE, CPU_TYPE), True, (1, 64)),
    ("auto", autoscaled(0, CPU_TYPE), False, (1, 1)),
    ("cpu", autoscaled(0, GPU_TYPE), False, (1, 1)),
])
def test_gpu_or_cpu_and_the_pool_size_follow_the_capacity(device, capacity, use_gpu, sizes) -> None:
    pool = plan_actor_pool(device, None, capacity=capacity)
    assert (pool.use_gpu, (pool.min_size, pool.max_size)) == (use_gpu, sizes)


def test_num_actors_sets_the_pool_size_fixed_or_as_a_range() -> None:
    capacity = autoscaled(0, GPU_TYPE)
    assert (plan_actor_pool("auto", 2, capacity=capacity).min_size, plan_actor_pool("auto", 2, capacity=capacity).max_size) == (2, 2)
    pool = plan_actor_pool("auto", "2,6", capacity=capacity)
    assert (pool.use_gpu, pool.min_size, pool.max_size) == (True, 2, 6)
    assert plan_actor_pool("cpu", (1, 3), capacity=capacity).max_size == 3
    with pytest.raises(ValueError, match="--num-actors '6,2'"):
        plan_actor_pool("auto", "6,2", capacity=capacity)


def test_device_gpu_on_a_cluster_that_cannot_have_one_fails_naming_its_node_types() -> None:
    with pytest.raises(ValueError, match=r"cannot have a GPU: its node types are cpu \(CPU=64\) up to 10"):
        plan_actor_pool("gpu", None, capacity=autoscaled(0, CPU_TYPE))


def test_the_pool_describes_itself_in_one_line() -> None:
    pool = plan_actor_pool("auto", None, capacity=autoscaled(0, GPU_TYPE, CPU_TYPE))
    assert pool.describe("encoder") == ("encoder pool: 1..64 actors, 1 GPU each; GPU nodes: 0 up (0 GPUs), up to "
                                        "8 of type gpu (8 GPU each) [test config]")
    assert "encoder pool: 1 actors, on CPU" in plan_actor_pool("auto", None, capacity=fixed(0)).describe("encoder")


class _Recorder:
    def map_batches(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs
        return self


@pytest.mark.parametrize("use_gpu,resources", [(True, {"num_gpus": 1}), (False, {"num_cpus": 1})])
def test_each_actor_takes_one_gpu_or_one_cpu_and_one_row_at_a_time(use_gpu: bool, resources: dict) -> None:
    class Actor:
        pass

    pool = ActorPool(use_gpu=use_gpu, min_size=2, max_size=3, capacity=fixed(3))
    dataset = pool.map(_Recorder(), Actor, {"weights": "w"})
    assert dataset.fn is Actor
    compute = dataset.kwargs.pop("compute")
    assert (compute.min_size, compute.max_size) == (2, 3)
    assert dataset.kwargs == {"batch_size": 1, "fn_constructor_kwargs": {"weights": "w"}, **resources}
