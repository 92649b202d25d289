"""The encode job's actor with a trace: when this module's import started and ended in the actor's
process, when the actor's ``__init__`` ran, and each shard it encoded. Kept apart from
``bench_encode`` so an actor process imports what the shipped actor imports (pipelines.encoder_actor)
and nothing of the benchmark's own (its driver-side imports would count as the actor's start)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

MODULE_IMPORT_START = time.time()

import numpy as np  # noqa: E402  (after the clock: their import is the actor's start-up cost)
import torch  # noqa: E402

from pipelines.encoder_actor import LatentEncoder  # noqa: E402

MODULE_IMPORT_END = time.time()


def trace_path() -> Path:
    """Where this Ray job's encoder actors record their events (same machine, same job id)."""
    import ray

    return Path(tempfile.gettempdir()) / f"rae-bench-encode-trace-{ray.get_runtime_context().get_job_id()}.jsonl"


def _trace(event: str, **fields: object) -> None:
    with open(trace_path(), "a") as handle:
        handle.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")


class TracedLatentEncoder(LatentEncoder):
    """The shipped actor, recording when its module was imported, when it starts, is ready, and
    encodes each shard."""

    def __init__(self, *args, **kwargs):
        _trace("init_start", module_import_start=MODULE_IMPORT_START, module_import_end=MODULE_IMPORT_END)
        super().__init__(*args, **kwargs)
        _trace("init_end", threads=torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _trace("call_start")
        out = super().__call__(batch)
        _trace("call_end", images=int(out["latents"].shape[1]))
        return out


class OneThreadLatentEncoder(TracedLatentEncoder):
    """The actor as it shipped before: Ray starts a ``num_cpus=1`` actor with OMP_NUM_THREADS=1 and
    it encoded on that one thread (the shipped actor now takes the cluster's CPUs // pool size)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, cpu_threads=1))
