"""Image batches between the two layouts the project uses, and the ImageNet colour statistics.

Stored and decoded images are uint8 (B, H, W, 3), as PIL, webdataset and the ADM ``.npz`` hold
them; models take float32 (B, 3, H, W) in [0, 1]. ``to_unit_images`` goes one way, ``quantize`` and
``to_uint8_images`` come back the way a saved PNG would (round to nearest, clamped), so
``to_uint8_images(to_unit_images(x))`` is ``x`` exactly.
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1], on the input's device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 by round-to-nearest (values outside [0, 1] are clamped),
    as torchvision's save_image does; samples are evaluated as the 8-bit images a user would save."""
    return (images.float() * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3): the inverse of ``to_unit_images``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images (B, 3, H, W), got {tuple(images.shape)}")
    return quantize(images).permute(0, 2, 3, 1)
