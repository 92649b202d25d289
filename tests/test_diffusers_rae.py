"""diffusers' AutoencoderRAE in and out of the project (rae/diffusers_rae.py, jobs/diffusers_io.py): the
imported decoder and encoder compute what diffusers computes, an exported folder loads in diffusers and
decodes and encodes as the project does, and the refusals name what is at fault."""
from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderRAE
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import save_file

from jobs.diffusers_io import export_diffusers, import_diffusers, read_diffusers_dir
from jobs.train.export import load_exported_model
from pipelines.exports import write_export
from rae import diffusers_rae
from rae.decoder import build_decoder
from rae.diffusers_rae import DiffusersRAEConfig, latents_from_diffusers, latents_to_diffusers
from rae.encoders import load_encoder
from rae.normalization import LatentStats
from rae.positions import sincos_pos_embed_2d

ENCODER = "dinov2-s-reg4"  # the smallest preset diffusers' DINOv2 (with registers) can be
CHANNELS, GRID = 384, 16
TOLERANCE = 1e-5  # max |out - ref| / max |ref|


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def randomize(module: torch.nn.Module) -> None:
    """Random non-zero values in every parameter: LayerNorm weights near 1, layer scales near 0.3."""
    for name, p in module.named_parameters():
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(("lambda1", "gamma")):
            p.copy_(0.3 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.05)


def project_tokens(encoder, images: torch.Tensor) -> torch.Tensor:
    """The project encoder's latents of images already at its input size (RepresentationEncoder.forward
    after its resize), to check the trunk without the two resizes."""
    x = (images - encoder.mean) / encoder.std
    tokens = encoder.trunk.forward_features(x)[:, encoder.num_prefix_tokens:]
    return F.layer_norm(tokens, (tokens.shape[-1],), eps=encoder.norm_eps)


def random_images(n: int, size: int) -> torch.Tensor:
    """Random pixels at the crop size: the project's resize to the encoder's input is the official (and
    diffusers') plain bicubic, so the full encode paths agree on any image."""
    return torch.rand(n, 3, size, size)


# ----------------------------------------------------------------------------------------------
# diffusers -> project
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderRAE(
        encoder_hidden_size=CHANNELS, encoder_num_hidden_layers=12, decoder_hidden_size=64,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=96,
        latents_mean=torch.randn(1, CHANNELS, GRID, GRID), latents_std=0.5 + torch.rand(CHANNELS, 1, 1),
        scaling_factor=0.8, noise_tau=0.3)
    randomize(model)
    path = tmp_path_factory.mktemp("diffusers") / "rae"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def imported(diffusers_dir, tmp_path_factory):
    return import_diffusers(str(diffusers_dir), str(tmp_path_factory.mktemp("imported") / "export"))


@pytest.fixture(scope="module")
def diffusers_model(diffusers_dir):
    return AutoencoderRAE.from_pretrained(diffusers_dir).eval()


def test_an_imported_decoder_decodes_diffusers_latents_as_diffusers_does(imported, diffusers_model):
    assert imported["preset"] == "tiny"
    assert {k: imported["kwargs"][k] for k in ("width", "depth", "heads", "mlp_dim", "grid", "noise_tau")} == \
        {"width": 64, "depth": 2, "heads": 4, "mlp_dim": 96, "grid": GRID, "noise_tau": pytest.approx(0.3)}
    decoder, config = load_exported_model(imported["export"])
    assert config["latent_spec"]["encoder"] == ENCODER
    stats = LatentStats.load(imported["stats"])
    latents = torch.randn(2, CHANNELS, GRID, GRID)
    with torch.no_grad():
        ref = diffusers_model.decode(latents).sample
        out = decoder(stats.denormalize(latents_from_diffusers(latents)))
    assert out.shape == ref.shape == (2, 3, 256, 256)
    assert relative_error(out, ref) < TOLERANCE


def test_an_imported_encoder_has_the_export_digest_and_encodes_as_diffusers_does(imported, diffusers_model):
    encoder = load_encoder(ENCODER, weights=imported["encoder_weights"])
    assert encoder.weights_digest == imported["latent_spec"]["weights_digest"]
    stats = LatentStats.load(imported["stats"])
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = diffusers_model.encode(images).latent
        out = latents_to_diffusers(stats.normalize(project_tokens(encoder, images)))
        assert relative_error(out, ref) < TOLERANCE
        images256 = random_images(2, 256)  # the project's image size: both resize to 224
        ref = diffusers_model.encode(images256).latent
        out = latents_to_diffusers(stats.normalize(encoder(images256)))
    assert relative_error(out, ref) < TOLERANCE


