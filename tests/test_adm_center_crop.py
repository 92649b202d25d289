"""The encode's ADM centre crop is pixel-exact with the reference on real photos, odd and even sizes."""
import numpy as np
import pytest
from PIL import Image

from jobs.demo.photos import load_photo
from pipelines.image_decode import center_crop_arr


def reference_center_crop_arr(pil_image, image_size):
    """Copied verbatim from bytetriper/RAE src/utils/train_utils.py (commit a4d18c4d), itself ADM's:
    https://github.com/openai/guided-diffusion/blob/8fb3ad9197f16bbc40620447b2742e13458d2831/guided_diffusion/image_datasets.py#L126
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


# skimage's photographs (chelsea 300x451, rocket 427x640, coffee 400x600, astronaut 512x512), cut to odd
# and even sizes, landscape and portrait.
CUTS = [(None, None), (299, 451), (300, 450), (227, 341), (341, 227)]
TARGETS = [17, 32, 33, 63, 64, 99, 112, 127]


def photo_cut(name: str, height: int | None, width: int | None, portrait: bool) -> np.ndarray:
    photo = load_photo(name)
    if portrait:
        photo = photo.transpose(1, 0, 2)
    return np.ascontiguousarray(photo[:height, :width])


def resized_long_side(image_size: tuple[int, int], size: int) -> int:
    """The long side after the crop's halvings and resize: the crop's margin is this minus ``size``."""
    while min(image_size) >= 2 * size:
        image_size = tuple(x // 2 for x in image_size)
    return round(max(image_size) * size / min(image_size))


@pytest.mark.parametrize("name", ["chelsea", "rocket", "coffee", "astronaut"])
@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_crop_equals_the_reference_pixel_for_pixel(name, portrait):
    odd_margins = 0
    for height, width in CUTS:
        image = Image.fromarray(photo_cut(name, height, width, portrait))
        for size in TARGETS:
            expected = np.asarray(reference_center_crop_arr(image, size))
            got = center_crop_arr(image, size)
            assert got.shape == expected.shape == (size, size, 3), (image.size, size)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} {image.size} -> {size}")
            odd_margins += (resized_long_side(image.size, size) - size) % 2
    assert odd_margins > 0  # some crops have an odd margin, where an off-by-one shows
