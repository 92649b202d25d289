"""The decoder's training objective: L1 + perceptual + adaptively weighted GAN (paper's defaults).

    L_rec   = l1_weight * |x - x_hat|_1 + mse_weight * |x - x_hat|_2^2 + perceptual_weight * P(x, x_hat)
              (means over pixels; mse_weight 0 in the paper, a lever for short runs scored by PSNR)
    L_G     = -mean D(DiffAug(x_hat))
    lambda  = ||grad_W L_rec|| / (||grad_W L_G|| + 1e-6), clamped to [0, 1e4], detached,
              W = the decoder's last layer weight
    total   = L_rec + gan_weight * lambda * L_G           (GAN term only from gan_start_epoch)
    L_D     = 0.5 * (mean relu(1 - D(DiffAug(x))) + mean relu(1 + D(DiffAug(q8(x_hat)))))
                                                          (D updates only from disc_start_epoch)

Progress is measured in epochs (fractional: images seen / dataset size), so the schedule does not
depend on the batch size. The math is in pure functions at the top so it can be tested exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rae.diffaugment import diff_augment


@dataclass(frozen=True)
class DecoderLossConfig:
    """Loss weights and schedule; defaults are the paper's (16 epochs in all)."""

    l1_weight: float = 1.0
    mse_weight: float = 0.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.75
    disc_start_epoch: float = 6.0  # discriminator updates from here
    gan_start_epoch: float = 8.0  # adversarial term reaches the decoder from here
    adaptive_weight_max: float = 1e4
    adaptive_weight_eps: float = 1e-6
    diffaug_policy: tuple[str, ...] = ("color", "translation")
    diffaug_translation: float = 0.125

    def __post_init__(self) -> None:
        for name in ("l1_weight", "mse_weight", "perceptual_weight", "gan_weight", "disc_start_epoch", "gan_start_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"DecoderLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.l1_weight + self.mse_weight + self.perceptual_weight > 0:
            raise ValueError("DecoderLossConfig: l1_weight, mse_weight and perceptual_weight are all 0; the decoder "
                             "would learn no reconstruction")


def pixel_loss_terms(config: DecoderLossConfig) -> list[str]:
    """The pixel terms in words, for consoles and reports: ["L1"], ["squared error"], ["L1", "5 x squared error"]."""
    return [name if weight == 1 else f"{weight:g} x {name}"
            for name, weight in (("L1", config.l1_weight), ("squared error", config.mse_weight)) if weight]


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(
    rec_grad_norm: torch.Tensor, gan_grad_norm: torch.Tensor, *, eps: float = 1e-6, max_weight: float = 1e4
) -> torch.Tensor:
    """lambda = ||grad L_rec|| / (||grad L_GAN|| + eps), clamped to [0, max_weight], detached."""
    return (rec_grad_norm / (gan_grad_norm + eps)).clamp(0.0, max_weight).detach()


def adaptive_weight_at(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """The adaptive weight from both losses' gradients at one parameter (keeps the graph for backward)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    return adaptive_weight(rec_grad.norm(), gan_grad.norm(), eps=eps, max_weight=max_weight)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """What a saved image would hold: clamp to [0, 1], round to 1/255 steps; detached."""
    return (images.detach().clamp(0.0, 1.0) * 255.0).round() / 255.0


# ----------------------------------------------------------------------------------------------
# The loss module
# ----------------------------------------------------------------------------------------------

class DecoderLoss(nn.Module):
    """Decoder (generator) and discriminator objectives.

    One training step, in order:
        fake = decoder(decoder.augment_with_noise(latents))
        loss, logs = loss_fn.generator_loss(real, fake, epoch=e, last_layer_weight=decoder.last_layer_weight)
        ... decoder backward/step ...
        with torch.no_grad(): fake_eval = decoder.eval()(latents)   # then decoder.train()
        d_loss, d_logs = loss_fn.discriminator_loss(real, fake_eval, epoch=e)
        if d_loss is not None: zero the D optimizer (the G backward also reached the heads), backward, step

    Images are (B, 3, H, W), real in [0, 1]. The perceptual module maps two such batches to (B,).
    The logged values are detached 0-d tensors on the loss's device: reading them is left to the
    caller, so a training step reads them once, not once per micro-batch.
    """

    def __init__(
        self,
        config: DecoderLossConfig = DecoderLossConfig(),
        *,
        perceptual: nn.Module | None = None,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        if perceptual is None and config.perceptual_weight > 0:
            raise ValueError(
                f"perceptual_weight is {config.perceptual_weight} but no perceptual module was given: "
                f"pass perceptual=build_perceptual_loss(...) or set perceptual_weight=0"
            )
        self.config = config
        self.perceptual = perceptual
        self.discriminator = discriminator

    def gan_active(self, epoch: float) -> bool:
        return self.discriminator is not None and self.config.gan_weight > 0 and epoch >= self.config.gan_start_epoch

    def discriminator_active(self, epoch: float) -> bool:
        return self.discriminator is not None and epoch >= self.config.disc_start_epoch

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, self.config.diffaug_policy, translation_ratio=self.config.diffaug_translation)

    def reconstruction_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if real.shape != fake.shape:
            raise ValueError(f"real {tuple(real.shape)} and reconstructed {tuple(fake.shape)} images differ in shape")
        l1 = (fake - real).abs().mean()
        rec = self.config.l1_weight * l1
        logs = {"l1": l1.detach()}
        if self.config.mse_weight > 0:
            mse = (fake - real).square().mean()
            rec = rec + self.config.mse_weight * mse
            logs["mse"] = mse.detach()
        if self.perceptual is not None and self.config.perceptual_weight > 0:
            perceptual = self.perceptual(fake, real).mean()
            rec = rec + self.config.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.detach()
        logs["rec"] = rec.detach()
        return rec, logs

    def generator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, *, epoch: float, last_layer_weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total decoder loss. Before gan_start_epoch the GAN term is exactly zero and D is not run."""
        rec, logs = self.reconstruction_loss(real, fake)
        if not self.gan_active(epoch):
            zero = torch.zeros((), device=rec.device)
            logs.update(gan=zero, adaptive_weight=zero, total=rec.detach())
            return rec, logs
        gan = generator_gan_loss(self.discriminator(self.augment(fake)))
        if torch.is_grad_enabled() and fake.requires_grad:
            weight = adaptive_weight_at(
                rec, gan, last_layer_weight,
                eps=self.config.adaptive_weight_eps, max_weight=self.config.adaptive_weight_max,
            )
        else:  # evaluation without a graph: the adaptive weight is undefined, report the plain losses
            weight = torch.zeros((), device=rec.device)
        total = rec + self.config.gan_weight * weight * gan
        logs.update(gan=gan.detach(), adaptive_weight=weight.detach(), total=total.detach())
        return total, logs

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, *, epoch: float
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Hinge loss on DiffAugmented reals and 8-bit-quantised, detached fakes; None before disc_start_epoch."""
        if not self.discriminator_active(epoch):
            return None, {}
        # The official order: the fakes are augmented and classified first, then the reals (the same
        # random stream and the same spectral-norm power-iteration steps).
        logits_fake = self.discriminator(self.augment(quantize_8bit(fake)))
        logits_real = self.discriminator(self.augment(real.detach()))
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
