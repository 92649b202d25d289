"""DiT and DiT^DH: sizes against the paper, shapes, conditioning, the width rule."""
import pytest
import torch

from rae.dit import DIT_PRESETS, DiT, DiTConfig, DiTDH, build_dit
from rae.model_summary import count_parameters
from rae.dit_blocks import Attention, DiTBlock, FinalLayer, RotaryEmbedding2D, patchify, unpatchify
from rae.positions import sincos_pos_embed_2d


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_params(preset: str, **overrides) -> int:
    with torch.device("meta"):
        return count_parameters(build_dit(preset, **overrides), trainable_only=True)


@pytest.mark.parametrize("preset,paper_millions", [("dit-xl", 676), ("ditdh-xl", 839)])
def test_xl_parameter_counts_match_the_paper_within_one_percent(preset: str, paper_millions: int) -> None:
    # Measured: dit-xl 676.95M, ditdh-xl 838.38M (fixed positions and Fourier frequencies are buffers).
    params = _meta_params(preset)
    assert abs(params / 1e6 - paper_millions) / paper_millions < 0.01, params


def test_every_preset_builds_and_runs_on_the_meta_device() -> None:
    for name in DIT_PRESETS:
        with torch.device("meta"):
            model = build_dit(name, allow_narrow=True)
            out = model(torch.empty(2, 256, 768), torch.empty(2), torch.zeros(2, dtype=torch.long))
        assert out.shape == (2, 256, 768) and out.device.type == "meta", name
        assert isinstance(model, DiTDH if name.startswith("ditdh") else DiT)


def test_a_dit_narrower_than_its_tokens_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"dit-s: width 384 is narrower than the token dimension 768"):
        _meta_params("dit-s")
    # patch 2 on 256 channels: tokens of 2 * 2 * 256 = 1024 values, too many for DiT-B's 768.
    with pytest.raises(ValueError, match="token dimension 1024"):
        _meta_params("dit-b", latent_channels=256, patch_size=2)
    assert _meta_params("dit-s", allow_narrow=True) > 0


def test_ditdh_width_rule_applies_to_the_head_that_predicts_the_velocity() -> None:
    assert _meta_params("ditdh-s") > 0  # 384-wide trunk, 2048-wide head: fine on 768 channels
    with pytest.raises(ValueError, match="head_width 512"):
        _meta_params("ditdh-s", head_width=512)


def test_build_dit_rejects_unknown_presets_and_fields() -> None:
    with pytest.raises(ValueError, match="unknown DiT preset 'dit-xxl'"):
        build_dit("dit-xxl")
    with pytest.raises(TypeError, match="hidden_size"):
        build_dit("dit-tiny", latent_channels=8, grid=4, hidden_size=64)


def test_config_rejects_a_head_dimension_rope_cannot_rotate() -> None:
    with pytest.raises(ValueError, match="head dimension"):
        DiTConfig(width=96, heads=16, head_depth=0, latent_channels=8)


def _tiny(preset: str = "ditdh-tiny", **overrides) -> torch.nn.Module:
    sizes = dict(latent_channels=8, grid=4, num_classes=5, width=32, heads=2, depth=2)
    if preset.startswith("ditdh"):
        sizes.update(head_width=32, head_heads=2)
    return build_dit(preset, **{**sizes, **overrides})


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset", ["dit-tiny", "ditdh-tiny"])
def test_adaln_zero_model_predicts_zero_velocity_at_initialisation(preset: str) -> None:
    model = _tiny(preset)
    out = model(torch.randn(3, 16, 8), torch.rand(3), torch.tensor([0, 1, 5]))
    assert torch.equal(out, torch.zeros(3, 16, 8))


