"""The official RAE checkpoints (github.com/bytetriper/RAE) in this project's models, and back.

The official code saves plain state dicts in its own key names: the DiT^DH (`DiTwDDTHead`) and plain
DiT (`LightningDiT`) take (B, C, H, W) latents through a 1x1 conv "patch embedding"; the decoder is
an HF ViTMAE-style `GeneralDecoder` with separate q/k/v; the latent statistics are `{"mean", "var"}`
of shape (1, C, H, W). This module converts each to this project's layout (tokens (B, N, C),
row-major) and back; the models themselves compute the same thing (see tests/test_official_parity.py).

Read top to bottom: checkpoint unwrapping, the DiT config and weights, the decoder config and
weights, the statistics.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from rae.decoder import DecoderConfig
from rae.dit import DiTConfig
from rae.dit_blocks import RotaryEmbedding2D
from rae.normalization import DEFAULT_EPS, LatentStats
from rae.positions import sincos_pos_embed_2d

StateDict = dict[str, Tensor]


def unwrap_checkpoint(obj: Any, what: str) -> StateDict:
    """The weights in a released file: a plain state dict, or a training checkpoint whose ``"ema"``
    (preferred) or ``"model"`` entry is one. A ``module.`` prefix (DDP) is removed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for entry in ("ema", "model", "state_dict"):
        if entry in obj and isinstance(obj[entry], Mapping):
            obj = obj[entry]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{what}: holds no tensors (keys {sorted(obj)[:8]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _take(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"{what}: missing key {key!r} (the official layout has it)")
    return sd[key]


def _check_unused(sd: Mapping[str, Tensor], used: set[str], what: str) -> None:
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"{what}: unexpected keys {unused[:8]}{' ...' if len(unused) > 8 else ''}; "
                         f"not an official checkpoint of this model?")


#################################################################################
#                              DiT and DiT^DH                                   #
#################################################################################

def dit_config_from_official(params: Mapping[str, Any], name: str = "official") -> DiTConfig:
    """A DiTConfig from the official constructor arguments (a config's ``stage_2.params``):
    `DiTwDDTHead` when ``hidden_size`` is a pair, `LightningDiT` otherwise."""
    params = dict(params)
    for flag, wanted in (("use_qknorm", False), ("use_swiglu", True), ("use_rope", True), ("use_rmsnorm", True),
                         ("wo_shift", False), ("use_pos_embed", True), ("learn_sigma", False)):
        if params.get(flag, wanted) != wanted:
            raise ValueError(f"{name}: official option {flag}={params[flag]!r} is not supported "
                             f"(the released models use {flag}={wanted})")
    if params.get("use_gembed", True) is not True:
        raise ValueError(f"{name}: official option use_gembed=False (a timestep embedder other than the "
                         f"Gaussian Fourier one) is not supported")
    patch = params.get("patch_size", 1)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"{name}: different trunk and head patch sizes {patch} are not supported")
        patch = patch[0]
    common = dict(name=name, latent_channels=int(params.get("in_channels", 768)), grid=int(params["input_size"]),
                  num_classes=int(params.get("num_classes", 1000)), patch_size=int(patch),
                  mlp_ratio=float(params.get("mlp_ratio", 4.0)),
                  class_dropout=float(params.get("class_dropout_prob", 0.1)), allow_narrow=True)
    width = params.get("hidden_size", 1152)
    if isinstance(width, (list, tuple)):  # DiTwDDTHead: [trunk, head] for width, depth and heads
        depth, heads = params.get("depth", [28, 2]), params.get("num_heads", [16, 16])
        heads = [heads, heads] if isinstance(heads, int) else list(heads)
        return DiTConfig(width=int(width[0]), depth=int(depth[0]), heads=int(heads[0]),
                         head_width=int(width[1]), head_depth=int(depth[1]), head_heads=int(heads[1]), **common)
    return DiTConfig(width=int(width), depth=int(params.get("depth", 28)), heads=int(params.get("num_heads", 16)),
                     head_depth=0, **common)


