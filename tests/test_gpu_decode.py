"""The encode job's device-side JPEG decode (``--decode gpu``) against the CPU path it replaces.

What CPU can show, on scikit-image's real photographs:
- the device crop (PIL's fixed-point box/bicubic resampling done with torch gathers) equals the
  PIL crop bit for bit: max pixel difference 0, for odd and even sizes, portrait and landscape, with
  and without box halvings;
- torchvision's CPU JPEG decoder (libjpeg-turbo, as PIL's) gives PIL's pixels, so the whole device
  path run on CPU gives the CPU path's crops exactly (max difference 0) and the encoder's latents
  bit for bit;
- a mixed shard (RGB, progressive and grayscale JPEGs, CMYK, PNG, a JPEG with bytes after its end,
  a truncated one, a broken Huffman table, a tiny image, garbage, a missing label) gives the same
  rows, labels and rejections, in the same order, as the CPU path, through the actor called
  directly and through a Ray encode whose actors hold a (logical) GPU.
With CUDA (skipped here): the crop is the same integer arithmetic on the GPU (difference 0), and
nvJPEG's pixels differ from libjpeg-turbo's (IDCT, chroma upsampling): bounded below, unmeasured
on this machine (benchmarks/bench_encode_gpu.py records the measured difference).
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from jobs.demo.photos import load_photo
from pipelines import gpu_decode
from pipelines.encode import EncodeConfig, decodes_on_actors, encode_to_store
from pipelines.encoder_actor import LatentEncoder
from pipelines.gpu_decode import DeviceCropper, JpegCropper, crop_split_shard
from pipelines.image_decode import center_crop_arr, decode_image, decode_shard, decode_shard_batch
from pipelines.shard_jpegs import split_shard, split_shard_batch
from pipelines.shards import ShardInfo
from pipelines.store_reader import read_latents
from rae.encoders import load_encoder

ENCODER, INPUT, IMAGE_SIZE = "dinov2-s-offline", 56, 64
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def jpeg(array: np.ndarray, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def broken_huffman(data: bytes) -> bytes:
    """A JPEG whose header reads (PIL opens it) but whose Huffman table is invalid: both decoders refuse it."""
    start = data.index(b"\xff\xc4")
    return data[:start + 5] + b"\xff" * 16 + data[start + 21:]


def mixed_samples() -> list[tuple[str, str, bytes, int | None]]:
    """(key, extension, bytes, label) in archive order: every way an image goes in ``split_shard``."""
    chelsea, rocket, coffee = load_photo("chelsea"), load_photo("rocket"), load_photo("coffee")
    good = jpeg(chelsea[:120, :170])
    return [
        ("a/rgb", "jpg", good, 0),
        ("a/progressive", "jpg", jpeg(rocket[100:260, 50:171], progressive=True), 1),
        ("a/gray", "jpg", jpeg(coffee[:97, :131], "L"), 0),
        ("a/cmyk", "jpg", jpeg(chelsea[50:150, 100:230], "CMYK"), 1),
        ("a/png", "png", png(coffee[100:190, 200:333]), 0),
        ("a/truncated", "jpg", good[: len(good) // 2], 1),
        ("a/tiny", "jpg", jpeg(chelsea[:10, :10]), 0),
        ("a/broken-huffman", "jpg", broken_huffman(good), 1),
        ("a/no-label", "jpg", good, None),
        ("a/trailing-bytes", "jpg", jpeg(rocket[:100, :140]) + b"camera maker notes", 0),
        ("a/garbage", "jpg", b"not an image at all" * 20, 1),
        ("a/rgb-same-size", "jpg", jpeg(chelsea[150:270, 200:370]), 1),
    ]


def tar_shard(samples: list[tuple[str, str, bytes, int | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for key, extension, data, label in samples:
            members = [(f"{key}.{extension}", data)] + ([(f"{key}.cls", str(label).encode())] if label is not None else [])
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


@pytest.fixture(scope="module")
def shard_data() -> bytes:
    return tar_shard(mixed_samples())


@pytest.fixture(scope="module")
def shard(shard_data) -> ShardInfo:
    return ShardInfo("memory://gpu-decode/shard-000000.tar", "shard-000000", len(shard_data))


@pytest.fixture(scope="module")
def digest() -> str:
    return load_encoder(ENCODER, input_size=INPUT).weights_digest


def shard_row(shard: ShardInfo, data: bytes) -> dict[str, np.ndarray]:
    return {"shard_index": np.array([0]), "shard_url": np.array([shard.url]), "shard_name": np.array([shard.name]),
            "shard_size": np.array([shard.size]), "shard_bytes": np.array([data], dtype=object)}


STAGE_KWARGS = {"image_size": IMAGE_SIZE, "limits": EncodeConfig("s", "t").limits, "num_classes": 2,
                "storage_options": None}


# ---------------------------------------------------------------- the crop


@pytest.mark.parametrize("name", ["chelsea", "rocket", "astronaut"])
def test_device_crop_is_the_pil_crop_bit_for_bit(name):
    """Max pixel difference 0 with ``center_crop_arr``: cuts of odd and even sizes, portrait and
    landscape, targets that need 0 to 3 box halvings, upscaling (17 px cut to 33) included."""
    photo = load_photo(name)
    halvings = set()
    for height, width in [(None, None), (299, 451), (227, 341), (17, 25)]:
        for portrait in (False, True):
            cut = photo.transpose(1, 0, 2) if portrait else photo
            cut = np.ascontiguousarray(cut[:height, :width])
            for size in (17, 33, 64, 127):
                expected = center_crop_arr(Image.fromarray(cut), size)
                got = DeviceCropper(size, CPU)(torch.from_numpy(cut).permute(2, 0, 1)[None])
                assert got.shape == (1, size, size, 3) and got.dtype == torch.uint8
                np.testing.assert_array_equal(got[0].numpy(), expected, err_msg=f"{name} {cut.shape} -> {size}")
                steps = 0
                while min(cut.shape[:2]) >= 2 ** (steps + 1) * size:
                    steps += 1
                halvings.add(steps)
    assert halvings >= {0, 1, 2}


def test_device_crop_of_a_batch_is_each_images_crop():
    photo = load_photo("coffee")
    batch = np.stack([photo[:150, :200], photo[100:250, 300:500], photo[-150:, -200:]])
    crops = DeviceCropper(64, CPU)(torch.from_numpy(batch).permute(0, 3, 1, 2))
    for crop, image in zip(crops, batch):
        np.testing.assert_array_equal(crop.numpy(), center_crop_arr(Image.fromarray(image), 64))


# ---------------------------------------------------------------- decode + crop


@pytest.mark.parametrize("kind", ["420", "444", "progressive", "gray"])
def test_jpeg_photos_decoded_on_the_device_path_equal_the_cpu_path(kind):
    """torchvision's CPU decoder is libjpeg-turbo, as PIL's: with the exact crop, max difference 0."""
    options = {"420": {}, "444": {"subsampling": 0}, "progressive": {"progressive": True}, "gray": {}}[kind]
    photos = [jpeg(load_photo(name), "L" if kind == "gray" else "RGB", **options) for name in ("chelsea", "astronaut")]
    sizes = [Image.open(io.BytesIO(p)).size for p in photos]
    for size in (64, 256):
        for got, data in zip(JpegCropper(size, CPU)(photos, sizes), photos):
            np.testing.assert_array_equal(got.numpy(), decode_image(data, size))


def test_an_image_the_device_decoder_refuses_is_cropped_or_rejected_by_the_cpu_path(monkeypatch):
    samples = {key: data for key, _, data, _ in mixed_samples()}
    jpegs = [samples["a/rgb"], samples["a/gray"], samples["a/broken-huffman"]]
    refused = samples["a/gray"]
    real = JpegCropper._decode

    def refusing(self, chunk):
        decoded = real(self, [j for j in chunk if j != refused])
        return [None if j == refused else decoded.pop(0) for j in chunk]

    monkeypatch.setattr(JpegCropper, "_decode", refusing)
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    rgb, gray, broken = JpegCropper(IMAGE_SIZE, CPU)(jpegs, sizes)
    np.testing.assert_array_equal(rgb.numpy(), decode_image(jpegs[0], IMAGE_SIZE))
    np.testing.assert_array_equal(gray.numpy(), decode_image(refused, IMAGE_SIZE))
    assert isinstance(broken, gpu_decode.RejectedImage)
    assert str(broken) == "corrupt or truncated image: broken data stream when reading image file"


def test_decode_calls_are_bounded_in_images_and_pixels(monkeypatch):
    monkeypatch.setattr(gpu_decode, "DECODE_IMAGES", 3)
    monkeypatch.setattr(gpu_decode, "DECODE_PIXELS", 100)
    assert gpu_decode._chunks([10, 10, 10, 10, 50, 60, 200, 5]) == [[0, 1, 2], [3, 4], [5], [6], [7]]


# ---------------------------------------------------------------- a mixed shard


def test_split_sends_device_decodable_jpegs_as_bytes_and_the_rest_through_the_cpu_path(shard, shard_data):
    split = split_shard(shard, image_size=IMAGE_SIZE, num_classes=2, data=shard_data)
    routes = {key: "cpu" if span is None else "device" for key, span in zip(split.keys, split.jpegs)}
    assert routes == {"a/rgb": "device", "a/progressive": "device", "a/gray": "device", "a/cmyk": "cpu",
                      "a/png": "cpu", "a/broken-huffman": "device", "a/trailing-bytes": "cpu",
                      "a/rgb-same-size": "device"}
    assert split.crops.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    reasons = {r["key"]: r["reason"] for r in split.rejected}
    assert reasons["a/truncated"].startswith("corrupt or truncated image: image file is truncated")
    assert reasons["a/tiny"] == "image too small: 10x10 (shorter side below 16)"
    assert reasons["a/garbage"] == "not an image (unrecognised data)"
    assert reasons["a/no-label"] == "missing label (no .cls member)"
    assert sorted(split.positions + split.rejected_at) == list(range(12))


def test_actor_given_jpeg_bytes_gives_the_cpu_paths_rows_rejections_and_latents(shard, shard_data, digest):
    """The actor called directly on the two stages' rows of one mixed shard."""
    row = shard_row(shard, shard_data)
    actor = LatentEncoder(ENCODER, None, INPUT, True, "float16", 3, digest)
    on_device = actor(split_shard_batch(row, **STAGE_KWARGS))
    on_cpu = actor(decode_shard_batch(row, **STAGE_KWARGS))
    device_meta, cpu_meta = json.loads(on_device["meta"][0]), json.loads(on_cpu["meta"][0])
    expected = decode_shard(shard, image_size=IMAGE_SIZE, num_classes=2, data=shard_data)
    assert device_meta["keys"] == cpu_meta["keys"] == expected.keys
    assert len(expected.keys) == 7 and len(expected.rejected) == 5
    assert device_meta["labels"] == cpu_meta["labels"]
    assert device_meta["rejected"] == cpu_meta["rejected"] == expected.rejected  # same records, same order
    assert device_meta["encoded_on"]["jpeg_decode"] == "cpu" and "jpeg_decode" not in cpu_meta["encoded_on"]
    np.testing.assert_array_equal(on_device["latents"], on_cpu["latents"])


