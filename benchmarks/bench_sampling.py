"""Sampling throughput: the official RAE sampler (Euler on 50 grid points, 49 DiT^DH-XL evaluations
per image) followed by one ViT-XL decoder pass, unguided, with AutoGuidance (+ a DiT^DH-S guide
forward per step) and with CFG (every step at twice the batch), in bf16 and fp32; images/s on one
GPU and the GPU-hours for the paper's 50k FID samples.

Timed through the sample job's own per-batch function, ``pipelines.sample_models.ImageSampler``
(per-item CPU noise -> Euler loop -> denormalize -> decoder -> uint8 on the host), with each model's
transformer blocks compiled as the trainer compiles them (``jobs.train.parallelize.compile_units``),
random weights (timing only). The GPU part needs CUDA (no Ray) and is recorded as not run otherwise.

Everywhere, the same numbers are projected from what bench_dit_gpu measured on an H200
(``results/dit_gpu.json``: the training step's achieved FLOP/s) and the forward FLOPs per image
(analytic for the DiTs, ``benchmarks/flops.py``; FlopCounterMode on the meta device for the
decoder), with every assumption written into the record. ``--quick`` samples with tiny presets on
the CPU through the same code.

    python -m benchmarks.bench_sampling [--quick] [--budget-s SECONDS]
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS_DIR, Recorder, cuda_unavailable_reason, parse_args
from benchmarks.flops import config_of, forward_flops_per_image
from pipelines.sample_models import Guidance, ImageSampler
from rae.model_summary import forward_flops
from rae.normalization import LatentStats
from rae.sampling import SamplerConfig, time_grid

SAMPLES = 50_000          # the paper's FID sample count (pipelines.sample_job.PAPER_SAMPLES; that module needs Ray)
GUIDE_SCALE = 1.42        # jobs/configs/sample-ditdh-xl-autoguidance.yaml; the cost does not depend on it
CFG_SCALE = 1.5           # any scale != 1 on the full interval runs every step at 2B; the cost does not depend on it
VARIANTS = ("unguided", "autoguidance", "cfg")
# bench_dit_gpu's rows this projects from (results/dit_gpu.json)
TRAIN_ROWS = {"bf16": "ditdh-xl bf16 compile=on attention=flash micro=64",     # the trainer's GPU defaults
              "fp32": "ditdh-xl fp32 compile=off attention=default micro=64",  # the only fp32 row measured
              "bf16_eager": "ditdh-xl bf16 compile=off attention=flash micro=64"}
# Full-size models (the paper's DiT^DH-XL with AutoGuidance on DINOv2-B latents) and the tiny CPU ones.
FULL = {"dit": "ditdh-xl", "guide": "ditdh-s", "decoder": "vit-xl", "grid": 16, "channels": 768, "classes": 1000}
TINY = {"dit": "ditdh-tiny", "guide": "ditdh-tiny", "decoder": "tiny", "grid": 4, "channels": 32, "classes": 10}


def model_evaluations(sampler: SamplerConfig, latent_dim: int) -> int:
    """DiT forward passes (per image, per model) of one sample: one per step, grid points - 1 for Euler."""
    steps = len(time_grid(sampler.num_steps, t_min=sampler.t_min, latent_dim=latent_dim)) - 1
    return steps * (2 if sampler.method == "heun" else 1)


def decoder_forward_flops(preset: str, *, channels: int, grid: int) -> int:
    """One decoder forward per image, traced with FlopCounterMode on the meta device (as
    ``rae.model_summary.decoder_summary``): the CLS token and the pixel head included."""
    from rae.decoder import build_decoder

    with torch.device("meta"):
        decoder = build_decoder(preset, latent_channels=channels, grid=grid)
        latents = torch.empty(1, grid * grid, channels)
        return forward_flops(lambda: decoder(latents))


def model_flops(models: dict = FULL) -> dict:
    """Forward FLOPs per image (2 per multiply-add) of the DiT, the guide and the decoder, and what
    one sample costs in each variant."""
    dit = forward_flops_per_image(config_of(models["dit"], latent_channels=models["channels"], grid=models["grid"]))
    guide = forward_flops_per_image(config_of(models["guide"], latent_channels=models["channels"], grid=models["grid"]))
    decoder = decoder_forward_flops(models["decoder"], channels=models["channels"], grid=models["grid"])
    evals = model_evaluations(SamplerConfig(), models["grid"] ** 2 * models["channels"])
    per_sample = {"unguided": evals * dit + decoder, "autoguidance": evals * (dit + guide) + decoder,
                  "cfg": evals * 2 * dit + decoder}
    return {"models": {k: models[k] for k in ("dit", "guide", "decoder")},
            "latent": f"{models['grid'] ** 2} tokens x {models['channels']}",
            "dit_forward_gflops": dit / 1e9, "guide_forward_gflops": guide / 1e9, "decoder_forward_gflops": decoder / 1e9,
            "dit_and_guide_rule": "analytic (benchmarks/flops.py), equal to FlopCounterMode's count "
                                  "(results/dit_gpu.json flops_crosscheck: ditdh-xl, ditdh-s)",
            "decoder_rule": "FlopCounterMode on the meta device (rae.model_summary.forward_flops), "
                            f"{models['grid'] ** 2 + 1} tokens incl. CLS",
            "model_evaluations": evals, "sampler": "SamplerConfig() defaults: Euler, 50 grid points, shifted",
            "per_sample_gflops": {k: v / 1e9 for k, v in per_sample.items()},
            "decoder_share_unguided": decoder / per_sample["unguided"],
            "guide_share_of_a_step": guide / (dit + guide)}


def stand_in_sampler(shape: tuple[int, int]) -> ImageSampler:
    """An ImageSampler for ``shape`` latents whose models are never called: for its ``noise`` alone."""
    stats = LatentStats(var=torch.ones(shape), count=1)
    return ImageSampler(nn.Identity(), nn.Identity(), stats, sampler=SamplerConfig(), guidance=Guidance(),
                        num_classes=1)


def host_noise(batch: int, repeats: int, shape: tuple[int, int] = (256, 768)) -> dict:
    """Time ImageSampler spends drawing a batch's initial noise on the CPU (one generator per item,
    before any GPU work of the batch: nothing overlaps it), on one thread. ``s_per_image`` is CPU
    time (``time.process_time``), which leaves out waiting for a core on a shared machine; the wall
    times are recorded beside it."""
    sampler = stand_in_sampler(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    walls, cpus = [], []
    try:
        for r in range(repeats):
            seeds = np.arange(r * batch, (r + 1) * batch, dtype=np.uint64)
            wall, cpu = time.perf_counter(), time.process_time()
            sampler.noise(seeds)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    finally:
        torch.set_num_threads(threads)
    return {"batch": batch, "latent": list(shape), "threads": 1, "cpu_s": [round(t, 4) for t in cpus],
            "wall_s": [round(t, 4) for t in walls], "s_per_image": statistics.median(cpus) / batch,
            "s_per_image_rule": "median CPU time (process_time) of a batch on one thread / batch"}


# ---------------------------------------------------------------- projection

def rate_table(per_sample: dict[str, float], achieved: float, noise_s_per_image: float) -> dict:
    """Images/s and GPU-hours per 50k of each variant at ``achieved`` FLOP/s, host noise added."""
    table = {}
    for variant, cost in per_sample.items():
        gpu_s = cost / achieved
        rate = 1 / (gpu_s + noise_s_per_image)
        table[variant] = {"images_per_s": rate, "gpu_hours_50k": SAMPLES / rate / 3600,
                          "gpu_only_images_per_s": 1 / gpu_s, "gpu_only_gpu_hours_50k": SAMPLES * gpu_s / 3600,
                          "noise_share": noise_s_per_image * rate}
    table["autoguidance_over_unguided_time"] = table["unguided"]["images_per_s"] / table["autoguidance"]["images_per_s"]
    table["cfg_over_unguided_time"] = table["unguided"]["images_per_s"] / table["cfg"]["images_per_s"]
    return table


def projection(flops: dict, noise_s_per_image: float, noise_from: str, results_dir: Path = RESULTS_DIR) -> dict:
    """Images/s and GPU-hours for 50k samples on one GPU, from bench_dit_gpu's measured training FLOP/s."""
    path = results_dir / "dit_gpu.json"
    record = json.loads(path.read_text())
    rows = record["results"]["throughput"]
    peak = record["results"]["peak_bf16_matmul"]["measured_tflops"] * 1e12
    per_sample = {k: v * 1e9 for k, v in flops["per_sample_gflops"].items()}
    bases, out = {}, {}
    for precision, key in TRAIN_ROWS.items():
        row = rows[key]
        achieved = row["tflops"] * 1e12  # images/s x 3 x analytic forward FLOPs (bench_dit_gpu)
        bases[precision] = {"variant": key, "train_images_per_s": row["images_per_s"], "achieved_tflops": achieved / 1e12,
                            "fraction_of_measured_bf16_peak": achieved / peak}
        out[precision] = rate_table(per_sample, achieved, noise_s_per_image)
    # TF32 (the official sampler's fp32 mode) was not measured: projected at the bf16 step's MFU of the TF32
    # tensor-core peak, which is half the bf16 one on Hopper (H100/H200 SXM datasheets: 494.7 vs 989.4 TFLOP/s).
    tf32_achieved = bases["bf16"]["achieved_tflops"] * 1e12 / 2
    bases["tf32"] = {"variant": "projected from the bf16 row at half the tensor-core peak",
                     "achieved_tflops": tf32_achieved / 1e12, "fraction_of_measured_bf16_peak": tf32_achieved / peak}
    out["tf32"] = rate_table(per_sample, tf32_achieved, noise_s_per_image)
    evals = flops["model_evaluations"]
    assumptions = {
        "flops": f"a sample costs {evals} forward passes of the DiT (of the DiT and the guide with AutoGuidance; "
                 f"of the DiT at twice the batch with CFG) and one decoder pass; the Euler updates, the "
                 f"denormalization and the uint8 conversion are elementwise and not counted",
        "bf16_rate": f"a bf16 sampling forward runs at the FLOP/s the trainer's bf16 step achieved "
                     f"({bases['bf16']['achieved_tflops']:.1f} TFLOP/s = {bases['bf16']['fraction_of_measured_bf16_peak']:.1%} "
                     f"MFU of the measured {peak / 1e12:.0f} TFLOP/s peak; compiled blocks, flash attention), for the "
                     f"DiT^DH-XL, the guide and the decoder alike",
        "bf16_rate_why_conservative": (
            "A forward-only pass at batch 256 should run at or above the training step's MFU: (1) the step's "
            "time includes AdamW, EMA, gradient clipping and host-to-device copies, which do no model FLOPs; "
            "(2) one forward at batch 256 multiplies 65,536-row matrices, 4x the training micro-batch's 16,384 "
            "rows, and training itself rose from 47.2% to 49.2% MFU going from micro-batch 64 to 128; (3) the "
            "flash attention forward kernel is more efficient than its backward; (4) nothing is saved for a "
            "backward. What could hold it below: the backward doubles both the GEMMs and the elementwise work, "
            "so the forward's memory-bound share (adaLN modulation, RoPE, SwiGLU gating, norms) is about the "
            "step's, not smaller; the guide's 384-wide trunk has small GEMMs (~13% of its FLOPs; its 2048-wide "
            "head is the rest); guided samplers read a flag on the host every step (one sync per step); the "
            "decoder (1.4% of an unguided sample's FLOPs) attends over 257 tokens, which flash kernels pad. "
            "The projection therefore keeps the training step's 47.2%, not the 49.2% of micro-batch 128."),
        "fp32_rate": f"an fp32 sampling forward runs at the FLOP/s the trainer's fp32 eager step achieved "
                     f"({bases['fp32']['achieved_tflops']:.1f} TFLOP/s). torch leaves TF32 off for matmuls by default "
                     f"and the project does not turn it on, so fp32 is bound by the CUDA-core FP32 matmul rate "
                     f"(H100/H200 SXM datasheet ~67 TFLOP/s; the step reached ~63% of it): a forward pass is the same "
                     f"matmuls, compilation gains little where matmuls dominate this much, and the sample job's "
                     f"default fp32 batch of 32 (8,192 rows) is a large GEMM for FP32 units",
        "tf32_rate": "tf32 (fp32 weights and activations, TF32 tensor-core matmuls: the official sample_ddp.py "
                     "default and `rae sample`'s) is not measured; it is projected at the bf16 step's MFU of the TF32 "
                     "peak, half the bf16 one on Hopper. The matmuls are the same; TF32 moves twice the bytes per "
                     "operand, so memory-bound kernels cost more than in bf16 and this is an upper bound",
        "bf16_eager": "bf16_eager is what `rae sample` runs today: it loads exports with "
                      "jobs.train.export.load_exported_model and does not compile; projected from the eager "
                      "bf16 training row the same way",
        "host_noise": f"ImageSampler draws each item's initial noise on the CPU (one torch.Generator per item) before "
                      f"the batch's GPU work, and nothing overlaps it: {noise_s_per_image * 1e3:.2f} ms per image, "
                      f"measured {noise_from}, is added to every image's time (gpu_only_* leave it out)",
        "guidance": f"AutoGuidance at scale {GUIDE_SCALE} and CFG on the whole interval [0, 1] (the shipped "
                    f"configs' cfg_interval): every step runs the guide (AutoGuidance) or the 2B batch (CFG). A "
                    f"narrower CFG interval runs the steps outside it at B; the scales do not change the cost",
        "excluded": "one GPU, no Ray: the sample job's Ray Data scheduling, writing parts (about 9.8 GB of uint8 "
                    "images for 50k) and assembling samples.npz are left out; model loading and compilation are "
                    "one-time costs, not per image",
        "gpu": f"{record['device'].get('gpu')} as measured by bench_dit_gpu on {record['date']}",
    }
    return {"source": "benchmarks/results/dit_gpu.json", "measured_peak_bf16_tflops": peak / 1e12,
            "basis": bases, "samples": SAMPLES, "noise_s_per_image": noise_s_per_image,
            "assumptions": assumptions, **out}


