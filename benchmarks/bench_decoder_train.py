"""Decoder training (stage 1): images/s through the trainer's own step (``DecoderTask.train_step``:
uint8 crops to the device, the frozen encoder under inference mode, noise augmentation, decoder, L1 +
perceptual (+ adaptive GAN), accumulation over micro-batches, clipping, AdamW, EMA, the discriminator
step, the logged values read once) against a plain torch loop doing the same work on the same kind of
models and batches without the trainer's machinery, alternated; the crop producer, streamed blocks
(``decode_crop_batch``) against the former whole-shard decode (``decode_shard`` then crop); and on a
GPU the step's MFU with bf16 autocast and compiled decoder blocks, eager bf16 and fp32 beside it.

FLOPs per image are counted, not modelled: one eager step traced with FlopCounterMode (every
forward and backward the step runs: encoder, decoder, perceptual network, discriminator). The peak is
a measured bf16 matmul. The GPU part needs CUDA and is recorded as not run otherwise; it runs the
paper's networks (DINOv2-B, LPIPS-VGG, DINO ViT-S/8) from random weight files, and needs the `lpips`
package (benchmarks/run_gpu.sh says how to carry it to a GPU machine). The CPU part runs this
machine's offline networks (DINOv2-S, EfficientNet-Lite0) at 56 px.

    python -m benchmarks.bench_decoder_train [--quick] [--gpu-only]

``--gpu-only`` skips the CPU comparisons (17 minutes on the 2-core VM, one thread each, and a
measurement of that machine, not of a GPU node) so that a GPU slot spends its minutes on the GPU part.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_dit_gpu import H100_SXM_BF16_DENSE, measured_peak
from benchmarks.common import Recorder, alternate, cuda_unavailable_reason, finish, parse_args, write_photo_crops
from jobs.train.decoder import DecoderFacts, DecoderRunConfig, DecoderTask
from jobs.train.loop import LoopConfig, RunContext
from jobs.train.parallelize import autocast, compile_enabled, compute_dtype, plan_batches
from rae.decoder_loss import DecoderLossConfig
from rae.image_tensors import to_unit_images

STEPS_PER_EPOCH = 100
PHASES = {"reconstruction": 0, "gan": 8 * STEPS_PER_EPOCH}  # first step of the phase: L1 + perceptual; + GAN and D


def run_config(*, decoder: str, encoder_size: int, disc_size: int, precision: str, compile: str) -> DecoderRunConfig:
    """The paper's losses and schedule on offline networks (no download): DINOv2-S (packaged weights)
    as encoder and discriminator trunk, the EfficientNet-Lite0 perceptual distance."""
    return DecoderRunConfig(encoder="dinov2-s-offline", encoder_input_size=encoder_size, decoder=decoder,
                            perceptual="efficientnet-lite0", discriminator="dinov2-s-offline",
                            disc_input_size=disc_size, loss=DecoderLossConfig(),
                            loop=LoopConfig(precision=precision, compile=compile))


def paper_weight_files(root: Path) -> dict[str, str]:
    """The paper's frozen networks as the weight files a run loads, with random weights: DINOv2-B with
    registers (the encoder), DINO ViT-S/8 (the discriminator's trunk) and VGG16's convolutions (the
    LPIPS trunk). The GPU part measures time and counted FLOPs, which do not depend on the weights, and
    a GPU machine has neither the hub nor this machine's offline weight packages."""
    import timm

    from benchmarks.bench_encode_gpu import write_random_weights
    from rae.discriminator import BACKBONES, TRUNK_KWARGS

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    files = {"encoder": str(root / "random-encoder.safetensors")}
    write_random_weights(Path(files["encoder"]))
    trunks = {"discriminator": timm.create_model(BACKBONES["dino-vits8"], pretrained=False, **TRUNK_KWARGS),
              "vgg16": random_vgg16_convolutions()}
    for name, module in trunks.items():
        files[name] = str(root / f"random-{name}.pt")
        torch.save(module.state_dict(), files[name])
    return files


def random_vgg16_convolutions() -> torch.nn.Module:
    """torchvision's VGG16 with random weights and its classifier dropped: the ``features.*`` convolutions
    LPIPS uses, in the layout of torchvision's weights file."""
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    vgg.classifier = torch.nn.Identity()
    return vgg


def paper_run_config(weights: dict[str, str], *, decoder: str, encoder_size: int, disc_size: int, precision: str,
                     compile: str) -> DecoderRunConfig:
    """``run_config`` on the paper's networks (DINOv2-B encoder, LPIPS-VGG, DINO ViT-S/8 discriminator) from
    the random weight files of ``paper_weight_files``."""
    from rae.encoders import DEFAULT_ENCODER

    return dataclasses.replace(
        run_config(decoder=decoder, encoder_size=encoder_size, disc_size=disc_size, precision=precision,
                   compile=compile),
        encoder=DEFAULT_ENCODER, encoder_weights=weights["encoder"], perceptual="lpips-vgg",
        lpips_weights=weights["vgg16"], discriminator="dino-vits8", disc_weights=weights["discriminator"])


def benchmark_facts(config: DecoderRunConfig) -> DecoderFacts:
    """What ``resolve_facts`` gives the workers, without its driver-side checks (a loaded perceptual
    network and discriminator): the benchmark's names are known good."""
    from jobs.train.decoder import resolve_perceptual
    from pipelines.decoder_crops import crop_sizes
    from rae.encoders import load_encoder

    encoder = load_encoder(config.encoder, weights=config.encoder_weights, input_size=config.encoder_input_size)
    resize, crop = crop_sizes(encoder.spec.image_size, config.resize, config.crop)
    perceptual, perceptual_weights = resolve_perceptual(config)
    return DecoderFacts(latent_spec=encoder.latent_spec(), image_mean=tuple(encoder.spec.mean),
                        image_std=tuple(encoder.spec.std), perceptual=perceptual, perceptual_weights=perceptual_weights,
                        disc_digest="benchmark", rows=0, resize=resize, crop=crop)


def build_task(config: DecoderRunConfig, facts: DecoderFacts, device: torch.device, global_batch: int,
               micro: int) -> DecoderTask:
    task = DecoderTask(config, facts)
    torch.manual_seed(0)
    task.setup(RunContext(rank=0, world=1, device=device, plan=plan_batches(global_batch, 1, micro),
                          steps_per_epoch=STEPS_PER_EPOCH, dtype=compute_dtype(config.loop.precision, device),
                          compile=compile_enabled(config.loop.compile, device)))  # as fit() derives them
    return task


class PlainLoop:
    """The same step written as a plain torch loop on the task's own networks and loss module (their
    weights move under both loops; the work per step is the same), with its own AdamW pair and EMA:
    no accumulation helper, no clipping or non-finite check, one host read per step."""

    def __init__(self, task: DecoderTask):
        self.task, optim = task, task.config.optim
        self.optimizer = torch.optim.AdamW(task.decoder.parameters(), lr=1e-4, betas=optim.betas)
        self.disc_optimizer = torch.optim.AdamW(task.discriminator.trainable_parameters(), lr=1e-4,
                                                betas=optim.betas)
        self.params = list(task.decoder.parameters())
        self.shadow = [p.detach().clone() for p in self.params]

    def train_step(self, micro_batches: list[dict], step: int, lr: float) -> float:
        task = self.task
        device, dtype, epoch = task.ctx.device, task.ctx.dtype, step / STEPS_PER_EPOCH
        decoder, disc, loss = task.decoder, task.discriminator, task.loss
        pairs = []
        for batch in micro_batches:
            real = to_unit_images(batch["image"].to(device, non_blocking=True))
            with torch.inference_mode(), autocast(device, dtype):
                latent = task.encoder(real)
            pairs.append((real, latent.to(torch.float32, copy=True)))
        decoder.train()
        disc.eval()
        total = torch.zeros((), device=device)
        for real, latent in pairs:
            with autocast(device, dtype):
                fake = decoder(decoder.augment_with_noise(latent))
                value, _ = loss.generator_loss(real, fake, epoch=epoch, last_layer_weight=decoder.last_layer_weight)
            (value / len(pairs)).backward()
            total += value.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, self.params, 1 - task.config.ema_decay)
        if loss.discriminator_active(epoch):
            decoder.eval()
            disc.train()
            for real, latent in pairs:
                with autocast(device, dtype):
                    with torch.no_grad():
                        fake = decoder(latent)
                    d_loss, _ = loss.discriminator_loss(real, fake, epoch=epoch)
                (d_loss / len(pairs)).backward()
            decoder.train()
            disc.eval()
            self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return float(total) / len(pairs)


