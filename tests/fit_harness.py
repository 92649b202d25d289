"""The training loop's :func:`~jobs.train.loop.fit` run in the test process, without Ray: a one-rank
stand-in for Ray Train's worker API (reports copy the checkpoint directory into a storage folder
and are kept across relaunches, as Ray Train's run snapshot keeps them) and a tiny task that
records the learning rate of every step."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch import nn

from jobs.train.loop import LoopConfig, OptimConfig, SingleModelTask, fit
from jobs.train.lr_schedule import LRSchedule

ROWS = 14  # global batch 4: 3 steps per epoch, and a remainder, as a real shard has


@dataclass
class Reported:
    """What ``ray.train.get_all_reported_checkpoints`` returns for one report."""

    checkpoint: ray.train.Checkpoint
    metrics: dict[str, Any]


class _OneRank:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


@dataclass
class FakeRayTrain:
    """Ray Train's worker calls for one rank, its checkpoints kept under ``storage``."""

    storage: Path
    reported: list[Reported] = field(default_factory=list)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(ray.train, "get_context", _OneRank)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train, "get_checkpoint", self.get_checkpoint)
        monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", lambda: list(self.reported))

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str) -> None:
        kept = self.storage / checkpoint_dir_name
        if kept.exists():
            raise FileExistsError(f"checkpoint name {checkpoint_dir_name} reported twice")
        shutil.copytree(checkpoint.path, kept)
        self.reported.append(Reported(ray.train.Checkpoint(str(kept)), dict(metrics)))

    def get_checkpoint(self) -> ray.train.Checkpoint | None:
        return self.reported[-1].checkpoint if self.reported else None


class TinyTask(SingleModelTask):
    """An MLP with dropout (every step draws from the seeded RNG) regressing y = W x; ``fail_at``
    raises before that step (a worker lost mid-run); ``lrs`` holds the LR each step was given."""

    def __init__(self, schedule: LRSchedule, *, ema_decay: float = 0.5, fail_at: int | None = None) -> None:
        super().__init__(OptimConfig(schedule=schedule), ema_decay=ema_decay)
        self.fail_at = fail_at
        self.lrs: dict[int, float] = {}

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 2))

    def per_sample_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)

    def export_config(self) -> dict[str, Any]:
        return {"kind": "tiny"}

    def train_step(self, micro_batches, step, lr):
        if step == self.fail_at:
            raise RuntimeError(f"injected failure at step {step}")
        self.lrs[step] = lr
        return super().train_step(micro_batches, step, lr)


def epoch_batches(epoch: int, micro: int) -> Iterator[dict[str, torch.Tensor]]:
    """Each epoch its own rows (seeded by the epoch), in micro-batches of ``micro``."""
    generator = torch.Generator().manual_seed(1000 + epoch)
    x = torch.randn(ROWS, 4, generator=generator)
    y = x @ torch.randn(4, 2, generator=generator)
    for start in range(0, ROWS, micro):
        yield {"x": x[start:start + micro], "y": y[start:start + micro]}


def run_fit(task: TinyTask, loop: LoopConfig, run_name: str = "tiny") -> dict[str, torch.Tensor]:
    """``fit`` the task on :func:`epoch_batches`; return the exported (EMA) weights."""
    exported: dict[str, torch.Tensor] = {}
    fit(task, loop, run_name=run_name, rows=ROWS, batches=epoch_batches,
        export=lambda weights, config: exported.update(weights))
    return exported
