"""Per-position, per-channel latent normalisation and its exact, streaming statistics.

RAE normalises each latent z (N tokens x C channels) as (z - mean) / sqrt(var + eps), with mean and
var taken per token position and channel over the training set. The released DINOv2-B statistics
hold a variance only (the authors say the mean is not needed), so the mean is optional here.

The reference estimated these with a non-deterministic running average. MomentAccumulator computes
them exactly in float64: per-batch moments merged with Chan et al.'s parallel update, so any split
of the data into batches or workers, merged in any order, gives the same numbers up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rae.weights_io import write_atomically

STATS_FORMAT = "rae-latent-stats"
STATS_FORMAT_VERSION = 1
DEFAULT_EPS = 1e-5


@dataclass(kw_only=True)
class LatentStats:
    """Normalisation statistics of shape (N, C); float64. `mean=None` scales without centring."""

    mean: torch.Tensor | None = None
    var: torch.Tensor
    eps: float = DEFAULT_EPS
    count: int

    def __post_init__(self) -> None:
        self.var = torch.as_tensor(self.var, dtype=torch.float64).cpu()
        if self.var.ndim != 2:
            raise ValueError(f"LatentStats.var must be (num_tokens, channels), got shape {tuple(self.var.shape)}")
        if self.mean is not None:
            self.mean = torch.as_tensor(self.mean, dtype=torch.float64).cpu()
            if self.mean.shape != self.var.shape:
                raise ValueError(
                    f"LatentStats.mean has shape {tuple(self.mean.shape)}, var has {tuple(self.var.shape)}; "
                    "they must match"
                )
        if not bool(torch.isfinite(self.var).all()) or bool((self.var < 0).any()):
            raise ValueError("LatentStats.var must be finite and non-negative")
        if not self.eps > 0:
            raise ValueError(f"LatentStats.eps must be positive, got {self.eps}")
        if int(self.count) != self.count or self.count < 0:
            raise ValueError(f"LatentStats.count must be a non-negative integer, got {self.count}")
        self.count = int(self.count)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.var.shape)

    @property
    def has_mean(self) -> bool:
        return self.mean is not None

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) * (1 / sqrt(var + eps)) in z's dtype, at least float32 (float16 latents come back float32).

        The statistics are exact float64, rounded once to that dtype; applying them in float64 halved
        the training read rate (every batch the store reader gives) for no gain on float16 inputs.
        """
        self._check(z)
        return self.normalizer(z.device, torch.promote_types(z.dtype, torch.float32))(z)

    def normalizer(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Normalizer:
        """`normalize` with the statistics cast and placed once: what a training step applies to the
        float16 latents the store reader ships (moved to the device once, not per batch)."""
        mean = None if self.mean is None else self.mean.to(device, dtype)
        return Normalizer(mean=mean, scale=(1.0 / torch.sqrt(self.var + self.eps)).to(device, dtype))

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: z * sqrt(var + eps) + mean."""
        self._check(z)
        x = z.to(torch.float64) * torch.sqrt(self.var.to(z.device) + self.eps)
        if self.mean is not None:
            x = x + self.mean.to(z.device)
        return x.to(z.dtype)

    def _check(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"latents must be a floating-point tensor (..., {self.shape[0]}, {self.shape[1]})")
        if z.ndim < 2 or tuple(z.shape[-2:]) != self.shape:
            raise ValueError(
                f"latents of shape {tuple(z.shape)} do not match the statistics: expected "
                f"(..., {self.shape[0]}, {self.shape[1]}) (num_tokens, channels)"
            )

    def save(self, path: str | Path) -> None:
        """Write a safetensors file ("var", and "mean" when present) with metadata; atomic."""
        from safetensors.torch import save_file

        tensors = {"var": self.var.contiguous()}
        if self.mean is not None:
            tensors["mean"] = self.mean.contiguous()
        metadata = {
            "format": STATS_FORMAT,
            "format_version": str(STATS_FORMAT_VERSION),
            "eps": repr(float(self.eps)),
            "count": str(self.count),
            "num_tokens": str(self.shape[0]),
            "channels": str(self.shape[1]),
            "has_mean": "true" if self.has_mean else "false",
        }
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent statistics file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{path} is not a latent statistics file (format {meta.get('format')!r})")
        if int(meta.get("format_version", -1)) > STATS_FORMAT_VERSION:
            raise ValueError(
                f"{path} has stats format version {meta['format_version']}; this software reads "
                f"up to {STATS_FORMAT_VERSION}"
            )
        has_mean = meta.get("has_mean") == "true"
        if has_mean != ("mean" in tensors) or "var" not in tensors:
            raise ValueError(f"{path}: metadata has_mean={meta.get('has_mean')} but holds {sorted(tensors)}")
        stats = cls(mean=tensors.get("mean"), var=tensors["var"], eps=float(meta["eps"]), count=int(meta["count"]))
        if stats.shape != (int(meta["num_tokens"]), int(meta["channels"])):
            raise ValueError(
                f"{path}: tensors have shape {stats.shape}, metadata says "
                f"({meta['num_tokens']}, {meta['channels']})"
            )
        return stats


@dataclass(frozen=True)
class Normalizer:
    """(z - mean) * scale in the statistics' dtype (``z`` is cast to it first), on their device."""

    mean: torch.Tensor | None
    scale: torch.Tensor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[-2:]) != tuple(self.scale.shape):
            raise ValueError(f"latents of shape {tuple(z.shape)} do not match the statistics: expected "
                             f"(..., {self.scale.shape[0]}, {self.scale.shape[1]}) (num_tokens, channels)")
        x = z.to(self.scale.dtype)
        if self.mean is not None:
            x = x - self.mean
        return x * self.scale


