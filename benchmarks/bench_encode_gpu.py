"""The encode job's GPU side, on one CUDA machine without Ray: DINOv2-B/14-reg4 at 224 px through the
encode job's own actor class (``pipelines.encoder_actor.LatentEncoder``: 256 px uint8 crops on the host in,
bf16 autocast, float16 latents back on the host), images/s by batch size, against the bare encoder
forward on inputs already on the GPU; GPU utilisation while the actor runs; and the CPU side it
needs: decode + ADM crop of real JPEG photo crops per core and over every core of the machine, so
the cores one GPU needs follow from measurements on the same machine.

Weights are random (written to a file and loaded the way ``--encoder-weights PATH`` is): the speed is the
same as the hub weights', which cannot be fetched offline.

    python -m benchmarks.bench_encode_gpu [--quick] [--budget-s SECONDS]
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Recorder, cuda_unavailable_reason, parse_args, write_photo_crops
from pipelines.encoder_actor import LatentEncoder
from pipelines.image_decode import decode_image
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, budget=True)
    quick = args.quick
    config = {"encoder": ENCODER, "input_size": 224, "crop_px": IMAGE_SIZE, "latent_dtype": "float16", "weights": "random, from a file",
              "batches": [16, 32] if quick else [64, 128, 256, 512, 1024],
              "shard_images": 64 if quick else 2048, "repeats": 1 if quick else 3,
              "forward_steps": 2 if quick else 20, "decode_images": 16 if quick else 384,
              "budget_s": args.budget_s}
    rec = Recorder("encode_gpu", args, config)
    rec.add("decode", decode_rates(config["decode_images"]))
    reason = cuda_unavailable_reason()
    if reason:
        for key in ("actor", "forward", "bottleneck"):
            rec.skip(key, reason)
        rec.write()
        return
    forward = forward_sweep(config["batches"], config["forward_steps"])
    rec.add("forward", forward)
    rec.write()
    with tempfile.TemporaryDirectory(prefix="rae-bench-encoder-") as tmp:
        weights = Path(tmp) / "dinov2_b_reg4_random.safetensors"
        digest = write_random_weights(weights)
        actor = actor_sweep(weights, digest, config["batches"], config["shard_images"], config["repeats"])
    rec.add("actor", actor)
    best = max(actor, key=lambda b: actor[b]["images_per_s"])
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
