"""`rae demo`'s levers, measured: which sizes make its pictures convincing within its time budget.

Each variant is a set of `DemoConfig` overrides run through the demo itself (`run_demo`), so what is
measured is what a user gets: held-out reconstruction PSNR (beside the mean image's), class
consistency of the samples (beside chance and real held-out crops), the samples' FD in encoder space
as a multiple of the held-out real crops' FD, and the wall time of every stage. A variant that
changes only late stages starts from a copy of another variant's work directory with those stages'
markers (and training runs) removed, so the demo reuses the rest: a sampler setting costs one
sampling stage, not a whole demo. Its reused stages report the seconds they took when they ran.

The machine is shared: every variant records the load average at its start and end, and absolute
seconds are load-dependent (see benchmarks/README.md). Variants run one per invocation
(``--variant NAME``; a full one takes ~15 minutes of two cores) and are merged into one result file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS_DIR, Recorder, parse_args, start_ray

STAGES = ("shards", "encode", "train_decoder", "train_dit", "sample")
OUTPUTS_OF_STAGE = {"shards": ("shards",), "encode": ("store",), "train_decoder": ("runs/decoder",),
                    "train_dit": ("runs/dit",), "sample": ("samples", "samples-unguided")}
GRID8 = {"encoder_input_size": 112, "crop_size": 128}
NO_GAN = {"disc_start_epoch": 99.0, "gan_start_epoch": 99.0}
L1 = {"decoder_l1_weight": 1.0, "decoder_mse_weight": 0.0}  # the decoder's pixel loss before 2026-12-02 session 2
MSE = {"decoder_l1_weight": 0.0, "decoder_mse_weight": 1.0}  # squared error alone, since


@dataclasses.dataclass(frozen=True)
class Variant:
    """DemoConfig overrides; with ``reuse`` another variant's workdir is copied and the stages from
    ``rerun_from`` on are run again."""

    overrides: dict[str, Any]
    reuse: str | None = None
    rerun_from: str = "shards"


VARIANTS = {
    # DemoConfig's defaults as they are; recorded before issue 17, when they were 4x4 tokens, tau 0.8, GAN from epoch 14
    "grid4-paper-loss": Variant({}),
    "grid8-tau0-nogan": Variant({**GRID8, "decoder_noise_tau": 0.0, **NO_GAN}),
    "grid8-tau0-nogan-cfg2": Variant({**GRID8, "decoder_noise_tau": 0.0, **NO_GAN, "cfg_scale": 2.0},
                                     reuse="grid8-tau0-nogan", rerun_from="sample"),
    "grid8-tau0-nogan-cfg4": Variant({**GRID8, "decoder_noise_tau": 0.0, **NO_GAN, "cfg_scale": 4.0},
                                     reuse="grid8-tau0-nogan", rerun_from="sample"),
    # The decoder's crops, epochs and noise tau (issue 17, 2026-12-01/02): the paper's random crops against
    # fixed views (each training crop's centre crop and its mirror, encoded once), then what the fixed
    # views' cheaper steps buy. Each pins what it measured, whatever DemoConfig's defaults become (these
    # trained on L1 alone).
    "random-crops-48-tau0.8": Variant({"decoder_crops": "random", "decoder_epochs": 48, "decoder_noise_tau": 0.8, **L1}),
    **{f"fixed-views-{epochs}-tau{tau:g}": Variant({"decoder_crops": "center", "decoder_epochs": epochs,
                                                    "decoder_noise_tau": tau, **L1})
       for epochs, tau in ((48, 0.8), (96, 0.8), (96, 0.0), (96, 0.4), (64, 0.4), (120, 0.4))},
    "fixed-views-64-tau0.4-batch16": Variant({"decoder_crops": "center", "decoder_epochs": 64,
                                              "decoder_noise_tau": 0.4, "decoder_batch": 16, **L1}),
    # The pixel loss (2026-12-02 session 2): squared error alone, the defaults since.
    **{f"fixed-views-{epochs}-tau0.4-mse": Variant({"decoder_crops": "center", "decoder_epochs": epochs,
                                                    "decoder_noise_tau": 0.4, **MSE}) for epochs in (64, 96)},
    # The training set's size (2026-12-02 session 3): twice the crops per class at the same decoder and DiT
    # steps. From here on the held-out crops no longer move with the training size; the runs above were
    # scored on the crops the earlier single random stream cut (block-means baseline 19.06 dB, now 19.78).
    "fixed-views-32-tau0.4-mse-96-per-class": Variant({"train_per_class": 96, "decoder_crops": "center",
                                                       "decoder_epochs": 32, "decoder_noise_tau": 0.4,
                                                       "dit_epochs": 10, **MSE}),
    **{f"fixed-views-32-tau0.4-mse-96-per-class-cfg{scale:g}": Variant(
        {"train_per_class": 96, "decoder_crops": "center", "decoder_epochs": 32, "decoder_noise_tau": 0.4,
         "dit_epochs": 10, **MSE, "cfg_scale": scale}, reuse="fixed-views-32-tau0.4-mse-96-per-class",
        rerun_from="sample") for scale in (2.0, 4.0, 5.0)},
    "fixed-views-64-tau0.4-mse-48-per-class": Variant({"train_per_class": 48, "decoder_crops": "center",
                                                       "decoder_epochs": 64, "decoder_noise_tau": 0.4,
                                                       "dit_epochs": 20, **MSE}),
}
# --quick measures the cheapest lever (the sampler's guidance) on a finished demo's models (--base):
# a whole demo, even at toy sizes, is minutes of Ray Train start-up.
QUICK_VARIANTS = {"quick-base": Variant({}, reuse="base", rerun_from="report"),
                  "quick-cfg2": Variant({"cfg_scale": 2.0}, reuse="base", rerun_from="sample")}


def prepare_workdir(root: Path, name: str, variant: Variant) -> Path:
    """The variant's workdir: fresh, or a copy of its base's with the stages from rerun_from unmarked
    (``report``: every stage reused)."""
    workdir = root / name
    if variant.reuse is None or workdir.exists():
        return workdir
    base = (root / variant.reuse).resolve()
    if not (base / "stages" / "sample.json").exists():
        raise FileNotFoundError(f"variant {name} reuses {variant.reuse}, which has not run in {root}: run "
                                f"--variant {variant.reuse} first")
    shutil.copytree(base, workdir, symlinks=True)
    for marker in (workdir / "stages").glob("*.json"):  # the reused stages' outputs: the copy's own
        marker.write_text(marker.read_text().replace(str(base), str(workdir.resolve())))
    for stage in STAGES[STAGES.index(variant.rerun_from):] if variant.rerun_from in STAGES else ():
        (workdir / "stages" / f"{stage}.json").unlink(missing_ok=True)
        for output in OUTPUTS_OF_STAGE[stage]:
            shutil.rmtree(workdir / output, ignore_errors=True)
    shutil.rmtree(workdir / "report", ignore_errors=True)
    return workdir


def quick_overrides(base: Path) -> dict[str, Any]:
    """The settings a finished demo ran with, which its reused stages must keep: as its last stage
    recorded them; for a demo of an older rae (no settings recorded), sizes that fit its images
    (jobs/demo/photos.py's done.txt: names, crops per split, crop size, seed), with few samples and
    sampler steps."""
    report, images = base / "report" / "metrics.json", base / "images" / "done.txt"
    if not (report.exists() and images.exists()):
        raise FileNotFoundError(f"--base {base}: no report/metrics.json or images/done.txt; pass the workdir of a "
                                f"finished rae demo")
    recorded = json.loads((base / "stages" / "sample.json").read_text()).get("settings")
    if recorded is not None:
        return recorded
    train_per_class, val_per_class, crop_size, seed = map(int, images.read_text().split()[-4:])
    return {"classes": len(json.loads(report.read_text())["classes"]), "train_per_class": train_per_class,
            "val_per_class": val_per_class, "crop_size": crop_size, "seed": seed, "samples_per_class": 2,
            "sample_steps": 4}


def measure(root: Path, name: str, variant: Variant, base_overrides: dict[str, Any]) -> dict[str, Any]:
    from jobs.demo.run import DemoConfig, run_demo

    config = dataclasses.replace(DemoConfig(), **{**base_overrides, **variant.overrides})
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    index = run_demo(prepare_workdir(root, name, variant), config)
    metrics = json.loads((index.parent / "metrics.json").read_text())
    recon, samples = metrics["reconstruction"], metrics["samples"]
    unguided = metrics.get("samples_unguided", samples)
    return {
        "overrides": variant.overrides, "reused_from": variant.reuse, "rerun_from": variant.rerun_from,
        "psnr_db": round(recon["psnr_db"], 2), "mean_image_psnr_db": round(recon["mean_image_baseline_psnr_db"], 2),
        "class_consistency": round(samples["class_consistency"], 3),
        "class_consistency_unguided": round(unguided["class_consistency"], 3),
        "class_consistency_real_heldout": round(samples["class_consistency_real_heldout"], 3),
        "class_consistency_chance": round(samples["class_consistency_chance"], 3),
        "fd_samples": round(samples["fd_encoder_samples_vs_train"], 2),
        "fd_heldout": round(samples["fd_encoder_heldout_vs_train"], 2),
        "fd_ratio": round(samples["fd_ratio_to_heldout"], 2),
        "fd_ratio_unguided": round(unguided["fd_ratio_to_heldout"], 2),
        "stage_seconds": {k: v for k, v in metrics["timings_s"].items() if k != "this_invocation"},
        "demo_seconds": metrics["timings_s"]["total"], "this_invocation_s": round(time.perf_counter() - started, 1),
        "targets_met": metrics["targets_met"],
        "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
    }


@dataclasses.dataclass(frozen=True)
class DecoderPrototype:
    """One decoder lever measured in-process, as the demo's decoder run trains: a random ``image_size``
    crop of each stored crop (resized as `crop_sizes` says) drawn every step and encoded by the frozen
    encoder, L1 + the offline perceptual loss, optionally the GAN phase for the last ``gan_steps``
    steps (the discriminator from ``disc_lead_steps`` before), EMA, linear warmup then a linear decay
    to ``final_lr_fraction`` of ``lr`` (1.0: a constant rate, so one long run gives the curve over
    steps). At every ``eval_every`` steps the EMA decoder is scored on the held-out crops: PSNR, and
    the decoder's ceiling for samples (its reconstructions' class consistency and FD ratio, the
    report's measures)."""

    encoder_input_size: int = 56
    crop_size: int = 96
    noise_tau: float = 0.8
    perceptual_weight: float = 1.0
    width: int = 256
    depth: int = 4
    steps: int = 192  # the demo's 16 epochs of 384 crops at batch 32
    lr: float = 5e-4
    warmup_steps: int = 10
    final_lr_fraction: float = 0.1
    gan_steps: int = 0
    disc_lead_steps: int = 12
    eval_every: int = 96
    batch: int = 32
    classes: int = 8  # the demo's photographs, crops per class for training and held out
    train_per_class: int = 48
    val_per_class: int = 8
    # Train on the stored views instead of fresh random crops: each training photo's centre crop and its
    # mirror image, encoded once before the run (what a latent store holds), so no step runs the encoder.
    stored_views: bool = False
    other_ema_decays: tuple[float, ...] = ()  # kept beside the demo's 0.97, scored by PSNR alone (free levers)
    l1_weight: float = 1.0
    mse_weight: float = 0.0  # squared error beside (or, with l1_weight 0, instead of) L1; PSNR is squared error
    weight_decay: float = 0.0


DEMO_DECODER_RUN = DecoderPrototype(lr=2e-3, perceptual_weight=0.0, steps=1536, eval_every=384, stored_views=True,
                                    noise_tau=0.4)

DECODER_PROTOTYPES = {
    "grid4": DecoderPrototype(),
    "grid4-tau0": DecoderPrototype(noise_tau=0.0),
    "grid4-lr2e-3": DecoderPrototype(lr=2e-3),
    "grid4-lr2e-3-tau0": DecoderPrototype(lr=2e-3, noise_tau=0.0),
    "grid4-lr4e-3": DecoderPrototype(lr=4e-3),
    "grid4-lr2e-3-gan24": DecoderPrototype(lr=2e-3, gan_steps=24),  # the demo's GAN phase: epochs 14-16 of 16
    "grid4-lr2e-3-constant-768": DecoderPrototype(lr=2e-3, final_lr_fraction=1.0, steps=768),
    "grid4-lr2e-3-l1": DecoderPrototype(lr=2e-3, perceptual_weight=0.0),  # L1 alone: no perceptual network
    "grid4-lr2e-3-l1-constant-1152": DecoderPrototype(lr=2e-3, perceptual_weight=0.0, final_lr_fraction=1.0,
                                                      steps=1152, eval_every=192),
    "grid4-lr4e-3-l1": DecoderPrototype(lr=4e-3, perceptual_weight=0.0),
    "grid4-lr2e-3-l1-w384d6": DecoderPrototype(lr=2e-3, perceptual_weight=0.0, width=384, depth=6),
    "grid8": DecoderPrototype(encoder_input_size=112, crop_size=128),
    "grid8-lr2e-3-l1": DecoderPrototype(encoder_input_size=112, crop_size=128, lr=2e-3, perceptual_weight=0.0,
                                        eval_every=48),
    "grid8-lr2e-3-l1-stored-576": DecoderPrototype(encoder_input_size=112, crop_size=128, lr=2e-3,
                                                   perceptual_weight=0.0, steps=576, eval_every=96, stored_views=True),
    "grid4-lr2e-3-l1-stored-2304": DecoderPrototype(lr=2e-3, perceptual_weight=0.0, steps=2304, eval_every=576,
                                                    stored_views=True),
    # The demo's decoder run (fixed views, 64 epochs = 1536 steps, tau 0.4, L1, lr 2e-3 decaying to a
    # tenth), and levers that cost nothing per step: other EMA decays, a squared-error term, the rate.
    "demo-views-1536": DEMO_DECODER_RUN,
    "demo-views-1536-emas": dataclasses.replace(DEMO_DECODER_RUN, other_ema_decays=(0.99, 0.995, 0.998)),
    "demo-views-1536-mse": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=5.0, other_ema_decays=(0.99, 0.995)),
    "demo-views-1536-mse-lr3e-3": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=5.0, lr=3e-3),
    "demo-views-1536-mse-only": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=5.0, l1_weight=0.0),
    "demo-views-1536-mse-only-lr3e-3": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=5.0, l1_weight=0.0, lr=3e-3),
    "demo-views-1536-mse-only-final0.3": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=5.0, l1_weight=0.0,
                                                             final_lr_fraction=0.3),
    # The demo's decoder run on squared error with 48 crops per class, and what its plateau was (the training
    # PSNR beside the held-out one): capacity or the training set. Twice the crops at the same steps is the demo's
    # run since 2026-12-02 session 3.
    "demo-mse": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=1.0, l1_weight=0.0),
    "demo-mse-wd0.05": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=1.0, l1_weight=0.0, weight_decay=0.05),
    "demo-mse-96-per-class": dataclasses.replace(DEMO_DECODER_RUN, mse_weight=1.0, l1_weight=0.0, train_per_class=96),
}


