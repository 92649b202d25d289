"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to real AND fake images
before the discriminator, so it cannot overfit the reals and the generator still gets gradients.

The RAE discriminator uses colour (brightness, saturation, contrast) and translation by up to 1/8
of the image size, filled with zeros in [-1, 1] (mid-grey). Magnitudes follow the original DiffAugment code, which was
written for images in [-1, 1]; `diff_augment` converts [0, 1] images to that range and back.
Each sample draws its own parameters; pass a `generator` for reproducible draws.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_POLICY = ("color", "translation")


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype, generator=generator)


def brightness(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return x + (_rand(x, generator) - 0.5)


def saturation(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, generator) * 2) + mean


def contrast(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by an integer offset in [-ratio*size, ratio*size] per axis, zero fill."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # Output pixel (r, c) reads input (r - dy, c - dx); +1 indexes into the one-pixel zero pad.
    src_r = (rows - dy + 1).clamp(0, h + 1).expand(b, h, w)
    src_c = (cols - dx + 1).clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, src_r, src_c].permute(0, 3, 1, 2).contiguous()


def diff_augment(
    images: torch.Tensor,
    policy: tuple[str, ...] = DEFAULT_POLICY,
    *,
    translation_ratio: float = 0.125,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment images in [0, 1], (B, 3, H, W); differentiable in the images."""
    unknown = set(policy) - {"color", "translation"}
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {sorted(unknown)}; valid: 'color', 'translation'")
    x = images * 2 - 1
    if "color" in policy:
        x = contrast(saturation(brightness(x, generator), generator), generator)
    if "translation" in policy:
        x = translation(x, translation_ratio, generator)
    return (x + 1) / 2