# ---------------------------------------------------------------- timing the real path

def build_models(models: dict, device: torch.device, seed: int = 0) -> dict:
    """Random-weight DiT, guide and decoder in eval mode on ``device``, and random latent statistics."""
    from rae.decoder import build_decoder
    from rae.dit import build_dit

    torch.manual_seed(seed)
    with torch.device(device):
        dit = build_dit(models["dit"], latent_channels=models["channels"], grid=models["grid"],
                        num_classes=models["classes"]).eval()
        guide = build_dit(models["guide"], latent_channels=models["channels"], grid=models["grid"],
                          num_classes=models["classes"]).eval()
        decoder = build_decoder(models["decoder"], latent_channels=models["channels"], grid=models["grid"]).eval()
    var = torch.rand(models["grid"] ** 2, models["channels"], generator=torch.Generator().manual_seed(seed)) + 0.5
    return {"dit": dit, "guide": guide, "decoder": decoder, "stats": LatentStats(var=var, count=1)}


def compile_units_of(built: dict) -> list[nn.Module]:
    """The units the trainer compiles: each DiT's transformer blocks (trunk and head), the decoder's blocks."""
    return [*built["dit"].blocks, *built["dit"].head_blocks, *built["guide"].blocks, *built["guide"].head_blocks,
            *built["decoder"].blocks]


