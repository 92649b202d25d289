"""Analytic compute and memory of a DiT / DiT^DH training step, per image.

FLOPs count 2 per multiply-add (the unit hardware peaks are quoted in). A training step is taken
as 3x the forward pass (backward = 2x forward: gradients w.r.t. activations and weights). For N
tokens of width d, SwiGLU hidden h = int(2/3 * 4 d), token channels C:

    block(d) MACs = 4 N d^2 (qkv, proj) + 2 N^2 d (QK^T, AV) + 3 N d h (SwiGLU) + adaLN
    adaLN         = 6 d^2 per image (trunk: one global condition) or 6 N d^2 (DDT head: per token)
    DiT   MACs    = N C d (embed) + depth*block(d) + 2 d^2 + N d C (final adaLN + linear) + t-MLP
    DiT^DH MACs   = N C d + depth*block(d) + N d dh (projector) + N C dh (embed x again)
                    + head_depth*block_per_token(dh) + 2 N dh^2 + N dh C + t-MLP

The cross-check is ``rae.model_summary.dit_summary``: one forward traced with FlopCounterMode on
the meta device.
"""
from __future__ import annotations

from rae.dit import DiTConfig, build_dit
from rae.model_summary import count_parameters


def config_of(preset: str, **overrides: object) -> DiTConfig:
    import torch

    with torch.device("meta"):
        return build_dit(preset, allow_narrow=True, **overrides).config


def _block_macs(n: int, d: int, mlp_ratio: float, per_token_condition: bool) -> int:
    hidden = int(2 / 3 * mlp_ratio * d)
    adaln = 6 * d * d * (n if per_token_condition else 1)
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * hidden + adaln


def forward_flops_per_image(cfg: DiTConfig) -> int:
    """FLOPs of one forward pass for one image (2 per multiply-add)."""
    n, c, d = cfg.num_tokens, cfg.token_dim, cfg.width
    time_mlp = 2 * cfg.fourier_features * d + d * d
    macs = n * c * d + cfg.depth * _block_macs(n, d, cfg.mlp_ratio, False) + time_mlp
    if cfg.head_depth > 0:
        dh = cfg.head_width
        macs += n * d * dh + n * c * dh + cfg.head_depth * _block_macs(n, dh, cfg.mlp_ratio, True)
        macs += 2 * n * dh * dh + n * dh * c
    else:
        macs += 2 * d * d + n * d * c
    return 2 * macs


def train_flops_per_image(cfg: DiTConfig) -> int:
    return 3 * forward_flops_per_image(cfg)


def parameter_count(preset: str, **overrides: object) -> int:
    import torch

    with torch.device("meta"):
        model = build_dit(preset, allow_narrow=True, **overrides)
    return count_parameters(model, trainable_only=False)


# Bytes per parameter held by training, fp32 master weights with bf16 autocast compute:
# weights 4 + gradients 4 + AdamW exp_avg 4 + exp_avg_sq 4 + EMA shadow 4.
STATE_BYTES_PER_PARAM = 20


def saved_activation_bytes_per_image(preset: str, dtype_bytes: int = 2, **overrides: object) -> int:
    """Bytes autograd saves for backward in one image's forward, traced on the meta device (no
    memory): every storage packed by ``saved_tensors_hooks`` counted once (views share one), as
    traced in fp32 and scaled to ``dtype_bytes`` (bf16 autocast saves most activations in bf16).
    Parameters saved for backward are not activations and are left out."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            storage = t.untyped_storage()
            seen.setdefault(storage._cdata, storage.nbytes() // t.element_size() * dtype_bytes)
        return t

    with torch.device("meta"):
        model = build_dit(preset, allow_narrow=True, **overrides)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        cfg = model.config
        x = torch.empty(1, cfg.grid * cfg.grid, cfg.latent_channels)
        t = torch.empty(1)
        y = torch.zeros(1, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, y).sum()
    return sum(size for key, size in seen.items() if key not in params)
