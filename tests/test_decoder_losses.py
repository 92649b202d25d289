"""Decoder losses: the GAN math, where gradients go, the schedule, DiffAugment and perceptual losses."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jobs.demo.photos import load_photo as photo
from rae.decoder import build_decoder
from rae.decoder_loss import (
    DecoderLoss,
    DecoderLossConfig,
    adaptive_weight,
    adaptive_weight_at,
    generator_gan_loss,
    hinge_d_loss,
    quantize_8bit,
)
from rae.diffaugment import diff_augment, translation
from rae.discriminator import build_discriminator
from rae.encoders import load_encoder
from rae.perceptual import build_perceptual_loss, load_efficientnet_lite0

# ----------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------


def test_hinge_loss_on_hand_picked_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + fake) = 0, 1, 2.5   -> mean 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    # confident and correct on both sides: zero loss
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_generator_loss_is_negative_mean_fake_logit():
    assert generator_gan_loss(torch.tensor([[1.0, 3.0], [-2.0, 2.0]])).item() == pytest.approx(-1.0)


def test_adaptive_weight_matches_hand_computation_on_a_linear_last_layer():
    # last layer y = w . x; L_rec = (w.x - t)^2 -> grad 2 (w.x - t) x; L_gan = -(w . z) -> grad -z
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x, t, z = torch.tensor([3.0, 4.0]), torch.tensor(1.0), torch.tensor([0.6, 0.8])
    rec = (w @ x - t) ** 2  # residual 10, grad 20 * [3, 4], norm 100
    gan = -(w @ z)  # grad norm 1
    weight = adaptive_weight_at(rec, gan, w)
    assert weight.item() == pytest.approx(100.0 / (1.0 + 1e-6), rel=1e-6)
    assert not weight.requires_grad


def test_adaptive_weight_is_clamped_to_1e4():
    assert adaptive_weight(torch.tensor(5.0), torch.tensor(0.0)).item() == 1e4
    assert adaptive_weight(torch.tensor(0.0), torch.tensor(3.0)).item() == 0.0


def test_quantize_8bit_rounds_to_255_levels_and_detaches():
    x = torch.tensor([-0.2, 0.0, 0.5, 1.0 / 255 * 0.6, 1.3], requires_grad=True)
    q = quantize_8bit(x)
    torch.testing.assert_close(q, torch.tensor([0.0, 0.0, 128 / 255, 1 / 255, 1.0]))
    assert not q.requires_grad


# ----------------------------------------------------------------------------------------------
# The GAN in the loop: tiny encoder -> tiny decoder -> discriminator on a small (random) ViT-S
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gan_setup():
    encoder = load_encoder("dinov2-s-offline", random_init=True, input_size=28)  # 2x2 grid, 32 px
    decoder = build_decoder("tiny", latent_channels=encoder.spec.channels, grid=encoder.spec.grid)
    discriminator = build_discriminator("dinov2-s-offline", random_init=True, input_size=28)
    config = DecoderLossConfig(perceptual_weight=0.0, disc_start_epoch=1.0, gan_start_epoch=2.0)
    return encoder, decoder, discriminator, DecoderLoss(config, discriminator=discriminator)


def _zero_all(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def test_generator_gradients_reach_decoder_never_frozen_networks(gan_setup):
    encoder, decoder, discriminator, loss_fn = gan_setup
    _zero_all(encoder, decoder, discriminator)
    real = torch.rand(4, 3, 32, 32)
    fake = decoder(decoder.train().augment_with_noise(encoder(real)))
    total, logs = loss_fn.generator_loss(real, fake, epoch=2.0, last_layer_weight=decoder.last_layer_weight)
    total.backward()
    assert logs["adaptive_weight"] > 0 and logs["gan"] != 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    assert all(p.grad is None for p in discriminator.features.parameters())
    assert all(p.grad is None for p in encoder.parameters())


def test_discriminator_gradients_reach_heads_only(gan_setup):
    encoder, decoder, discriminator, loss_fn = gan_setup
    _zero_all(encoder, decoder, discriminator)
    real = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        fake = decoder.eval()(encoder(real))
    discriminator.train()
    d_loss, logs = loss_fn.discriminator_loss(real, fake, epoch=1.0)
    d_loss.backward()
    assert d_loss.item() == pytest.approx(logs["d_loss"].item())
    assert all(p.grad is not None for p in discriminator.trainable_parameters())
    assert sum(p.grad.abs().sum() for p in discriminator.trainable_parameters()) > 0
    assert all(p.grad is None for p in discriminator.features.parameters())
    assert all(p.grad is None for p in decoder.parameters())
    assert not discriminator.features.training  # the frozen network stays in eval mode


def _small_discriminator() -> nn.Module:
    """Stands in for the DINO discriminator where only the loss's formula is under test."""
    return nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.GELU(), nn.Conv2d(4, 1, 3), nn.Flatten())