def set_compiled(built: dict, compiled: bool) -> None:
    """Compile every unit afresh (``compile_units``, as the trainer does), or restore the plain forwards."""
    units = compile_units_of(built)
    if compiled or any("forward" in unit.__dict__ for unit in units):
        torch._dynamo.reset()  # no graph (or recompilation count) carries over from the previous run
    for unit in units:
        unit.__dict__.pop("forward", None)  # compile_units sets an instance attribute; this undoes it
    if compiled:
        from jobs.train.parallelize import compile_units

        compile_units(units)


def image_sampler(built: dict, variant: str, precision: str, device: torch.device, num_classes: int,
                  sampler: SamplerConfig | None = None) -> ImageSampler:
    guidance = {"unguided": Guidance(), "autoguidance": Guidance(guide_scale=GUIDE_SCALE),
                "cfg": Guidance(cfg_scale=CFG_SCALE)}[variant]
    return ImageSampler(built["dit"], built["decoder"], built["stats"], sampler=sampler or SamplerConfig(),
                        guidance=guidance,
                        num_classes=num_classes, guide=built["guide"] if variant == "autoguidance" else None,
                        device=device, precision=precision)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(built: dict, variant: str, precision: str, batch: int, *, device: torch.device, num_classes: int,
                  timed_batches: int, per_sample_flops: float, peak: float | None) -> dict:
    """Whole batches through ImageSampler (noise, 49 steps, decoder, uint8 on the host), after a
    warm-up batch on a 2-point grid (one step: compiles every graph the timed batches use)."""
    on_gpu = device.type == "cuda"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, size=batch)
    warm = image_sampler(built, variant, precision, device, num_classes, SamplerConfig(num_steps=2))
    sampler = image_sampler(built, variant, precision, device, num_classes)
    sync(device)
    start = time.perf_counter()
    warm(labels, np.arange(batch, dtype=np.uint64))
    sync(device)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    sampler.noise(np.arange(batch, dtype=np.uint64))
    noise_s = time.perf_counter() - start
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(timed_batches):
        seeds = np.arange((i + 1) * batch, (i + 2) * batch, dtype=np.uint64)
        sync(device)
        start = time.perf_counter()
        images = sampler(labels, seeds)
        sync(device)
        times.append(time.perf_counter() - start)
    batch_s = statistics.median(times)
    rate = batch / batch_s
    row = {"batch": batch, "images_per_s": rate, "batch_s": batch_s, "all_batch_s": [round(t, 3) for t in times],
           "noise_s": noise_s, "warmup_s": first_s, "gpu_hours_50k": SAMPLES / rate / 3600,
           "tflops": rate * per_sample_flops / 1e12, "image_shape": list(images.shape), "image_dtype": str(images.dtype)}
    if on_gpu:
        gpu_only = batch / max(batch_s - noise_s, 1e-9)
        row.update(mfu=rate * per_sample_flops / peak, mfu_without_noise=gpu_only * per_sample_flops / peak,
                   peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9)
    return row


