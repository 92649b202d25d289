"""Starting a Ray Train run: storage URL, worker count (fixed or elastic), failure and checkpoint
policy. Both ``rae train decoder`` and ``rae train dit`` go through :func:`launch`.

The run name is the user-visible id: Ray keeps the run's checkpoints under ``<storage>/<run>``,
so relaunching with the same name resumes from the newest valid checkpoint, and the same name is
the wandb run id.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pipelines.cluster_capacity import ClusterCapacity, autoscaler_launch_failures, cluster_capacity, parse_count_range
from rae.devices import check_device_choice

log = logging.getLogger(__name__)

AUTO = "auto"


def parse_num_workers(text: str | int | tuple[int, int]) -> int | tuple[int, int] | str:
    """``"4"`` -> 4 workers; ``"2,8"`` -> elastic between 2 and 8 (Ray 2.60 ``ScalingConfig``);
    ``"auto"`` -> decided from the cluster's capacity at launch (:func:`plan_workers`)."""
    if isinstance(text, str) and text.strip() == AUTO:
        return AUTO
    return parse_count_range(text, "--num-workers")


def num_workers_argument(text: str) -> int | tuple[int, int] | str:
    """argparse type of ``--num-workers``: :func:`parse_num_workers`, its refusal said as argparse
    says it (``argument --num-workers: '0': expected ...``) rather than ``invalid ... value``."""
    try:
        return parse_num_workers(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, a worker count N >= 1, or MIN,MAX with "
                                         f"1 <= MIN <= MAX (an elastic run)") from None


def check_run_length(loop: Any) -> None:
    """Refuse, before anything loads or launches, a run that would train nothing (``loop.epochs``
    below 1) or that has no batch to take."""
    if loop.epochs < 1:
        raise ValueError(f"--epochs {loop.epochs} (loop.epochs): a run trains at least 1 epoch; pass --epochs N "
                         f"with N >= 1")
    for name in ("global_batch_size", "max_micro_batch"):
        if getattr(loop, name) < 1:
            raise ValueError(f"loop.{name}={getattr(loop, name)}: expected a size >= 1")
    if getattr(loop, "cpu_threads", 0) < 0:
        raise ValueError(f"loop.cpu_threads={loop.cpu_threads}: expected a thread count >= 1, or 0 to keep the "
                         f"threads Ray gives a worker (its CPU share)")


def check_batch_fits(loop: Any, rows: int, data: str) -> None:
    """Refuse before launch a global batch larger than the data (an epoch would have no step).
    ``data`` names what ``rows`` counts (``the rows of store URL``)."""
    if loop.global_batch_size > rows:
        raise ValueError(f"loop.global_batch_size={loop.global_batch_size} is larger than {data} ({rows}): an "
                         f"epoch would have no step; pass --set loop.global_batch_size=N with N <= {rows}, "
                         f"or train on more data")


@dataclass(frozen=True)
class WorkerPlan:
    """How a run's workers are asked for: GPU or CPU, a fixed count or an elastic range."""

    use_gpu: bool
    num_workers: int | tuple[int, int]
    capacity: ClusterCapacity | None  # None when the decision needed no look at the cluster

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    def describe(self) -> str:
        """``training workers: 1..8 (elastic), 1 GPU each; GPU nodes: 0 up (0 GPUs), up to 8 of type gpu ...``."""
        count = self.num_workers
        size = f"{count[0]}..{count[1]} (elastic: grows as GPU nodes join, shrinks when one is lost)" \
            if isinstance(count, tuple) else str(count)
        where = "1 GPU each" if self.use_gpu else "on CPU"
        cluster = f"; {self.capacity.describe_gpus()}" if self.capacity is not None else ""
        return f"training workers: {size}, {where}{cluster}"


def plan_workers(num_workers: int | tuple[int, int] | str, device: str, capacity: ClusterCapacity) -> WorkerPlan:
    """GPU workers for ``gpu``, or for ``auto`` when the cluster has or can add GPUs (its autoscaler's
    node types, not the GPUs up now). ``auto`` workers: 1..one per GPU the cluster can have (a fixed
    1 when that is 1), or 1 on CPU. ``--device gpu`` where the autoscaler has no GPU node type fails."""
    check_device_choice(device)
    if device == "gpu" and capacity.max_gpus == 0 and capacity.node_types:
        raise ValueError(f"--device gpu, but this cluster cannot have a GPU: its node types are "
                         f"{capacity.describe_node_types()}. Add a GPU node type, or pass --device cpu.")
    use_gpu = device == "gpu" or (device == "auto" and capacity.max_gpus > 0)
    if num_workers == AUTO:
        most = max(1, capacity.max_gpus) if use_gpu else 1
        num_workers = (1, most) if most > 1 else 1
    return WorkerPlan(use_gpu=use_gpu, num_workers=parse_count_range(num_workers, "--num-workers"), capacity=capacity)


