"""Image streams for evaluation: real images from webdataset shards (ADM centre crop), generated
samples from an ADM .npz, a sampling job's folder or a folder of PNGs, and reconstructions of
shard images through an encoder and decoder (for rFID).

Everything here yields uint8 (B, H, W, 3) batches, the layout `rae.evaluation` scores.
"""
from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from pipelines import storage
from pipelines.image_decode import decode_shard
from pipelines.shards import list_shards
from rae.image_tensors import to_uint8_images, to_unit_images

SAMPLES_NPZ = "samples.npz"


def iter_shard_images(shards: str, image_size: int, *, batch_size: int = 250,
                      max_images: int | None = None) -> Iterator[np.ndarray]:
    """Every decodable image of the shards at ``shards``, in shard order, ADM centre-cropped to
    ``image_size``, in batches of ``batch_size`` (the last may be smaller); undecodable inputs are
    skipped, as the encode pipeline skips them."""
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image size and batch size must be positive, got {image_size} and {batch_size}")
    pending: list[np.ndarray] = []
    held = seen = 0
    for shard in list_shards(shards):
        images = decode_shard(shard, image_size=image_size).images
        if max_images is not None:
            images = images[: max(0, max_images - seen)]
        seen += len(images)
        pending.append(images)
        held += len(images)
        while held >= batch_size:
            stacked = np.concatenate(pending)
            yield stacked[:batch_size]
            pending, held = [stacked[batch_size:]], held - batch_size
        if max_images is not None and seen >= max_images:
            break
    if held:
        yield np.concatenate(pending)
    if seen == 0:
        raise ValueError(f"shards {shards}: no decodable image")


def _npz_batches(data: bytes | str, where: str, batch_size: int) -> Iterator[np.ndarray]:
    with np.load(io.BytesIO(data) if isinstance(data, bytes) else data) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"{where} has no 'arr_0' (keys {npz.files}); expected an ADM sample batch")
        arr = npz["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{where}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    for i in range(0, len(arr), batch_size):
        yield arr[i:i + batch_size]


def iter_sample_images(samples: str, *, batch_size: int = 250) -> Iterator[np.ndarray]:
    """Generated images from an ADM ``.npz``, a ``rae sample`` output folder (its samples.npz), or a
    folder of ``.png`` files (sorted by name)."""
    fs, path = storage.resolve(samples)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"--samples {samples}: no such file or folder")
    if fs.isfile(path):
        yield from _npz_batches(fs.cat_file(path), samples, batch_size)
        return
    npz = storage.join(path, SAMPLES_NPZ)
    if storage.exists(fs, npz):
        yield from _npz_batches(fs.cat_file(npz), storage.to_url(fs, npz), batch_size)
        return
    pngs = sorted(p for p in fs.find(path) if p.lower().endswith(".png"))
    if not pngs:
        raise FileNotFoundError(f"--samples {samples}: a folder with neither {SAMPLES_NPZ} nor .png files")
    for i in range(0, len(pngs), batch_size):
        images = [np.asarray(Image.open(io.BytesIO(fs.cat_file(p))).convert("RGB")) for p in pngs[i:i + batch_size]]
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"--samples {samples}: PNGs of different sizes ({sorted({im.shape for im in images})})")
        yield np.stack(images)


@torch.no_grad()
def iter_reconstructions(batches: Iterator[np.ndarray], encoder: torch.nn.Module, decoder: torch.nn.Module,
                         *, device: torch.device | str = "cpu") -> Iterator[np.ndarray]:
    """Each batch (uint8 NHWC at the decoder's image size) through the frozen encoder and the
    decoder, quantized to uint8 as a saved reconstruction would be."""
    for batch in batches:
        x = to_unit_images(torch.from_numpy(batch).to(device))
        yield to_uint8_images(decoder(encoder(x))).cpu().numpy()