# ----------------------------------------------------------------------------------------------
# project -> diffusers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A randomised dinov2-s-reg4 encoder saved to a file, a randomised decoder exported on its latents,
    and latent statistics with a mean."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("project")
    trunk = load_encoder(ENCODER, random_init=True).trunk
    randomize(trunk)
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(root / "encoder.safetensors"))
    encoder = load_encoder(ENCODER, weights=root / "encoder.safetensors")
    decoder = build_decoder("tiny", latent_channels=CHANNELS, grid=GRID)
    randomize(decoder)
    write_export(str(root / "export"), decoder.state_dict(), {
        "kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": "tiny",
        "kwargs": {"latent_channels": CHANNELS, "grid": GRID}, "latent_spec": encoder.latent_spec().to_dict()})
    stats = LatentStats(mean=torch.randn(GRID * GRID, CHANNELS), var=0.5 + torch.rand(GRID * GRID, CHANNELS),
                        count=10)
    stats.save(root / "stats.safetensors")
    return {"root": root, "encoder": encoder, "decoder": decoder.eval(), "stats": stats}


def test_an_exported_folder_decodes_and_encodes_the_project_latents(project, tmp_path):
    root = project["root"]
    result = export_diffusers(str(root / "export"), str(tmp_path / "rae"),
                              encoder_weights=str(root / "encoder.safetensors"), stats=str(root / "stats.safetensors"))
    assert result["encoder"] == ENCODER
    model = AutoencoderRAE.from_pretrained(tmp_path / "rae").eval()
    stats, encoder = project["stats"], project["encoder"]
    latents = torch.randn(2, GRID * GRID, CHANNELS)
    images = torch.rand(2, 3, 224, 224)
    images256 = random_images(2, 256)
    with torch.no_grad():
        assert relative_error(model.decode(latents_to_diffusers(stats.normalize(latents))).sample,
                              project["decoder"](latents)) < TOLERANCE
        assert relative_error(model.encode(images).latent,
                              latents_to_diffusers(stats.normalize(project_tokens(encoder, images)))) < TOLERANCE
        assert relative_error(model.encode(images256).latent, latents_to_diffusers(stats.normalize(encoder(images256)))) < TOLERANCE


def test_without_statistics_the_exported_folder_takes_raw_latents(project, tmp_path):
    root = project["root"]
    export_diffusers(str(root / "export"), str(tmp_path / "rae"), encoder_weights=str(root / "encoder.safetensors"))
    model = AutoencoderRAE.from_pretrained(tmp_path / "rae").eval()
    latents = torch.randn(2, GRID * GRID, CHANNELS)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert relative_error(model.decode(latents_to_diffusers(latents)).sample, project["decoder"](latents)) < TOLERANCE
        assert relative_error(model.encode(images).latent,
                              latents_to_diffusers(project_tokens(project["encoder"], images))) < TOLERANCE


# ----------------------------------------------------------------------------------------------
# What diffusers computes, checked against diffusers itself
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [16, 4])
def test_the_decoder_position_table_is_diffusers(grid):
    ref = get_2d_sincos_pos_embed(64, grid, cls_token=True, extra_tokens=1, output_type="pt").float()
    assert torch.equal(diffusers_rae.diffusers_decoder_positions(64, grid), ref)
    assert torch.equal(ref[1:], sincos_pos_embed_2d(64, grid)) == (grid == 16)  # the official table only at 16


def test_a_decoder_whose_positions_diffusers_would_change_is_not_exported():
    decoder = build_decoder("tiny", latent_channels=CHANNELS, grid=4)
    with pytest.raises(ValueError, match=r"position table differs from diffusers'.*only grid 16 exports exactly"):
        diffusers_rae.decoder_to_diffusers(decoder.config, decoder.state_dict())


def test_the_config_defaults_are_diffusers_defaults():
    signature = inspect.signature(AutoencoderRAE.__init__).parameters
    defaults = DiffusersRAEConfig().fields()
    assert defaults == {name: signature[name].default for name in defaults}
    assert set(defaults) == set(signature) - {"self"}


@pytest.mark.parametrize("reshape_to_2d", [True, False])
def test_latent_statistics_are_diffusers_normalisation(reshape_to_2d):
    """Per-token means, per-channel scales down to 1e-4 (eps below the project's default), a scaling factor."""
    config = DiffusersRAEConfig(encoder_hidden_size=8, encoder_input_size=56, reshape_to_2d=reshape_to_2d,
                                scaling_factor=1.7)  # 4x4 tokens
    shape = (1, 8, 4, 4) if reshape_to_2d else (1, 16, 8)
    mean = torch.randn(shape)
    std = torch.rand(8).mul(2)
    std[0] = 1e-4
    std = std.view(8, 1, 1) if reshape_to_2d else std
    latents = torch.randn(3, *shape[1:])
    diffusers_self = SimpleNamespace(_latents_mean=mean, _latents_std=std)
    ref = AutoencoderRAE._normalize_latents(diffusers_self, latents) * config.scaling_factor
    stats = diffusers_rae.stats_from_diffusers(mean, std, config, channels=8)
    assert stats.shape == (16, 8) and stats.eps < 1e-5
    tokens = latents_from_diffusers(latents, reshape_to_2d=reshape_to_2d)
    out = latents_to_diffusers(stats.normalize(tokens), reshape_to_2d=reshape_to_2d)
    assert relative_error(out, ref) < 1e-6
    back = AutoencoderRAE._denormalize_latents(diffusers_self, ref / config.scaling_factor)  # decode's first step
    normalized = latents_from_diffusers(ref, reshape_to_2d=reshape_to_2d)
    assert relative_error(latents_to_diffusers(stats.denormalize(normalized), reshape_to_2d=reshape_to_2d), back) < 1e-6


