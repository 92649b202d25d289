"""uint8 NHWC <-> float NCHW in [0, 1]: the one conversion every stage uses, and its inverse."""
import pytest
import torch

from rae.image_tensors import quantize, to_uint8_images, to_unit_images


def test_every_uint8_value_survives_the_round_trip() -> None:
    images = torch.arange(256, dtype=torch.uint8).repeat(3 * 2).reshape(2, 16, 16, 3)
    unit = to_unit_images(images)
    assert unit.dtype == torch.float32 and unit.shape == (2, 3, 16, 16)
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert torch.equal(to_uint8_images(unit), images)


def test_channels_move_from_last_to_second_axis() -> None:
    images = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    images[..., 1] = 255  # pure green
    unit = to_unit_images(images)
    assert torch.equal(unit[0, 1], torch.ones(2, 2)) and unit[0, 0].abs().sum() == 0 and unit[0, 2].abs().sum() == 0


def test_quantize_rounds_to_nearest_and_clamps() -> None:
    x = torch.tensor([-0.5, 0.0, 0.49 / 255, 0.51 / 255, 254.5 / 255, 1.0, 1.7]).view(1, 1, 1, -1)
    assert quantize(x).flatten().tolist() == [0, 0, 0, 1, 255, 255, 255]


def test_to_uint8_images_is_quantize_in_nhwc() -> None:
    x = torch.rand(2, 3, 4, 5)
    assert torch.equal(to_uint8_images(x), quantize(x).permute(0, 2, 3, 1))


@pytest.mark.parametrize("bad", [torch.zeros(1, 4, 4, 3), torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
                                 torch.zeros(4, 4, 3, dtype=torch.uint8)])
def test_to_unit_images_refuses_anything_but_uint8_nhwc(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected uint8 images \(B, H, W, 3\)"):
        to_unit_images(bad)


def test_to_uint8_images_refuses_nhwc_input() -> None:
    with pytest.raises(ValueError, match=r"expected float images \(B, 3, H, W\)"):
        to_uint8_images(torch.zeros(1, 4, 4, 3))
