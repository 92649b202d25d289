"""Training images for a decoder run on fixed views: each usable image's centre crop and its mirror
image, decoded once into the training worker's memory (the alternative to :mod:`pipelines.decoder_crops`).

The paper's decoder trains on random crops, so every step's images (and latents) are new, and they
stream through Ray Data and the frozen encoder each epoch. A run on fixed views sees the same images
every epoch: the view the encode job stores and an evaluation holds out (the ADM centre crop at the
decoder's size) and its mirror image, the store's flip view. The frozen encoder maps a fixed view to a
fixed latent, so the trainer encodes each view once (:class:`jobs.train.decoder.ViewLatents`) and a
step runs the decoder alone. This suits small image sets, such as the demo's 384 crops, where a
random 2/3 window of an image is a different scale from the views the decoder is judged on and the
encoder's pass is most of the step; it cannot hold ImageNet (1.28 M views of 256 px are ~250 GB of
pixels per worker), and :func:`fixed_view_bytes` sizes a run before launch so that
:func:`check_fixed_views_fit` refuses one that would not fit.

Each rank decodes the shards itself (the census has already counted them, with the same checks and in
the same order, so a changed shard is caught) and keeps its share: view ``v`` (image ``v // 2``,
mirrored when ``v`` is odd) belongs to rank ``v % world``. An epoch is a permutation of the share
drawn from ``(seed, epoch, rank)``, so a resumed run replays the same order and skips what it trained.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipelines.decoder_crops import ShardCensus, shard_samples
from pipelines.image_decode import DecodeLimits
from pipelines.storage import StorageOptions

VIEWS_PER_IMAGE = 2  # the centre crop and its mirror image
MAX_FIXED_VIEW_BYTES = 4 << 30  # per worker: the views' pixels and their latents


def fixed_view_bytes(images: int, crop: int, latent_numel: int) -> int:
    """What a worker holds for a run on fixed views at most (one worker holds them all): every view's
    uint8 pixels and its float32 latent."""
    return images * VIEWS_PER_IMAGE * (crop * crop * 3 + 4 * latent_numel)


def check_fixed_views_fit(images: int, crop: int, latent_numel: int, *, what: str,
                          limit: int = MAX_FIXED_VIEW_BYTES) -> None:
    """Refuse, before launch, a run on fixed views whose images and latents would not fit a worker."""
    needed = fixed_view_bytes(images, crop, latent_numel)
    if needed > limit:
        raise ValueError(f"{what}: {images} images as fixed views ({VIEWS_PER_IMAGE} per image, {crop} px, with "
                         f"their latents) need {needed / 2**30:.1f} GiB in each worker, over the "
                         f"{limit / 2**30:.1f} GiB allowed; train on random crops (crops: random), which stream")


class FixedViews:
    """The :data:`jobs.train.loop.BatchSource` of one rank on fixed views: ``(epoch, micro)`` -> that
    epoch's batches of exactly ``micro`` rows, ``image`` uint8 (micro, crop, crop, 3) and ``view``
    int64 (the view's index in the run, for its cached latent). The views are decoded on first use."""

    def __init__(self, facts: ShardCensus, *, crop: int, rank: int, world: int, seed: int,
                 limits: DecodeLimits = DecodeLimits(), storage_options: StorageOptions | None = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.facts, self.crop, self.rank, self.world, self.seed = facts, crop, rank, world, seed
        self.limits, self.storage_options = limits, storage_options
        self._views: np.ndarray | None = None
        self._indices: np.ndarray | None = None

    @property
    def num_views(self) -> int:
        """The run's views, on all ranks together: its rows."""
        return self.facts.rows * VIEWS_PER_IMAGE

    def share(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's views (uint8 (n, crop, crop, 3)) and their indices in the run."""
        if self._views is None:
            self._views, self._indices = self._decode_share()
        return self._views, self._indices

    def _decode_share(self) -> tuple[np.ndarray, np.ndarray]:
        images = []
        for shard in self.facts.shards:
            for sample in shard_samples(shard, resize=self.crop, limits=self.limits,
                                        num_classes=self.facts.num_classes, storage_options=self.storage_options):
                if not isinstance(sample, dict):  # (image, label); a rejection (a dict) was counted by the census
                    images.append(sample[0])
        if len(images) != self.facts.rows:
            raise RuntimeError(f"shards {self.facts.url}: {len(images)} usable images now, {self.facts.rows} when "
                               f"the run was planned; the shards changed under the run")
        indices = np.arange(self.rank, self.num_views, self.world, dtype=np.int64)
        views = np.empty((len(indices), self.crop, self.crop, 3), dtype=np.uint8)
        for row, view in enumerate(indices):
            image = images[view // VIEWS_PER_IMAGE]
            views[row] = image[:, ::-1] if view % VIEWS_PER_IMAGE else image
        return views, indices

    def __call__(self, epoch: int, micro: int) -> Iterator[dict[str, torch.Tensor]]:
        views, indices = self.share()
        order = np.random.default_rng([self.seed % 2**64, epoch, 2, self.rank]).permutation(len(indices))
        for start in range(0, len(order) - micro + 1, micro):
            picked = order[start:start + micro]
            yield {"image": torch.from_numpy(views[picked]), "view": torch.from_numpy(indices[picked])}
