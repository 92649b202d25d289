"""Fixed 2-D sin-cos position embeddings, shared by the pixel decoder and DiT / DiT^DH."""
from __future__ import annotations

import torch
from torch import Tensor


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed positions (grid*grid, dim), float32, tokens row-major over the grid.

    The official RAE (and MAE, DiT) table: the first half of the channels encodes the token's
    column, the second half its row; each half is sines then cosines over ``dim // 4`` geometric
    frequencies (base 10000), computed in float64 and rounded once.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()
