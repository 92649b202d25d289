"""Improved precision/recall (k-NN manifolds, k = 3) on feature sets with known answers."""
import numpy as np
import pytest

import torch

from rae.evaluation.precision_recall import manifold_radii, precision_recall


def _cluster(center: float, n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=center, scale=1.0, size=(n, d)).astype(np.float32)


def test_identical_sets_have_full_precision_and_recall():
    x = _cluster(0.0, 300, 16, 0)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall():
    assert precision_recall(_cluster(0.0, 200, 16, 0), _cluster(1000.0, 200, 16, 1)) == (0.0, 0.0)


def test_samples_covering_one_of_two_reference_modes():
    # Reference: two far-apart modes of 150 points; samples: exactly the points of mode A.
    # Every sample is a reference point (precision 1); only mode A is covered (recall 0.5).
    mode_a, mode_b = _cluster(0.0, 150, 16, 0), _cluster(500.0, 150, 16, 1)
    precision, recall = precision_recall(np.concatenate([mode_a, mode_b]), mode_a.copy())
    assert (precision, recall) == (1.0, 0.5)


def test_radii_are_the_third_neighbour_excluding_self_like_brute_force():
    x = _cluster(0.0, 97, 8, 2).astype(np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    expected = np.sort(d2, axis=1)[:, 3]
    np.testing.assert_allclose(manifold_radii(x, k=3, dtype=torch.float64), expected, rtol=1e-9, atol=1e-9)


def test_blocked_computation_equals_single_block():
    ref, gen = _cluster(0.0, 230, 12, 3), _cluster(0.7, 190, 12, 4)
    single = precision_recall(ref, gen, block=4096)
    blocked = precision_recall(ref, gen, block=17)
    assert single == blocked
    assert 0.0 < single[0] < 1.0 and 0.0 < single[1] < 1.0


def test_mismatched_or_too_small_inputs_are_rejected():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(np.zeros((10,)), np.zeros((10, 4)))
