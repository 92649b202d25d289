"""JPEG bytes -> ADM centre crops on a torch device: nvJPEG on CUDA, libjpeg-turbo on CPU.

The encoder actor's side of ``--decode gpu``: the CPU stage (pipelines/shard_jpegs.py) sends the
JPEGs the device can take as bytes, and this module decodes them in batches with
``torchvision.io.decode_jpeg`` and cuts the same crop as the CPU path, on the device. An image the
device decoder refuses is decoded by the CPU path instead (``decode_image``), so it is cropped, or
rejected with the reason, exactly as there.

The crop is PIL's arithmetic, not torch's ``interpolate``: PIL's box and bicubic filters (support
scaled by the downscale factor, a = -0.5), its 22-bit fixed-point weights, the horizontal pass
before the vertical one and the rounding to 8 bits after each, done with integer gathers. From the
same decoded pixels it gives the same crop as ``center_crop_arr``, bit for bit (tests/test_gpu_decode.py);
torch's antialiased bicubic would differ by a few levels. What remains is the decoder: libjpeg-turbo
(PIL's and torchvision's CPU decoder) and nvJPEG differ in IDCT and chroma upsampling.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.image_decode import DecodeLimits, RejectedImage, adm_resize_steps, decode_image

PRECISION_BITS = 22          # PIL's fixed-point weights for 8-bit images (Resample.c: 32 - 8 - 2)
DECODE_PIXELS = 2**27        # pixels decoded in one call: bounds the full-size images held on the device at once
DECODE_IMAGES = 256          # images decoded in one call


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS = {"box": (_box, 0.5), "bicubic": (_bicubic, 2.0)}  # PIL's filter functions and supports


@functools.lru_cache(maxsize=4096)
def resample_weights(in_size: int, out_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """PIL's resampling of one axis (Resample.c ``precompute_coeffs`` + ``normalize_coeffs_8bpc``):
    for each output pixel, the input indices ``(out, taps)`` it reads and their fixed-point weights."""
    kernel, support = FILTERS[name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    used = offsets[None, :] < count[:, None]
    weights = np.where(used, kernel((offsets[None, :] + first[:, None] - center[:, None] + 0.5) / filterscale), 0.0)
    total = np.cumsum(weights, axis=1)[:, -1:]  # summed in order, as PIL does
    weights = np.divide(weights, total, out=weights.copy(), where=total != 0.0)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    index = np.minimum(first[:, None] + offsets[None, :], in_size - 1)
    return index, fixed


@dataclass(frozen=True)
class _Pass:
    """One axis of one resize, on the device: ``out[..., j] = round8(sum_t x[..., index[j, t]] * weight[j, t])``."""
    index: torch.Tensor
    weight: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Resample the last axis of uint8 pixels, with PIL's rounding and clipping to 0..255. The sums
        fit in int32 as in PIL: 255 * 2**22 * (sum of a row's |weights|, at most ~1.3) < 2**31."""
        total = (x[..., self.index].to(torch.int32) * self.weight).sum(-1, dtype=torch.int32)
        return ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