class MomentAccumulator:
    """Exact streaming mean and (population) variance per position and channel, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # (N, C) float64, CPU
        self.m2: torch.Tensor | None = None  # sum of squared deviations from the mean

    @property
    def shape(self) -> tuple[int, int] | None:
        return None if self.mean is None else tuple(self.mean.shape)

    def update(self, batch: torch.Tensor | np.ndarray) -> MomentAccumulator:
        """Add a batch of latents (B, N, C); the moments are computed on the batch's device."""
        x = torch.as_tensor(batch)
        if x.ndim != 3:
            raise ValueError(f"expected a latent batch (B, N, C), got shape {tuple(x.shape)}")
        if self.shape is not None and tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"latent batch of shape {tuple(x.shape)} does not match this accumulator's "
                f"(B, {self.shape[0]}, {self.shape[1]})"
            )
        if x.shape[0] == 0:
            return self
        x = x.to(torch.float64)
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        self._merge(int(x.shape[0]), mean.cpu(), m2.cpu())
        return self

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Fold another accumulator's moments into this one (Chan et al.'s parallel algorithm)."""
        if other.count:
            if self.shape is not None and other.shape != self.shape:
                raise ValueError(f"cannot merge moments of shape {other.shape} into {self.shape}")
            self._merge(other.count, other.mean, other.m2)
        return self

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    def to_stats(self, *, with_mean: bool = True, eps: float = DEFAULT_EPS) -> LatentStats:
        if self.count == 0:
            raise ValueError("no latents accumulated: update() with at least one batch first")
        return LatentStats(
            mean=self.mean.clone() if with_mean else None, var=self.m2 / self.count, eps=eps, count=self.count
        )

    def to_state(self) -> dict[str, Any]:
        """Plain numpy arrays and a count, cheap to ship between Ray tasks."""
        if self.count == 0:
            return {"count": 0, "mean": None, "m2": None}
        return {"count": self.count, "mean": self.mean.numpy().copy(), "m2": self.m2.numpy().copy()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MomentAccumulator:
        acc = cls()
        count = int(state["count"])
        if count < 0:
            raise ValueError(f"moment state has a negative count {count}")
        if count:
            mean = torch.as_tensor(np.asarray(state["mean"], dtype=np.float64))
            m2 = torch.as_tensor(np.asarray(state["m2"], dtype=np.float64))
            if mean.ndim != 2 or mean.shape != m2.shape:
                raise ValueError(
                    f"moment state arrays must both be (N, C); got mean {tuple(mean.shape)}, m2 {tuple(m2.shape)}"
                )
            acc.count, acc.mean, acc.m2 = count, mean, m2
        return acc
