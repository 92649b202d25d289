"""Sample-quality metrics: FID/sFID/rFID/FD-DINOv2 (Fréchet distances), Inception Score,
precision/recall, the feature extractors behind them, reference statistics and the ADM .npz."""
from rae.evaluation.adm_npz import iter_adm_npz, read_adm_npz, write_adm_npz
from rae.evaluation.evaluate import evaluate, reconstruction_fid
from rae.evaluation.feature_extractors import (
    DinoV2Features,
    Features,
    InceptionFeatures,
    load_adm_inception,
    load_dinov2_features,
    load_offline_inception,
)
from rae.evaluation.feature_stats import FeatureStats
from rae.evaluation.frechet import frechet_distance
from rae.evaluation.inception_score import inception_score
from rae.evaluation.precision_recall import manifold_radii, precision_recall
from rae.evaluation.reference_stats import ReferenceStats, compute_reference_stats, summarize_features

__all__ = [
    "DinoV2Features", "FeatureStats", "Features", "InceptionFeatures", "ReferenceStats",
    "compute_reference_stats", "evaluate", "frechet_distance", "inception_score", "iter_adm_npz",
    "load_adm_inception", "load_dinov2_features", "load_offline_inception", "manifold_radii",
    "precision_recall", "read_adm_npz", "reconstruction_fid", "summarize_features", "write_adm_npz",
]