def test_a_shard_with_no_usable_image_gives_no_rows(digest):
    data = tar_shard([("a/garbage", "jpg", b"garbage" * 10, 0), ("a/tiny", "png", png(np.zeros((8, 8, 3), np.uint8)), 1)])
    shard = ShardInfo("memory://gpu-decode/empty.tar", "empty", len(data))
    split = split_shard_batch(shard_row(shard, data), **STAGE_KWARGS)
    images, meta = crop_split_shard(json.loads(split["meta"][0]), split["images"][0], split["jpegs"][0],
                                    JpegCropper(IMAGE_SIZE, CPU))
    assert images.shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3) and meta["keys"] == [] and len(meta["rejected"]) == 2
    out = LatentEncoder(ENCODER, None, INPUT, False, "float16", 3, digest)(split)
    assert out["latents"].shape == (1, 0, 1, 16, 384)


# ---------------------------------------------------------------- the option


def test_decode_option_rules():
    assert decodes_on_actors("auto", gpu_actors=True) and not decodes_on_actors("auto", gpu_actors=False)
    assert decodes_on_actors("gpu", gpu_actors=True) and not decodes_on_actors("cpu", gpu_actors=True)
    with pytest.raises(ValueError, match="--decode gpu, but the encoder actors run on CPU"):
        decodes_on_actors("gpu", gpu_actors=False)
    with pytest.raises(ValueError, match="--device cpu gives them none: pass --decode cpu"):
        EncodeConfig("s", "t", device="cpu", decode="gpu")
    with pytest.raises(ValueError, match="decode must be one of auto, cpu, gpu; got 'nvjpeg'"):
        EncodeConfig("s", "t", decode="nvjpeg")


