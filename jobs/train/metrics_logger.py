"""What a run tells the world about its steps: the progress line, wandb, the history, the reports.

Two windows of step metrics are kept: the *log* window (means since the last progress line, shown
on rank 0, sent to wandb and appended to the history) and the *report* window (means since the
last checkpoint, reported to Ray Train with it). The history and the count of skipped steps are
kept with every checkpoint, so a resumed run's curves are whole; the history is exported as
``history.json`` for loss curves without wandb.
"""
from __future__ import annotations

import math
from typing import Any

from jobs.train.progress import Progress, say
from jobs.train.wandb_logging import WandbConfig, WandbLogger

SKIPPED = "skipped"  # the metric a task sets to 1.0 when its step was skipped (non-finite)


def window_means(window: dict[str, list[float]]) -> dict[str, float]:
    return {key: sum(values) / len(values) for key, values in window.items() if values}


class MetricsLogger:
    """Rank-aware: every rank keeps the windows and the history (the metrics are already averaged
    over ranks), only rank 0 prints and logs to wandb."""

    def __init__(self, *, run_name: str, rank: int, total_steps: int, steps_per_epoch: int,
                 global_batch: int, log_every_steps: int, start_step: int = 0,
                 trainer_state: dict[str, Any] | None = None, wandb: WandbConfig | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.run_name, self.rank = run_name, rank
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.log_every_steps = log_every_steps
        restored = trainer_state or {}
        self.skipped_steps = int(restored.get("skipped_steps", 0))
        self.history: list[dict[str, float]] = list(restored.get("history", []))
        self.resumed_from = start_step if trainer_state else -1
        self._log_window: dict[str, list[float]] = {}
        self._report_window: dict[str, list[float]] = {}
        self._progress = Progress(total_steps=total_steps, global_batch=global_batch, start_step=start_step)
        self._wandb = WandbLogger(wandb or WandbConfig(), run_name, rank, run_config)

    def say(self, message: str) -> None:
        """A line on rank 0 only, prefixed with the run name."""
        if self.rank == 0:
            say(f"[{self.run_name}] {message}")

    def log(self, step: int, lr: float, metrics: dict[str, float]) -> None:
        """Record the metrics of the step that brought the run to ``step``; print and log the
        means since the last line every ``log_every_steps`` steps and at the last step."""
        if metrics.get(SKIPPED):
            self.skipped_steps += 1
            self.say(f"step {step}: non-finite loss or gradient (loss={metrics.get('loss')}); "
                     f"step skipped ({self.skipped_steps} so far)")
        for key, value in metrics.items():
            if key != SKIPPED and math.isfinite(value):
                for window in (self._log_window, self._report_window):
                    window.setdefault(key, []).append(value)
        if step % self.log_every_steps == 0 or step == self.total_steps:
            self._write_line(step, lr)

    def _write_line(self, step: int, lr: float) -> None:
        logged = window_means(self._log_window)
        self._log_window = {}
        self.history.append(dict(logged, step=step, lr=lr))
        if self.rank == 0:
            shown, epoch = dict(logged, lr=lr), step / self.steps_per_epoch
            say(f"[{self.run_name}] {self._progress.line(step, epoch, shown)}", run=self.run_name, step=step,
                total=self.total_steps, postfix=f"epoch {epoch:.2f} {self._progress.postfix(step, shown)}")
        self._wandb.log(dict(logged, lr=lr, skipped_steps=self.skipped_steps), step=step)

    def report(self, step: int, lr: float) -> dict[str, float]:
        """The means since the last report (the last checkpoint), with where the run stands."""
        report = dict(window_means(self._report_window), step=step, epoch=step / self.steps_per_epoch,
                      lr=lr, skipped_steps=self.skipped_steps, resumed_from_step=self.resumed_from)
        self._report_window = {}
        return report

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run continues these counts and curves."""
        return {"skipped_steps": self.skipped_steps, "history": list(self.history)}

    def finish(self) -> None:
        self._wandb.finish()
