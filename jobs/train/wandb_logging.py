"""Weights & Biases on rank 0 only, resumable by run name; off unless a project is configured.

The API key comes from the environment (``WANDB_API_KEY``) only, never from a config file.
``WANDB_MODE=offline`` writes a local run to sync later; ``WANDB_MODE=disabled`` turns it off.
The wandb run id is the Ray run name, so a relaunch with the same ``--run`` continues the same curve.
Its files (an offline run's included) go to ``dir``: by default the run's folder under a local
``--storage`` (:func:`jobs.train.launch.with_wandb_dir`), never Ray's temporary session folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class WandbConfig:
    """``project=None`` (the default) means no wandb at all."""

    project: str | None = None
    entity: str | None = None
    group: str | None = None
    dir: str | None = None  # wandb writes <dir>/wandb/...; None: the run's folder on a local storage


class WandbLogger:
    """Logs on rank 0 when a project is configured; every call is a no-op elsewhere."""

    def __init__(self, config: WandbConfig, run_name: str, rank: int,
                 run_config: dict[str, Any] | None = None) -> None:
        self._run = None
        if config.project is None or rank != 0:
            return
        import wandb

        if config.dir is not None:
            os.makedirs(config.dir, exist_ok=True)
        self._run = wandb.init(project=config.project, entity=config.entity, group=config.group, dir=config.dir,
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