@pytest.mark.parametrize("preset", ["dit-tiny", "ditdh-tiny"])
def test_forward_and_backward_reach_every_parameter(preset: str) -> None:
    model = _randomize(_tiny(preset))
    x = torch.randn(3, 16, 8, requires_grad=True)
    out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 16, 8)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if name.startswith("y_embedder"):
            continue  # only the rows of the labels used get gradient
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_patch_size_two_maps_blocks_of_tokens_and_back() -> None:
    x = torch.randn(2, 64, 5)
    tokens = patchify(x, 8, 2)
    assert tokens.shape == (2, 16, 20)
    assert torch.equal(tokens[0, 0], torch.cat([x[0, 0], x[0, 1], x[0, 8], x[0, 9]]))  # a 2x2 block
    assert torch.equal(unpatchify(tokens, 8, 2), x)
    model = _randomize(_tiny("ditdh-tiny", latent_channels=4, patch_size=2))
    assert model(torch.randn(2, 16, 4), torch.rand(2), torch.tensor([1, 2])).shape == (2, 16, 4)


def test_label_dropout_is_off_in_eval_mode() -> None:
    model = _randomize(_tiny("dit-tiny", class_dropout=0.5)).eval()
    x, t, y = torch.randn(8, 16, 8), torch.rand(8), torch.arange(8) % 5
    assert torch.equal(model(x, t, y), model(x, t, y))
    assert not torch.allclose(model(x, t, y), model(x, t, torch.full_like(y, 5)))


def test_label_dropout_in_training_replaces_labels_by_the_null_class() -> None:
    model = _randomize(_tiny("dit-tiny", class_dropout=0.999))
    x, t, y = torch.randn(4, 16, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)  # with p = 0.999 all four labels drop (probability 0.996)
    dropped = model.train()(x, t, y)
    null = model.eval()(x, t, torch.full_like(y, 5))
    assert torch.allclose(dropped, null, atol=1e-6)


def test_the_class_tables_initial_scale_is_a_config_field_kept_in_the_export() -> None:
    """DiT's 0.02 by default; the demo's 1.0 lets a short run's labels reach the blocks from the start."""
    from jobs.model_import import dit_export_kwargs

    torch.manual_seed(0)
    assert 0.015 < float(_tiny("ditdh-tiny").y_embedder.table.weight.std()) < 0.025
    wide = _tiny("ditdh-tiny", label_init_std=1.0)
    assert 0.8 < float(wide.y_embedder.table.weight.std()) < 1.2
    assert build_dit("ditdh-tiny", **dit_export_kwargs(wide.config)).config == wide.config


def test_model_outputs_depend_on_time_and_class() -> None:
    model = _randomize(_tiny()).eval()
    x = torch.randn(2, 16, 8)
    base = model(x, torch.tensor([0.3, 0.3]), torch.tensor([1, 1]))
    assert not torch.allclose(base, model(x, torch.tensor([0.7, 0.7]), torch.tensor([1, 1])))
    assert not torch.allclose(base, model(x, torch.tensor([0.3, 0.3]), torch.tensor([2, 2])))


