"""Feature extractors, the ADM .npz layout, reference statistics and evaluate() end to end."""
import warnings

import numpy as np
import pytest
import torch

from jobs.demo.photos import load_photo as photo
from rae.evaluation import (
    ReferenceStats,
    compute_reference_stats,
    evaluate,
    frechet_distance,
    load_adm_inception,
    load_offline_inception,
    read_adm_npz,
    reconstruction_fid,
    write_adm_npz,
)
from rae.evaluation.feature_extractors import OFFLINE_LABEL, DinoV2Features

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]


def _centre_crop(img: np.ndarray, size: int = 128) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def offline():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        return load_offline_inception()


@pytest.fixture(scope="module")
def photo_sets(offline):
    photos = np.stack([_centre_crop(photo(name)) for name in PHOTOS])  # (6, 128, 128, 3) NHWC
    flipped = photos[:, :, ::-1].copy()  # the same scenes, mirrored
    noise = np.random.default_rng(0).integers(0, 256, size=photos.shape, dtype=np.uint8)
    feats = {k: offline(v) for k, v in {"photos": photos, "flipped": flipped, "noise": noise}.items()}
    return {"photos": photos, "noise": noise, **{f"f_{k}": v for k, v in feats.items()}}


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_adm_npz_is_readable_as_the_adm_suite_reads_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    path = write_adm_npz(tmp_path / "samples.npz", [images[:2], images[2:]])
    arr = np.load(path)["arr_0"]  # exactly what guided-diffusion's evaluator.py does
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(arr, images)
    np.testing.assert_array_equal(read_adm_npz(path), images)


