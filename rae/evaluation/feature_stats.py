"""Streaming, mergeable mean and covariance of feature vectors (float64).

Each batch is reduced to (count, mean, centred scatter) and folded in with Chan et al.'s
pairwise update, so partial results from many workers merge in any order to the one-shot
`np.mean` / `np.cov(rowvar=False)` answer up to round-off. The state is plain numpy, so a Ray
task can ship it back and the driver can merge it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FeatureStats"]


@dataclass
class FeatureStats:
    """Running statistics of (N, D) features. `dim` fixes D; count/mean/scatter are the state."""

    dim: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    scatter: np.ndarray = field(default=None)  # type: ignore[assignment]  # sum of (x - mean)(x - mean)^T

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.scatter is None:
            self.scatter = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> "FeatureStats":
        """Fold in a batch of features (B, D); returns self."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if x.shape[0] == 0:
            return self
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        self._combine(x.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold in another accumulator's statistics (order-independent); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.count:
            self._combine(other.count, other.mean, other.scatter)
        return self

    def _combine(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1), as np.cov(features, rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}")
        return self.scatter / (self.count - 1)

    def to_state(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays, picklable and cheap to ship between processes."""
        return {"count": np.asarray(self.count, dtype=np.int64), "mean": self.mean, "scatter": self.scatter}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "FeatureStats":
        mean = np.asarray(state["mean"], dtype=np.float64)
        return cls(dim=mean.shape[0], count=int(state["count"]), mean=mean.copy(),
                   scatter=np.asarray(state["scatter"], dtype=np.float64).copy())
