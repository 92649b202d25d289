"""The models a sampling job needs, read from their exports, checked against each other, and the
function that turns (class, seed) items into 8-bit images.

An export folder holds ``model.json`` and ``model.safetensors`` (written by ``jobs/export.py``).
A DiT export also holds the store's normalization statistics (``latent_stats`` in its JSON names
the file) and the store's encoder facts (``encoder_spec``), so it samples on its own. Only the JSON
is read here (plain fsspec); building the modules from the weights is the caller's ``loader``
(``jobs.export.load_exported_model``), which keeps the dependency direction jobs -> pipelines.

Determinism: item i's initial noise comes from its own CPU ``torch.Generator`` seeded with
``item_seed(seed, i)``, so it does not depend on the device, the worker or the batch it lands in.
The model itself is only deterministic for a fixed batch shape (matmul kernels block by shape), so
the job always forms the same batches (see ``pipelines/sample_job.py``).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pipelines import storage
from rae.image_tensors import to_uint8_images
from rae.normalization import LatentStats
from rae.sampling import SamplerConfig, autoguidance, classifier_free_guidance, conditional, integrate, time_grid

EXPORT_CONFIG = "model.json"
EXPORT_WEIGHTS = "model.safetensors"
Loader = Callable[[str, Any], "tuple[nn.Module, dict]"]  # (url, device) -> (eval-mode module, config)


def item_seed(seed: int, index: int) -> int:
    """The noise seed of item ``index`` of a run seeded ``seed``: distinct for every (seed, index)."""
    return int(seed) * 2**32 + int(index)


# ---------------------------------------------------------------- export facts

@dataclass(frozen=True)
class ExportFacts:
    """What the driver knows about one export without loading its weights."""

    url: str
    config: dict
    digest: str  # sha256 of model.json and the weights file size: changes when either changes

    @property
    def kwargs(self) -> dict:
        return self.config.get("kwargs", {})

    @property
    def latent_shape(self) -> tuple[int, int]:
        grid, channels = self.kwargs.get("grid"), self.kwargs.get("latent_channels")
        if grid is None or channels is None:
            raise ValueError(f"export {self.url}: model.json kwargs lack grid/latent_channels; cannot tell "
                             f"which latents the model takes")
        return int(grid) ** 2, int(channels)

    @property
    def encoder(self) -> dict:
        """Encoder facts recorded with the export: ``encoder_spec`` (dict) or ``encoder`` (dict or name)."""
        spec = self.config.get("encoder_spec")
        if isinstance(spec, dict):
            return spec
        encoder = self.config.get("encoder")
        if isinstance(encoder, dict):
            return encoder
        return {"name": encoder} if isinstance(encoder, str) else {}


def read_export_facts(url: str, kind: str) -> ExportFacts:
    """Read ``model.json`` of the export at ``url`` and check it is a ``kind`` ("dit" or "decoder")."""
    fs, root = storage.resolve(url)
    config_path, weights_path = storage.join(root, EXPORT_CONFIG), storage.join(root, EXPORT_WEIGHTS)
    for path in (config_path, weights_path):
        if not storage.exists(fs, path):
            raise FileNotFoundError(f"--{kind} {url}: {path.rsplit('/', 1)[-1]} is missing; expected an export "
                                    f"folder ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}) written by `rae train {kind}`")
    text = fs.cat_file(config_path)
    config = json.loads(text)
    have = config.get("kind")
    if have != kind:
        raise ValueError(f"--{kind} {url} is a {have!r} export; expected a {kind!r} export")
    digest = hashlib.sha256(text + str(fs.info(weights_path)["size"]).encode()).hexdigest()
    return ExportFacts(url, config, digest)


def load_latent_stats(dit: ExportFacts) -> LatentStats:
    """The normalization statistics that travel with a DiT export."""
    name = dit.config.get("latent_stats")
    if not name:
        raise ValueError(f"DiT export {dit.url} carries no latent statistics (model.json has no 'latent_stats'); "
                         f"it was exported by an older version: re-export it from its run")
    fs, root = storage.resolve(dit.url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latent_stats.safetensors"
        path.write_bytes(fs.cat_file(storage.join(root, name)))
        stats = LatentStats.load(path)
    if stats.shape != dit.latent_shape:
        raise ValueError(f"DiT export {dit.url}: statistics of shape {stats.shape} for a model of latents "
                         f"{dit.latent_shape}")
    return stats


_ENCODER_KEYS = ("name", "input_size", "weights_digest")


def _describe(facts: ExportFacts) -> str:
    enc = facts.encoder
    n, c = facts.latent_shape
    return f"{enc.get('name', 'an unrecorded encoder')} at {enc.get('input_size', '?')} px, {n} tokens x {c} channels"


def check_same_latents(a: ExportFacts, b: ExportFacts, role_a: str, role_b: str) -> None:
    """Refuse two exports made for different latents: another shape, or another encoder (name, input
    size, weights) wherever both record it."""
    differing = [key for key in _ENCODER_KEYS
                 if key in a.encoder and key in b.encoder and a.encoder[key] != b.encoder[key]]
    if a.latent_shape != b.latent_shape or differing:
        what = ", ".join(differing) or "latent shape"
        raise ValueError(f"the {role_a} ({a.url}) was made for {_describe(a)}; the {role_b} ({b.url}) for "
                         f"{_describe(b)} (they differ in {what}). Use a {role_b} trained on latents of the "
                         f"same encoder")


# ---------------------------------------------------------------- images from items

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
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
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
        y = torch.as_tensor(np.asarray(labels, np.int64), device=self.device)
        x = self.noise(seeds).to(self.device)
        latent_dim = self.shape[0] * self.shape[1] if self.sampler.shift else None
        times = time_grid(self.sampler.num_steps, t_min=self.sampler.t_min, latent_dim=latent_dim,
                          base_dim=self.sampler.shift_base_dim)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            z = integrate(self._velocity(y), x, times, self.sampler.method)
        return self.stats.denormalize(z.float())

    @torch.no_grad()
    def __call__(self, labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W, 3), rounded to nearest as a saved image would be."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            images = self.decoder(self.latents(labels, seeds))
        return to_uint8_images(images).cpu().numpy()
