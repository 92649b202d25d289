"""A pool of Ray Data actors, one GPU each when the job runs on GPUs, that a job's rows stream through.

The encode job (shards -> latents) and the sample job (parts of the item list -> images) share it:
the GPU-or-CPU decision from the cluster, the pool size, the start deadline of GPU actors (a GPU
request on a cluster that never gets one fails after ``gpu_wait_s`` with one clear message instead
of waiting forever), and a progress bar over the rows as their results come back to the driver.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from pipelines.streaming import streamed_batches

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ActorPool:
    """Where a job's actors run and how many of them, decided once from the cluster."""

    use_gpu: bool
    size: int
    cluster_gpus: int  # GPUs in the cluster when the decision was made

    def map(self, dataset: ray.data.Dataset, actor_cls: type, constructor_kwargs: dict[str, Any]) -> ray.data.Dataset:
        """``dataset`` mapped one row at a time through up to ``size`` actors of ``actor_cls``."""
        return dataset.map_batches(
            actor_cls, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.size),
            fn_constructor_kwargs=constructor_kwargs, **({"num_gpus": 1} if self.use_gpu else {"num_cpus": 1}))


def plan_actor_pool(device: str, num_actors: int | None) -> ActorPool:
    """GPU actors for ``gpu``, or for ``auto`` when the cluster has GPUs; ``num_actors`` of them, else
    one per GPU (one on CPU). Starts a local Ray when none is running."""
    if not ray.is_initialized():
        ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = device == "gpu" or (device == "auto" and gpus > 0)
    return ActorPool(use_gpu=use_gpu, size=num_actors or (max(1, gpus) if use_gpu else 1), cluster_gpus=gpus)


def run_through_pool(rows: list[dict[str, Any]], pool: ActorPool,
                     stages: Callable[[ray.data.Dataset], ray.data.Dataset],
                     on_result: Callable[[Batch], dict[str, Any] | None], *, actors: str, verb: str, unit: str,
                     gpu_wait_s: float, progress: bool) -> None:
    """Stream ``rows`` (one block each) through ``stages`` (which map them through ``pool``) and hand
    each one-row result to ``on_result`` on the driver, in completion order. What ``on_result``
    returns is shown beside the progress bar. ``actors`` and ``verb`` name the job in messages
    ("encoder", "encode")."""
    if pool.use_gpu and pool.cluster_gpus == 0:
        log.warning("%s actors ask for a GPU but the cluster has none now; waiting up to %ss for one "
                    "(an autoscaler may add GPU nodes)", actors, gpu_wait_s)
    # A Dataset keeps the DataContext current at its creation: set the actor start deadline first.
    context = ray.data.DataContext.get_current()
    previous_wait = context.wait_for_min_actors_s
    if pool.use_gpu:
        context.wait_for_min_actors_s = max(1, int(gpu_wait_s))
    bar = tqdm(total=len(rows), unit=unit, desc=verb, disable=not progress)
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
        raise RuntimeError(
            f"{actors} actors need 1 GPU each but none started within {gpu_wait_s:g}s; the cluster has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPU(s) ({_resources_text()}). Add GPU workers, or "
            f"pass --device cpu to {verb} on CPU.") from err
    finally:
        context.wait_for_min_actors_s = previous_wait
        bar.close()


def _resources_text() -> str:
    """The cluster's resources for a message, e.g. ``CPU=16, GPU=0``."""
    return ", ".join(f"{k}={v:g}" for k, v in sorted(ray.cluster_resources().items())
                     if not k.startswith(("node:", "memory", "object_store")))