def _conv_to_linear(weight: Tensor) -> Tensor:
    """A (D, C, p, p) patch-embedding conv as the (D, p*p*C) linear map of `rae.dit_blocks.patchify`
    tokens (each token a p x p block, channels last)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _linear_to_conv(weight: Tensor, channels: int) -> Tensor:
    p = math.isqrt(weight.shape[1] // channels)
    return weight.reshape(weight.shape[0], p, p, channels).permute(0, 3, 1, 2).contiguous()


def _dit_renames(config: DiTConfig) -> list[tuple[str, str]]:
    """(official prefix, project prefix) pairs; the rest of each key is the same in both."""
    pairs = [("t_embedder.mlp.", "t_embedder.mlp."), ("final_layer.norm_final.", "final_layer.norm."),
             ("final_layer.adaLN_modulation.", "final_layer.adaLN_modulation."),
             ("final_layer.linear.", "final_layer.linear.")]
    for i in range(config.depth):
        pairs.append((f"blocks.{i}.", f"blocks.{i}."))
    for i in range(config.head_depth):  # the official DiT^DH numbers its head blocks after the trunk's
        pairs.append((f"blocks.{config.depth + i}.", f"head_blocks.{i}."))
    if config.head_depth and config.width != config.head_width:
        pairs.append(("s_projector.", "s_projector."))
    return pairs


def _dit_derived_buffers(config: DiTConfig) -> list[str]:
    """Official persistent buffers that this project derives from the config instead."""
    if config.head_depth:
        return ["pos_embed", "enc_feat_rope.freqs_cos", "enc_feat_rope.freqs_sin",
                "dec_feat_rope.freqs_cos", "dec_feat_rope.freqs_sin"]
    return ["pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"]


def dit_state_dict_from_official(sd: Mapping[str, Tensor], config: DiTConfig, what: str = "DiT") -> StateDict:
    """The project's DiT / DiT^DH state dict from an official one of the model `config` describes.

    The official file also stores the fixed sin-cos table and the RoPE tables; this project derives
    them from the config, so they are checked against the project's (a layout mismatch would show
    there first) and not copied.
    """
    from rae.dit import dit_from_config

    with torch.device("meta"):
        reference = dit_from_config(config)
    out: StateDict = {}
    used: set[str] = set()
    embedders = ["s_embedder", "x_embedder"] if config.head_depth else ["x_embedder"]
    for name in embedders:
        out[f"{name}.weight"] = _conv_to_linear(_take(sd, f"{name}.proj.weight", what))
        out[f"{name}.bias"] = _take(sd, f"{name}.proj.bias", what)
        used |= {f"{name}.proj.weight", f"{name}.proj.bias"}
    out["t_embedder.freqs"] = _take(sd, "t_embedder.W", what)
    used.add("t_embedder.W")
    table = _take(sd, "y_embedder.embedding_table.weight", what)
    used.add("y_embedder.embedding_table.weight")
    if table.shape[0] == config.num_classes:  # trained without label dropout: no null-class row
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    out["y_embedder.table.weight"] = table
    for official, project in _dit_renames(config):
        for key in [k for k in sd if k.startswith(official)]:
            out[project + key[len(official):]] = sd[key]
            used.add(key)
    for key in _dit_derived_buffers(config):
        used.add(key)
        if key in sd:
            _check_derived(sd[key], key, config, what)
    _check_unused(sd, used, what)
    _check_fits(out, reference.state_dict(), what)
    return out


def _official_tables(config: DiTConfig) -> dict[str, Tensor]:
    """The fixed tables the official DiT saves: the sin-cos positions and, per RoPE, its cos/sin
    with each frequency repeated for the two channels of its pair."""
    grid = config.grid // config.patch_size
    tables = {"pos_embed": sincos_pos_embed_2d(config.width, grid).unsqueeze(0)}
    ropes = [("enc_feat_rope", config.width // config.heads), ("dec_feat_rope", config.head_width // config.head_heads)] \
        if config.head_depth else [("feat_rope", config.width // config.heads)]
    for name, head_dim in ropes:
        rope = RotaryEmbedding2D(head_dim, grid, config.rope_theta)
        tables[f"{name}.freqs_cos"] = rope.cos.repeat_interleave(2, dim=-1)
        tables[f"{name}.freqs_sin"] = rope.sin.repeat_interleave(2, dim=-1)
    return tables


def _check_derived(official: Tensor, key: str, config: DiTConfig, what: str) -> None:
    """An official fixed table equals the one this project builds (to float32 rounding)."""
    ours = _official_tables(config)[key]
    if official.shape != ours.shape or not torch.allclose(official.float(), ours, atol=1e-5):
        raise ValueError(f"{what}: the official {key} ({tuple(official.shape)}) differs from the table this model "
                         f"builds ({tuple(ours.shape)}); the config (grid, widths, heads) does not match the weights")


def _check_fits(out: StateDict, expected: Mapping[str, Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"{what}: the official weights lack {missing[:8]} for this model's config")
    for key, tensor in out.items():
        if key not in expected:
            raise ValueError(f"{what}: {key} has no place in a model of this config (wrong depth or widths?)")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{what}: {key} has shape {tuple(tensor.shape)}, a model of this config needs "
                             f"{tuple(expected[key].shape)}")


def dit_state_dict_to_official(sd: Mapping[str, Tensor], config: DiTConfig) -> StateDict:
    """The inverse of `dit_state_dict_from_official`, fixed tables included (as the official code saves them)."""
    out: StateDict = {}
    embedders = ["s_embedder", "x_embedder"] if config.head_depth else ["x_embedder"]
    for name in embedders:
        out[f"{name}.proj.weight"] = _linear_to_conv(sd[f"{name}.weight"], config.latent_channels)
        out[f"{name}.proj.bias"] = sd[f"{name}.bias"]
    out["t_embedder.W"] = sd["t_embedder.freqs"]
    out["y_embedder.embedding_table.weight"] = sd["y_embedder.table.weight"]
    for official, project in _dit_renames(config):
        for key in [k for k in sd if k.startswith(project)]:
            out[official + key[len(project):]] = sd[key]
    out.update(_official_tables(config))
    return out


#################################################################################
#                                 Decoder                                       #
#################################################################################

# The official decoder configs (configs/decoder/<name>/config.json): the decoder_* fields of an HF
# ViTMAE config; the encoder side (hidden_size, patch/image size) is set from the encoder at load.
OFFICIAL_DECODER_CONFIGS: dict[str, dict[str, Any]] = {
    "ViTB": dict(decoder_hidden_size=768, decoder_num_hidden_layers=12, decoder_num_attention_heads=12,
                 decoder_intermediate_size=3072),
    "ViTL": dict(decoder_hidden_size=1024, decoder_num_hidden_layers=24, decoder_num_attention_heads=16,
                 decoder_intermediate_size=4096),
    "ViTXL": dict(decoder_hidden_size=1152, decoder_num_hidden_layers=28, decoder_num_attention_heads=16,
                  decoder_intermediate_size=4096),
}
for _fields in OFFICIAL_DECODER_CONFIGS.values():
    _fields.update(hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True, num_channels=3)


def decoder_config_from_official(vitmae: Mapping[str, Any], *, latent_channels: int, grid: int,
                                 pixel_patch: int = 16, noise_tau: float = 0.0) -> DecoderConfig:
    """A DecoderConfig from an official decoder config (an HF ViTMAE config dict) for latents of
    (grid*grid, latent_channels); the official `RAE` sets the decoder's input width from the encoder."""
    for key in ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                "decoder_intermediate_size"):
        if key not in vitmae:
            raise ValueError(f"decoder config lacks {key!r}; expected an official (ViTMAE) decoder config")
    if vitmae.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"decoder config: hidden_act {vitmae['hidden_act']!r} is not supported (official: 'gelu')")
    if not vitmae.get("qkv_bias", True) or vitmae.get("num_channels", 3) != 3:
        raise ValueError("decoder config: only qkv_bias=True and num_channels=3 are supported (as official)")
    return DecoderConfig(width=int(vitmae["decoder_hidden_size"]), depth=int(vitmae["decoder_num_hidden_layers"]),
                         heads=int(vitmae["decoder_num_attention_heads"]),
                         mlp_dim=int(vitmae["decoder_intermediate_size"]), latent_channels=latent_channels,
                         grid=grid, pixel_patch=pixel_patch, noise_tau=noise_tau,
                         layer_norm_eps=float(vitmae.get("layer_norm_eps", 1e-12)))


