"""Training images for the decoder run: webdataset shards -> random crops (uint8) on Ray Data.

    shards (one row each) -> decode, resize, random crop (CPU tasks) -> rows of (image, label)

Decoding reuses the encode pipeline's shard reader and image checks (``decode_image``, in
``decode_shard``'s order): every corrupt, tiny or unlabelled sample is skipped and counted, exactly as
the pipeline would reject it. Each image is resized so its shorter side is ``resize`` px (bicubic;
the pipeline's ADM crop keeps the centre square) and a ``crop`` x ``crop`` window is cut at a random
position, drawn afresh on every pass over the data. Only the crops enter Ray's object store, as uint8.

A shard streams: each image is cropped as soon as it is decoded and the crops leave in blocks of
``CROPS_PER_BLOCK`` rows. A task holds one resized image and one block at a time, not a whole shard
of resized images (~440 KB each at 384 px, ~0.9 GB for a 1,000-image shard with its stacked copy),
and the trainer's first batch of every epoch waits for one block of decodes, not a shard's.

Deviation from the reference: the reference transform cuts the random crop anywhere in the resized
image; ours cuts it inside the centre square of the resized image (the pipeline's crop), so for a
non-square photo the crop positions are a subset of the reference's along the long side.

Training needs a fixed number of steps per epoch on every rank, hence the exact number of usable
images before the run starts: :func:`census` decodes every shard once (in parallel on Ray) and
counts them, listing the rejected samples with shard, key and reason.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.image_decode import DecodeLimits, RejectedImage, decode_image, iter_shard_images
from pipelines.shards import ShardInfo, list_shards, read_class_names
from pipelines.storage import StorageOptions

logger = logging.getLogger(__name__)

REFERENCE_RESIZE, REFERENCE_CROP = 384, 256  # the paper's crops for a 256 px decoder
CROPS_PER_BLOCK = 128  # rows per output block: 25 MB of 256 px crops


def crop_sizes(image_size: int, resize: int = REFERENCE_RESIZE, crop: int = REFERENCE_CROP) -> tuple[int, int]:
    """(resize, crop) for a decoder emitting ``image_size`` px: the reference 384 -> 256 scaled by
    ``image_size / crop`` (a 64 px decoder trains on 64 px crops of images resized to 96)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return round(resize * image_size / crop), image_size