class _GpuRequest:
    """A standing request to the autoscaler for GPUs, made through Ray's autoscaling coordinator.

    ``ray.autoscaler.sdk.request_resources`` replaces the cluster's whole request, and once a Ray
    Data job has run on the cluster its detached coordinator actor re-sends the merged requests of
    its clients every 20 s, clobbering a direct request (seen: the GPU request gone 2 s after it was
    made, no node ever launched). Ray Data and Ray Train's elastic policy ask through the coordinator,
    so the request goes there too and is merged with theirs; a Ray without it gets the direct call.
    """

    def __init__(self, count: int, expire_after_s: float):
        bundles = [{"GPU": 1}] * count
        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                DefaultAutoscalingCoordinator,
            )
        except ImportError:  # an older or newer Ray: the SDK call is the public interface
            from ray.autoscaler.sdk import request_resources

            self._coordinator = None
            request_resources(bundles=bundles)
            self._cancel = lambda: request_resources(bundles=[])
            return
        self._coordinator = DefaultAutoscalingCoordinator(requester_id=f"rae-train-gpus-{uuid.uuid4().hex[:8]}")
        self._coordinator.request_resources(bundles, expire_after_s=expire_after_s)
        self._cancel = self._coordinator.cancel_request

    def cancel(self) -> None:
        self._cancel()


def wait_for_gpus(count: int, wait_s: float, capacity: ClusterCapacity) -> None:
    """Ask the autoscaler for ``count`` GPUs and wait until they are up; after ``wait_s`` fail with
    the autoscaler's own reason when it reports one. The request is withdrawn either way (the
    run's placement group holds the GPUs from then on)."""
    import ray

    def gpus_up() -> float:
        return ray.cluster_resources().get("GPU", 0)

    if gpus_up() >= count:
        return
    log.info("waiting up to %gs for %d GPU(s) while the autoscaler adds GPU nodes (%d up)", wait_s, count, gpus_up())
    start = time.monotonic()
    request = _GpuRequest(count, expire_after_s=wait_s + 60)
    try:
        while gpus_up() < count:
            if time.monotonic() - start > wait_s:
                reasons = autoscaler_launch_failures(tuple(t.name for t in capacity.gpu_node_types) or None)
                why = f" The autoscaler reports: {'; '.join(reasons)}." if reasons else ""
                raise RuntimeError(
                    f"training needs {count} GPU(s) but {gpus_up():g} came up within {wait_s:g}s (--gpu-wait-s); "
                    f"node types: {capacity.describe_node_types()}.{why} Add GPU workers, raise --gpu-wait-s, "
                    f"or pass --device cpu.")
            time.sleep(1.0)
        log.info("%d GPU(s) up after %.0fs", gpus_up(), time.monotonic() - start)
    finally:
        request.cancel()