_DECODER_LAYER_RENAMES = [
    ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
]
_DECODER_RENAMES = [("decoder_embed.", "in_proj."), ("decoder_norm.", "norm."), ("decoder_pred.", "head.")]


def decoder_state_dict_from_official(sd: Mapping[str, Tensor], config: DecoderConfig,
                                     what: str = "decoder") -> StateDict:
    """The project's ViTDecoder state dict from an official `GeneralDecoder` one (q, k, v fused)."""
    from rae.decoder import ViTDecoder

    with torch.device("meta"):
        reference = ViTDecoder(config).state_dict()
    out: StateDict = {}
    used: set[str] = set()
    for official, project in _DECODER_RENAMES:
        for key in [k for k in sd if k.startswith(official)]:
            out[project + key[len(official):]] = sd[key]
            used.add(key)
    out["cls_token"] = _take(sd, "trainable_cls_token", what)
    out["pos_embed"] = _take(sd, "decoder_pos_embed", what)
    used |= {"trainable_cls_token", "decoder_pos_embed"}
    for i in range(config.depth):
        prefix = f"decoder_layers.{i}."
        for part in ("weight", "bias"):
            names = [f"{prefix}attention.attention.{p}.{part}" for p in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([_take(sd, n, what) for n in names])
            used |= set(names)
        for key in [k for k in sd if k.startswith(prefix) and k not in used]:
            rest = key[len(prefix):]
            for official, project in _DECODER_LAYER_RENAMES:
                if rest.startswith(official):
                    out[f"blocks.{i}.{project}{rest[len(official):]}"] = sd[key]
                    used.add(key)
                    break
    # The project keeps the image mean/std as buffers of its own (the encoder's normalisation).
    out["image_mean"] = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    out["image_std"] = torch.tensor(config.image_std).view(1, 3, 1, 1)
    _check_unused(sd, used, what)
    _check_fits(out, reference, what)
    positions = sincos_pos_embed_2d(config.width, config.grid)
    expected_positions = torch.cat([positions.new_zeros(1, config.width), positions]).unsqueeze(0)
    if not torch.allclose(out["pos_embed"].float(), expected_positions, atol=1e-5):
        raise ValueError(f"{what}: the official decoder_pos_embed differs from the sin-cos table of a "
                         f"{config.grid}x{config.grid} grid; the grid does not match the weights")
    return out


def decoder_state_dict_to_official(sd: Mapping[str, Tensor], config: DecoderConfig) -> StateDict:
    """The inverse of `decoder_state_dict_from_official` (q, k, v split again)."""
    out: StateDict = {"trainable_cls_token": sd["cls_token"], "decoder_pos_embed": sd["pos_embed"]}  # no image mean/std
    for official, project in _DECODER_RENAMES:
        for key in [k for k in sd if k.startswith(project)]:
            out[official + key[len(project):]] = sd[key]
    for i in range(config.depth):
        prefix, block = f"decoder_layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[f"{block}attn.qkv.{part}"].chunk(3)
            for name, tensor in (("query", q), ("key", k), ("value", v)):
                out[f"{prefix}attention.attention.{name}.{part}"] = tensor.contiguous()
        for official, project in _DECODER_LAYER_RENAMES:
            for key in [k for k in sd if k.startswith(block + project)]:
                out[prefix + official + key[len(block + project):]] = sd[key]
    return out


#################################################################################
#                                Statistics                                     #
#################################################################################

def stats_from_official(obj: Any, what: str = "statistics", eps: float = DEFAULT_EPS) -> LatentStats:
    """LatentStats (N, C) from the official `{"mean", "var"}` of shape (1, C, H, W) or (C, H, W);
    the official normalisation is (z - mean) / sqrt(var + 1e-5). Either entry may be absent
    (the official code then uses mean 0 / var 1)."""
    if not isinstance(obj, Mapping) or not ({"mean", "var"} & set(obj)):
        raise ValueError(f"{what}: expected a dict with 'mean' and/or 'var' (the official stat.pt), "
                         f"got {type(obj).__name__}{' with keys ' + str(sorted(obj)) if isinstance(obj, Mapping) else ''}")

    def tokens(key: str) -> Tensor | None:
        value = obj.get(key)
        if value is None:
            return None
        value = torch.as_tensor(value)
        if value.ndim == 4 and value.shape[0] == 1:
            value = value[0]
        if value.ndim != 3:
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}; expected (1, C, H, W) or (C, H, W)")
        return value.flatten(1).T.contiguous()  # (C, H, W) -> (H*W, C), tokens row-major

    mean, var = tokens("mean"), tokens("var")
    if var is None:
        var = torch.full_like(mean, 1.0 - eps, dtype=torch.float64)  # sqrt(var + eps) = 1, as official
    return LatentStats(mean=mean, var=var, eps=eps, count=0)


def stats_to_official(stats: LatentStats, grid: int) -> dict[str, Tensor]:
    """`{"mean", "var"}` of shape (1, C, H, W), float32, as the official `stat.pt`."""
    def image(x: Tensor) -> Tensor:
        return x.T.reshape(1, -1, grid, grid).float().contiguous()

    out = {"var": image(stats.var)}
    if stats.mean is not None:
        out["mean"] = image(stats.mean)
    return out


def tokens_from_official(x: Tensor) -> Tensor:
    """(B, C, H, W) official latents -> (B, H*W, C) project tokens, row-major."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_official(x: Tensor, grid: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)

