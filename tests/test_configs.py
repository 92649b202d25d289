"""The paper's runs ship as YAML configs that load onto the typed defaults without error; every
command builds its typed config the same way: defaults < --config YAML < flags < --set."""
import argparse
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from jobs.config_overrides import default_at, load_config
from jobs.train.decoder import DecoderRunConfig
from jobs.train.dit import DiTRunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize("name,model,epochs", [("ditdh-xl", "ditdh-xl", 800), ("ditdh-xl-1400", "ditdh-xl", 1400),
                                               ("dit-xl", "dit-xl", 80), ("ditdh-s-guide", "ditdh-s", 14)])
def test_dit_configs_load(name, model, epochs):
    config = load_config(DiTRunConfig(), str(CONFIGS / f"{name}.yaml"), [])
    assert (config.model, config.loop.epochs, config.loop.global_batch_size) == (model, epochs, 1024)
    assert not any("encoder" in key for key in vars(config))  # the store's latent spec decides the latents


def test_headline_config_equals_the_typed_defaults():
    """The defaults are the paper's DiT^DH-XL run; the YAML spells the same run out."""
    assert load_config(DiTRunConfig(), str(CONFIGS / "ditdh-xl.yaml"), []) == DiTRunConfig()


OFFICIAL_MIRRORS = {
    "ditdh-xl": "configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml",
    "ditdh-xl-1400": "configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml",
    "ditdh-s-guide": "configs/stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml",
    "decoder-vitxl-dinov2b": "configs/stage1/training/DINOv2-B_decXL.yaml",
    "sample-ditdh-xl": "configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml",
    "sample-ditdh-xl-autoguidance": "configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B_AG.yaml",
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_MIRRORS))
def test_each_shipped_recipe_names_the_official_file_it_mirrors(name):
    text = " ".join(line.lstrip("# ") for line in (CONFIGS / f"{name}.yaml").read_text().splitlines()
                    if line.startswith("#"))
    assert OFFICIAL_MIRRORS[name] in text


def test_the_1400_epoch_official_run_differs_from_the_papers_800_only_in_length():
    paper = load_config(DiTRunConfig(), str(CONFIGS / "ditdh-xl.yaml"), [])
    official = load_config(DiTRunConfig(), str(CONFIGS / "ditdh-xl-1400.yaml"), [])
    assert official.loop.epochs == 1400 and paper.loop.epochs == 800
    assert official.optim == paper.optim  # the LR reaches 2e-5 at 800 in both, flat after in the 1400 run
    assert official.optim.schedule(1399) == official.optim.schedule(800) == 2e-5
    assert dataclasses.replace(official, loop=paper.loop) == paper


def test_the_guide_recipe_is_the_released_epoch_14_guide_at_the_official_constant_lr():
    guide = load_config(DiTRunConfig(), str(CONFIGS / "ditdh-s-guide.yaml"), [])
    assert (guide.model, guide.loop.epochs) == ("ditdh-s", 14)
    assert {guide.optim.schedule(e) for e in (0, 7, 13.99)} == {2e-4}


def test_sampling_recipes_are_the_official_sampler_and_guidance():
    plain = built("sample", "--config", str(CONFIGS / "sample-ditdh-xl.yaml"), "--dit", "d", "--decoder", "e",
                  "--out", "o")
    assert (plain.num_samples, plain.sampler.method, plain.sampler.num_steps, plain.sampler.t_min) == \
        (50000, "euler", 50, 0.001)
    assert (plain.cfg_scale, plain.guide, plain.precision) == (1.0, None, "tf32")
    guided = built("sample", "--config", str(CONFIGS / "sample-ditdh-xl-autoguidance.yaml"), "--dit", "d",
                   "--decoder", "e", "--guide", "g", "--out", "o")
    assert (guided.guide, guided.guide_scale, guided.cfg_interval, guided.sampler) == \
        ("g", 1.42, (0.0, 1.0), plain.sampler)


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


# ---------------------------------------------------------------- one configuration path for every command

def parse(*argv: str):
    from jobs.cli.app import build_parser

    return build_parser().parse_args(list(argv))


