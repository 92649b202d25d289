"""Training memory of the DiT presets: the largest DiT^DH that trains on one 80 GB GPU, with and
without FSDP, from an analytic model checked against a measurement.

Model (per GPU, bf16 autocast over fp32 master weights, AdamW, EMA):

    memory(b) = 20 P / S + b * A + W
      P  parameters; 20 bytes each: weights 4 + gradients 4 + AdamW moments 8 + EMA shadow 4;
         S = 1 without FSDP, S = GPUs with FSDP2 (all of it sharded; one block unsharded at a time)
      A  activation bytes autograd saves per image (traced on the meta device, bf16)
      b  micro-batch per GPU (gradient accumulation makes up the global batch of 1024)
      W  workspace and allocator slack: 10% of the card kept free

A preset "trains" on a card when b >= 1 fits. The 20 bytes per parameter are checked on CPU
against the tensors a real step leaves held (weights, gradients, AdamW state, EMA); the whole
model on a CUDA machine with ``torch.cuda.max_memory_allocated`` for DiT^DH-XL at several
micro-batches, and for the largest preset said to fit, at the largest micro-batch said to fit.

    python -m benchmarks.bench_memory [--quick]
"""
from __future__ import annotations


import torch

from benchmarks.common import Recorder, cuda_unavailable_reason, parse_args
from benchmarks.flops import STATE_BYTES_PER_PARAM, parameter_count, saved_activation_bytes_per_image
from rae.dit import build_dit
from rae.ema import EMA
from rae.model_summary import count_parameters
from rae.transport import training_loss

GPU_BYTES = 80e9
USABLE = 0.9
# DIT_PRESETS plus the paper's G size (2048 wide, 16 heads, 40 deep) as a DiT^DH, built by override.
CANDIDATES = {"ditdh-s": {}, "ditdh-b": {}, "ditdh-l": {}, "ditdh-xl": {},
              "ditdh-g (xl + width 2048, depth 40)": {"width": 2048, "depth": 40, "heads": 16},
              "dit-xl": {}}


