"""`rae eval`, `rae eval reference` and `rae eval rfid` on ten real-looking 64 px images in two
webdataset shards, with the offline Inception (real weights, labelled as not ADM-comparable).

Scoring the reference images against their own statistics must give FID = sFID = 0 and
precision = recall = 1: a check of the numbers, not only of the keys."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from builders import write_image_folder

from jobs.cli import evaluate as cli_eval
from pipelines.exports import write_export
from pipelines.image_decode import decode_shard
from pipelines.shards import list_shards, make_shards
from rae.decoder import build_decoder
from rae.encoders import ENCODER_PRESETS, load_encoder
from rae.evaluation import ReferenceStats, compute_reference_stats, load_offline_inception, write_adm_npz
from rae.evaluation.feature_extractors import OFFLINE_LABEL

pytestmark = pytest.mark.slow
SIZE = 64


def run(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    assert args.func(args) == 0
    return args


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Smooth colour gradients with a class-dependent hue, of assorted sizes (cropped to 64 px)."""
    yy, xx = np.mgrid[0:80, 0:96] / 96.0

    def gradient(c: int, i: int) -> np.ndarray:
        rgb = np.stack([xx * (1 - c) + 0.1 * i, yy, xx * c + 0.05 * i], axis=-1)
        return (255 * np.clip(rgb, 0, 1)).astype(np.uint8)[: 70 + 2 * i]

    root = write_image_folder(tmp_path_factory.mktemp("images"), {
        name: {f"{i}.png": gradient(c, i) for i in range(5)} for c, name in enumerate(("red", "blue"))})
    dest = str(tmp_path_factory.mktemp("shards"))
    make_shards(str(root), dest, max_count=6, progress=False)
    return dest


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "ref.npz")
    run("eval", "reference", "--shards", shards, "--out", out, "--inception", "offline", "--image-size", str(SIZE),
        "--batch-size", "4")
    return out


def shard_images(shards: str) -> np.ndarray:
    return np.concatenate([decode_shard(s, image_size=SIZE).images for s in list_shards(shards)])


def test_reference_stats_from_shards_round_trip(reference, shards):
    images = shard_images(shards)
    direct = compute_reference_stats([images], load_offline_inception())
    loaded = ReferenceStats.load(reference)  # the digest is verified on load
    assert loaded.count == len(images) == 10 and loaded.feature_space == direct.feature_space
    np.testing.assert_allclose(loaded.mu, direct.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loaded.sigma, direct.sigma, rtol=1e-6, atol=1e-9)
    assert f"ADM centre crop {SIZE} px" in loaded.source


def test_eval_of_the_reference_images_scores_perfectly_and_says_offline(reference, shards, tmp_path, capsys):
    samples = write_adm_npz(tmp_path / "samples.npz", shard_images(shards))
    capsys.readouterr()
    run("eval", "--samples", str(samples), "--ref", reference, "--inception", "offline",
        "--json-out", str(tmp_path / "metrics.json"))
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["num_samples"] == 10 and result["offline_inception"] is True
    assert result["extractor_label"] == OFFLINE_LABEL and result["comparable_with_papers"] is False
    assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert result["inception_score"] is None and "classifier" in result["unavailable"]["inception_score"]


def test_rfid_and_fd_dinov2_of_a_decoder(shards, tmp_path, capsys):
    encoder = load_encoder("dinov2-s-offline", input_size=56)
    torch.manual_seed(0)
    decoder = build_decoder("tiny", latent_channels=384, grid=4)
    export = str(tmp_path / "decoder")
    write_export(export, decoder.state_dict(), {
        "kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": "tiny",
        "kwargs": {"latent_channels": 384, "grid": 4}, "latent_spec": encoder.latent_spec().to_dict()})
    capsys.readouterr()
    run("eval", "rfid", "--decoder", export, "--shards", shards, "--inception", "offline", "--fd-dinov2",
        "--batch-size", "5")
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 10 and result["image_size"] == SIZE
    assert result["rfid"] > 1.0 and result["fd_dinov2"] > 0.0  # an untrained decoder reconstructs badly
    assert "DINOv2" in result["fd_dinov2_extractor"] and result["rfid_comparable_with_papers"] is False


def test_rfid_refuses_a_decoder_trained_on_other_encoder_weights(shards, tmp_path):
    export = str(tmp_path / "decoder")
    write_export(export, build_decoder("tiny", latent_channels=384, grid=4).state_dict(), {
        "kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": "tiny",
        "kwargs": {"latent_channels": 384, "grid": 4},
        "latent_spec": ENCODER_PRESETS["dinov2-s-offline"].with_input_size(56).latent_spec("0" * 64).to_dict()})
    expected = (r"weights_digest: the decoder .* has '0{64}', the encoder loaded here "
                r"\(pass --encoder-weights with the decoder's encoder file\) has '[0-9a-f]{64}'")
    with pytest.raises(ValueError, match=expected):
        run("eval", "rfid", "--decoder", export, "--shards", shards, "--inception", "offline")


def test_eval_without_samples_names_what_is_missing():
    with pytest.raises(ValueError, match="needs --samples, --ref and --inception"):
        run("eval", "--inception", "offline")