class DeviceCropper:
    """The ADM centre crop of ``(n, 3, H, W)`` uint8 images of one size, on their device."""

    def __init__(self, image_size: int, device: torch.device):
        self.image_size, self.device = image_size, device
        self._passes: dict[tuple, _Pass] = {}

    def _pass(self, in_size: int, out_size: int, name: str, keep: slice) -> _Pass:
        key = (in_size, out_size, name, keep.start, keep.stop)
        if key not in self._passes:
            index, weight = resample_weights(in_size, out_size, name)
            self._passes[key] = _Pass(torch.from_numpy(index[keep]).to(self.device),
                                      torch.from_numpy(weight[keep]).to(self.device))
        return self._passes[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` uint8 -> ``(n, S, S, 3)`` uint8, S = ``image_size``."""
        height, width = images.shape[-2:]
        steps, (top, left) = adm_resize_steps(width, height, self.image_size)
        x = images
        for number, (name, (new_width, new_height)) in enumerate(steps):
            last = number == len(steps) - 1
            # The last resize computes only the rows and columns the crop keeps: each output pixel
            # depends on its own weights alone, so this is the full resize, cropped.
            rows = slice(top, top + self.image_size) if last else slice(0, new_height)
            cols = slice(left, left + self.image_size) if last else slice(0, new_width)
            if (new_width, cols) != (width, slice(0, width)):  # PIL skips an axis whose size stays
                x = self._pass(width, new_width, name, cols).apply(x)
            if (new_height, rows) != (height, slice(0, height)):
                x = self._pass(height, new_height, name, rows).apply(x.transpose(-1, -2)).transpose(-1, -2)
            width, height = new_width, new_height
        return x.permute(0, 2, 3, 1).contiguous()


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    """torchvision 0.29 warns on every decode that its image I/O moves to TorchCodec; the warning is
    about the future, not about this data, so it is kept off the job's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def nvjpeg_problem() -> str | None:
    """None when ``decode_jpeg`` works on this machine's CUDA device; else why not (a CPU-only
    torchvision build, a driver without nvJPEG)."""
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        with _torchvision_io():
            decode_jpeg([encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))], device="cuda")
    except Exception as err:  # any failure means: decode on the CPU instead
        return f"{type(err).__name__}: {err}"
    return None


class JpegCropper:
    """JPEG bytes -> ADM crops on ``device``, in batches; what the device decoder refuses goes through
    the CPU path (``decode_image``), where it is cropped or rejected exactly as there."""

    def __init__(self, image_size: int, device: torch.device, limits: DecodeLimits = DecodeLimits()):
        self.image_size, self.device, self.limits = image_size, device, limits
        self.crop = DeviceCropper(image_size, device)

    def __call__(self, jpegs: Sequence[bytes], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor | RejectedImage]:
        """Each JPEG's ``(S, S, 3)`` uint8 crop on the device, or the ``RejectedImage`` the CPU path
        gave it; ``sizes`` are the ``(width, height)`` its header announced."""
        results: list[torch.Tensor | RejectedImage | None] = [None] * len(jpegs)
        for chunk in _chunks([w * h for w, h in sizes]):
            decoded = self._decode([jpegs[i] for i in chunk])
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, image in zip(chunk, decoded):
                if image is not None and tuple(image.shape) == (3, sizes[i][1], sizes[i][0]):
                    by_size.setdefault(sizes[i], []).append(i)
                else:  # refused by the device decoder, or a size other than the header's
                    results[i] = self._on_cpu(jpegs[i])
            images = dict(zip(chunk, decoded))
            for same in by_size.values():  # one crop call per size: a shard's photos share a few sizes
                crops = self.crop(torch.stack([images[i] for i in same]))
                for i, crop in zip(same, crops):
                    results[i] = crop
        return results

    def _decode(self, jpegs: list[bytes]) -> list[torch.Tensor | None]:
        """Decoded ``(3, H, W)`` uint8 images on the device; None for each one the decoder refused."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        with _torchvision_io():
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except (RuntimeError, ValueError):  # one bad image fails the batch: find it, one at a time
                decoded: list[torch.Tensor | None] = []
                for one in data:
                    try:
                        decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                    except (RuntimeError, ValueError):
                        decoded.append(None)
                return decoded

    def _on_cpu(self, jpeg: bytes) -> torch.Tensor | RejectedImage:
        try:
            return torch.from_numpy(decode_image(jpeg, self.image_size, self.limits)).to(self.device)
        except RejectedImage as err:
            return err


def _chunks(pixels: Sequence[int]) -> list[list[int]]:
    """Indices in order, cut into decode calls of at most ``DECODE_IMAGES`` images and
    ``DECODE_PIXELS`` pixels (one larger image goes alone)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, count in enumerate(pixels):
        if current and (len(current) == DECODE_IMAGES or total + count > DECODE_PIXELS):
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += count
    if current:
        chunks.append(current)
    return chunks


def crop_split_shard(meta: dict, crops: np.ndarray, blob: bytes, cropper: JpegCropper) -> tuple[torch.Tensor, dict]:
    """One row of ``split_shard_batch`` (its ``meta``, CPU ``crops`` and JPEG ``blob``) -> the shard's
    ``(n, S, S, 3)`` uint8 crops on the cropper's device in archive order, and the row's meta as the
    CPU path writes it: ``keys``, ``labels`` of the images kept, and ``rejected`` in archive order
    (those rejected in the CPU stage and those the device's fallback rejected)."""
    spans = meta["jpegs"]
    device_spans = [span for span in spans if span is not None]
    on_device = iter(cropper([blob[o:o + n] for o, n, _, _ in device_spans], [(w, h) for _, _, w, h in device_spans]))
    on_host = iter(torch.from_numpy(np.array(crops)).to(cropper.device))  # a copy: Ray hands read-only arrays
    kept: list[torch.Tensor] = []
    keys: list[str] = []
    labels: list[int] = []
    rejected = list(zip(meta["rejected_at"], meta["rejected"]))
    for key, label, position, span in zip(meta["keys"], meta["labels"], meta["positions"], spans):
        crop = next(on_host) if span is None else next(on_device)
        if isinstance(crop, RejectedImage):
            rejected.append((position, {"shard": meta["shard"], "key": key, "reason": str(crop)}))
            continue
        kept.append(crop)
        keys.append(key)
        labels.append(label)
    size = cropper.image_size
    images = torch.stack(kept) if kept else torch.zeros((0, size, size, 3), dtype=torch.uint8, device=cropper.device)
    return images, {"keys": keys, "labels": labels, "rejected": [record for _, record in sorted(rejected, key=lambda r: r[0])]}
