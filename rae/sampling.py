"""ODE samplers (Euler, Heun) for the linear flow, and guidance (CFG with an interval, AutoGuidance).

A sampler integrates dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) on a time grid that is
shifted exactly like the training times (`rae.transport.shift_timesteps`). The velocity is any
callable `v(x, t)` with t of shape (B,): a model wrapped by one of the guidance helpers below, or a
closed form in tests. Given a `torch.Generator` for the initial noise, sampling is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from rae.transport import SHIFT_BASE_DIM, VelocityModel, shift_timesteps

Velocity = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """Defaults: the official RAE sampler (Euler on 50 grid points from t = 1 to 0.001, shifted;
    49 steps, and the sample is the state at the last grid point)."""

    method: Literal["euler", "heun"] = "euler"
    num_steps: int = 50  # grid points, as the official config's `num_steps` (one fewer steps)
    t_min: float = 0.001
    shift: bool = True
    shift_base_dim: int = SHIFT_BASE_DIM

    def __post_init__(self) -> None:
        if self.method not in ("euler", "heun"):
            raise ValueError(f"sampler method must be 'euler' or 'heun', got {self.method!r}")
        if self.num_steps < 2:
            raise ValueError(f"num_steps (ODE grid points) must be >= 2, got {self.num_steps}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")


def time_grid(
    num_steps: int = 50,
    *,
    t_min: float = 0.001,
    latent_dim: int | None = None,
    base_dim: int = SHIFT_BASE_DIM,
) -> Tensor:
    """The official grid: `num_steps` decreasing times evenly spaced from 1 to t_min, then shifted for
    a latent of `latent_dim` values (no shift when None). Computed in float32 exactly as the official
    code does (``1 - linspace(0, 1 - t_min)``, then the shift), returned as float64.

    The sampler integrates along it and returns the state at its last point (t_min shifted, e.g.
    0.0069 for the 16 x 16 x 768 latent), with no extra step to t = 0: the official samples are
    those, and the model is never evaluated near t = 0, where it was not trained.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps (ODE grid points) must be >= 2, got {num_steps}")
    t = 1 - torch.linspace(0.0, 1 - t_min, num_steps, dtype=torch.float32)
    if latent_dim is not None:
        t = shift_timesteps(t, latent_dim, base_dim)
    return t.double()


def integrate(velocity: Velocity, x: Tensor, times: Tensor, method: str = "euler") -> Tensor:
    """Solve dx/dt = velocity(x, t) along `times` (decreasing) from x at times[0]; the state at
    times[-1]. Heun is the explicit trapezoid rule on every step."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    times = [float(t) for t in times]
    batch = x.shape[0]

    def v(state: Tensor, t: float) -> Tensor:
        return velocity(state, torch.full((batch,), t, device=x.device, dtype=x.dtype))

    with torch.no_grad():
        for t_cur, t_next in zip(times[:-1], times[1:]):
            dt = t_next - t_cur
            v_cur = v(x, t_cur)
            if method == "heun":
                v_next = v(x + dt * v_cur, t_next)
                x = x + dt * 0.5 * (v_cur + v_next)
            else:
                x = x + dt * v_cur
    return x


def sample(
    velocity: Velocity,
    shape: Sequence[int],
    *,
    config: SamplerConfig = SamplerConfig(),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw noise of `shape` from `generator` and integrate it to data. The time grid is shifted
    for a latent of prod(shape[1:]) values when `config.shift` (as in training)."""
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    latent_dim = math.prod(shape[1:]) if config.shift else None
    times = time_grid(config.num_steps, t_min=config.t_min, latent_dim=latent_dim, base_dim=config.shift_base_dim)
    return integrate(velocity, noise, times, config.method)


#################################################################################
#                                  Guidance                                     #
#################################################################################

def _in_interval(t: Tensor, interval: tuple[float, float], ndim: int) -> Tensor:
    lo, hi = interval
    inside = (t >= lo) & (t <= hi)
    return inside.reshape(-1, *([1] * (ndim - 1)))


def _check_interval(interval: tuple[float, float]) -> None:
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")


def conditional(model: VelocityModel, y: Tensor) -> Velocity:
    """The plain conditional velocity v(x, t | y)."""
    return lambda x, t: model(x, t, y)


def classifier_free_guidance(
    model: VelocityModel,
    y: Tensor,
    scale: float,
    *,
    null_class: int,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Velocity:
    """v_u + scale * (v_c - v_u) for t in [t_lo, t_hi] (the model's, i.e. shifted, time), the
    conditional velocity v_c elsewhere. The unconditional v_u uses the null class label; both
    halves run as one batch of 2B."""
    _check_interval(interval)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        inside = _in_interval(t, interval, x.dim())
        if scale == 1.0 or not bool(inside.any()):
            return model(x, t, y)
        null = torch.full_like(y, null_class)
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return torch.where(inside, v_u + scale * (v_c - v_u), v_c)

    return velocity


def autoguidance(
    model: VelocityModel,
    guide: VelocityModel,
    y: Tensor,
    scale: float,
    *,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Velocity:
    """AutoGuidance: v_guide + scale * (v_main - v_guide), both conditional on y, with a weaker
    guide model (RAE: a briefly trained DiT^DH-S; reported scale 1.42). Outside the interval the
    main model's conditional velocity is used."""
    _check_interval(interval)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_main = model(x, t, y)
        inside = _in_interval(t, interval, x.dim())
        if scale == 1.0 or not bool(inside.any()):
            return v_main
        v_guide = guide(x, t, y)
        return torch.where(inside, v_guide + scale * (v_main - v_guide), v_main)

    return velocity