# ---------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_crop_is_the_cpu_crop():
    images = torch.from_numpy(np.ascontiguousarray(load_photo("rocket")[:301, :451])).permute(2, 0, 1)[None]
    for size in (64, 256):
        np.testing.assert_array_equal(DeviceCropper(size, torch.device("cuda"))(images.cuda()).cpu().numpy(),
                                      DeviceCropper(size, CPU)(images).numpy())


@needs_cuda
def test_nvjpeg_crops_are_close_to_the_cpu_paths():
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's. Bounds set before any
    measurement (no GPU was lent when this was written): mean |difference| <= 1 level, max <= 32."""
    assert gpu_decode.nvjpeg_problem() is None
    photos = [jpeg(load_photo(name)) for name in ("chelsea", "astronaut", "coffee", "rocket")]
    sizes = [Image.open(io.BytesIO(p)).size for p in photos]
    for got, data in zip(JpegCropper(256, torch.device("cuda"))(photos, sizes), photos):
        difference = np.abs(got.cpu().numpy().astype(int) - decode_image(data, 256).astype(int))
        assert difference.mean() <= 1.0 and difference.max() <= 32


@needs_cuda
def test_cuda_actor_given_jpeg_bytes_keeps_the_cpu_paths_rows_and_rejections(shard, shard_data, digest):
    row = shard_row(shard, shard_data)
    actor = LatentEncoder(ENCODER, None, INPUT, False, "float32", 3, digest)
    on_device, on_cpu = actor(split_shard_batch(row, **STAGE_KWARGS)), actor(decode_shard_batch(row, **STAGE_KWARGS))
    device_meta, cpu_meta = json.loads(on_device["meta"][0]), json.loads(on_cpu["meta"][0])
    assert device_meta["encoded_on"]["jpeg_decode"] == "cuda"
    assert (device_meta["keys"], device_meta["rejected"]) == (cpu_meta["keys"], cpu_meta["rejected"])
    a, b = on_device["latents"][0].astype(np.float64), on_cpu["latents"][0].astype(np.float64)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.98  # per token; bf16 autocast and nvJPEG's pixels both move the latents


# ---------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def gpu_labelled_ray():
    """A 2-CPU local Ray with one logical GPU: the encoder actors hold a GPU without CUDA, so the
    job picks the device decode (auto on GPU actors) and the actors run it on their CPU."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=200 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.slow
