"""The progress line every run prints (rank 0), with or without wandb: step, loss, throughput, ETA."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_sink: Any = None  # the driver's progress queue when its console is quiet (jobs.console.worker_progress)


def send_to(sink: Any) -> None:
    """Send this process's progress lines to ``sink`` (a Ray queue) instead of stdout; None: stdout."""
    global _sink
    _sink = sink


def say(message: str, *, run: str | None = None, step: int | None = None, total: int | None = None,
        postfix: str = "") -> None:
    """One line for the user: to the driver's progress queue when it gave one (``run``, ``step``,
    ``total`` and ``postfix`` draw that run's bar there instead of the line), else to the worker's stdout, which Ray forwards to the driver once.
    (Ray Train V2 patches ``print`` inside workers to go through its logger as well, which showed
    every line twice.)"""
    global _sink
    if _sink is not None:
        from jobs.console import ProgressLine

        try:
            _sink.put(ProgressLine(message, run, step, total, postfix))
            return
        except Exception as error:  # the queue's actor is gone (its node lost): training goes on, lines here
            _sink = None
            sys.stdout.write(f"(the driver's progress queue is gone: {type(error).__name__}; progress lines "
                             f"continue in this worker's log)\n")
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Progress:
    """Throughput and ETA over the steps taken in this process (a resumed run restarts the clock)."""

    total_steps: int
    global_batch: int
    start_step: int = 0
    clock: Callable[[], float] = time.monotonic
    _t0: float = field(init=False)

    def __post_init__(self) -> None:
        self._t0 = self.clock()

    def line(self, step: int, epoch: float, metrics: dict[str, float]) -> str:
        return f"step {step}/{self.total_steps} epoch {epoch:.2f} {self.postfix(step, metrics)}"

    def postfix(self, step: int, metrics: dict[str, float]) -> str:
        """The metrics, throughput and ETA: the line after its step, or beside a progress bar."""
        elapsed = max(self.clock() - self._t0, 1e-9)
        done = step - self.start_step
        steps_per_s = done / elapsed
        images_per_s = steps_per_s * self.global_batch
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        eta_text = format_duration(eta) if eta != float("inf") else "?"
        return f"{shown} {images_per_s:.1f} img/s eta {eta_text}"
