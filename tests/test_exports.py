"""The export format (pipelines/exports.py): model.json with the latent spec, the weights, the
statistics a DiT export carries, and the refusals that name what to do."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from jobs.train.export import load_exported_model
from pipelines.exports import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    HISTORY_FILE,
    WEIGHTS_FILE,
    load_latent_stats,
    read_export,
    read_export_facts,
    write_export,
)
from rae.decoder import build_decoder
from rae.encoders import ENCODER_PRESETS
from rae.latent_spec import STATS_FILE
from rae.normalization import LatentStats

SPEC = ENCODER_PRESETS["dinov2-s-offline"].with_input_size(56).latent_spec("e" * 64)  # 4x4 tokens x 384


def decoder_config(spec=SPEC, **changes) -> dict:
    return {"kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": "tiny",
            "kwargs": {"latent_channels": spec.channels, "grid": spec.grid}, "latent_spec": spec.to_dict(), **changes}


def test_an_export_round_trips_weights_config_and_history(tmp_path):
    torch.manual_seed(0)
    decoder = build_decoder("tiny", latent_channels=384, grid=4)
    write_export(str(tmp_path), decoder.state_dict(), decoder_config(run="r", step=7, history=[{"step": 7}]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE])
    state_dict, config = read_export(str(tmp_path))
    assert config["format"] == EXPORT_FORMAT and "history" not in config
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == [{"step": 7}]
    assert all(torch.equal(state_dict[k], v) for k, v in decoder.state_dict().items())
    facts = read_export_facts(str(tmp_path), "decoder")
    assert facts.latent_spec == SPEC and facts.kwargs == {"latent_channels": 384, "grid": 4}
    model, _ = load_exported_model(str(tmp_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoder.state_dict().items())


def test_an_export_needs_a_latent_spec_that_fits_its_kwargs(tmp_path):
    config = decoder_config()
    del config["latent_spec"]
    with pytest.raises(ValueError, match="export config lacks 'latent_spec'"):
        write_export(str(tmp_path), {}, config)
    with pytest.raises(ValueError, match=r"kwargs latent_channels=768 but the latent spec has 384"):
        write_export(str(tmp_path), {}, decoder_config(kwargs={"latent_channels": 768, "grid": 4}))
    assert not (tmp_path / CONFIG_FILE).exists()


def test_an_export_of_an_older_format_is_refused_asking_for_a_re_export(tmp_path):
    write_export(str(tmp_path), {}, decoder_config())
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    old = {k: v for k, v in config.items() if k != "latent_spec"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict(old, format=1, encoder={"name": "dinov2-s-offline"})))
    for read in (lambda: read_export_facts(str(tmp_path), "decoder"), lambda: read_export(str(tmp_path))):
        with pytest.raises(ValueError, match=r"export format 1, this version of rae reads 3: .*re-export it"):
            read()


def test_an_export_from_before_official_parity_is_refused_naming_why(tmp_path):
    write_export(str(tmp_path), {}, decoder_config())
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict(config, format=2)))
    with pytest.raises(ValueError, match=r"export format 2, .*predate official parity.*rae import"):
        read_export_facts(str(tmp_path), "decoder")


def test_the_wrong_kind_and_a_missing_file_are_named(tmp_path):
    write_export(str(tmp_path), {}, decoder_config())
    with pytest.raises(ValueError, match=r"--dit .* is a 'decoder' export; expected a 'dit' export"):
        read_export_facts(str(tmp_path), "dit")
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_FILE} is missing"):
        read_export_facts(str(tmp_path), "decoder")


def test_a_dit_export_carries_statistics_of_its_latents(tmp_path):
    spec = dataclasses.replace(SPEC, stats=STATS_FILE)
    dit = {"kind": "dit", "builder": "rae.dit:build_dit", "preset": "ditdh-tiny",
           "kwargs": {"latent_channels": 384, "grid": 4, "num_classes": 2}, "latent_spec": spec.to_dict()}
    write_export(str(tmp_path), {}, dit)
    stats = LatentStats(var=torch.rand(16, 384), count=5)
    stats.save(tmp_path / STATS_FILE)
    assert torch.equal(load_latent_stats(read_export_facts(str(tmp_path), "dit")).var, stats.var)
    LatentStats(var=torch.rand(4, 384), count=5).save(tmp_path / STATS_FILE)
    with pytest.raises(ValueError, match=r"statistics of shape \(4, 384\) for latents of \(16, 384\)"):
        load_latent_stats(read_export_facts(str(tmp_path), "dit"))
    write_export(str(tmp_path), {}, dict(dit, latent_spec=SPEC.to_dict()))  # a spec naming no statistics
    with pytest.raises(ValueError, match="carries no latent statistics"):
        load_latent_stats(read_export_facts(str(tmp_path), "dit"))
