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

from jobs.demo.report_page import Report, Section, Table, image_grid, loss_curves
from rae.decoder_loss import DecoderLossConfig, pixel_loss_terms
from rae.image_tensors import to_uint8_images, to_unit_images


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 NHWC images."""
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / np.maximum(err, 1e-10))


def token_block_means(images: np.ndarray, grid: int) -> np.ndarray:
    """uint8 NHWC images with each of the ``grid`` x ``grid`` blocks (one token's pixels) filled with its
    mean colour: what a decoder reaches that recovers each token's average colour and nothing within it."""
    n, height, width, channels = images.shape
    if height % grid or width % grid:
        raise ValueError(f"images of {height}x{width} px do not divide into a {grid}x{grid} token grid")
    blocks = images.reshape(n, grid, height // grid, grid, width // grid, channels).astype(np.float64).mean(axis=(2, 4))
    return np.repeat(np.repeat(blocks, height // grid, axis=1), width // grid, axis=2).round().astype(np.uint8)


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


FULL_SIZE_METHOD = (
    ("images", "{images}", "ImageNet-1k: 1.28 M photographs of 1000 classes, 256 px"),
    ("encoder", "{encoder}", "DINOv2-B with 4 registers (dinov2-b-reg4), 224 px input"),
    ("latent per image", "{tokens} tokens of {channels}", "16x16 = 256 tokens of 768"),
    ("decoder", "{decoder}", "ViT-XL, 16 epochs at batch 512 of random crops, L1 + LPIPS, GAN from epoch 8, "
                                "latent noise tau 0.8"),
    ("generator", "{dit}", "DiT^DH-XL, 800 epochs at batch 1024, on GPUs"),
    ("sample quality", "the three numbers above", "FID 1.51 unguided, 1.13 guided (AutoGuidance), 50k samples"),
)


def sample_quality(samples: np.ndarray, labels: np.ndarray, encoder: torch.nn.Module, centroids: np.ndarray,
                   train_features: np.ndarray, heldout_fd: float) -> dict:
    """Class consistency and FD of one set of samples, with the FD as a multiple of the held-out floor."""
    features = pooled_features(encoder, samples)
    fd = frechet(features, train_features)
    return {"count": int(len(samples)), "class_consistency": nearest_centroid_accuracy(features, labels, centroids),
            "fd_encoder_samples_vs_train": fd, "fd_ratio_to_heldout": fd / max(heldout_fd, 1e-12)}


def targets_met(reconstruction_psnr: float, samples: dict) -> dict[str, bool]:
    """The demo's three targets (issue 17): recognisable reconstructions and class-conditional samples."""
    return {"reconstruction_psnr_at_least_20_db": reconstruction_psnr >= 20.0,
            "class_consistency_at_least_0.5": samples["class_consistency"] >= 0.5,
            "fd_at_most_4x_heldout": samples["fd_ratio_to_heldout"] <= 4.0}


def build_report(workdir: Path, config, *, images_classes: list[str], shards: dict[str, Path], store: Path,
                 decoder_export: str, dit_export: str, samples_npz: str, timings: dict,
                 total_seconds: float, unguided_npz: str | None = None) -> Path:
    """Measure the run and write ``workdir/report``. ``samples_npz`` holds the samples drawn with the
    demo's guidance (``config.cfg_scale``), ``unguided_npz`` the same noise drawn without it (none
    when the two are one: cfg_scale 1)."""
    from jobs.train.export import load_exported_model
    from pipelines.eval_images import iter_sample_images
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
    block_psnr = psnr(val_images, token_block_means(val_images, latents.grid))
    pick = [int(np.flatnonzero(val_labels == c)[0]) for c in range(classes) if (val_labels == c).any()]
    zoom = 2 if size < 128 else 1  # small images shown larger, pixel for pixel
    pairs = image_grid([val_images[pick], recon[pick]], ["held-out originals", "reconstructions"], scale=zoom)
    pairs.save(folder / "reconstructions.png")

    # Samples: guided and, beside them, unguided from the same noise.
    guided = np.concatenate(list(iter_sample_images(samples_npz)))
    unguided = np.concatenate(list(iter_sample_images(unguided_npz))) if unguided_npz else None
    labels = plan_labels(SampleConfig(dit=dit_export, decoder=decoder_export, out="unused",
                                      num_samples=len(guided)), classes)
    per_class = int((labels == 0).sum())
    groups = [("real", lambda c: train_images[train_labels == c][:1])]
    if unguided is not None:
        groups.append(("unguided", lambda c: unguided[labels == c]))
    groups.append((f"guided (CFG {config.cfg_scale:g})" if unguided is not None else "samples",
                   lambda c: guided[labels == c]))
    rows = [np.concatenate([pick_images(c) for _, pick_images in groups]) for c in range(classes)]
    starts = np.cumsum([0, 1] + [per_class] * (len(groups) - 1))[:len(groups)]
    image_grid(rows, [f"{c}: {name}" for c, name in enumerate(images_classes)], scale=zoom,
               column_labels=[(int(start), title) for start, (title, _) in zip(starts, groups)]).save(
        folder / "samples.png")

    # Sample quality offline, against real images measured the same way.
    stored = read_latents(str(store))
    originals = stored["view"] == 0
    pooled = stored["latent"][originals].astype(np.float64).mean(axis=1)
    centroids = np.stack([pooled[stored["label"][originals] == c].mean(axis=0) for c in range(classes)])
    val_features = pooled_features(encoder, val_images)
    train_features = pooled_features(encoder, train_images)
    heldout_fd = frechet(val_features, train_features)
    reference = {"class_consistency_real_heldout": nearest_centroid_accuracy(val_features, val_labels, centroids),
                 "class_consistency_chance": 1.0 / classes, "fd_encoder_heldout_vs_train": heldout_fd}
    # The decoder's ceiling for the samples: real held-out latents, decoded, scored as the samples are.
    decoded_heldout = sample_quality(recon, val_labels, encoder, centroids, train_features, heldout_fd)
    sampler = f"euler, {config.sample_steps} steps"
    samples = {**sample_quality(guided, labels, encoder, centroids, train_features, heldout_fd), **reference,
               "sampler": f"{sampler}, cfg {config.cfg_scale}"}
    metrics = {
        "reconstruction": {
            "psnr_db": float(recon_psnr.mean()),
            "mean_image_baseline_psnr_db": float(baseline_psnr.mean()),
            # each token's pixels at their mean colour: a decoder that got the average of every token right
            "token_block_means_psnr_db": float(block_psnr.mean()),
            "token_grid": int(latents.grid),
            "images": int(len(val_images)),
            "note": "held-out crops the decoder never saw, at the decoder's resolution",
            # the samples' two measures on these reconstructions: what a perfect DiT would reach through this decoder
            "class_consistency": decoded_heldout["class_consistency"],
            "fd_encoder_vs_train": decoded_heldout["fd_encoder_samples_vs_train"],
            "fd_ratio_to_heldout": decoded_heldout["fd_ratio_to_heldout"],
        },
        "samples": samples,
        # Each stage's wall time when it ran (a reused stage keeps its first run's), then this invocation's.
        "timings_s": {name: round(t.get("first_run_seconds", t["seconds"]), 1) for name, t in timings.items()}
        | {"total": round(sum(t.get("first_run_seconds", t["seconds"]) for t in timings.values()), 1),
           "this_invocation": round(total_seconds, 1)},
        "stages_reused": sorted(name for name, t in timings.items() if t.get("reused")),
        "classes": list(images_classes),  # label order
        "latent_spec": latents.to_dict(),
    }
    if unguided is not None:
        metrics["samples_unguided"] = {
            **sample_quality(unguided, labels, encoder, centroids, train_features, heldout_fd), **reference,
            "sampler": f"{sampler}, no guidance"}
    metrics["targets_met"] = targets_met(metrics["reconstruction"]["psnr_db"], samples)
    for group in ("samples", "samples_unguided"):
        for key, value in metrics.get(group, {}).items():
            if isinstance(value, float) and not np.isfinite(value):
                raise ValueError(f"demo metric {group}.{key} is not finite ({value})")

    histories = {"decoder": _history(decoder_export), "DiT^DH": _history(dit_export)}
    if any(histories.values()):
        loss_curves({k: v for k, v in histories.items() if v}, folder / "loss_curves.png")
    return page(config, metrics, latents, images_classes, per_class=per_class, has_unguided=unguided is not None,
                has_losses=any(histories.values()),
                caveat=OFFLINE_DINOV2_CAVEAT if latents.encoder == OFFLINE_ENCODER else None).write(folder)


def page(config, metrics: dict, latents, classes: list[str], *, per_class: int, has_unguided: bool,
         has_losses: bool, caveat: str | None) -> Report:
    """The report's words: what each picture and number is, and what it is compared with."""
    recon, samples = metrics["reconstruction"], metrics["samples"]
    unguided = metrics.get("samples_unguided")
    met = metrics["targets_met"]
    yes = {True: "yes", False: "no"}
    intro = [
        f"rae demo trained a small Representation Autoencoder and a small DiT^DH on {len(classes)} classes: each "
        f"class is one photograph ({', '.join(classes)}), and its images are random crops of it "
        f"({config.train_per_class} for training and {config.val_per_class} held out per class). A frozen "
        f"encoder turns each image into a grid of tokens, the latent ({latents.describe()}); a decoder learns to "
        f"turn latents back into pixels; a DiT^DH learns to generate latents of a given class from noise, and "
        f"the decoder turns those into images.",
        f"The whole run took {metrics['timings_s']['total']:.0f} s of wall time on this machine (stage by stage "
        f"below). Its sizes fit minutes of CPU, so the numbers show that the method works, at this scale; they "
        f"are not the paper's."]
    numbers = Table(("what is measured", "this run", "compared with", "target", "met"), [
        ("reconstruction PSNR of held-out crops (dB; higher: closer to the original)", recon["psnr_db"],
         f"the mean training image: {recon['mean_image_baseline_psnr_db']:.1f} dB; each token's "
         f"{latents.image_size // recon['token_grid']}-px block at its mean colour: {recon['token_block_means_psnr_db']:.1f} dB",
         ">= 20 dB",
         yes[met["reconstruction_psnr_at_least_20_db"]]),
        ("class consistency of the samples (share whose nearest class is the one asked for)",
         samples["class_consistency"], f"chance {samples['class_consistency_chance']:.3f}; real held-out crops "
         f"{samples['class_consistency_real_heldout']:.3f}", ">= 0.5", yes[met["class_consistency_at_least_0.5"]]),
        ("FD of the samples to the training images, in encoder space (lower: closer to the real images)",
         samples["fd_encoder_samples_vs_train"], f"held-out real crops: {samples['fd_encoder_heldout_vs_train']:.1f} "
         f"(ratio {samples['fd_ratio_to_heldout']:.1f}x)", "<= 4x held-out", yes[met["fd_at_most_4x_heldout"]]),
    ])
    if unguided is not None:
        numbers.rows.extend([
            ("the same class consistency without guidance", unguided["class_consistency"], "as above", "", ""),
            ("the same FD without guidance", unguided["fd_encoder_samples_vs_train"],
             f"ratio {unguided['fd_ratio_to_heldout']:.1f}x held-out", "", "")])
    numbers.rows.extend([
        ("class consistency of the reconstructions of held-out crops (the decoder's ceiling for the samples)",
         recon["class_consistency"], "real held-out crops, not decoded", "", ""),
        ("FD of those reconstructions to the training images", recon["fd_encoder_vs_train"],
         f"ratio {recon['fd_ratio_to_heldout']:.1f}x held-out", "", "")])
    sections = [
        Section("The three numbers", [
            "Each number is put beside the value that gives it meaning. PSNR compares a reconstruction with its "
            "original pixel by pixel; predicting the average training image for every crop gives the baseline. "
            "Class consistency encodes each sample with the same frozen encoder and asks which class it is "
            "nearest to (cosine distance to each class's mean training latent): chance is one over the number "
            "of classes, and real held-out crops, measured the same way, are the ceiling. FD is the Fréchet "
            "distance between the mean-pooled encoder features of the samples and of the training crops; "
            "held-out real crops, as many as the samples, give the floor that this sample size allows. The "
            f"samples are measured with the demo's sampler ({samples['sampler']}). A sample reaches the pixels "
            "through the decoder, so it can look no more like its class than the decoder lets it: the last two "
            "rows score the decoder's reconstructions of real held-out crops the same way, the most a perfect "
            "DiT^DH would reach with this decoder."], table=numbers),
        Section("Reconstructions", figures=[("reconstructions.png",
            f"Top row: one held-out crop per class, never seen in training. Bottom row: the same crop encoded by "
            f"the frozen encoder and decoded by the trained decoder. {recon['psnr_db']:.1f} dB PSNR over all "
            f"{recon['images']} held-out crops (the mean training image: {recon['mean_image_baseline_psnr_db']:.1f} "
            f"dB). A latent here is a {recon['token_grid']}x{recon['token_grid']} grid of tokens, one per "
            f"{latents.image_size // recon['token_grid']}-px block: the crops with every block filled with its own mean colour "
            f"score {recon['token_block_means_psnr_db']:.1f} dB, so a decoder above that draws detail within the "
            f"blocks, and one below it has not yet learned even their colours exactly.")]),
        Section("Samples", figures=[("samples.png",
            "One row per class. First column: a real training crop of that class, for reference. "
            + (f"Then {per_class} samples drawn without guidance and, from the same noise, {per_class} drawn "
               f"with classifier-free guidance at scale {config.cfg_scale:g} (the model's conditional velocity "
               f"pushed away from its unconditional one). Guidance trades variety for class fidelity."
               if has_unguided else f"Then {per_class} samples of the DiT^DH (EMA weights), decoded."))]),
    ]
    if has_losses:
        sections.append(Section("Training losses", figures=[("loss_curves.png",
            "Training losses of the decoder and of the DiT^DH against the step (averaged over each logging "
            "window; log scale).")]))
    timings = metrics["timings_s"]
    reused = set(metrics["stages_reused"])
    sections.append(Section("Where the time went", [
        "Wall time of each stage when it ran; a stage reused from an earlier run of the demo in the same "
        "folder shows the time it took then."], table=Table(("stage", "seconds", "reused"), [
            (name, seconds, yes[name in reused]) for name, seconds in timings.items()
            if name not in ("total", "this_invocation")] + [("total", timings["total"], ""),
                                                            ("this invocation", timings["this_invocation"], "")])))
    gan = (f"GAN from epoch {float(config.gan_start_epoch):g}" if config.gan_start_epoch is not None
           else "no GAN phase")
    no_perceptual = config.decoder_perceptual_weight == 0
    terms = pixel_loss_terms(DecoderLossConfig(l1_weight=config.decoder_l1_weight, mse_weight=config.decoder_mse_weight,
                                               perceptual_weight=config.decoder_perceptual_weight))
    terms += [f"{config.decoder_perceptual_weight:g} x perceptual"] if not no_perceptual else []
    loss = " + ".join(terms) + (" alone" if len(terms) == 1 else "")
    unlike_the_paper = (" (the paper's loss is L1 + perceptual + GAN; at this size the perceptual and GAN terms did "
                        "not pay for their time, and squared error, which PSNR scores, trained faster than L1: "
                        "benchmarks/README.md)" if no_perceptual and config.gan_start_epoch is None else "")
    label_table = (f", class table initialised at std {float(config.dit_label_init_std):g} (DiT's 0.02: at this "
                   f"size its samples only become class-conditional after ~1,000 steps)"
                   if float(config.dit_label_init_std) != 0.02 else "")
    crops = ("each training crop's centre view (as the store holds it and the held-out crops are shown) and its "
             "mirror image, encoded once"
             if config.decoder_crops == "center" else "random crops")
    demo_side = {"images": f"{len(classes)} photographs, {config.train_per_class} crops each, "
                           f"{latents.image_size} px", "encoder": f"{latents.encoder}, {latents.input_size} px input",
                 "tokens": f"{latents.grid}x{latents.grid} = {latents.tokens}", "channels": latents.channels,
                 "decoder": f"width {config.decoder_width}, depth {config.decoder_depth}, "
                            f"{config.decoder_epochs} epochs of {crops}, {loss}, {gan}{unlike_the_paper}, "
                            f"latent noise tau {float(config.decoder_noise_tau):g}", "dit": f"{config.dit_model}, {config.dit_epochs} epochs{label_table}"}
    sections.append(Section("How the full-size method differs", [
        "The paper (Representation Autoencoders, DiT^DH) runs the same chain at a scale this demo cannot: "
        "its FID is measured on 50,000 samples against ImageNet, which needs a GPU cluster; the demo's three "
        "numbers are what can be measured honestly on a few hundred images."],
        table=Table(("", "this demo", "the paper"), [
            (what, demo.format(**demo_side), paper) for what, demo, paper in FULL_SIZE_METHOD])))
    if caveat:
        sections.append(Section("About the encoder", [caveat]))
    return Report("rae demo: what this run did", intro, sections, metrics)