# (variant, precision, batch, compiled), most telling first, so a time budget cuts the least useful.
# fp32 (the paper's FID precision) at the sample job's default batch of 32; compile=off is `rae sample`
# as shipped (it loads exports without compiling). Estimated for an H200 (the projection's batch times, ~20 s
# of compilation per run as the trainer's first step took): --budget-s 180 starts the first five, ~4 min in all.
GPU_RUNS = [("unguided", "bf16", 256, True), ("autoguidance", "bf16", 256, True), ("unguided", "tf32", 32, True),
            ("autoguidance", "tf32", 32, True), ("unguided", "fp32", 32, True),
            ("autoguidance", "fp32", 32, True), ("cfg", "bf16", 256, True), ("unguided", "bf16", 256, False),
            ("cfg", "fp32", 32, True)]
# Quick: every variant in fp32, and bf16 (the autocast path) unguided; tiny presets, batch 2.
QUICK_RUNS = [*((v, "fp32", 2, False) for v in VARIANTS), ("unguided", "bf16", 2, False)]


def run_key(variant: str, precision: str, batch: int, compiled: bool) -> str:
    return f"{variant} {precision} batch={batch} compile={'on' if compiled else 'off'}"


def measure(rec: Recorder, key: str, runs: list, models: dict, flops: dict, device: torch.device, *,
            timed_batches: int, peak: float | None, projected: dict | None, budget_s: float) -> dict:
    """Time each run; the record's ``key`` holds every run so far, written after each (a run cut short
    keeps the earlier ones). ``flops``: ``model_flops(models)``; ``projected``: ``projection(...)``."""
    built = build_models(models, device)
    per_sample = {k: v * 1e9 for k, v in flops["per_sample_gflops"].items()}
    results: dict[str, dict] = {}
    compiled_now = None
    for variant, precision, batch, compiled in runs:
        name = run_key(variant, precision, batch, compiled)
        if budget_s and time.perf_counter() - rec.started > budget_s:
            rec.skip(f"{key}: {name}", f"not run: the run's time budget of {budget_s:g} s was spent")
            continue
        try:
            if compiled != compiled_now or device.type == "cuda":  # fresh graphs for every GPU run
                set_compiled(built, compiled)
                compiled_now = compiled
            row = time_sampling(built, variant, precision, batch, device=device, num_classes=models["classes"],
                                timed_batches=timed_batches, per_sample_flops=per_sample[variant], peak=peak)
            basis = precision if compiled else f"{precision}_eager"
            table = projected and projected.get(basis)
            if table:
                row["projected_from"] = basis
                row["projected_images_per_s"] = table[variant]["images_per_s"]
                row["measured_over_projected"] = row["images_per_s"] / table[variant]["images_per_s"]
            results[name] = row
        except Exception as err:  # one failing run (a compiler error, out of memory) must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        rec.add(key, results)
        rec.write()  # partial results survive a run cut short
    set_compiled(built, False)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, budget=True)
    quick = args.quick
    config = {"models": FULL, "quick_models": TINY, "sampler": "SamplerConfig(): Euler, 50 grid points (49 steps), "
                                                                "t_min 0.001, shifted for the latent",
              "path": "pipelines.sample_models.ImageSampler: per-item CPU noise -> Euler -> denormalize -> decoder "
                      "-> uint8 on the host",
              "guide_scale": GUIDE_SCALE, "cfg_scale": CFG_SCALE, "cfg_interval": [0.0, 1.0],
              "gpu_runs": [run_key(*run) for run in GPU_RUNS],
              "run_key": "(variant, precision, batch, compile); bf16 = autocast, fp32 = none (TF32 off: "
                          f"torch.backends.cuda.matmul.allow_tf32 = {torch.backends.cuda.matmul.allow_tf32})",
              "compile": "jobs.train.parallelize.compile_units on every transformer block of the DiT, guide and "
                         "decoder (the trainer's regional compilation), dynamo reset before each GPU run",
              "weights": "random (timing only); latent statistics random", "timed_batches": 1,
              "warmup": "one batch on a 2-point grid (one step) at the timed batch size",
              "noise_batch": 16 if quick else 256, "noise_repeats": 3 if quick else 5, "budget_s": args.budget_s}
    rec = Recorder("sampling", args, config)
    flops = model_flops(FULL)
    rec.add("flops_per_image", flops)
    noise = host_noise(config["noise_batch"], config["noise_repeats"])
    rec.add("host_noise", noise)
    projected = projection(flops, noise["s_per_image"], "on one core of this run's machine (host_noise, device)")
    rec.add("projection", projected)
    reason = cuda_unavailable_reason()
    if reason:
        rec.skip("peak_bf16_matmul", reason)
        rec.skip("throughput", reason)
        if quick:  # keeps the measured path working: the same ImageSampler calls, tiny models, on the CPU
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices: a second thread only contends on a shared machine
            try:
                measure(rec, "cpu_sampling", QUICK_RUNS, TINY, model_flops(TINY), torch.device("cpu"),
                        timed_batches=1, peak=None, projected=None, budget_s=0.0)
            finally:
                torch.set_num_threads(threads)
        rec.write()
        return
    from benchmarks.bench_dit_gpu import measured_peak

    peak = measured_peak(1024 if quick else 8192, 10 if quick else 50)
    rec.add("peak_bf16_matmul", {"measured_tflops": peak / 1e12, "gpu": torch.cuda.get_device_name(0)})
    if quick:
        measure(rec, "throughput", [(v, p, b, True) for v, p, b, _ in QUICK_RUNS], TINY, model_flops(TINY),
                torch.device("cuda"), timed_batches=1, peak=peak, projected=None, budget_s=args.budget_s)
    else:
        measure(rec, "throughput", GPU_RUNS, FULL, flops, torch.device("cuda"), timed_batches=1, peak=peak,
                projected=projected, budget_s=args.budget_s)
    rec.write()


if __name__ == "__main__":
    main()
