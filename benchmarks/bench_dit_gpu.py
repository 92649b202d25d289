"""DiT^DH-XL and DiT-XL training throughput and MFU on one GPU, bf16 autocast, with torch.compile
and SDPA flash attention each on and off (off = the math kernel).

MFU = achieved training FLOP/s / peak. Training FLOPs per image are analytic (3 x forward,
``benchmarks/flops.py``), cross-checked against FlopCounterMode on the meta device (forward, and
forward + backward of a real loss); that part runs anywhere. The peak is measured on the device
with a large bf16 matmul (and the datasheet's H100 SXM dense bf16 figure is recorded beside it).
The GPU part needs CUDA and is recorded as not run otherwise.

    python -m benchmarks.bench_dit_gpu [--quick]
"""
from __future__ import annotations

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
            counted_forward = forward_flops(lambda: model(x, t, y))
            counted_train = forward_flops(lambda: training_loss(model, x, y, t=t).sum().backward())
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


def train_throughput(preset: str, batch: int, *, compile: bool, flash: bool, steps: int, warmup: int,
                     peak: float) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_dit(preset).cuda()
    cfg = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    forward = torch.compile(model) if compile else model
    backend = SDPBackend.FLASH_ATTENTION if flash else SDPBackend.MATH
    x = torch.randn(batch, cfg.num_tokens, cfg.token_dim, device="cuda")
    y = torch.randint(0, cfg.num_classes, (batch,), device="cuda")
    try:
        with sdpa_kernel([backend]):
            for step in range(warmup + steps):
                if step == warmup:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = training_loss(forward, x, y).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    elapsed = time.perf_counter() - start
    images = batch * steps / elapsed
    achieved = images * train_flops_per_image(cfg)
    return {"images_per_s": images, "tokens_per_s": images * cfg.num_tokens, "step_s": elapsed / steps,
            "tflops": achieved / 1e12, "mfu": achieved / peak,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    presets = ["ditdh-tiny"] if quick else ["ditdh-xl", "dit-xl"]
    config = {"presets": presets, "batch": 4 if quick else 64, "steps": 2 if quick else 20,
              "warmup": 1 if quick else 5, "precision": "bf16 autocast, fp32 master weights, fused AdamW",
              "matmul_n": 1024 if quick else 8192, "flash_off_means": "SDPBackend.MATH",
              "mfu_goal_ditdh_xl": 0.45}
    rec = Recorder("dit_gpu", args, config)
    rec.add("flops_crosscheck", flop_crosscheck(presets if quick else ["ditdh-xl", "dit-xl", "ditdh-s"]))
    reason = cuda_unavailable_reason()
    if reason:
        rec.skip("peak_bf16_matmul", reason)
        rec.skip("throughput", reason)
        rec.write()
        return
    peak = measured_peak(config["matmul_n"], 10 if quick else 50)
    rec.add("peak_bf16_matmul", {"measured_tflops": peak / 1e12, "datasheet_h100_sxm_dense_tflops": 989.4})
    results = {}
    for preset in presets:
        for compiled in (False, True):
            for flash in (False, True):
                key = f"{preset} compile={'on' if compiled else 'off'} flash={'on' if flash else 'off'}"
                results[key] = train_throughput(preset, config["batch"], compile=compiled, flash=flash,
                                                steps=config["steps"], warmup=config["warmup"], peak=peak)
                print(key, results[key], flush=True)
    rec.add("throughput", results)
    rec.write()


if __name__ == "__main__":
    main()
