"""LatentSpec: the one description of a latent space, its JSON form and the one comparison."""
from __future__ import annotations

import dataclasses
import json

import pytest

from rae.encoders import DEFAULT_ENCODER, ENCODER_PRESETS, load_encoder
from rae.latent_spec import PIXELS_PER_TOKEN, STATS_FILE, LatentSpec, check_same_latents

DIGEST = "ab" * 32


def dinov2_b(**changes) -> LatentSpec:
    spec = ENCODER_PRESETS[DEFAULT_ENCODER].latent_spec(DIGEST, stats=STATS_FILE)
    return dataclasses.replace(spec, **changes)


def test_the_papers_latents_are_256_tokens_of_768_decoding_to_256_px():
    spec = dinov2_b()
    assert (spec.encoder, spec.input_size, spec.patch_size, spec.grid) == ("dinov2-b-reg4", 224, 14, 16)
    assert spec.tokens == 256 and spec.shape == (256, 768)
    assert (spec.pixels_per_token, spec.image_size) == (PIXELS_PER_TOKEN, 256) == (16, 256)


def test_a_loaded_encoder_describes_its_latents_with_its_weights():
    encoder = load_encoder("dinov2-s-offline", input_size=56)
    spec = encoder.latent_spec()
    assert (spec.encoder, spec.weights_digest, spec.input_size) == ("dinov2-s-offline", encoder.weights_digest, 56)
    assert (spec.grid, spec.channels, spec.image_size, spec.stats) == (4, 384, 64, None)
    assert encoder.latent_spec(stats=STATS_FILE).stats == STATS_FILE


def test_json_round_trip_is_exact():
    spec = dinov2_b()
    assert LatentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    raw = dinov2_b(stats=None)
    assert LatentSpec.from_dict(json.loads(json.dumps(raw.to_dict()))) == raw


def test_a_missing_field_is_named_with_its_source():
    data = dinov2_b().to_dict()
    del data["weights_digest"]
    with pytest.raises(ValueError, match=r"store s3://x \(manifest.json\): the latent spec lacks weights_digest"):
        LatentSpec.from_dict(data, "store s3://x (manifest.json)")


def test_an_unknown_field_is_named():
    with pytest.raises(ValueError, match="unknown fields shape"):
        LatentSpec.from_dict(dict(dinov2_b().to_dict(), shape=[256, 768]))


@pytest.mark.parametrize("changes,message", [
    ({"grid": 15}, r"grid 15 is not input_size 224 / patch_size 14"),
    ({"image_size": 224}, r"image_size 224 is not grid 16 x pixels_per_token 16"),
    ({"channels": 0}, r"channels must be a positive integer"),
])
def test_inconsistent_sizes_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        LatentSpec(**dict(dinov2_b().to_dict(), **changes))


def test_differences_name_each_field_and_ignore_where_the_statistics_live():
    a = dinov2_b()
    b = dinov2_b(weights_digest="cd" * 32, stats=None)
    assert a.differences(a) == [] and a.differences(dinov2_b(stats=None)) == []
    assert a.differences(b) == [("weights_digest", DIGEST, "cd" * 32)]
    small = ENCODER_PRESETS["dinov2-s-reg4"].latent_spec(DIGEST)
    assert [name for name, _, _ in a.differences(small)] == ["encoder", "channels"]


def test_check_same_latents_refuses_naming_both_sides_of_each_difference():
    a = dinov2_b()
    check_same_latents(a, dinov2_b(stats=None), "the DiT", "the decoder")  # same space: no error
    other = ENCODER_PRESETS["dinov2-s-reg4"].with_input_size(56).latent_spec("ef" * 32)
    with pytest.raises(ValueError) as err:
        check_same_latents(a, other, "the DiT (s3://dit)", "the decoder (s3://dec)")
    text = str(err.value)
    assert "the DiT (s3://dit) works on dinov2-b-reg4 at 224 px (256 tokens x 768 channels" in text
    for line in ("encoder: the DiT (s3://dit) has 'dinov2-b-reg4', the decoder (s3://dec) has 'dinov2-s-reg4'",
                 "input_size: the DiT (s3://dit) has 224, the decoder (s3://dec) has 56",
                 "grid: the DiT (s3://dit) has 16, the decoder (s3://dec) has 4",
                 "channels: the DiT (s3://dit) has 768, the decoder (s3://dec) has 384",
                 f"weights_digest: the DiT (s3://dit) has '{DIGEST}'"):
        assert line in text, text
