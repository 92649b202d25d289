"""Latent statistics: exact streaming moments, the normalisation round trip, the file format."""
import numpy as np
import pytest
import torch

from rae.normalization import LatentStats, MomentAccumulator

N, C = 4, 6


def _latents(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 5.0, N * C).view(N, C)
    shift = torch.linspace(-3.0, 3.0, N * C).view(N, C)
    return torch.randn(b, N, C, generator=g) * scale + shift


def _stats(with_mean: bool = True) -> LatentStats:
    return MomentAccumulator().update(_latents(64)).to_stats(with_mean=with_mean)


def test_accumulator_matches_numpy_float64_whole_set():
    data = _latents(50)
    acc = MomentAccumulator()
    for chunk in data.split(7):
        acc.update(chunk)
    stats = acc.to_stats()
    reference = data.numpy().astype(np.float64)
    np.testing.assert_allclose(stats.mean.numpy(), reference.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), reference.var(0), rtol=1e-12, atol=1e-12)
    assert stats.count == 50


def test_merge_is_independent_of_split_and_order():
    data = _latents(60, seed=1)
    splits = [data[:5], data[5:31], data[31:32], data[32:]]
    parts = [MomentAccumulator().update(s) for s in splits]
    forward = MomentAccumulator()
    for p in parts:
        forward.merge(p)
    backward = MomentAccumulator()
    for p in reversed(parts):
        backward.merge(p)
    tree = MomentAccumulator().merge(MomentAccumulator().merge(parts[2]).merge(parts[0]))
    tree.merge(MomentAccumulator().merge(parts[3]).merge(parts[1]))
    one_batch = MomentAccumulator().update(data)
    for acc in (forward, backward, tree):
        assert acc.count == one_batch.count == 60
        np.testing.assert_allclose(acc.mean.numpy(), one_batch.mean.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(acc.m2.numpy(), one_batch.m2.numpy(), rtol=1e-12, atol=1e-12)


def test_state_round_trip_lets_remote_parts_merge():
    data = _latents(30, seed=2)
    shipped = [MomentAccumulator().update(part).to_state() for part in data.split(11)]
    assert all(isinstance(s["mean"], np.ndarray) and s["mean"].dtype == np.float64 for s in shipped)
    total = MomentAccumulator()
    for state in shipped:
        total.merge(MomentAccumulator.from_state(state))
    np.testing.assert_allclose(total.to_stats().var.numpy(), data.double().var(0, unbiased=False).numpy(),
                               rtol=1e-12)


def test_accumulator_is_exact_for_large_offsets_in_float64():
    # A naive sum-of-squares estimate loses all precision here; the two-pass + Chan merge does not.
    data = torch.full((40, N, C), 1e4, dtype=torch.float64) + torch.randn(40, N, C, dtype=torch.float64) * 1e-3
    acc = MomentAccumulator()
    for chunk in data.split(3):
        acc.update(chunk)
    np.testing.assert_allclose(acc.to_stats().var.numpy(), data.numpy().var(0), rtol=1e-6)


def test_normalize_denormalize_round_trip():
    stats = _stats()
    z = _latents(8, seed=3)
    back = stats.denormalize(stats.normalize(z))
    assert back.dtype == z.dtype
    torch.testing.assert_close(back, z, rtol=1e-6, atol=1e-5)


def test_normalized_training_set_has_zero_mean_unit_variance():
    data = _latents(64)
    normed = _stats().normalize(data).double()
    torch.testing.assert_close(normed.mean(0), torch.zeros(N, C, dtype=torch.float64), atol=1e-6, rtol=0)
    var = normed.var(0, unbiased=False)
    expected = data.double().var(0, unbiased=False) / (data.double().var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(var, expected, atol=1e-5, rtol=1e-5)


def test_meanless_stats_only_scale():
    stats = _stats(with_mean=False)
    assert stats.mean is None and not stats.has_mean
    z = _latents(3, seed=4)
    expected = (z.double() / torch.sqrt(stats.var + stats.eps)).float()
    torch.testing.assert_close(stats.normalize(z), expected)
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("with_mean", [True, False])
def test_save_load_round_trip(tmp_path, with_mean):
    stats = LatentStats(mean=_stats().mean if with_mean else None, var=_stats().var, eps=1e-6, count=64)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = LatentStats.load(path)
    assert loaded.count == 64 and loaded.eps == 1e-6 and loaded.has_mean == with_mean
    assert torch.equal(loaded.var, stats.var) and loaded.var.dtype == torch.float64
    if with_mean:
        assert torch.equal(loaded.mean, stats.mean)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == ({"var", "mean"} if with_mean else {"var"})
    assert meta["has_mean"] == str(with_mean).lower()
    assert (meta["num_tokens"], meta["channels"], meta["count"]) == (str(N), str(C), "64")
    assert meta["format_version"] == "1"


def test_wrong_latent_shape_is_a_clear_error():
    stats = _stats()
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 6\)"):
        stats.normalize(torch.zeros(2, 5, 6))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 6\)"):
        stats.denormalize(torch.zeros(2, 4, 7))


def test_accumulator_rejects_mismatched_batches():
    acc = MomentAccumulator().update(_latents(2))
    with pytest.raises(ValueError, match=r"\(B, 4, 6\)"):
        acc.update(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        acc.update(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(MomentAccumulator().update(torch.zeros(1, 3, 6)))


def test_stats_validate_their_own_shapes():
    with pytest.raises(ValueError, match="must match"):
        LatentStats(mean=torch.zeros(4, 6), var=torch.ones(4, 5), count=1)
    with pytest.raises(ValueError, match="non-negative"):
        LatentStats(var=-torch.ones(4, 6), count=1)


def test_empty_accumulator_refuses_to_make_stats():
    with pytest.raises(ValueError, match="no latents accumulated"):
        MomentAccumulator().to_stats()


def test_load_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        LatentStats.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"var": torch.ones(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a latent statistics file"):
        LatentStats.load(tmp_path / "other.safetensors")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mean", [True, False])
def test_the_training_step_normalizes_stored_float16_as_the_float64_reference(device, with_mean):
    """The reader ships float16 as stored; the step's normalizer (statistics placed once) gives the
    float64 normalization of those values within float16 rounding, and exactly `normalize`'s numbers."""
    stats = _stats(with_mean)
    stored = _latents(16, seed=5).half()
    reference = stored.double() - (stats.mean if with_mean else 0)
    reference = reference / torch.sqrt(stats.var + stats.eps)
    normalizer = stats.normalizer(device)
    out = normalizer(stored.to(device))
    assert out.dtype == torch.float32 and out.device.type == device
    assert normalizer.scale.device.type == device and normalizer.scale.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), reference, rtol=2**-11, atol=2**-14)
    torch.testing.assert_close(out.cpu(), stats.normalize(stored), rtol=0, atol=0)


def test_the_normalizer_refuses_latents_of_another_shape():
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 6\)"):
        _stats().normalizer("cpu")(torch.zeros(2, 6, 4, dtype=torch.float16))
