"""One call from samples to the numbers a paper table reports: FID, sFID, IS, precision, recall."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rae.evaluation.adm_npz import iter_adm_npz
from rae.evaluation.frechet import frechet_distance
from rae.evaluation.inception_score import inception_score
from rae.evaluation.precision_recall import precision_recall
from rae.evaluation.reference_stats import ReferenceStats, summarize_features

__all__ = ["evaluate", "reconstruction_fid"]

PAPER_SAMPLE_COUNT = 50_000


def _images(source: Iterable[Any] | str | Path) -> Iterable[Any]:
    return iter_adm_npz(source) if isinstance(source, (str, Path)) else source


def _comparability(extractor: Any, reference: ReferenceStats, num_samples: int) -> tuple[bool, str]:
    if not extractor.comparable_with_papers:
        return False, f"extractor is {extractor.label}; numbers are for comparing runs scored the same way"
    if num_samples != PAPER_SAMPLE_COUNT:
        return False, f"{num_samples} samples; papers report FID on {PAPER_SAMPLE_COUNT} (FID is biased by sample count)"
    return True, "ADM-suite Inception-v3 on 50k samples against the given reference statistics"


def evaluate(
    samples: Iterable[Any] | str | Path,
    reference: ReferenceStats | str | Path,
    extractor: Any,
    *,
    splits: int = 10,
    k: int = 3,
    max_pr_samples: int = 10_000,
) -> dict[str, Any]:
    """Score generated images against reference statistics in the extractor's feature space.

    samples: an ADM .npz path or an iterable of image batches (uint8 NHWC/NCHW, float [0, 1] NCHW).
    reference: ReferenceStats or its .npz path (ours, or an ADM reference batch's precomputed stats).
    Returns fid, sfid, inception_score(+_std), precision, recall (None where unavailable, with the
    reason under `unavailable`), the extractor's id and label, and whether the numbers are
    comparable with published ones."""
    ref = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
    if ref.feature_space != extractor.feature_space:
        raise ValueError(f"reference statistics were computed in {ref.feature_space} ({ref.extractor_id}); "
                         f"extractor {extractor.id} computes {extractor.feature_space}: recompute one of them")
    summary = summarize_features(_images(samples), extractor, keep_features=max_pr_samples)
    n = summary.pool.count
    result: dict[str, Any] = {"num_samples": n, "fid": frechet_distance(summary.pool.mean, summary.pool.covariance(), ref.mu, ref.sigma)}
    unavailable: dict[str, str] = {}

    if summary.spatial is not None and ref.mu_s is not None:
        result["sfid"] = frechet_distance(summary.spatial.mean, summary.spatial.covariance(), ref.mu_s, ref.sigma_s)
    else:
        result["sfid"] = None
        unavailable["sfid"] = ("extractor has no mixed_6/conv features" if summary.spatial is None
                               else "reference statistics hold no spatial (mu_s, sigma_s) statistics")
    if summary.probs is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(summary.probs, splits=splits)
    else:
        result["inception_score"] = result["inception_score_std"] = None
        unavailable["inception_score"] = f"{extractor.label} has no classifier layer (no class probabilities)"
    if ref.features is not None and len(ref.features) > k:
        result["precision"], result["recall"] = precision_recall(ref.features, summary.features, k=k)
    else:
        result["precision"] = result["recall"] = None
        unavailable["precision_recall"] = "reference statistics hold no reference features"

    comparable, note = _comparability(extractor, ref, n)
    result.update(unavailable=unavailable, extractor_id=extractor.id, extractor_label=extractor.label,
                  reference_id=ref.extractor_id, reference_digest=ref.digest,
                  comparable_with_papers=comparable, comparability_note=note)
    return result


def reconstruction_fid(
    originals: Iterable[Any] | str | Path,
    reconstructions: Iterable[Any] | str | Path,
    extractor: Any,
) -> dict[str, Any]:
    """rFID (or FD-DINOv2 of reconstructions, with a DINOv2 extractor): the Fréchet distance between
    the features of reconstructions and of the originals they came from."""
    orig = summarize_features(_images(originals), extractor, keep_features=0)
    recon = summarize_features(_images(reconstructions), extractor, keep_features=0)
    if orig.pool.count != recon.pool.count:
        raise ValueError(f"{orig.pool.count} originals but {recon.pool.count} reconstructions; rFID pairs them one to one")
    return {
        "rfid": frechet_distance(recon.pool.mean, recon.pool.covariance(), orig.pool.mean, orig.pool.covariance()),
        "num_images": orig.pool.count,
        "extractor_id": extractor.id,
        "extractor_label": extractor.label,
        "comparable_with_papers": bool(extractor.comparable_with_papers and orig.pool.count == PAPER_SAMPLE_COUNT),
    }
