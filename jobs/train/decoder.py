"""`rae train decoder`: the RAE pixel decoder (stage 1) with L1 + LPIPS + adaptive GAN, FSDP2 on Ray Train.

Decision: the decoder trains from the image shards through the frozen encoder on the train
workers, not from the latent store. The paper's training crops are random (resize to 384, random
crop 256), so each step's latent differs from any cached one, and a store of every crop is
impossible. Re-encoding is cheap beside the rest of the step: the DINOv2-B encoder costs ~22 GMACs
per image against ~110 GMACs for the ViT-XL decoder's forward (x3 with backward) plus the
discriminator, under ~10% of the step. Image decoding and the random crop run in a CPU Ray Data
operator (:mod:`pipelines.decoder_crops`); uint8 crops reach the workers through
``get_dataset_shard("train")``, and every rank takes the same fixed number of steps per epoch.
A small image set can instead train on fixed views (``crops: center``: each image's centre crop and
its mirror image, :mod:`pipelines.decoder_views`), read from the worker's memory and encoded once
(:class:`ViewLatents`), so its steps run the decoder alone.

The decoder consumes the encoder's raw latents (the LayerNorm'd tokens), not the store's
normalized ones: normalization belongs to the diffusion side, which denormalizes before decoding.

One step on each rank: (1) generator: encode the crops (inference mode), add noise-augmentation noise,
decode, L1 + perceptual (+ 0.75 x adaptive x GAN from ``loss.gan_start_epoch``), backward over the
micro-batches, AdamW step, EMA update; (2) discriminator, from ``loss.disc_start_epoch``: fakes
from a clean eval-mode pass, hinge loss on DiffAugmented reals and 8-bit fakes, gradients averaged
over ranks, AdamW step. Both use the shared micro-batch accumulator (:mod:`jobs.train.optimizer_step`).
Every forward runs under the run's autocast (``loop.precision``: bf16 on GPU, fp32 on CPU) and the
decoder's blocks are compiled on GPU (``loop.compile``), as in the DiT run; the frozen encoder's
latents are cast back to fp32, as the encode pipeline's are. Decoder blocks and then the root are
FSDP2 units; the discriminator's heads are small and replicated on every rank (gradients
all-reduced, as DDP would); the frozen encoder, discriminator trunk and perceptual network are
plain replicated modules.

Perceptual loss: LPIPS-VGG when its VGG16 file is found (``lpips_weights`` or the torch hub
cache); otherwise the offline EfficientNet-Lite0 distance, announced loudly (never LPIPS on a
random VGG). The checkpoint holds decoder + its optimizer, discriminator heads + their optimizer,
the EMA and the step (which fixes the LR schedule, the GAN phase and every seed).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobs.train.checkpointing import ModelState
from pipelines.decoder_crops import ShardCensus, census, crop_dataset, crop_sizes
from pipelines.decoder_views import VIEWS_PER_IMAGE, FixedViews, check_fixed_views_fit
from jobs.train.launch import check_batch_fits, check_run_length, train_task
from jobs.train.lr_schedule import LRSchedule
from jobs.train.optimizer_step import Batch, accumulate_gradients, apply_update, read_logs
from jobs.train.parallelize import autocast, average_gradients, shard_model
from jobs.train.progress import say
from jobs.train.loop import (
    BatchSource,
    LoopConfig,
    OptimConfig,
    RunContext,
    Task,
    full_state_dict,
)
from rae.decoder import DECODER_PRESETS, build_decoder
from rae.decoder_loss import DecoderLoss, DecoderLossConfig, pixel_loss_terms
from rae.discriminator import BACKBONES, build_discriminator
from rae.ema import EMA
from rae.encoders import DEFAULT_ENCODER, ENCODER_PRESETS, load_encoder
from rae.latent_spec import LatentSpec
from rae.image_tensors import to_unit_images
from rae.perceptual import PERCEPTUAL_KINDS, build_perceptual_loss, default_vgg16_path

logger = logging.getLogger(__name__)


@dataclass
class DecoderRunConfig:
    """Defaults: the paper's ViT-XL decoder on DINOv2-B (16 epochs, global batch 512, AdamW 2e-4
    with 1 warmup epoch and cosine to 2e-5, betas (0.9, 0.95), no weight decay, EMA 0.9978 per
    step, noise tau 0.8, D from epoch 6, GAN from epoch 8, crops 384 -> 256)."""

    shards: str = ""
    encoder: str = DEFAULT_ENCODER
    encoder_weights: str | None = None
    encoder_input_size: int = 0  # 0: the encoder preset's input size
    decoder: str = "vit-xl"
    decoder_overrides: dict = field(default_factory=dict)
    noise_tau: float = 0.8
    perceptual: str = "lpips-vgg"
    lpips_weights: str | None = None  # torchvision's vgg16-397923af.pth; default: the torch hub cache
    perceptual_weights: str | None = None  # for "efficientnet-lite0"; default: the packaged weights
    discriminator: str = "dino-vits8"  # offline: "dinov2-s-offline"
    disc_weights: str | None = None
    disc_input_size: int = 224
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    ema_decay: float = 0.9978
    resize: int = 384  # scaled by image_size / 256 for smaller encoders
    crop: int = 256
    # "random": the paper's crops (resize, then a random crop-size window; new every epoch, streamed).
    # "center": fixed views for a small image set, each image's centre crop at the decoder's size and
    # its mirror image, held in the worker and encoded once (pipelines/decoder_views.py).
    crops: str = "random"
    disc_grad_clip: float = 0.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=16, global_batch_size=512,
                                                                max_micro_batch=32, shuffle_buffer=1024))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(grad_clip=0.0, schedule=LRSchedule(
        kind="warmup_cosine", base_lr=2e-4, final_lr=2e-5, warmup_epochs=1.0, decay_end_epoch=16.0)))


@dataclass(frozen=True)
class DecoderFacts:
    """Everything resolved on the driver before launch: the encoder, the losses' networks, the data."""

    latent_spec: LatentSpec  # the encoder's latents (raw: no statistics), copied into the export
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    perceptual: str | None  # None: the loss's perceptual_weight is 0 (pixel losses alone), no network is built
    perceptual_weights: str | None
    disc_digest: str
    rows: int  # the run's training rows: images, or views (VIEWS_PER_IMAGE per image) on fixed views
    resize: int
    crop: int


