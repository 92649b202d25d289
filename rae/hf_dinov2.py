"""Hugging Face DINOv2 weights in the layout of the project's timm encoder.

The official RAE code (bytetriper/RAE, src/stage1/encoders/dinov2.py) runs transformers'
`Dinov2WithRegistersModel` (`facebook/dinov2-with-registers-base`). Pointing the project's encoder
at that model's folder (config.json + model.safetensors), or at its model.safetensors, loads it:
`load_encoder("dinov2-b-reg4", weights=FOLDER)`. The loader sees Hugging Face keys and converts them
here; plain `Dinov2Model` weights (no registers) convert the same way onto timm's non-register
DINOv2. timm's `checkpoint_filter_fn` converts only facebookresearch's original layout
(`blocks.N.attn.qkv`, `register_tokens`), not transformers' names, hence this explicit mapping.

Names (`encoder.layer.N.` -> `blocks.N.`):
- `attention.attention.{query,key,value}` (as saved; transformers 5 calls them
  `attention.{q,k,v}_proj` in memory) are concatenated, in that order, into timm's fused `attn.qkv`;
- `attention.output.dense` (`attention.o_proj`) -> `attn.proj`; `layer_scale{1,2}.lambda1` ->
  `ls{1,2}.gamma`; `norm1`, `norm2`, `mlp.fc1`, `mlp.fc2` keep their names;
- `embeddings.patch_embeddings.projection` -> `patch_embed.proj`, `embeddings.register_tokens` ->
  `reg_token`, `layernorm` -> `norm`; `embeddings.mask_token` (masked pre-training only) is dropped.
Any other key, or a missing one, is an error naming it.

Positions: transformers keeps the 518 px table (a class row and 37x37 patch rows) and resamples the
patch rows to the input grid on every forward: bicubic, align_corners=False, with antialiasing in
`Dinov2WithRegistersModel`, without in `Dinov2Model` (transformers 4.56.2, which RAE pins, and 5.x
alike). The conversion makes that same call once, for the encoder's grid. With registers, timm's
model gives the class token no position row (`no_embed_class`), so the class position is added into
`cls_token`, as transformers adds it before inserting the registers (which get none); without
registers the class row stays the first row of timm's `pos_embed`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rae.weights_io import read_state_dict

HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")

_MARKER = "embeddings.patch_embeddings.projection.weight"
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_IN_MEMORY_NAMES = {  # transformers 5's in-memory names -> the names its checkpoints are saved with
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_LAYER_RENAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_LAYER_KEYS = (*_LAYER_RENAMED, *(f"{p}.{s}" for p in _QKV for s in ("weight", "bias")))
_RENAMED = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_SPECIAL = ("embeddings.cls_token", "embeddings.position_embeddings")
_REGISTERS = "embeddings.register_tokens"
_DROPPED = ("embeddings.mask_token",)


def is_hf_dinov2(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is in transformers' DINOv2 layout (with or without registers)."""
    return _MARKER in state_dict


def state_dict_from_hf_dinov2(hf_state_dict: Mapping[str, torch.Tensor], grid: tuple[int, int], *,
                              source: str = "the state dict") -> dict[str, torch.Tensor]:
    """The timm ViT state dict (positions resampled for ``grid`` as transformers does) of a
    transformers `Dinov2WithRegistersModel` or `Dinov2Model` state dict; ``source`` names it in errors."""
    hf = _saved_names(hf_state_dict, source)
    depth = 1 + max((int(m.group(1)) for k in hf if (m := _LAYER.fullmatch(k))), default=-1)
    registers = _REGISTERS in hf
    expected = {*_RENAMED, *_SPECIAL, *([_REGISTERS] if registers else []),
                *(f"encoder.layer.{i}.{name}" for i in range(depth) for name in _LAYER_KEYS)}
    missing = sorted(expected - set(hf))
    unexpected = sorted(set(hf) - expected - set(_DROPPED))
    if missing or unexpected:
        raise ValueError(f"{source} is not a Hugging Face DINOv2 state dict the encoder can take: "
                         f"missing keys {missing}, unexpected keys {unexpected}")

    out = {timm_name: hf[name] for name, timm_name in _RENAMED.items()}
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        out.update({f"blocks.{i}.{t}": hf[layer + name] for name, t in _LAYER_RENAMED.items()})
        for suffix in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([hf[f"{layer}{p}.{suffix}"] for p in _QKV])

    table = hf["embeddings.position_embeddings"]
    class_position, patch_positions = table[:, :1], _resample_positions(table[:, 1:], grid, registers, source)
    if registers:  # timm's no_embed_class layout: no position rows for the class and register tokens
        out["cls_token"] = hf["embeddings.cls_token"] + class_position
        out["reg_token"] = hf[_REGISTERS]
        out["pos_embed"] = patch_positions
    else:
        out["cls_token"] = hf["embeddings.cls_token"]
        out["pos_embed"] = torch.cat([class_position, patch_positions], dim=1)
    return out