def test_encode_on_gpu_actors_decodes_jpegs_there_with_the_cpu_paths_rows(gpu_labelled_ray, shard_data, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(shard_data)
    store = f"file://{tmp_path}/store"
    result = encode_to_store(EncodeConfig(str(folder), store, encoder=ENCODER, encoder_input_size=INPUT,
                                          batch_size=3, num_actors=1, progress=False, gpu_wait_s=120))
    shard = ShardInfo(f"file://{folder}/shard-000000.tar", "shard-000000", len(shard_data))
    expected = decode_shard(shard, image_size=IMAGE_SIZE, num_classes=None, data=shard_data)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert [p["encoded_on"]["jpeg_decode"] for p in manifest["parts"]] == ["cpu"]
    assert result.rows == len(expected.keys) == 7 and result.rejected == len(expected.rejected) == 5
    rejected = [json.loads(line) for line in (tmp_path / "store" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejected] == [(r["key"], r["reason"]) for r in expected.rejected]
    stored = read_latents(store)
    assert list(stored["key"]) == expected.keys
    encoder = load_encoder(ENCODER, input_size=INPUT)
    with torch.inference_mode():
        direct = encoder(torch.from_numpy(expected.images).permute(0, 3, 1, 2).float() / 255).numpy()
    latents = np.stack(list(stored["latent"])).astype(np.float64).reshape(direct.shape)
    assert np.all(np.abs(latents - direct) <= 1e-3 * np.abs(direct) + 1e-4)  # float16 rounding of the same crops
