"""ViT pixel decoder of the representation autoencoder (MAE-decoder style).

Latent tokens (B, N, C) from a frozen encoder go through a linear in-projection, fixed 2-D sin-cos
positions, pre-LN transformer blocks and a linear head that emits one 16x16x3 pixel patch per token.
As in the official RAE decoder (an MAE decoder), a learned CLS token is prepended: it takes part in
attention and is dropped at the output; its position row is zero and the LayerNorms use eps 1e-12.
The head predicts pixels in the encoder's normalized space (x - mean) / std; the mean/std are undone
at the very end so the output lives in [0, 1]-ish pixel space (not clamped, so losses see the raw
prediction).

Read top to bottom: the config, the model, then the named size presets and the factory.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from rae.image_tensors import IMAGENET_MEAN, IMAGENET_STD
from rae.latent_spec import PIXELS_PER_TOKEN
from rae.positions import sincos_pos_embed_2d


# ----------------------------------------------------------------------------------------------
# Config and model
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderConfig:
    """Everything that defines a decoder. Defaults: the paper's ViT-XL decoder on DINOv2-B at 224 px."""

    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_dim: int = 4096
    latent_channels: int = 768
    grid: int = 16
    pixel_patch: int = PIXELS_PER_TOKEN
    noise_tau: float = 0.8  # noise-augmented training: sigma ~ tau * U(0, 1) per sample
    layer_norm_eps: float = 1e-12  # the official (HF ViTMAE) decoder's
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # the encoder's normalization
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "mlp_dim", "latent_channels", "grid", "pixel_patch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"DecoderConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.width % 4:
            raise ValueError(f"DecoderConfig.width ({self.width}) must be divisible by 4 for 2-D sin-cos positions")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"DecoderConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.noise_tau < 0:
            raise ValueError(f"DecoderConfig.noise_tau must be >= 0, got {self.noise_tau}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("DecoderConfig.image_mean and image_std need 3 values (RGB)")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def image_size(self) -> int:
        return self.grid * self.pixel_patch


class ViTDecoder(nn.Module):
    """Latent tokens (B, grid*grid, C) -> images (B, 3, grid*16, grid*16) in pixel space."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(config.latent_channels, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        # Fixed, not learned: kept as a buffer so checkpoints and device moves carry it. Row 0 (the
        # CLS token's) is zero.
        positions = sincos_pos_embed_2d(config.width, config.grid)
        self.register_buffer("pos_embed", torch.cat([positions.new_zeros(1, config.width), positions]).unsqueeze(0))
        # timm sizes the MLP as int(width * ratio); the +0.5 makes that exactly mlp_dim despite float rounding.
        mlp_ratio = (config.mlp_dim + 0.5) / config.width
        norm_layer = functools.partial(nn.LayerNorm, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(config.depth)
        )
        self.norm = norm_layer(config.width)
        self.head = nn.Linear(config.width, config.pixel_patch**2 * 3)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # MAE: xavier-uniform linears with zero bias, unit LayerNorms.
        def _init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_init)
        # The official decoder starts its CLS token at zero.
        nn.init.zeros_(self.cls_token)

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is measured at (the pixel head)."""
        return self.head.weight

    def check_latents(self, latents: torch.Tensor) -> None:
        n, c = self.config.num_tokens, self.config.latent_channels
        expected = f"(B, N, C) = (B, {n}, {c}) (grid {self.config.grid}x{self.config.grid}, {c} channels)"
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor of shape {expected}, got {type(latents).__name__}")
        if not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point tensor of shape {expected}, got {latents.dtype}")
        if latents.ndim != 3 or latents.shape[1] != n or latents.shape[2] != c:
            raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")

    def augment_with_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise-augmented training: z + sigma * eps, sigma = tau * U(0, 1) per sample; identity in eval.

        Kept out of forward() so that the trainer calls it explicitly and eval-mode passes
        (the discriminator's fakes, validation) are never noised.
        """
        if not self.training or self.config.noise_tau == 0:
            return latents
        sigma = self.config.noise_tau * torch.rand(
            latents.shape[0], *([1] * (latents.ndim - 1)), device=latents.device, dtype=latents.dtype
        )
        return latents + sigma * torch.randn_like(latents)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid, p*p*3) -> (B, 3, grid*p, grid*p); each token owns one p x p patch, row-major."""
        g, p = self.config.grid, self.config.pixel_patch
        x = patches.reshape(patches.shape[0], g, g, p, p, 3)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(patches.shape[0], 3, g * p, g * p)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        x = self.in_proj(latents)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x))[:, 1:]  # the CLS token's output is dropped
        normalized = self.unpatchify(x)
        return normalized * self.image_std + self.image_mean


# ----------------------------------------------------------------------------------------------
# Presets (the paper's sizes, plus a tiny one for CPU tests) and the factory
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderPreset:
    """Size of a decoder; the latent shape comes from the encoder at build time."""

    width: int
    depth: int
    heads: int
    mlp_dim: int

    def config(self, *, latent_channels: int, grid: int, **overrides) -> DecoderConfig:
        base = DecoderConfig(
            width=self.width, depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
            latent_channels=latent_channels, grid=grid,
        )
        return replace(base, **overrides)


DECODER_PRESETS: dict[str, DecoderPreset] = {
    "vit-b": DecoderPreset(width=768, depth=12, heads=12, mlp_dim=3072),
    "vit-l": DecoderPreset(width=1024, depth=24, heads=16, mlp_dim=4096),
    "vit-xl": DecoderPreset(width=1152, depth=28, heads=16, mlp_dim=4096),  # MLP 4096, not 4*1152
    "tiny": DecoderPreset(width=64, depth=2, heads=4, mlp_dim=256),
}


def build_decoder(preset: str, *, latent_channels: int, grid: int, **overrides) -> ViTDecoder:
    """A decoder of a named size for latents of (grid*grid, latent_channels); overrides any config field."""
    if preset not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; choose one of {sorted(DECODER_PRESETS)}")
    unknown = set(overrides) - set(DecoderConfig.__dataclass_fields__)
    if unknown:
        valid = sorted(DecoderConfig.__dataclass_fields__)
        raise TypeError(f"unknown DecoderConfig field(s) {sorted(unknown)}; valid: {valid}")
    return ViTDecoder(DECODER_PRESETS[preset].config(latent_channels=latent_channels, grid=grid, **overrides))
