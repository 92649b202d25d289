"""Every path a command is given is made absolute once, at the command line, so that code running
elsewhere (Ray Train workers in Ray's session folder, Ray Data tasks) opens the same file; URLs
with a scheme and the words that name no file (``--inception offline``) are kept as given."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config_overrides import absolute_paths, config_from_args
from jobs.user_paths import absolute_location


def parse(*argv: str):
    from jobs.cli.app import build_parser

    return build_parser().parse_args(list(argv))


def given_config(args):
    """The config as the command line, YAML and --set give it."""
    from jobs.cli.train import run_config_from_args

    return run_config_from_args(args) if args.command == "train" else config_from_args(args)


def run_config(*argv: str):
    """The config the command runs with: as given, then its paths made absolute."""
    args = parse(*argv)
    return absolute_paths(given_config(args), args), args


def field(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


# argv with paths (relative, or URLs), {field: what it holds relative to the cwd, or None: kept as given}
COMMANDS = {
    "shards make": (["shards", "make", "photos", "out/shards"], {"src": "photos", "dest": "out/shards"}),
    "shards extract": (["shards", "extract", "shards/*.tar", "images"], {"shards": "shards/*.tar", "dest": "images"}),
    "encode": (["encode", "--shards", "shards/shard-{000000..000003}.tar", "--store", "s3://bucket/store",
                "--encoder-weights", "w.safetensors"],
               {"shards": "shards/shard-{000000..000003}.tar", "store": None, "encoder_weights": "w.safetensors",
                "encoder": None}),
    "train dit": (["train", "dit", "--run", "r", "--storage", "runs", "--store", "latents",
                   "--set", "loop.wandb.dir=wandb-files"], {"store": "latents", "loop.wandb.dir": "wandb-files"}),
    "train decoder": (["train", "decoder", "--run", "r", "--storage", "memory://runs", "--shards", "../shards",
                       "--encoder-weights", "enc.pt", "--lpips-weights", "vgg16.pth", "--disc-weights", "disc.pt",
                       "--set", "perceptual_weights=lite0.pt"],
                      {"shards": "../shards", "encoder_weights": "enc.pt", "lpips_weights": "vgg16.pth",
                       "disc_weights": "disc.pt", "perceptual_weights": "lite0.pt", "loop.wandb.dir": None}),
    "sample": (["sample", "--dit", "runs/dit/export", "--decoder", "file:///exports/decoder", "--out", "samples",
                "--guide", "guide/export"],
               {"dit": "runs/dit/export", "decoder": None, "out": "samples", "guide": "guide/export"}),
    "eval": (["eval", "--samples", "samples", "--ref", "ref.npz", "--inception", "offline", "--json-out", "fid.json"],
             {"samples": "samples", "ref": "ref.npz", "inception": None, "json_out": "fid.json"}),
    "eval reference": (["eval", "reference", "--shards", "val", "--out", "ref.npz", "--inception", "inception.pt"],
                       {"shards": "val", "out": "ref.npz", "inception": "inception.pt", "json_out": None}),
    "eval rfid": (["eval", "rfid", "--decoder", "decoder", "--shards", "gs://bucket/val", "--inception", "offline",
                   "--encoder-weights", "enc.pt"],
                  {"decoder": "decoder", "shards": None, "inception": None, "encoder_weights": "enc.pt"}),
    "import official": (["import", "official", "--out", "imported", "--decoder", "model.pt", "--decoder-config", "ViTL",
                         "--dit", "stage2_model.pt", "--stats", "stat.pt", "--encoder-weights", "enc.pt"],
                        {"out": "imported", "decoder": "model.pt", "decoder_config": None, "dit": "stage2_model.pt",
                         "stats": "stat.pt", "encoder_weights": "enc.pt", "guide": None}),
    "import diffusers": (["import", "diffusers", "hf-folder", "--out", "export"], {"source": "hf-folder", "out": "export"}),
    "export diffusers": (["export", "diffusers", "--decoder", "export", "--out", "hf-folder", "--stats", "stats.safetensors",
                          "--encoder-weights", "enc.pt"],
                         {"decoder": "export", "out": "hf-folder", "stats": "stats.safetensors",
                          "encoder_weights": "enc.pt"}),
    "demo": (["demo", "--encoder-weights", "enc.pt"], {"encoder_weights": "enc.pt"}),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_runs_with_absolute_paths(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = COMMANDS[command]
    config, args = run_config(*argv)
    given = given_config(args)
    for name, relative in expected.items():
        value = field(config, name)
        if relative is None:  # a URL, a preset name, a word, or nothing given: as given
            assert value == field(given, name), (name, value)
        else:
            assert value == str((tmp_path / relative).resolve()), (name, value)


def test_a_path_set_in_the_yaml_is_made_absolute_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("store: ./latents\n")
    config, args = run_config("train", "dit", "--run", "r", "--storage", "runs", "--config", "run.yaml")
    assert config.store == str(tmp_path / "latents")
    assert args.storage == str(tmp_path / "runs")


def test_path_arguments_outside_configs_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("train", "decoder", "--run", "r", "--storage", "runs").storage == str(tmp_path / "runs")
    assert parse("train", "dit", "--run", "r", "--storage", "s3://bucket/runs").storage == "s3://bucket/runs"
    assert parse("store", "info", "store").url == str(tmp_path / "store")
    assert parse("store", "verify", "memory://store").url == "memory://store"
    assert parse("submit", "--working-dir", "project", "--", "rae", "models").working_dir == str(tmp_path / "project")


@pytest.mark.parametrize(("given", "expected"), [
    ("latents", "{cwd}/latents"), ("./a/../b", "{cwd}/b"), ("/data/store", "/data/store"),
    ("~/runs", "{home}/runs"), ("s3://bucket/store", "s3://bucket/store"), ("file:///data/x", "file:///data/x"),
    ("memory://x", "memory://x"), ("gs://b/shards-{0..3}.tar", "gs://b/shards-{0..3}.tar"), ("", ""),
])
def test_the_resolver_makes_local_paths_absolute_and_keeps_urls(given, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_location(given) == expected.replace("{cwd}", str(Path.cwd())).replace("{home}", str(tmp_path / "home"))
