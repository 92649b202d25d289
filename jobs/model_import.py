"""`rae import official`: the released RAE checkpoints as this project's exports.

The official release is a decoder (`model.pt`, a `GeneralDecoder` state dict, with its ViTMAE
config: ViTB / ViTL / ViTXL), a DiT^DH (`stage2_model.pt`, a state dict or a training checkpoint
whose "ema" entry is one), optionally the DiT^DH-S AutoGuidance guide, and the latent statistics
(`stat.pt`, {"mean", "var"} of shape (C, H, W)). `import_official` converts them (`rae.official`)
into export folders under ``out``:

    out/decoder/   a decoder export (raw latents in, pixels out)
    out/dit/       a DiT export carrying the statistics (stats.safetensors)
    out/guide/     the guide, when given (a DiT export with the same statistics)

Each records the latent spec of the encoder they work with (preset, input size and the sha256 of
its weights), so `rae sample --dit out/dit --decoder out/decoder [--guide out/guide]` and
`rae eval` run on them unchanged, and latents this project encodes with the same encoder weights
are recognised as the same space.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.config_overrides import REQUIRED
from jobs.train.export import join_url
from pipelines import storage
from pipelines.exports import write_export
from rae import official
from rae.decoder import DECODER_PRESETS, DecoderConfig
from rae.dit import DIT_PRESETS, DiTConfig
from rae.latent_spec import STATS_FILE, LatentSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfficialImportConfig:
    """What to convert. Paths are local files or fsspec URLs; ``out`` is an export root."""

    out: str = REQUIRED
    decoder: str = ""          # the released decoder's model.pt
    decoder_config: str = "ViTXL"  # ViTB | ViTL | ViTXL (the official configs/decoder/<name>) or a config.json
    dit: str = ""              # stage2_model.pt
    dit_config: str = "ditdh-xl"  # a preset of the official sizes (ditdh-xl, ditdh-s, ...) or an official YAML
    guide: str = ""            # the AutoGuidance guide's stage2_model.pt (the released DiT^DH-S)
    guide_config: str = "ditdh-s"
    stats: str = ""            # stat.pt; required with --dit
    encoder: str = "dinov2-b-reg4"
    encoder_weights: str = ""  # the encoder's weights file; default: the preset's hub weights
    encoder_input_size: int = 0  # 0: the preset's (official 256 px models: 224)

    def __post_init__(self) -> None:
        if not (self.decoder or self.dit):
            raise ValueError("rae import official needs --decoder and/or --dit (the released files to convert)")
        if (self.dit or self.guide) and not self.stats:
            raise ValueError("--dit and --guide need --stats (the released stat.pt): a DiT export carries the "
                             "statistics its latents were normalised with")


@dataclass(frozen=True)
class ImportedModels:
    latent_spec: LatentSpec
    exports: dict[str, str]   # "decoder" | "dit" | "guide" -> export URL


def import_official(config: OfficialImportConfig, *, latent_spec: LatentSpec | None = None) -> ImportedModels:
    """Convert the released files named by ``config`` into exports under ``config.out``.

    ``latent_spec`` (the latents the models work on) defaults to that of the configured encoder,
    loaded once to read its weights' digest."""
    spec = latent_spec or _encoder_latent_spec(config)
    exports: dict[str, str] = {}
    if config.decoder:
        exports["decoder"] = _import_decoder(config, spec)
    if config.dit:
        stats = official.stats_from_official(_load(config.stats), f"--stats {config.stats}")
        if stats.shape != spec.shape:
            raise ValueError(f"--stats {config.stats}: statistics of {stats.shape[0]} tokens x {stats.shape[1]} "
                             f"channels, but {spec.describe()} has {spec.shape[0]} x {spec.shape[1]}")
        with_stats = dataclasses.replace(spec, stats=STATS_FILE)
        for role, path, dit_config in (("dit", config.dit, config.dit_config),
                                       ("guide", config.guide, config.guide_config)):
            if path:
                url = join_url(config.out, role)
                _import_dit(path, dit_config, with_stats, url, f"--{role} {path}")
                _write_stats(stats, url)
                exports[role] = url
    return ImportedModels(latent_spec=spec, exports=exports)


def _encoder_latent_spec(config: OfficialImportConfig) -> LatentSpec:
    from rae.encoders import load_encoder

    encoder = load_encoder(config.encoder, weights=config.encoder_weights or None,
                           input_size=config.encoder_input_size or None)
    return encoder.latent_spec()


def _write_stats(stats, export_url: str) -> None:
    """The statistics beside a DiT export, under the name its latent spec gives them."""
    fs, root = storage.resolve(export_url)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / STATS_FILE
        stats.save(local)
        storage.write_bytes(fs, storage.join(root, STATS_FILE), local.read_bytes())


def _load(path: str) -> Any:
    """A released .pt / .pth (torch.load, weights only) or .safetensors file."""
    fs, root = storage.resolve(path)
    if not storage.exists(fs, root):
        raise FileNotFoundError(f"{path}: no such file")
    data = fs.cat_file(root)
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise ValueError(f"{path}: not a torch weights file this version can read safely "
                         f"(weights_only=True): {str(error).splitlines()[0][:200]}") from None


