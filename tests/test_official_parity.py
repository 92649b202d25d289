"""The official RAE models, sampler and statistics reproduced from their state dicts alone.

tests/data/official-rae/ holds small models built with the official code (bytetriper/RAE at
a4d18c4) in its key names, fixed inputs and the outputs the official code computed (its README
says what each file pins down). Each is converted by `rae.official` and run through this project's
own model and sampler; the outputs must agree within 1e-5 relative (max |diff| / max |reference|).
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rae import official
from rae.decoder import ViTDecoder
from rae.dit import dit_from_config
from rae.sampling import autoguidance, classifier_free_guidance, conditional, integrate, time_grid

DATA = Path(__file__).parent / "data" / "official-rae"
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(DATA / f"{name}.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"]), {k: f.get_tensor(k) for k in f.keys()}


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


def official_dit(meta: dict, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    config = official.dit_config_from_official(meta["kwargs"])
    model = dit_from_config(config)
    model.load_state_dict(official.dit_state_dict_from_official(weights, config), strict=True)
    return model.eval()


@pytest.mark.parametrize("name", ["ditdh_tiny", "dit_tiny"])
def test_dit_forward_matches_the_official_output(name: str) -> None:
    meta, tensors = load_fixture(name)
    model = official_dit(meta, part(tensors, "model."))
    assert type(model).__name__ == ("DiTDH" if name == "ditdh_tiny" else "DiT")
    x = official.tokens_from_official(tensors["input.x"])
    with torch.no_grad():
        v = model(x, tensors["input.t"], tensors["input.y"].long())
    reference = official.tokens_from_official(tensors["output.v"])
    assert relative_error(v, reference) < TOLERANCE


def test_decoder_forward_matches_the_official_rae_decode() -> None:
    meta, tensors = load_fixture("decoder_tiny")
    overrides = meta["overrides"]
    grid = int(overrides["num_patches"] ** 0.5)
    config = official.decoder_config_from_official(meta["vitmae_config"], latent_channels=overrides["hidden_size"],
                                                   grid=grid, pixel_patch=overrides["patch_size"])
    assert config.layer_norm_eps == 1e-12 and config.image_size == overrides["image_size"]
    decoder = ViTDecoder(config)
    decoder.load_state_dict(official.decoder_state_dict_from_official(part(tensors, "model."), config), strict=True)
    with torch.no_grad():
        image = decoder.eval()(tensors["input.z"])
    assert relative_error(image, tensors["output.image"]) < TOLERANCE


@pytest.fixture(scope="module")
def sampler_fixture():
    meta, tensors = load_fixture("samplers_tiny")
    main = official_dit(meta, part(tensors, "model."))
    guide = official_dit(meta, part(tensors, "guide."))
    return meta, tensors, main, guide


def test_time_grid_is_the_official_one(sampler_fixture) -> None:
    meta, tensors, _, _ = sampler_fixture
    sampler = meta["sampler"]
    times = time_grid(sampler["grid_points"], latent_dim=sampler["latent_dim_for_shift"])
    assert times.shape == tensors["time_grid"].shape
    assert torch.equal(times.float(), tensors["time_grid"])  # float32 arithmetic, as official: bit for bit
    assert float(times[-1]) == pytest.approx(sampler["t_end"], rel=1e-7)


@pytest.mark.parametrize("output", ["euler", "euler_cfg", "euler_autoguidance"])
def test_samplers_match_the_official_samples(sampler_fixture, output: str) -> None:
    meta, tensors, main, guide = sampler_fixture
    sampler = meta["sampler"]
    y = tensors["input.y"].long()
    if output == "euler":
        velocity = conditional(main, y)
    elif output == "euler_cfg":
        cfg = sampler["cfg"]
        velocity = classifier_free_guidance(main, y, cfg["scale"], null_class=meta["kwargs"]["num_classes"],
                                            interval=tuple(cfg["interval"]))
    else:
        velocity = autoguidance(main, guide, y, sampler["autoguidance"]["scale"])
    times = time_grid(sampler["grid_points"], latent_dim=sampler["latent_dim_for_shift"])
    noise = official.tokens_from_official(tensors["input.noise"])
    out = integrate(velocity, noise, times, sampler["method"])
    assert relative_error(out, official.tokens_from_official(tensors[f"output.{output}"])) < TOLERANCE


def test_guidance_changes_the_samples(sampler_fixture) -> None:
    """The three official outputs differ, so the sampler tests above pin down guidance too."""
    _, tensors, _, _ = sampler_fixture
    for a, b in [("euler", "euler_cfg"), ("euler", "euler_autoguidance"), ("euler_cfg", "euler_autoguidance")]:
        assert relative_error(tensors[f"output.{a}"], tensors[f"output.{b}"]) > 1e-3


def test_official_statistics_normalise_as_the_official_rae() -> None:
    raw = torch.load(DATA / "stats_tiny.pt", weights_only=True)
    stats = official.stats_from_official(raw)
    channels, grid = raw["var"].shape[1], raw["var"].shape[-1]
    assert stats.shape == (grid * grid, channels) and stats.eps == 1e-5
    z = torch.randn(3, channels, grid, grid, generator=torch.Generator().manual_seed(0))
    reference = (z - raw["mean"]) / torch.sqrt(raw["var"] + 1e-5)  # stage1/rae.py, RAE.encode
    ours = stats.normalize(official.tokens_from_official(z))
    assert relative_error(ours, official.tokens_from_official(reference)) < TOLERANCE
    back = official.stats_to_official(stats, grid)
    assert torch.allclose(back["mean"], raw["mean"]) and torch.allclose(back["var"], raw["var"])


def test_statistics_without_a_mean_only_scale() -> None:
    raw = torch.load(DATA / "stats_tiny.pt", weights_only=True)
    stats = official.stats_from_official({"var": raw["var"]})
    z = torch.randn(2, *raw["var"].shape[1:])
    ours = stats.normalize(official.tokens_from_official(z))
    assert relative_error(ours, official.tokens_from_official(z / torch.sqrt(raw["var"] + 1e-5))) < TOLERANCE


@pytest.mark.parametrize("name", ["ditdh_tiny", "dit_tiny", "samplers_tiny"])
def test_dit_conversion_round_trips_to_the_official_keys(name: str) -> None:
    meta, tensors = load_fixture(name)
    weights = part(tensors, "model.")
    config = official.dit_config_from_official(meta["kwargs"])
    back = official.dit_state_dict_to_official(official.dit_state_dict_from_official(weights, config), config)
    assert sorted(back) == sorted(weights)
    for key, value in weights.items():
        assert torch.allclose(back[key], value, atol=1e-6), key


def test_decoder_conversion_round_trips_to_the_official_keys() -> None:
    meta, tensors = load_fixture("decoder_tiny")
    weights = part(tensors, "model.")
    config = official.decoder_config_from_official(meta["vitmae_config"], latent_channels=16, grid=4)
    ours = official.decoder_state_dict_from_official(weights, config)
    back = official.decoder_state_dict_to_official(ours, config)
    assert sorted(back) == sorted(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_a_checkpoint_is_unwrapped_to_its_ema_weights() -> None:
    ema, model = {"a": torch.ones(1)}, {"a": torch.zeros(1)}
    assert official.unwrap_checkpoint({"model": model, "ema": ema, "opt": {}}, "ckpt")["a"] == 1
    assert official.unwrap_checkpoint({"module.a": torch.ones(1)}, "ckpt").keys() == {"a"}
    with pytest.raises(ValueError, match="ckpt: holds no tensors"):
        official.unwrap_checkpoint({"step": 3}, "ckpt")


def test_missing_unexpected_and_misfitting_keys_are_named() -> None:
    meta, tensors = load_fixture("ditdh_tiny")
    weights = part(tensors, "model.")
    config = official.dit_config_from_official(meta["kwargs"])
    with pytest.raises(ValueError, match=r"missing key 't_embedder.W'"):
        official.dit_state_dict_from_official({k: v for k, v in weights.items() if k != "t_embedder.W"}, config)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        official.dit_state_dict_from_official({**weights, "extra.weight": torch.ones(1)}, config)
    deeper = official.dit_config_from_official({**meta["kwargs"], "depth": [3, 1]})
    with pytest.raises(ValueError, match=r"lack \['head_blocks.0.*\] for this model's config"):
        official.dit_state_dict_from_official(weights, deeper)
    other_grid = official.dit_config_from_official({**meta["kwargs"], "input_size": 8})
    with pytest.raises(ValueError, match="pos_embed .* differs"):
        official.dit_state_dict_from_official(weights, other_grid)


def test_unsupported_official_options_are_refused_by_name() -> None:
    meta, _ = load_fixture("dit_tiny")
    with pytest.raises(ValueError, match="use_qknorm=True is not supported"):
        official.dit_config_from_official({**meta["kwargs"], "use_qknorm": True})
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        official.decoder_config_from_official({**official.OFFICIAL_DECODER_CONFIGS["ViTB"], "hidden_act": "relu"},
                                              latent_channels=768, grid=16)


def test_the_shipped_official_decoder_configs_are_the_released_sizes() -> None:
    xl = official.decoder_config_from_official(official.OFFICIAL_DECODER_CONFIGS["ViTXL"], latent_channels=768, grid=16)
    assert (xl.width, xl.depth, xl.heads, xl.mlp_dim, xl.layer_norm_eps) == (1152, 28, 16, 4096, 1e-12)
