"""Sharded training checkpoints: torch distributed checkpoint (DCP) on every rank, verified on load.

Layout of one checkpoint directory (Ray Train merges the ranks' local directories into one on the
run's storage, any fsspec/pyarrow URL):

    .metadata, __<rank>_0.distcp   DCP's files: model, optimizer, EMA, ... each rank writes its shard
    checksums.rank<r>.json          size and sha256 of every file rank r wrote
    trainer_state.json              rank 0, written last: the step, the count of skipped steps, the
                                    history of logged lines so far, and the world size that wrote it

Each is reported to Ray Train as ``checkpoint_step<step>-<attempt>`` (:func:`checkpoint_dir_name`).
DCP re-shards on load, so a run may resume on a different number of workers. A checkpoint whose
files are missing, truncated or altered fails :func:`verify_checkpoint` with a
:class:`CheckpointError` naming the file, and :func:`restore_latest` falls back to the previous one.
The :class:`Checkpointer` is what the training loop talks to: when to save, saving and reporting
to Ray Train, restoring.
"""
from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from rae.weights_io import sha256_file

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKSUM_PREFIX = "checksums.rank"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete or corrupted."""


class ModelState(Stateful):
    """A model (FSDP2-sharded or plain) and optionally its optimizer, as one DCP item."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state_dict["optim"])


def save_checkpoint(directory: str | Path, state: dict[str, Any], trainer_state: dict[str, Any],
                    *, rank: int, world_size: int) -> None:
    """Write this rank's shard of ``state`` with DCP (a collective: every rank calls it), its
    checksums, and on rank 0 the ``trainer_state`` JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=str(directory))
    sums = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(CHECKSUM_PREFIX)
            and p.name != TRAINER_STATE}
    (directory / f"{CHECKSUM_PREFIX}{rank}.json").write_text(json.dumps(sums, indent=1))
    if rank == 0:
        record = dict(trainer_state, world_size=world_size)
        (directory / TRAINER_STATE).write_text(json.dumps(record, indent=1))


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check that every rank's files are present with their recorded size and sha256; return the
    trainer state. Raises :class:`CheckpointError` naming the first problem found."""
    directory = Path(directory)
    state_file = directory / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE} is missing (the save never "
                              f"finished)")
    try:
        trainer_state = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE} is not valid JSON ({error})")
    world = int(trainer_state.get("world_size", 0))
    for rank in range(world):
        sums_file = directory / f"{CHECKSUM_PREFIX}{rank}.json"
        if not sums_file.is_file():
            raise CheckpointError(f"checkpoint {directory}: {sums_file.name} is missing; it was "
                                  f"written by {world} ranks")
        for name, expected in json.loads(sums_file.read_text()).items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint {directory}: file {name} is missing")
            size = path.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(f"checkpoint {directory}: file {name} is {size} bytes, "
                                      f"expected {expected['size']} (truncated or overwritten)")
            if sha256_file(path) != expected["sha256"]:
                raise CheckpointError(f"checkpoint {directory}: file {name} fails its sha256 check "
                                      f"(corrupted)")
    return trainer_state


def load_checkpoint(directory: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Verify, then load ``state`` in place from ``directory`` (re-sharding as needed); return the
    trainer state saved with it."""
    trainer_state = verify_checkpoint(directory)
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {directory}: DCP could not load it: {dcp_failure(error)}") from error
    return trainer_state


def dcp_failure(error: BaseException) -> str:
    """One line for what DCP raised: a ``CheckpointException`` holds each failed rank's exception
    (its ``str`` is their multi-line tracebacks); any other error is its type and first line."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {dcp_failure(cause)}" for rank, (cause, _) in sorted(error.failures.items()))
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def restore_latest(candidates: Iterable[Any], state: dict[str, Any],
                   open_dir: Callable[[Any], Any]) -> dict[str, Any] | None:
    """Load the newest valid checkpoint of ``candidates`` (newest first) into ``state``.

    ``open_dir(candidate)`` is a context manager yielding a local directory (Ray's
    ``Checkpoint.as_directory``). A corrupted checkpoint is logged with its error and skipped in
    favour of the one before it. Returns the trainer state loaded, or None if none was valid.
    """
    for candidate in candidates:
        with open_dir(candidate) as local:
            try:
                trainer_state = load_checkpoint(local, state)
            except CheckpointError as error:
                logger.error("%s; falling back to the previous checkpoint", error)
                continue
        trainer_state["restored_from"] = str(getattr(candidate, "path", candidate))
        return trainer_state
    return None


def checkpoint_dir_name(step: int, attempt: str) -> str:
    """A directory name for the checkpoint taken after ``step`` steps by ``attempt``, sortable by step.

    The name is unique per attempt because a run that fell back past a corrupted checkpoint takes
    that step again: under the same name the new checkpoint would overwrite the old one's folder,
    and Ray Train, which keeps both in its run snapshot, would delete it when it prunes the old one;
    the next relaunch then fails (the snapshot names a checkpoint that no longer exists).
    """
    return f"checkpoint_step{step:09d}-{attempt}"


class Checkpointer:
    """The run's checkpoints on Ray Train (torchtitan's ``CheckpointManager`` in small): saved every
    ``every_steps`` steps and at the last step, each reported with the metrics since the previous
    one; restored from the newest valid one. ``state`` returns the task's checkpointed items."""

    def __init__(self, state: Callable[[], dict[str, Any]], *, every_steps: int, total_steps: int,
                 rank: int, world_size: int) -> None:
        if every_steps <= 0:
            raise ValueError(f"checkpoints every {every_steps} steps: must be positive")
        self._state, self.every_steps, self.total_steps = state, every_steps, total_steps
        self.rank, self.world_size = rank, world_size
        # Each rank draws its own; Ray Train gives every rank rank 0's checkpoint name.
        self.attempt = uuid.uuid4().hex[:8]

    def due(self, step: int) -> bool:
        """Whether the run checkpoints after ``step`` steps."""
        return step % self.every_steps == 0 or step == self.total_steps

    def save(self, step: int, metrics: dict[str, Any], trainer_state: dict[str, Any]) -> None:
        """Save (a collective: every rank calls it) and report ``metrics`` with the checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="rae-ckpt-") as local:
            save_checkpoint(local, self._state(), dict(trainer_state, step=step), rank=self.rank,
                            world_size=self.world_size)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                             checkpoint_dir_name=checkpoint_dir_name(step, self.attempt))

    def restore(self) -> dict[str, Any] | None:
        """Load the newest valid reported checkpoint of this run (after a worker failure or a
        relaunch with the same run name), falling back past corrupted ones; return its trainer
        state (with ``restored_from``), or None on a fresh start. Newest: the highest step, and of
        a step saved twice (again after a fallback), the one reported last."""
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        reported = list(enumerate(ray.train.get_all_reported_checkpoints()))  # in the order reported
        newest_first = sorted(reported, key=lambda item: (item[1].metrics.get("step", -1), item[0]), reverse=True)
        paths = [r.checkpoint for _, r in newest_first] or [latest]
        if all(c.path != latest.path for c in paths):
            paths.insert(0, latest)
        restored = restore_latest(paths, self._state(), lambda c: c.as_directory())
        if restored is None:
            raise RuntimeError(f"no valid checkpoint among {[c.path for c in paths]}; see the errors "
                               f"above, or start a new run name")
        return restored
