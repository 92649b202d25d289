"""One optimizer step over a rank's micro-batches, the part both training tasks share: gradients
accumulated over the micro-batches (:func:`accumulate_gradients`), then clipped and applied, or
skipped on every rank together when anything is non-finite (:func:`apply_update`).

Nothing here reads a value back to the host per micro-batch: losses and logged values are summed
on the device and read once, after the last backward, so micro-batches queue without a sync.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from jobs.train.parallelize import all_reduce_mean, autocast, set_gradient_sync

Batch = dict[str, torch.Tensor]
Logs = dict[str, torch.Tensor]
# A micro-batch's loss: per-sample (B,) or a scalar (its mean is the micro-batch's loss), optionally
# with values to log (0-d tensors).
MicroLoss = Callable[[Batch], torch.Tensor | tuple[torch.Tensor, Logs]]


@dataclass
class Accumulated:
    """This rank's means over the micro-batches, detached and still on the device."""

    loss: torch.Tensor
    logs: Logs = field(default_factory=dict)


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Batch], loss_fn: MicroLoss, *,
                         dtype: torch.dtype | None = None) -> Accumulated:
    """Backward over the micro-batches so the gradients sum to those of their union's mean loss
    (equal-sized micro-batches). Gradients are *not* zeroed between micro-batches; under FSDP2
    they are reduced across ranks only on the last one. Each forward runs under autocast to
    ``dtype`` (None: fp32). The logged values are averaged over the micro-batches like the loss."""
    count = len(micro_batches)
    if count == 0:
        raise ValueError("no micro-batches to accumulate over")
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    logs: Logs = {}
    for index, batch in enumerate(micro_batches):
        set_gradient_sync(model, index == count - 1)
        with autocast(device, dtype):
            out = loss_fn(batch)
        losses, micro_logs = out if isinstance(out, tuple) else (out, {})
        if losses.dim() > 1:
            raise ValueError(f"a micro-batch's loss must be per-sample (B,) or a scalar, got shape "
                             f"{tuple(losses.shape)}")
        (losses.mean() / count).backward()
        total = _add(total, losses.detach().float().mean() / count)
        for key, value in micro_logs.items():
            logs[key] = _add(logs.get(key), value.detach().float() / count)
    return Accumulated(loss=total, logs=logs)


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def read_logs(logs: Logs) -> dict[str, float]:
    """Each logged value averaged over ranks, read to the host in one transfer (one collective;
    every rank has the same keys)."""
    if not logs:
        return {}
    keys = sorted(logs)
    averaged = all_reduce_mean(torch.stack([logs[k] for k in keys]))
    return dict(zip(keys, averaged.tolist()))


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    skipped: bool

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``loss``, ``grad_norm`` and ``skipped`` (1.0 or 0.0), each name prefixed."""
        return {f"{prefix}loss": self.loss, f"{prefix}grad_norm": self.grad_norm,
                f"{prefix}skipped": float(self.skipped)}


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, local_loss: torch.Tensor,
                 *, lr: float, grad_clip: float) -> StepOutcome:
    """Clip and step, unless the loss or gradient norm is non-finite on any rank: then every rank
    drops the gradients and skips the step together (training on NaN poisons the weights)."""
    loss = float(all_reduce_mean(local_loss.to(_param_device(model))))
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss=loss, grad_norm=norm, skipped=skipped)


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
