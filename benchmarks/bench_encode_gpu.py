"""The encode job's GPU side, on one CUDA machine without Ray: DINOv2-B/14-reg4 at 224 px through the
encode job's own actor class (``pipelines.encoder_actor.LatentEncoder``: 256 px uint8 crops on the host in,
bf16 autocast, float16 latents back on the host), images/s by batch size, against the bare encoder
forward on inputs already on the GPU; GPU utilisation while the actor runs; and the CPU side it
needs: decode + ADM crop of real JPEG photo crops per core and over every core of the machine, so
the cores one GPU needs follow from measurements on the same machine.

``--decode gpu`` (JPEGs decoded by nvJPEG and cropped in the actor): the CPU stage it leaves
(``split_shard``: tar + headers) against the CPU decode (``decode_shard``), per core, alternated in
one run on every machine; with CUDA, the device decode + crop alone, the actor end to end on JPEG
bytes with the CPU time its process used, and the crops' pixel difference from the PIL path.

Weights are random (written to a file and loaded the way ``--encoder-weights PATH`` is): the speed is the
same as the hub weights', which cannot be fetched offline.

    python -m benchmarks.bench_encode_gpu [--quick] [--budget-s SECONDS]
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Recorder, alternate, cuda_unavailable_reason, parse_args, write_photo_crops
from pipelines.encoder_actor import LatentEncoder
from pipelines.gpu_decode import JpegCropper
from pipelines.image_decode import DecodeLimits, decode_image, decode_shard, decode_shard_batch
from pipelines.shard_jpegs import split_shard, split_shard_batch
from pipelines.shards import ShardInfo
from rae.encoders import load_encoder, state_dict_digest

ENCODER = "dinov2-b-reg4"
IMAGE_SIZE = 256  # the ADM crop the shards are decoded to; the encoder resizes to its 224 input


class UtilisationSampler:
    """Mean and samples of ``torch.cuda.utilization()`` (NVML: % of time a kernel ran) while active."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # NVML missing: no samples, reported as None
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "UtilisationSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def write_random_weights(path: Path) -> str:
    """Random DINOv2-B trunk weights as a file the actor loads like real ones; returns their digest."""
    from safetensors.torch import save_file

    encoder = load_encoder(ENCODER, random_init=True)
    save_file({k: v.contiguous() for k, v in encoder.trunk.state_dict().items()}, str(path))
    return state_dict_digest(encoder.trunk)


def actor_sweep(weights: Path, digest: str, batches: list[int], shard_images: int, repeats: int) -> dict:
    """The actor's ``encode`` on a shard of ``shard_images`` uint8 crops, per actor batch size."""
    size = IMAGE_SIZE
    images = np.random.default_rng(0).integers(0, 256, (shard_images, size, size, 3), dtype=np.uint8)
    rows = {}
    for batch in batches:
        actor = LatentEncoder(ENCODER, str(weights), None, False, "float16", batch, digest)
        actor.encode(images[: 2 * batch])  # warm-up: cuDNN/cuBLAS choices, allocator
        torch.cuda.synchronize()
        with UtilisationSampler() as utilisation:
            start = time.perf_counter()
            for _ in range(repeats):
                latents = actor.encode(images)
            elapsed = time.perf_counter() - start
        assert latents.shape == (shard_images, 1, 256, 768) and latents.dtype == np.float16
        rows[batch] = {"images_per_s": shard_images * repeats / elapsed, "gpu_utilisation_pct": utilisation.mean}
        del actor
        torch.cuda.empty_cache()
    return rows


