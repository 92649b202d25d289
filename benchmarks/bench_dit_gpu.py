"""DiT^DH-XL and DiT-XL training throughput and MFU on one GPU, measured through the trainer's own
step (``DiTTask.train_step``: autocast, gradient accumulation over micro-batches, clipping, AdamW,
EMA, host-to-device copies of the batches), with torch.compile and SDPA flash attention each on
and off (off = the math kernel), and the fp32 step the trainer took on one GPU before it autocast.

MFU = achieved training FLOP/s / peak. Training FLOPs per image are analytic (3 x forward,
``benchmarks/flops.py``), cross-checked against FlopCounterMode on the meta device (forward, and
forward + backward of a real loss); that part runs anywhere. The peak is measured on the device
with a large bf16 matmul (and the datasheet's H100/H200 SXM dense bf16 figure is recorded beside
it). The GPU part needs CUDA (no Ray) and is recorded as not run otherwise.

    python -m benchmarks.bench_dit_gpu [--quick] [--budget-s SECONDS]
"""
from __future__ import annotations

import contextlib
import time

import torch

from benchmarks.common import Recorder, cuda_unavailable_reason, parse_args
from benchmarks.flops import forward_flops_per_image, train_flops_per_image
from rae.dit import build_dit
from rae.model_summary import forward_flops
from rae.transport import training_loss

H100_SXM_BF16_DENSE = 989.4e12


def flop_crosscheck(presets: list[str]) -> dict:
    """Analytic forward and training FLOPs against FlopCounterMode traces on the meta device."""
    rows = {}
    for preset in presets:
        with torch.device("meta"):
            model = build_dit(preset, allow_narrow=True)
            cfg = model.config
            x = torch.empty(1, cfg.num_tokens, cfg.token_dim)
            t = torch.full((1,), 0.5)
            y = torch.zeros(1, dtype=torch.long)
            counted_forward = forward_flops(lambda: model(x, t, y))  # noqa: B023 (called in this iteration)
            counted_train = forward_flops(lambda: training_loss(model, x, y, t=t).sum().backward())  # noqa: B023 (same)
        rows[preset] = {"analytic_forward_gflops": forward_flops_per_image(cfg) / 1e9,
                        "counted_forward_gflops": counted_forward / 1e9,
                        "analytic_train_gflops": train_flops_per_image(cfg) / 1e9,
                        "counted_train_gflops": counted_train / 1e9,
                        "train_over_forward_counted": counted_train / counted_forward}
    return rows