def random_crops(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` x ``size`` window per image of (n, H, W, 3) at a uniformly random position."""
    n, height, width = images.shape[:3]
    if size > min(height, width):
        raise ValueError(f"crop {size} is larger than the images ({height}x{width})")
    tops = rng.integers(0, height - size + 1, size=n)
    lefts = rng.integers(0, width - size + 1, size=n)
    out = np.empty((n, size, size, images.shape[3]), dtype=images.dtype)
    for i, (top, left) in enumerate(zip(tops, lefts)):
        out[i] = images[i, top:top + size, left:left + size]
    return out


def decode_crop_batch(batch: dict[str, np.ndarray], *, resize: int, crop: int, limits: DecodeLimits,
                      num_classes: int | None, storage_options: StorageOptions | None,
                      block_rows: int = CROPS_PER_BLOCK) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: a one-row batch naming a shard -> its usable images as blocks of at most
    ``block_rows`` rows (``image`` uint8 (crop, crop, 3), ``label`` int64), yielded while the shard is
    still being decoded. Crop positions come from fresh entropy on every call."""
    rng = np.random.default_rng()
    crops: list[np.ndarray] = []
    labels: list[int] = []
    for sample in shard_samples(_shard_of(batch), resize=resize, limits=limits, num_classes=num_classes,
                                storage_options=storage_options):
        if isinstance(sample, dict):
            continue
        image, label = sample
        crops.append(random_crops(image[None], crop, rng)[0])
        labels.append(label)
        if len(crops) == block_rows:
            yield _crop_block(crops, labels)
            crops, labels = [], []
    if crops:
        yield _crop_block(crops, labels)


def _crop_block(crops: list[np.ndarray], labels: list[int]) -> dict[str, np.ndarray]:
    return {"image": np.stack(crops), "label": np.asarray(labels, dtype=np.int64)}


def count_batch(batch: dict[str, np.ndarray], *, resize: int, limits: DecodeLimits, num_classes: int | None,
                storage_options: StorageOptions | None) -> dict[str, np.ndarray]:
    """Ray Data UDF for the census: a one-row batch naming a shard -> its usable count and rejections
    (the images :func:`decode_crop_batch` will crop, decoded one at a time and not kept)."""
    rows, rejected = 0, []
    for sample in shard_samples(_shard_of(batch), resize=resize, limits=limits, num_classes=num_classes,
                                storage_options=storage_options):
        if isinstance(sample, dict):
            rejected.append(sample)
        else:
            rows += 1
    return {"shard_index": batch["shard_index"], "rows": np.array([rows]),
            "rejected": np.array([json.dumps(rejected)], dtype=object)}


def _shard_of(batch: dict[str, np.ndarray]) -> ShardInfo:
    if len(batch["shard_url"]) != 1:
        raise ValueError(f"expected one shard per batch, got {len(batch['shard_url'])}")
    return ShardInfo(str(batch["shard_url"][0]), str(batch["shard_name"][0]), int(batch["shard_size"][0]))


def shard_samples(shard: ShardInfo, *, resize: int, limits: DecodeLimits, num_classes: int | None,
                  storage_options: StorageOptions | None) -> Iterator[tuple[np.ndarray, int] | dict]:
    """Every sample of a shard in archive order, one at a time: ``(image, label)`` for a usable one
    (uint8 (resize, resize, 3), the ADM crop) or its rejection ``{"shard", "key", "reason"}``. The
    checks and their order are ``decode_shard``'s (both read through ``iter_shard_images``), so the census and the crops agree with the encode
    pipeline on which images are usable."""
    rejected: list[dict] = []

    def reject(key: str, reason: str) -> None:
        rejected.append({"shard": shard.url, "key": key, "reason": reason})

    for key, label, member in iter_shard_images(shard, reject, limits=limits, num_classes=num_classes, data=None,
                                                storage_options=storage_options):
        yield from rejected  # the samples before this one that had no usable label or image member
        rejected.clear()
        try:
            yield decode_image(member, resize, limits), label
        except RejectedImage as err:
            yield {"shard": shard.url, "key": key, "reason": str(err)}
    yield from rejected


@dataclass(frozen=True)
class ShardCensus:
    """What the shards hold for training: the usable images and what was rejected."""

    url: str
    shards: list[ShardInfo]
    rows: int
    rejected: list[dict]  # {"shard", "key", "reason"}
    num_classes: int | None


def _shard_rows(shards: list[ShardInfo]) -> list[dict]:
    return [{"shard_index": i, "shard_url": s.url, "shard_name": s.name, "shard_size": s.size}
            for i, s in enumerate(shards)]


def census(url: str, *, resize: int, limits: DecodeLimits = DecodeLimits(),
           storage_options: StorageOptions | None = None) -> ShardCensus:
    """Decode every shard once on Ray and count the usable images (the run's rows)."""
    import ray

    from pipelines import storage

    shards = list_shards(url, storage_options)
    if storage.is_process_local(storage.resolve(url, storage_options)[0]):
        raise ValueError(f"shards {url}: memory:// lives in this process only and Ray workers cannot read "
                         f"it; put the shards on a local path, s3:// or gs://")
    classes = read_class_names(shards, storage_options)
    num_classes = len(classes) if classes else None
    ds = ray.data.from_items(_shard_rows(shards), override_num_blocks=len(shards))
    ds = ds.map_batches(count_batch, batch_size=1, num_cpus=1, fn_kwargs={
        "resize": resize, "limits": limits, "num_classes": num_classes, "storage_options": storage_options})
    rows, rejected = 0, []
    for row in ds.iter_rows():
        rows += int(row["rows"])
        rejected.extend(json.loads(row["rejected"]))
    if rejected:
        logger.warning("shards %s: %d sample(s) skipped, e.g. %s", url, len(rejected), rejected[:3])
    return ShardCensus(url=url, shards=shards, rows=rows, rejected=rejected, num_classes=num_classes)


def crop_dataset(facts: ShardCensus, *, resize: int, crop: int, limits: DecodeLimits = DecodeLimits(),
                 storage_options: StorageOptions | None = None):
    """A Ray Dataset of random crops, re-decoded (with new crop positions) on every epoch."""
    import ray

    ds = ray.data.from_items(_shard_rows(facts.shards), override_num_blocks=len(facts.shards))
    return ds.map_batches(decode_crop_batch, batch_size=1, num_cpus=1, fn_kwargs={
        "resize": resize, "crop": crop, "limits": limits, "num_classes": facts.num_classes,
        "storage_options": storage_options})