def analytic_table(gpus_fsdp: tuple[int, ...]) -> dict:
    rows = {}
    for label, overrides in CANDIDATES.items():
        preset = label.split(" ")[0].replace("ditdh-g", "ditdh-xl")
        params = parameter_count(preset, **overrides)
        act = saved_activation_bytes_per_image(preset, 2, **overrides)
        state = STATE_BYTES_PER_PARAM * params
        row = {"params": params, "state_gb": state / 1e9, "activation_gb_per_image_bf16": act / 1e9}
        for gpus in (1, *gpus_fsdp):
            free = USABLE * GPU_BYTES - state / gpus
            key = "max_micro_batch_no_fsdp" if gpus == 1 else f"max_micro_batch_fsdp_{gpus}_gpus"
            row[key] = max(0, int(free // act))
        rows[label] = row
    return rows


def largest(rows: dict, key: str) -> str | None:
    fitting = [(r["params"], label) for label, r in rows.items() if r[key] >= 1 and label.startswith("ditdh")]
    return max(fitting)[1] if fitting else None


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict[str, int]:
    """Bytes of the tensors training actually holds, counted from the objects themselves."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    return {"weights": size(model.parameters()),
            "gradients": size(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": size(v for state in optimizer.state.values() for v in state.values() if v.dim() > 0),
            "ema": size(ema.shadow.values())}


def cpu_check(preset: str, batch: int, overrides: dict) -> dict:
    """One real training step of a small model on CPU (AdamW, EMA): the state it holds afterwards,
    counted tensor by tensor, against the formula's 20 bytes per parameter."""
    model = build_dit(preset, **overrides)
    params = count_parameters(model, trainable_only=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.999)
    cfg = model.config
    x = torch.randn(batch, cfg.grid * cfg.grid, cfg.latent_channels)
    y = torch.zeros(batch, dtype=torch.long)
    training_loss(model, x, y).mean().backward()
    optimizer.step()
    ema.update(model)
    held = held_bytes(model, optimizer, ema)
    return {"preset": preset, "overrides": overrides, "batch": batch, "params": params, "held_bytes": held,
            "state_bytes_measured": sum(held.values()), "state_bytes_predicted": STATE_BYTES_PER_PARAM * params}


def gpu_check(preset: str, overrides: dict, batches: list[int]) -> dict:
    """Peak ``torch.cuda.max_memory_allocated`` of real training steps (bf16 autocast, fused AdamW,
    EMA; eager, so no compiler-saved memory) against the formula, at each micro-batch."""
    torch.cuda.empty_cache()
    with torch.device("cuda"):  # built on the GPU: no minutes of CPU initialisation for billions of weights
        model = build_dit(preset, **overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = EMA(model, 0.9995)
    act = saved_activation_bytes_per_image(preset, 2, **overrides)
    params = count_parameters(model, trainable_only=False)
    cfg = model.config
    rows = {}
    for batch in batches:
        torch.cuda.reset_peak_memory_stats()
        try:
            x = torch.randn(batch, cfg.num_tokens, cfg.latent_channels, device="cuda")
            y = torch.randint(0, cfg.num_classes, (batch,), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = training_loss(model, x, y).mean()
            loss.backward()
            optimizer.step()
            ema.update(model)
            optimizer.zero_grad(set_to_none=True)
            del x, y, loss
            rows[batch] = {"measured_gb": torch.cuda.max_memory_allocated() / 1e9,
                           "predicted_gb": (STATE_BYTES_PER_PARAM * params + batch * act) / 1e9,
                           "fits_80gb": torch.cuda.max_memory_allocated() <= GPU_BYTES}
        except torch.cuda.OutOfMemoryError:
            rows[batch] = {"measured_gb": None, "oom": True}
            torch.cuda.empty_cache()
    del model, optimizer, ema
    torch.cuda.empty_cache()
    return {"params": params, "by_micro_batch": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    config = {"gpu_bytes": GPU_BYTES, "usable_fraction": USABLE, "state_bytes_per_param": STATE_BYTES_PER_PARAM,
              "fsdp_gpus": [8] if quick else [2, 8, 64], "activation_dtype": "bf16",
              "formula": "memory(b) = 20 P / S + b A + 10% slack; S = 1 (no FSDP) or GPUs (FSDP2)"}
    rec = Recorder("memory", args, config)
    rows = analytic_table(tuple(config["fsdp_gpus"]))
    rec.add("analytic_80gb", rows)
    rec.add("largest_ditdh_no_fsdp", largest(rows, "max_micro_batch_no_fsdp"))
    rec.add(f"largest_ditdh_fsdp_{config['fsdp_gpus'][-1]}_gpus",
            largest(rows, f"max_micro_batch_fsdp_{config['fsdp_gpus'][-1]}_gpus"))
    check = {"grid": 4, "latent_channels": 384} if quick else {"head_width": 768, "head_heads": 12}
    rec.add("cpu_check_fp32", cpu_check("ditdh-tiny", 2 if quick else 8, check))
    reason = cuda_unavailable_reason()
    if reason:
        rec.skip("gpu_ditdh_xl_peak_memory", reason)
    else:
        rec.add("gpu_ditdh_xl_peak_memory", gpu_check("ditdh-xl", {}, [1, 4] if quick else [8, 32, 64, 96]))
        if not quick:  # the largest preset said to fit one 80 GB card, at the micro-batch said to fit
            label = largest(rows, "max_micro_batch_no_fsdp")
            row = rows[label]
            rec.add("gpu_largest_ditdh_peak_memory", dict(gpu_check(
                label.split(" ")[0].replace("ditdh-g", "ditdh-xl"), CANDIDATES[label],
                [1, row["max_micro_batch_no_fsdp"]]), preset=label))
    rec.write()


if __name__ == "__main__":
    main()
