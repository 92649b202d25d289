"""The function that turns (class, seed) items into 8-bit images with a DiT, a decoder and the
latent statistics, and the per-item seeds.

The exports are read and checked against each other with :mod:`pipelines.exports` (a DiT export
holds the store's normalization statistics and latent spec, so it samples on its own); building
the modules from the weights is the caller's ``loader`` (``jobs.train.export.load_exported_model``),
which keeps the dependency direction jobs -> pipelines.

Determinism: item i's initial noise comes from its own CPU ``torch.Generator`` seeded with
``item_seed(seed, i)``, so it does not depend on the device, the worker or the batch it lands in.
The model itself is only deterministic for a fixed batch shape (matmul kernels block by shape), so
the job always forms the same batches (see ``pipelines/sample_job.py``).
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rae.image_tensors import to_uint8_images
from rae.normalization import LatentStats
from rae.sampling import SamplerConfig, autoguidance, classifier_free_guidance, conditional, integrate, time_grid

Loader = Callable[[str, Any], "tuple[nn.Module, dict]"]  # (url, device) -> (eval-mode module, config)


def item_seed(seed: int, index: int) -> int:
    """The noise seed of item ``index`` of a run seeded ``seed``: distinct for every (seed, index)."""
    return int(seed) * 2**32 + int(index)


# ---------------------------------------------------------------- images from items

# fp32: full-precision matmuls; tf32: fp32 weights and activations with TF32 tensor-core matmuls on CUDA (the
# official sampler's default, `--tf32`; the same as fp32 on a CPU); bf16: autocast.
PRECISIONS = ("tf32", "fp32", "bf16")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 matmuls (and cuDNN convolutions) inside the block when ``precision`` is "tf32", full fp32 otherwise."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@dataclass(frozen=True)
class Guidance:
    """CFG (scale != 1, no guide) or AutoGuidance (a guide model); scale 1 and no guide: none."""

    cfg_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    guide_scale: float = 1.0


class ImageSampler:
    """DiT -> denormalize -> decoder -> uint8 NHWC, for one batch of (label, item seed) items."""

    def __init__(self, dit: nn.Module, decoder: nn.Module, stats: LatentStats, *, sampler: SamplerConfig,
                 guidance: Guidance, num_classes: int, guide: nn.Module | None = None,
                 device: torch.device | str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.dit, self.decoder, self.guide, self.stats = dit, decoder, guide, stats
        self.sampler, self.guidance, self.num_classes = sampler, guidance, num_classes
        self.device, self.precision = torch.device(device), precision
        self.shape = stats.shape

    def _velocity(self, y: torch.Tensor):
        g = self.guidance
        if self.guide is not None:
            return autoguidance(self.dit, self.guide, y, g.guide_scale, interval=g.interval)
        if g.cfg_scale != 1.0:
            return classifier_free_guidance(self.dit, y, g.cfg_scale, null_class=self.num_classes,
                                            interval=g.interval)
        return conditional(self.dit, y)

    def noise(self, seeds: np.ndarray) -> torch.Tensor:
        """Each item's initial noise from its own CPU generator (device- and batch-independent)."""
        return torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds])

    @torch.no_grad()
    def latents(self, labels: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
        """Clean latents in the encoder's (denormalized) space, float32 (B, N, C)."""
        if len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
        # A copy: Ray Data hands the batch's columns over read-only, and torch warns on those.
        y = torch.tensor(np.asarray(labels, np.int64), device=self.device)
        x = self.noise(seeds).to(self.device)
        latent_dim = self.shape[0] * self.shape[1] if self.sampler.shift else None
        times = time_grid(self.sampler.num_steps, t_min=self.sampler.t_min, latent_dim=latent_dim,
                          base_dim=self.sampler.shift_base_dim)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"), \
                matmul_precision(self.precision):
            z = integrate(self._velocity(y), x, times, self.sampler.method)
        return self.stats.denormalize(z.float())

    @torch.no_grad()
    def __call__(self, labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W, 3), rounded to nearest as a saved image would be."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"), \
                matmul_precision(self.precision):
            images = self.decoder(self.latents(labels, seeds))
        return to_uint8_images(images).cpu().numpy()
