"""Consuming a Ray Dataset from the driver without leaving its workers behind."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def streamed_batches(dataset: Any, **iter_batches_kwargs: Any) -> Iterator[Iterator[dict]]:
    """``dataset.iter_batches(...)`` whose execution is shut down when the block exits, error or not.

    Left to garbage collection, a failed iteration keeps its actors (and their CPUs or GPUs) for as
    long as the exception's traceback is referenced; a rerun in the same process then waits for
    resources those actors still hold (seen as a hang: a resumed encode after an injected failure).
    """
    batches = iter(dataset.iter_batches(**iter_batches_kwargs))
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