def test_adaptive_weight_is_measured_at_the_decoders_last_layer():
    """lambda = ||grad L_rec|| / (||grad L_G|| + eps) at the weight of the layer that emits the pixels
    (the last linear the decoder runs), not at any other layer. A small conv net stands in for the
    discriminator: any module of images to logits will do for the formula."""
    decoder = build_decoder("tiny", latent_channels=8, grid=2).train()
    discriminator = _small_discriminator()
    loss_fn = DecoderLoss(DecoderLossConfig(perceptual_weight=0.0, gan_start_epoch=0.0), discriminator=discriminator)
    called: list[nn.Linear] = []
    hooks = [m.register_forward_hook(lambda m, args, out: called.append(m))
             for m in decoder.modules() if isinstance(m, nn.Linear)]
    real = torch.rand(2, 3, 32, 32)
    fake = decoder(torch.randn(2, 4, 8))
    for hook in hooks:
        hook.remove()
    last, first = called[-1].weight, called[0].weight
    assert decoder.last_layer_weight is last

    torch.manual_seed(1)  # the same DiffAugment draws for the loss and the hand computation
    _, logs = loss_fn.generator_loss(real, fake, epoch=0.0, last_layer_weight=decoder.last_layer_weight)
    torch.manual_seed(1)
    gan = generator_gan_loss(discriminator(loss_fn.augment(fake)))
    rec = (fake - real).abs().mean()  # l1 weight 1, no perceptual term

    def by_hand(weight: torch.Tensor) -> float:
        rec_grad = torch.autograd.grad(rec, weight, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan, weight, retain_graph=True)[0]
        return (rec_grad.norm() / (gan_grad.norm() + 1e-6)).item()

    assert logs["adaptive_weight"].item() == pytest.approx(by_hand(last), rel=1e-5)
    assert logs["adaptive_weight"].item() != pytest.approx(by_hand(first), rel=0.05)


def test_discriminator_sees_augmented_reals_and_augmented_8bit_fakes():
    """L_D = hinge(D(DiffAug(x)), D(DiffAug(q8(x_hat)))), the fakes drawn first: the fakes are what a
    saved image would hold (clamped, rounded to 1/255), not the decoder's raw output."""
    discriminator = _small_discriminator()
    loss_fn = DecoderLoss(DecoderLossConfig(perceptual_weight=0.0, disc_start_epoch=0.0), discriminator=discriminator)
    real = torch.rand(2, 3, 32, 32)
    fake = 2.0 * torch.rand(2, 3, 32, 32) - 0.5  # a quarter of it outside [0, 1]: the clamp shows
    torch.manual_seed(1)
    d_loss, logs = loss_fn.discriminator_loss(real, fake, epoch=0.0)
    torch.manual_seed(1)
    logits_fake = discriminator(loss_fn.augment(quantize_8bit(fake)))
    logits_real = discriminator(loss_fn.augment(real))
    assert logs["logits_fake"].item() == pytest.approx(logits_fake.mean().item(), rel=1e-6)
    assert logs["logits_real"].item() == pytest.approx(logits_real.mean().item(), rel=1e-6)
    assert d_loss.item() == pytest.approx(hinge_d_loss(logits_real, logits_fake).item(), rel=1e-6)
    torch.manual_seed(1)
    raw = discriminator(loss_fn.augment(fake))
    assert (raw - logits_fake).abs().max() > 1e-3


