"""Image batches in the layouts evaluation code meets: uint8 NHWC (ADM .npz), uint8 NCHW, and
the project's float (B, 3, H, W) in [0, 1]; plus the TF-compatible bilinear resize to 299 px."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rae.image_tensors import quantize

__all__ = ["to_uint8_nchw", "tf_bilinear_resize"]


def to_uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Accept uint8 NHWC or NCHW (numpy or torch), or float NCHW in [0, 1]; return uint8 NCHW."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if t.ndim != 4:
        raise ValueError(f"images must be a 4-d batch (B, H, W, 3) or (B, 3, H, W), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        nchw, nhwc = t.shape[1] == 3, t.shape[3] == 3
        if nchw and nhwc:
            raise ValueError(f"ambiguous layout for shape {tuple(t.shape)}: both axis 1 and axis 3 have 3 channels")
        if nhwc:
            return t.permute(0, 3, 1, 2).contiguous()
        if nchw:
            return t
        raise ValueError(f"uint8 images need 3 channels (NHWC or NCHW), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if t.shape[1] != 3:
            raise ValueError(f"float images must be (B, 3, H, W) in [0, 1], got shape {tuple(t.shape)}")
        return quantize(t)
    raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {t.dtype}")


def tf_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize matching TF1's ResizeBilinear (align_corners=False, no half-pixel centres),
    the resize inside the 2015 Inception graph the ADM suite runs; NVIDIA's TorchScript port
    of that graph uses this same affine-grid formulation. x: float (B, C, H, W)."""
    b, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
