"""Test data written through the project's own writers: latent stores, image folders, real photographs.

Plain functions that tests call with their own sizes; the fixtures built on them are in conftest.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.config_overrides import load_config
from jobs.train.dit import DiTRunConfig
from pipelines import latent_store
from pipelines.shards import ShardInfo
from rae.encoders import ENCODER_PRESETS
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


def as_format_version_2(url: str) -> str:
    """Rewrite a complete local store (a path or file:// URL) as format version 2 wrote it: each part's
    latent column a ``fixed_size_list`` of its values, the manifest's version and layout text 2's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(url.removeprefix("file://"))
    manifest = latent_store.read_manifest(url)
    n, c = LatentSpec.from_dict(manifest["latent_spec"], url).shape
    for part in manifest["parts"]:
        table = pq.read_table(root / part["path"])
        flat = pa.array(latent_store.table_latents(table, (n, c)).reshape(-1))
        index = table.schema.get_field_index(latent_store.LATENT_COLUMN)
        table = table.set_column(index, latent_store.LATENT_COLUMN, pa.FixedSizeListArray.from_arrays(flat, n * c))
        pq.write_table(table, root / part["path"], use_dictionary=["key"],
                       compression={"key": "snappy", "label": "snappy", "view": "snappy", "latent": "none"})
    manifest.update(format_version=2, latent=dict(
        manifest["latent"], layout="fixed_size_list of N*C values, row-major (N tokens, C channels)"))
    latent_store.write_manifest(url, manifest)
    return url


def write_image_folder(root: Path, images: dict[str, dict[str, np.ndarray]]) -> Path:
    """``root/<class>/<file name>`` for every uint8 HWC image, the format chosen by the file name's
    extension (JPEG at quality 95); returns ``root``."""
    for label, files in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name, array in files.items():
            options = {"quality": 95} if name.endswith(".jpg") else {}
            Image.fromarray(array).save(root / label / name, **options)
    return root


# A store of class-dependent Gaussian latents shaped like the offline DINOv2-S at 56 px (4x4 tokens x 384),
# and the tiny DiT^DH run that trains on it in seconds: what the DiT and recovery tests share.
DIT_ENCODER, DIT_INPUT_SIZE = "dinov2-s-offline", 56
TOKENS, CHANNELS, CLASSES, ROWS = 16, 384, 4, 64


def class_latent_store(url: str, *, rows: int = ROWS, seed: int = 0) -> str:
    """A complete store of class-dependent Gaussian latents, through the pipeline's own writer."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, TOKENS, CHANNELS)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=rows)
    latents = centres[labels] + 0.3 * rng.normal(size=(rows, TOKENS, CHANNELS)).astype(np.float32)
    spec = ENCODER_PRESETS[DIT_ENCODER].with_input_size(DIT_INPUT_SIZE).latent_spec("synthetic", stats=STATS_FILE)
    manifest = latent_manifest(spec, parts=2, class_names=[f"c{i}" for i in range(CLASSES)])
    return write_latent_store(url, manifest, latents[:, None].astype(np.float16), labels)


def tiny_dit_config(store: str, **sets) -> DiTRunConfig:
    """The tiny DiT^DH on a class-latent store: 4 epochs of 4 steps, a checkpoint every 8 steps."""
    items = [f"{k}={v}" for k, v in {
        "store": store, "model": "ditdh-tiny", "ema_decay": 0.9,
        "loop.epochs": 4, "loop.global_batch_size": 16, "loop.max_micro_batch": 8,
        "loop.checkpoint_every_steps": 8, "loop.log_every_steps": 4, "loop.shuffle_buffer": 32,
        "optim.schedule.base_lr": 3e-3, "optim.schedule.final_lr": 3e-4,
        "optim.schedule.hold_epochs": 3, "optim.schedule.decay_end_epoch": 4, **sets}.items()]
    return load_config(DiTRunConfig(), sets=items)