def _saved_names(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict with transformers 5's in-memory attention names mapped to the saved ones."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = key
        for in_memory, saved in _IN_MEMORY_NAMES.items():
            name = name.replace(in_memory, saved)
        if name in out:
            raise ValueError(f"{source} holds {name!r} twice (as {key!r} too)")
        out[name] = tensor
    return out


def _resample_positions(patch_positions: torch.Tensor, grid: tuple[int, int], registers: bool,
                        source: str) -> torch.Tensor:
    """transformers' `interpolate_pos_encoding` on the patch rows (1, side*side, dim) for ``grid``."""
    _, rows, dim = patch_positions.shape
    side = int(round(rows**0.5))
    if side * side != rows:
        raise ValueError(f"{source}: embeddings.position_embeddings has {rows} patch rows, not a square grid")
    if tuple(grid) == (side, side):
        return patch_positions  # transformers skips the resampling at the table's own size too
    table = patch_positions.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False,
                            antialias=registers).to(patch_positions.dtype)
    return resized.permute(0, 2, 3, 1).reshape(1, -1, dim)


@dataclass(frozen=True)
class HfDinov2Config:
    """The fields of a transformers DINOv2 config.json that decide what the network computes."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    num_register_tokens: int
    layer_norm_eps: float
    hidden_act: str
    use_swiglu_ffn: bool
    qkv_bias: bool

    @classmethod
    def read(cls, path: Path) -> HfDinov2Config:
        raw = json.loads(Path(path).read_text())
        raw.setdefault("num_register_tokens", 0)  # Dinov2Config has none
        absent = [f.name for f in fields(cls) if f.name not in raw]
        if absent:
            raise ValueError(f"{path} is not a transformers DINOv2 config: it lacks {absent}")
        if raw["model_type"] not in HF_MODEL_TYPES:
            raise ValueError(f"{path} has model_type {raw['model_type']!r}, not one of {list(HF_MODEL_TYPES)}")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})

    def mismatches(self, trunk: nn.Module, norm_eps: float) -> list[str]:
        """How this config differs from a timm DINOv2 ``trunk`` (its final norm's eps ``norm_eps``): its
        weights would load into the trunk yet compute something else."""
        block = trunk.blocks[0]
        patch = trunk.patch_embed.patch_size
        wanted = {
            "hidden_size": trunk.embed_dim,
            "num_hidden_layers": len(trunk.blocks),
            "num_attention_heads": block.attn.num_heads,
            "patch_size": patch[0] if isinstance(patch, (tuple, list)) else patch,
            "num_register_tokens": trunk.num_reg_tokens,
            "layer_norm_eps": norm_eps,
            "hidden_act": "gelu",  # timm's nn.GELU, exact erf
            "use_swiglu_ffn": False,
            "qkv_bias": block.attn.qkv.bias is not None,
        }
        if block.norm1.eps != norm_eps:
            wanted["layer_norm_eps"] = f"{block.norm1.eps} (blocks) and {norm_eps} (final norm)"
        return [f"{name} {getattr(self, name)!r} where the encoder has {value!r}"
                for name, value in wanted.items() if getattr(self, name) != value]


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], HfDinov2Config | None]:
    """A state dict and, when beside it, its transformers config: ``path`` is a model folder
    (config.json + model.safetensors) or a weights file; a config.json next to a file is read
    only when the file holds Hugging Face DINOv2 keys."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / HF_WEIGHTS_FILE, path / HF_CONFIG_FILE
        absent = [p.name for p in (weights, config) if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"weights folder {path} lacks {absent}: a Hugging Face model folder holds "
                                    f"{HF_CONFIG_FILE} and {HF_WEIGHTS_FILE} (sharded checkpoints are not read)")
        return read_state_dict(weights), HfDinov2Config.read(config)
    state_dict = read_state_dict(path)
    config = path.parent / HF_CONFIG_FILE
    if is_hf_dinov2(state_dict) and config.is_file():
        return state_dict, HfDinov2Config.read(config)
    return state_dict, None
