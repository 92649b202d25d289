"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to real AND fake images
before the discriminator, so it cannot overfit the reals and the generator still gets gradients.

This is the official RAE DiffAug (github.com/bytetriper/RAE, commit a4d18c4, src/disc/diffaug.py,
itself StyleGAN-T's): translation by up to 1/8 of the image size (zero fill in [-1, 1], mid-grey),
then colour (brightness, saturation, contrast), then cutout, each op switched on for the whole batch
with probability `prob`. RAE's config: prob 1, cutout 0 (a no-op), hence the default policy.
The images are [0, 1] here; the ops run in [-1, 1] as the official ones do, in fp32.

The random draws are the official ones, in its order: three per-op coins `rand(3) <= prob` on the
generator's device (the CPU for the global generator), then one `rand(7, B)` on the images' device
whose rows are translation (h, w), brightness, saturation, contrast, cutout (h, w). So the same seed
(`torch.manual_seed` for the official code, a `generator` seeded alike here) gives the same batch.
The ops take those uniforms explicitly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("translation", "color", "cutout")  # applied in this order, whatever the policy's order
DEFAULT_POLICY = ("translation", "color")


def _grid(b: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.meshgrid(*(torch.arange(n, dtype=torch.long, device=device) for n in (b, h, w)), indexing="ij")


def _per_sample(uniforms: torch.Tensor, b: int, *trailing: int) -> torch.Tensor:
    if uniforms.numel() != b:
        raise ValueError(f"DiffAugment: expected one uniform per sample ({b}), got shape {tuple(uniforms.shape)}")
    return uniforms.reshape(b, *trailing)


def translation(x: torch.Tensor, u_h: torch.Tensor, u_w: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by whole pixels t = floor(u * (2d + 1)) - d per axis, d = round(ratio * size)
    (Python's round, half to even, as the official code); output pixel (r, c) reads input
    (r + t_h, c + t_w), zero outside. x in [-1, 1], (B, C, H, W); u_h, u_w in [0, 1), one per sample."""
    b, _, h, w = x.shape
    d_h, d_w = round(h * ratio), round(w * ratio)
    t_h = _per_sample(u_h, b, 1, 1).mul(2 * d_h + 1).floor().long() - d_h
    t_w = _per_sample(u_w, b, 1, 1).mul(2 * d_w + 1).floor().long() - d_w
    batch, rows, cols = _grid(b, h, w, x.device)
    src_r = (rows + t_h + 1).clamp(0, h + 1)  # +1: index into the one-pixel zero pad
    src_c = (cols + t_w + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1).contiguous()[batch, src_r, src_c].permute(0, 3, 1, 2).contiguous()


def brightness(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x + (_per_sample(u, x.shape[0], 1, 1, 1) - 0.5)


def saturation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_sample(u, x.shape[0], 1, 1, 1) * 2) + mean


def contrast(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_sample(u, x.shape[0], 1, 1, 1) + 0.5) + mean


def cutout(x: torch.Tensor, u_h: torch.Tensor, u_w: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Zero a round(ratio * size) square per image, centred at floor(u * (size + 1 - side % 2)) - side // 2
    (clipped to the image), as the official code; ratio 0 is a no-op."""
    b, _, h, w = x.shape
    c_h, c_w = round(h * ratio), round(w * ratio)
    offset_h = _per_sample(u_h, b, 1, 1).mul(h + (1 - c_h % 2)).floor().long()
    offset_w = _per_sample(u_w, b, 1, 1).mul(w + (1 - c_w % 2)).floor().long()
    batch, rows, cols = _grid(b, c_h, c_w, x.device)
    rows = (rows + offset_h - c_h // 2).clamp(0, h - 1)
    cols = (cols + offset_w - c_w // 2).clamp(0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[batch, rows, cols] = 0
    return x * mask.unsqueeze(1)


def diff_augment(
    images: torch.Tensor,
    policy: tuple[str, ...] = DEFAULT_POLICY,
    *,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.2,
    prob: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment images in [0, 1], (B, 3, H, W); differentiable in the images; returns fp32.

    policy: which of OPS may run (in OPS's order); prob: each op's chance of running on the batch.
    """
    unknown = set(policy) - set(OPS)
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {sorted(unknown)}; valid: {', '.join(map(repr, OPS))}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"DiffAugment prob must be in [0, 1], got {prob}")
    images = images.float()  # official: augments in fp32
    if prob < 1e-6:  # official: no draws at all
        return images
    coin_device = generator.device if generator is not None else None
    coins = (torch.rand(3, generator=generator, device=coin_device) <= prob).tolist()
    if not any(coins):
        return images
    b = images.shape[0]
    # Drawn whenever any coin is up, whatever the policy: the official stream always holds these 7 x B.
    u = torch.rand(7, b, device=images.device, generator=generator)
    x = images * 2 - 1
    run = {op: coin and op in policy for op, coin in zip(OPS, coins)}
    if run["translation"]:
        x = translation(x, u[0], u[1], translation_ratio)
    if run["color"]:
        x = contrast(saturation(brightness(x, u[2]), u[3]), u[4])
    if run["cutout"]:
        x = cutout(x, u[5], u[6], cutout_ratio)
    return (x + 1) / 2