def image_batches(plan_micro: int, accum: int, size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (plan_micro, size, size, 3), dtype=torch.uint8, generator=g)}
            for _ in range(accum)]


def step_flops_per_image(task: DecoderTask, batches: list[dict], step: int) -> float:
    """FLOPs per image of an eager ``train_step`` (forward and backward of each network), counted on
    one micro-batch (the count is linear in the images; the counter's per-op cost is not)."""
    with FlopCounterMode(display=False) as counter:
        task.train_step(batches[:1], step, 1e-4)
    return counter.get_total_flops() / len(batches[0]["image"])


def images_per_s(step_fn, batches: list[dict], first_step: int, steps: int, images_per_step: int,
                 device: torch.device) -> float:
    """Steady rate over ``steps`` steps (each ends with a host read, so the device is synchronised)."""
    start = time.perf_counter()
    for i in range(steps):
        step_fn(batches, first_step + i, 1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_per_step * steps / (time.perf_counter() - start)


def step_comparison(config: DecoderRunConfig, facts: DecoderFacts, *, phase: str, global_batch: int, micro: int,
                    steps: int, repeats: int, device: torch.device) -> dict:
    """Trainer step against the plain loop on the same networks, alternated, after a warm-up step
    each (the trainer's first step is the FLOP-counted one)."""
    trainer = build_task(config, facts, device, global_batch, micro)
    plain = PlainLoop(trainer)
    plan = trainer.ctx.plan
    size = facts.crop
    batches = image_batches(plan.micro, plan.accum_steps, size)
    first = PHASES[phase]
    flops = step_flops_per_image(trainer, batches, first)
    trainer.train_step(batches, first, 1e-4)
    plain.train_step(batches, first, 1e-4)
    rates = alternate({
        "trainer_step": lambda: images_per_s(trainer.train_step, batches, first + 1, steps, global_batch, device),
        "plain_loop": lambda: images_per_s(plain.train_step, batches, first + 1, steps, global_batch, device),
    }, repeats)
    trainer_rate = rates["trainer_step"]["median"]
    return {"images_per_s": rates, "ratio_trainer_over_plain": trainer_rate / rates["plain_loop"]["median"],
            "counted_gflops_per_image": flops / 1e9, "trainer_tflops": trainer_rate * flops / 1e12,
            "global_batch": global_batch, "micro_batch": plan.micro, "accum_steps": plan.accum_steps,
            "image_size": size}


# ---------------------------------------------------------------- the crop producer

def _shard_row(shard) -> dict[str, np.ndarray]:
    return {"shard_index": np.array([0]), "shard_url": np.array([shard.url]), "shard_name": np.array([shard.name]),
            "shard_size": np.array([shard.size])}


def streamed_crops(shard, resize: int, crop: int) -> tuple[int, float]:
    """(crops, seconds to the first block) through the trainer's UDF."""
    from pipelines.decoder_crops import decode_crop_batch
    from pipelines.image_decode import DecodeLimits

    start, first, rows = time.perf_counter(), None, 0
    for block in decode_crop_batch(_shard_row(shard), resize=resize, crop=crop, limits=DecodeLimits(),
                                   num_classes=None, storage_options=None):
        first = time.perf_counter() - start if first is None else first
        rows += len(block["image"])
    return rows, first


def whole_shard_crops(shard, resize: int, crop: int) -> tuple[int, float]:
    """The former path: the whole shard decoded and stacked, then cropped: one block at the end."""
    from pipelines.decoder_crops import random_crops
    from pipelines.image_decode import decode_shard

    start = time.perf_counter()
    decoded = decode_shard(shard, image_size=resize)
    crops = random_crops(decoded.images, crop, np.random.default_rng())
    return len(crops), time.perf_counter() - start


def crop_producer(work: Path, *, images: int, resize: int, crop: int, repeats: int) -> dict:
    from pipelines.shards import list_shards, make_shards

    folder = write_photo_crops(work / "photos", images, min_side=max(resize, 160), max_side=max(2 * resize, 480))
    make_shards(str(folder), str(work / "shards"), max_count=images, progress=False)
    [shard] = list_shards(str(work / "shards"))
    firsts: dict[str, list[float]] = {"streamed": [], "whole_shard": []}

    def rate(kind: str) -> float:
        start = time.perf_counter()
        rows, first = (streamed_crops if kind == "streamed" else whole_shard_crops)(shard, resize, crop)
        firsts[kind].append(first)
        assert rows == images, (kind, rows)
        return rows / (time.perf_counter() - start)

    rates = alternate({"streamed": lambda: rate("streamed"), "whole_shard": lambda: rate("whole_shard")}, repeats)
    peaks = {}
    for kind, fn in (("streamed", streamed_crops), ("whole_shard", whole_shard_crops)):
        tracemalloc.start()
        fn(shard, resize, crop)
        peaks[kind] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return {"images_per_s_one_core": rates, "ratio_streamed_over_whole_shard":
            rates["streamed"]["median"] / rates["whole_shard"]["median"],
            "seconds_to_first_block": {k: statistics.median(v) for k, v in firsts.items()},
            "peak_traced_mib": peaks, "shard_images": images}


# ---------------------------------------------------------------- GPU

GPU_VARIANTS = [("bf16", "on"), ("bf16", "off"), ("fp32", "off")]  # the GPU default (auto) first


def gpu_throughput(quick: bool, steps: int, work: Path) -> dict:
    """MFU of the trainer's step on one GPU: the paper's run (ViT-XL decoder on DINOv2-B latents at 224 px,
    16x16 tokens -> 256 px images; LPIPS-VGG; DINO ViT-S/8 discriminator) with random weights, per
    precision / compilation and phase; FLOPs counted on an eager step."""
    device = torch.device("cuda")
    decoder, encoder_size, disc_size = ("tiny", 56, 56) if quick else ("vit-xl", 224, 224)
    weights = paper_weight_files(work / "weights")
    global_batch, micro = (8, 4) if quick else (64, 32)
    peak = measured_peak(1024 if quick else 8192, 10 if quick else 50)
    rows: dict[str, dict] = {}
    flops: dict[str, float] = {}  # per image, by phase
    for precision, compile in GPU_VARIANTS:
        key = f"{decoder} {precision} compile={compile}"
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        config = paper_run_config(weights, decoder=decoder, encoder_size=encoder_size, disc_size=disc_size,
                                  precision=precision, compile=compile)
        try:
            task = build_task(config, benchmark_facts(config), device, global_batch, micro)
            batches = image_batches(task.ctx.plan.micro, task.ctx.plan.accum_steps, task.facts.crop)
            for phase, first in PHASES.items():
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                if compile == "off" and phase not in flops:
                    flops[phase] = step_flops_per_image(task, batches, first)
                task.train_step(batches, first, 1e-4)  # the warm-up step: compilation, allocator
                first_step_s = time.perf_counter() - start
                rows[f"{key} {phase}"] = {
                    "images_per_s": images_per_s(task.train_step, batches, first + 1, steps, global_batch, device),
                    "first_step_s": first_step_s, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
            del task
        except Exception as err:  # one failing variant (a compiler error, an OOM) must not lose the others
            rows[key] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    for key, row in rows.items():
        phase = key.rsplit(" ", 1)[-1]
        if "images_per_s" in row and phase in flops:
            achieved = row["images_per_s"] * flops[phase]
            row.update(tflops=achieved / 1e12, mfu=achieved / peak, mfu_of_datasheet=achieved / H100_SXM_BF16_DENSE)
    return {"variants": rows, "counted_gflops_per_image": {k: v / 1e9 for k, v in flops.items()},
            "peak_bf16_matmul_tflops": peak / 1e12, "gpu": torch.cuda.get_device_name(0),
            "global_batch": global_batch, "micro_batch": micro, "decoder": decoder,
            "networks": "encoder dinov2-b-reg4, perceptual lpips-vgg, discriminator dino-vits8 (random weights)",
            "encoder_input_size": encoder_size}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, gpu_only=True)
    quick = args.quick
    threads = 1
    config = {"decoder": "tiny", "encoder": "dinov2-s-offline at 56 px (4x4 tokens) -> 64 px images",
              "perceptual": "efficientnet-lite0", "discriminator": "dinov2-s-offline at 56 px",
              "phases": list(PHASES) if not quick else ["reconstruction"], "global_batch": 4,
              "micro_batch": 2, "steps": 1 if quick else 2, "repeats": 1 if quick else 3,
              "torch_threads": threads, "precision": "fp32 (CPU)", "compile": "off (CPU)",
              "crop_shard_images": 8 if quick else 144, "crop_resize": 384, "crop": 256,
              "crop_repeats": 1 if quick else 3}
    rec = Recorder("decoder_train", args, config)
    if args.gpu_only:
        for key in ("cpu_step", "crop_producer"):
            rec.skip(key, "--gpu-only: the CPU comparisons were not run")
    else:
        cpu_comparisons(rec, config, threads)
    reason = cuda_unavailable_reason()
    if reason:
        rec.skip("gpu_throughput", reason)
    else:
        work = Path(tempfile.mkdtemp(prefix="rae-bench-decoder-gpu-"))
        try:
            rec.add("gpu_throughput", gpu_throughput(quick, 2 if quick else 5, work))
        finally:
            finish(work, started_ray=False)
    rec.write()


def cpu_comparisons(rec: Recorder, config: dict, threads: int) -> None:
    """The trainer's step against the plain loop per phase, and the crop producers, on the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="rae-bench-decoder-"))
    try:
        run = run_config(decoder="tiny", encoder_size=56, disc_size=56, precision="fp32", compile="off")
        facts = benchmark_facts(run)
        steps = {}
        for phase in config["phases"]:
            steps[phase] = step_comparison(run, facts, phase=phase, global_batch=config["global_batch"],
                                           micro=config["micro_batch"], steps=config["steps"],
                                           repeats=config["repeats"], device=torch.device("cpu"))
        rec.add("cpu_step", steps)
        rec.add("crop_producer", crop_producer(work, images=config["crop_shard_images"], resize=384, crop=256,
                                               repeats=config["crop_repeats"]))
    finally:
        torch.set_num_threads(previous)
        finish(work, started_ray=False)


if __name__ == "__main__":
    main()
