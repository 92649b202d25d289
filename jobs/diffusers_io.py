"""diffusers `AutoencoderRAE` folders in and out of the project (`rae import diffusers`, `rae export diffusers`).

`import_diffusers` reads a folder as `save_pretrained` writes it (config.json +
diffusion_pytorch_model.safetensors, read with safetensors, nothing instantiated) and writes a decoder
export beside which lie the encoder's weights in the project's timm layout (``encoder.safetensors``) and
diffusers' latent normalisation as `LatentStats` (``stats.safetensors``). `export_diffusers` writes an
`AutoencoderRAE` folder from a decoder export, the encoder weights its latents came from, and
optionally the latents' statistics. The conversions themselves are `rae.diffusers_rae`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from jobs.config_overrides import REQUIRED
from jobs.train.export import load_exported_model
from pipelines import storage
from pipelines.exports import read_export_facts, write_export
from rae import diffusers_rae as conv
from rae.encoders import RANDOM_INIT_DIGEST, load_encoder
from rae.latent_spec import STATS_FILE
from rae.normalization import LatentStats
from rae.weights_io import read_state_dict

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_TORCH_WEIGHTS = "diffusion_pytorch_model.bin"
ENCODER_FILE = "encoder.safetensors"  # the imported encoder's weights, timm layout (load_encoder(weights=...))


# ----------------------------------------------------------------------------------------------
# Import: AutoencoderRAE folder -> decoder export (+ encoder weights, latent statistics)
# ----------------------------------------------------------------------------------------------

def read_diffusers_dir(src_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(parsed config.json, state dict) of an AutoencoderRAE folder; whole, sharded or torch weights."""
    path = Path(src_dir)
    config_path = path / DIFFUSERS_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no {DIFFUSERS_CONFIG}; expected a diffusers AutoencoderRAE folder "
                                f"({DIFFUSERS_CONFIG} + {DIFFUSERS_WEIGHTS}, as save_pretrained writes)")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or config.get("_class_name") != conv.DIFFUSERS_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: _class_name is {found!r}, not {conv.DIFFUSERS_CLASS!r}; "
                         f"expected the folder of a diffusers AutoencoderRAE")
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return config, load_file(str(path / DIFFUSERS_WEIGHTS))
    if (path / DIFFUSERS_INDEX).is_file():
        shards = sorted(set(json.loads((path / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return config, state
    if (path / DIFFUSERS_TORCH_WEIGHTS).is_file():
        return config, read_state_dict(path / DIFFUSERS_TORCH_WEIGHTS)  # weights_only=True
    raise FileNotFoundError(f"{path}: no {DIFFUSERS_WEIGHTS} (nor {DIFFUSERS_INDEX}, {DIFFUSERS_TORCH_WEIGHTS}) "
                            f"beside its {DIFFUSERS_CONFIG}")


def import_diffusers(src_dir: str, out: str, *, encoder: str | None = None) -> dict[str, Any]:
    """Write the decoder export of the AutoencoderRAE folder ``src_dir`` at ``out`` (a path or fsspec URL),
    with ``encoder.safetensors`` (its encoder as project preset ``encoder``, or the one preset it fits)
    and ``stats.safetensors`` (diffusers' latent normalisation, scaling_factor included) beside it.

    The export's latent_spec carries the digest of that encoder's weights as the project loads them, so
    latents the project encodes with ``load_encoder(preset, weights=out/encoder.safetensors)`` are its
    latents. Returns what was written: {"export", "preset", "kwargs", "latent_spec", "encoder_weights",
    "stats", "stats_eps"}.
    """
    raw, state = read_diffusers_dir(src_dir)
    where = str(Path(src_dir) / DIFFUSERS_CONFIG)
    config = conv.DiffusersRAEConfig.from_dict(raw, where)
    unknown = sorted(k for k in state if not k.startswith(("encoder.", "decoder.")) and k not in conv.BUFFER_KEYS)
    if unknown:
        raise ValueError(f"{src_dir}: weights hold keys an AutoencoderRAE does not have: {unknown[:6]}")

    spec = conv.match_encoder_preset(config, encoder, where)
    image_mean, image_std = conv.image_normalization_from_diffusers(state, config)
    if not (conv.same_float32(image_mean, spec.mean) and conv.same_float32(image_std, spec.std)):
        raise ValueError(f"{src_dir}: the AutoencoderRAE normalises images with mean {image_mean}, std {image_std}; "
                         f"encoder {spec.name} with mean {list(spec.mean)}, std {list(spec.std)}: its latents "
                         f"would not be the project's")
    preset, kwargs, decoder_state = conv.decoder_from_diffusers(state, config, image_mean, image_std, src_dir)
    encoder_state = conv.encoder_from_diffusers(state, config, src_dir)
    stats = conv.stats_from_diffusers(_buffer(state, "_latents_mean", config.latents_mean, 0.0),
                                      _buffer(state, "_latents_std", config.latents_std, 1.0),
                                      config, spec.channels)

    fs, root = storage.resolve(out)
    with tempfile.TemporaryDirectory() as tmp:
        encoder_path, stats_path = Path(tmp) / ENCODER_FILE, Path(tmp) / STATS_FILE
        save_file(encoder_state, str(encoder_path))
        digest = load_encoder(spec.name, weights=encoder_path, input_size=spec.input_size).weights_digest
        stats.save(stats_path)
        latent_spec = spec.latent_spec(digest)
        write_export(out, decoder_state, {
            "kind": "decoder", "builder": "rae.decoder:build_decoder", "preset": preset, "kwargs": kwargs,
            "latent_spec": latent_spec.to_dict(), "encoder_weights": ENCODER_FILE, "latent_stats": STATS_FILE,
            "source": {"diffusers": str(src_dir), "diffusers_version": raw.get("_diffusers_version"),
                       "scaling_factor": config.scaling_factor, "reshape_to_2d": config.reshape_to_2d}})
        storage.write_bytes(fs, storage.join(root, ENCODER_FILE), encoder_path.read_bytes())
        storage.write_bytes(fs, storage.join(root, STATS_FILE), stats_path.read_bytes())
    return {"export": out, "preset": preset, "kwargs": kwargs, "latent_spec": latent_spec.to_dict(),
            "encoder_weights": storage.join(out.rstrip("/"), ENCODER_FILE),
            "stats": storage.join(out.rstrip("/"), STATS_FILE), "stats_eps": stats.eps}


def _buffer(state: dict[str, torch.Tensor], key: str, configured: list | None, default: float) -> torch.Tensor:
    """A latent statistic as a loaded AutoencoderRAE holds it: the saved buffer, else the config's, else the default."""
    if key in state:
        return state[key]
    return torch.tensor(configured if configured is not None else [default], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Export: decoder export + encoder weights (+ statistics) -> AutoencoderRAE folder
# ----------------------------------------------------------------------------------------------

def export_diffusers(decoder_export: str, out_dir: str, *, encoder_weights: str | None = None,
                     stats: str | None = None) -> dict[str, Any]:
    """Write an AutoencoderRAE folder at ``out_dir`` whose decode is the decoder export's on the latents of
    its latent_spec, and whose encoder is that spec's encoder: the preset's weights, or ``encoder_weights``
    (a file or whatever `load_encoder(weights=...)` takes), which must have the spec's digest. With
    ``stats`` (a `LatentStats` file) diffusers' latents are ``stats.normalize``'d ones; without, they are
    the raw latents. Returns {"out_dir", "encoder", "weights_digest", "stats", "config"}.
    """
    facts = read_export_facts(decoder_export, "decoder")
    spec = facts.latent_spec
    if spec.weights_digest == RANDOM_INIT_DIGEST:
        raise ValueError(f"decoder export {decoder_export} was trained on latents of a randomly initialised "
                         f"{spec.encoder}; no weights reproduce them, so there is no encoder to export")
    encoder = load_encoder(spec.encoder, weights=encoder_weights, input_size=spec.input_size)
    if encoder.weights_digest != spec.weights_digest:
        source = encoder_weights or f"the {spec.encoder} preset's own weights"
        raise ValueError(f"encoder weights {source} have digest {encoder.weights_digest[:16]}..., but decoder export "
                         f"{decoder_export} was trained on latents of weights {spec.weights_digest[:16]}...: "
                         f"pass the encoder weights its latent_spec names (--encoder-weights)")
    problems = conv.encoder_mismatches(encoder.trunk, encoder.norm_eps)
    if problems:
        raise ValueError(f"encoder {spec.encoder} is not the DINOv2 with registers diffusers builds: "
                         + "; ".join(problems))

    decoder, _ = load_exported_model(decoder_export)
    image_mean, image_std = _decoder_image_normalization(decoder)
    encoder_mean, encoder_std = list(encoder.spec.mean), list(encoder.spec.std)
    if not (conv.same_float32(image_mean, encoder_mean) and conv.same_float32(image_std, encoder_std)):
        raise ValueError(f"decoder export {decoder_export} denormalises with mean {image_mean}, std {image_std} and "
                         f"encoder {spec.encoder} normalises with mean {encoder_mean}, std {encoder_std}; "
                         f"AutoencoderRAE uses one pair for both")
    fields, state = conv.decoder_to_diffusers(decoder.config, decoder.state_dict())
    latent_stats = _read_stats(stats, spec.shape) if stats is not None else None
    latents_mean, latents_std = conv.stats_to_diffusers(latent_stats, spec.grid)
    fields.update(encoder_type="dinov2", encoder_hidden_size=spec.channels, encoder_patch_size=spec.patch_size,
                  encoder_num_hidden_layers=len(encoder.trunk.blocks), encoder_input_size=spec.input_size,
                  encoder_norm_mean=image_mean, encoder_norm_std=image_std, latents_mean=latents_mean,
                  latents_std=latents_std, reshape_to_2d=True, use_encoder_loss=False, scaling_factor=1.0)
    table_side = conv.ENCODER_TABLE_SIZE // spec.patch_size
    state.update(conv.encoder_to_diffusers(encoder.trunk.state_dict(), len(encoder.trunk.blocks), table_side))
    state.update(encoder_mean=torch.tensor(image_mean).view(1, 3, 1, 1),
                 encoder_std=torch.tensor(image_std).view(1, 3, 1, 1),
                 _latents_mean=torch.tensor(latents_mean if latents_mean is not None else [0.0]),
                 _latents_std=torch.tensor(latents_std))
    _save_pretrained(fields, state, out_dir)
    return {"out_dir": out_dir, "encoder": spec.encoder, "weights_digest": spec.weights_digest,
            "stats": stats, "config": {k: v for k, v in fields.items() if not k.startswith("latents_")}}


def _decoder_image_normalization(decoder: torch.nn.Module) -> tuple[list[float], list[float]]:
    """The decoder's output mean/std as it applies them (its buffers); its config's values where equal."""
    out = []
    for buffer, configured in ((decoder.image_mean, decoder.config.image_mean),
                               (decoder.image_std, decoder.config.image_std)):
        values = buffer.reshape(-1).tolist()
        out.append(list(configured) if conv.same_float32(configured, values) else values)
    return out[0], out[1]


def _read_stats(path: str, shape: tuple[int, int]) -> LatentStats:
    stats = LatentStats.load(path)
    if stats.shape != shape:
        raise ValueError(f"latent statistics {path} are for latents of shape {stats.shape}; the decoder export's "
                         f"are {shape}")
    return stats


def _save_pretrained(fields: dict[str, Any], state: dict[str, torch.Tensor], out_dir: str) -> None:
    """Build the AutoencoderRAE on the meta device, adopt ``state`` (strict: every key it has, no other)
    and `save_pretrained` it; the attention names follow the installed transformers."""
    from diffusers import AutoencoderRAE

    config = conv.DiffusersRAEConfig(**fields)  # a misnamed field fails here, not inside diffusers
    config.check(f"the AutoencoderRAE for {out_dir}")
    with torch.device("meta"):
        model = AutoencoderRAE(**config.fields())
    expected = model.state_dict()
    if any(".attention.q_proj." in k for k in expected):
        state = conv.encoder_keys_in_memory(state)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"the converted state does not fit diffusers' AutoencoderRAE: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")
    model.load_state_dict(state, strict=True, assign=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------
# The commands' configs (`rae import diffusers`, `rae export diffusers`)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffusersImportConfig:
    source: str = REQUIRED      # the AutoencoderRAE folder (config.json + weights), local
    out: str = REQUIRED         # the decoder export to write (path or URL)
    encoder: str = ""           # the project encoder preset the folder's encoder is; "": the first that fits


@dataclass(frozen=True)
class DiffusersExportConfig:
    decoder: str = REQUIRED     # the decoder export
    out: str = REQUIRED         # the AutoencoderRAE folder to write, local
    encoder_weights: str = ""   # the encoder weights its latents came from; "": the preset's own
    stats: str = ""             # latent statistics (stats.safetensors) for the folder's latents_mean/std
