"""Exponential moving average of a model's weights (parameters and buffers).

Works on a plain model: the EMA keeps its own copy of every state-dict tensor; sharding,
checkpoint formats and rank placement belong to the trainer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_update_(average: Tensor, value: Tensor, decay: float) -> None:
    """In place: average <- decay * average + (1 - decay) * value."""
    average.lerp_(value.to(average.dtype), 1.0 - decay)


class EMA:
    """Shadow copy of `model.state_dict()`.

    Floating-point entries (parameters and buffers such as running statistics) are averaged;
    integer entries (step counters) are copied. Shadows are kept in float32 at least, so a bf16
    model does not lose the small (1 - decay) increments to rounding.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9995):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {}
        self.copy_from(model)

    @staticmethod
    def _shadow_dtype(tensor: Tensor) -> torch.dtype:
        if tensor.is_floating_point():
            return torch.promote_types(tensor.dtype, torch.float32)
        return tensor.dtype

    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to the model's current weights."""
        self.shadow = {
            name: tensor.detach().to(dtype=self._shadow_dtype(tensor), copy=True)
            for name, tensor in model.state_dict().items()
        }

    def _matching_state(self, model: nn.Module) -> dict[str, Tensor]:
        state = model.state_dict()
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())
            extra = sorted(state.keys() - self.shadow.keys())
            raise ValueError(f"model does not match the EMA: missing {missing[:5]}, unexpected {extra[:5]}")
        return state

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step towards the model's current weights."""
        decay = self.decay if decay is None else decay
        for name, value in self._matching_state(model).items():
            average = self.shadow[name]
            if average.is_floating_point():
                ema_update_(average, value.detach(), decay)
            else:
                average.copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (e.g. a separate evaluation copy)."""
        state = self._matching_state(model)
        for name, value in state.items():
            value.copy_(self.shadow[name].to(value.dtype))

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if not isinstance(shadow, dict) or shadow.keys() != self.shadow.keys():
            raise ValueError("EMA state does not match this model's state-dict keys")
        self.decay = float(state["decay"])
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
