"""Fréchet distance against closed forms, and streaming feature statistics."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from rae.evaluation.feature_stats import FeatureStats
from rae.evaluation.frechet import frechet_distance


def _random_orthonormal(d: int, r: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    return q


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_diagonal_gaussians_match_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-12)


def test_identical_gaussians_have_zero_distance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 32))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_2048d_rank_deficient_commuting_covariances_match_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T with a dense orthogonal Q (a Householder reflection) and
    # supports overlapping only partly: both rank 1000 of 2048, product rank 500, so sqrtm(S1 S2)
    # is the square root of a singular matrix. Exact: sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(2)
    d = 2048
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    q = np.eye(d) - 2.0 * np.outer(v, v)
    a, b = np.zeros(d), np.zeros(d)
    a[:1000], b[500:1500] = rng.uniform(0.1, 2.0, 1000), rng.uniform(0.1, 2.0, 1000)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(expected, abs=1e-6 * expected)


def test_near_singular_non_commuting_case_where_float32_sqrtm_fails():
    # Rank-256 covariances in 512-d on two subspaces at known principal angles, half of them at
    # 90 degrees (so S1 S2 has non-trivial nilpotent structure), spectra spanning 8 decades.
    # Exact tr sqrt(S1 S2) = nuclear norm of diag(sqrt a) U1^T U2 diag(sqrt b), an r x r problem.
    rng = np.random.default_rng(3)
    d, r = 512, 256
    basis = _random_orthonormal(d, 2 * r, rng)
    u1 = basis[:, :r]
    angles = rng.uniform(0, np.pi / 2, r)
    angles[: r // 2] = np.pi / 2
    u2 = u1 * np.cos(angles) + basis[:, r:] * np.sin(angles)
    a, b = np.logspace(-6, 2, r), rng.permutation(np.logspace(-6, 2, r))
    s1, s2 = (u1 * a) @ u1.T, (u2 * b) @ u2.T
    core = np.sqrt(a)[:, None] * (u1.T @ u2) * np.sqrt(b)[None, :]
    expected = a.sum() + b.sum() - 2.0 * np.linalg.svd(core, compute_uv=False).sum()

    ours = frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm((s1 @ s2).astype(np.float32))
    naive_fp32 = float(np.real(a.sum() + b.sum() - 2.0 * np.trace(covmean)))

    assert abs(ours - expected) < 1e-7 * expected
    assert abs(naive_fp32 - expected) > 1e-4 * expected  # the naive float32 route is visibly off
    assert abs(ours - expected) < abs(naive_fp32 - expected) / 100


def test_sqrtm_method_agrees_with_eigh_on_sample_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(400, 64)), rng.normal(size=(400, 64)) * 1.5 + 0.3
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(*args, method="sqrtm") == pytest.approx(frechet_distance(*args), rel=1e-9)


def test_non_covariance_input_is_rejected():
    bad = np.diag([1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(3), bad, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


@pytest.mark.parametrize("cuts", [[0, 1000], [0, 1, 2, 999, 1000], [0, 137, 500, 501, 1000]])
def test_streaming_stats_merged_in_any_split_equal_numpy(cuts):
    rng = np.random.default_rng(5)
    x = rng.normal(loc=100.0, scale=3.0, size=(1000, 24)).astype(np.float32)  # large mean: tests stability
    parts = [FeatureStats(24).update(x[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:])]
    merged = FeatureStats(24)
    for part in reversed(parts):  # order must not matter
        merged.merge(FeatureStats.from_state(part.to_state()))
    ref = x.astype(np.float64)
    assert merged.count == 1000
    np.testing.assert_allclose(merged.mean, ref.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.covariance(), np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-10)


def test_streaming_stats_reject_wrong_width_and_nan():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).update(np.zeros((1, 4))).covariance()
