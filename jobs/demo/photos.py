"""The demo's data: a small class-labelled image set cut from real photographs that ship with scikit-image.

Each class is one photograph; its images are random square crops of it (position and size vary, so
the model must learn the photo's content, not one fixed picture). Why crops of real photos rather
than generated shapes: the encoder is a real DINOv2, and its features only mean something on natural
images; and why a photo per class: the scikit-image wheel holds about a dozen colour photographs and
nothing else that is labelled, so "which photo is this a view of" is the honest class structure.
Crops are split into a training and a held-out validation folder; reconstructions in the report are
of validation crops the decoder never saw.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data loaders of real colour photographs that ship inside the wheel (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle")


_SPLITS = ("train", "val")
_CROP_STREAMS = "streams-per-class-and-split"  # in done.txt: a folder cut by the earlier single stream is redone


@dataclass(frozen=True)
class DemoImageSet:
    train: Path
    val: Path
    classes: tuple[str, ...]
    train_per_class: int
    val_per_class: int


def load_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs as RGB uint8 (H, W, 3): the left view of a stereo pair,
    grey repeated over three channels, alpha dropped. The demo, the tests and the benchmarks all read
    photos through this."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo pairs: take the left view
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"skimage.data.{name} is not a colour or grey photograph (shape {image.shape})")
    return np.ascontiguousarray(image[..., :3])


def random_crops(photo: np.ndarray, count: int, size: int, rng: np.random.Generator,
                 min_frac: float = 0.35, max_frac: float = 0.75) -> list[Image.Image]:
    """`count` square crops covering min_frac..max_frac of the photo's short side, resized to `size`."""
    height, width = photo.shape[:2]
    image = Image.fromarray(photo)
    crops = []
    for _ in range(count):
        side = int(rng.uniform(min_frac, max_frac) * min(height, width))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        crops.append(crop.resize((size, size), Image.Resampling.BICUBIC))
    return crops


def make_demo_images(root: Path, *, classes: int = len(PHOTOS), train_per_class: int = 96,
                     val_per_class: int = 8, size: int = 96, seed: int = 0) -> DemoImageSet:
    """Write ``root/train/<class>/<i>.jpg`` and ``root/val/<class>/<i>.jpg``; idempotent."""
    if not 1 <= classes <= len(PHOTOS):
        raise ValueError(f"the demo has {len(PHOTOS)} photographs; asked for {classes} classes")
    names = PHOTOS[:classes]
    done = root / "done.txt"
    expected = f"{names} {train_per_class} {val_per_class} {size} {seed} {_CROP_STREAMS}"
    if not (done.exists() and done.read_text() == expected):
        for split in _SPLITS:  # crops of another size or count would otherwise stay beside the new ones
            shutil.rmtree(root / split, ignore_errors=True)
        for index, name in enumerate(names):
            photo = load_photo(name)
            for split, count in (("train", train_per_class), ("val", val_per_class)):
                # One random stream per class and split: the held-out crops do not move when the training
                # set grows, and a larger training set starts with the smaller one's crops.
                rng = np.random.default_rng([seed, index, _SPLITS.index(split)])
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, crop in enumerate(random_crops(photo, count, size, rng)):
                    crop.save(folder / f"{name}_{i:04d}.jpg", quality=95)
        done.write_text(expected)
    return DemoImageSet(root / "train", root / "val", names, train_per_class, val_per_class)
