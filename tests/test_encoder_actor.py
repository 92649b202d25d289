"""The encode job's encoder actor, called directly (no Ray): its latents are the encoder's, in the
store dtype, for every batch split and with the flipped view; on CPU it takes the threads it is
given; on CUDA its pipelined path (pinned double buffers) returns exactly the synchronous result."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines.encoder_actor import LatentEncoder
from rae.encoders import ENCODER_PRESETS, load_encoder

ENCODER, INPUT = "dinov2-s-offline", 56


@pytest.fixture(scope="module")
def digest() -> str:
    return load_encoder(ENCODER, input_size=INPUT).weights_digest


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    size = ENCODER_PRESETS[ENCODER].with_input_size(INPUT).image_size
    data = np.random.default_rng(0).integers(0, 256, (7, size, size, 3), dtype=np.uint8)
    data.setflags(write=False)  # what Ray hands an actor
    return data


def reference(images: np.ndarray, flip: bool) -> np.ndarray:
    encoder = load_encoder(ENCODER, input_size=INPUT)
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255.0
    views = [x, x.flip(-1)] if flip else [x]
    with torch.inference_mode():
        return torch.stack([encoder(v) for v in views], dim=1).half().numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_cpu_latents_are_the_encoders_for_any_batch_split(images, digest, flip):
    """Within one float16 step (plus float32 noise, 1e-5, for values near 0) of the encoder's own output: a
    CPU's matrix kernels may block a batch of 1 or 3 differently from one of 7 (seen on a Xeon CI machine:
    0.6% of values one float16 step apart, values near 0 up to 1e-6 off), so the float32 sums differ in
    their last bits and a few land on the other side of a float16 rounding."""
    expected = reference(images, flip).astype(np.float32)
    one_step = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32) + 1e-5
    for batch_size in (1, 3, 7, 64):
        actor = LatentEncoder(ENCODER, None, INPUT, flip, "float16", batch_size, digest)
        out = actor.encode(images)
        assert out.dtype == np.float16 and out.shape == (7, 2 if flip else 1, 16, 384)
        assert np.all(np.abs(out.astype(np.float32) - expected) <= one_step), batch_size


def test_empty_shard_gives_an_empty_array_of_the_right_shape(digest, images):
    actor = LatentEncoder(ENCODER, None, INPUT, True, "float32", 4, digest)
    out = actor.encode(images[:0])
    assert out.shape == (0, 2, 16, 384) and out.dtype == np.float32


def test_cpu_actor_uses_the_threads_it_is_given_within_its_cores(digest):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as Ray starts a num_cpus=1 actor
        LatentEncoder(ENCODER, None, INPUT, False, "float16", 4, digest, cpu_threads=2)
        assert torch.get_num_threads() == min(2, len(os.sched_getaffinity(0)))
        LatentEncoder(ENCODER, None, INPUT, False, "float16", 4, digest, cpu_threads=10**6)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_weights_other_than_the_drivers_are_refused(digest):
    with pytest.raises(RuntimeError, match="differ from the driver's"):
        LatentEncoder(ENCODER, None, INPUT, False, "float16", 4, "0" * 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pipelined path needs CUDA")
@pytest.mark.parametrize("flip", [False, True])
def test_cuda_pipelined_latents_equal_the_synchronous_ones(images, flip, tmp_path):
    from safetensors.torch import save_file

    from rae.encoders import state_dict_digest

    # Random weights from a file: the offline weights' package need not be on a GPU machine.
    trunk = load_encoder(ENCODER, input_size=INPUT, random_init=True).trunk
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(tmp_path / "w.safetensors"))
    weights, digest = str(tmp_path / "w.safetensors"), state_dict_digest(trunk)
    encoder = load_encoder(ENCODER, input_size=INPUT, weights=weights, device="cuda")
    many = np.concatenate([images] * 5)  # 35 images: several batches in each slot, a short last one

    def synchronous(chunk: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(chunk.copy()).cuda().permute(0, 3, 1, 2).float() / 255.0
        views = [x, x.flip(-1)] if flip else [x]
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.stack([encoder(v).float() for v in views], dim=1).half().cpu().numpy()

    for batch_size in (1, 4, 35, 64):
        actor = LatentEncoder(ENCODER, weights, INPUT, flip, "float16", batch_size, digest)
        expected = np.concatenate([synchronous(many[i:i + batch_size]) for i in range(0, len(many), batch_size)])
        np.testing.assert_array_equal(actor.encode(many), expected)
        np.testing.assert_array_equal(actor.encode(many[:3]), synchronous(many[:3]))  # slots reused, shorter