def _read_config_file(path: str) -> dict[str, Any]:
    fs, root = storage.resolve(path)
    if not storage.exists(fs, root):
        raise FileNotFoundError(f"{path}: no such config file")
    text = fs.cat_file(root).decode()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


#################################################################################
#                                  Decoder                                      #
#################################################################################

def decoder_config_named(name_or_path: str, spec: LatentSpec) -> DecoderConfig:
    """The decoder config an official name (ViTB/ViTL/ViTXL) or config.json describes, for ``spec``'s latents."""
    if name_or_path in official.OFFICIAL_DECODER_CONFIGS:
        fields = official.OFFICIAL_DECODER_CONFIGS[name_or_path]
    else:
        fields = _read_config_file(name_or_path)
    return official.decoder_config_from_official(fields, latent_channels=spec.channels, grid=spec.grid,
                                                 pixel_patch=spec.pixels_per_token)


def decoder_export_kwargs(config: DecoderConfig) -> tuple[str, dict[str, Any]]:
    """(preset, kwargs) for `rae.decoder.build_decoder` that rebuild ``config``."""
    sizes = (config.width, config.depth, config.heads, config.mlp_dim)
    preset = next((name for name, p in DECODER_PRESETS.items() if (p.width, p.depth, p.heads, p.mlp_dim) == sizes),
                  None)
    kwargs: dict[str, Any] = dict(latent_channels=config.latent_channels, grid=config.grid, noise_tau=config.noise_tau,
                                  layer_norm_eps=config.layer_norm_eps, image_mean=list(config.image_mean),
                                  image_std=list(config.image_std), pixel_patch=config.pixel_patch)
    if preset is None:
        preset = "tiny"
        kwargs.update(width=config.width, depth=config.depth, heads=config.heads, mlp_dim=config.mlp_dim)
    return preset, kwargs


def _import_decoder(config: OfficialImportConfig, spec: LatentSpec) -> str:
    decoder_config = decoder_config_named(config.decoder_config, spec)
    weights = official.unwrap_checkpoint(_load(config.decoder), f"--decoder {config.decoder}")
    state_dict = official.decoder_state_dict_from_official(weights, decoder_config, f"--decoder {config.decoder}")
    preset, kwargs = decoder_export_kwargs(decoder_config)
    url = join_url(config.out, "decoder")
    write_export(url, state_dict, {"kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": preset,
                                   "kwargs": kwargs, "latent_spec": dataclasses.replace(spec, stats=None).to_dict(),
                                   "imported_from": {"official": config.decoder, "config": config.decoder_config}})
    log.info("decoder: %s (%s) -> %s", config.decoder, config.decoder_config, url)
    return url


#################################################################################
#                                    DiT                                        #
#################################################################################

def dit_config_named(name_or_path: str, spec: LatentSpec, num_classes: int) -> DiTConfig:
    """A DiT config from a preset name of the official sizes, or an official stage-2 YAML (its
    ``stage_2.params``), for ``spec``'s latents."""
    if name_or_path in DIT_PRESETS:
        sizes = dataclasses.asdict(DIT_PRESETS[name_or_path])
        return DiTConfig(name=name_or_path, latent_channels=spec.channels, grid=spec.grid, num_classes=num_classes,
                         **sizes)
    data = _read_config_file(name_or_path)
    params = data.get("stage_2", {}).get("params", data) if isinstance(data, dict) else None
    if not isinstance(params, dict) or "hidden_size" not in params:
        raise ValueError(f"{name_or_path}: neither a DiT preset ({', '.join(sorted(DIT_PRESETS))}) nor an official "
                         f"stage-2 config (stage_2.params with hidden_size, depth, num_heads)")
    config = official.dit_config_from_official(params, name="ditdh-xl" if isinstance(params["hidden_size"], list)
                                               else "dit-xl")
    if (config.latent_channels, config.grid) != (spec.channels, spec.grid):
        raise ValueError(f"{name_or_path}: a model of {config.latent_channels} channels on a {config.grid}x{config.grid} "
                         f"grid, but {spec.describe()}")
    return config


def dit_export_kwargs(config: DiTConfig) -> dict[str, Any]:
    """kwargs for `rae.dit.build_dit(config.name, **kwargs)` that rebuild ``config`` exactly."""
    fields = dataclasses.asdict(config)
    fields.pop("name")
    return fields


def _import_dit(path: str, name_or_config: str, spec: LatentSpec, url: str, what: str) -> None:
    weights = official.unwrap_checkpoint(_load(path), what)
    table = weights.get("y_embedder.embedding_table.weight")
    if table is None:
        raise ValueError(f"{what}: missing key 'y_embedder.embedding_table.weight'; not an official DiT checkpoint")
    config = dit_config_named(name_or_config, spec, num_classes=table.shape[0] - 1)
    state_dict = official.dit_state_dict_from_official(weights, config, what)
    preset = config.name if config.name in DIT_PRESETS else ("ditdh-xl" if config.head_depth else "dit-xl")
    write_export(url, state_dict, {"kind": "dit", "builder": "rae.dit:build_dit", "preset": preset,
                                   "kwargs": dit_export_kwargs(config), "latent_spec": spec.to_dict(),
                                   "imported_from": {"official": path, "config": name_or_config}})
    log.info("%s: %s (%s) -> %s", what.split()[0].lstrip("-"), path, name_or_config, url)