def _photo_crops(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.image_decode import center_crop_arr

    folders = sorted(p for p in (root / split).iterdir() if p.is_dir())
    images = [(center_crop_arr(Image.open(f).convert("RGB"), size), label)
              for label, folder in enumerate(folders) for f in sorted(folder.glob("*.jpg"))]
    return np.stack([i for i, _ in images]), np.asarray([label for _, label in images])


def measure_decoder(root: Path, proto: DecoderPrototype, seed: int = 0) -> dict[str, Any]:
    """Held-out PSNR and the decoder's ceiling for samples against steps, and seconds per step."""
    import copy

    import torch

    from jobs.demo.photos import make_demo_images
    from jobs.demo.report import frechet, nearest_centroid_accuracy, pooled_features, psnr, token_block_means
    from pipelines.decoder_crops import crop_sizes, random_crops
    from rae.decoder import build_decoder
    from rae.decoder_loss import DecoderLoss, DecoderLossConfig
    from rae.discriminator import build_discriminator
    from rae.ema import EMA
    from rae.encoders import OFFLINE_ENCODER, load_encoder
    from rae.image_tensors import to_uint8_images, to_unit_images
    from rae.perceptual import build_perceptual_loss

    torch.manual_seed(seed)
    images = make_demo_images(root / f"images-{proto.crop_size}", classes=proto.classes,
                              train_per_class=proto.train_per_class, val_per_class=proto.val_per_class,
                              size=proto.crop_size, seed=seed)
    encoder = load_encoder(OFFLINE_ENCODER, input_size=proto.encoder_input_size)
    size = encoder.spec.image_size
    resize, _ = crop_sizes(size)
    stored, _ = _photo_crops(images.train.parent, "train", resize)
    train, train_labels = _photo_crops(images.train.parent, "train", size)
    val, val_labels = _photo_crops(images.val.parent, "val", size)
    classes = int(train_labels.max()) + 1
    train_features, val_features = pooled_features(encoder, train), pooled_features(encoder, val)
    centroids = np.stack([train_features[train_labels == c].mean(0) for c in range(classes)])
    heldout_fd = frechet(val_features, train_features)
    with torch.no_grad():
        z_val = encoder(to_unit_images(torch.from_numpy(val)))
    decoder = build_decoder("tiny", latent_channels=encoder.spec.channels, grid=encoder.spec.grid,
                            noise_tau=proto.noise_tau, width=proto.width, depth=proto.depth, heads=4,
                            mlp_dim=4 * proto.width, image_mean=tuple(encoder.spec.mean), image_std=tuple(encoder.spec.std))
    # The GAN phase's "epochs" are steps here: D from steps - gan - lead, its term from steps - gan.
    never = float(proto.steps + 1)
    discriminator = build_discriminator(OFFLINE_ENCODER, input_size=proto.encoder_input_size) if proto.gan_steps else None
    loss = DecoderLoss(DecoderLossConfig(
        l1_weight=proto.l1_weight, mse_weight=proto.mse_weight, perceptual_weight=proto.perceptual_weight,
        disc_start_epoch=float(proto.steps - proto.gan_steps - proto.disc_lead_steps) if proto.gan_steps else never,
        gan_start_epoch=float(proto.steps - proto.gan_steps) if proto.gan_steps else never),
        perceptual=build_perceptual_loss("efficientnet-lite0"), discriminator=discriminator)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=proto.lr, betas=(0.9, 0.95), weight_decay=proto.weight_decay)
    disc_optimizer = (torch.optim.AdamW(discriminator.trainable_parameters(), lr=proto.lr, betas=(0.9, 0.95),
                                        weight_decay=0.0) if discriminator else None)
    ema = EMA(decoder, 0.97)
    other_emas = {decay: EMA(decoder, decay) for decay in proto.other_ema_decays}
    rng = np.random.default_rng(seed)
    if proto.stored_views:
        views = np.concatenate([train, train[:, :, ::-1]])
        with torch.inference_mode():
            view_latents = torch.cat([encoder(to_unit_images(torch.from_numpy(np.ascontiguousarray(chunk))))
                                      for chunk in np.array_split(views, max(1, len(views) // 64))])
    curve, seconds, encoder_seconds = {}, 0.0, 0.0
    for step in range(1, proto.steps + 1):
        started = time.perf_counter()
        warm = min(1.0, step / proto.warmup_steps) if proto.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = proto.lr * warm * (1 - (1 - proto.final_lr_fraction) * step / proto.steps)
        if proto.stored_views:
            picked = rng.integers(0, len(views), proto.batch)
            real = to_unit_images(torch.from_numpy(np.ascontiguousarray(views[picked])))
            latent = view_latents[picked].clone()
        else:
            real = to_unit_images(torch.from_numpy(random_crops(stored[rng.integers(0, len(stored), proto.batch)], size, rng)))
            with torch.inference_mode():
                latent = encoder(real)
            latent = latent.clone()
        encoder_seconds += time.perf_counter() - started
        decoder.train()
        if discriminator is not None:
            discriminator.eval()
        total, _ = loss.generator_loss(real, decoder(decoder.augment_with_noise(latent)), epoch=float(step),
                                       last_layer_weight=decoder.last_layer_weight)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        ema.update(decoder)
        for other in other_emas.values():
            other.update(decoder)
        if loss.discriminator_active(float(step)):
            with torch.no_grad():
                fake = decoder.eval()(latent)
            decoder.train()
            discriminator.train()
            disc_optimizer.zero_grad(set_to_none=True)
            disc_loss, _ = loss.discriminator_loss(real, fake, epoch=float(step))
            disc_loss.backward()
            disc_optimizer.step()
        seconds += time.perf_counter() - started
        if step % proto.eval_every == 0 or step == proto.steps:
            averaged = copy.deepcopy(decoder).eval()
            averaged.load_state_dict(ema.shadow)
            with torch.no_grad():
                recon = to_uint8_images(averaged(z_val)).numpy()
                # The same count of training crops, to tell a gap to the training set from a capacity limit.
                every = np.arange(0, len(train), max(1, len(train) // len(val)))[:len(val)]
                seen = train[every]
                seen_latents = (view_latents[every] if proto.stored_views
                                else encoder(to_unit_images(torch.from_numpy(np.ascontiguousarray(seen)))))
                train_psnr = float(psnr(seen, to_uint8_images(averaged(seen_latents)).numpy()).mean())
            recon_features = pooled_features(encoder, recon)
            others = {}
            for decay, other in [("raw", None), *other_emas.items()]:
                scored = copy.deepcopy(decoder).eval()
                if other is not None:
                    scored.load_state_dict(other.shadow)
                with torch.no_grad():
                    others[str(decay)] = round(float(psnr(val, to_uint8_images(scored(z_val)).numpy()).mean()), 2)
            curve[step] = {"seconds": round(seconds, 1), "psnr_db": round(float(psnr(val, recon).mean()), 2),
                           "train_psnr_db": round(train_psnr, 2),
                           "psnr_db_other_weights": others,
                           "ceiling_class_consistency": round(nearest_centroid_accuracy(recon_features, val_labels, centroids), 3),
                           "ceiling_fd_ratio": round(frechet(recon_features, train_features) / heldout_fd, 2)}
    mean_image = np.broadcast_to(train.mean(axis=0).round().astype(np.uint8), val.shape)
    return {"prototype": dataclasses.asdict(proto), "image_size": size, "by_step": curve,
            "mean_image_psnr_db": round(float(psnr(val, mean_image).mean()), 2),
            "token_block_means_psnr_db": round(float(psnr(val, token_block_means(val, encoder.spec.grid)).mean()), 2),
            "class_consistency_real_heldout": round(nearest_centroid_accuracy(val_features, val_labels, centroids), 3),
            "seconds_per_step": round(seconds / proto.steps, 3), "encoder_seconds_per_step": round(encoder_seconds / proto.steps, 3),
            "train_images": len(train), "val_images": len(val), "loadavg_end": list(os.getloadavg())}


@dataclasses.dataclass(frozen=True)
class DiTPrototype:
    """One DiT lever measured in-process: ditdh-tiny trained on latents encoded once (and flipped), then
    sampled at several CFG scales from the same noise. Class consistency here is measured on the
    sampled latents themselves (nearest class centroid of mean-pooled tokens), the report's measure
    without the decoder in between; FD likewise, against the training latents."""

    encoder_input_size: int = 56
    crop_size: int = 96
    steps: int = 480  # the demo's 20 epochs of 768 latents (flips included) at batch 32
    lr: float = 5e-4  # constant: one long run gives the curve over steps
    eval_every: int = 0  # also sample and score at every this many steps (0: at the end only)
    cfg_scales: tuple[float, ...] = (1.0, 2.0, 4.0)
    samples_per_class: int = 8
    sample_steps: int = 50
    classes: int = 8
    train_per_class: int = 48
    val_per_class: int = 8
    label_init_std: float = 0.02  # the class table's initial scale (DiT's 0.02)


DIT_PROTOTYPES = {"grid4": DiTPrototype(), "grid8": DiTPrototype(encoder_input_size=112, crop_size=128),
                  "grid4-lr2e-3-1200": DiTPrototype(lr=2e-3, steps=1200, eval_every=240, cfg_scales=(1.0, 3.0)),
                  "grid4-lr2e-3-label1-720": DiTPrototype(lr=2e-3, steps=720, eval_every=240, cfg_scales=(1.0, 3.0),
                                                          label_init_std=1.0)}


def measure_dit(root: Path, proto: DiTPrototype, seed: int = 0) -> dict[str, Any]:
    import copy

    import torch

    from jobs.demo.photos import make_demo_images
    from jobs.demo.report import frechet, nearest_centroid_accuracy
    from rae.dit import build_dit
    from rae.ema import EMA
    from rae.encoders import OFFLINE_ENCODER, load_encoder
    from rae.image_tensors import to_unit_images
    from rae.sampling import SamplerConfig, classifier_free_guidance, sample
    from rae.transport import TransportConfig, training_loss

    torch.manual_seed(seed)
    images = make_demo_images(root / f"images-{proto.crop_size}", classes=proto.classes,
                              train_per_class=proto.train_per_class, val_per_class=proto.val_per_class,
                              size=proto.crop_size, seed=seed)
    encoder = load_encoder(OFFLINE_ENCODER, input_size=proto.encoder_input_size)
    train, labels = _photo_crops(images.train.parent, "train", encoder.spec.image_size)
    val, val_labels = _photo_crops(images.val.parent, "val", encoder.spec.image_size)
    with torch.no_grad():
        both = np.concatenate([train, train[:, :, ::-1]])
        z = torch.cat([encoder(to_unit_images(torch.from_numpy(np.ascontiguousarray(both[i:i + 64]))))
                       for i in range(0, len(both), 64)])
        z_val = encoder(to_unit_images(torch.from_numpy(val)))
    y = torch.from_numpy(np.concatenate([labels, labels]))
    classes = int(labels.max()) + 1
    mean, std = z.mean(0), (z.var(0) + 1e-5).sqrt()
    model = build_dit("ditdh-tiny", latent_channels=encoder.spec.channels, grid=encoder.spec.grid, num_classes=classes)
    if proto.label_init_std != 0.02:  # (only then: the other prototypes keep their random stream)
        torch.nn.init.normal_(model.y_embedder.table.weight, std=proto.label_init_std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=proto.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema = EMA(model, 0.99)
    generator = torch.Generator().manual_seed(seed)
    pooled = z[:len(train)].double().mean(1).numpy()
    centroids = np.stack([pooled[labels == c].mean(0) for c in range(classes)])
    wanted = torch.arange(classes).repeat_interleave(proto.samples_per_class)
    heldout_fd = frechet(z_val.double().mean(1).numpy(), pooled)

    def score() -> dict[str, Any]:
        averaged = copy.deepcopy(model).eval()
        averaged.load_state_dict(ema.shadow)
        by_scale = {}
        for scale in proto.cfg_scales:
            with torch.no_grad():
                drawn = sample(classifier_free_guidance(averaged, wanted, scale, null_class=classes),
                               (len(wanted), *z.shape[1:]), config=SamplerConfig(num_steps=proto.sample_steps),
                               generator=torch.Generator().manual_seed(seed)) * std + mean
            features = drawn.double().mean(1).numpy()
            fd = frechet(features, pooled)
            by_scale[str(scale)] = {"class_consistency_latent": round(nearest_centroid_accuracy(features, wanted.numpy(), centroids), 3),
                                    "fd_latent": round(fd, 2), "fd_ratio_latent": round(fd / heldout_fd, 2)}
        return by_scale

    seconds, by_step = 0.0, {}
    for step in range(1, proto.steps + 1):
        started = time.perf_counter()
        pick = torch.randint(0, len(z), (32,), generator=generator)
        model.train()
        loss = training_loss(model, (z[pick] - mean) / std, y[pick], config=TransportConfig()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        seconds += time.perf_counter() - started
        if proto.eval_every and step % proto.eval_every == 0 and step != proto.steps:
            by_step[step] = {"loss": round(float(loss.detach()), 4), "by_cfg_scale": score()}
    return {"prototype": dataclasses.asdict(proto), "by_cfg_scale": score(), "by_step": by_step,
            "final_loss": round(float(loss.detach()), 4), "fd_heldout_latent": round(heldout_fd, 2),
            "class_consistency_real_heldout_latent": round(nearest_centroid_accuracy(
                z_val.double().mean(1).numpy(), val_labels, centroids), 3),
            "seconds_per_step": round(seconds / proto.steps, 3), "loadavg_end": list(os.getloadavg())}


def with_steps(proto, steps: int):
    return dataclasses.replace(proto, steps=steps) if steps else proto


def main(argv: list[str] | None = None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--variant", action="append", default=[])
    extra.add_argument("--decoder-prototype", action="append", default=[], choices=sorted(DECODER_PROTOTYPES),
                       help="measure a decoder lever in-process instead of a demo variant")
    extra.add_argument("--dit-prototype", action="append", default=[], choices=sorted(DIT_PROTOTYPES),
                       help="measure a DiT lever (steps, CFG) in-process instead of a demo variant")
    extra.add_argument("--prototype-steps", type=int, default=0, help="train the prototypes this many steps "
                       "(0: their own; a few steps measure the cost per step only)")
    extra.add_argument("--root", default="/tmp/rae-demo-levers", help="work directories of the variants")
    extra.add_argument("--base", default=None, help="--quick: a finished demo workdir whose models it re-samples")
    known, rest = extra.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(__doc__.splitlines()[0], rest)
    if args.quick and not known.base:
        raise ValueError("--quick re-samples a finished demo: pass --base WORKDIR (e.g. ./rae-demo after rae demo)")
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    names = list(variants) if args.quick or not known.variant else known.variant
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(variants)}")
    out = Path(args.out) if args.out else RESULTS_DIR / "demo_levers.json"
    previous = json.loads(out.read_text())["results"] if out.exists() and not args.quick else {}
    base_overrides = quick_overrides(Path(known.base)) if args.quick else {}
    recorder = Recorder("demo_levers", args, {"variants": {n: dataclasses.asdict(v) for n, v in variants.items()},
                                              "base_overrides": base_overrides})
    recorder.record["results"].update(previous)
    root = Path(known.root) / ("quick" if args.quick else "full")
    if args.quick:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "base").symlink_to(Path(known.base).resolve())
    root.mkdir(parents=True, exist_ok=True)
    for name in known.decoder_prototype:
        recorder.add(f"decoder-prototype/{name}", {"loadavg_start": list(os.getloadavg()),
                                                   **measure_decoder(root, with_steps(DECODER_PROTOTYPES[name], known.prototype_steps))})
    for name in known.dit_prototype:
        recorder.add(f"dit-prototype/{name}", {"loadavg_start": list(os.getloadavg()),
                                               **measure_dit(root, with_steps(DIT_PROTOTYPES[name], known.prototype_steps))})
    if known.decoder_prototype or known.dit_prototype:
        names = known.variant
    started = bool(names) and start_ray()
    try:
        for name in names:
            recorder.add(name, measure(root, name, variants[name], base_overrides))
    finally:
        if started:  # a Ray left running in a caller's process (a test's) would refuse its next ray.init
            import ray

            ray.shutdown()
    recorder.skip("gpu", "the demo is sized for two CPU cores; no GPU part")
    recorder.write()


if __name__ == "__main__":
    main()
