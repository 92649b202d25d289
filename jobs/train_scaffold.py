"""The training loop both runs share: batch plan, accumulation, clipping, non-finite guard, EMA,
LR schedule, checkpoint/resume and logging. The model-specific part is a :class:`Task`.

A run is counted in optimizer steps of one *global* batch; an epoch is ``rows // global_batch``
steps on every rank, so ranks never disagree on the number of collectives (uneven batches
deadlock). Everything random in a step is seeded from ``(seed, step, rank)`` and the data order
from ``(seed, epoch, rank)``, so a run resumed from a checkpoint replays exactly what the
uninterrupted run would have done: the checkpoint holds model, optimizer, EMA and the step; the
data position is the step (the resumed epoch skips the batches it already trained on).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import logging
import math
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from jobs.checkpointing import ModelState, checkpoint_dir_name, restore_latest, save_checkpoint
from jobs.lr_schedule import LRSchedule
from jobs.parallelize import (
    BatchPlan,
    all_reduce_mean,
    autocast,
    compile_enabled,
    compute_dtype,
    plan_batches,
    set_gradient_sync,
    shard_model,
    training_device,
)
from jobs.progress import Progress, say
from jobs.wandb_logging import WandbConfig, WandbLogger
from rae.ema import EMA

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
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
    shuffle_buffer: int = 0  # rows in Ray Data's local shuffle buffer; 0: stored order
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or bf16 / fp32
    compile: str = "auto"  # torch.compile each transformer block: auto (CUDA only), on, off
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


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Batch],
                         per_sample_loss: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
    """Backward over the micro-batches so the gradients sum to those of their union's mean loss
    (equal-sized micro-batches). Gradients are *not* zeroed between micro-batches; under FSDP2
    they are reduced across ranks only on the last one. Returns this rank's mean loss (detached, on
    the loss's device: reading it is left to the update, so micro-batches queue without a sync)."""
    count = len(micro_batches)
    total = None
    for index, batch in enumerate(micro_batches):
        set_gradient_sync(model, index == count - 1)
        losses = per_sample_loss(batch)
        if losses.dim() != 1:
            raise ValueError(f"per-sample loss must be 1-D (B,), got shape {tuple(losses.shape)}")
        (losses.mean() / count).backward()
        mean = losses.detach().float().mean() / count
        total = mean if total is None else total + mean
    return total if total is not None else torch.zeros(())


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    skipped: bool


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, local_loss: torch.Tensor,
                 *, lr: float, grad_clip: float) -> StepOutcome:
    """Clip and step, unless the loss or gradient norm is non-finite on any rank: then every rank
    drops the gradients and skips the step together (training on NaN poisons the weights)."""
    loss = float(all_reduce_mean(local_loss.to(_param_device(model))))
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss=loss, grad_norm=norm, skipped=skipped)


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Task(ABC):
    """The model-specific part of a run. ``setup`` builds and shards the model(s) and optimizers;
    ``state`` names what a checkpoint holds; ``train_step`` takes one global step on this rank's
    micro-batches; ``export_state`` returns what the exported checkpoint holds."""

    @abstractmethod
    def setup(self, ctx: RunContext) -> None:
        ...

    @abstractmethod
    def state(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def train_step(self, micro_batches: Sequence[Batch], step: int, lr: float) -> dict[str, float]:
        ...

    @abstractmethod
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        ...


class SingleModelTask(Task, ABC):
    """One model, AdamW, EMA: the DiT run, and the stand-in model in the scaffold's tests.

    Subclasses give ``build_model`` (unsharded, on CPU), ``shard_units`` (the modules wrapped
    as their own FSDP2 units), ``per_sample_loss`` and ``export_config``.
    """

    def __init__(self, optim: OptimConfig, ema_decay: float) -> None:
        self.optim_config = optim
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
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.optim_config.schedule.base_lr,
                                           betas=self.optim_config.betas,
                                           weight_decay=self.optim_config.weight_decay)
        self.ema = EMA(self.model, self.ema_decay)  # shadows are DTensors sharded like the model

    def state(self) -> dict[str, Any]:
        return {"model": ModelState(self.model, self.optimizer), "ema": self.ema}

    def train_step(self, micro_batches: Sequence[Batch], step: int, lr: float) -> dict[str, float]:
        self.model.train()
        device = self.ctx.device
        batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]

        def loss(batch: Batch) -> torch.Tensor:
            with autocast(device, self.ctx.dtype):
                return self.per_sample_loss(self.model, batch)

        local = accumulate_gradients(self.model, batches, loss)
        outcome = apply_update(self.model, self.optimizer, local, lr=lr,
                               grad_clip=self.optim_config.grad_clip)
        if not outcome.skipped:
            self.ema.update(self.model)
        return {"loss": outcome.loss, "grad_norm": outcome.grad_norm, "skipped": float(outcome.skipped)}

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
                      seed: int, rank: int) -> BatchSource:
    """This worker's share of a Ray Dataset passed to the trainer, one pass per epoch."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset_name)

    def batches(epoch: int, micro: int) -> Iterator[Batch]:
        stream = shard.iter_torch_batches(
            batch_size=micro, drop_last=False, dtypes=None,
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
    rank, world = context.get_world_rank(), context.get_world_size()
    plan = plan_batches(loop.global_batch_size, world, loop.max_micro_batch)
    steps_per_epoch = rows // loop.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {rows} rows, fewer than one global batch of "
                         f"{loop.global_batch_size}; lower global_batch_size")
    total_steps = steps_per_epoch * loop.epochs
    device = training_device()
    ctx = RunContext(rank=rank, world=world, device=device, plan=plan, steps_per_epoch=steps_per_epoch,
                     dtype=compute_dtype(loop.precision, device), compile=compile_enabled(loop.compile, device))
    torch.manual_seed(loop.seed)  # identical initial weights on every rank, before sharding
    task.setup(ctx)

    restored = _restore(task)
    step = int(restored["step"]) if restored else 0
    resumed_from = step if restored else -1
    if rank == 0:
        where = f"resumed at step {step} from {restored['restored_from']}" if restored else "fresh start"
        say(f"[{run_name}] {where}; {world} workers x {plan.accum_steps} micro-batches of "
              f"{plan.micro} = global batch {plan.global_batch}; {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps")

    wandb = WandbLogger(loop.wandb, run_name, rank, run_config)
    progress = Progress(total_steps=total_steps, global_batch=plan.global_batch, start_step=step)
    every = loop.checkpoint_every_steps or steps_per_epoch
    log_window: dict[str, list[float]] = {}
    report_window: dict[str, list[float]] = {}
    skipped_total = int(restored.get("skipped_steps", 0)) if restored else 0
    # What the progress line showed, kept with each checkpoint so a resumed run's curves are whole;
    # exported as history.json for loss curves without wandb.
    history: list[dict[str, float]] = list(restored.get("history", [])) if restored else []
    schedule = task_schedule(task)
    try:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            stream = batches(epoch, plan.micro)
            for _ in range(position * plan.accum_steps):  # the data position: skip what was trained
                next(stream)
            while step < (epoch + 1) * steps_per_epoch and step < total_steps:
                micro_batches = [_next_batch(stream, epoch, step) for _ in range(plan.accum_steps)]
                lr = schedule(step / steps_per_epoch) if schedule else 0.0
                torch.manual_seed(mix_seed(loop.seed, step, rank))
                metrics = task.train_step(micro_batches, step, lr)
                step += 1
                if metrics.get("skipped"):
                    skipped_total += 1
                    if rank == 0:
                        say(f"[{run_name}] step {step}: non-finite loss or gradient "
                            f"(loss={metrics.get('loss')}); step skipped ({skipped_total} so far)")
                for key, value in metrics.items():
                    if key != "skipped" and math.isfinite(value):
                        for window in (log_window, report_window):
                            window.setdefault(key, []).append(value)
                if step % loop.log_every_steps == 0 or step == total_steps:  # means since the last line
                    logged = _means(log_window)
                    log_window = {}
                    history.append(dict(logged, step=step, lr=lr))
                    if rank == 0:
                        say(f"[{run_name}] " + progress.line(step, step / steps_per_epoch, dict(logged, lr=lr)))
                        wandb.log(dict(logged, lr=lr, skipped_steps=skipped_total), step=step)
                if step % every == 0 or step == total_steps:  # means since the last checkpoint
                    report = dict(_means(report_window), step=step, epoch=step / steps_per_epoch, lr=lr,
                                  skipped_steps=skipped_total, resumed_from_step=resumed_from)
                    _checkpoint_and_report(task, report, rank, world, history)
                    report_window = {}
        if export is not None:
            weights, export_config = task.export_state()  # a collective: every rank gathers
            if rank == 0:
                export(weights, dict(export_config, run=run_name, step=step, history=history))
    finally:
        wandb.finish()


def _means(window: dict[str, list[float]]) -> dict[str, float]:
    return {key: sum(values) / len(values) for key, values in window.items() if values}


def task_schedule(task: Task) -> LRSchedule | None:
    optim = getattr(task, "optim_config", None)
    return optim.schedule if optim is not None else None


def _next_batch(stream: Iterator[Batch], epoch: int, step: int) -> Batch:
    try:
        return next(stream)
    except StopIteration:
        raise RuntimeError(f"data ran out in epoch {epoch} at step {step}: this worker's shard is "
                           f"smaller than steps_per_epoch x per-rank batch (was the dataset split "
                           f"with equal=False?)") from None


def _checkpoint_and_report(task: Task, metrics: dict[str, Any], rank: int, world: int,
                           history: list[dict[str, float]]) -> None:
    import ray.train

    step = int(metrics["step"])
    with tempfile.TemporaryDirectory(prefix="rae-ckpt-") as local:
        save_checkpoint(local, task.state(), {"step": step, "skipped_steps": metrics["skipped_steps"],
                                              "history": history}, rank=rank, world_size=world)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=checkpoint_dir_name(step))


def _restore(task: Task) -> dict[str, Any] | None:
    """Newest valid reported checkpoint of this run (after a worker failure or a relaunch with
    the same run name), falling back past corrupted ones."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    reported = ray.train.get_all_reported_checkpoints()
    candidates = sorted(reported, key=lambda r: r.metrics.get("step", -1), reverse=True)
    paths = [r.checkpoint for r in candidates] or [latest]
    if all(c.path != latest.path for c in paths):
        paths.insert(0, latest)
    restored = restore_latest(paths, task.state(), lambda c: c.as_directory())
    if restored is None:
        raise RuntimeError(f"no valid checkpoint among {[c.path for c in paths]}; see the errors "
                           f"above, or start a new run name")
    return restored
