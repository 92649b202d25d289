"""Distributed concerns applied to a plain model: FSDP2 sharding, precision, and the batch plan.

The model files in ``rae/`` know nothing about sharding (torchtitan's ``parallelize`` step): this
module wraps each transformer block with ``fully_shard`` as its own unit (so only one block's full
parameters are materialised at a time), then the root, which picks up the embeddings and output
layers. bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU (gloo has no bf16
reduce, and CPU bf16 matmuls are slow).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: ``world`` ranks x ``accum_steps`` micro-batches of ``micro``."""

    global_batch: int
    world: int
    micro: int
    accum_steps: int

    @property
    def per_rank(self) -> int:
        return self.micro * self.accum_steps


def plan_batches(global_batch: int, world: int, max_micro_batch: int) -> BatchPlan:
    """Split ``global_batch`` over ``world`` ranks with the fewest micro-batches of at most
    ``max_micro_batch`` samples. The global batch stays exactly what the user asked for whatever
    the worker count: gradient accumulation absorbs the difference."""
    if global_batch <= 0 or world <= 0 or max_micro_batch <= 0:
        raise ValueError(f"batch plan needs positive sizes, got global_batch={global_batch}, "
                         f"world={world}, max_micro_batch={max_micro_batch}")
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} workers; choose a "
                         f"worker count that divides it (or a global batch that is a multiple of it)")
    per_rank = global_batch // world
    for accum in range(1, per_rank + 1):
        if per_rank % accum == 0 and per_rank // accum <= max_micro_batch:
            return BatchPlan(global_batch, world, per_rank // accum, accum)
    raise AssertionError("unreachable: accum = per_rank always fits")


def training_device() -> torch.device:
    """The local GPU when CUDA is usable, else the CPU (a logical Ray GPU on a CPU box is not)."""
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def mixed_precision(device: torch.device):
    """bf16 parameters/compute with fp32 gradient reduction on GPU; None (fp32) on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_model(model: nn.Module, units: Iterable[nn.Module], device: torch.device) -> nn.Module:
    """``fully_shard`` each module in ``units`` (transformer blocks, the DDT head's blocks), then
    the root. A no-op without a multi-rank process group, so the same loop runs in one process."""
    model.to(device)
    if not is_distributed():
        return model
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(device)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce-scatter on all but the last micro-batch of an accumulation window."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in one process). NaN on any rank makes the result NaN everywhere,
    which is what lets every rank agree to skip a non-finite step."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Mean of each gradient over ranks, for small modules kept whole on every rank (replicated,
    as DDP would) instead of sharded: the discriminator heads. Identity in one process."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)
