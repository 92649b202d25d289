"""`rae import` and `rae export`: released checkpoints in, other formats out.

    rae import official --decoder model.pt [--decoder-config ViTXL] --dit stage2_model.pt [--dit-config ditdh-xl]
                        [--guide stage2_model.pt --guide-config ditdh-s] --stats stat.pt --out DIR
    rae import diffusers DIR --out OUT
    rae export diffusers --decoder EXPORT --out DIR

Each prints a JSON summary of what it wrote. Configs: jobs.model_import.OfficialImportConfig,
jobs.diffusers_io.
"""
from __future__ import annotations

import argparse

from jobs.cli.output import emit_json
from jobs.config_overrides import Flag, absolute_paths, add_config_arguments, config_from_args

OFFICIAL_FLAGS = (
    Flag("out", "export root: writes OUT/decoder, OUT/dit (with the statistics) and OUT/guide"),
    Flag("decoder", "the released decoder (model.pt: a GeneralDecoder state dict)"),
    Flag("decoder_config", "ViTB, ViTL, ViTXL (the official configs/decoder/<name>) or a ViTMAE config.json"),
    Flag("dit", "the released DiT^DH (stage2_model.pt: a state dict, or a checkpoint whose 'ema' entry is one)"),
    Flag("dit_config", "a preset of the official sizes (ditdh-xl, ditdh-s, dit-xl, ...) or an official stage-2 YAML"),
    Flag("guide", "the AutoGuidance guide (the released DiT^DH-S stage2_model.pt)"),
    Flag("guide_config", "the guide's preset or official YAML"),
    Flag("stats", "the released latent statistics (stat.pt: {'mean', 'var'} of shape (C, H, W))"),
    Flag("encoder", "the encoder the models were trained on (official: dinov2-b-reg4)"),
    Flag("encoder_weights", "that encoder's weights file (default: the preset's hub weights)"),
    Flag("encoder_input_size", "the encoder's input side in px (0: the preset's; official 256 px models: 224)"),
)


def _run_import_official(args: argparse.Namespace) -> int:
    from jobs.model_import import import_official

    imported = import_official(absolute_paths(config_from_args(args), args))
    commands = {"sample": f"rae sample --dit {imported.exports['dit']} --decoder {imported.exports['decoder']}"
                          + (f" --guide {imported.exports['guide']} --guide-scale 1.42" if "guide" in imported.exports
                             else "") + " --out SAMPLES"} if {"dit", "decoder"} <= set(imported.exports) else {}
    emit_json({"exports": imported.exports, "latent_spec": imported.latent_spec.to_dict(), **commands})
    return 0


DIFFUSERS_IMPORT_FLAGS = (
    Flag("source", "an AutoencoderRAE folder (config.json + weights, as save_pretrained writes it)", positional=True),
    Flag("out", "the decoder export to write; its encoder weights and latent statistics go beside it"),
    Flag("encoder", "the project encoder preset the folder's encoder is (default: the first that fits)"),
)
DIFFUSERS_EXPORT_FLAGS = (
    Flag("decoder", "a decoder export (rae train decoder, rae import)"),
    Flag("out", "the AutoencoderRAE folder to write"),
    Flag("encoder_weights", "the weights of the encoder its latents came from (default: the preset's own)"),
    Flag("stats", "latent statistics (a stats.safetensors) to store as the folder's latents_mean/std"),
)


def _run_import_diffusers(args: argparse.Namespace) -> int:
    from jobs.diffusers_io import import_diffusers

    config = absolute_paths(config_from_args(args), args)
    emit_json(import_diffusers(config.source, config.out, encoder=config.encoder or None))
    return 0


def _run_export_diffusers(args: argparse.Namespace) -> int:
    from jobs.diffusers_io import export_diffusers

    config = absolute_paths(config_from_args(args), args)
    emit_json(export_diffusers(config.decoder, config.out, encoder_weights=config.encoder_weights or None,
                               stats=config.stats or None))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from jobs.diffusers_io import DiffusersExportConfig, DiffusersImportConfig
    from jobs.model_import import OfficialImportConfig

    importing = subparsers.add_parser("import", help="convert released checkpoints (official RAE, diffusers) into exports",
                                      description="Convert released RAE checkpoints into this project's exports, "
                                                  "which `rae sample` and `rae eval` use unchanged.")
    kinds = importing.add_subparsers(dest="source", metavar="<source>", required=True)
    p = kinds.add_parser("official", help="the official RAE release (bytetriper/RAE): decoder, DiT^DH, stats",
                         description="Convert the official RAE release (decoder model.pt, DiT^DH stage2_model.pt, "
                                     "stat.pt) into export folders under --out. The latent spec they record is "
                                     "the configured encoder's (its weights are loaded once for their digest). "
                                     "Config: jobs.model_import.OfficialImportConfig.")
    # decoder_config / dit_config / guide_config name a preset or a file: read here, by this process
    add_config_arguments(p, OfficialImportConfig, OFFICIAL_FLAGS,
                         paths=("out", "decoder", "dit", "guide", "stats", "encoder_weights"))
    p.set_defaults(func=_run_import_official)
    p = kinds.add_parser("diffusers", help="a diffusers AutoencoderRAE folder: its decoder as an export",
                         description="Convert a diffusers AutoencoderRAE folder into a decoder export, with its "
                                     "encoder's weights (timm layout, encoder.safetensors) and its latent "
                                     "normalisation (stats.safetensors) beside it. Config: "
                                     "jobs.diffusers_io.DiffusersImportConfig.")
    add_config_arguments(p, DiffusersImportConfig, DIFFUSERS_IMPORT_FLAGS, paths=("source", "out"))
    p.set_defaults(func=_run_import_diffusers)

    exporting = subparsers.add_parser("export", help="write a trained decoder in another format (diffusers)",
                                      description="Write this project's models in other formats.")
    formats = exporting.add_subparsers(dest="format", metavar="<format>", required=True)
    p = formats.add_parser("diffusers", help="a decoder export, its encoder and statistics as an AutoencoderRAE folder",
                           description="Write a decoder export with the encoder its latents came from (and "
                                       "optionally their statistics) as a folder that "
                                       "diffusers.AutoencoderRAE.from_pretrained loads. Config: "
                                       "jobs.diffusers_io.DiffusersExportConfig.")
    add_config_arguments(p, DiffusersExportConfig, DIFFUSERS_EXPORT_FLAGS,
                         paths=("decoder", "out", "encoder_weights", "stats"))
    p.set_defaults(func=_run_export_diffusers)
