"""The decoder run's data path without Ray: a shard streams out as blocks of crops (one resized
image held at a time, the first block out before the shard is decoded), the census counts what the
crops will hold, and the frozen encoder runs under inference mode with latents the decoder's
autograd can still use."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import write_image_folder

from jobs.demo.photos import load_photo
from pipelines.decoder_crops import count_batch, decode_crop_batch
from pipelines.image_decode import DecodeLimits, RejectedImage, decode_image
from pipelines.shards import image_member, iter_tar_samples, list_shards, make_shards

RESIZE, CROP = 48, 32


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """One shard: 11 photo crops of varied sizes in two classes, and a corrupt PNG."""
    rng = np.random.default_rng(0)
    photo = load_photo("astronaut")
    files: dict[str, dict[str, np.ndarray]] = {"a": {}, "b": {}}
    for i in range(11):
        h, w = rng.integers(50, 90, size=2)
        top, left = rng.integers(0, 400, size=2)
        files["ab"[i % 2]][f"img{i}.jpg"] = np.ascontiguousarray(photo[top:top + h, left:left + w])
    root = write_image_folder(tmp_path_factory.mktemp("photos"), files)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dest = str(tmp_path_factory.mktemp("shards") / "train")
    make_shards(str(root), dest, max_count=100, progress=False)
    [info] = list_shards(dest)
    return info


def _row(info) -> dict[str, np.ndarray]:
    return {"shard_index": np.array([0]), "shard_url": np.array([info.url]), "shard_name": np.array([info.name]),
            "shard_size": np.array([info.size])}


def _resized_images(info) -> dict[int, np.ndarray]:
    """The usable images of the shard in archive order, resized as the crops' source."""
    images = []
    with open(info.url.removeprefix("file://"), "rb") as handle:
        for sample in iter_tar_samples(handle):
            try:
                images.append(decode_image(image_member(sample.members)[1], RESIZE))
            except RejectedImage:
                continue
    return dict(enumerate(images))


def _is_window(image: np.ndarray, crop: np.ndarray) -> bool:
    size = crop.shape[0]
    return any(np.array_equal(image[t:t + size, x:x + size], crop)
               for t in range(image.shape[0] - size + 1) for x in range(image.shape[1] - size + 1))


def test_a_shard_streams_out_as_blocks_of_crops(shard):
    blocks = decode_crop_batch(_row(shard), resize=RESIZE, crop=CROP, limits=DecodeLimits(), num_classes=2,
                               storage_options=None, block_rows=4)
    first = next(blocks)  # a generator: the first block leaves before the rest of the shard is decoded
    rest = list(blocks)
    assert [len(b["image"]) for b in [first, *rest]] == [4, 4, 3]
    images = np.concatenate([b["image"] for b in [first, *rest]])
    labels = np.concatenate([b["label"] for b in [first, *rest]])
    assert images.dtype == np.uint8 and images.shape == (11, CROP, CROP, 3)
    assert labels.dtype == np.int64 and set(labels.tolist()) == {0, 1}
    sources = _resized_images(shard)
    assert all(_is_window(sources[i], crop) for i, crop in enumerate(images))


def test_the_census_counts_the_rows_the_crops_hold(shard):
    counted = count_batch(_row(shard), resize=RESIZE, limits=DecodeLimits(), num_classes=2, storage_options=None)
    crops = decode_crop_batch(_row(shard), resize=RESIZE, crop=CROP, limits=DecodeLimits(), num_classes=2,
                              storage_options=None)
    assert int(counted["rows"][0]) == sum(len(b["image"]) for b in crops) == 11
    [rejected] = json.loads(counted["rejected"][0])
    assert rejected["key"] == "b/broken" and "not an image" in rejected["reason"]


def _decoder_task(**fields):
    from jobs.train.decoder import DecoderRunConfig, DecoderTask, resolve_facts
    from jobs.train.loop import RunContext
    from jobs.train.parallelize import plan_batches

    config = DecoderRunConfig(encoder="dinov2-s-offline", encoder_input_size=56, decoder="tiny",
                              perceptual="efficientnet-lite0", discriminator="dinov2-s-offline", disc_input_size=56,
                              **fields)
    task = DecoderTask(config, resolve_facts(config))
    task.setup(RunContext(rank=0, world=1, device=torch.device("cpu"), plan=plan_batches(4, 1, 2), steps_per_epoch=16))
    return task


def test_the_frozen_encoder_runs_under_inference_mode_and_its_latents_train_the_decoder():
    task = _decoder_task(noise_tau=0.0)  # no noise: the decoder's first layer saves the latents themselves
    modes: list[bool] = []
    task.encoder.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    before = task.decoder.in_proj.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)} for _ in range(2)]
    metrics = task.train_step(batches, 0, 1e-3)
    assert modes == [True, True]
    assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss"])
    assert not torch.equal(task.decoder.in_proj.weight, before)


@pytest.mark.parametrize("num_classes", [2, 1])  # 1: class b's labels are out of range, rejected before decode
def test_the_crops_source_holds_the_encode_paths_images_and_rejections_in_order(shard, num_classes):
    from pipelines.decoder_crops import shard_samples
    from pipelines.image_decode import decode_shard

    samples = list(shard_samples(shard, resize=RESIZE, limits=DecodeLimits(), num_classes=num_classes,
                                 storage_options=None))
    decoded = decode_shard(shard, image_size=RESIZE, num_classes=num_classes)
    kept = [s for s in samples if not isinstance(s, dict)]
    assert [label for _, label in kept] == decoded.labels
    assert np.array_equal(np.stack([image for image, _ in kept]), decoded.images)
    assert [s for s in samples if isinstance(s, dict)] == decoded.rejected
    assert len(decoded.rejected) == (1 if num_classes == 2 else 6)
