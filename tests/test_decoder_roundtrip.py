"""Round trip on real photographs: real frozen DINOv2-S (offline) -> tiny decoder -> pixels.

Eight 64-px crops of skimage's photographs (astronaut, coffee, chelsea, rocket) are encoded once
by the offline DINOv2-S at 56 px (a 4x4 grid of 384-channel tokens). A tiny decoder trained with L1
for 300 steps must reconstruct them far better than the trivial baseline (the mean image of the
set): measured 22.6 dB against 13.4 dB. The encoder must not change.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from jobs.demo.photos import load_photo as photo
from rae.decoder import build_decoder
from rae.encoders import load_encoder, state_dict_digest

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZE = 64


def two_crops(name: str) -> list[torch.Tensor]:
    """A centred square crop and a quarter-size detail crop, each resized to SIZE."""
    image = torch.from_numpy(photo(name)).permute(2, 0, 1).float() / 255
    h, w = image.shape[1:]
    s = min(h, w)
    centre = image[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    detail = image[:, h // 2 - s // 4:h // 2 + s // 4, w // 2 - s // 4:w // 2 + s // 4]
    resize = lambda c: F.interpolate(c[None], size=(SIZE, SIZE), mode="bicubic", antialias=True).clamp(0, 1)[0]  # noqa: E731
    return [resize(centre), resize(detail)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(1.0 / mse)).mean().item()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.stack([crop for name in PHOTOS for crop in two_crops(name)])


def test_tiny_decoder_reconstructs_real_photos_from_frozen_dinov2_latents(images):
    torch.manual_seed(0)
    encoder = load_encoder("dinov2-s-offline", input_size=56)
    assert encoder.spec.image_size == SIZE and encoder.spec.grid == 4
    before = copy.deepcopy(encoder.state_dict())
    digest = state_dict_digest(encoder)

    decoder = build_decoder(
        "tiny", latent_channels=encoder.spec.channels, grid=encoder.spec.grid,
        width=128, depth=2, heads=4, mlp_dim=512,
        noise_tau=0.0,  # plain reconstruction here; noise augmentation is tested in test_decoder.py
    )
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    steps = 300
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=2e-4)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster than two fighting over a shared CPU
    try:
        encoder.train()  # a no-op for the frozen encoder
        # The first steps run end to end through the encoder; then the (frozen) latents are cached.
        for step in range(steps):
            if step < 5:
                latents = encoder(images)
            elif step == 5:
                latents = latents.detach()
            loss = (decoder.train()(latents) - images).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            reconstructed = decoder.eval()(encoder(images)).clamp(0, 1)
    finally:
        torch.set_num_threads(threads)

    trained = psnr(reconstructed, images)
    baseline = psnr(images.mean(dim=0, keepdim=True).expand_as(images), images)
    print(f"round-trip PSNR {trained:.2f} dB vs mean-image baseline {baseline:.2f} dB")
    assert 13.0 < baseline < 14.5  # the baseline is what these photos give, 13.4 dB
    assert trained > baseline + 6.0, f"trained {trained:.2f} dB vs baseline {baseline:.2f} dB"

    assert all(p.grad is None for p in encoder.parameters())
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert state_dict_digest(encoder) == digest
