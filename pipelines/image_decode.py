"""Image bytes -> RGB uint8 arrays with the ADM centre crop, one shard at a time, on CPU.

This is the CPU operator of the encode pipeline. Every image either comes out as an
``(image_size, image_size, 3)`` uint8 array or is recorded with its shard, key and reason: corrupt or
truncated data, tiny images, decompression bombs, unsupported modes. Colour modes are converted,
not rejected: grayscale, palette and CMYK to RGB, alpha composited over white, 16-bit scaled to 8 bits.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    Rejection,
    ShardInfo,
    image_member,
    iter_tar_samples,
    parse_label,
    shard_bytes_reader,
)
from pipelines.storage import StorageOptions

ADM_CROP = "adm-center-crop"  # guided-diffusion's center_crop_arr, as used by DiT and RAE


@dataclass(frozen=True)
class DecodeLimits:
    """What an input image may be; anything outside is rejected with a reason."""
    min_side: int = 16                       # shorter side in pixels
    max_pixels: int = 64_000_000             # width * height, checked before decoding (decompression bombs)
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.max_pixels < 1 or self.max_member_bytes < 1:
            raise ValueError(f"decode limits must be positive, got {self}")


class RejectedImage(ValueError):
    """An image that cannot be used; the message is the reason recorded in the store."""


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit_lifted() -> Iterator[None]:
    """PIL's own decompression-bomb limit off while the block runs (one thread at a time).

    ``Image.open`` applies PIL's limit (178 M pixels; a warning above 89 M) to the header it reads,
    before ``DecodeLimits.max_pixels`` can be applied: the tool's limit, with its own reason, would
    never be the one in force. Reading a header decodes no pixels, so the header is read without
    PIL's limit and the tool's is applied right after; PIL's limit is back on for the decode itself.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def adm_resize_steps(width: int, height: int, image_size: int) -> tuple[list[tuple[str, tuple[int, int]]], tuple[int, int]]:
    """The ADM crop's geometry: the resizes it makes, as ``("box" | "bicubic", (width, height))`` in order,
    and the centre square's ``(top, left)`` in the last size. Shared by the PIL crop below and the
    torch one (pipelines/gpu_decode.py), so both cut the same square."""
    steps: list[tuple[str, tuple[int, int]]] = []
    size = (width, height)
    while min(*size) >= 2 * image_size:
        size = (size[0] // 2, size[1] // 2)
        steps.append(("box", size))
    scale = image_size / min(*size)
    size = (round(size[0] * scale), round(size[1] * scale))
    steps.append(("bicubic", size))
    return steps, ((size[1] - image_size) // 2, (size[0] - image_size) // 2)


_PIL_FILTERS = {"box": Image.BOX, "bicubic": Image.BICUBIC}


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop: halve with a box filter while >= 2x the target, bicubic-resize the short side
    to ``image_size``, then take the centre square."""
    steps, (top, left) = adm_resize_steps(*image.size, image_size)
    for name, size in steps:
        image = image.resize(size, resample=_PIL_FILTERS[name])
    arr = np.asarray(image)
    return arr[top:top + image_size, left:left + image_size]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited over white; 16/32-bit integers scale to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (16-bit PNGs): full range 0..65535
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        raise RejectedImage("unsupported image mode F (floating point)")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise RejectedImage(f"cannot convert image mode {image.mode} to RGB: {err}") from err


@contextlib.contextmanager
def _rejecting_bad_data() -> Iterator[None]:
    """Whatever PIL raises for bad data, as ``RejectedImage`` with the reason recorded in the store."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except RejectedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RejectedImage(f"image too large: {err}") from err
    except Image.UnidentifiedImageError:
        raise RejectedImage("not an image (unrecognised data)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise RejectedImage(f"corrupt or truncated image: {err}") from err


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """The image's header read (no pixels decoded) and its size checked against ``limits``; or
    ``RejectedImage`` with the reason."""
    with _rejecting_bad_data():
        with _pil_pixel_limit_lifted():
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RejectedImage(f"image too large: {width}x{height} pixels (limit {limits.max_pixels})")
        if min(width, height) < limits.min_side:
            raise RejectedImage(f"image too small: {width}x{height} (shorter side below {limits.min_side})")
    return image


def decode_image(data: bytes, image_size: int, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Bytes of one image -> ``(image_size, image_size, 3)`` uint8, or ``RejectedImage`` with the reason."""
    image = open_image(data, limits)
    with _rejecting_bad_data():
        image.load()
        rgb = to_rgb(image)
    return np.ascontiguousarray(center_crop_arr(rgb, image_size))


@dataclass
class DecodedShard:
    keys: list[str]
    labels: list[int]
    images: np.ndarray          # (n, image_size, image_size, 3) uint8
    rejected: list[dict]        # {"shard", "key", "reason"}


def iter_shard_images(shard: ShardInfo, reject: Callable[[str, str], None], *, limits: DecodeLimits,
                      num_classes: int | None, data: bytes | None,
                      storage_options: StorageOptions | None) -> Iterator[tuple[str, int, bytes]]:
    """``(key, label, image bytes)`` of each sample of one shard in archive order; every sample that
    has no usable label or image member goes to ``reject(key, reason)`` instead."""
    try:
        handle = shard_bytes_reader(shard, data, storage_options)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"shard {shard.url} is gone: {err}") from err
    with handle:
        for item in iter_tar_samples(handle, max_member_bytes=limits.max_member_bytes):
            if isinstance(item, Rejection):
                reject(item.key, item.reason)
                continue
            label = parse_label(item.members, num_classes)
            member = image_member(item.members)
            if isinstance(member, str):
                reject(item.key, member)
                continue
            if isinstance(label, str):
                reject(item.key, label)
                continue
            yield item.key, label, member[1]


def decode_shard(shard: ShardInfo, *, image_size: int, limits: DecodeLimits = DecodeLimits(),
                 num_classes: int | None = None, data: bytes | None = None,
                 storage_options: StorageOptions | None = None) -> DecodedShard:
    """Every sample of one shard decoded and cropped; everything unusable listed in ``rejected``."""
    keys: list[str] = []
    labels: list[int] = []
    images: list[np.ndarray] = []
    rejected: list[dict] = []

    def reject(key: str, reason: str) -> None:
        rejected.append({"shard": shard.url, "key": key, "reason": reason})

    for key, label, image in iter_shard_images(shard, reject, limits=limits, num_classes=num_classes, data=data,
                                               storage_options=storage_options):
        try:
            images.append(decode_image(image, image_size, limits))
        except RejectedImage as err:
            reject(key, str(err))
            continue
        keys.append(key)
        labels.append(label)
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return DecodedShard(keys, labels, stacked, rejected)


def decode_shard_batch(batch: dict[str, np.ndarray], *, image_size: int, limits: DecodeLimits,
                       num_classes: int | None, storage_options: StorageOptions | None) -> dict[str, np.ndarray]:
    """Ray Data adapter: a one-row batch naming a shard -> one row holding the whole decoded shard.

    One row per shard keeps a shard's images together through the encoder, so each shard is
    written, and resumed, as a unit.
    """
    if len(batch["shard_url"]) != 1:
        raise ValueError(f"decode_shard_batch expects one shard per batch, got {len(batch['shard_url'])}")
    shard = ShardInfo(str(batch["shard_url"][0]), str(batch["shard_name"][0]), int(batch["shard_size"][0]))
    data = batch["shard_bytes"][0] if "shard_bytes" in batch else None
    decoded = decode_shard(shard, image_size=image_size, limits=limits, num_classes=num_classes,
                           data=bytes(data) if data is not None else None, storage_options=storage_options)
    meta = {"keys": decoded.keys, "labels": decoded.labels, "rejected": decoded.rejected}
    return {
        "shard_index": batch["shard_index"],
        "meta": np.array([json.dumps(meta)], dtype=object),
        "images": decoded.images[None],
    }
