"""Training step time: the DiT^DH run on Ray Train (``jobs.train.loop.fit`` with ``DiTTask``, data
from the latent store through Ray Data) against a plain torch loop stepping the same task on the
same model, batch and data (read with ``read_latents``) in this process. Then 2 Ray Train workers
with FSDP2 (gloo, CPU) against 1, the global batch held fixed.

The step time is the median interval between consecutive ``train_step`` calls after warm-up: it
includes waiting for the next batch, and excludes startup and the final checkpoint.

    python -m benchmarks.bench_train_step [--quick]
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    finish,
    PeakMemory,
    Recorder,
    alternate,
    make_latent_store,
    parse_args,
    start_ray,
    steady_step_time,
)
from jobs.train.launch import launch
from jobs.train.parallelize import plan_batches
from jobs.train.loop import LoopConfig, RunContext, Task, fit, ray_shard_batches
from jobs.train.dit import DiTRunConfig, DiTTask, StoreFacts, store_facts


class TimedTask(Task):
    """A task that records when each of its steps starts and ends (the rest is the wrapped task's)."""

    def __init__(self, inner: Task):
        self.inner, self.starts, self.ends = inner, [], []

    def setup(self, ctx: RunContext) -> None:
        self.inner.setup(ctx)

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def lr_at(self, epoch: float) -> float:
        return self.inner.lr_at(epoch)

    def train_step(self, micro_batches: Sequence[dict], step: int, lr: float) -> dict[str, float]:
        self.starts.append(time.perf_counter())
        metrics = self.inner.train_step(micro_batches, step, lr)
        self.ends.append(time.perf_counter())
        return metrics

    def export_state(self):
        return self.inner.export_state()


@dataclass(frozen=True)
class Setup:
    store: str
    model: str
    global_batch: int
    steps: int
    threads: int


def run_config(setup: Setup) -> DiTRunConfig:
    loop = LoopConfig(epochs=1, global_batch_size=setup.global_batch, max_micro_batch=setup.global_batch,
                      checkpoint_every_steps=setup.steps, log_every_steps=10**6, shuffle_buffer=0,
                      cpu_threads=setup.threads)  # the plain loop's thread count, in the worker too
    return DiTRunConfig(store=setup.store, model=setup.model, loop=loop)


def _ray_train_fn(payload: dict) -> None:
    import ray.train

    config: DiTRunConfig = payload["config"]
    rank = ray.train.get_context().get_world_rank()
    task = TimedTask(DiTTask(config, payload["facts"]))
    fit(task, config.loop, run_name=payload["run_name"], rows=payload["facts"].rows,
        batches=ray_shard_batches("train", ["latent", "label"], 0, config.loop.seed, rank))
    if rank == 0:
        Path(payload["timing_file"]).write_text(json.dumps(
            {"starts": task.starts, "ends": task.ends, "threads": torch.get_num_threads()}))


def ray_step_time(setup: Setup, facts: StoreFacts, workers: int, work: Path, name: str) -> dict:
    from pipelines.store_reader import latent_dataset

    config = run_config(setup)
    timing = work / f"{name}.json"
    payload = {"config": config, "facts": facts, "run_name": name, "timing_file": str(timing)}
    with PeakMemory() as memory:
        launch(_ray_train_fn, payload, run_name=name, storage=str(work / "runs"), num_workers=workers,
               datasets={"train": latent_dataset(setup.store, shuffle_files=False)}, max_failures=0,
               cpus_per_worker=1.0 if workers == 1 else 0.5, device="cpu")
    record = json.loads(timing.read_text())
    return {**split_step(record["starts"], record["ends"]), "worker_threads": record["threads"],
            "peak_host_pss_mib": memory.peak_mib}


def split_step(starts: list[float], ends: list[float]) -> dict[str, float]:
    """Step time, and its two parts after warm-up: in ``train_step`` (compute, collectives) and
    between steps (waiting for the next batch, and the loop's own bookkeeping)."""
    inside = np.median(np.asarray(ends[1:-1]) - np.asarray(starts[1:-1]))
    between = np.median(np.asarray(starts[2:]) - np.asarray(ends[1:-1]))
    return {"step_s": steady_step_time(starts), "in_train_step_s": float(inside), "between_steps_s": float(between)}


def plain_step_time(setup: Setup, facts: StoreFacts) -> dict:
    """The same task and data without Ray: one process, batches sliced from ``read_latents``."""
    from pipelines.store_reader import read_latents

    previous = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    config = run_config(setup)
    data = read_latents(setup.store, normalize=True)
    latents, labels = torch.from_numpy(data["latent"]), torch.from_numpy(data["label"]).long()
    plan = plan_batches(setup.global_batch, 1, setup.global_batch)
    task = TimedTask(DiTTask(config, facts))
    torch.manual_seed(config.loop.seed)
    with PeakMemory(tree=False) as memory:
        task.setup(RunContext(rank=0, world=1, device=torch.device("cpu"), plan=plan, steps_per_epoch=setup.steps))
        for step in range(setup.steps):
            rows = slice(step * setup.global_batch, (step + 1) * setup.global_batch)
            task.train_step([{"latent": latents[rows], "label": labels[rows]}], step, 2e-4)
    torch.set_num_threads(previous)
    return {**split_step(task.starts, task.ends), "peak_host_pss_mib": memory.peak_mib}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    grid = 4 if quick else 8
    config = {"model": "ditdh-tiny", "latent": f"{grid * grid} tokens x 384 (DINOv2-S at {grid * 14} px)",
              "global_batch": 8 if quick else 32, "steps": 3 if quick else 16, "repeats": 1 if quick else 2,
              "single_worker_threads": 1, "fsdp_workers": 2, "fsdp_cpus_per_worker": 0.5,
              "precision": "fp32 (CPU)", "backend": "gloo"}
    rec = Recorder("train_step", args, config)
    work = Path(tempfile.mkdtemp(prefix="rae-bench-train-"))
    started_ray = start_ray()
    try:
        store = make_latent_store(f"file://{work}/store", rows=config["global_batch"] * config["steps"],
                                  input_size=grid * 14, parts=2)
        setup = Setup(store, "ditdh-tiny", config["global_batch"], config["steps"], threads=1)
        from pipelines.store_reader import open_store

        facts = store_facts(open_store(store).manifest, run_config(setup), store)
        counter = iter(range(10**6))
        details: dict[str, list[dict]] = {}

        def measure(kind: str) -> float:
            if kind == "plain":
                out = plain_step_time(setup, facts)
            else:
                workers = 1 if kind == "ray_1_worker" else 2
                out = ray_step_time(setup, facts, workers, work, f"{kind}-{next(counter)}")
            details.setdefault(kind, []).append(out)
            return out["step_s"]

        variants = {"plain_loop": lambda: measure("plain"), "ray_1_worker": lambda: measure("ray_1_worker")}
        if not quick:  # (bench_scaling --quick runs 2 FSDP2 workers)
            variants["ray_2_workers_fsdp2"] = lambda: measure("ray_2")
        times = alternate(variants, config["repeats"])
        rec.add("step_s", times)
        rec.add("details", details)
        one = times["ray_1_worker"]["median"]
        rec.add("ratio_ray_1_worker_over_plain", one / times["plain_loop"]["median"])
        if not quick:
            two = times["ray_2_workers_fsdp2"]["median"]
            rec.add("fsdp2_speedup_2_over_1", one / two)
            rec.add("fsdp2_scaling_efficiency", one / (2 * two))
    finally:
        finish(work, started_ray)
    rec.write()


if __name__ == "__main__":
    main()
