"""Learning-rate schedules as pure functions of training progress (in epochs, fractional).

Progress is measured in epochs rather than optimizer steps so that a schedule means the same thing
whatever the global batch size, and so that a run resumed on a different number of workers (same
global batch, same steps) continues on exactly the same curve.

Two schedules from the paper's reference configs:

- ``constant_linear`` (DiT^DH): ``base_lr`` for ``hold_epochs``, then linear decay to ``final_lr``
  reached at ``decay_end_epoch`` and held after it (2e-4 held 40 epochs, 2e-5 at epoch 800).
- ``warmup_cosine`` (decoder): linear warmup from 0 over ``warmup_epochs``, then cosine from
  ``base_lr`` to ``final_lr`` at ``decay_end_epoch`` (2e-4, 1 epoch warmup, 2e-5 at epoch 16).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant_linear", "warmup_cosine")


@dataclass
class LRSchedule:
    """A learning-rate schedule over fractional epochs. Defaults: the DiT^DH-XL reference."""

    kind: str = "constant_linear"
    base_lr: float = 2e-4
    final_lr: float = 2e-5
    hold_epochs: float = 40.0
    warmup_epochs: float = 0.0
    decay_end_epoch: float = 800.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"LRSchedule.kind={self.kind!r}; expected one of {SCHEDULE_KINDS}")
        if self.base_lr <= 0 or self.final_lr < 0:
            raise ValueError(f"LRSchedule needs base_lr > 0 and final_lr >= 0, got "
                             f"base_lr={self.base_lr}, final_lr={self.final_lr}")
        start = self.hold_epochs if self.kind == "constant_linear" else self.warmup_epochs
        if self.decay_end_epoch < start or start < 0:
            raise ValueError(f"LRSchedule ({self.kind}): decay must start at an epoch >= 0 and end "
                             f"after it; got start={start}, decay_end_epoch={self.decay_end_epoch}")

    def with_epochs(self, epochs: float) -> LRSchedule:
        """The same schedule for a run of ``epochs``: the decay ends with the run; the hold (or
        warmup) is kept, unless it would outlast the new run, then it ends there too."""
        return dataclasses.replace(self, decay_end_epoch=float(epochs), hold_epochs=min(self.hold_epochs, epochs),
                                   warmup_epochs=min(self.warmup_epochs, epochs))

    def __call__(self, epoch: float) -> float:
        if self.kind == "constant_linear":
            return constant_then_linear(epoch, self.base_lr, self.final_lr,
                                        self.hold_epochs, self.decay_end_epoch)
        return warmup_cosine(epoch, self.base_lr, self.final_lr,
                             self.warmup_epochs, self.decay_end_epoch)


def constant_then_linear(epoch: float, base_lr: float, final_lr: float,
                         hold_epochs: float, decay_end_epoch: float) -> float:
    """``base_lr`` until ``hold_epochs``, linear to ``final_lr`` at ``decay_end_epoch``, then flat."""
    if epoch <= hold_epochs:
        return base_lr
    if epoch >= decay_end_epoch:
        return final_lr
    fraction = (epoch - hold_epochs) / (decay_end_epoch - hold_epochs)
    return base_lr + fraction * (final_lr - base_lr)


def warmup_cosine(epoch: float, base_lr: float, final_lr: float,
                  warmup_epochs: float, decay_end_epoch: float) -> float:
    """Linear warmup from 0 to ``base_lr``, then a half cosine down to ``final_lr``, then flat."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if epoch >= decay_end_epoch:
        return final_lr
    span = decay_end_epoch - warmup_epochs
    fraction = 0.0 if span == 0 else (epoch - warmup_epochs) / span
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * fraction))
