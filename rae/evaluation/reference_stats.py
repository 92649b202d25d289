"""Reference statistics: the (mu, sigma) of real images in one feature space, computed once
(e.g. from ImageNet val shards) and reused by every evaluation, plus optionally a subset of the
raw features for precision/recall.

File format: an .npz with `mu`, `sigma` (and `mu_s`, `sigma_s` for sFID) under the ADM reference
batch's key names, `count`, `extractor_id`, `feature_space`, `source`, optional `features`, and a
sha256 `digest` of all of it, checked on load.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rae.evaluation.adm_npz import read_adm_npz
from rae.evaluation.feature_extractors import ADM_FEATURE_SPACE
from rae.evaluation.feature_stats import FeatureStats

__all__ = ["ReferenceStats", "FeatureSummary", "summarize_features", "compute_reference_stats"]

ADM_REFERENCE_ID = "adm-reference-batch:tf-inception-2015-12-05"


@dataclass
class FeatureSummary:
    """What one pass of an extractor over an image stream leaves behind."""

    pool: FeatureStats
    spatial: FeatureStats | None
    features: np.ndarray  # the first `keep_features` pool features (for precision/recall)
    probs: np.ndarray | None  # all class probabilities (for IS), None if the extractor has none


def summarize_features(images: Iterable[Any], extractor: Any, *, keep_features: int | None = None) -> FeatureSummary:
    """Run `extractor` over an iterable of image batches, streaming the statistics in float64.

    keep_features: how many pool features to keep for precision/recall (None: all, 0: none)."""
    pool = FeatureStats(extractor.dim)
    spatial: FeatureStats | None = None
    kept, probs, n_kept = [], [], 0
    for batch in images:
        feats = extractor(batch)
        pool.update(feats.pool)
        if feats.spatial is not None:
            spatial = spatial or FeatureStats(feats.spatial.shape[1])
            spatial.update(feats.spatial)
        if feats.probs is not None:
            probs.append(feats.probs)
        if keep_features is None or n_kept < keep_features:
            take = feats.pool if keep_features is None else feats.pool[: keep_features - n_kept]
            kept.append(take.astype(np.float32))
            n_kept += len(take)
    if pool.count == 0:
        raise ValueError("the image iterator yielded no images")
    return FeatureSummary(
        pool=pool,
        spatial=spatial,
        features=np.concatenate(kept) if kept else np.zeros((0, extractor.dim), np.float32),
        probs=np.concatenate(probs) if probs else None,
    )


@dataclass
class ReferenceStats:
    """Gaussian statistics of reference images in one feature space (see module docstring)."""

    extractor_id: str
    feature_space: str
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    features: np.ndarray | None = None
    source: str = ""

    def _payload(self) -> dict[str, np.ndarray]:
        out = {"mu": np.asarray(self.mu, np.float64), "sigma": np.asarray(self.sigma, np.float64),
               "count": np.asarray(self.count, np.int64), "extractor_id": np.asarray(self.extractor_id),
               "feature_space": np.asarray(self.feature_space), "source": np.asarray(self.source)}
        for key in ("mu_s", "sigma_s", "features"):
            if getattr(self, key) is not None:
                out[key] = np.asarray(getattr(self, key))
        return out

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for key, value in sorted(self._payload().items()):
            h.update(key.encode())
            h.update(str(value.dtype).encode() + str(value.shape).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"reference statistics are written as .npz, got {path}")
        np.savez(path, digest=np.asarray(self.digest), **self._payload())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        """Load our .npz (digest verified) or an ADM reference batch (mu/sigma/mu_s/sigma_s + arr_0)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if "digest" not in keys:
                if {"mu", "sigma"} <= keys:
                    return cls.from_adm_reference_batch(path)
                raise ValueError(f"{path} holds neither reference statistics (mu, sigma, digest) nor an ADM "
                                 f"reference batch (mu, sigma, arr_0); keys: {sorted(keys)}")
            opt = {k: data[k] for k in ("mu_s", "sigma_s", "features") if k in keys}
            stats = cls(extractor_id=str(data["extractor_id"]), feature_space=str(data["feature_space"]),
                        mu=data["mu"], sigma=data["sigma"], count=int(data["count"]), source=str(data["source"]), **opt)
            stored = str(data["digest"])
        if stats.digest != stored:
            raise ValueError(f"{path} is corrupt or was edited: digest {stats.digest[:16]} != stored {stored[:16]}")
        return stats

    @classmethod
    def from_adm_reference_batch(cls, path: str | Path, extractor: Any = None, *, batch_size: int = 250) -> "ReferenceStats":
        """Statistics from an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): its
        precomputed TF-Inception mu/sigma (and mu_s/sigma_s); with an ADM-space `extractor`, also the
        features of its `arr_0` images for precision/recall, as the ADM evaluator does."""
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
            mu_s = data["mu_s"] if "mu_s" in data.files else None
            sigma_s = data["sigma_s"] if "sigma_s" in data.files else None
        features = None
        if extractor is not None:
            if extractor.feature_space != ADM_FEATURE_SPACE:
                raise ValueError(f"ADM reference batches are in {ADM_FEATURE_SPACE}; extractor {extractor.id} "
                                 f"computes {extractor.feature_space}")
            images = read_adm_npz(path)
            features = summarize_features((images[i:i + batch_size] for i in range(0, len(images), batch_size)),
                                          extractor).features
        return cls(extractor_id=ADM_REFERENCE_ID, feature_space=ADM_FEATURE_SPACE, mu=mu, sigma=sigma,
                   count=-1, mu_s=mu_s, sigma_s=sigma_s, features=features, source=f"ADM reference batch {Path(path).name}")


def compute_reference_stats(images: Iterable[Any], extractor: Any, *, keep_features: int = 10_000,
                            source: str = "") -> ReferenceStats:
    """Reference statistics of an image stream (uint8 NHWC/NCHW or float [0, 1] NCHW batches)."""
    summary = summarize_features(images, extractor, keep_features=keep_features)
    spatial = summary.spatial
    return ReferenceStats(
        extractor_id=extractor.id, feature_space=extractor.feature_space, mu=summary.pool.mean,
        sigma=summary.pool.covariance(), count=summary.pool.count,
        mu_s=None if spatial is None else spatial.mean, sigma_s=None if spatial is None else spatial.covariance(),
        features=summary.features if keep_features else None, source=source,
    )
