"""The encode job on a local 2-CPU Ray cluster: shards -> latent store -> read back.

Encoder: the real offline DINOv2-S at 56 px (4x4 grid, 16 tokens x 384 channels), 64 px crops.
Latents are stored as float16, so stored values match the encoder applied directly within float16
rounding: |stored - direct| <= 1e-3 |direct| + 1e-4 (float16 has a relative step of 2**-11 ~ 4.9e-4).
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import ray
import torch
from builders import latent_manifest, synthetic_spec, write_image_folder, write_latent_store

from pipelines import latent_store
from pipelines.encode import EncodeConfig, encode_to_store
from pipelines.image_decode import decode_image
from pipelines.latent_store import MANIFEST, StoreMismatchError
from pipelines.shards import make_shards
from pipelines.store_check import verify_store
from pipelines.store_reader import latent_dataset, open_store, read_latents
from rae.encoders import load_encoder
from rae.latent_spec import STATS_FILE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
ENCODER, INPUT_SIZE, IMAGE_SIZE = "dinov2-s-offline", 56, 64
CLASSES = ("ant", "bee")


@pytest.fixture(scope="module")
def ray_env(s3) -> dict[str, str]:
    """The S3 server starts before Ray, so the workers inherit its endpoint."""
    return {}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_image_folder(tmp_path_factory.mktemp("images"), {
        c: {f"{c}_{i}.png": rng.integers(0, 255, (48 + 8 * i, 72 - 4 * i, 3), dtype=np.uint8) for i in range(5)}
        for c in CLASSES})


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("shards")
    make_shards(str(image_folder), str(dest), max_count=4, progress=False)  # 3 shards: 4 + 4 + 2 images
    return str(dest)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER, input_size=INPUT_SIZE)


def config(shards: str, store: str, **overrides) -> EncodeConfig:
    return EncodeConfig(**{"shards": shards, "store": store, "encoder": ENCODER, "encoder_input_size": INPUT_SIZE,
                           "flip": True, "batch_size": 3, "progress": False, **overrides})


@pytest.fixture(scope="module")
def file_store(shards, tmp_path_factory):
    store = f"file://{tmp_path_factory.mktemp('stores')}/file-store"
    result = encode_to_store(config(shards, store))
    assert result.encoded_shards == 3
    return store


@pytest.fixture(scope="module")
def direct(encoder, image_folder) -> dict[tuple[str, int], np.ndarray]:
    """The encoder applied directly (float32) to each image and its mirror image, by (key, view)."""
    keys = [f"{c}/{c}_{i}" for c in CLASSES for i in range(5)]
    crops = [decode_image((image_folder / f"{k}.png").read_bytes(), IMAGE_SIZE) for k in keys]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        views = encoder(x).numpy(), encoder(x.flip(-1)).numpy()
    return {(k, v): views[v][i] for i, k in enumerate(keys) for v in (0, 1)}


def test_store_holds_the_encoder_output_for_every_image(file_store, direct):
    data = read_latents(file_store)
    assert data["latent"].shape == (20, 16, 384) and data["latent"].dtype == np.float16
    assert sorted(zip(data["key"], data["view"])) == sorted(direct)
    for key, view, label, latent in zip(data["key"], data["view"], data["label"], data["latent"]):
        assert label == CLASSES.index(key.split("/")[0])
        want = direct[key, view]
        assert np.all(np.abs(latent.astype(np.float64) - want) <= 1e-3 * np.abs(want) + 1e-4), (key, view)


def test_manifest_records_encoder_preprocessing_shards_and_counts(file_store, encoder, shards):
    store = open_store(file_store)
    manifest = store.manifest
    assert manifest["status"] == "complete" and manifest["rows"] == 20 and manifest["images"] == 10
    assert manifest["latent_spec"] == encoder.latent_spec(stats=STATS_FILE).to_dict()
    assert manifest["latent_spec"]["weights_digest"] == encoder.weights_digest
    assert (manifest["latent_spec"]["grid"], manifest["latent_spec"]["channels"]) == (4, 384)
    assert manifest["latent_spec"]["image_size"] == IMAGE_SIZE and store.latent_shape == (16, 384)
    assert [s["size"] for s in manifest["shards"]] == [os.path.getsize(f"{shards}/{s['name']}")
                                                       for s in manifest["shards"]]
    assert manifest["rejected"] == 0 and manifest["classes"] == list(CLASSES)
    assert verify_store(file_store).problems == []


def test_stats_are_the_moments_of_the_stored_latents(file_store):
    stored = open_store(file_store).stats
    z = read_latents(file_store)["latent"].astype(np.float64)
    assert stored.count == 20
    np.testing.assert_allclose(stored.mean.numpy(), z.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stored.var.numpy(), z.var(0), rtol=1e-9, atol=1e-12)


def test_training_dataset_yields_normalized_latents_and_labels(file_store):
    store = open_store(file_store)
    raw = read_latents(file_store)
    expected = {(k, int(v)): store.stats.normalize(torch.from_numpy(z.astype(np.float32)))
                for k, v, z in zip(raw["key"], raw["view"], raw["latent"])}
    batches = list(latent_dataset(file_store).iter_torch_batches(batch_size=8))
    latents = torch.cat([b["latent"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert latents.shape == (20, 16, 384) and latents.dtype == torch.float32 and labels.dtype == torch.int64
    # over the whole store: mean 0, variance var / (var + eps) per position and channel
    torch.testing.assert_close(latents.double().mean(0), torch.zeros(16, 384, dtype=torch.float64), atol=1e-5, rtol=0)
    var = store.stats.var
    torch.testing.assert_close(latents.double().var(0, unbiased=False), var / (var + store.stats.eps), atol=1e-4, rtol=1e-4)
    assert all(any(torch.allclose(z, e, atol=1e-5) for e in expected.values()) for z in latents[:4])
    assert sorted(labels.tolist()) == sorted(raw["label"].tolist())


def test_training_dataset_reshuffles_part_order_every_epoch(tmp_path):
    manifest = latent_manifest(synthetic_spec(input_size=2, patch_size=1, grid=2, channels=3), parts=8,
                               preprocessing={"views": ["original"]})
    shard_of_row = np.repeat(np.arange(8), 2)  # one part per shard; its label is the shard index
    latents = np.broadcast_to(shard_of_row[:, None, None, None], (16, 1, 4, 3)).astype(np.float16)
    write_latent_store(str(tmp_path), manifest, latents, shard_of_row,
                       keys=[f"{index}/{row}" for index in range(8) for row in "ab"])
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # row order = file order, so only the shuffle changes it
    try:
        ds = latent_dataset(str(tmp_path), normalize=False, shuffle_seed=1)
        epochs = [[int(row["label"]) for row in ds.iter_rows()] for _ in range(2)]
    finally:
        context.execution_options.preserve_order = False
    in_order = [i for i in range(8) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == in_order
    assert epochs[0] != epochs[1] and in_order not in epochs


def test_training_dataset_can_keep_only_original_views(file_store):
    assert latent_dataset(file_store, views=(0,)).count() == 10


def test_rerun_on_a_complete_store_does_no_work(file_store, shards):
    root = fsspec.core.url_to_fs(file_store)[1]
    before = {p: os.path.getmtime(f"{root}/parts/{p}") for p in os.listdir(f"{root}/parts")}
    start = time.monotonic()
    result = encode_to_store(config(shards, file_store))
    assert result.encoded_shards == 0 and result.rows == 20
    assert {p: os.path.getmtime(f"{root}/parts/{p}") for p in os.listdir(f"{root}/parts")} == before
    assert time.monotonic() - start < 15


def test_cli_encode_flags_reach_the_job(file_store, shards, capsys):
    import argparse

    from jobs.cli.data import register

    parser = argparse.ArgumentParser(prog="rae")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["encode", "--shards", shards, "--store", file_store, "--encoder", ENCODER,
                              "--encoder-input-size", str(INPUT_SIZE), "--flip", "--no-progress"])
    assert args.func(args) == 0
    assert "already complete, nothing to do: 0/3 shards" in capsys.readouterr().out


def test_a_store_made_differently_is_refused_naming_the_difference(file_store, shards):
    with pytest.raises(StoreMismatchError, match=r"preprocessing\.views: store has \['original', 'hflip'\]"):
        encode_to_store(config(shards, file_store, flip=False))
    with pytest.raises(StoreMismatchError, match=r"latent_spec\.input_size: store has 56, this run asks for 42"):
        encode_to_store(config(shards, file_store, encoder_input_size=42))


def test_a_store_encoded_before_the_official_resize_is_refused(file_store, shards, tmp_path):
    """Stores made before the encoder resized as the official code (antialiased then) record no
    encoder_resize: encoding more into one would mix two preprocessings, so it is refused."""
    manifest = json.loads((Path(file_store.removeprefix("file://")) / MANIFEST).read_text())
    del manifest["preprocessing"]["encoder_resize"]
    old = tmp_path / "old-store"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match=r"preprocessing\.encoder_resize: store has None, this run asks "
                                                 r"for 'bicubic, align_corners=False, no antialiasing"):
        encode_to_store(config(shards, f"file://{old}"))


KILLED_JOB = """
import pathlib, sys, time
import ray
from pipelines.encode import EncodeConfig, LatentEncoder, encode_to_store

