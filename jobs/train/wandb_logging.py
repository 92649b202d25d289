"""Weights & Biases on rank 0 only, resumable by run name; off unless a project is configured.

The API key comes from the environment (``WANDB_API_KEY``) only, never from a config file.
``WANDB_MODE=offline`` writes a local run to sync later; ``WANDB_MODE=disabled`` turns it off.
The wandb run id is the Ray run name, so a relaunch with the same ``--run`` continues the same curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class WandbConfig:
    """``project=None`` (the default) means no wandb at all."""

    project: str | None = None
    entity: str | None = None
    group: str | None = None


class WandbLogger:
    """Logs on rank 0 when a project is configured; every call is a no-op elsewhere."""

    def __init__(self, config: WandbConfig, run_name: str, rank: int,
                 run_config: dict[str, Any] | None = None) -> None:
        self._run = None
        if config.project is None or rank != 0:
            return
        import wandb

        self._run = wandb.init(project=config.project, entity=config.entity, group=config.group,
                               id=run_name, name=run_name, resume="allow", config=run_config)

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
