"""Test data written through the project's own writers: latent stores, image folders, real photographs.

Plain functions that tests call with their own sizes; the fixtures built on them are in conftest.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from pipelines import latent_store
from pipelines.shards import ShardInfo
from rae.latent_spec import STATS_FILE, LatentSpec


def synthetic_spec(**fields) -> LatentSpec:
    """A store's latent spec for made-up latents: 2x2 tokens of 8 channels unless ``fields`` say otherwise."""
    grid = fields.pop("grid", 2)
    patch = fields.pop("patch_size", 14)
    defaults = {"encoder": "synthetic", "weights_digest": "abc", "input_size": grid * patch, "patch_size": patch,
                "grid": grid, "channels": 8, "image_size": grid * 16, "stats": STATS_FILE}
    return LatentSpec(**{**defaults, **fields})


def latent_manifest(spec: LatentSpec, *, parts: int = 1, class_names: list[str] | None = None,
                    preprocessing: dict | None = None, software: dict | None = None) -> dict:
    """An in-progress manifest for ``parts`` made-up shards (``shard-000000.tar`` of 1000 bytes, ...)."""
    shards = [ShardInfo(f"file:///data/shard-{i:06d}.tar", f"shard-{i:06d}.tar", 1000 + i) for i in range(parts)]
    return latent_store.new_manifest(latent_spec=spec, preprocessing=preprocessing or {"crop": "test"},
                                     latent_dtype="float16", shards=shards, class_names=class_names,
                                     software=software or {})


def write_latent_store(url: str, manifest: dict, latents: np.ndarray, labels: Sequence[int],
                       keys: Sequence[str] | None = None) -> str:
    """A complete store, committed as the encode job commits one: the manifest, one part per shard
    (the rows split evenly over the manifest's shards, in order), then finalize.

    ``latents`` is (rows, views, tokens, channels); ``keys`` default to ``k0, k1, ...``."""
    keys = keys if keys is not None else [f"k{i}" for i in range(len(latents))]
    latent_store.write_manifest(url, manifest)
    for index, rows in enumerate(np.array_split(np.arange(len(latents)), len(manifest["shards"]))):
        latent_store.write_shard(url, manifest, index, keys=[keys[i] for i in rows],
                                 labels=[int(labels[i]) for i in rows], latents=latents[rows], rejected=[])
    latent_store.finalize(url, manifest)
    return url


def photo(name: str) -> np.ndarray:
    """One of scikit-image's sample photographs as RGB uint8 (H, W, 3): alpha dropped, grey repeated."""
    image = getattr(skimage.data, name)()
    return np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]


def write_image_folder(root: Path, images: dict[str, dict[str, np.ndarray]]) -> Path:
    """``root/<class>/<file name>`` for every uint8 HWC image, the format chosen by the file name's
    extension (JPEG at quality 95); returns ``root``."""
    for label, files in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name, array in files.items():
            options = {"quality": 95} if name.endswith(".jpg") else {}
            Image.fromarray(array).save(root / label / name, **options)
    return root
