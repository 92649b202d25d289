"""The commit step of the encode job: one encoded shard -> its part, moments and marker in the store.

A module of its own, importing numpy, pyarrow and fsspec only: Ray imports a task function's
module in the worker process that runs it, and the encode job's module imports torch and timm
(~0.7 GB a process), which a commit does not need.
"""
from __future__ import annotations

import json

import numpy as np

from pipelines import latent_store
from pipelines.storage import StorageOptions


def commit_shard_batch(batch: dict[str, np.ndarray], *, store: str, manifest: dict,
                       storage_options: StorageOptions | None) -> dict[str, np.ndarray]:
    """Write one encoded shard to the store; returns a one-row summary."""
    index = int(batch["shard_index"][0])
    meta = json.loads(batch["meta"][0])
    marker = latent_store.write_shard(store, manifest, index, keys=meta["keys"], labels=meta["labels"],
                                      latents=batch["latents"][0], rejected=meta["rejected"],
                                      storage_options=storage_options, encoded_on=meta.get("encoded_on"))
    return {"shard_index": np.array([index]), "rows": np.array([marker["rows"]]),
            "rejected": np.array([len(marker["rejected"])]), "encoded_on": np.array([json.dumps(marker["encoded_on"])])}
