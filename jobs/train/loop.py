"""The training loop both runs share. The model-specific part is a :class:`Task` (build, loss,
backward, optimizer step, EMA: see :mod:`jobs.train.optimizer_step` for the shared parts of a step); the
loop around it is the batch plan, the LR schedule, the seeds, and two helpers it delegates to: a
:class:`~jobs.train.metrics_logger.MetricsLogger` (progress line, wandb, history, reports) and a
:class:`~jobs.train.checkpointing.Checkpointer` (when to save, DCP, reporting to Ray Train, restore).

A run is counted in optimizer steps of one *global* batch; an epoch is ``rows // global_batch``
steps on every rank, so ranks never disagree on the number of collectives (uneven batches
deadlock). Everything random in a step is seeded from ``(seed, step, rank)`` and the data order
from ``(seed, epoch, rank)``, so a run resumed from a checkpoint replays exactly what the
uninterrupted run would have done: the checkpoint holds model, optimizer, EMA and the step; the
data position is the step (the resumed epoch skips the batches it already trained on).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines.exports import write_export
from jobs.train.checkpointing import Checkpointer, ModelState
from jobs.train.lr_schedule import LRSchedule
from jobs.train.metrics_logger import MetricsLogger
from jobs.train.optimizer_step import Batch, accumulate_gradients, apply_update
from jobs.train.parallelize import (
    BatchPlan,
    compile_enabled,
    compute_dtype,
    plan_batches,
    shard_model,
    training_device,
)
from jobs.train.wandb_logging import WandbConfig
from rae.ema import EMA

BatchSource = Callable[[int, int], Iterator[Batch]]  # (epoch, micro_batch) -> batches of that size


@dataclass
class OptimConfig:
    """AdamW with the paper's settings (both stages): betas (0.9, 0.95), no weight decay."""

    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: LRSchedule = field(default_factory=LRSchedule)


@dataclass
class LoopConfig:
    """How long and how often: the parts of a run that are not the model."""

    epochs: int = 800
    global_batch_size: int = 1024
    max_micro_batch: int = 64
    seed: int = 0
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch
    keep_checkpoints: int = 3
    log_every_steps: int = 50
    shuffle_buffer: int = 0  # rows in the local shuffle buffer; 0: stored order
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or bf16 / fp32
    compile: str = "auto"  # torch.compile each transformer block: auto (CUDA only), on, off
    # torch's threads on a CPU worker; 0: as Ray set them (its CPU share, at least 1: a worker holding
    # 0.5 CPU runs one thread, whatever the node has). The demo's one decoder worker sets the machine's cores.
    cpu_threads: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunContext:
    rank: int
    world: int
    device: torch.device
    plan: BatchPlan
    steps_per_epoch: int = 0  # lets a task turn a step into fractional epochs (the GAN schedule)
    dtype: torch.dtype | None = None  # autocast dtype of forward passes; None: fp32
    compile: bool = False  # compile the model's transformer blocks

    def epoch(self, step: int) -> float:
        """Fractional epochs completed before ``step``."""
        return step / self.steps_per_epoch if self.steps_per_epoch else 0.0


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


