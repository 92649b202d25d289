"""Starting a Ray Train run: storage URL, worker count (fixed or elastic), failure and checkpoint
policy. Both ``rae train decoder`` and ``rae train dit`` go through :func:`launch`.

The run name is the user-visible id: Ray keeps the run's checkpoints under ``<storage>/<run>``,
so relaunching with the same name resumes from the newest valid checkpoint, and the same name is
the wandb run id.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse


def parse_num_workers(text: str | int | tuple[int, int]) -> int | tuple[int, int]:
    """``"4"`` -> 4 workers; ``"2,8"`` -> elastic between 2 and 8 (Ray 2.60 ``ScalingConfig``)."""
    if isinstance(text, (int, tuple)):
        return text
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--num-workers {text!r}: expected N or MIN,MAX (integers)") from None
    if len(values) == 1 and values[0] >= 1:
        return values[0]
    if len(values) == 2 and 1 <= values[0] <= values[1]:
        return (values[0], values[1])
    raise ValueError(f"--num-workers {text!r}: expected N >= 1 or MIN,MAX with 1 <= MIN <= MAX")


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
           num_workers: int | tuple[int, int], datasets: dict[str, Any] | None = None,
           keep_checkpoints: int = 3, max_failures: int = 3, use_gpu: bool | None = None,
           cpus_per_worker: float | None = None):
    """Run ``train_fn(config)`` on ``num_workers`` Ray Train workers; return the ``Result``.

    Datasets are split equally across workers with Ray Data's order preserved, so the same seed
    gives the same batches on every rank (what makes a resumed run match an uninterrupted one).
    """
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    if not run_name or "/" in run_name:
        raise ValueError(f"run name {run_name!r}: expected a non-empty name without '/'")
    if not ray.is_initialized():
        ray.init()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": cpus_per_worker} if cpus_per_worker is not None else None
    if use_gpu:
        resources = dict(resources or {}, GPU=1)
    storage_path, filesystem = storage_location(storage)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=parse_num_workers(num_workers),
                                               use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()


def train_task(task: Any, loop: Any, *, rows: int, run_config: dict[str, Any], run_name: str, storage: str,
               dataset: Any, num_workers: int | tuple[int, int], max_failures: int = 3,
               cpus_per_worker: float | None = None):
    """Train ``task`` (a :class:`jobs.train.loop.Task`, built on the driver and set up on each worker)
    with ``loop`` on ``dataset``; at the end rank 0 writes the export to ``<storage>/<run_name>/export``.
    Both ``rae train decoder`` and ``rae train dit`` come through here; returns Ray's ``Result``."""
    from jobs.train.export import export_url

    payload = {"task": task, "loop": loop, "rows": rows, "run_config": run_config, "run_name": run_name,
               "export_url": export_url(absolute_storage(storage), run_name)}
    return launch(_fit_task, payload, run_name=run_name, storage=storage, num_workers=num_workers,
                  datasets={"train": dataset}, keep_checkpoints=loop.keep_checkpoints,
                  max_failures=max_failures, cpus_per_worker=cpus_per_worker)


def _fit_task(payload: dict[str, Any]) -> None:
    import functools

    import ray.train

    from jobs.train.loop import fit, ray_shard_batches

    task, loop = payload["task"], payload["loop"]
    rank = ray.train.get_context().get_world_rank()
    fit(task, loop, run_name=payload["run_name"], rows=payload["rows"],
        batches=ray_shard_batches("train", task.columns, loop.shuffle_buffer, loop.seed, rank),
        run_config=payload["run_config"], export=functools.partial(task.write_export, payload["export_url"]))

