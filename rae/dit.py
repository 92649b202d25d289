"""Diffusion transformers on RAE latents: DiT and DiT^DH (a DiT trunk with a wide, shallow DDT head).

Both models map a noisy latent token grid x_t (B, N, C), times t (B,) in [0, 1] (t = 1 is pure noise)
and class labels y (B,) (index `num_classes` = the null class) to a velocity (B, N, C).
Blocks are in `rae/dit_blocks.py`; the presets table is at the bottom of this file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rae.dit_blocks import (
    DiTBlock,
    FinalLayer,
    GaussianFourierEmbedding,
    LabelEmbedder,
    RotaryEmbedding2D,
    patchify,
    unpatchify,
)
from rae.positions import sincos_pos_embed_2d


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a DiT (head_depth == 0) or DiT^DH (head_depth > 0). Defaults: the RAE DiT^DH-XL."""

    name: str = "ditdh-xl"
    latent_channels: int = 768
    grid: int = 16
    num_classes: int = 1000
    patch_size: int = 1
    width: int = 1152
    depth: int = 28
    heads: int = 16
    head_width: int = 2048
    head_depth: int = 2
    head_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    # The class table's initial std: DiT's 0.02. In a run of a few hundred steps (the demo) the labels
    # then barely reach the blocks until ~1000 steps; at 1.0 they do from the start (benchmarks/README.md).
    label_init_std: float = 0.02
    fourier_features: int = 256
    fourier_scale: float = 1.0
    rope_theta: float = 10000.0
    allow_narrow: bool = False

    @property
    def token_dim(self) -> int:
        """Values per transformer token: p * p * C."""
        return self.patch_size**2 * self.latent_channels

    @property
    def num_tokens(self) -> int:
        return (self.grid // self.patch_size) ** 2

    @property
    def output_width(self) -> int:
        """Width of the layer that predicts the velocity (the head's for DiT^DH)."""
        return self.head_width if self.head_depth > 0 else self.width

    def __post_init__(self) -> None:
        for field in ("latent_channels", "grid", "num_classes", "patch_size", "width", "depth", "heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if self.grid % self.patch_size:
            raise ValueError(f"{self.name}: grid {self.grid} is not divisible by patch_size {self.patch_size}")
        widths = [("width", self.width, self.heads)]
        if self.head_depth > 0:
            widths.append(("head_width", self.head_width, self.head_heads))
        for label, width, heads in widths:
            if width % heads or (width // heads) % 4:
                raise ValueError(
                    f"{self.name}: {label} {width} with {heads} heads gives a head dimension of "
                    f"{width / heads:g}; 2-D RoPE needs an integer head dimension divisible by 4"
                )
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"{self.name}: class_dropout must be in [0, 1), got {self.class_dropout}")
        # The paper's first rule: a transformer narrower than its tokens cannot even overfit one
        # sample (its output lives in a width-dimensional subspace of the token space).
        if self.output_width < self.token_dim and not self.allow_narrow:
            which = "head_width" if self.head_depth > 0 else "width"
            raise ValueError(
                f"{self.name}: {which} {self.output_width} is narrower than the token dimension "
                f"{self.token_dim} (patch {self.patch_size}x{self.patch_size} x {self.latent_channels} "
                f"channels); RAE diffusion needs width >= token dimension. Use a wider preset "
                f"(a DiT^DH head of 2048), or pass allow_narrow=True to build it anyway."
            )


def _check_inputs(config: DiTConfig, x: Tensor, t: Tensor, y: Tensor) -> None:
    expected = (config.grid**2, config.latent_channels)
    if x.dim() != 3 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{config.name}: x_t must be (B, {expected[0]}, {expected[1]}), got {tuple(x.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{config.name}: t must be ({x.shape[0]},), got {tuple(t.shape)}")
    if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{config.name}: y must be integer class labels of shape ({x.shape[0]},), "
            f"got {y.dtype} {tuple(y.shape)}"
        )


class DiT(nn.Module):
    """Plain DiT on a latent token grid: embed, add sin-cos positions, blocks conditioned on
    t_emb + y_emb through adaLN-Zero, final adaLN + linear to the token's channels."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.x_embedder = nn.Linear(config.token_dim, d)
        self.t_embedder = GaussianFourierEmbedding(d, config.fourier_features, config.fourier_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout, config.label_init_std)
        grid = config.grid // config.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid), persistent=False)
        self.rope = RotaryEmbedding2D(d // config.heads, grid, config.rope_theta)
        self.blocks = nn.ModuleList(DiTBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, config.token_dim)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        _check_inputs(self.config, x, t, y)
        cfg = self.config
        h = self.x_embedder(patchify(x, cfg.grid, cfg.patch_size)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, self.rope)
        return unpatchify(self.final_layer(h, c), cfg.grid, cfg.patch_size)


class DiTDH(nn.Module):
    """DiT^DH: a DiT trunk (conditioned on SiLU(t_emb + y_emb)) turns x_t into per-token conditions s;
    s <- SiLU(s + t_emb), projected to the head width; the DDT head embeds x_t again and runs wide
    blocks with per-token adaLN from s; a final per-token adaLN + linear layer outputs the velocity."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.head_depth < 1:
            raise ValueError(f"{config.name}: DiTDH needs head_depth >= 1; use DiT for a plain model")
        self.config = config
        d, dh = config.width, config.head_width
        grid = config.grid // config.patch_size
        # Trunk.
        self.s_embedder = nn.Linear(config.token_dim, d)
        self.t_embedder = GaussianFourierEmbedding(d, config.fourier_features, config.fourier_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout, config.label_init_std)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid), persistent=False)
        self.rope = RotaryEmbedding2D(d // config.heads, grid, config.rope_theta)
        self.blocks = nn.ModuleList(DiTBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        # Head.
        self.s_projector = nn.Linear(d, dh) if d != dh else nn.Identity()
        self.x_embedder = nn.Linear(config.token_dim, dh)
        self.head_rope = RotaryEmbedding2D(dh // config.head_heads, grid, config.rope_theta)
        self.head_blocks = nn.ModuleList(
            DiTBlock(dh, config.head_heads, config.mlp_ratio) for _ in range(config.head_depth)
        )
        self.final_layer = FinalLayer(dh, config.token_dim)
        for embedder in (self.s_embedder, self.x_embedder):
            nn.init.xavier_uniform_(embedder.weight)
            nn.init.zeros_(embedder.bias)

    def trunk(self, x: Tensor, t_emb: Tensor, y: Tensor) -> Tensor:
        """Per-token conditions s (B, N', head_width) for the head."""
        s = self.s_embedder(x) + self.pos_embed
        # The official DiT^DH conditions on SiLU(t + y), and adaLN applies its own SiLU again:
        # matched for checkpoint compatibility.
        c = F.silu(t_emb + self.y_embedder(y))
        for block in self.blocks:
            s = block(s, c, self.rope)
        return self.s_projector(F.silu(s + t_emb.unsqueeze(1)))

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        _check_inputs(self.config, x, t, y)
        cfg = self.config
        tokens = patchify(x, cfg.grid, cfg.patch_size)
        s = self.trunk(tokens, self.t_embedder(t), y)
        h = self.x_embedder(tokens)
        for block in self.head_blocks:
            h = block(h, s, self.head_rope)
        return unpatchify(self.final_layer(h, s), cfg.grid, cfg.patch_size)


#################################################################################
#                                  Presets                                      #
#################################################################################

@dataclass(frozen=True)
class DiTPreset:
    """The sizes a preset fixes; the latent shape and class count come from the data."""

    width: int
    heads: int
    depth: int
    head_width: int = 2048
    head_depth: int = 0
    head_heads: int = 16


def _ditdh(width: int, heads: int, depth: int, head_width: int = 2048, head_heads: int = 16) -> DiTPreset:
    return DiTPreset(width, heads, depth, head_width=head_width, head_depth=2, head_heads=head_heads)


# width / heads / depth as in the paper; DiT^DH heads are 2 blocks, 2048 wide, 16 heads.
# The tiny presets are for CPU tests and the demo: 384 wide where the velocity is produced, so they
# accept the 384-channel latents of the offline DINOv2-S.
DIT_PRESETS: dict[str, DiTPreset] = {
    "dit-s": DiTPreset(384, 6, 12),
    "dit-b": DiTPreset(768, 12, 12),
    "dit-l": DiTPreset(1024, 16, 24),
    "dit-xl": DiTPreset(1152, 16, 28),
    "ditdh-s": _ditdh(384, 6, 12),
    "ditdh-b": _ditdh(768, 12, 12),
    "ditdh-l": _ditdh(1024, 16, 24),
    "ditdh-xl": _ditdh(1152, 16, 28),
    "dit-tiny": DiTPreset(384, 6, 2),
    "ditdh-tiny": _ditdh(128, 4, 2, head_width=384, head_heads=6),
}


def build_dit(
    preset: str,
    *,
    latent_channels: int = 768,
    grid: int = 16,
    num_classes: int = 1000,
    **overrides: object,
) -> DiT | DiTDH:
    """Build a preset for a latent of (grid*grid, latent_channels) tokens; `overrides` replace any
    DiTConfig field (e.g. width=..., patch_size=2, allow_narrow=True). Works under
    `with torch.device("meta"):` for parameter counts without memory."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)} - {"name", "latent_channels", "grid", "num_classes"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown DiT config override(s) {unknown}; valid overrides: {sorted(fields)}")
    sizes = dataclasses.asdict(DIT_PRESETS[preset])
    config = DiTConfig(
        name=preset, latent_channels=latent_channels, grid=grid, num_classes=num_classes,
        **{**sizes, **overrides},
    )
    return dit_from_config(config)


def dit_from_config(config: DiTConfig) -> DiT | DiTDH:
    """The model a config describes (e.g. one restored from a checkpoint's `asdict(config)`)."""
    return DiTDH(config) if config.head_depth > 0 else DiT(config)
