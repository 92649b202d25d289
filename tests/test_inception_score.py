"""Inception Score on constructed class probabilities with known answers."""
import numpy as np
import pytest

from rae.evaluation.inception_score import inception_score


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.full((1000, 10), 0.1))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_confident_predictions_spread_uniformly_score_num_classes():
    num_classes = 1008
    probs = np.eye(num_classes)[np.arange(10 * num_classes) % num_classes]  # each split sees every class once
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_matches_the_adm_formula_on_random_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(5000, 50))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # The ADM evaluator: contiguous splits of 500 here (5000 in the 50k protocol), mean of exp(mean KL).
    expected = []
    for i in range(0, 5000, 500):
        part = probs[i:i + 500]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        expected.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert std == pytest.approx(np.std(expected), rel=1e-9)


def test_logits_or_too_few_rows_are_rejected():
    with pytest.raises(ValueError, match="softmax outputs, not logits"):
        inception_score(np.random.default_rng(0).normal(size=(100, 10)))
    with pytest.raises(ValueError, match="splits=10"):
        inception_score(np.full((5, 10), 0.1))
