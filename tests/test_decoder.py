"""The ViT pixel decoder: shapes, layout, un-normalization, noise augmentation, presets, errors."""
import pytest
import torch
from scipy import stats

from rae.decoder import DECODER_PRESETS, DecoderConfig, ViTDecoder, build_decoder
from rae.positions import sincos_pos_embed_2d


def test_tiny_decoder_maps_default_grid_to_256_pixels():
    decoder = build_decoder("tiny", latent_channels=768, grid=16)
    images = decoder(torch.randn(2, 256, 768))
    assert images.shape == (2, 3, 256, 256)
    assert images.dtype == torch.float32


def test_grid_other_than_16_gives_grid_times_16_pixels():
    decoder = build_decoder("tiny", latent_channels=384, grid=7)
    assert decoder(torch.randn(3, 49, 384)).shape == (3, 3, 112, 112)


@pytest.mark.parametrize(
    "bad_shape", [(2, 48, 384), (2, 49, 383), (49, 384), (2, 7, 7, 384)], ids=["tokens", "channels", "2d", "4d"]
)
def test_wrong_latent_shape_names_the_expected_shape(bad_shape):
    decoder = build_decoder("tiny", latent_channels=384, grid=7)
    with pytest.raises(ValueError, match=r"\(B, N, C\) = \(B, 49, 384\)"):
        decoder(torch.randn(*bad_shape))


def test_integer_latents_are_rejected():
    decoder = build_decoder("tiny", latent_channels=8, grid=2)
    with pytest.raises(TypeError, match="floating-point"):
        decoder(torch.zeros(1, 4, 8, dtype=torch.int64))


def test_unpatchify_puts_token_i_at_row_major_grid_cell():
    decoder = build_decoder("tiny", latent_channels=8, grid=3)
    p = decoder.config.pixel_patch
    # token t carries value 100*t + 10*channel + (pixel row within patch == 0)
    patches = torch.zeros(1, 9, p, p, 3)
    for t in range(9):
        for c in range(3):
            patches[0, t, :, :, c] = 100 * t + 10 * c
    patches[0, :, 0, :, :] += 1
    image = decoder.unpatchify(patches.reshape(1, 9, p * p * 3))
    for t in range(9):
        r, col = divmod(t, 3)
        cell = image[0, :, r * p:(r + 1) * p, col * p:(col + 1) * p]
        for c in range(3):
            assert cell[c, 0].eq(100 * t + 10 * c + 1).all()
            assert cell[c, 1:].eq(100 * t + 10 * c).all()


def test_output_is_unnormalized_with_the_encoders_mean_and_std():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    decoder = build_decoder("tiny", latent_channels=8, grid=2, image_mean=mean, image_std=std)
    with torch.no_grad():
        decoder.head.weight.zero_()
        decoder.head.bias.fill_(1.0)  # the head predicts 1.0 in normalized space everywhere
    images = decoder(torch.randn(2, 4, 8))
    expected = torch.tensor([m + s for m, s in zip(mean, std)]).view(1, 3, 1, 1).expand_as(images)
    torch.testing.assert_close(images, expected)


def test_positions_are_fixed_sincos_not_parameters():
    decoder = build_decoder("tiny", latent_channels=8, grid=4)
    assert all("pos_embed" not in name for name, _ in decoder.named_parameters())
    torch.testing.assert_close(decoder.pos_embed[0, 1:], sincos_pos_embed_2d(decoder.config.width, 4))
    assert torch.unique(decoder.pos_embed[0, 1:], dim=0).shape[0] == 16  # every cell is distinct
    assert not decoder.pos_embed[0, 0].any()  # the CLS token's row


def test_noise_sigma_is_tau_times_uniform_per_sample():
    torch.manual_seed(1)
    tau, batch, tokens, channels = 0.8, 1000, 16, 512
    decoder = build_decoder("tiny", latent_channels=channels, grid=4, noise_tau=tau).train()
    latents = torch.randn(batch, tokens, channels)
    noise = decoder.augment_with_noise(latents) - latents
    sigma = noise.flatten(1).std(dim=1)  # 8192 draws per sample: ~0.8% relative error
    assert sigma.max() <= tau * 1.03
    ks = stats.kstest(sigma.numpy(), stats.uniform(loc=0, scale=tau).cdf)
    assert ks.pvalue > 0.01, f"sigma is not U(0, {tau}): KS statistic {ks.statistic:.3f}"
    # the same check rejects a wrong tau: the sample is not U(0, 1)
    assert stats.kstest(sigma.numpy(), stats.uniform(loc=0, scale=1.0).cdf).pvalue < 1e-6
    # noise is Gaussian within a sample (zero mean)
    assert noise.flatten(1).mean(dim=1).abs().max() < 0.05


def test_noise_augmentation_is_identity_in_eval_mode():
    decoder = build_decoder("tiny", latent_channels=16, grid=2).eval()
    latents = torch.randn(4, 4, 16)
    assert torch.equal(decoder.augment_with_noise(latents), latents)


def test_forward_itself_adds_no_noise_in_train_mode():
    decoder = build_decoder("tiny", latent_channels=16, grid=2).train()
    latents = torch.randn(4, 4, 16)
    torch.testing.assert_close(decoder(latents), decoder(latents))


@pytest.mark.parametrize(
    "name, width, depth, heads, mlp",
    [("vit-b", 768, 12, 12, 3072), ("vit-l", 1024, 24, 16, 4096), ("vit-xl", 1152, 28, 16, 4096)],
)
def test_presets_have_the_papers_sizes_and_build_on_meta(name, width, depth, heads, mlp):
    with torch.device("meta"):
        decoder = build_decoder(name, latent_channels=768, grid=16)
    assert (decoder.config.width, decoder.config.depth, decoder.config.heads) == (width, depth, heads)
    assert len(decoder.blocks) == depth
    assert decoder.blocks[0].mlp.fc1.out_features == mlp
    assert decoder.blocks[0].attn.num_heads == heads
    assert decoder.head.out_features == 16 * 16 * 3


def test_unknown_preset_and_field_are_rejected():
    with pytest.raises(ValueError, match="vit-xl"):
        build_decoder("vit-h", latent_channels=768, grid=16)
    with pytest.raises(TypeError, match="widht"):
        build_decoder("tiny", latent_channels=768, grid=16, widht=32)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViTDecoder(DecoderConfig(width=66, heads=4, depth=1, mlp_dim=8, latent_channels=4, grid=2))
    assert set(DECODER_PRESETS) >= {"vit-b", "vit-l", "vit-xl", "tiny"}