def full_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain full fp32 CPU tensors from a possibly sharded state dict (under FSDP2 the entries are
    DTensors and gathering them is a collective: every rank calls this)."""
    out = {}
    for name, value in tensors.items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = full.detach().cpu().contiguous()
        if out[name].is_floating_point():
            out[name] = out[name].float()
    return out


class Task(ABC):
    """The model-specific part of a run. ``setup`` builds and shards the model(s) and optimizers;
    ``state`` names what a checkpoint holds; ``lr_at`` is the learning rate at a (fractional)
    epoch; ``train_step`` takes one global step on this rank's micro-batches (loss, backward,
    optimizer step, EMA) and returns its metrics; ``export_state`` returns what the exported
    checkpoint holds and ``write_export`` writes it. ``columns`` are the dataset columns a step reads."""

    columns: tuple[str, ...] = ()

    def collate_fn(self) -> Any:
        """How this rank's Ray Data batches become tensors (``iter_torch_batches(collate_fn=...)``),
        built in the worker; None: Ray's default."""
        return None

    def batch_source(self, loop: LoopConfig, rank: int, world: int) -> BatchSource | None:
        """This rank's batches when the task reads its data itself, built in the worker (``world``: the
        attempt's worker count, which an elastic run changes); None: the ``train`` Ray Dataset's shard."""
        return None

    @abstractmethod
    def setup(self, ctx: RunContext) -> None:
        ...

    @abstractmethod
    def state(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def lr_at(self, epoch: float) -> float:
        ...

    @abstractmethod
    def train_step(self, micro_batches: Sequence[Batch], step: int, lr: float) -> dict[str, float]:
        ...

    @abstractmethod
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        ...

    def write_export(self, url: str, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write the consolidated export (rank 0, after training) to ``url``."""
        write_export(url, weights, meta)


class SingleModelTask(Task, ABC):
    """One model, AdamW, EMA: the DiT run, and the stand-in model in the scaffold's tests.

    Subclasses give ``build_model`` (unsharded, on CPU), ``shard_units`` (the modules wrapped
    as their own FSDP2 units), ``per_sample_loss`` and ``export_config``.
    """

    def __init__(self, optim: OptimConfig, ema_decay: float) -> None:
        self.optim = optim
        self.ema_decay = ema_decay

    @abstractmethod
    def build_model(self) -> nn.Module:
        ...

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return []

    @abstractmethod
    def per_sample_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ...

    @abstractmethod
    def export_config(self) -> dict[str, Any]:
        ...

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        model = self.build_model()
        self.model = shard_model(model, self.shard_units(model), ctx.device, dtype=ctx.dtype, compile=ctx.compile)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.optim.schedule.base_lr,
                                           betas=self.optim.betas, weight_decay=self.optim.weight_decay)
        self.ema = EMA(self.model, self.ema_decay)  # shadows are DTensors sharded like the model

    def state(self) -> dict[str, Any]:
        return {"model": ModelState(self.model, self.optimizer), "ema": self.ema}

    def lr_at(self, epoch: float) -> float:
        return self.optim.schedule(epoch)

    def train_step(self, micro_batches: Sequence[Batch], step: int, lr: float) -> dict[str, float]:
        self.model.train()
        device = self.ctx.device
        batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        local = accumulate_gradients(self.model, batches, self._loss, dtype=self.ctx.dtype)
        outcome = apply_update(self.model, self.optimizer, local.loss, lr=lr, grad_clip=self.optim.grad_clip)
        if not outcome.skipped:
            self.ema.update(self.model)
        return outcome.metrics()

    def _loss(self, batch: Batch) -> torch.Tensor:
        losses = self.per_sample_loss(self.model, batch)
        if losses.dim() != 1:
            raise ValueError(f"per-sample loss must be 1-D (B,), got shape {tuple(losses.shape)}")
        return losses

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return full_state_dict(self.ema.shadow), self.export_config()


def exact_batches(batches: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Re-chunk a stream of batches into batches of exactly ``size`` rows (a local shuffle buffer
    may yield short batches mid-stream); a short tail is dropped."""
    pending: list[Batch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(next(iter(batch.values())))
        while held >= size:
            merged = {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            held -= size
            pending = [rest] if held else []


def ray_shard_batches(dataset_name: str, columns: Sequence[str], shuffle_buffer: int,
                      seed: int, rank: int, collate_fn: Any = None) -> BatchSource:
    """This worker's share of a Ray Dataset passed to the trainer, one pass per epoch; ``collate_fn``
    (a task's :meth:`Task.collate_fn`) makes the tensors, else Ray's default does."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset_name)
    # Ray's default is the worker's accelerator, cuda:0 for any worker holding a Ray GPU, even one
    # without usable CUDA; batches go where this worker trains.
    device = training_device()

    def batches(epoch: int, micro: int) -> Iterator[Batch]:
        stream = shard.iter_torch_batches(
            batch_size=micro, drop_last=False, dtypes=None, device=device, collate_fn=collate_fn,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=mix_seed(seed, epoch, rank) % (2**31) if shuffle_buffer else None)
        for batch in exact_batches(stream, micro):
            yield {c: batch[c] for c in columns}

    return batches


def fit(task: Task, loop: LoopConfig, *, run_name: str, rows: int, batches: BatchSource,
        run_config: dict[str, Any] | None = None,
        export: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None) -> None:
    """Run (or resume) training inside a Ray Train worker. Every rank calls this. At the end,
    ``export(state_dict, config)`` is called on rank 0 with the consolidated EMA weights."""
    import ray.train

    context = ray.train.get_context()
    ctx = run_context(loop, rows, rank=context.get_world_rank(), world=context.get_world_size())
    if ctx.device.type == "cpu" and loop.cpu_threads:
        torch.set_num_threads(loop.cpu_threads)
    total_steps = ctx.steps_per_epoch * loop.epochs
    torch.manual_seed(loop.seed)  # identical initial weights on every rank, before sharding
    task.setup(ctx)
    checkpointer = Checkpointer(task.state, every_steps=loop.checkpoint_every_steps or ctx.steps_per_epoch,
                                total_steps=total_steps, rank=ctx.rank, world_size=ctx.world)
    restored = checkpointer.restore()
    start = int(restored["step"]) if restored else 0
    metrics = MetricsLogger(run_name=run_name, rank=ctx.rank, total_steps=total_steps,
                            steps_per_epoch=ctx.steps_per_epoch, global_batch=ctx.plan.global_batch,
                            log_every_steps=loop.log_every_steps, start_step=start, trainer_state=restored,
                            wandb=loop.wandb, run_config=run_config)
    metrics.say(_start_line(ctx, start, total_steps, restored))
    try:
        for step, micro_batches in enumerate(step_batches(batches, ctx, start, total_steps), start=start):
            lr = task.lr_at(ctx.epoch(step))
            torch.manual_seed(mix_seed(loop.seed, step, ctx.rank))
            outcome = task.train_step(micro_batches, step, lr)
            done = step + 1
            metrics.log(done, lr, outcome)
            if checkpointer.due(done):
                checkpointer.save(done, metrics.report(done, lr), metrics.trainer_state())
        if export is not None:
            final = max(start, total_steps)
            _export(task, export, ctx.rank, dict(run=run_name, step=final, history=metrics.history))
    finally:
        metrics.finish()


def run_context(loop: LoopConfig, rows: int, *, rank: int, world: int) -> RunContext:
    """This rank's view of the run: device, precision, compilation, batch plan, epoch length."""
    plan = plan_batches(loop.global_batch_size, world, loop.max_micro_batch)
    steps_per_epoch = rows // loop.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {rows} rows, fewer than one global batch of "
                         f"{loop.global_batch_size}; lower global_batch_size")
    device = training_device()
    return RunContext(rank=rank, world=world, device=device, plan=plan, steps_per_epoch=steps_per_epoch,
                      dtype=compute_dtype(loop.precision, device), compile=compile_enabled(loop.compile, device))


def _start_line(ctx: RunContext, step: int, total_steps: int, restored: dict[str, Any] | None) -> str:
    plan = ctx.plan
    where = f"resumed at step {step} from {restored['restored_from']}" if restored else "fresh start"
    threads = torch.get_num_threads()
    device = str(ctx.device) + (f" with {threads} torch thread{'s' * (threads > 1)}" if ctx.device.type == "cpu" else "")
    if ctx.device.type == "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES"):
        device += " (this worker holds a Ray GPU without usable CUDA: training on CPU with gloo)"
    return (f"{where} on {device}; {ctx.world} workers x {plan.accum_steps} micro-batches of {plan.micro} = global "
            f"batch {plan.global_batch}; {ctx.steps_per_epoch} steps/epoch, {total_steps} steps")


def step_batches(batches: BatchSource, ctx: RunContext, start: int, total_steps: int) -> Iterator[list[Batch]]:
    """This rank's micro-batches for each step from ``start`` to ``total_steps``, one epoch's
    stream after another. A resumed epoch skips what the steps before ``start`` trained on (the
    data position is ``position x accum_steps`` micro-batches into the epoch's stream)."""
    plan, per_epoch = ctx.plan, ctx.steps_per_epoch
    step = start
    while step < total_steps:
        epoch, position = divmod(step, per_epoch)
        stream = batches(epoch, plan.micro)
        for _ in range(position * plan.accum_steps):
            _next_batch(stream, epoch, step)
        end = min((epoch + 1) * per_epoch, total_steps)
        for at in range(step, end):
            yield [_next_batch(stream, epoch, at) for _ in range(plan.accum_steps)]
        step = end


def _next_batch(stream: Iterator[Batch], epoch: int, step: int) -> Batch:
    try:
        return next(stream)
    except StopIteration:
        raise RuntimeError(f"data ran out in epoch {epoch} at step {step}: this worker's shard is "
                           f"smaller than steps_per_epoch x per-rank batch (was the dataset split "
                           f"with equal=False?)") from None


def _export(task: Task, export: Callable[[dict[str, torch.Tensor], dict[str, Any]], None], rank: int,
            run_facts: dict[str, Any]) -> None:
    weights, export_config = task.export_state()  # a collective: every rank gathers
    if rank == 0:
        export(weights, dict(export_config, **run_facts))
