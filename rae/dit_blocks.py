"""Building blocks of the RAE diffusion transformers (DiT and DiT^DH).

Read top to bottom: token-grid helpers, 2-D RoPE (the fixed sin-cos positions are in `rae/positions.py`),
conditioning embedders (Gaussian Fourier time, class labels with CFG dropout), the transformer
block with adaLN-Zero, and the final adaLN + linear layer. The models themselves live in `rae/dit.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; shift/scale are (B, D) for a global condition or (B, N, D) per token."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def _gate(x: Tensor, gate: Tensor) -> Tensor:
    return x * (gate.unsqueeze(1) if gate.dim() == 2 else gate)


#################################################################################
#                          Token grid and positions                             #
#################################################################################

def patchify(x: Tensor, grid: int, patch: int) -> Tensor:
    """(B, grid*grid, C) row-major tokens -> (B, (grid/p)^2, p*p*C), each new token a p x p block."""
    if patch == 1:
        return x
    b, _, c = x.shape
    g = grid // patch
    x = x.reshape(b, g, patch, g, patch, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, patch * patch * c)


def unpatchify(x: Tensor, grid: int, patch: int) -> Tensor:
    """Exact inverse of `patchify`."""
    if patch == 1:
        return x
    b = x.shape[0]
    g = grid // patch
    c = x.shape[-1] // (patch * patch)
    x = x.reshape(b, g, g, patch, patch, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, c)


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding: the first half of each head's channels rotates with the token's
    row, the second half with its column (pairs of adjacent channels form one rotation)."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, heads, N, head_dim)."""
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


#################################################################################
#                    Embedding layers for time and class labels                 #
#################################################################################

class GaussianFourierEmbedding(nn.Module):
    """Continuous time t in [0, 1] -> width-d vector: random Fourier features, then an MLP."""

    def __init__(self, width: int, num_features: int = 256, scale: float = 1.0):
        super().__init__()
        # Fixed random frequencies; a buffer so checkpoints (and EMA) carry them.
        self.register_buffer("freqs", torch.randn(num_features) * scale)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_features, width), nn.SiLU(), nn.Linear(width, width)
        )
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        angles = 2 * math.pi * t.float()[:, None] * self.freqs[None, :]
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` is the null class used by classifier-free guidance;
    in training mode each label is replaced by it with probability `dropout`."""

    def __init__(self, num_classes: int, width: int, dropout: float, init_std: float = 0.02):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)
        self.num_classes = num_classes
        self.dropout = dropout
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, y: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


#################################################################################
#                               Transformer block                               #
#################################################################################

class RMSNorm(nn.RMSNorm):
    """RMSNorm in the input's dtype. Under bf16 autocast the activations are bf16 while the weight
    stays fp32, and that mismatch sends ``nn.RMSNorm`` to its unfused fallback (several kernels
    and passes over the activations); the fused kernel accumulates in fp32 either way."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: RotaryEmbedding2D) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class DiTBlock(nn.Module):
    """Pre-norm block (RMSNorm, RoPE attention, SwiGLU) with adaLN-Zero conditioning.

    The condition c is (B, D) for a global condition (the trunk) or (B, N, D) per token (the DDT
    head). Its modulation layer starts at zero, so every block starts as the identity: the
    residual gates are zero and training begins from a well-conditioned, shallow network.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = RMSNorm(width, eps=1e-6)
        # SwiGLU with 2/3 of the usual hidden width keeps the parameter count of a GELU MLP.
        self.mlp = SwiGLU(width, int(2 / 3 * mlp_ratio * width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor, rope: RotaryEmbedding2D) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + _gate(self.attn(modulate(self.norm1(x), shift1, scale1), rope), gate1)
        x = x + _gate(self.mlp(modulate(self.norm2(x), shift2, scale2)), gate2)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map to the token's channels; zero-initialised so the
    untrained model predicts zero velocity."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(width, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