def resolve_perceptual(config: DecoderRunConfig) -> tuple[str | None, str | None]:
    """(kind, weights) of the perceptual loss the run will use; (None, None) when its weight is 0.
    LPIPS-VGG falls back to the offline EfficientNet-Lite0 distance when no VGG16 file exists, and
    says so loudly."""
    if config.perceptual not in PERCEPTUAL_KINDS:
        raise ValueError(f"perceptual={config.perceptual!r}; choose one of {PERCEPTUAL_KINDS}")
    if config.loss.perceptual_weight == 0:
        return None, None
    if config.perceptual == "efficientnet-lite0":
        return config.perceptual, config.perceptual_weights
    if config.lpips_weights is not None:
        if not Path(config.lpips_weights).is_file():
            raise FileNotFoundError(f"--lpips-weights {config.lpips_weights}: no such file (expected "
                                    f"torchvision's VGG16 ImageNet weights, vgg16-397923af.pth)")
        return "lpips-vgg", str(config.lpips_weights)
    if default_vgg16_path().is_file():
        return "lpips-vgg", str(default_vgg16_path())
    message = (f"LPIPS-VGG IS NOT AVAILABLE: no VGG16 weights at {default_vgg16_path()} and no --lpips-weights. "
               f"This run uses the offline EfficientNet-Lite0 perceptual distance instead; it is NOT the "
               f"paper's LPIPS and its values are not comparable with LPIPS numbers.")
    banner = "!" * 100
    say(f"{banner}\n{message}\n{banner}")
    logger.warning(message)
    return "efficientnet-lite0", config.perceptual_weights


CROPS = ("random", "center")


def rows_per_image(crops: str) -> int:
    """A run's training rows per usable image: its two fixed views (crops: center), or one random crop."""
    return VIEWS_PER_IMAGE if crops == "center" else 1