def test_statistics_for_diffusers_give_the_project_normalisation():
    stats = LatentStats(mean=torch.randn(16, 8), var=torch.rand(16, 8), count=5)
    latents_mean, latents_std = diffusers_rae.stats_to_diffusers(stats, grid=4)
    diffusers_self = SimpleNamespace(_latents_mean=torch.tensor(latents_mean), _latents_std=torch.tensor(latents_std))
    tokens = torch.randn(3, 16, 8)
    ref = latents_to_diffusers(stats.normalize(tokens))
    assert relative_error(AutoencoderRAE._normalize_latents(diffusers_self, latents_to_diffusers(tokens)), ref) < 1e-6
    _, identity = diffusers_rae.stats_to_diffusers(None, grid=4)
    raw = SimpleNamespace(_latents_mean=torch.zeros(1), _latents_std=torch.tensor(identity))
    assert torch.equal(AutoencoderRAE._normalize_latents(raw, ref), ref)  # no statistics: the raw latents


def test_sharded_and_torch_weights_read_as_the_single_file(diffusers_dir, diffusers_model, tmp_path):
    config, state = read_diffusers_dir(diffusers_dir)
    diffusers_model.save_pretrained(tmp_path / "sharded", max_shard_size="5MB")
    diffusers_model.save_pretrained(tmp_path / "torch", safe_serialization=False)
    for folder in ("sharded", "torch"):
        again_config, again = read_diffusers_dir(tmp_path / folder)
        fields = {k: v for k, v in again_config.items() if k != "_name_or_path"}  # a loaded model's source
        assert fields == config and again.keys() == state.keys()
        assert all(torch.equal(again[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

def test_a_folder_that_is_not_an_autoencoder_rae_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json; expected a diffusers AutoencoderRAE folder"):
        import_diffusers(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=r"_class_name is 'AutoencoderKL', not 'AutoencoderRAE'"):
        import_diffusers(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderRAE"}))
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model.safetensors"):
        import_diffusers(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_autoencoder_rae_the_project_cannot_represent_is_refused(diffusers_dir):
    config = json.loads((diffusers_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"cannot become a project model: encoder_type 'siglip2'"):
        DiffusersRAEConfig.from_dict(dict(config, encoder_type="siglip2"), "config.json")
    with pytest.raises(ValueError, match=r"unknown AutoencoderRAE fields \['future_field'\]"):
        DiffusersRAEConfig.from_dict(dict(config, future_field=1), "config.json")
    shallow = DiffusersRAEConfig.from_dict(dict(config, encoder_num_hidden_layers=2), "config.json")
    with pytest.raises(ValueError, match=r"is no project encoder preset: .*dinov2-s-reg4: 12 layers"):
        diffusers_rae.match_encoder_preset(shallow, None, "config.json")


def test_an_encoder_whose_digest_is_not_the_exports_is_refused(project, tmp_path):
    other = load_encoder(ENCODER, random_init=True).trunk
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"encoder weights .*other.safetensors have digest .* but decoder export "
                                         r".* was trained on latents of weights"):
        export_diffusers(str(project["root"] / "export"), str(tmp_path / "rae"),
                         encoder_weights=str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "rae").exists()


def test_an_encoder_without_registers_is_not_diffusers_dinov2():
    encoder = load_encoder("dinov2-s-offline", random_init=True, device="meta")
    assert diffusers_rae.encoder_mismatches(encoder.trunk, encoder.norm_eps) == [
        "register tokens: 0, diffusers' DINOv2 has 4", "class token position row: True, diffusers' DINOv2 has False"]


def test_the_cli_round_trip_export_then_import_gives_the_same_decoder(project, tmp_path, capsys):
    from jobs.cli.app import main

    root = project["root"]
    assert main(["export", "diffusers", "--decoder", str(root / "export"), "--out", str(tmp_path / "rae"),
                 "--encoder-weights", str(root / "encoder.safetensors"), "--stats", str(root / "stats.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["encoder"] == ENCODER
    assert main(["import", "diffusers", str(tmp_path / "rae"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads(capsys.readouterr().out)["export"] == str(tmp_path / "back")
    decoder = load_exported_model(str(tmp_path / "back"))[0]
    latents = torch.randn(2, GRID * GRID, CHANNELS)
    with torch.no_grad():
        assert relative_error(decoder(latents), project["decoder"](latents)) < TOLERANCE
    assert main(["import", "diffusers", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
