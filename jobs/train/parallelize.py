"""Distributed concerns applied to a plain model: FSDP2 sharding, precision, and the batch plan.

The model files in ``rae/`` know nothing about sharding (torchtitan's ``parallelize`` step): this
module wraps each transformer block with ``fully_shard`` as its own unit (so only one block's full
parameters are materialised at a time), then the root, which picks up the embeddings and output
layers. Precision and compilation are chosen here too: bf16 compute (autocast, and FSDP2's bf16
parameters) with fp32 master weights and fp32 gradient reduction on GPU, plain fp32 on CPU (gloo has
no bf16 reduce, and CPU bf16 matmuls are slow); on GPU each transformer block's ``forward`` is
compiled with ``torch.compile`` (regional compilation: the blocks share one graph, so a 28-block
trunk compiles once, and the state-dict keys stay those of the plain model).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rae.devices import pick_device


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


PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("auto", "on", "off")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: bf16, or None for plain fp32. ``auto``: bf16 on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"loop.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def compile_enabled(mode: str, device: torch.device) -> bool:
    """Whether blocks are compiled. ``auto``: on CUDA only (on CPU the compile time outweighs the gain
    at the sizes a CPU trains)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"loop.compile must be one of {COMPILE_MODES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of a forward pass; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def compile_units(units: Iterable[nn.Module]) -> None:
    """Compile each unit's ``forward`` in place. Identical blocks share one compiled graph; hooks
    (FSDP2's all-gather and reshard) stay outside the compiled region, and the module tree and its
    state-dict keys are unchanged, so checkpoints and EMA exports do not depend on compilation."""
    for unit in units:
        unit.forward = torch.compile(unit.forward)


def training_device() -> torch.device:
    """This rank's GPU when CUDA is usable, else the CPU (a logical Ray GPU on a CPU box is not)."""
    if pick_device().type == "cuda":
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def mixed_precision(dtype: torch.dtype | None):
    """FSDP2's policy: parameters gathered in ``dtype`` with fp32 gradient reduction; None for fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_model(model: nn.Module, units: Iterable[nn.Module], device: torch.device, *,
                dtype: torch.dtype | None = None, compile: bool = False) -> nn.Module:
    """Compile (optionally) and ``fully_shard`` each module in ``units`` (transformer blocks, the DDT
    head's blocks), then the root, gathering parameters in ``dtype`` (None: fp32). Sharding is a
    no-op without a multi-rank process group, so the same loop runs in one process."""
    units = list(units)
    model.to(device)
    if compile:
        compile_units(units)
    if not is_distributed():
        return model
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(dtype)
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