def storage_location(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig. Local paths and file:// need no
    filesystem; every other URL (s3://, gs://, memory://, ...) goes through fsspec (s3fs, gcsfs)
    wrapped in a pyarrow filesystem, so checkpoints use the same client, credentials and endpoint
    (``AWS_ENDPOINT_URL``) as the shards, the stores and the exports."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        from pathlib import Path

        return str(Path(parsed.path if parsed.scheme else url).expanduser().resolve()), None
    import fsspec
    import pyarrow.fs

    filesystem, path = fsspec.core.url_to_fs(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))


def absolute_storage(url: str) -> str:
    """A storage URL every worker resolves the same way: local paths made absolute."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return storage_location(url)[0]
    return url


def launch(train_fn: Callable[[dict], None], config: dict[str, Any], *, run_name: str, storage: str,
           num_workers: int | tuple[int, int] | str = AUTO, datasets: dict[str, Any] | None = None,
           keep_checkpoints: int = 3, max_failures: int = 3, device: str = "auto",
           cpus_per_worker: float | None = None, gpu_wait_s: float = 600.0, resize_check_s: float = 60.0):
    """Run ``train_fn(config)`` on Ray Train workers (:func:`plan_workers`); return the ``Result``.

    Datasets are split equally across workers with Ray Data's order preserved, so the same seed
    gives the same batches on every rank (what makes a resumed run match an uninterrupted one). An
    elastic run checks every ``resize_check_s`` whether it can grow (a resize restarts the workers
    from the last checkpoint, which DCP re-shards to the new count).
    """
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from jobs.train.process_group import WorkerChosenTorchConfig
    from pipelines.ray_start import init_ray

    if not run_name or "/" in run_name:
        raise ValueError(f"run name {run_name!r}: expected a non-empty name without '/'")
    if not ray.is_initialized():
        init_ray()
    plan = plan_workers(num_workers, device, cluster_capacity())
    log.info("%s", plan.describe())
    if plan.use_gpu:
        wait_for_gpus(plan.min_workers, gpu_wait_s, plan.capacity)
    resources = {"CPU": cpus_per_worker} if cpus_per_worker is not None else None
    if plan.use_gpu:
        resources = dict(resources or {"CPU": 1}, GPU=1)
    storage_path, filesystem = storage_location(storage)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=WorkerChosenTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=resize_check_s),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()


def train_task(task: Any, loop: Any, *, rows: int, run_config: dict[str, Any], run_name: str, storage: str,
               dataset: Any = None, **launch_options: Any):
    """Train ``task`` (a :class:`jobs.train.loop.Task`, built on the driver and set up on each worker)
    with ``loop`` on ``dataset`` (a Ray Dataset; None when the task reads its data itself,
    ``Task.batch_source``); at the end rank 0 writes the export to ``<storage>/<run_name>/export``.
    Both ``rae train decoder`` and ``rae train dit`` come through here; returns Ray's ``Result``.
    While the console is quiet (:mod:`jobs.console`), rank 0's progress comes back through a queue."""
    from jobs.console import worker_progress
    from jobs.train.export import export_url

    loop = with_wandb_dir(loop, storage, run_name)
    with worker_progress() as progress_sink:
        payload = {"task": task, "loop": loop, "rows": rows, "run_config": run_config, "run_name": run_name,
                   "export_url": export_url(absolute_storage(storage), run_name), "progress_sink": progress_sink}
        datasets = {"train": dataset} if dataset is not None else None
        return launch(_fit_task, payload, run_name=run_name, storage=storage, datasets=datasets,
                      keep_checkpoints=loop.keep_checkpoints, **launch_options)


def with_wandb_dir(loop: Any, storage: str, run_name: str) -> Any:
    """``loop`` with wandb writing into the run's folder, ``<storage>/<run_name>`` (wandb adds its
    ``wandb/`` folder there), when the storage is on a local disk and neither ``loop.wandb.dir``
    nor ``WANDB_DIR`` says otherwise. With a remote storage wandb keeps its own default: the
    worker's working directory (Ray's session folder on rank 0's node), unless one of those is set."""
    if loop.wandb.dir is not None or os.environ.get("WANDB_DIR") or urlparse(storage).scheme not in ("", "file"):
        return loop
    run_dir = f"{absolute_storage(storage)}/{run_name}"
    return dataclasses.replace(loop, wandb=dataclasses.replace(loop.wandb, dir=run_dir))


def describe_failure(error: BaseException) -> str:
    """One line saying why Ray Train gave up: the first failing worker's error (or the controller's)."""
    failures = getattr(error, "worker_failures", None) or {}
    where = ""
    if failures:
        rank = min(failures)
        error, where = failures[rank], f"worker {rank}: "
    elif getattr(error, "controller_failure", None) is not None:
        error = error.controller_failure
    while getattr(error, "cause", None) is not None:  # a RayTaskError wraps the task's own exception
        error = error.cause
    text = " ".join(str(error).split()) or "(no message)"
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{where}{type(error).__name__}: {text}"


def worker_logs_location() -> str:
    """Where this machine's Ray session keeps the workers' logs (each node has its own)."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # private API, and no session when Ray never started: fall back to its default link
        session = "/tmp/ray/session_latest"
    return os.path.join(session, "logs")


def _fit_task(payload: dict[str, Any]) -> None:
    import functools

    import ray.train

    from jobs.train.loop import fit, ray_shard_batches
    from jobs.train.progress import send_to

    send_to(payload.get("progress_sink"))
    task, loop = payload["task"], payload["loop"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    batches = task.batch_source(loop, rank, context.get_world_size()) or ray_shard_batches(
        "train", task.columns, loop.shuffle_buffer, loop.seed, rank, task.collate_fn())
    fit(task, loop, run_name=payload["run_name"], rows=payload["rows"], batches=batches,
        run_config=payload["run_config"], export=functools.partial(task.write_export, payload["export_url"]))

