"""One shard -> the encoder actor's input when the actor decodes JPEGs on its device (``--decode gpu``).

The CPU stage of that path: it reads the tar and each image's header, and sends each sample one of
three ways, keeping its place in the archive:

- a JPEG the device decoder takes (RGB or grayscale, baseline or progressive, ending with its end
  marker): its bytes, for the actor to decode in batches (pipelines/gpu_decode.py);
- any other image (PNG, CMYK JPEG, a JPEG with data after its end or cut short): decoded and cropped
  here, by the CPU path;
- an unusable sample: rejected here, with the CPU path's reason.

Why the end marker: a truncated JPEG is rejected by the CPU path ("image file is truncated"), while a
GPU decoder may fill in what is missing; routing it to the CPU keeps the rejections the same. This
module imports no torch: the decode tasks stay small processes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.image_decode import DecodeLimits, RejectedImage, decode_image, iter_shard_images, open_image
from pipelines.shards import ShardInfo
from pipelines.storage import StorageOptions

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes decoded on the device; CMYK and YCCK go through the CPU path
JPEG_END = b"\xff\xd9"


def device_decodable(image: Image.Image, data: bytes) -> bool:
    """Whether the device decoder gets this image (its header already read by ``open_image``)."""
    return image.format == "JPEG" and image.mode in DEVICE_MODES and data.endswith(JPEG_END)


@dataclass
class SplitShard:
    """One shard's samples in archive order: ``keys``/``labels``/``positions`` for each image kept so
    far (``positions``: its place among all the shard's samples), and for each either a span of
    ``blob`` (``[offset, length, width, height]``) for the device, or None: its crop is the next one
    of ``crops``. ``rejected``/``rejected_at``: the samples rejected here and their places."""
    shard: str
    keys: list[str]
    labels: list[int]
    positions: list[int]
    jpegs: list[list[int] | None]
    crops: np.ndarray
    blob: bytes
    rejected: list[dict]
    rejected_at: list[int]


def split_shard(shard: ShardInfo, *, image_size: int, limits: DecodeLimits = DecodeLimits(),
                num_classes: int | None = None, data: bytes | None = None,
                storage_options: StorageOptions | None = None) -> SplitShard:
    keys: list[str] = []
    labels: list[int] = []
    positions: list[int] = []
    jpegs: list[list[int] | None] = []
    crops: list[np.ndarray] = []
    blob = bytearray()
    rejected: list[dict] = []
    rejected_at: list[int] = []

    def reject(key: str, reason: str) -> None:
        rejected_at.append(len(positions) + len(rejected))
        rejected.append({"shard": shard.url, "key": key, "reason": reason})

    for key, label, image in iter_shard_images(shard, reject, limits=limits, num_classes=num_classes, data=data,
                                               storage_options=storage_options):
        try:
            header = open_image(image, limits)
            if device_decodable(header, image):
                jpegs.append([len(blob), len(image), *header.size])
                blob += image
            else:
                crops.append(decode_image(image, image_size, limits))
                jpegs.append(None)
        except RejectedImage as err:
            reject(key, str(err))
            continue
        positions.append(len(positions) + len(rejected))
        keys.append(key)
        labels.append(label)
    stacked = np.stack(crops) if crops else np.zeros((0, image_size, image_size, 3), np.uint8)
    return SplitShard(shard.url, keys, labels, positions, jpegs, stacked, bytes(blob), rejected, rejected_at)


def split_shard_batch(batch: dict[str, np.ndarray], *, image_size: int, limits: DecodeLimits,
                      num_classes: int | None, storage_options: StorageOptions | None) -> dict[str, np.ndarray]:
    """Ray Data adapter, as ``decode_shard_batch``: a one-row batch naming a shard -> one row holding
    its split (``meta`` JSON, the CPU crops in ``images``, the JPEG bytes in ``jpegs``)."""
    if len(batch["shard_url"]) != 1:
        raise ValueError(f"split_shard_batch expects one shard per batch, got {len(batch['shard_url'])}")
    shard = ShardInfo(str(batch["shard_url"][0]), str(batch["shard_name"][0]), int(batch["shard_size"][0]))
    data = batch["shard_bytes"][0] if "shard_bytes" in batch else None
    split = split_shard(shard, image_size=image_size, limits=limits, num_classes=num_classes,
                        data=bytes(data) if data is not None else None, storage_options=storage_options)
    meta = {"shard": split.shard, "keys": split.keys, "labels": split.labels, "positions": split.positions,
            "jpegs": split.jpegs, "rejected": split.rejected, "rejected_at": split.rejected_at}
    return {
        "shard_index": batch["shard_index"],
        "meta": np.array([json.dumps(meta)], dtype=object),
        "images": split.crops[None],
        "jpegs": np.array([split.blob], dtype=object),
    }