class ViewLatents:
    """The frozen encoder's latents of a run's fixed views, each encoded the first time it is drawn
    and read from memory after, on the training device: the encoder is frozen and a view never
    changes, so neither does its latent."""

    def __init__(self, num_views: int) -> None:
        self.num_views = num_views
        self.latents: torch.Tensor | None = None
        self.known: torch.Tensor | None = None
        self.encoded = 0  # views encoded so far, each once

    def __call__(self, views: torch.Tensor, real: torch.Tensor,
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The latents of ``views`` (indices in the run) whose images are ``real``."""
        views = views.to(real.device)
        if self.known is None:
            self.known = torch.zeros(self.num_views, dtype=torch.bool, device=real.device)
        missing = ~self.known[views]
        if missing.any():
            fresh = encode(real[missing])
            if self.latents is None:
                self.latents = torch.empty((self.num_views, *fresh.shape[1:]), dtype=fresh.dtype, device=fresh.device)
            self.latents[views[missing]] = fresh
            self.known[views[missing]] = True
            self.encoded += int(missing.sum())
        return self.latents[views]  # a copy (advanced indexing): the decoder's backward may save it


class DecoderTask(Task):
    """Decoder (generator) and discriminator heads, two AdamW optimizers on one LR schedule. On fixed
    views (``crops: center``) each rank reads its own share (``census``: the shards the run planned on)."""

    columns = ("image",)

    def __init__(self, config: DecoderRunConfig, facts: DecoderFacts, census: ShardCensus | None = None) -> None:
        self.config, self.facts, self.census = config, facts, census
        if config.crops == "center" and census is None:
            raise ValueError("a decoder run on fixed views (crops: center) reads its shards itself: pass the census")

    def batch_source(self, loop: LoopConfig, rank: int, world: int) -> BatchSource | None:
        if self.config.crops != "center":
            return None
        return FixedViews(self.census, crop=self.facts.crop, rank=rank, world=world, seed=loop.seed)

    def decoder_kwargs(self) -> dict[str, Any]:
        facts = self.facts
        return dict(latent_channels=facts.latent_spec.channels, grid=facts.latent_spec.grid,
                    noise_tau=self.config.noise_tau, image_mean=list(facts.image_mean), image_std=list(facts.image_std),
                    **self.config.decoder_overrides)

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        config, facts = self.config, self.facts
        self.encoder = load_encoder(facts.latent_spec.encoder, weights=config.encoder_weights,
                                    input_size=facts.latent_spec.input_size, device=ctx.device)
        if self.encoder.weights_digest != facts.latent_spec.weights_digest:
            raise RuntimeError(f"encoder weights on worker {ctx.rank} (sha256 {self.encoder.weights_digest[:12]}) "
                               f"differ from the driver's ({facts.latent_spec.weights_digest[:12]}); is "
                               f"{config.encoder_weights!r} the same file on every node?")
        decoder = build_decoder(config.decoder, **self.decoder_kwargs())
        self.decoder = shard_model(decoder, list(decoder.blocks), ctx.device, dtype=ctx.dtype, compile=ctx.compile)
        self.discriminator = build_discriminator(config.discriminator, weights=config.disc_weights,
                                                 input_size=config.disc_input_size).to(ctx.device)
        perceptual = (None if facts.perceptual is None else
                      build_perceptual_loss(facts.perceptual, weights=facts.perceptual_weights).to(ctx.device))
        self.loss = DecoderLoss(config.loss, perceptual=perceptual, discriminator=self.discriminator)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=optim.schedule.base_lr,
                                           betas=optim.betas, weight_decay=optim.weight_decay)
        self.disc_optimizer = torch.optim.AdamW(self.discriminator.trainable_parameters(),
                                                lr=optim.schedule.base_lr, betas=optim.betas,
                                                weight_decay=optim.weight_decay)
        self.ema = EMA(self.decoder, config.ema_decay)
        self.view_latents = ViewLatents(facts.rows) if config.crops == "center" else None

    def state(self) -> dict[str, Any]:
        return {"decoder": ModelState(self.decoder, self.optimizer),
                "disc_heads": ModelState(self.discriminator.heads, self.disc_optimizer), "ema": self.ema}

    def lr_at(self, epoch: float) -> float:
        return self.config.optim.schedule(epoch)

    def train_step(self, micro_batches: Sequence[Batch], step: int, lr: float) -> dict[str, float]:
        epoch = self.ctx.epoch(step)
        pairs = [self._encode(batch) for batch in micro_batches]
        metrics = self._generator_step(pairs, epoch, lr)
        if self.loss.discriminator_active(epoch):
            metrics.update(self._discriminator_step(pairs, epoch, lr))
        else:
            self.disc_optimizer.zero_grad(set_to_none=True)  # the GAN term's backward may reach the heads
        return metrics

    def _encode(self, batch: Batch) -> Batch:
        """The crops as images in [0, 1] (uint8 until they reach the device) and their latents (in
        fp32, encoded as the store's are); a fixed view's latent is encoded once (:class:`ViewLatents`)."""
        real = to_unit_images(batch["image"].to(self.ctx.device, non_blocking=True))
        if self.view_latents is not None:
            return {"real": real, "latent": self.view_latents(batch["view"], real, self._latents_of)}
        return {"real": real, "latent": self._latents_of(real)}

    def _latents_of(self, real: torch.Tensor) -> torch.Tensor:
        """The frozen encoder under inference mode, no autograd bookkeeping at all; its latents are
        copied out of it, as the decoder's backward saves them."""
        with torch.inference_mode(), autocast(self.ctx.device, self.ctx.dtype):
            latent = self.encoder(real)
        return latent.to(torch.float32, copy=True)

    def _generator_step(self, pairs: list[Batch], epoch: float, lr: float) -> dict[str, float]:
        self.decoder.train()
        # As the official trainer: the generator's GAN term reads the discriminator in eval mode (its
        # spectral norms' power iterations advance only on the discriminator's own steps).
        self.discriminator.eval()

        def loss(pair: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            fake = self.decoder(self.decoder.augment_with_noise(pair["latent"]))
            # Read after the forward: under FSDP2 this is the root's unsharded weight, in the graph.
            return self.loss.generator_loss(pair["real"], fake, epoch=epoch,
                                            last_layer_weight=self.decoder.last_layer_weight)

        local = accumulate_gradients(self.decoder, pairs, loss, dtype=self.ctx.dtype)
        outcome = apply_update(self.decoder, self.optimizer, local.loss, lr=lr, grad_clip=self.config.optim.grad_clip)
        if not outcome.skipped:
            self.ema.update(self.decoder)
        return {**read_logs({k: v for k, v in local.logs.items() if k != "total"}), **outcome.metrics()}

    def _discriminator_step(self, pairs: list[Batch], epoch: float, lr: float) -> dict[str, float]:
        self.disc_optimizer.zero_grad(set_to_none=True)

        def loss(pair: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad():
                fake = self.decoder(pair["latent"])
            return self.loss.discriminator_loss(pair["real"], fake, epoch=epoch)

        self.decoder.eval()  # the fakes the discriminator sees: clean latents, no noise augmentation
        self.discriminator.train()
        local = accumulate_gradients(self.discriminator, pairs, loss, dtype=self.ctx.dtype)
        self.decoder.train()
        self.discriminator.eval()
        average_gradients(self.discriminator.trainable_parameters())
        outcome = apply_update(self.discriminator, self.disc_optimizer, local.loss, lr=lr,
                               grad_clip=self.config.disc_grad_clip)
        return {**read_logs({k: v for k, v in local.logs.items() if k != "d_loss"}), **outcome.metrics("d_")}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        facts = self.facts
        return full_state_dict(self.ema.shadow), {
            "kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": self.config.decoder,
            "kwargs": self.decoder_kwargs(), "ema_decay": self.config.ema_decay,
            "latent_spec": facts.latent_spec.to_dict(), "perceptual": facts.perceptual,
            "discriminator": {"backbone": self.config.discriminator, "weights_digest": facts.disc_digest},
            "shards": self.config.shards,
            "crops": {"kind": self.config.crops, "resize": facts.resize, "crop": facts.crop}}


def resolve_facts(config: DecoderRunConfig) -> DecoderFacts:
    """Check the config and load what the workers will load (encoder, discriminator, perceptual
    network) once on the driver, so a bad name or a missing file fails before anything launches."""
    if config.encoder not in ENCODER_PRESETS:
        raise ValueError(f"encoder={config.encoder!r} is not a known encoder; choose one of {sorted(ENCODER_PRESETS)}")
    if config.decoder not in DECODER_PRESETS:
        raise ValueError(f"decoder={config.decoder!r}; choose one of {sorted(DECODER_PRESETS)}")
    if config.discriminator not in BACKBONES:
        raise ValueError(f"discriminator={config.discriminator!r}; choose one of {sorted(BACKBONES)}")
    if config.crops not in CROPS:
        raise ValueError(f"crops={config.crops!r}; choose one of {', '.join(CROPS)}")
    encoder = load_encoder(config.encoder, weights=config.encoder_weights,
                           input_size=config.encoder_input_size or None, device="cpu")
    spec = encoder.spec
    perceptual, perceptual_weights = resolve_perceptual(config)
    if perceptual is not None:
        build_perceptual_loss(perceptual, weights=perceptual_weights)
    disc = build_discriminator(config.discriminator, weights=config.disc_weights, input_size=config.disc_input_size)
    with torch.device("meta"):
        build_decoder(config.decoder, latent_channels=spec.channels, grid=spec.grid,
                      noise_tau=config.noise_tau, **config.decoder_overrides)
    resize, crop = crop_sizes(spec.image_size, config.resize, config.crop)
    if config.crops == "center":
        resize = crop  # a crop the size of its resized image is that image: the encode's ADM centre crop
    return DecoderFacts(latent_spec=encoder.latent_spec(), image_mean=tuple(spec.mean), image_std=tuple(spec.std),
                        perceptual=perceptual, perceptual_weights=perceptual_weights, disc_digest=disc.weights_digest,
                        rows=0, resize=resize, crop=crop)


def describe_loss(config: DecoderRunConfig, facts: DecoderFacts) -> str:
    """The run's reconstruction loss in a few words, for its first line."""
    loss = config.loss
    terms = pixel_loss_terms(loss)
    if facts.perceptual is None:
        return f"loss {' + '.join(terms) or 'none'}{' alone' if len(terms) == 1 else ''} (perceptual weight 0)"
    return f"loss {' + '.join([*terms, f'{loss.perceptual_weight:g} x perceptual ({facts.perceptual})'])}"


def train_decoder(config: DecoderRunConfig, *, run_name: str, storage: str, **launch_options: Any):
    """Resolve the encoder and losses, count the usable images, then train (or resume ``run_name``);
    returns Ray's Result. The EMA decoder is exported to ``<storage>/<run_name>/export``. ``launch_options``
    (num_workers, device, max_failures, gpu_wait_s, ...) go to :func:`jobs.train.launch.launch`."""
    if not config.shards:
        raise ValueError("no image shards given: pass --shards URL (or shards: in the config)")
    check_run_length(config.loop)
    facts = resolve_facts(config)
    counted = census(config.shards, resize=facts.resize)
    fixed = config.crops == "center"
    if fixed:
        check_fixed_views_fit(counted.rows, facts.crop, facts.latent_spec.tokens * facts.latent_spec.channels,
                              what=f"the usable images in shards {config.shards}")
    rows = counted.rows * rows_per_image(config.crops)
    check_batch_fits(config.loop, rows, f"the usable {'views of the ' if fixed else ''}images in shards {config.shards}")
    facts = dataclasses.replace(facts, rows=rows)
    crops = (f"fixed views: each image's centre crop at {facts.crop} px and its mirror image, {rows} in all, "
             f"encoded once" if fixed else f"random crops {facts.resize} -> {facts.crop} px")
    print(f"[{run_name}] {counted.rows} usable images in {len(counted.shards)} shard(s) at {config.shards}, "
          f"{len(counted.rejected)} skipped; {crops}; latents {facts.latent_spec.describe()}; "
          f"{describe_loss(config, facts)}", flush=True)
    dataset = None if fixed else crop_dataset(counted, resize=facts.resize, crop=facts.crop)
    return train_task(DecoderTask(config, facts, counted), config.loop, rows=facts.rows,
                      run_config=dataclasses.asdict(config), run_name=run_name, storage=storage, dataset=dataset,
                      **launch_options)
