"""Flow-matching transport on the linear path, with the RAE dimension-dependent time shift.

Conventions (shared with `rae/sampling.py`): x_t = (1 - t) * x + t * eps, so t = 0 is data and
t = 1 is pure noise; the model predicts the velocity dx_t/dt = eps - x; the loss is the unweighted
MSE. Training times are drawn in [0, t_max] (uniform or logit-normal) and then shifted towards the
noise end by alpha = sqrt(m / base_dim) for a latent of m values, because a high-dimensional
latent keeps more signal at a given noise level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

VelocityModel = Callable[[Tensor, Tensor, Tensor], Tensor]
# Latent size (number of values) whose training and sampling times are not shifted (alpha = 1): the paper's base.
SHIFT_BASE_DIM = 4096


@dataclass(frozen=True)
class TransportConfig:
    """Training-time distribution. Defaults: the RAE paper's current configs."""

    time_distribution: Literal["uniform", "logit_normal"] = "logit_normal"
    t_max: float = 0.999
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: bool = True
    shift_base_dim: int = SHIFT_BASE_DIM

    def __post_init__(self) -> None:
        if self.time_distribution not in ("uniform", "logit_normal"):
            raise ValueError(
                f"time_distribution must be 'uniform' or 'logit_normal', got {self.time_distribution!r}"
            )
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.shift_base_dim < 1:
            raise ValueError(f"shift_base_dim must be >= 1, got {self.shift_base_dim}")


def shift_alpha(latent_dim: int, base_dim: int = SHIFT_BASE_DIM) -> float:
    """alpha = sqrt(m / n): 6.928 for the 16 x 16 x 768 = 196,608-value DINOv2-B latent."""
    if latent_dim < 1 or base_dim < 1:
        raise ValueError(f"latent_dim and base_dim must be >= 1, got {latent_dim} and {base_dim}")
    return math.sqrt(latent_dim / base_dim)


def shift_timesteps(t: Tensor, latent_dim: int, base_dim: int = SHIFT_BASE_DIM) -> Tensor:
    """t' = alpha * t / (1 + (alpha - 1) * t): monotone, fixes 0 and 1, pushes t towards noise for alpha > 1."""
    alpha = shift_alpha(latent_dim, base_dim)
    return alpha * t / (1 + (alpha - 1) * t)


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t eps, with t (B,) broadcast over the remaining dimensions."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - t) * x + t * eps


def velocity_target(x: Tensor, eps: Tensor) -> Tensor:
    """d x_t / dt on the linear path."""
    return eps - x


def sample_timesteps(
    batch: int,
    latent_dim: int,
    config: TransportConfig = TransportConfig(),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times (batch,) in [0, t_max] from the configured distribution, then shifted."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    if config.time_distribution == "uniform":
        t = u * config.t_max
    else:
        # Logit-normal truncated to [0, t_max] by inverse-CDF sampling: no rejection loop, and the
        # same generator draw count whatever the truncation.
        z_max = math.log(config.t_max / (1 - config.t_max)) if config.t_max < 1 else math.inf
        upper = 0.5 * math.erfc(-(z_max - config.logit_mean) / (config.logit_std * math.sqrt(2)))
        t = torch.sigmoid(config.logit_mean + config.logit_std * torch.special.ndtri(u * upper))
    if config.shift:
        t = shift_timesteps(t, latent_dim, config.shift_base_dim)
    return t.float().to(device)


def training_loss(
    model: VelocityModel,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator | None = None,
    config: TransportConfig = TransportConfig(),
    t: Tensor | None = None,
) -> Tensor:
    """Per-sample flow-matching losses (B,): mean over all but the batch dimension of
    (model(x_t, t, y) - (eps - x))^2. Returned unreduced so the caller can weight, mask or
    accumulate micro-batches exactly (sum of per-sample losses / global batch size).

    t and eps are drawn from `generator` (a fixed generator gives a reproducible loss, up to the
    model's own label dropout); pass `t` (B,) to evaluate at given times instead.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be batched latents (B, ...), got shape {tuple(x.shape)}")
    batch = x.shape[0]
    if t is None:
        t = sample_timesteps(batch, x[0].numel(), config, generator=generator, device=x.device)
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    gen_device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    prediction = model(interpolate(x, eps, t), t, y)
    if prediction.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(prediction.shape)}, expected {tuple(x.shape)}")
    error = prediction.float() - velocity_target(x, eps).float()
    return error.pow(2).flatten(1).mean(dim=1)
