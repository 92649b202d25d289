"""The demo's measurements and report: reconstruction quality, sample quality as far as it can be
measured offline, loss curves and where the time went.

Sample quality offline, on a handful of classes and images, cannot be an FID that means anything
(Inception statistics of 64 images in 2048 dimensions are dominated by their bias). What can be
measured honestly, and is reported with its reference point:

- class consistency: each sample is encoded with the same frozen encoder and assigned to the
  nearest class centroid (cosine, mean-pooled tokens, centroids from the training latents); the
  fraction assigned to the class it was conditioned on, against chance (1 / classes) and against
  held-out real images (the ceiling);
- FD-DINOv2: the Fréchet distance between samples and real images in the encoder's feature space,
  beside the same distance between held-out and training real images (the floor at this sample size).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from jobs.demo.report_page import Report, image_grid, loss_curves
from rae.image_tensors import to_uint8_images, to_unit_images


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 NHWC images."""
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / np.maximum(err, 1e-10))


def pooled_features(encoder: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Mean-pooled encoder tokens of uint8 NHWC images, float64 (N, C)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_unit_images(torch.from_numpy(images[i:i + batch]))
            out.append(encoder(x).mean(dim=1).double().numpy())
    return np.concatenate(out)


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return float(((f @ c.T).argmax(axis=1) == labels).mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from rae.evaluation import frechet_distance

    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _decode_all(url: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.image_decode import decode_shard
    from pipelines.shards import list_shards

    images, labels = [], []
    for shard in list_shards(str(url)):
        decoded = decode_shard(shard, image_size=image_size)
        images.append(decoded.images)
        labels += decoded.labels
    return np.concatenate(images), np.asarray(labels)


def _history(run_export: str) -> list[dict]:
    path = Path(run_export) / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def build_report(workdir: Path, config, *, images_classes: list[str], shards: dict[str, Path], store: Path,
                 decoder_export: str, dit_export: str, samples_npz: str, timings: dict,
                 total_seconds: float) -> Path:
    from jobs.train.export import load_exported_model
    from pipelines.exports import read_export_facts
    from pipelines.sample_job import SampleConfig, plan_labels
    from pipelines.store_reader import read_latents
    from rae.encoders import OFFLINE_ENCODER, load_encoder
    from rae.latent_spec import check_same_latents
    from rae.offline_weights import OFFLINE_DINOV2_CAVEAT

    folder = workdir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    latents = read_export_facts(decoder_export, "decoder").latent_spec
    encoder = load_encoder(latents.encoder, weights=config.encoder_weights, input_size=latents.input_size)
    check_same_latents(latents, encoder.latent_spec(), f"the decoder {decoder_export}", "the report's encoder")
    decoder, _ = load_exported_model(decoder_export)
    size = latents.image_size
    classes = len(images_classes)

    # Reconstructions of held-out crops.
    val_images, val_labels = _decode_all(shards["val"], size)
    train_images, train_labels = _decode_all(shards["train"], size)
    with torch.no_grad():
        x = to_unit_images(torch.from_numpy(val_images))
        recon = to_uint8_images(decoder(encoder(x))).numpy()
    recon_psnr = psnr(val_images, recon)
    mean_image = np.broadcast_to(train_images.mean(axis=0).round().astype(np.uint8), val_images.shape)
    baseline_psnr = psnr(val_images, mean_image)
    pick = [int(np.flatnonzero(val_labels == c)[0]) for c in range(classes) if (val_labels == c).any()]
    pairs = image_grid([val_images[pick], recon[pick]], ["held-out originals", "reconstructions"], scale=2)
    pairs.save(folder / "reconstructions.png")

    # Samples, one row per class with a real crop first.
    from pipelines.eval_images import iter_sample_images

    samples = np.concatenate(list(iter_sample_images(samples_npz)))
    labels = plan_labels(SampleConfig(dit=dit_export, decoder=decoder_export, out="unused",
                                      num_samples=len(samples)), classes)
    rows = [np.concatenate([train_images[train_labels == c][:1], samples[labels == c]]) for c in range(classes)]
    image_grid(rows, [f"{c}: {name}" for c, name in enumerate(images_classes)], scale=2).save(
        folder / "samples.png")

    # Sample quality offline.
    stored = read_latents(str(store))
    originals = stored["view"] == 0
    pooled = stored["latent"][originals].astype(np.float64).mean(axis=1)
    centroids = np.stack([pooled[stored["label"][originals] == c].mean(axis=0) for c in range(classes)])
    sample_features = pooled_features(encoder, samples)
    val_features = pooled_features(encoder, val_images)
    train_features = pooled_features(encoder, train_images)
    metrics = {
        "reconstruction": {
            "psnr_db": float(recon_psnr.mean()),
            "mean_image_baseline_psnr_db": float(baseline_psnr.mean()),
            "images": int(len(val_images)),
            "note": "held-out crops the decoder never saw, at the decoder's resolution",
        },
        "samples": {
            "count": int(len(samples)),
            "class_consistency": nearest_centroid_accuracy(sample_features, labels, centroids),
            "class_consistency_real_heldout": nearest_centroid_accuracy(val_features, val_labels, centroids),
            "class_consistency_chance": 1.0 / classes,
            "fd_encoder_samples_vs_train": frechet(sample_features, train_features),
            "fd_encoder_heldout_vs_train": frechet(val_features, train_features),
            "sampler": f"euler, {config.sample_steps} steps, cfg {config.cfg_scale}",
        },
        # Each stage's wall time when it ran (a reused stage keeps its first run's), then this invocation's.
        "timings_s": {name: round(t.get("first_run_seconds", t["seconds"]), 1) for name, t in timings.items()}
        | {"total": round(sum(t.get("first_run_seconds", t["seconds"]) for t in timings.values()), 1),
           "this_invocation": round(total_seconds, 1)},
        "stages_reused": sorted(name for name, t in timings.items() if t.get("reused")),
        "classes": list(images_classes),  # label order
        "latent_spec": latents.to_dict(),
    }
    for key, value in metrics["samples"].items():
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"demo metric samples.{key} is not finite ({value})")

    histories = {"decoder": _history(decoder_export), "DiT^DH": _history(dit_export)}
    figures = [("reconstructions.png", f"Held-out crops (top) and their reconstructions through the frozen "
                                       f"encoder and the trained decoder: {metrics['reconstruction']['psnr_db']:.1f} dB "
                                       f"PSNR (mean-image baseline {metrics['reconstruction']['mean_image_baseline_psnr_db']:.1f} dB)."),
               ("samples.png", "Class-conditional samples from the DiT^DH (EMA weights), decoded; each row starts "
                               "with a real training crop of that class.")]
    if any(histories.values()):
        loss_curves({k: v for k, v in histories.items() if v}, folder / "loss_curves.png")
        figures.append(("loss_curves.png", "Training losses (averaged over each logging window)."))
    notes = [f"Latents: {latents.describe()}, from the frozen encoder."]
    if latents.encoder == OFFLINE_ENCODER:
        notes.append(OFFLINE_DINOV2_CAVEAT)
    notes.append("Sizes are the demo's (a few hundred images, minutes of CPU): the numbers show the chain "
                 "works end to end, not the paper's FID. Class consistency: samples assigned to the nearest "
                 "class centroid in encoder space (chance and held-out real images given beside it). "
                 "FD: Fréchet distance of mean-pooled encoder features, beside the real-vs-real value at "
                 "this sample size.")
    notes.append("Time per stage (s): " + ", ".join(f"{k} {v}" for k, v in metrics["timings_s"].items()))
    return Report("rae demo", figures, metrics, notes).write(folder)
