"""Inception Score from class probabilities, split as the ADM evaluator does.

IS = exp(E_x KL(p(y|x) || p(y))) per split, p(y) the split's marginal; the reference splits
50k samples into 10 contiguous chunks of 5000 and reports the mean (we also return the std).
"""
from __future__ import annotations

import numpy as np

__all__ = ["inception_score"]


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` contiguous chunks of `probs` (N, classes)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, num_classes) class probabilities, got shape {p.shape}")
    if splits < 1 or p.shape[0] < splits:
        raise ValueError(f"need at least splits={splits} rows of probabilities (and splits >= 1), got {p.shape[0]}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must be probability distributions (non-negative, summing to 1); "
                         "pass softmax outputs, not logits")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: entries with p = 0 contribute nothing to the KL.
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) - np.log(np.where(marginal > 0, marginal, 1.0))), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