def test_gan_term_is_zero_before_its_start_and_discriminator_idle_before_its_start(gan_setup):
    encoder, decoder, discriminator, loss_fn = gan_setup
    real = torch.rand(2, 3, 32, 32)
    fake = decoder.train()(encoder(real))
    total, logs = loss_fn.generator_loss(real, fake, epoch=1.99, last_layer_weight=decoder.last_layer_weight)
    assert logs["gan"] == 0.0 and logs["adaptive_weight"] == 0.0
    torch.testing.assert_close(total, (fake - real).abs().mean(), rtol=0, atol=0)
    assert loss_fn.discriminator_loss(real, fake, epoch=0.99) == (None, {})
    total_on, logs_on = loss_fn.generator_loss(real, fake, epoch=2.0, last_layer_weight=decoder.last_layer_weight)
    assert logs_on["gan"] != 0.0
    expected = logs_on["l1"] + 0.75 * logs_on["adaptive_weight"] * logs_on["gan"]
    assert total_on.item() == pytest.approx(expected.item(), rel=1e-5)


def test_paper_defaults_of_the_loss_config():
    c = DecoderLossConfig()
    assert (c.l1_weight, c.perceptual_weight, c.gan_weight) == (1.0, 1.0, 0.75)
    assert c.mse_weight == 0.0  # the squared-error term is the demo's lever, not the paper's
    assert (c.disc_start_epoch, c.gan_start_epoch, c.adaptive_weight_max) == (6.0, 8.0, 1e4)
    assert c.diffaug_translation == 0.125 and set(c.diffaug_policy) == {"color", "translation"}


def test_the_reconstruction_loss_weighs_l1_and_squared_error_on_hand_picked_pixels():
    real = torch.zeros(1, 3, 2, 2)
    fake = torch.tensor([0.5, -0.5, 1.0, 0.0]).repeat(3).reshape(1, 3, 2, 2)  # |e| mean 0.5, e^2 mean 0.375
    rec, logs = DecoderLoss(DecoderLossConfig(l1_weight=2.0, mse_weight=4.0, perceptual_weight=0.0)
                            ).reconstruction_loss(real, fake)
    assert logs["l1"].item() == pytest.approx(0.5) and logs["mse"].item() == pytest.approx(0.375)
    assert rec.item() == pytest.approx(2.0 * 0.5 + 4.0 * 0.375)
    rec, logs = DecoderLoss(DecoderLossConfig(perceptual_weight=0.0)).reconstruction_loss(real, fake)
    assert rec.item() == pytest.approx(0.5) and "mse" not in logs  # off by default: the paper's L1
    with pytest.raises(ValueError, match=r"DecoderLossConfig.mse_weight must be >= 0, got -1"):
        DecoderLossConfig(mse_weight=-1.0)
    with pytest.raises(ValueError, match="all 0; the decoder would learn no reconstruction"):
        DecoderLossConfig(l1_weight=0.0, perceptual_weight=0.0)


def test_missing_perceptual_module_with_nonzero_weight_is_an_error():
    with pytest.raises(ValueError, match="perceptual_weight"):
        DecoderLoss(DecoderLossConfig(perceptual_weight=1.0))


def test_discriminator_hub_backbone_offline_fails_with_instructions():
    with pytest.raises(RuntimeError, match="weights=PATH"):
        build_discriminator("dino-vits8", input_size=32)


