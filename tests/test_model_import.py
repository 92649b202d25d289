"""`rae import official`: released-format files in, exports that `rae sample` runs unchanged.

The files are made the way the official code saves them (`rae.official`'s inverse converters on
random project models, whose parity with the official code tests/test_official_parity.py checks),
at the size of the offline DINOv2-S encoder's latents (16 x 16 tokens x 384 channels).
"""
import json

import numpy as np
import pytest
import torch
import yaml

from jobs.cli.app import main
from jobs.train.export import load_exported_model
from pipelines.exports import load_latent_stats, read_export_facts
from pipelines.sample_job import SampleConfig, run_sampling
from pipelines.sample_models import Guidance, ImageSampler, item_seed
from rae import official
from rae.decoder import ViTDecoder
from rae.dit import dit_from_config
from rae.encoders import OFFLINE_ENCODER, load_encoder
from rae.evaluation import read_adm_npz
from rae.sampling import SamplerConfig

CHANNELS, GRID, CLASSES = 384, 16, 10
DECODER_FIELDS = dict(decoder_hidden_size=64, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                      decoder_intermediate_size=128, hidden_act="gelu", layer_norm_eps=1e-12, hidden_size=768)

pytestmark = pytest.mark.usefixtures("one_thread")


def dit_params(width: list[int]) -> dict:
    return dict(input_size=GRID, patch_size=1, in_channels=CHANNELS, hidden_size=width, depth=[1, 1],
                num_heads=[4, 4], mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=CLASSES)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """A release in the official layout: model.pt + config.json, stage2_model.pt (a training checkpoint)
    + its YAML, a plain-state-dict guide, stat.pt."""
    root = tmp_path_factory.mktemp("release")
    decoder_config = official.decoder_config_from_official(DECODER_FIELDS, latent_channels=CHANNELS, grid=GRID)
    decoder = randomised(ViTDecoder(decoder_config), 1)
    torch.save(official.decoder_state_dict_to_official(decoder.state_dict(), decoder_config), root / "model.pt")
    (root / "config.json").write_text(json.dumps(DECODER_FIELDS))
    models = {}
    for role, width, seed in (("dit", [64, 128], 2), ("guide", [32, 128], 3)):
        config = official.dit_config_from_official(dit_params(width))
        models[role] = randomised(dit_from_config(config), seed)
        weights = official.dit_state_dict_to_official(models[role].state_dict(), config)
        torch.save({"ema": weights, "model": {k: v + 1 for k, v in weights.items()}, "epoch": 3} if role == "dit"
                   else weights, root / f"{role}.pt")
        (root / f"{role}.yaml").write_text(yaml.safe_dump({"stage_2": {"params": dit_params(width)}}))
    generator = torch.Generator().manual_seed(4)
    stats = {"mean": torch.randn(1, CHANNELS, GRID, GRID, generator=generator),
             "var": torch.rand(1, CHANNELS, GRID, GRID, generator=generator) + 0.5}
    torch.save(stats, root / "stat.pt")
    return {"root": root, "decoder": decoder, "stats": stats, **models}


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("imported")
    root = release["root"]
    argv = ["import", "official", "--out", str(out), "--decoder", str(root / "model.pt"),
            "--decoder-config", str(root / "config.json"), "--dit", str(root / "dit.pt"),
            "--dit-config", str(root / "dit.yaml"), "--guide", str(root / "guide.pt"),
            "--guide-config", str(root / "guide.yaml"), "--stats", str(root / "stat.pt"), "--encoder", OFFLINE_ENCODER]
    assert main(argv) == 0
    return {role: str(out / role) for role in ("decoder", "dit", "guide")}


def test_exports_compute_what_the_released_models_compute(release, imported) -> None:
    latents = torch.randn(2, GRID * GRID, CHANNELS)
    decoder = load_exported_model(imported["decoder"])[0]
    with torch.no_grad():
        assert torch.allclose(decoder(latents), release["decoder"](latents), atol=1e-6)
    t, y = torch.tensor([0.3, 0.9]), torch.tensor([1, CLASSES])
    for role in ("dit", "guide"):
        model = load_exported_model(imported[role])[0]
        with torch.no_grad():
            assert torch.allclose(model(latents, t, y), release[role](latents, t, y), atol=1e-6), role


def test_the_training_checkpoints_ema_weights_are_the_ones_imported(release, imported) -> None:
    model = load_exported_model(imported["dit"])[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), release["dit"].state_dict().values()))


def test_exports_record_the_encoders_latent_spec_and_carry_the_statistics(release, imported) -> None:
    spec = load_encoder(OFFLINE_ENCODER).latent_spec()
    for role in ("decoder", "dit", "guide"):
        facts = read_export_facts(imported[role], role if role != "guide" else "dit")
        assert facts.latent_spec.differences(spec) == []
    stats = load_latent_stats(read_export_facts(imported["dit"], "dit"))
    z = torch.randn(3, CHANNELS, GRID, GRID)
    expected = (z - release["stats"]["mean"]) / torch.sqrt(release["stats"]["var"] + 1e-5)
    assert torch.allclose(stats.normalize(official.tokens_from_official(z)), official.tokens_from_official(expected),
                          atol=1e-5)


def test_rae_sample_runs_unchanged_on_the_imported_models(release, imported, ray_cluster, tmp_path) -> None:
    config = SampleConfig(dit=imported["dit"], decoder=imported["decoder"], guide=imported["guide"], guide_scale=1.42,
                          out=str(tmp_path / "samples"), num_samples=2, sampler=SamplerConfig(num_steps=3),
                          batch_size=2, part_size=2, num_actors=1, device="cpu", progress=False)
    run_sampling(config, loader=load_exported_model)
    images = read_adm_npz(tmp_path / "samples" / "samples.npz")
    stats = official.stats_from_official(release["stats"])
    reference = ImageSampler(release["dit"], release["decoder"], stats, sampler=config.sampler,
                             guidance=Guidance(guide_scale=1.42), num_classes=CLASSES, guide=release["guide"])
    expected = reference(np.array([0, 1]), np.array([item_seed(0, 0), item_seed(0, 1)]))
    assert images.shape == (2, 256, 256, 3)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # uint8 rounding


def test_a_release_that_does_not_fit_is_refused_naming_the_file(release, tmp_path, capsys) -> None:
    root = release["root"]
    argv = ["import", "official", "--out", str(tmp_path), "--dit", str(root / "dit.pt"), "--dit-config",
            str(root / "guide.yaml"), "--stats", str(root / "stat.pt"), "--encoder", OFFLINE_ENCODER]
    assert main(argv) == 2
    assert f"--dit {root / 'dit.pt'}" in capsys.readouterr().err
    assert main(["import", "official", "--out", str(tmp_path), "--dit", str(root / "dit.pt")]) == 2
    assert "--dit and --guide need --stats" in capsys.readouterr().err
