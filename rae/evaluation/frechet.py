"""Fréchet distance between two Gaussians, the math behind FID, sFID, rFID and FD-DINOv2.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)

The reference implementations (ADM's evaluator, pytorch-fid) take `scipy.linalg.sqrtm(S1 @ S2)`:
a Schur decomposition of a *non-symmetric* product, which goes complex when the product is
singular (rank-deficient covariances, fewer samples than dimensions) and needs an epsilon offset
and an imaginary-part check. Our default uses the identity

    tr sqrt(S1 S2) = tr sqrt(A S2 A),   A = S1^(1/2) (symmetric PSD square root)

S1 S2 is similar to A S2 A, which is symmetric PSD, so only two symmetric eigendecompositions
are needed (`eigh`, backward stable, real arithmetic, no Schur form, no complex numbers), and
rank-deficient covariances need no offset: a zero eigenvalue contributes sqrt(0) = 0. Round-off
leaves eigenvalues of size ~eps*|S| around zero; those below numpy's matrix-rank tolerance
(max * D * eps) are set to 0 before the square root, and an eigenvalue more negative than
`rtol` * max means the inputs were not covariances, which is an error.
It is also ~4x faster than `sqrtm` at 1024-d. The reference form stays available as
`method="sqrtm"` to reproduce published numbers bit-for-bit in spirit.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

__all__ = ["frechet_distance", "trace_sqrt_product"]


def _check_gaussian(name: str, mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"{name}: mean must be a vector (D,), got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: covariance must be ({mu.shape[0]}, {mu.shape[0]}) to match its mean, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mean/covariance contain NaN or inf")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ValueError(f"{name}: covariance is not symmetric (max |S - S^T| = {np.abs(sigma - sigma.T).max():.3g})")
    return mu, (sigma + sigma.T) / 2


def _round_off_floor(w: np.ndarray) -> float:
    """Eigenvalues below this are indistinguishable from zero (numpy's matrix_rank tolerance)."""
    return float(np.abs(w).max()) * w.shape[0] * np.finfo(np.float64).eps


def _sqrt_eigenvalues(w: np.ndarray) -> np.ndarray:
    """sqrt of eigenvalues with round-off ones set to 0: sqrt would inflate a 1e-16 into a 1e-8,
    and a rank-deficient 2048-d covariance has thousands of them."""
    return np.sqrt(np.where(w > _round_off_floor(w), w, 0.0))


def _psd_sqrt(sigma: np.ndarray, name: str, rtol: float) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    _check_eigenvalues(w, name, rtol)
    return (v * _sqrt_eigenvalues(w)) @ v.T


def _check_eigenvalues(w: np.ndarray, name: str, rtol: float) -> None:
    floor = -rtol * max(float(np.abs(w).max()), 1e-300)
    if float(w.min()) < floor:
        raise ValueError(
            f"{name} is not positive semi-definite: eigenvalue {w.min():.4g} is below the round-off "
            f"tolerance {floor:.3g}; pass covariance matrices (e.g. np.cov of features)"
        )


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, *, rtol: float = 1e-5) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2, via eigh of S1^(1/2) S2 S1^(1/2) (float64)."""
    a = _psd_sqrt(np.asarray(sigma1, dtype=np.float64), "sigma1", rtol)
    m = a @ np.asarray(sigma2, dtype=np.float64) @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    _check_eigenvalues(w, "sqrt(sigma1) @ sigma2 @ sqrt(sigma1)", rtol)
    return float(_sqrt_eigenvalues(w).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float, atol: float) -> float:
    """The ADM / pytorch-fid recipe: sqrtm of the product, offset on failure, imaginary check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's "singular matrix" chatter; we check the result
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=atol):
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component of {imag:.3g} (> {atol}); "
                "the covariances are too ill-conditioned for method='sqrtm', use method='eigh'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    method: str = "eigh",
    eps: float = 1e-6,
    atol: float = 1e-3,
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    method="eigh" (default): the symmetric form above, stable for rank-deficient covariances.
    method="sqrtm": the reference recipe (sqrtm of the product, `eps` diagonal offset when the
    result is not finite, ValueError when the imaginary part exceeds `atol`).
    """
    mu1, sigma1 = _check_gaussian("first Gaussian", mu1, sigma1)
    mu2, sigma2 = _check_gaussian("second Gaussian", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two Gaussians have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    if method == "eigh":
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps, atol)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