def test_discriminator_loads_backbone_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = build_discriminator("dino-vits8", random_init=True, input_size=32)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.features.state_dict().items()}, str(path))
    loaded = build_discriminator("dino-vits8", weights=path, input_size=32)
    for (name, a), b in zip(source.features.state_dict().items(), loaded.features.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.weights_digest != "random-init"
    assert loaded(torch.rand(2, 3, 32, 32)).shape == (2, 5 * 16)  # 5 heads x (32/8)^2 tokens


# ----------------------------------------------------------------------------------------------
# DiffAugment
# ----------------------------------------------------------------------------------------------


def test_translation_shifts_by_whole_pixels_within_one_eighth():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    u_h, u_w = torch.rand(2, 8, generator=g)
    y = translation(x, u_h, u_w, 0.125)  # shifts in [-2, 2]
    for i in range(8):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[i])
                src = x[i][:, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)]
                shifted[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
                matches.append(torch.equal(shifted, y[i]))
        assert sum(matches) == 1


def test_diff_augment_is_differentiable_and_keeps_shape():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Perceptual losses
# ----------------------------------------------------------------------------------------------


def _photo(name: str, size: int) -> torch.Tensor:
    image = torch.from_numpy(photo(name)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)


def test_efficientnet_lite0_weights_are_really_trained_on_imagenet():
    model = load_efficientnet_lite0()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = {  # ImageNet class indices a trained classifier must put first
        "coffee": {967, 968, 504},  # espresso, cup, coffee mug
        "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        "rocket": {657, 744, 812},  # missile, projectile, space shuttle
    }
    with torch.no_grad():
        for name, classes in expected.items():
            probs = model((_photo(name, 224) - mean) / std).softmax(-1)[0]
            assert probs.argmax().item() in classes, name
            assert probs[list(classes)].sum() > 0.5, name


def test_efficientnet_perceptual_distance_grows_with_degradation_and_is_frozen():
    loss = build_perceptual_loss("efficientnet-lite0")
    loss.train()  # must stay a frozen, eval-mode network
    assert not loss.net.training and not any(p.requires_grad for p in loss.parameters())
    x = _photo("astronaut", 64)
    blurs = [F.avg_pool2d(x, k, stride=1, padding=k // 2) for k in (3, 5, 9)]
    distances = [loss(x, b).item() for b in blurs]
    assert loss(x, x).item() == 0.0
    assert 0 < distances[0] < distances[1] < distances[2]
    unrelated = loss(x, torch.rand_like(x)).item()  # LPIPS's range: [0, 1], noise far from a photo
    assert distances[2] < unrelated <= 1.0
    y = blurs[0].clone().requires_grad_(True)
    loss(x, y).sum().backward()
    assert y.grad.abs().sum() > 0


def test_lpips_vgg_without_the_vgg_file_refuses_and_says_how_to_fix(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*weights=") as err:
        build_perceptual_loss("lpips-vgg", weights=missing)
    assert "efficientnet-lite0" in str(err.value)


def test_lpips_vgg_loads_the_trunk_from_a_torchvision_file(tmp_path):
    from torchvision.models import vgg16

    features = vgg16().features  # stands in for the ImageNet file (same keys and shapes)
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = build_perceptual_loss("lpips-vgg", weights=path)
    torch.testing.assert_close(loss.lpips.net.slice1[0].weight, features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(getattr(loss.lpips.net.slice5, "28").bias, features[28].bias, rtol=0, atol=0)
    x = torch.rand(2, 3, 32, 32)
    assert loss(x, x).shape == (2,) and loss(x, x).abs().max() == 0
    assert (loss(x, torch.rand(2, 3, 32, 32)) > 0).all()


def test_lpips_vgg_rejects_a_file_that_is_not_vgg16(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        build_perceptual_loss("lpips-vgg", weights=path)


def test_unknown_perceptual_kind_is_rejected():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        build_perceptual_loss("lpips-alex")
