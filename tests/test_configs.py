"""The paper's runs ship as YAML configs that load onto the typed defaults without error."""
from pathlib import Path

import pytest

from jobs.config_overrides import load_config
from jobs.train_decoder import DecoderRunConfig
from jobs.train_dit import DiTRunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize("name,model,epochs", [("ditdh-xl", "ditdh-xl", 800), ("dit-xl", "dit-xl", 80),
                                               ("ditdh-s-guide", "ditdh-s", 16)])
def test_dit_configs_load(name, model, epochs):
    config = load_config(DiTRunConfig(), str(CONFIGS / f"{name}.yaml"), [])
    assert (config.model, config.loop.epochs, config.loop.global_batch_size) == (model, epochs, 1024)
    assert not any("encoder" in key for key in vars(config))  # the store's latent spec decides the latents


def test_headline_config_equals_the_typed_defaults():
    """The defaults are the paper's DiT^DH-XL run; the YAML spells the same run out."""
    assert load_config(DiTRunConfig(), str(CONFIGS / "ditdh-xl.yaml"), []) == DiTRunConfig()


def test_decoder_config_is_the_papers():
    config = load_config(DecoderRunConfig(), str(CONFIGS / "decoder-vitxl-dinov2b.yaml"), [])
    assert (config.decoder, config.noise_tau, config.loss.disc_start_epoch, config.loss.gan_start_epoch) == \
        ("vit-xl", 0.8, 6, 8)
    assert config == DecoderRunConfig()


def test_set_overrides_win_and_bad_keys_are_named():
    config = load_config(DiTRunConfig(), str(CONFIGS / "ditdh-xl.yaml"), ["loop.epochs=20"])
    assert config.loop.epochs == 20
    with pytest.raises(ValueError, match="no_such_field"):
        load_config(DiTRunConfig(), None, ["no_such_field=1"])
