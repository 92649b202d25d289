"""The torch.distributed backend of a Ray Train run, chosen where the workers are.

The driver decides to ask for GPU workers from the cluster's capacity, but only a worker can tell
whether the GPU Ray gave it is usable: a logical GPU without CUDA (Ray's fake-GPU test nodes, a node
whose driver is broken) would make NCCL fail at start. So the backend is NCCL when every worker has
usable CUDA, gloo when none has (the run then trains on CPU and its first line says so), and a clear
error when the workers disagree (one process group cannot mix them).
"""
from __future__ import annotations

import dataclasses
import logging

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

log = logging.getLogger(__name__)


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def backend_for(cuda_usable: list[bool]) -> str:
    """``nccl`` when every worker has usable CUDA, ``gloo`` when none has."""
    if all(cuda_usable):
        return "nccl"
    if not any(cuda_usable):
        return "gloo"
    ranks = [rank for rank, usable in enumerate(cuda_usable) if not usable]
    raise RuntimeError(f"workers {ranks} of {len(cuda_usable)} have no usable CUDA while the others do; one "
                       f"process group cannot mix NCCL and gloo. Check the GPU drivers of those workers' nodes.")


class _WorkerChosenBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        usable = list(worker_group.execute(_cuda_usable))
        backend = backend_for(usable)
        if backend == "gloo" and worker_group.get_resources_per_worker().get("GPU", 0) > 0:
            log.warning("the %d training workers hold Ray GPUs without usable CUDA: training on CPU with gloo",
                        len(usable))
        super().on_start(worker_group, dataclasses.replace(backend_config, backend=backend))


@dataclasses.dataclass
class WorkerChosenTorchConfig(TorchConfig):
    """A ``TorchConfig`` whose backend (nccl or gloo) is chosen from the workers' CUDA, not the driver's."""

    @property
    def backend_cls(self):
        return _WorkerChosenBackend
