"""The actor-pool decision shared by encode and sample: GPU or CPU from the cluster, and how many."""
import pytest
import ray

from pipelines.actor_pool import ActorPool, plan_actor_pool


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    """A fake running cluster with the given number of GPUs (no Ray started)."""
    def with_gpus(gpus: int) -> None:
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(gpus)} if gpus else {"CPU": 16.0})
    return with_gpus


@pytest.mark.parametrize("device,gpus,use_gpu,size", [
    ("auto", 0, False, 1),
    ("auto", 4, True, 4),
    ("gpu", 0, True, 1),   # waits for a GPU an autoscaler may add
    ("gpu", 2, True, 2),
    ("cpu", 4, False, 1),
])
def test_gpu_or_cpu_and_the_pool_size_follow_the_cluster(cluster, device: str, gpus: int, use_gpu: bool,
                                                         size: int) -> None:
    cluster(gpus)
    assert plan_actor_pool(device, None) == ActorPool(use_gpu=use_gpu, size=size, cluster_gpus=gpus)


def test_num_actors_sets_the_pool_size(cluster) -> None:
    cluster(4)
    assert plan_actor_pool("auto", 2).size == 2
    assert plan_actor_pool("cpu", 3) == ActorPool(use_gpu=False, size=3, cluster_gpus=4)


class _Recorder:
    def map_batches(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs
        return self


@pytest.mark.parametrize("use_gpu,resources", [(True, {"num_gpus": 1}), (False, {"num_cpus": 1})])
def test_each_actor_takes_one_gpu_or_one_cpu_and_one_row_at_a_time(use_gpu: bool, resources: dict) -> None:
    class Actor:
        pass

    dataset = ActorPool(use_gpu=use_gpu, size=3, cluster_gpus=3).map(_Recorder(), Actor, {"weights": "w"})
    assert dataset.fn is Actor
    compute = dataset.kwargs.pop("compute")
    assert (compute.min_size, compute.max_size) == (1, 3)
    assert dataset.kwargs == {"batch_size": 1, "fn_constructor_kwargs": {"weights": "w"}, **resources}