def built(*argv: str):
    from jobs.cli.train import run_config_from_args
    from jobs.config_overrides import config_from_args

    args = parse(*argv)
    return run_config_from_args(args) if args.command == "train" else config_from_args(args)


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_is_defaults_then_yaml_then_flags_then_set(tmp_path):
    config_file = write_yaml(tmp_path, "store: from-yaml\nmodel: ditdh-s\nloop:\n  seed: 1\n  log_every_steps: 7\n")
    config = built("train", "dit", "--run", "r", "--storage", "s", "--config", config_file, "--store", "from-flag",
                   "--set", "loop.seed=3")
    assert (config.store, config.model, config.loop.seed, config.loop.log_every_steps) == ("from-flag", "ditdh-s", 3, 7)
    assert config.ema_decay == DiTRunConfig().ema_decay  # untouched fields keep the defaults
    assert built("train", "dit", "--run", "r", "--storage", "s", "--config", config_file).store == "from-yaml"


def test_a_flag_and_a_set_naming_the_same_field_must_agree():
    with pytest.raises(ValueError, match=r"--store a and --set store=b both set store"):
        built("train", "dit", "--run", "r", "--storage", "s", "--store", "a", "--set", "store=b")
    with pytest.raises(ValueError, match=r"--epochs 3 and --set loop.epochs=5 both set loop.epochs"):
        built("train", "decoder", "--run", "r", "--storage", "s", "--epochs", "3", "--set", "loop.epochs=5")
    with pytest.raises(ValueError, match=r"--balanced and --random-labels both set labels"):
        built("sample", "--dit", "d", "--decoder", "e", "--out", "o", "--balanced", "--random-labels")
    with pytest.raises(ValueError, match=r"argument dest=a and --set dest=b both set dest"):
        built("shards", "extract", "sh", "a", "--set", "dest=b")
    agreeing = built("encode", "--shards", "x", "--store", "y", "--encoder-input-size", "56",
                     "--set", "encoder_input_size=56")
    assert agreeing.encoder_input_size == 56


def test_missing_required_fields_are_named_by_their_flags(tmp_path):
    with pytest.raises(ValueError, match=r"needs --shards \(a flag, or the field in --config / --set\)"):
        built("encode", "--store", "y")
    with pytest.raises(ValueError, match=r"needs --dit, --decoder and --out"):
        built("sample")
    config = built("encode", "--config", write_yaml(tmp_path, "shards: x\nstore: y\n"))
    assert (config.shards, config.store) == ("x", "y")


