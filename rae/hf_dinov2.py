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
Any other key, or a missing one, is an error naming it. One table (`_names`) serves both directions:
`state_dict_to_hf_dinov2` is the inverse (timm -> transformers), which `rae.diffusers_rae` uses to
export the encoder into diffusers' AutoencoderRAE (whose encoder is this model under ``encoder.``).

Positions: transformers keeps the 518 px table (a class row and 37x37 patch rows) and resamples the
patch rows to the input grid on every forward: bicubic, align_corners=False, with antialiasing in
`Dinov2WithRegistersModel`, without in `Dinov2Model` (transformers 4.56.2, which RAE pins, and 5.x
alike). The conversion makes that same call once, for the encoder's grid. With registers, timm's
model gives the class token no position row (`no_embed_class`), so the class position is added into
`cls_token`, as transformers adds it before inserting the registers (which get none); without
registers the class row stays the first row of timm's `pos_embed`. The inverse needs a 37x37 table that
this resampling maps onto timm's grid table: `positions_preimage`, the least-norm preimage under the
(linear, full-rank) resampling; exact up to float32 rounding at that grid, but not the original table.
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
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_IN_MEMORY_NAMES = {  # transformers 5's in-memory names -> the names its checkpoints are saved with
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}
# timm name -> transformers name (as saved): in blocks.N. / encoder.layer.N., then outside the layers
_LAYER_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")  # -> attn.qkv
_TOP_NAMES = {
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
}
_FINAL_NORM = {"norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_REGISTERS = "embeddings.register_tokens"  # timm's reg_token
_CLS, _POSITIONS, _MASK = "embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token"


def is_hf_dinov2(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is in transformers' DINOv2 layout (with or without registers)."""
    return _MARKER in state_dict


def state_dict_from_hf_dinov2(hf_state_dict: Mapping[str, torch.Tensor], grid: tuple[int, int], *,
                              source: str = "the state dict", depth: int | None = None,
                              registers: bool | None = None, final_norm: bool = True) -> dict[str, torch.Tensor]:
    """The timm ViT state dict (positions resampled for ``grid`` as transformers does) of a
    transformers `Dinov2WithRegistersModel` or `Dinov2Model` state dict; ``source`` names it in errors.

    ``depth`` and ``registers`` are what the state dict must hold (None: what its keys say). Without
    ``final_norm`` the model has no final LayerNorm affine (diffusers' AutoencoderRAE removes it):
    ``layernorm.*`` are ignored where present and no ``norm.*`` is returned."""
    hf = _saved_names(hf_state_dict, source)
    if depth is None:
        depth = 1 + max((int(m.group(1)) for k in hf if (m := _LAYER.fullmatch(k))), default=-1)
    if registers is None:
        registers = _REGISTERS in hf
    names, qkv = _names(depth, registers, final_norm)
    expected = {*names.values(), *(k for parts in qkv.values() for k in parts), _CLS, _POSITIONS}
    ignored = {_MASK, *(() if final_norm else _FINAL_NORM.values())}
    missing = sorted(expected - set(hf))
    unexpected = sorted(set(hf) - expected - ignored)
    if missing or unexpected:
        raise ValueError(f"{source} is not a Hugging Face DINOv2 state dict the encoder can take: "
                         f"missing keys {missing}, unexpected keys {unexpected}")

    out = {timm_name: hf[name] for timm_name, name in names.items()}
    out.update({timm_name: torch.cat([hf[name] for name in parts]) for timm_name, parts in qkv.items()})
    table = hf[_POSITIONS]
    class_position = table[:, :1]
    patch_positions = resample_positions(table[:, 1:], grid, antialias=registers,
                                         source=f"{source}: {_POSITIONS}")
    if registers:  # timm's no_embed_class layout: no position rows for the class and register tokens
        out["cls_token"] = hf[_CLS] + class_position
        out["pos_embed"] = patch_positions
    else:
        out["cls_token"] = hf[_CLS]
        out["pos_embed"] = torch.cat([class_position, patch_positions], dim=1)
    return out


def state_dict_to_hf_dinov2(timm_state_dict: Mapping[str, torch.Tensor], table_side: int, *,
                            source: str = "the state dict", depth: int | None = None,
                            registers: bool | None = None, final_norm: bool = True) -> dict[str, torch.Tensor]:
    """The inverse of `state_dict_from_hf_dinov2`: the transformers state dict (saved names; see
    `in_memory_name`) of a timm DINOv2 ViT, its grid table replaced by the ``table_side`` x ``table_side``
    table transformers resamples onto it (`positions_preimage`), the class position zero with registers
    (timm folds it into ``cls_token``), a zero ``mask_token`` (used only in masked pre-training).
    ``depth``, ``registers`` and ``final_norm`` are what the state dict must hold (None: what its keys say)."""
    timm = dict(timm_state_dict)
    if depth is None:
        depth = 1 + max((int(m.group(1)) for k in timm if (m := _BLOCK.fullmatch(k))), default=-1)
    if registers is None:
        registers = "reg_token" in timm
    names, qkv = _names(depth, registers, final_norm)
    expected = {*names, *qkv, "cls_token", "pos_embed"}
    missing, unexpected = sorted(expected - set(timm)), sorted(set(timm) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} is not a timm DINOv2 state dict of {depth} blocks "
                         f"{'with' if registers else 'without'} registers: missing keys {missing}, "
                         f"unexpected keys {unexpected}")

    out = {name: timm[timm_name] for timm_name, name in names.items()}
    for timm_name, parts in qkv.items():
        out.update(zip(parts, timm[timm_name].chunk(3)))
    cls, positions = timm["cls_token"], timm["pos_embed"]
    if registers:
        class_position, grid_positions = positions.new_zeros(1, 1, positions.shape[-1]), positions
    else:
        class_position, grid_positions = positions[:, :1], positions[:, 1:]
    patch_positions = positions_preimage(grid_positions, table_side, antialias=registers)
    out[_CLS] = cls
    out[_MASK] = cls.new_zeros(1, cls.shape[-1])
    out[_POSITIONS] = torch.cat([class_position, patch_positions], dim=1)
    return out


def _names(depth: int, registers: bool, final_norm: bool) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(timm name -> transformers name, timm qkv name -> its three transformers names) of the renamed tensors."""
    names = {**_TOP_NAMES, **(_FINAL_NORM if final_norm else {}), **({"reg_token": _REGISTERS} if registers else {})}
    for i in range(depth):
        names.update({f"blocks.{i}.{t}": f"encoder.layer.{i}.{h}" for t, h in _LAYER_NAMES.items()})
    qkv = {f"blocks.{i}.attn.qkv.{s}": tuple(f"encoder.layer.{i}.{p}.{s}" for p in _QKV)
           for i in range(depth) for s in ("weight", "bias")}
    return names, qkv


def in_memory_name(name: str) -> str:
    """A transformers DINOv2 key (saved name) under transformers 5's in-memory attention names."""
    for in_memory, saved in _IN_MEMORY_NAMES.items():
        name = name.replace(saved, in_memory)
    return name


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


def resample_positions(patch_positions: torch.Tensor, grid: int | tuple[int, int], *, antialias: bool = True,
                       source: str = "the position table") -> torch.Tensor:
    """transformers' `interpolate_pos_encoding` on the patch rows (1, side*side, dim) for ``grid``: bicubic,
    align_corners=False, in float32, antialiased in `Dinov2WithRegistersModel` (not in `Dinov2Model`);
    skipped at the table's own size."""
    _, rows, dim = patch_positions.shape
    side = _square_side(rows, source)
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if grid == (side, side):
        return patch_positions  # transformers skips the resampling at the table's own size too
    table = patch_positions.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False,
                            antialias=antialias).to(patch_positions.dtype)
    return resized.permute(0, 2, 3, 1).reshape(1, -1, dim)


def positions_preimage(grid_positions: torch.Tensor, side: int, *, antialias: bool = True) -> torch.Tensor:
    """A (1, side*side, dim) table that `resample_positions` maps onto ``grid_positions`` (1, grid*grid, dim):
    the least-norm solution through the resampling's matrix (float64; it has full row rank)."""
    grid = _square_side(grid_positions.shape[1], "the grid's position table")
    if side == grid:
        return grid_positions
    basis = torch.eye(side * side, dtype=torch.float64).reshape(1, side * side, side, side)
    operator = F.interpolate(basis, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    operator = operator.reshape(side * side, grid * grid).T  # (grid*grid, side*side)
    # least-norm: A^T (A A^T)^-1 y; A A^T is small and well conditioned (singular values of A ~0.2-0.45)
    preimage = operator.T @ torch.linalg.solve(operator @ operator.T, grid_positions[0].double())
    return preimage.to(grid_positions.dtype).unsqueeze(0)


def _square_side(rows: int, source: str) -> int:
    side = int(round(rows**0.5))
    if side * side != rows:
        raise ValueError(f"{source} has {rows} patch rows, not a square grid")
    return side


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