def forward_sweep(batches: list[int], steps: int) -> dict:
    """The bare encoder forward at bf16 on inputs already on the GPU: the ceiling the actor approaches."""
    encoder = load_encoder(ENCODER, random_init=True, device="cuda")
    rows = {}
    for batch in batches:
        x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(2):
                encoder(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                encoder(x)
            torch.cuda.synchronize()
        rows[batch] = batch * steps / (time.perf_counter() - start)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        encoder(torch.rand(max(batches), 3, IMAGE_SIZE, IMAGE_SIZE, device="cuda"))
    return {"images_per_s_by_batch": rows,
            "peak_memory_gib_at_largest_batch": torch.cuda.max_memory_allocated() / 2**30}


def _decode_all(paths: list[str]) -> int:
    for path in paths:
        decode_image(Path(path).read_bytes(), IMAGE_SIZE)
    return len(paths)


def decode_rates(count: int) -> dict:
    """Decode + ADM crop to 256 px of real JPEG photo crops: one core, and one process per core."""
    with tempfile.TemporaryDirectory(prefix="rae-bench-decode-") as tmp:
        root = write_photo_crops(Path(tmp), count, min_side=256, max_side=640)
        paths = sorted(str(p) for p in root.rglob("*.jpg"))
        _decode_all(paths[:8])
        start = time.perf_counter()
        _decode_all(paths)
        one = len(paths) / (time.perf_counter() - start)
        cores = len(os.sched_getaffinity(0))
        chunks = [paths[i::cores] for i in range(cores)]
        with multiprocessing.get_context("fork").Pool(cores) as pool:
            pool.map(_decode_all, [c[:4] for c in chunks])
            start = time.perf_counter()
            done = sum(pool.map(_decode_all, chunks))
            every = done / (time.perf_counter() - start)
    return {"images": count, "jpeg_sides_px": [256, 640], "images_per_s_1_core": one,
            "cores": cores, "images_per_s_all_cores": every}


def photo_shard(root: Path, count: int) -> tuple[ShardInfo, bytes, list[bytes]]:
    """A tar shard of ``count`` real JPEG photo crops (256..640 px sides) in memory, and the JPEGs."""
    folder = write_photo_crops(root, count, min_side=256, max_side=640)
    jpegs = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i, data in enumerate(jpegs):
            for name, payload in ((f"img{i:05d}.jpg", data), (f"img{i:05d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = out.getvalue()
    return ShardInfo("memory://bench/shard-000000.tar", "shard-000000", len(data)), data, jpegs


def cpu_stage_rates(shard: ShardInfo, data: bytes, repeats: int) -> dict:
    """One core's images/s for the CPU stage of each decode option, alternated (A B A B ...)."""
    def rate(stage) -> float:
        start = time.perf_counter()
        count = len(stage(shard, image_size=IMAGE_SIZE, data=data).keys)
        return count / (time.perf_counter() - start)

    rates = alternate({"decode_cpu": lambda: rate(decode_shard), "decode_gpu_split": lambda: rate(split_shard)}, repeats)
    return {**rates, "split_over_decode": rates["decode_gpu_split"]["median"] / rates["decode_cpu"]["median"]}


def pixel_difference(jpegs: list[bytes], device: str) -> dict:
    """The device path's crops against the PIL path's, in levels of 0..255."""
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    crops = JpegCropper(IMAGE_SIZE, torch.device(device))(jpegs, sizes)
    diffs = np.stack([np.abs(c.cpu().numpy().astype(int) - decode_image(j, IMAGE_SIZE).astype(int))
                      for c, j in zip(crops, jpegs)])
    return {"device": device, "images": len(jpegs), "max": int(diffs.max()), "mean": float(diffs.mean()),
            "share_of_pixels_differing": float((diffs > 0).mean())}


def gpu_decode_rates(jpegs: list[bytes], repeats: int) -> dict:
    """Device decode + crop alone (nvJPEG, then the crop kernels), images/s."""
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    cropper = JpegCropper(IMAGE_SIZE, torch.device("cuda"))
    cropper(jpegs[:8], sizes[:8])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        cropper(jpegs, sizes)
    torch.cuda.synchronize()
    return {"images": len(jpegs), "images_per_s": len(jpegs) * repeats / (time.perf_counter() - start)}


def actor_decode_variants(weights: Path, digest: str, shard: ShardInfo, data: bytes, batch: int, repeats: int) -> dict:
    """The actor end to end on one shard's row: JPEG bytes (decoded on the GPU) against CPU-decoded
    crops, alternated; with the CPU seconds its process used per image (the cores it needs)."""
    row = {"shard_index": np.array([0]), "shard_url": np.array([shard.url]), "shard_name": np.array([shard.name]),
           "shard_size": np.array([shard.size]), "shard_bytes": np.array([data], dtype=object)}
    kwargs = {"image_size": IMAGE_SIZE, "limits": DecodeLimits(), "num_classes": None, "storage_options": None}
    rows = {"gpu": split_shard_batch(row, **kwargs), "cpu": decode_shard_batch(row, **kwargs)}
    images = len(json.loads(rows["cpu"]["meta"][0])["keys"])
    actor = LatentEncoder(ENCODER, str(weights), None, False, "float16", batch, digest)
    cpu_seconds = {"gpu": [], "cpu": []}

    def run(kind: str) -> float:
        actor(rows[kind])  # warm
        torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        actor(rows[kind])
        elapsed = time.perf_counter() - start
        cpu_seconds[kind].append((time.process_time() - cpu_start) / images)
        return images / elapsed

    rates = alternate({"gpu": lambda: run("gpu"), "cpu": lambda: run("cpu")}, repeats)
    return {"batch": batch, "images": images, "images_per_s_jpeg_bytes": rates["gpu"],
            "images_per_s_host_crops": rates["cpu"],
            "actor_cpu_s_per_image": {k: float(np.median(v)) for k, v in cpu_seconds.items()}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, budget=True)
    quick = args.quick
    config = {"encoder": ENCODER, "input_size": 224, "crop_px": IMAGE_SIZE, "latent_dtype": "float16", "weights": "random, from a file",
              "batches": [16, 32] if quick else [64, 128, 256, 512, 1024],
              "shard_images": 64 if quick else 2048, "repeats": 1 if quick else 3,
              "forward_steps": 2 if quick else 20, "decode_images": 16 if quick else 384,
              "split_repeats": 3 if quick else 5, "budget_s": args.budget_s}
    rec = Recorder("encode_gpu", args, config)
    rec.add("decode", decode_rates(config["decode_images"]))
    with tempfile.TemporaryDirectory(prefix="rae-bench-shard-") as tmp:
        shard, shard_data, jpegs = photo_shard(Path(tmp), config["decode_images"])
    rec.add("decode_gpu_cpu_stage", cpu_stage_rates(shard, shard_data, config["split_repeats"]))
    rec.add("decode_gpu_pixel_difference_cpu_device", pixel_difference(jpegs[:4], "cpu"))
    reason = cuda_unavailable_reason()
    if reason:
        for key in ("actor", "forward", "bottleneck", "decode_gpu_pixel_difference", "decode_gpu_device",
                    "actor_decode_gpu", "decode_gpu_bottleneck"):
            rec.skip(key, reason)
        rec.write()
        return
    rec.add("decode_gpu_pixel_difference", pixel_difference(jpegs, "cuda"))
    rec.add("decode_gpu_device", gpu_decode_rates(jpegs, config["repeats"]))
    rec.write()
    forward = forward_sweep(config["batches"], config["forward_steps"])
    rec.add("forward", forward)
    rec.write()
    with tempfile.TemporaryDirectory(prefix="rae-bench-encoder-") as tmp:
        weights = Path(tmp) / "dinov2_b_reg4_random.safetensors"
        digest = write_random_weights(weights)
        actor = actor_sweep(weights, digest, config["batches"], config["shard_images"], config["repeats"])
        rec.add("actor", actor)
        best = max(actor, key=lambda b: actor[b]["images_per_s"])
        with tempfile.TemporaryDirectory(prefix="rae-bench-shard-") as shard_tmp:
            shard, shard_data, _ = photo_shard(Path(shard_tmp), config["shard_images"])
        variants = actor_decode_variants(weights, digest, shard, shard_data, best, config["repeats"])
    rec.add("actor_decode_gpu", variants)
    split_rate = rec.record["results"]["decode_gpu_cpu_stage"]["decode_gpu_split"]["median"]
    gpu_rate = variants["images_per_s_jpeg_bytes"]["median"]
    rec.add("decode_gpu_bottleneck", {
        "actor_images_per_s": gpu_rate,
        "cpu_stage_cores_per_gpu": gpu_rate / split_rate,
        "actor_process_cores": gpu_rate * variants["actor_cpu_s_per_image"]["gpu"],
        "goal": ">= 4000 images/s of DINOv2-B per GPU with <= 4 CPU cores per GPU (issue 16)"})
    decode = rec.record["results"]["decode"]
    rate = actor[best]["images_per_s"]
    rec.add("bottleneck", {
        "best_actor_batch": best, "actor_images_per_s": rate,
        "actor_over_bare_forward": rate / forward["images_per_s_by_batch"][best],
        "decode_cores_per_gpu": rate / decode["images_per_s_1_core"],
        "gpus_this_machine_can_feed": decode["images_per_s_all_cores"] / rate})
    rec.write()


if __name__ == "__main__":
    main()