def test_forward_rejects_latents_of_the_wrong_shape() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match=r"x_t must be \(B, 16, 8\)"):
        model(torch.randn(2, 16, 9), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class labels"):
        model(torch.randn(2, 16, 8), torch.rand(2), torch.zeros(2))


def test_rope_attention_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding2D(head_dim=8, grid=4)
    q, k = torch.randn(8), torch.randn(8)
    rq = rope(q.expand(1, 1, 16, 8))[0, 0]
    rk = rope(k.expand(1, 1, 16, 8))[0, 0]
    scores = rq @ rk.T  # token index = 4 * row + col
    assert torch.allclose(scores[0, 5], scores[10, 15], atol=1e-5)  # (0,0)->(1,1) vs (2,2)->(3,3)
    assert torch.allclose(scores[1, 4], scores[6, 9], atol=1e-5)  # (0,1)->(1,0) vs (1,2)->(2,1)
    assert not torch.allclose(scores[0, 5], scores[0, 6], atol=1e-3)


def _attention_on_grid(attention: Attention, rope: RotaryEmbedding2D, grid: int, pattern: torch.Tensor,
                       row: int, col: int) -> torch.Tensor:
    """The attention output on a grid of zero tokens holding `pattern` (h, w, width) at (row, col),
    as a (grid, grid, width) tensor."""
    h, w, width = pattern.shape
    tokens = torch.zeros(grid, grid, width)
    tokens[row:row + h, col:col + w] = pattern
    with torch.no_grad():
        return attention(tokens.reshape(1, grid * grid, width), rope).reshape(grid, grid, width)


def test_rope_attention_moves_with_its_input_and_sees_the_arrangement() -> None:
    """Rotating both queries and keys makes attention scores depend on relative positions only, so a
    pattern moved across the grid (among zero tokens: no qkv bias, zero keys and values) gives the
    same outputs, moved. Rotating only one of them would tie the scores to absolute positions.
    Without RoPE the outputs would not depend on how the pattern's tokens are arranged."""
    grid, width = 6, 16
    attention, rope = Attention(width, heads=2), RotaryEmbedding2D(head_dim=8, grid=grid)
    with torch.no_grad():
        attention.qkv.bias.zero_()
    pattern = 2.0 * torch.randn(2, 3, width)
    at_origin = _attention_on_grid(attention, rope, grid, pattern, 0, 0)
    moved = _attention_on_grid(attention, rope, grid, pattern, 3, 2)
    assert torch.allclose(moved[3:5, 2:5], at_origin[0:2, 0:3], rtol=1e-5, atol=1e-5)
    assert torch.allclose(moved[0, 0], at_origin[5, 5], rtol=1e-5, atol=1e-5)  # a zero token: uniform
    mirrored = _attention_on_grid(attention, rope, grid, pattern.flip(1), 0, 0)[0:2, 0:3].flip(1)
    assert (mirrored - at_origin[0:2, 0:3]).abs().max() > 1e-2


def _fresh_tiny(preset: str) -> torch.nn.Module:
    """A model as initialised, its embedders randomised so that every block sees a non-trivial
    input and condition (the check is that the blocks pass them through unchanged)."""
    model = _tiny(preset)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedder" in name or "projector" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset", ["dit-tiny", "ditdh-tiny"])
def test_adaln_zero_makes_every_fresh_block_the_identity(preset: str) -> None:
    """The official adaLN-Zero initialisation: each block's modulation layer (weight and bias) starts
    at zero, so its gates are zero and a fresh block passes its input through unchanged, for the
    global condition of the trunk and the per-token condition of the DDT head alike."""
    model = _fresh_tiny(preset)
    blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
    assert len(blocks) == (4 if preset.startswith("ditdh") else 2)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], args[1], out))) for b in blocks]
    with torch.no_grad():
        out = model(torch.randn(3, 16, 8), torch.rand(3), torch.tensor([0, 1, 5]))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(blocks)
    for x, c, y in seen:
        assert x.abs().max() > 0.1 and c.abs().max() > 0.1  # something to pass through, and a condition
        assert torch.equal(y, x)
    assert torch.equal(out, torch.zeros(3, 16, 8))


def test_a_fresh_final_layer_is_unmodulated_and_outputs_zero() -> None:
    """Both of the final layer's linears start at zero: the output is zero, and once the output
    linear has learned something its input is the plain normalised token (shift 0, scale 0)."""
    layer = FinalLayer(16, 8)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.equal(layer(x, c), torch.zeros(2, 5, 8))
    with torch.no_grad():
        layer.linear.weight.normal_()
        layer.linear.bias.normal_()
    assert torch.equal(layer(x, c), layer.linear(layer.norm(x)))
    assert torch.equal(layer(x, c.unsqueeze(1).expand(2, 5, 16)), layer.linear(layer.norm(x)))


def test_sincos_positions_are_distinct_and_bounded() -> None:
    pos = sincos_pos_embed_2d(32, 4)
    assert pos.shape == (16, 32)
    assert pos.abs().max() <= 1.0
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1
