"""Fixed 2-D sin-cos positions: one table for the decoder and both DiTs, equal to the MAE / official
RAE formula (the column half first)."""
import math

import pytest
import torch

from rae.decoder import build_decoder
from rae.dit import DiT, DiTConfig, DiTDH
from rae.positions import sincos_pos_embed_2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _mae_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE's ``get_1d_sincos_pos_embed_from_grid`` in float64: sines then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _columns_first_reference(dim: int, grid: int) -> torch.Tensor:
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_mae_1d(dim // 2, cols.flatten()), _mae_1d(dim // 2, rows.flatten())], dim=1).float()


@pytest.mark.parametrize("dim,grid", [(4, 3), (32, 4), (384, 8), (1152, 16)])
def test_table_equals_the_mae_formula_columns_first_bit_for_bit(dim: int, grid: int) -> None:
    assert torch.equal(sincos_pos_embed_2d(dim, grid), _columns_first_reference(dim, grid))


def test_first_half_follows_the_column_second_half_the_row() -> None:
    pos = sincos_pos_embed_2d(8, 3)  # token index = 3 * row + col
    assert torch.equal(pos[3, :4], pos[0, :4]) and not torch.equal(pos[3, 4:], pos[0, 4:])
    assert torch.equal(pos[1, 4:], pos[0, 4:]) and not torch.equal(pos[1, :4], pos[0, :4])
    assert pos[1, 0] == pytest.approx(math.sin(1.0))  # column 1, first frequency
    assert pos[3, 4] == pytest.approx(math.sin(1.0))  # row 1, first frequency


def test_decoder_dit_and_ditdh_hold_the_columns_first_table() -> None:
    decoder = build_decoder("tiny", latent_channels=8, grid=4)
    small = dict(width=32, depth=1, heads=2, latent_channels=8, grid=4, num_classes=2, allow_narrow=True)
    dit = DiT(DiTConfig(head_depth=0, **small))
    ditdh = DiTDH(DiTConfig(head_width=32, head_depth=1, head_heads=2, **small))
    assert torch.equal(decoder.pos_embed[0, 1:], _columns_first_reference(decoder.config.width, 4))
    assert not decoder.pos_embed[0, 0].any()  # the CLS token's row is zero, as in MAE
    assert torch.equal(dit.pos_embed, _columns_first_reference(32, 4))
    assert torch.equal(ditdh.pos_embed, _columns_first_reference(32, 4))


def test_width_not_divisible_by_four_is_refused() -> None:
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_pos_embed_2d(6, 2)
