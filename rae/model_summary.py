"""Parameter counts and compute per image for every preset, measured on the meta device.

Nothing is allocated: models are built under ``torch.device("meta")`` and one forward pass is traced
with ``FlopCounterMode``, so even XL presets cost no memory. Compute is reported two ways because the
field mixes them: ``gflops`` counts a multiply-add as two operations (what hardware peak FLOP/s are
quoted in, and what MFU divides by), ``gmacs`` counts it as one (what vision papers, the RAE paper
included, call "GFLOPs": DINOv2-B at 224 px is "~22 GFLOPs" there).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelSummary:
    kind: str          # "encoder" | "decoder" | "dit"
    preset: str
    params: int
    gflops: float      # per image, one forward pass, 2 FLOPs per multiply-add
    shape: str         # what one forward pass maps, for the reader

    @property
    def gmacs(self) -> float:
        return self.gflops / 2

    def as_dict(self) -> dict:
        return {**asdict(self), "gmacs": self.gmacs}


def count_parameters(model: nn.Module, *, trainable_only: bool) -> int:
    """Parameters of ``model``: all of them (what a preset weighs, frozen encoders included), or only
    those that train. Buffers (fixed positions, Fourier frequencies) are never counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def forward_flops(forward: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call, counted by tracing it."""
    with FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_total_flops()


def encoder_summary(name: str) -> ModelSummary:
    from rae.encoders import load_encoder

    with torch.device("meta"):
        encoder = load_encoder(name, random_init=True)
        spec = encoder.spec
        images = torch.empty(1, 3, spec.image_size, spec.image_size)
        flops = forward_flops(lambda: encoder(images))
    n, c = encoder.latent_spec().shape
    return ModelSummary("encoder", name, count_parameters(encoder, trainable_only=False), flops / 1e9,
                        f"{spec.input_size}px -> {n}x{c}")


def decoder_summary(preset: str, latent_channels: int = 768, grid: int = 16) -> ModelSummary:
    from rae.decoder import build_decoder

    with torch.device("meta"):
        decoder = build_decoder(preset, latent_channels=latent_channels, grid=grid)
        latents = torch.empty(1, grid * grid, latent_channels)
        flops = forward_flops(lambda: decoder(latents))
    return ModelSummary("decoder", preset, count_parameters(decoder, trainable_only=False), flops / 1e9,
                        f"{grid * grid}x{latent_channels} -> {decoder.config.image_size}px")


def dit_summary(preset: str, latent_channels: int = 768, grid: int = 16,
                num_classes: int = 1000) -> ModelSummary:
    from rae.dit import build_dit

    with torch.device("meta"):
        # Listed even where narrower than the tokens (the paper's DiT-S/B on DINOv2-B); `note` says so.
        model = build_dit(preset, latent_channels=latent_channels, grid=grid, num_classes=num_classes,
                          allow_narrow=True)
        x = torch.empty(1, grid * grid, latent_channels)
        t = torch.empty(1)
        y = torch.zeros(1, dtype=torch.long)
        flops = forward_flops(lambda: model(x, t, y))
    narrow = model.config.output_width < model.config.token_dim
    return ModelSummary("dit", preset, count_parameters(model, trainable_only=False), flops / 1e9,
                        f"{grid * grid}x{latent_channels} -> velocity"
                        + (" (narrower than the tokens: refused unless allow_narrow)" if narrow else ""))


def all_summaries(kinds: tuple[str, ...] = ("encoder", "decoder", "dit")) -> list[ModelSummary]:
    """Every preset of the requested kinds at the paper's latent shape (256 tokens x 768)."""
    rows: list[ModelSummary] = []
    if "encoder" in kinds:
        from rae.encoders import ENCODER_PRESETS

        rows += [encoder_summary(name) for name in ENCODER_PRESETS]
    if "decoder" in kinds:
        from rae.decoder import DECODER_PRESETS

        rows += [decoder_summary(name) for name in DECODER_PRESETS]
    if "dit" in kinds:
        from rae.dit import DIT_PRESETS

        rows += [dit_summary(name) for name in DIT_PRESETS]
    return rows


def format_table(rows: list[ModelSummary]) -> str:
    header = f"{'kind':<8} {'preset':<18} {'params':>10} {'GFLOPs':>9} {'GMACs':>9}  maps"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.kind:<8} {r.preset:<18} {r.params / 1e6:>9.1f}M {r.gflops:>9.1f} "
                     f"{r.gmacs:>9.1f}  {r.shape}")
    lines.append("GFLOPs: 2 per multiply-add, one forward pass per image (a DiT forward is one sampling "
                 "step). GMACs: the convention the RAE paper's figures use.")
    return "\n".join(lines)
