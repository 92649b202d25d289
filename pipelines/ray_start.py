"""Starting (or joining) Ray from a driver, with the retry a loaded machine needs.

A Ray that this process starts must have its raylet register with the GCS within a fixed 30 s
(`ray._private.node`, not configurable). On a loaded machine that window is missed now and then
("The current node timed out during startup": seen at load average 30 to 60 on 2 cores, in the
demo, the tests and the benchmarks alike). Only that failure is tried again; any other is raised
at once.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

START_TIMED_OUT = "timed out during startup"


def init_ray(*, attempts: int = 3, on_retry: Callable[[str], None] | None = None, **init_kwargs: Any) -> None:
    """``ray.init(**init_kwargs)``, tried up to ``attempts`` times when the local node's start times
    out; ``on_retry`` (default: a log warning) is told each retry in a sentence."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init_kwargs)
            return
        except Exception as error:
            if START_TIMED_OUT not in str(error) or attempt == attempts:
                raise
            message = f"Ray's start timed out (a loaded machine?); trying again ({attempt + 1}/{attempts})"
            (on_retry or log.warning)(message)
            if ray.is_initialized():
                ray.shutdown()