shards, store, progress, encoder, input_size = sys.argv[1:6]
progress = pathlib.Path(progress)


class DiesOnSecondShard(LatentEncoder):
    calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 2:  # die once the first shard is committed
            deadline = time.monotonic() + 60
            while not (progress.exists() and any(p.suffix == ".json" for p in progress.iterdir())):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            raise RuntimeError("injected failure")
        return super().__call__(batch)


ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
encode_to_store(EncodeConfig(shards=shards, store=store, encoder=encoder, encoder_input_size=int(input_size),
                             flip=True, batch_size=3, progress=False, num_actors=1), encoder_cls=DiesOnSecondShard)
"""


def test_killed_encode_resumes_to_the_same_store(file_store, shards, tmp_path):
    """The first job runs in a driver of its own (with its own Ray) that fails mid-way and exits, as a
    killed job would; the rerun here finishes the remaining shards."""
    store = f"file://{tmp_path}/killed"
    progress = tmp_path / "killed" / latent_store.PROGRESS_DIR
    killed = subprocess.run([sys.executable, "-c", KILLED_JOB, shards, store, str(progress), ENCODER, str(INPUT_SIZE)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "injected failure" in killed.stderr, killed.stderr[-2000:]
    done = len([p for p in progress.iterdir() if p.suffix == ".json"])
    assert 1 <= done < 3 and json.loads((tmp_path / "killed" / "manifest.json").read_text())["status"] == "in_progress"
    # what a writer killed inside storage.open_atomic leaves (Ctrl-C on the driver mid-commit)
    leftovers = [tmp_path / "killed" / "parts" / "00002-shard-000002.parquet.tmp-0123abcd",
                 progress / "00002-shard-000002.json.tmp-4567ef01"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")

    result = encode_to_store(config(shards, store))
    assert result.encoded_shards == 3 - done
    assert not any(path.exists() for path in leftovers)

    resumed, reference = read_latents(store), read_latents(file_store)
    order_a, order_b = np.lexsort((resumed["view"], resumed["key"])), np.lexsort((reference["view"], reference["key"]))
    for column in ("key", "view", "label", "latent"):
        np.testing.assert_array_equal(resumed[column][order_a], reference[column][order_b])
    a, b = open_store(store).stats, open_store(file_store).stats
    assert a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def test_memory_storage_runs_with_driver_side_io(image_folder, file_store):
    make_shards(str(image_folder), "memory://enc/shards", max_count=4, progress=False)
    result = encode_to_store(config("memory://enc/shards", "memory://enc/store"))
    assert result.rows == 20
    got, want = read_latents("memory://enc/store"), read_latents(file_store)
    np.testing.assert_array_equal(got["latent"][np.lexsort((got["view"], got["key"]))],
                                  want["latent"][np.lexsort((want["view"], want["key"]))])
    with pytest.raises(ValueError, match="memory:// store lives in this process only"):
        latent_dataset("memory://enc/store")


def test_s3_shards_and_store(image_folder, s3):
    make_shards(str(image_folder), "s3://rae-test/enc/shards", max_count=4, progress=False)
    result = encode_to_store(config("s3://rae-test/enc/shards", "s3://rae-test/enc/store", flip=False))
    assert (result.encoded_shards, result.rows) == (3, 10)
    assert verify_store("s3://rae-test/enc/store").problems == []
    assert sum(1 for _ in latent_dataset("s3://rae-test/enc/store").iter_rows()) == 10


def write_tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_inputs_are_recorded_and_the_job_finishes(tmp_path, image_folder):
    good = (image_folder / "ant" / "ant_0.png").read_bytes()
    (tmp_path / "sh").mkdir()
    write_tar(tmp_path / "sh" / "a.tar", [("ok.png", good), ("ok.cls", b"0"), ("bad.png", b"garbage"),
                                          ("bad.cls", b"0"), ("../up.png", good), ("nolabel.png", good)])
    write_tar(tmp_path / "sh" / "b.tar", [("b_ok.png", good), ("b_ok.cls", b"1"), ("b_cut.png", good)])
    with tarfile.open(tmp_path / "sh" / "b.tar") as tar:
        cut = tar.getmember("b_cut.png")
    whole = (tmp_path / "sh" / "b.tar").read_bytes()
    (tmp_path / "sh" / "b.tar").write_bytes(whole[: cut.offset_data + cut.size // 2])

    result = encode_to_store(config(str(tmp_path / "sh"), str(tmp_path / "store"), flip=False))

    assert (result.rows, result.rejected) == (2, 4)
    assert sorted(read_latents(str(tmp_path / "store"))["key"]) == ["b_ok", "ok"]
    lines = [json.loads(line) for line in (tmp_path / "store" / "rejected.jsonl").read_text().splitlines()]
    summary = sorted((r["shard"].rsplit("/", 1)[-1], r["key"], r["reason"].split(" (")[0].split(":")[0]) for r in lines)
    assert summary == [
        ("a.tar", "../up.png", "unsafe path '../up.png'"), ("a.tar", "bad", "not an image"),
        ("a.tar", "nolabel", "missing label"), ("b.tar", "b_cut", "truncated tar")]


def test_gpu_request_without_gpus_fails_fast_with_a_clear_message(shards, tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="need 1 GPU each but none started within 3s"):
        encode_to_store(config(shards, str(tmp_path / "gpu"), device="gpu", gpu_wait_s=3))
    assert time.monotonic() - start < 60


def test_a_key_repeated_in_another_shard_is_stored_once_and_rejected_with_its_shard(tmp_path, image_folder):
    ant, bee = ((image_folder / c / f"{c}_0.png").read_bytes() for c in CLASSES)
    (tmp_path / "sh").mkdir()
    write_tar(tmp_path / "sh" / "a.tar", [("x.png", ant), ("x.cls", b"0"), ("y.png", ant), ("y.cls", b"0")])
    write_tar(tmp_path / "sh" / "b.tar", [("z.png", bee), ("z.cls", b"1"), ("x.png", bee), ("x.cls", b"1")])

    result = encode_to_store(config(str(tmp_path / "sh"), str(tmp_path / "store")))

    assert (result.rows, result.rejected, result.manifest["images"]) == (6, 1, 3)
    data = read_latents(str(tmp_path / "store"))
    assert sorted(zip(data["key"], data["view"], data["label"])) == [
        ("x", 0, 0), ("x", 1, 0), ("y", 0, 0), ("y", 1, 0), ("z", 0, 1), ("z", 1, 1)]  # x from a.tar, label 0
    lines = [json.loads(line) for line in (tmp_path / "store" / "rejected.jsonl").read_text().splitlines()]
    assert lines == [{"shard": f"file://{tmp_path}/sh/b.tar", "key": "x",
                      "reason": f"duplicate key: already stored from shard file://{tmp_path}/sh/a.tar"}]
    assert verify_store(str(tmp_path / "store")).ok


def test_shards_without_a_class_file_encode_and_train_a_dit(tmp_path, image_folder):
    """Webdataset shards made elsewhere (.png/.jpg + .cls, no classes.json): the store records the
    label range it saw, and the DiT takes its largest label + 1 as its number of classes."""
    from builders import tiny_dit_config

    from jobs.train.dit import train_dit
    from jobs.train.export import export_url, load_exported_model

    images = [(image_folder / c / f"{c}_{i}.png").read_bytes() for c in CLASSES for i in range(5)]
    (tmp_path / "sh").mkdir()
    write_tar(tmp_path / "sh" / "only.tar", [member for i, data in enumerate(images) for member in
                                             ((f"img{i:02d}.png", data), (f"img{i:02d}.cls", str(3 + i % 2).encode()))])
    store = str(tmp_path / "store")
    manifest = encode_to_store(config(str(tmp_path / "sh"), store)).manifest
    assert (manifest["classes"], manifest["num_classes"]) == (None, None)
    assert manifest["labels"] == {"min": 3, "max": 4, "distinct": 2}

    runs = str(tmp_path / "runs")
    result = train_dit(tiny_dit_config(store, **{"loop.epochs": 1, "loop.checkpoint_every_steps": 1}),
                       run_name="no-classes", storage=runs, num_workers=1, max_failures=0)
    assert result.error is None and result.metrics["step"] == 1  # 20 rows, global batch 16
    _, exported = load_exported_model(export_url(runs, "no-classes"))
    assert exported["kwargs"]["num_classes"] == 5


def test_the_dits_classes_come_from_the_store_or_from_num_classes(tmp_path):
    from jobs.train.dit import DiTRunConfig, class_count

    labelled = {"num_classes": 1000, "labels": {"min": 0, "max": 999, "distinct": 1000}}
    unnamed = {"num_classes": None, "labels": {"min": 3, "max": 4, "distinct": 2}}
    assert class_count(labelled, None, "s") == 1000 and class_count(unnamed, None, "s") == 5
    assert class_count(unnamed, 10, "s") == 10 and class_count({"num_classes": None}, 7, "s") == 7
    with pytest.raises(ValueError, match=r"num_classes 4 is too small for store s: its labels go up to 4; "
                                         r"pass --num-classes 5 or more"):
        class_count(unnamed, 4, "s")
    with pytest.raises(ValueError, match=r"num_classes must be positive, got 0"):
        class_count({"num_classes": None}, 0, "s")
    with pytest.raises(ValueError, match=r"store old records neither class names nor its label range .* pass "
                                         r"--num-classes N"):
        class_count({"num_classes": None}, None, "old")
    assert DiTRunConfig().num_classes is None