def test_adm_npz_rejects_wrong_dtype_and_layout(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "a.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        write_adm_npz(tmp_path / "b.npz", np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        read_adm_npz(tmp_path / "c.npz")


def test_missing_adm_inception_file_names_the_file_and_where_to_get_it(tmp_path):
    missing = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05") as err:
        load_adm_inception(missing)
    assert str(missing) in str(err.value) and "https://" in str(err.value)


def test_offline_inception_gives_2048d_pool_and_sfid_features_but_no_class_probabilities(offline, photo_sets):
    f = photo_sets["f_photos"]
    assert f.pool.shape == (6, 2048) and np.isfinite(f.pool).all()
    assert f.spatial.shape == (6, 17 * 17 * 7)
    assert f.probs is None and not offline.has_probs
    assert offline.label == OFFLINE_LABEL and not offline.comparable_with_papers


def test_offline_inception_accepts_nhwc_and_nchw_alike(offline, photo_sets):
    nchw = torch.from_numpy(photo_sets["photos"][:2]).permute(0, 3, 1, 2).contiguous()
    np.testing.assert_allclose(offline(nchw).pool, photo_sets["f_photos"].pool[:2], rtol=1e-5, atol=1e-5)


def test_offline_inception_features_tell_real_photos_from_noise(photo_sets):
    photos, flipped, noise = photo_sets["f_photos"].pool, photo_sets["f_flipped"].pool, photo_sets["f_noise"].pool
    # Each mirrored photo's nearest neighbour among {originals, noise} is its own original.
    bank = np.concatenate([photos, noise])
    nearest = ((flipped[:, None] - bank[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(nearest, np.arange(len(PHOTOS)))
    # FID: ~0 against itself, large against noise.
    assert abs(_fd(photos, photos)) < 1e-6
    assert _fd(photos, noise) > 100


def test_reference_stats_round_trip_and_detect_tampering(tmp_path, offline, photo_sets):
    ref = compute_reference_stats([photo_sets["photos"][:3], photo_sets["photos"][3:]], offline, source="skimage")
    assert ref.count == 6 and ref.mu.shape == (2048,) and ref.sigma_s.shape == (2023, 2023)
    np.testing.assert_allclose(ref.sigma, np.cov(photo_sets["f_photos"].pool, rowvar=False), rtol=1e-6, atol=1e-8)
    path = ref.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(path)
    assert loaded.digest == ref.digest and loaded.extractor_id == offline.id
    payload = dict(np.load(path))
    payload["mu"] = payload["mu"] + 1.0
    np.savez(tmp_path / "edited.npz", **payload)
    with pytest.raises(ValueError, match="corrupt or was edited"):
        ReferenceStats.load(tmp_path / "edited.npz")


def test_evaluate_with_offline_inception_labels_results_and_skips_is(tmp_path, offline, photo_sets):
    ref = compute_reference_stats([photo_sets["photos"]], offline)
    same = evaluate([photo_sets["photos"]], ref, offline, splits=2)
    pool_only = ReferenceStats(ref.extractor_id, ref.feature_space, ref.mu, ref.sigma, ref.count, features=ref.features)
    noisy = evaluate([photo_sets["noise"]], pool_only, offline, splits=2)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert noisy["fid"] > 100 and noisy["recall"] == 0.0  # tight noise cluster covers no photo
    assert noisy["sfid"] is None and "no spatial" in noisy["unavailable"]["sfid"]
    assert same["inception_score"] is None and "no classifier layer" in same["unavailable"]["inception_score"]
    assert same["extractor_label"] == OFFLINE_LABEL and same["comparable_with_papers"] is False


def test_evaluate_refuses_reference_from_another_feature_space(offline, photo_sets):
    ref = ReferenceStats(extractor_id="x", feature_space="dinov2:other", mu=np.zeros(2048), sigma=np.eye(2048), count=10)
    with pytest.raises(ValueError, match="dinov2:other"):
        evaluate([photo_sets["photos"]], ref, offline)


class _NvidiaStyleInception(torch.nn.Module):
    """Stand-in with the call signature of NVIDIA's inception-2015-12-05.pt TorchScript."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = self.proj(img.float().mean(dim=(2, 3)) / 255.0)
        if return_features:
            return features
        logits = torch.nn.functional.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return torch.softmax(logits, dim=1)


def test_adm_inception_file_is_called_like_the_reference(tmp_path, photo_sets):
    path = tmp_path / "inception-2015-12-05.pt"
    module = torch.jit.script(_NvidiaStyleInception())
    module.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adm = load_adm_inception(path)
    feats = adm(photo_sets["photos"])
    x = torch.from_numpy(photo_sets["photos"]).permute(0, 3, 1, 2)
    np.testing.assert_allclose(feats.pool, module(x, return_features=True).double().detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(feats.probs, module(x, no_output_bias=True).double().detach().numpy(), rtol=1e-6)
    assert adm.comparable_with_papers and adm.id.startswith("adm-inception-v3:sha256:")


class _TokenEncoder(torch.nn.Module):
    """Minimal stand-in for rae.encoders.RepresentationEncoder: (B,3,S,S) in [0,1] -> (B, 16, 8) tokens."""

    class spec:  # noqa: N801 - mirrors EncoderSpec's attributes used by the extractor
        name, input_size, channels, image_size = "toy", 32, 8, 32

    weights_digest = "random-init"

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch(images).flatten(2).transpose(1, 2)


def test_dinov2_features_mean_pool_the_encoder_tokens_and_give_zero_rfid_for_perfect_reconstructions(photo_sets):
    encoder = _TokenEncoder()
    extractor = DinoV2Features(encoder)
    images = photo_sets["photos"][:, :32, :32]  # already at the encoder's image size
    tokens = encoder(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    np.testing.assert_allclose(extractor(images).pool, tokens.mean(1).double().detach().numpy(), rtol=1e-5, atol=1e-6)
    assert "mean-patch-tokens" in extractor.id and not extractor.comparable_with_papers
    perfect = reconstruction_fid([images], [images.copy()], extractor)
    blurred = reconstruction_fid([images], [np.full_like(images, 128)], extractor)
    assert abs(perfect["rfid"]) < 1e-9 and blurred["rfid"] > 1e-3
