"""A pool of Ray Data actors, one GPU each when the job runs on GPUs, that a job's rows stream through.

The encode job (shards -> latents) and the sample job (parts of the item list -> images) share it:
the GPU-or-CPU decision and the pool's size range, both from what the cluster can grow to (its
autoscaler's node types, :mod:`pipelines.cluster_capacity`) rather than the GPUs up at submission,
so a cluster whose GPU workers start at 0 still runs the job on GPUs and the pool grows as GPU nodes
join; the start deadline of GPU actors (a GPU request that no node ever serves fails after
``gpu_wait_s`` with the autoscaler's reason instead of waiting forever); and a progress bar over the
rows as their results come back to the driver.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from pipelines.cluster_capacity import ClusterCapacity, autoscaler_launch_failures, cluster_capacity, parse_count_range
from pipelines.ray_start import init_ray
from pipelines.streaming import streamed_batches
from pipelines.user_console import user_stderr

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ActorPool:
    """Where a job's actors run and how many of them, decided once from the cluster's capacity."""

    use_gpu: bool
    min_size: int
    max_size: int
    capacity: ClusterCapacity

    def map(self, dataset: ray.data.Dataset, actor_cls: type, constructor_kwargs: dict[str, Any]) -> ray.data.Dataset:
        """``dataset`` mapped one row at a time through ``min_size..max_size`` actors of ``actor_cls``."""
        return dataset.map_batches(
            actor_cls, batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size),
            fn_constructor_kwargs=constructor_kwargs, **({"num_gpus": 1} if self.use_gpu else {"num_cpus": 1}))

    def describe(self, actors: str) -> str:
        """``encoder pool: 1..8 actors, 1 GPU each; GPU nodes: 0 up (0 GPUs), up to 8 of type gpu ...``."""
        size = f"{self.min_size}" if self.min_size == self.max_size else f"{self.min_size}..{self.max_size}"
        where = "1 GPU each" if self.use_gpu else "on CPU"
        return f"{actors} pool: {size} actors, {where}; {self.capacity.describe_gpus()}"


def plan_actor_pool(device: str, num_actors: str | int | tuple[int, int] | None, *,
                    capacity: ClusterCapacity | None = None) -> ActorPool:
    """GPU actors for ``gpu``, or for ``auto`` when the cluster has or can add GPUs; ``num_actors``
    of them (N, or MIN,MAX), else 1..one per GPU the cluster can have (one on CPU). Starts a local
    Ray when none is running. ``--device gpu`` on a cluster whose autoscaler has no GPU node type
    fails at once, naming its node types."""
    if not ray.is_initialized():
        init_ray()
    capacity = capacity or cluster_capacity()
    if device == "gpu" and capacity.max_gpus == 0 and capacity.node_types:
        raise ValueError(f"--device gpu, but this cluster cannot have a GPU: its node types are "
                         f"{capacity.describe_node_types()}. Add a GPU node type to the cluster config, "
                         f"or pass --device cpu.")
    use_gpu = device == "gpu" or (device == "auto" and capacity.max_gpus > 0)
    if num_actors is not None:
        count = parse_count_range(num_actors, "--num-actors")
        low, high = count if isinstance(count, tuple) else (count, count)
    elif use_gpu:
        low, high = 1, max(1, capacity.max_gpus)
    else:
        low, high = 1, 1
    return ActorPool(use_gpu=use_gpu, min_size=low, max_size=high, capacity=capacity)


def run_through_pool(rows: list[dict[str, Any]], pool: ActorPool,
                     stages: Callable[[ray.data.Dataset], ray.data.Dataset],
                     on_result: Callable[[Batch], dict[str, Any] | None], *, actors: str, verb: str, unit: str,
                     gpu_wait_s: float, progress: bool) -> None:
    """Stream ``rows`` (one block each) through ``stages`` (which map them through ``pool``) and hand
    each one-row result to ``on_result`` on the driver, in completion order. What ``on_result``
    returns is shown beside the progress bar. ``actors`` and ``verb`` name the job in messages
    ("encoder", "encode")."""
    log.info("%s", pool.describe(actors))
    if pool.use_gpu and pool.capacity.gpus_now == 0:
        log.info("no GPU is up yet: waiting up to %gs for the first GPU actor while the autoscaler adds GPU nodes",
                 gpu_wait_s)
    # A Dataset keeps the DataContext current at its creation: set the actor start deadline first.
    context = ray.data.DataContext.get_current()
    previous_wait = context.wait_for_min_actors_s
    if pool.use_gpu:
        context.wait_for_min_actors_s = max(1, int(gpu_wait_s))
    bar = tqdm(total=len(rows), unit=unit, desc=verb, disable=not progress, file=user_stderr())
    try:
        dataset = stages(ray.data.from_items(rows, override_num_blocks=len(rows)))
        with streamed_batches(dataset, batch_size=1, batch_format="numpy", prefetch_batches=0) as batches:
            for batch in batches:
                postfix = on_result(batch)
                bar.update(1)
                if postfix:
                    bar.set_postfix(postfix)
    except ray.exceptions.GetTimeoutError as err:
        if not pool.use_gpu:
            raise
        raise RuntimeError(gpu_timeout_message(actors, verb, gpu_wait_s, pool.capacity)) from err
    finally:
        context.wait_for_min_actors_s = previous_wait
        bar.close()


def gpu_timeout_message(actors: str, verb: str, gpu_wait_s: float, capacity: ClusterCapacity) -> str:
    """Why GPU actors never started: the autoscaler's launch failures when it reports any."""
    reasons = autoscaler_launch_failures(tuple(t.name for t in capacity.gpu_node_types) or None)
    why = f" The autoscaler reports: {'; '.join(reasons)}." if reasons else ""
    return (f"{actors} actors need 1 GPU each but none started within {gpu_wait_s:g}s (--gpu-wait-s); the "
            f"cluster has {ray.cluster_resources().get('GPU', 0):g} GPU(s) up ({_resources_text()}); node types: "
            f"{capacity.describe_node_types()}.{why} Add GPU workers, raise --gpu-wait-s, or pass --device cpu "
            f"to {verb} on CPU.")


def _resources_text() -> str:
    """The cluster's resources for a message, e.g. ``CPU=16, GPU=0``."""
    return ", ".join(f"{k}={v:g}" for k, v in sorted(ray.cluster_resources().items())
                     if not k.startswith(("node:", "memory", "object_store")))
