"""diffusers' `AutoencoderRAE` <-> the project's decoder, encoder and latent statistics: state dicts and configs.

Pure conversions (no files, no diffusers import); `jobs/diffusers_io.py` reads and writes the folders.
What diffusers 0.42 (with transformers 5) computes, and how it maps onto the project:

Decoder (``decoder.*``, diffusers' `RAEDecoder`, the official ViTMAE-style decoder) -> `rae.decoder.ViTDecoder`:
``decoder_embed`` -> ``in_proj``; ``trainable_cls_token`` -> ``cls_token``; in ``decoder_layers.i``
``layernorm_before``/``layernorm_after`` -> ``blocks.i.norm1``/``norm2``, ``attention.to_{q,k,v}`` ->
``blocks.i.attn.qkv`` (concatenated in that order), ``attention.to_out.0`` -> ``attn.proj``,
``intermediate.dense`` -> ``mlp.fc1``, ``output.dense`` -> ``mlp.fc2``; ``decoder_norm`` -> ``norm``;
``decoder_pred`` -> ``head``. The computations are the same: pre-LN blocks, LayerNorm eps 1e-12 (fixed
in diffusers, not in its config), exact GELU, SDPA attention scaled by head_dim**-0.5, the CLS token
prepended with a zero position row and dropped at the output, the same unpatchify, then
``pixels * encoder_std + encoder_mean`` (diffusers denormalises with the *encoder's* image mean/std).
Positions: diffusers recomputes its table on construction (never loads it) with
``get_2d_sincos_pos_embed(width, grid, base_size=16)``, which puts the tokens at ``arange(grid) * 16 /
grid``: at grid 16 that is bit-identical to `rae.positions.sincos_pos_embed_2d` (the official table), at
any other grid it is another table. An import carries diffusers' table into the decoder's ``pos_embed``
buffer (exact); an export refuses a decoder whose table is not the one diffusers will compute.

Latents: diffusers' latents are ``scaling_factor * (z - latents_mean) / (latents_std + 1e-5)`` of the
encoder's tokens z, laid out (B, C, h, w) when ``reshape_to_2d`` (token n at row n // w, column n % w),
else (B, N, C); without latents_mean/std it still divides by 1 + 1e-5 (the defaults are 0 and 1). The
project normalises (z - mean) / sqrt(var + eps) in (B, N, C) (`rae.normalization.LatentStats`). The
conversion is exact: sqrt(var + eps) = (latents_std + 1e-5) / scaling_factor, broadcast to (N, C).

Encoder (``encoder.*``, transformers' `Dinov2WithRegistersModel` built for 518 px, 4 registers, heads of
64 channels, LayerNorm eps 1e-6, the final norm without affine; its keys are that model's under
``encoder.``, without ``layernorm.*``) <-> the timm trunk of a ``dinov2-*-reg4`` preset. The mapping both
ways, names and positions, is `rae.hf_dinov2`'s (`state_dict_from_hf_dinov2`, `state_dict_to_hf_dinov2`):
import resamples transformers' 37x37 table to the input grid once, as transformers does on every
forward (exact); export writes the least-norm 37x37 preimage of the trunk's grid table under that
resampling, exact up to float32 rounding at the export's input size, but not the original DINOv2 table,
so at other input sizes the exported encoder differs from the original.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rae.decoder import DECODER_PRESETS, DecoderConfig
from rae.encoders import ENCODER_PRESETS, EncoderSpec, load_encoder
from rae.hf_dinov2 import in_memory_name, state_dict_from_hf_dinov2, state_dict_to_hf_dinov2
from rae.image_tensors import IMAGENET_MEAN, IMAGENET_STD
from rae.latent_spec import PIXELS_PER_TOKEN
from rae.normalization import DEFAULT_EPS, LatentStats

DIFFUSERS_CLASS = "AutoencoderRAE"
LATENT_STD_OFFSET = 1e-5  # diffusers divides latents by (latents_std + 1e-5)
DECODER_LAYER_NORM_EPS = 1e-12  # fixed inside diffusers' RAEDecoder
ENCODER_LAYER_NORM_EPS = 1e-6  # transformers' Dinov2WithRegistersConfig default, which diffusers keeps
ENCODER_TABLE_SIZE = 518  # diffusers builds its DINOv2 for 518 px images
ENCODER_HEAD_DIM = 64
ENCODER_REGISTERS = 4
BUFFER_KEYS = ("encoder_mean", "encoder_std", "_latents_mean", "_latents_std")


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffusersRAEConfig:
    """The fields of an `AutoencoderRAE` config.json, with diffusers' defaults for absent ones."""

    encoder_type: str = "dinov2"
    encoder_hidden_size: int = 768
    encoder_patch_size: int = 14
    encoder_num_hidden_layers: int = 12
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    patch_size: int = 16
    encoder_input_size: int = 224
    image_size: int | None = None
    num_channels: int = 3
    encoder_norm_mean: list | None = None
    encoder_norm_std: list | None = None
    latents_mean: list | None = None
    latents_std: list | None = None
    noise_tau: float = 0.0
    reshape_to_2d: bool = True
    use_encoder_loss: bool = False
    scaling_factor: float = 1.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> DiffusersRAEConfig:
        """The config of a parsed config.json; refuses another class, unknown fields and what the
        project cannot represent, naming ``where``."""
        if raw.get("_class_name") != DIFFUSERS_CLASS:
            raise ValueError(f"{where}: _class_name is {raw.get('_class_name')!r}, not {DIFFUSERS_CLASS!r}; "
                             f"expected the config.json of a diffusers AutoencoderRAE (save_pretrained's folder)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"{where}: unknown AutoencoderRAE fields {unknown} (written by a newer diffusers?); "
                             f"this converter knows {sorted(names)}")
        config = cls(**{k: v for k, v in raw.items() if k in names})
        config.check(where)
        return config

    def check(self, where: str) -> None:
        """Refuse what the project cannot represent, naming ``where``."""
        problems = []
        if self.encoder_type != "dinov2":
            problems.append(f"encoder_type {self.encoder_type!r} (only 'dinov2' maps onto a project encoder)")
        if self.num_channels != 3:
            problems.append(f"num_channels {self.num_channels} (the project decodes RGB)")
        if self.patch_size != PIXELS_PER_TOKEN:
            problems.append(f"patch_size {self.patch_size} (the project's decoder emits {PIXELS_PER_TOKEN} px per token)")
        if self.encoder_input_size % self.encoder_patch_size:
            problems.append(f"encoder_input_size {self.encoder_input_size} is not a multiple of "
                            f"encoder_patch_size {self.encoder_patch_size}")
        if self.image_size is not None and self.image_size != self.grid * self.patch_size:
            problems.append(f"image_size {self.image_size} is not {self.grid} tokens x {self.patch_size} px")
        if not self.scaling_factor > 0:
            problems.append(f"scaling_factor {self.scaling_factor} (must be positive)")
        if problems:
            raise ValueError(f"{where}: this AutoencoderRAE cannot become a project model: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.encoder_input_size // self.encoder_patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def fields(self) -> dict[str, Any]:
        """The keyword arguments of ``AutoencoderRAE(**fields)``."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Latent layout and statistics
# ----------------------------------------------------------------------------------------------

def latents_to_diffusers(tokens: Tensor, *, reshape_to_2d: bool = True) -> Tensor:
    """Project latents (B, N, C) in diffusers' layout: (B, C, h, w), or unchanged without reshape_to_2d."""
    if not reshape_to_2d:
        return tokens
    b, n, c = tokens.shape
    side = _square_side(n, "latent tokens")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def latents_from_diffusers(latents: Tensor, *, reshape_to_2d: bool = True) -> Tensor:
    """diffusers latents (B, C, h, w) (or (B, N, C) without reshape_to_2d) in the project's (B, N, C)."""
    if not reshape_to_2d:
        return latents
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def stats_from_diffusers(latents_mean: Tensor, latents_std: Tensor, config: DiffusersRAEConfig,
                         channels: int) -> LatentStats:
    """The `LatentStats` whose ``normalize`` is diffusers' latent normalisation (scaling_factor included),
    (N, C) float64: mean = latents_mean (None when all zero), sqrt(var + eps) = (latents_std + 1e-5) /
    scaling_factor. eps is the project's default unless a smaller scale needs a smaller one (var >= 0)."""
    layout = (1, channels, config.grid, config.grid) if config.reshape_to_2d else (1, config.num_tokens, channels)
    mean = _tokens_channels(latents_mean, layout, "latents_mean")
    scale = (_tokens_channels(latents_std, layout, "latents_std") + LATENT_STD_OFFSET) / config.scaling_factor
    if not bool((scale > 0).all()):
        raise ValueError(f"latents_std + {LATENT_STD_OFFSET} must be positive; its smallest is "
                         f"{float(scale.min() * config.scaling_factor):.6g}")
    squared = scale**2
    eps = min(DEFAULT_EPS, float(squared.min()))
    return LatentStats(mean=mean if bool(mean.any()) else None, var=(squared - eps).clamp_min(0.0), eps=eps, count=0)


def stats_to_diffusers(stats: LatentStats | None, grid: int) -> tuple[list | None, list]:
    """(latents_mean, latents_std) for an AutoencoderRAE with reshape_to_2d and scaling_factor 1, (1, C, h, w)
    nested lists, whose latents are ``stats.normalize``'d latents; with no statistics, the raw latents
    (latents_std = 1 - 1e-5 so that diffusers divides by exactly 1)."""
    if stats is None:
        return None, [1.0 - LATENT_STD_OFFSET]

    def layout(t: Tensor) -> list:
        return t.T.reshape(1, t.shape[1], grid, grid).float().tolist()

    std = torch.sqrt(stats.var + stats.eps) - LATENT_STD_OFFSET
    return (layout(stats.mean) if stats.mean is not None else None), layout(std)


def _tokens_channels(value: Tensor, layout: tuple[int, ...], name: str) -> Tensor:
    """A diffusers statistic broadcast to the latent ``layout`` and returned as (N, C) float64."""
    value = torch.as_tensor(value, dtype=torch.float64)
    try:
        fits = torch.broadcast_shapes(value.shape, layout) == torch.Size(layout)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the latents {layout}")
    full = value.expand(layout)[0]  # (C, h, w) or (N, C)
    return (full.reshape(layout[1], -1).T if len(layout) == 4 else full).contiguous()


# ----------------------------------------------------------------------------------------------
# Image normalisation (diffusers' encoder_mean/std: the encoder's input and the decoder's output)
# ----------------------------------------------------------------------------------------------

def image_normalization_from_diffusers(state: Mapping[str, Tensor],
                                       config: DiffusersRAEConfig) -> tuple[list[float], list[float]]:
    """(mean, std) as diffusers applies them: the saved buffers, else the config, else ImageNet's.
    The config's values are returned where they are the buffers' float32 values (readable JSON)."""
    out = []
    for key, configured, default in (("encoder_mean", config.encoder_norm_mean, IMAGENET_MEAN),
                                     ("encoder_std", config.encoder_norm_std, IMAGENET_STD)):
        written = list(configured if configured is not None else default)
        saved = state.get(key)
        if saved is not None and not torch.equal(saved.float().reshape(-1), torch.tensor(written).float()):
            written = saved.float().reshape(-1).tolist()
        if len(written) != 3:
            raise ValueError(f"{key} has {len(written)} values; expected 3 (RGB)")
        out.append(written)
    return out[0], out[1]


def same_float32(a: Sequence[float], b: Sequence[float]) -> bool:
    return torch.equal(torch.tensor(list(a)).float(), torch.tensor(list(b)).float())


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------

_DECODER_TOP = {  # project name -> diffusers name (under "decoder.")
    "in_proj.weight": "decoder_embed.weight", "in_proj.bias": "decoder_embed.bias",
    "cls_token": "trainable_cls_token",
    "norm.weight": "decoder_norm.weight", "norm.bias": "decoder_norm.bias",
    "head.weight": "decoder_pred.weight", "head.bias": "decoder_pred.bias",
}
_DECODER_LAYER = {  # project name in blocks.i -> diffusers name in decoder_layers.i
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.to_out.0.weight", "attn.proj.bias": "attention.to_out.0.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight", "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight", "mlp.fc2.bias": "output.dense.bias",
}
_DECODER_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")
_DECODER_IGNORED = ("decoder.decoder_pos_embed",)  # older checkpoints saved it; diffusers ignores it too


def diffusers_decoder_positions(width: int, grid: int) -> Tensor:
    """The (1 + grid*grid, width) float32 table diffusers' RAEDecoder builds: a zero CLS row, then
    `get_2d_sincos_pos_embed(width, grid, base_size=16)` (positions arange(grid) / (grid / 16) in float32,
    the column in the first half of the channels, frequencies and sin/cos in float64)."""
    if width % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {width}")
    positions = torch.arange(grid, dtype=torch.float32) / (grid / 16)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    omega = torch.arange(width // 4, dtype=torch.float64) / (width / 4.0)
    omega = 1.0 / 10000**omega

    def encode(pos: Tensor) -> Tensor:
        angles = torch.outer(pos.reshape(-1), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([table.new_zeros(1, width), table]).float()


def decoder_from_diffusers(state: Mapping[str, Tensor], config: DiffusersRAEConfig, image_mean: Sequence[float],
                           image_std: Sequence[float], where: str) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(preset, build_decoder kwargs, state dict) of the project decoder computing what diffusers' decoder does."""
    depth, width = config.decoder_num_hidden_layers, config.decoder_hidden_size
    names = {project: f"decoder.{name}" for project, name in _DECODER_TOP.items()}
    for i in range(depth):
        names.update({f"blocks.{i}.{p}": f"decoder.decoder_layers.{i}.{d}" for p, d in _DECODER_LAYER.items()})
    qkv = {f"blocks.{i}.attn.qkv.{s}": [f"decoder.decoder_layers.{i}.{m}.{s}" for m in _DECODER_QKV]
           for i in range(depth) for s in ("weight", "bias")}
    expected = set(names.values()) | {k for parts in qkv.values() for k in parts}
    present = {k for k in state if k.startswith("decoder.") and k not in _DECODER_IGNORED}
    _check_keys(present, expected, f"{where}: the decoder weights (of {depth} layers, as its config says)")

    out = {project: state[name].float() for project, name in names.items()}
    out.update({project: torch.cat([state[k].float() for k in parts]) for project, parts in qkv.items()})
    out["pos_embed"] = diffusers_decoder_positions(width, config.grid).unsqueeze(0)
    out["image_mean"] = torch.tensor(list(image_mean)).view(1, 3, 1, 1)
    out["image_std"] = torch.tensor(list(image_std)).view(1, 3, 1, 1)

    sizes = dict(width=width, depth=depth, heads=config.decoder_num_attention_heads,
                 mlp_dim=config.decoder_intermediate_size)
    preset = next((name for name, p in DECODER_PRESETS.items() if dataclasses.asdict(p) == sizes), None)
    kwargs: dict[str, Any] = dict(latent_channels=config.encoder_hidden_size, grid=config.grid,
                                  noise_tau=float(config.noise_tau), image_mean=list(image_mean),
                                  image_std=list(image_std))
    if preset is None:
        preset = "tiny"
        kwargs.update(sizes)
    return preset, kwargs, out


def decoder_to_diffusers(config: DecoderConfig, state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(AutoencoderRAE config fields, ``decoder.*`` state dict) of a project decoder; refuses what
    diffusers' decoder cannot compute (another LayerNorm eps, another position table)."""
    if config.layer_norm_eps != DECODER_LAYER_NORM_EPS:
        raise ValueError(f"the decoder's LayerNorm eps is {config.layer_norm_eps}; diffusers' RAEDecoder fixes "
                         f"it at {DECODER_LAYER_NORM_EPS}")
    wanted = diffusers_decoder_positions(config.width, config.grid)
    have = state["pos_embed"].reshape(wanted.shape).float()
    error = float((have - wanted).abs().max())
    if error > 1e-6:
        raise ValueError(
            f"the decoder's position table differs from diffusers' by up to {error:.3g}: diffusers' RAEDecoder puts "
            f"a grid of {config.grid} at positions 0, {16 / config.grid:g}, ..., {16 - 16 / config.grid:g} "
            f"(get_2d_sincos_pos_embed, base_size=16) where this decoder (the official table) uses 0, 1, ..., "
            f"{config.grid - 1}; only grid 16 exports exactly")
    out = {f"decoder.{name}": state[project] for project, name in _DECODER_TOP.items()}
    for i in range(config.depth):
        out.update({f"decoder.decoder_layers.{i}.{d}": state[f"blocks.{i}.{p}"] for p, d in _DECODER_LAYER.items()})
        for suffix in ("weight", "bias"):
            for module, part in zip(_DECODER_QKV, state[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3)):
                out[f"decoder.decoder_layers.{i}.{module}.{suffix}"] = part
    fields = dict(encoder_hidden_size=config.latent_channels, decoder_hidden_size=config.width,
                  decoder_num_hidden_layers=config.depth, decoder_num_attention_heads=config.heads,
                  decoder_intermediate_size=config.mlp_dim, patch_size=config.pixel_patch,
                  image_size=config.image_size, num_channels=3, noise_tau=float(config.noise_tau))
    return fields, {k: v.detach().float().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Encoder: transformers' DINOv2 under "encoder."; the key and position mapping is rae.hf_dinov2's
# ----------------------------------------------------------------------------------------------

_ENCODER_PREFIX = "encoder."


def encoder_keys_in_memory(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``encoder.*`` attention keys under transformers 5's in-memory names (what a 5.x model loads)."""
    return {in_memory_name(k) if k.startswith(_ENCODER_PREFIX) else k: v for k, v in state.items()}


def encoder_from_diffusers(state: Mapping[str, Tensor], config: DiffusersRAEConfig, where: str) -> dict[str, Tensor]:
    """The timm trunk state dict (a ``dinov2-*-reg4`` at the config's input grid) of diffusers' encoder,
    positions resampled to the grid as transformers does on every forward."""
    hf = {k[len(_ENCODER_PREFIX):]: v.float() for k, v in state.items() if k.startswith(_ENCODER_PREFIX)}
    layers = config.encoder_num_hidden_layers
    return state_dict_from_hf_dinov2(
        hf, (config.grid, config.grid), depth=layers, registers=True, final_norm=False,
        source=f"{where}: the encoder weights (under {_ENCODER_PREFIX!r}, {layers} layers as its config says)")


def encoder_to_diffusers(trunk_state: Mapping[str, Tensor], depth: int, table_side: int) -> dict[str, Tensor]:
    """The ``encoder.*`` state dict (saved names; see `encoder_keys_in_memory`) of a timm ``dinov2-*-reg4``
    trunk: its grid table replaced by the ``table_side`` x ``table_side`` table transformers resamples onto it."""
    hf = state_dict_to_hf_dinov2(trunk_state, table_side, depth=depth, registers=True, final_norm=False,
                                 source="the encoder's timm trunk weights")
    return {_ENCODER_PREFIX + k: v.detach().float().contiguous() for k, v in hf.items()}


def encoder_mismatches(trunk: nn.Module, norm_eps: float) -> list[str]:
    """How a project encoder's timm trunk differs from the DINOv2 diffusers builds (empty: it maps)."""
    block = trunk.blocks[0]
    width = int(trunk.embed_dim)
    have = {
        "register tokens": int(getattr(trunk, "num_reg_tokens", 0)),
        "class token position row": not getattr(trunk, "no_embed_class", False),
        "attention heads": int(block.attn.num_heads),
        "MLP width": int(block.mlp.fc1.out_features),
        "MLP activation": repr(block.mlp.act),
        "layer scale": hasattr(block.ls1, "gamma"),
        "qkv bias": block.attn.qkv.bias is not None,
        "block LayerNorm eps": float(block.norm1.eps),
        "final LayerNorm eps": float(norm_eps),
    }
    want = {
        "register tokens": ENCODER_REGISTERS, "class token position row": False,
        "attention heads": width // ENCODER_HEAD_DIM, "MLP width": 4 * width, "MLP activation": repr(nn.GELU()),
        "layer scale": True, "qkv bias": True, "block LayerNorm eps": ENCODER_LAYER_NORM_EPS,
        "final LayerNorm eps": ENCODER_LAYER_NORM_EPS,
    }
    return [f"{name}: {have[name]!r}, diffusers' DINOv2 has {want[name]!r}" for name in want if have[name] != want[name]]


def match_encoder_preset(config: DiffusersRAEConfig, name: str | None, where: str) -> EncoderSpec:
    """The project encoder preset (at the config's input size) whose trunk diffusers' encoder is:
    ``name`` checked, or the first preset that fits."""
    candidates = [name] if name is not None else list(ENCODER_PRESETS)
    if name is not None and name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODER_PRESETS)}")
    reasons = {}
    for candidate in candidates:
        problems = _preset_mismatches(candidate, config)
        if not problems:
            return ENCODER_PRESETS[candidate].with_input_size(config.encoder_input_size)
        reasons[candidate] = problems
    described = "; ".join(f"{n}: {', '.join(p)}" for n, p in reasons.items())
    raise ValueError(f"{where}: diffusers' encoder (dinov2, width {config.encoder_hidden_size}, "
                     f"{config.encoder_num_hidden_layers} layers, patch {config.encoder_patch_size}) is no project "
                     f"encoder preset: {described}")


def _preset_mismatches(name: str, config: DiffusersRAEConfig) -> list[str]:
    spec = ENCODER_PRESETS[name]
    sizes = [f"{what} {have}" for what, have, want in (("patch", spec.patch_size, config.encoder_patch_size),
                                                       ("width", spec.channels, config.encoder_hidden_size))
             if have != want]
    if sizes:
        return sizes  # no need to build the trunk
    encoder = load_encoder(name, random_init=True, device="meta", input_size=config.encoder_input_size)
    problems = encoder_mismatches(encoder.trunk, encoder.norm_eps)
    if len(encoder.trunk.blocks) != config.encoder_num_hidden_layers:
        problems.append(f"{len(encoder.trunk.blocks)} layers")
    return problems


# ----------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------

def _check_keys(present: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"{what} do not match: "
                         f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                         f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")


def _square_side(count: int, what: str) -> int:
    side = round(count**0.5)
    if side * side != count:
        raise ValueError(f"{count} {what} do not form a square grid")
    return side

