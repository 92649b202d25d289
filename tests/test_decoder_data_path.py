"""The decoder run's data path without Ray: a shard streams out as blocks of crops (one resized
image held at a time, the first block out before the shard is decoded), the census counts what the
crops will hold, and the frozen encoder runs under inference mode with latents the decoder's
autograd can still use."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from builders import write_image_folder

from jobs.demo.photos import load_photo
from rae.image_tensors import to_unit_images
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


def _resized_images(info, size: int = RESIZE) -> dict[int, np.ndarray]:
    """The usable images of the shard in archive order, ADM-cropped to ``size`` (the crops' source)."""
    images = []
    with open(info.url.removeprefix("file://"), "rb") as handle:
        for sample in iter_tar_samples(handle):
            try:
                images.append(decode_image(image_member(sample.members)[1], size))
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


def _decoder_task(census=None, rows: int = 0, **fields):
    from jobs.train.decoder import DecoderRunConfig, DecoderTask, resolve_facts
    from jobs.train.loop import RunContext
    from jobs.train.parallelize import plan_batches

    config = DecoderRunConfig(encoder="dinov2-s-offline", encoder_input_size=56, decoder="tiny",
                              perceptual="efficientnet-lite0", discriminator="dinov2-s-offline", disc_input_size=56,
                              **fields)
    facts = dataclasses.replace(resolve_facts(config), rows=rows)
    task = DecoderTask(config, facts, census)
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


def _census(info, rows: int = 11):
    from pipelines.decoder_crops import ShardCensus

    return ShardCensus(url=info.url, shards=[info], rows=rows, rejected=[], num_classes=2)


def test_fixed_views_are_each_images_centre_crop_and_mirror_split_over_ranks_in_a_replayable_order(shard):
    from pipelines.decoder_views import FixedViews

    sources = _resized_images(shard, CROP)
    seen: dict[int, np.ndarray] = {}
    for rank in range(2):
        views = FixedViews(_census(shard), crop=CROP, rank=rank, world=2, seed=7)
        epoch0 = list(views(0, 1))
        assert [b["view"].tolist() for b in views(0, 1)] == [b["view"].tolist() for b in epoch0]  # a resume replays it
        assert [b["view"].tolist() for b in views(1, 1)] != [b["view"].tolist() for b in epoch0]  # a new epoch, a new order
        for batch in epoch0:
            [view] = batch["view"].tolist()
            assert view % 2 == rank and view not in seen
            seen[view] = batch["image"][0].numpy()
        assert [len(b["view"]) for b in views(0, 4)] == [4, 4, 4][:len(epoch0) // 4]  # whole micro-batches only
    assert sorted(seen) == list(range(22))  # every image's two views, each on one rank
    for view, image in seen.items():
        source = sources[view // 2]
        assert np.array_equal(image, source[:, ::-1] if view % 2 else source)


def test_fixed_views_refuse_shards_that_changed_since_the_run_was_planned(shard):
    from pipelines.decoder_views import FixedViews

    with pytest.raises(RuntimeError, match="11 usable images now, 12 when the run was planned"):
        next(FixedViews(_census(shard, rows=12), crop=CROP, rank=0, world=1, seed=0)(0, 2))


def test_a_run_on_fixed_views_too_large_for_a_worker_is_refused_with_the_way_out():
    from pipelines.decoder_views import check_fixed_views_fit

    check_fixed_views_fit(384, 64, 16 * 384, what="the demo")  # ~20 MB
    with pytest.raises(ValueError, match=r"ImageNet: 1281167 images .* train on random crops"):
        check_fixed_views_fit(1_281_167, 256, 256 * 768, what="ImageNet")


def test_a_fixed_views_latent_is_encoded_once_and_is_the_encoders(shard):
    from pipelines.decoder_views import FixedViews

    task = _decoder_task(_census(shard), rows=22, crops="center", crop=64, noise_tau=0.0)
    encoded: list[int] = []
    task.encoder.register_forward_pre_hook(lambda module, args: encoded.append(len(args[0])))
    source = FixedViews(_census(shard), crop=64, rank=0, world=1, seed=0)
    first = list(source(0, 2))[:2]
    task.train_step(first, 0, 1e-3)
    assert encoded == [2, 2]
    seen = {v for batch in first for v in batch["view"].tolist()}
    again = [first[0], next(b for b in source(1, 2) if not set(b["view"].tolist()) & seen)]
    task.train_step(again, 1, 1e-3)
    assert encoded == [2, 2, 2]  # only the views not seen before
    with torch.inference_mode():
        direct = task.encoder(to_unit_images(first[1]["image"]))
    assert torch.equal(task.view_latents(first[1]["view"], to_unit_images(first[1]["image"]), None), direct)


def test_a_decoder_run_with_unknown_crops_is_refused_before_anything_loads():
    from jobs.train.decoder import DecoderRunConfig, resolve_facts

    with pytest.raises(ValueError, match="crops='middle'; choose one of random, center"):
        resolve_facts(DecoderRunConfig(crops="middle"))