COMMANDS = {  # argv with the required flags, a field its YAML sets, a field --set sets, and how to read both
    "demo": (["demo"], "dit_epochs: 5", "decoder_epochs=7", lambda c: (c.dit_epochs, c.decoder_epochs)),
    "shards make": (["shards", "make", "src", "dest"], "max_count: 5", "prefix=p", lambda c: (c.max_count, c.prefix)),
    "shards extract": (["shards", "extract", "sh", "dest"], "progress: false", "shards=sh",
                       lambda c: (c.progress, c.shards)),
    "encode": (["encode", "--shards", "x", "--store", "y"], "batch_size: 5", "limits.min_side=7",
               lambda c: (c.batch_size, c.limits.min_side)),
    "train dit": (["train", "dit", "--run", "r", "--storage", "s"], "model: ditdh-s", "loop.seed=7",
                  lambda c: (c.model, c.loop.seed)),
    "train decoder": (["train", "decoder", "--run", "r", "--storage", "s"], "noise_tau: 0.5", "crop=7",
                      lambda c: (c.noise_tau, c.crop)),
    "sample": (["sample", "--dit", "d", "--decoder", "e", "--out", "o"], "num_samples: 5", "sampler.num_steps=7",
               lambda c: (c.num_samples, c.sampler.num_steps)),
    "import official": (["import", "official", "--out", "o", "--decoder", "d"], "decoder_config: ViTL",
                        "encoder_input_size=448", lambda c: (c.decoder_config, c.encoder_input_size)),
    "import diffusers": (["import", "diffusers", "src"], "out: o", "encoder=dinov2-s-reg4",
                         lambda c: (c.out, c.encoder)),
    "export diffusers": (["export", "diffusers", "--decoder", "d", "--out", "o"], "stats: s.safetensors",
                         "encoder_weights=w", lambda c: (c.stats, c.encoder_weights)),
    "eval": (["eval", "--samples", "a", "--ref", "b"], "inception: offline", "batch_size=7",
             lambda c: (c.inception, c.batch_size)),
    "eval reference": (["eval", "reference", "--shards", "a", "--out", "b", "--inception", "offline"],
                       "image_size: 5", "keep_features=7", lambda c: (c.image_size, c.keep_features)),
    "eval rfid": (["eval", "rfid", "--decoder", "a", "--shards", "b", "--inception", "offline"],
                  "max_images: 5", "fd_dinov2=true", lambda c: (c.max_images, c.fd_dinov2)),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_config_and_set(command, tmp_path):
    argv, yaml_text, setting, read = COMMANDS[command]
    config = built(*argv, "--config", write_yaml(tmp_path, yaml_text + "\n"), "--set", setting)
    yaml_value = yaml.safe_load(yaml_text).popitem()[1]
    set_value = yaml.safe_load(setting.partition("=")[2])
    assert read(config) == (yaml_value, set_value)


def test_every_configurable_command_is_covered_and_its_flags_name_real_fields():
    from jobs.cli.app import build_parser

    def leaves(parser, path=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, path + (name,))
            if parser.get_default("func") is not None:
                yield path, parser

    configurable = set()
    for path, parser in leaves(build_parser()):
        base = parser.get_default("config_base")
        if base is None:
            assert path[:1] in (("models",), ("store",), ("submit",), ("cluster",)), f"rae {' '.join(path)} takes no --config"
            continue
        configurable.add(" ".join(path))
        options = {option for action in parser._actions for option in action.option_strings}
        assert {"--config", "--set"} <= options
        for flag in parser.get_default("config_flags"):
            default_at(base, flag.field)  # raises for a field the config does not have
    assert configurable == set(COMMANDS)


def test_help_names_the_field_each_flag_sets():
    from jobs.cli.app import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "[sampler.num_steps; default 50]" in " ".join(text.split())
    assert "--random-labels labels drawn at random with --seed [labels=random]" in " ".join(text.split())


def test_one_spelling_per_concept_across_commands():
    encode = built("encode", "--shards", "x", "--store", "y", "--encoder-weights", "w.safetensors",
                   "--encoder-input-size", "56", "--num-actors", "2", "--gpu-wait-s", "5")
    assert (encode.encoder_weights, encode.encoder_input_size, encode.num_actors, encode.gpu_wait_s) == \
        ("w.safetensors", 56, 2, 5.0)
    decoder = built("train", "decoder", "--run", "r", "--storage", "s", "--encoder-weights", "w.safetensors",
                    "--encoder-input-size", "56")
    assert (decoder.encoder_weights, decoder.encoder_input_size) == ("w.safetensors", 56)
    sample = built("sample", "--dit", "d", "--decoder", "e", "--out", "o", "--num-actors", "2", "--gpu-wait-s", "5")
    assert (sample.num_actors, sample.gpu_wait_s) == (2, 5.0)
    assert built("demo", "--encoder-weights", "w.safetensors").encoder_weights == "w.safetensors"
    assert built("eval", "rfid", "--decoder", "a", "--shards", "b", "--inception", "offline",
                 "--encoder-weights", "w.safetensors").encoder_weights == "w.safetensors"


def test_epochs_moves_the_schedules_end_with_it():
    train_dit = ("train", "dit", "--run", "r", "--storage", "s")
    schedule = built(*train_dit, "--epochs", "80").optim.schedule
    assert (schedule.decay_end_epoch, schedule.hold_epochs) == (80, 40)
    assert built(*train_dit, "--set", "loop.epochs=80").optim.schedule.decay_end_epoch == 80
    guide = built(*train_dit, "--config", str(CONFIGS / "ditdh-s-guide.yaml"), "--epochs", "8")
    assert (guide.loop.epochs, guide.optim.schedule.decay_end_epoch, guide.optim.schedule.hold_epochs) == (8, 8, 8)
    kept = built(*train_dit, "--epochs", "80", "--set", "optim.schedule.decay_end_epoch=100")
    assert (kept.loop.epochs, kept.optim.schedule.decay_end_epoch) == (80, 100)
    decoder = built("train", "decoder", "--run", "r", "--storage", "s", "--epochs", "32").optim.schedule
    assert (decoder.kind, decoder.warmup_epochs, decoder.decay_end_epoch) == ("warmup_cosine", 1, 32)
    assert built(*train_dit).optim.schedule == DiTRunConfig().optim.schedule  # nothing named, nothing moved


def test_required_fields_are_typed_and_a_class_is_built_once(tmp_path):
    sample = built("sample", "--dit", "d", "--decoder", "e", "--set", "out=2024", "--batch-size", "48")
    assert sample.out == "2024"
    assert sample.part_size == 1008  # about 1024 images of whole batches, resolved with the final batch size
    with pytest.raises(ValueError, match="config has no field 'no_such'"):
        built("sample", "--dit", "d", "--decoder", "e", "--out", "o", "--set", "no_such=1")
    with pytest.raises(ValueError, match="config store is not a group of fields"):
        built("train", "dit", "--run", "r", "--storage", "s", "--set", "store.x=1")


def test_demo_run_configs_are_the_papers_shrunk_to_the_demo():
    from jobs.demo.run import DemoConfig, decoder_run_config, dit_run_config

    demo = built("demo", "--set", "dit_epochs=60")
    assert demo == DemoConfig(dit_epochs=60)
    decoder = decoder_run_config(demo, "shards")
    assert (decoder.shards, decoder.decoder, decoder.encoder, decoder.encoder_input_size) == \
        ("shards", "tiny", demo.encoder, demo.encoder_input_size)
    assert decoder.decoder_overrides["width"] == demo.decoder_width
    assert (decoder.loop.epochs, decoder.loop.global_batch_size, decoder.optim.schedule.decay_end_epoch) == \
        (demo.decoder_epochs, demo.decoder_batch, demo.decoder_epochs)
    assert decoder.loop.shuffle_buffer == DecoderRunConfig().loop.shuffle_buffer  # the paper's, where not shrunk
    dit = dit_run_config(demo, "store")
    assert (dit.store, dit.model, dit.loop.epochs, dit.optim.schedule.hold_epochs,
            dit.optim.schedule.decay_end_epoch, dit.ema_decay) == ("store", demo.dit_model, 60, 30, 60, demo.dit_ema)
    assert decoder.loss.perceptual_weight == demo.decoder_perceptual_weight
    assert decoder.loop.cpu_threads == len(os.sched_getaffinity(0))  # its one worker: this machine's cores
    assert dit.loop.cpu_threads == 0  # as Ray gives them
    assert dit.model_overrides == {"label_init_std": demo.dit_label_init_std}
    assert dit_run_config(built("demo", "--set", "dit_label_init_std=0.02"), "s").model_overrides == {
        "label_init_std": 0.02}


def test_the_demos_gan_phase_is_off_by_default_and_set_by_both_epochs():
    from jobs.demo.run import decoder_run_config

    loss = decoder_run_config(built("demo"), "shards").loss
    epochs = built("demo").decoder_epochs
    assert min(loss.disc_start_epoch, loss.gan_start_epoch) > epochs  # the discriminator never runs
    loss = decoder_run_config(built("demo", "--set", "gan_start_epoch=14", "--set", "disc_start_epoch=13"), "s").loss
    assert (loss.disc_start_epoch, loss.gan_start_epoch) == (13.0, 14.0)
    with pytest.raises(ValueError, match="set both gan_start_epoch and disc_start_epoch"):
        decoder_run_config(built("demo", "--set", "gan_start_epoch=14"), "s")
    with pytest.raises(ValueError, match="config disc_start_epoch: expected float, got 'soon'"):
        built("demo", "--set", "gan_start_epoch=14", "--set", "disc_start_epoch=soon")


def test_a_set_on_an_optional_field_takes_the_type_its_annotation_names():
    """A field whose value is None has no type to convert a --set string by: its annotation gives it."""
    demo = built("demo", "--set", "gan_start_epoch=14", "--set", "disc_start_epoch=13",
                 "--set", "encoder_weights=dinov2.safetensors")
    assert (demo.gan_start_epoch, demo.disc_start_epoch) == (14.0, 13.0)
    assert isinstance(demo.gan_start_epoch, float) and isinstance(demo.encoder_weights, str)
    assert built("demo", "--set", "gan_start_epoch=none").gan_start_epoch is None