def measured_peak(n: int, iters: int) -> float:
    """bf16 FLOP/s of an n x n x n matmul, the best of a few timed runs."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


def trainer_step(preset: str, *, global_batch: int, micro: int, precision: str, compile: bool, attention: str,
                 steps: int, warmup: int, peak: float | None, device: torch.device,
                 encoder: str = "dinov2-b-reg4", input_size: int = 224) -> dict:
    """Images/s, tokens/s and MFU of ``DiTTask.train_step`` on one device, batches handed over on
    the host as the data pipeline does; the step's time is taken between host-side returns (each
    step ends by reading the loss and gradient norm, a device sync). ``peak`` None: no MFU (CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jobs.train.parallelize import compile_enabled, compute_dtype, plan_batches
    from jobs.train.dit import DiTRunConfig, DiTTask, StoreFacts
    from jobs.train.loop import LoopConfig, RunContext
    from rae.encoders import ENCODER_PRESETS

    torch._dynamo.reset()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    plan = plan_batches(global_batch, 1, micro)
    loop = LoopConfig(global_batch_size=global_batch, max_micro_batch=micro, precision=precision,
                      compile="on" if compile else "off")
    latents = ENCODER_PRESETS[encoder].with_input_size(input_size).latent_spec("random-latents")
    facts = StoreFacts(url="benchmark://random-latents", rows=global_batch * 1000, num_classes=1000,
                       latent_spec=latents)
    task = DiTTask(DiTRunConfig(model=preset, loop=loop), facts)
    task.setup(RunContext(rank=0, world=1, device=device, plan=plan, steps_per_epoch=1000,
                          dtype=compute_dtype(loop.precision, device),
                          compile=compile_enabled(loop.compile, device)))  # as fit() derives them
    cfg = task.model.config
    micro_batches = [{"latent": torch.randn(plan.micro, cfg.num_tokens, cfg.latent_channels),
                      "label": torch.randint(0, cfg.num_classes, (plan.micro,))} for _ in range(plan.accum_steps)]
    backends = {"flash": sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "math": sdpa_kernel([SDPBackend.MATH]),
                "default": contextlib.nullcontext()}[attention]  # default: SDPA picks (fp32 has no flash kernel)
    compile_s = None
    try:
        with backends:
            start = time.perf_counter()
            task.train_step(micro_batches, 0, 1e-4)
            compile_s = time.perf_counter() - start  # the first step: compilation, allocator warm-up
            for step in range(1, warmup + steps):
                if step == warmup:
                    start = time.perf_counter()
                metrics = task.train_step(micro_batches, step, 1e-4)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "micro_batch": plan.micro}
    finally:
        del task
    elapsed = time.perf_counter() - start
    images = global_batch * steps / elapsed
    achieved = images * train_flops_per_image(cfg)
    row = {"global_batch": global_batch, "micro_batch": plan.micro, "accum_steps": plan.accum_steps,
           "images_per_s": images, "tokens_per_s": images * cfg.num_tokens, "step_s": elapsed / steps,
           "first_step_s": compile_s, "tflops": achieved / 1e12, "loss": metrics["loss"]}
    if on_gpu:
        row.update(mfu=achieved / peak, mfu_of_datasheet=achieved / H100_SXM_BF16_DENSE,
                   peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
    return row


# (preset, precision, compile, attention, micro-batch): most telling first, so a time budget cuts
# the least useful. fp32 without autocast is what the trainer ran on one GPU before this benchmark.
VARIANTS = [("ditdh-xl", "bf16", True, "flash", 64), ("ditdh-xl", "bf16", False, "flash", 64),
            ("ditdh-xl", "fp32", False, "default", 64), ("dit-xl", "bf16", True, "flash", 64),
            ("dit-xl", "bf16", False, "flash", 64), ("ditdh-xl", "bf16", False, "math", 64),
            ("ditdh-xl", "bf16", True, "math", 64), ("ditdh-xl", "bf16", True, "flash", 128),
            ("dit-xl", "bf16", False, "math", 64), ("dit-xl", "bf16", True, "math", 64)]


def variant_key(preset: str, precision: str, compiled: bool, attention: str, micro: int) -> str:
    return f"{preset} {precision} compile={'on' if compiled else 'off'} attention={attention} micro={micro}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, budget=True)
    quick = args.quick
    presets = ["ditdh-tiny"] if quick else ["ditdh-xl", "dit-xl"]
    config = {"presets": presets, "global_batch": 8 if quick else 256, "micro_batch": 4 if quick else 64,
              "variants": "(preset, precision, compile, attention, micro-batch); attention default = SDPA's choice",
              "steps": 2 if quick else 4, "warmup": 1 if quick else 2,
              "precision": "bf16 autocast over fp32 master weights (the trainer's GPU default); fp32: no autocast",
              "compile": "torch.compile of each transformer block's forward (the trainer's GPU default)",
              "step": "DiTTask.train_step: accumulation, clip, AdamW, EMA, host-to-device batch copies",
              "matmul_n": 1024 if quick else 8192, "attention_math_means": "SDPBackend.MATH",
              "mfu_goal_ditdh_xl": 0.45, "budget_s": args.budget_s}
    rec = Recorder("dit_gpu", args, config)
    rec.add("flops_crosscheck", flop_crosscheck(presets if quick else ["ditdh-xl", "dit-xl", "ditdh-s"]))
    reason = cuda_unavailable_reason()
    if reason:
        rec.skip("peak_bf16_matmul", reason)
        rec.skip("throughput", reason)
        if quick:  # keeps the measured path working: the trainer's step, on the CPU
            rec.add("cpu_trainer_step", trainer_step(
                "ditdh-tiny", global_batch=config["global_batch"], micro=config["micro_batch"], precision="fp32",
                compile=False, attention="math", steps=config["steps"], warmup=config["warmup"], peak=None,
                device=torch.device("cpu"), encoder="dinov2-s-offline", input_size=56))
        rec.write()
        return
    peak = measured_peak(config["matmul_n"], 10 if quick else 50)
    rec.add("peak_bf16_matmul", {"measured_tflops": peak / 1e12, "datasheet_h100_sxm_dense_tflops": 989.4,
                                 "gpu": torch.cuda.get_device_name(0)})
    variants = VARIANTS if not quick else [("ditdh-tiny", "bf16", False, "flash", 4), ("ditdh-tiny", "bf16", True, "flash", 4)]
    results: dict[str, dict] = {}
    for preset, precision, compiled, attention, micro in variants:
        key = variant_key(preset, precision, compiled, attention, micro)
        if args.budget_s and time.perf_counter() - rec.started > args.budget_s:
            rec.skip(key, f"not run: the run's time budget of {args.budget_s:g} s was spent")
            continue
        steps = config["steps"] if precision == "bf16" else max(1, config["steps"] // 2)
        try:
            results[key] = trainer_step(preset, global_batch=config["global_batch"], micro=micro,
                                        precision=precision, compile=compiled, attention=attention, steps=steps,
                                        warmup=config["warmup"] if precision == "bf16" else 1, peak=peak,
                                        device=torch.device("cuda"))
        except Exception as err:  # one failing variant (a compiler error, say) must not lose the others
            results[key] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        print(key, results[key], flush=True)
        rec.add("throughput", results)
        rec.write()  # partial results survive a run cut short
    measured = [(r["mfu"], k) for k, r in results.items() if k.startswith(presets[0]) and "mfu" in r]
    if measured:
        best = max(measured)
        rec.add("best_" + presets[0], {"variant": best[1], "mfu": best[0]})
    rec.write()


if __name__ == "__main__":
    main()
