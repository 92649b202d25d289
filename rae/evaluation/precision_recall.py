"""Improved precision and recall (Kynkäänniemi et al., 2019) as computed by the ADM evaluator.

Each set's manifold is the union of balls around its points with radius = distance to the
k-th nearest neighbour in the same set (k = 3; the point itself is neighbour 0). Precision is
the fraction of samples inside the reference manifold, recall the fraction of reference points
inside the sample manifold; "inside" is `distance <= radius`, as in the reference. Distances are
squared Euclidean, computed block by block (float32 by default, like the reference's fp32 path;
pass dtype=torch.float64 for exactness), so 50k x 50k never materialises: memory is
O(block * block).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["manifold_radii", "precision_recall"]


def _as_features(name: str, x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or inf")
    return t


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 like the reference."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(
    features: np.ndarray | torch.Tensor, k: int = 3, block: int = 4096, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set (self = 0th)."""
    x = _as_features("features", features, dtype)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=dtype)
    for r0 in range(0, n, block):
        rows = x[r0:r0 + block]
        best = None  # the k+1 smallest distances seen so far, per row
        for c0 in range(0, n, block):
            d = _sq_distances(rows, x[c0:c0 + block])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + block] = best[:, k]
    return radii.numpy()


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point: is it within radius of at least one centre?"""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for r0 in range(0, points.shape[0], block):
        rows = points[r0:r0 + block]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool)
        for c0 in range(0, centres.shape[0], block):
            d = _sq_distances(rows, centres[c0:c0 + block])
            hit |= (d <= radii[None, c0:c0 + block]).any(dim=1)
        inside[r0:r0 + block] = hit
    return inside


def precision_recall(
    reference: np.ndarray | torch.Tensor,
    samples: np.ndarray | torch.Tensor,
    *,
    k: int = 3,
    block: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` features, ADM-style with k = 3."""
    ref = _as_features("reference features", reference, dtype)
    gen = _as_features("sample features", samples, dtype)
    if ref.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref.shape[1]} vs samples {gen.shape[1]}")
    ref_radii = torch.from_numpy(manifold_radii(ref, k, block, dtype))
    gen_radii = torch.from_numpy(manifold_radii(gen, k, block, dtype))
    precision = _coverage(gen, ref, ref_radii, block).double().mean().item()
    recall = _coverage(ref, gen, gen_radii, block).double().mean().item()
    return precision, recall
