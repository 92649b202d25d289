"""The discriminator and DiffAugment compute what the official RAE code computes.

The reference below is the official code (github.com/bytetriper/RAE, commit a4d18c4, MIT licence),
copied with only what these checks never reach removed: from src/disc/dinodisc.py the flash/fused
kernel stubs (None there), the GroupNorm head option (RAE's config: bn), the random window crop (off by
default: crop_prob=-0.5) and position interpolation (not needed at 224 px), and from src/disc/diffaug.py
the warmup blur (off by default: warmup_blur_schedule=0); BatchNormLocal is OfficialBatchNormLocal here.
Both sides load the
same random, non-zero weights (the official DINO checkpoint's key names are timm's) and read the same
inputs: images u in [0, 1] here, x = 2u - 1 for the official code.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.spectral_norm import SpectralNorm

from rae.diffaugment import DEFAULT_POLICY, diff_augment
from rae.discriminator import (
    TRUNK_KWARGS,
    BatchNormLocal,
    Discriminator,
    DiscriminatorConfig,
    build_discriminator,
    heads_state_from_official,
)

TOLERANCE = 1e-5  # max |project - official| / max |official|


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, (tuple(ours.shape), tuple(reference.shape))
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# Official reference: src/disc/dinodisc.py @ a4d18c4 (MIT), minus the fused kernels and the crop
# ----------------------------------------------------------------------------------------------

def slow_attn(query, key, value, scale: float, attn_mask=None, dropout_p=0.0):
    attn = query.mul(scale) @ key.transpose(-2, -1)  # BHLc @ BHcL => BHLL
    if attn_mask is not None:
        attn.add_(attn_mask)
    return (F.dropout(attn.softmax(dim=-1), p=dropout_p, inplace=True) if dropout_p > 0 else attn.softmax(dim=-1)) @ value


class MLPNoDrop(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, fused_if_available=True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttentionNoDrop(nn.Module):
    def __init__(self, block_idx, embed_dim=768, num_heads=12, flash_if_available=True):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads  # =64
        self.scale = 1 / math.sqrt(self.head_dim)
        self.qkv, self.proj = nn.Linear(embed_dim, embed_dim * 3, bias=True), nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # BHLc
        oup = slow_attn(query=q, key=k, value=v, scale=self.scale).transpose(1, 2).reshape(B, L, C)
        return self.proj(oup)


class SABlockNoDrop(nn.Module):
    def __init__(self, block_idx, embed_dim, num_heads, mlp_ratio, norm_eps):
        super(SABlockNoDrop, self).__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn = SelfAttentionNoDrop(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads, flash_if_available=True)
        self.norm2 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mlp = MLPNoDrop(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), fused_if_available=True)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class ResidualBlock(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.ratio = 1 / np.sqrt(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x).add(x)).mul_(self.ratio)


class SpectralConv1d(nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SpectralNorm.apply(self, name='weight', n_power_iterations=1, dim=0, eps=1e-12)


class OfficialBatchNormLocal(nn.Module):
    def __init__(self, num_features: int, affine: bool = True, virtual_bs: int = 1, eps: float = 1e-6):
        super().__init__()
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.affine = affine
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()
        x = x.float()
        # Reshape batch into groups.
        G = np.ceil(x.size(0) / self.virtual_bs).astype(int)
        x = x.view(G, -1, x.size(-2), x.size(-1))
        # Calculate stats.
        mean = x.mean([1, 3], keepdim=True)
        var = x.var([1, 3], keepdim=True, unbiased=False)
        x = (x - mean) / (torch.sqrt(var + self.eps))
        if self.affine:
            x = x * self.weight[None, :, None] + self.bias[None, :, None]
        return x.view(shape)


recipes = {
    "S_8": {"depth": 12, "key_depths": (2, 5, 8, 11), "norm_eps": 1e-6, "patch_size": 8, "in_chans": 3,
            "embed_dim": 384, "num_heads": 6, "mlp_ratio": 4.0},
}


def make_block(channels: int, kernel_size: int, norm_type: str, norm_eps: float, using_spec_norm: bool) -> nn.Module:
    if norm_type == "bn":
        norm = OfficialBatchNormLocal(channels, eps=norm_eps)
    else:
        raise NotImplementedError(f"Unknown norm_type '{norm_type}'")
    conv = SpectralConv1d if using_spec_norm else nn.Conv1d
    return nn.Sequential(
        conv(channels, channels, kernel_size=kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        norm,
        nn.LeakyReLU(negative_slope=0.2, inplace=True),
    )


class DinoDisc(nn.Module):
    def __init__(self, device, dino_ckpt_path: str, ks: int, key_depths=(2, 5, 8, 11), norm_type="bn",
                 using_spec_norm=True, norm_eps=1e-6, recipe: str = "S_16"):
        super().__init__()
        state = torch.load(dino_ckpt_path, map_location="cpu")
        for key in sorted(state.keys()):
            if ".attn.qkv.bias" in key:
                bias = state[key]
                C = bias.numel() // 3
                bias[C: 2 * C].zero_()
        recipe_cfg = dict(recipes[recipe])
        key_depths = tuple(d for d in key_depths if d < recipe_cfg["depth"])
        recipe_cfg.update({"key_depths": key_depths, "norm_eps": norm_eps})
        dino = FrozenDINONoDrop(**recipe_cfg)
        missing, unexpected = dino.load_state_dict(state, strict=False)
        missing = [m for m in missing if all(x not in m for x in {"x_scale", "x_shift"})]
        if missing:
            raise RuntimeError(f"DINO checkpoint missing keys: {missing}")
        if unexpected:
            raise RuntimeError(f"DINO checkpoint has unexpected keys: {unexpected}")
        dino.eval()
        self.dino_proxy: Tuple[FrozenDINONoDrop, ...] = (dino.to(device=device),)
        dino_C = self.dino_proxy[0].embed_dim
        self.heads = nn.ModuleList([
            nn.Sequential(
                make_block(dino_C, kernel_size=1, norm_type=norm_type, norm_eps=norm_eps, using_spec_norm=using_spec_norm),
                ResidualBlock(make_block(dino_C, kernel_size=ks, norm_type=norm_type, norm_eps=norm_eps,
                                         using_spec_norm=using_spec_norm)),
                (SpectralConv1d if using_spec_norm else nn.Conv1d)(dino_C, 1, kernel_size=1, padding=0),
            )
            for _ in range(len(key_depths) + 1)
        ])
        for p in self.heads:
            p.requires_grad_(True)
        self.dino_proxy[0].requires_grad_(False)

    def forward(self, x_in_pm1: torch.Tensor, grad_ckpt: bool = False) -> torch.Tensor:
        activations: List[torch.Tensor] = self.dino_proxy[0](x_in_pm1, grad_ckpt=False)
        batch = x_in_pm1.shape[0]
        outputs = []
        for head, act in zip(self.heads, activations):
            out = head(act).view(batch, -1)
            outputs.append(out)
        return torch.cat(outputs, dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x)


class FrozenDINONoDrop(nn.Module):
    def __init__(self, depth=12, key_depths=(2, 5, 8, 11), norm_eps=1e-6, patch_size=16, in_chans=3, num_classes=0,
                 embed_dim=384, num_heads=6, mlp_ratio=4.0, crop_prob: float = -0.5, no_resize: bool = False,
                 original_input_size: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.img_size = 224
        self.original_input_size = original_input_size if original_input_size is not None else self.img_size
        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.patch_size = patch_size
        self.patch_nums = self.img_size // patch_size
        mean = torch.tensor((0.485, 0.456, 0.406))
        std = torch.tensor((0.229, 0.224, 0.225))
        self.register_buffer("x_scale", (0.5 / std).reshape(1, 3, 1, 1))
        self.register_buffer("x_shift", ((0.5 - mean) / std).reshape(1, 3, 1, 1))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_nums * self.patch_nums + 1, embed_dim))
        self.key_depths = set(d for d in key_depths if d < depth)
        self.blocks = nn.Sequential(*[
            SABlockNoDrop(block_idx=i, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
            for i in range(max(depth, 1 + max(self.key_depths, default=0)))
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.crop_prob = crop_prob
        self.no_resize = no_resize
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, grad_ckpt=False):
        if not self.no_resize:
            x = F.interpolate(x, size=(self.original_input_size, self.original_input_size), mode="bilinear", align_corners=False)
            assert not self.crop_prob > 0, "the random window crop is not copied here"
        else:
            if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
                x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        assert x.shape[1] == self.pos_embed.shape[1], "position interpolation is not copied here"
        x = x + self.pos_embed
        activations = []
        for idx, block in enumerate(self.blocks):
            x = block(x)
            if idx in self.key_depths:
                activations.append(x[:, 1:, :].transpose(1, 2))
        activations.insert(0, x[:, 1:, :].transpose(1, 2))
        return activations


# ----------------------------------------------------------------------------------------------
# Official reference: src/disc/diffaug.py @ a4d18c4 (MIT; from StyleGAN-T), minus the warmup blur
# ----------------------------------------------------------------------------------------------

class DiffAug(object):
    def __init__(self, prob=1.0, cutout=0.2):
        self.grids = {}
        self.prob = abs(prob)
        self.using_cutout = prob > 0
        self.cutout = cutout

    def get_grids(self, B, x, y, dev):
        if (B, x, y) in self.grids:
            return self.grids[(B, x, y)]
        self.grids[(B, x, y)] = ret = torch.meshgrid(
            torch.arange(B, dtype=torch.long, device=dev),
            torch.arange(x, dtype=torch.long, device=dev),
            torch.arange(y, dtype=torch.long, device=dev),
            indexing='ij'
        )
        return ret

    def aug(self, BCHW: torch.Tensor, warmup_blur_schedule: float = 0) -> torch.Tensor:
        if BCHW.dtype != torch.float32:
            BCHW = BCHW.float()
        assert warmup_blur_schedule == 0, "the warmup blur is not copied here"
        if self.prob < 1e-6:
            return BCHW
        trans, color, cut = torch.rand(3) <= self.prob
        trans, color, cut = trans.item(), color.item(), cut.item()
        B, dev = BCHW.shape[0], BCHW.device
        rand01 = torch.rand(7, B, 1, 1, device=dev) if (trans or color or cut) else None
        raw_h, raw_w = BCHW.shape[-2:]
        if trans:
            ratio = 0.125
            delta_h = round(raw_h * ratio)
            delta_w = round(raw_w * ratio)
            translation_h = rand01[0].mul(delta_h + delta_h + 1).floor().long() - delta_h
            translation_w = rand01[1].mul(delta_w + delta_w + 1).floor().long() - delta_w
            grid_B, grid_h, grid_w = self.get_grids(B, raw_h, raw_w, dev)
            grid_h = (grid_h + translation_h).add_(1).clamp_(0, raw_h + 1)
            grid_w = (grid_w + translation_w).add_(1).clamp_(0, raw_w + 1)
            bchw_pad = F.pad(BCHW, [1, 1, 1, 1, 0, 0, 0, 0])
            BCHW = bchw_pad.permute(0, 2, 3, 1).contiguous()[grid_B, grid_h, grid_w].permute(0, 3, 1, 2).contiguous()
        if color:
            BCHW = BCHW.add(rand01[2].unsqueeze(-1).sub(0.5))
            bchw_mean = BCHW.mean(dim=1, keepdim=True)
            BCHW = BCHW.sub(bchw_mean).mul(rand01[3].unsqueeze(-1).mul(2)).add_(bchw_mean)
            bchw_mean = BCHW.mean(dim=(1, 2, 3), keepdim=True)
            BCHW = BCHW.sub(bchw_mean).mul(rand01[4].unsqueeze(-1).add(0.5)).add_(bchw_mean)
        if self.using_cutout and cut:
            ratio = self.cutout
            cutout_h = round(raw_h * ratio)
            cutout_w = round(raw_w * ratio)
            offset_h = rand01[5].mul(raw_h + (1 - cutout_h % 2)).floor().long()
            offset_w = rand01[6].mul(raw_w + (1 - cutout_w % 2)).floor().long()
            grid_B, grid_h, grid_w = self.get_grids(B, cutout_h, cutout_w, dev)
            grid_h = (grid_h + offset_h).sub_(cutout_h // 2).clamp(min=0, max=raw_h - 1)
            grid_w = (grid_w + offset_w).sub_(cutout_w // 2).clamp(min=0, max=raw_w - 1)
            mask = torch.ones(B, raw_h, raw_w, dtype=BCHW.dtype, device=dev)
            mask[grid_B, grid_h, grid_w] = 0
            BCHW = BCHW.mul(mask.unsqueeze(1))
        return BCHW


# ----------------------------------------------------------------------------------------------
# Same random weights in both
# ----------------------------------------------------------------------------------------------

# The paper's trunk is ViT-S/8; the narrow one (same depth, patch and 784 tokens, width 64) keeps the
# float64 and training-mode checks quick. A test-only recipe, next to the copied official one.
recipes["narrow_8"] = dict(recipes["S_8"], embed_dim=64, num_heads=2)
TIMM_NAME = "vit_small_patch8_224.dino"


def random_like(name: str, tensor: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random, non-zero stand-in for a weight: LayerNorm scales near 1, small vectors (biases, the
    heads' norm affines), fan-in-scaled matrices, unit power-iteration vectors."""
    noise = torch.randn(tensor.shape, generator=g)
    if name.endswith(("weight_u", "weight_v")):
        return F.normalize(noise, dim=0)
    if "norm" in name and name.endswith("weight"):
        return 1 + 0.2 * noise
    if tensor.ndim <= 1 or name in ("cls_token", "pos_embed"):
        return 0.2 * noise
    return noise / math.sqrt(tensor[0].numel())


def write_dino_file(directory, recipe: str, seed: int) -> str:
    """A random DINO checkpoint with the official file's (= timm's) key names."""
    import timm

    dims = {k: recipes[recipe][k] for k in ("embed_dim", "num_heads")}
    shapes = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **dims).state_dict()
    g = torch.Generator().manual_seed(seed)
    path = directory / f"dino_{recipe}.pth"
    torch.save({name: random_like(name, t, g) for name, t in shapes.items()}, path)
    return str(path)


def official_discriminator(path: str, recipe: str, seed: int) -> DinoDisc:
    """The official DinoDisc as DINOv2-B_decXL.yaml configures it (ks 9, bn, spectral norm), random heads."""
    official = DinoDisc(device=torch.device("cpu"), dino_ckpt_path=path, ks=9, norm_type="bn",
                        using_spec_norm=True, recipe=recipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in official.heads.state_dict().items():
            tensor.copy_(random_like(name, tensor, g))
    return official


def narrow_pair(path: str, seed: int) -> tuple[DinoDisc, Discriminator]:
    """Official and project discriminators on the narrow trunk, built the way build_discriminator builds."""
    import timm

    official = official_discriminator(path, "narrow_8", seed)
    features = timm.create_model(TIMM_NAME, pretrained=False, img_size=224, embed_dim=64, num_heads=2, **TRUNK_KWARGS)
    features.load_state_dict(torch.load(path), strict=True)
    ours = Discriminator(DiscriminatorConfig(), features, "test")
    ours.load_official_state_dict(official.state_dict())
    return official, ours


@pytest.fixture(scope="module")
def dino_files(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("dino")
    return {recipe: write_dino_file(directory, recipe, seed) for seed, recipe in enumerate(("S_8", "narrow_8"))}


def _images(seed: int, batch: int, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------
# Discriminator parity
# ----------------------------------------------------------------------------------------------


def test_the_paper_discriminator_matches_the_official_one(dino_files):
    """ViT-S/8 from a checkpoint file through build_discriminator, fp32, on the decoder's 256 px images."""
    official = official_discriminator(dino_files["S_8"], "S_8", seed=10)
    ours = build_discriminator("dino-vits8", weights=dino_files["S_8"])
    converted = heads_state_from_official(official.state_dict())  # the official state dict: heads only
    assert sorted(converted) == sorted(f"heads.{k}" for k in ours.heads.state_dict())
    ours.load_official_state_dict(official.state_dict())
    for key, value in converted.items():
        assert torch.equal(value, ours.state_dict()[key]), key
    official.eval(), ours.eval()
    u = _images(0, 2, 256)
    with torch.no_grad():
        ref, got = official(u * 2 - 1), ours(u)
    assert got.shape == ref.shape == (2, 5 * 28 * 28)
    rel = relative_difference(got, ref)
    print(f"ViT-S/8, fp32, 256 px: logits max rel diff {rel:.2e}")
    assert rel < TOLERANCE


def test_logits_and_image_gradients_match_the_official_ones_in_float64(dino_files):
    """Float64 leaves only rounding (~1e-15) between two computations that are the same; in fp32 the
    gradients through 12 random blocks carry ~1e-4 of rounding noise, too much for a 1e-5 check."""
    official, ours = narrow_pair(dino_files["narrow_8"], seed=11)
    official.double().eval(), official.dino_proxy[0].double(), ours.double().eval()
    u = _images(1, 2, 256, torch.float64).requires_grad_(True)  # batch of 2: per-sample norm statistics
    x = (u.detach() * 2 - 1).requires_grad_(True)
    ref, got = official(x), ours(u)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (ref * weights).sum().backward()
    (got * weights).sum().backward()
    rel_logits = relative_difference(got.detach(), ref.detach())
    rel_grads = relative_difference(u.grad, 2 * x.grad)  # x = 2u - 1
    print(f"narrow, fp64, 256 px: logits max rel diff {rel_logits:.2e}, image gradients {rel_grads:.2e}")
    assert rel_logits < TOLERANCE
    assert rel_grads < TOLERANCE


def test_training_mode_power_iterations_match_the_official_ones(dino_files):
    """Each training-mode forward runs one power iteration per spectral-norm conv: the logits of
    consecutive forwards and the vectors left behind must follow the official ones. The second
    forward reads 224 px images, which both sides pass through an identity resize."""
    official, ours = narrow_pair(dino_files["narrow_8"], seed=12)
    official.train(), ours.train()
    worst = 0.0
    with torch.no_grad():
        for step, size in enumerate((256, 224)):
            u = _images(10 + step, 2, size)
            worst = max(worst, relative_difference(ours(u), official(u * 2 - 1)))
    print(f"narrow, fp32, training mode, 2 forwards: logits max rel diff {worst:.2e}")
    assert worst < TOLERANCE
    for key, value in heads_state_from_official(official.state_dict()).items():
        assert relative_difference(ours.state_dict()[key], value) < TOLERANCE, key


@pytest.mark.parametrize("batch, virtual_bs", [(4, 1), (4, 2), (6, 4)])  # (6, 4): official groups of 3
def test_batch_norm_local_matches_the_official_one(batch, virtual_bs):
    g = torch.Generator().manual_seed(batch + virtual_bs)
    ref = OfficialBatchNormLocal(16, virtual_bs=virtual_bs)
    ours = BatchNormLocal(16, virtual_batch_size=virtual_bs)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(16, generator=g))
        ref.bias.copy_(0.2 * torch.randn(16, generator=g))
    ours.load_state_dict(ref.state_dict())
    x = 3 * torch.randn(batch, 16, 50, generator=g) + 1
    assert relative_difference(ours(x), ref(x)) < TOLERANCE
    half = x.to(torch.bfloat16)
    assert ours(half).dtype == torch.float32
    assert relative_difference(ours(half), ref(half)) < TOLERANCE


def test_batch_norm_local_names_a_batch_it_cannot_group():
    with pytest.raises(ValueError, match="BatchNormLocal: batch 5"):
        BatchNormLocal(4, virtual_batch_size=2)(torch.randn(5, 4, 3))


def test_hooks_out_of_order_or_range_are_refused():
    import timm

    features = timm.create_model(TIMM_NAME, pretrained=False, img_size=32, embed_dim=32, num_heads=1, **TRUNK_KWARGS)
    for hooks in ((5, 2), (2, 2), (2, 12)):
        with pytest.raises(ValueError, match=r"hooks .* must be increasing block indices in \[0, 12\)"):
            Discriminator(DiscriminatorConfig(hooks=hooks), features, "test")


def test_a_state_dict_that_is_not_the_official_discriminators_is_refused(dino_files):
    official, ours = narrow_pair(dino_files["narrow_8"], seed=13)
    wrapped = {f"module.{k}": v for k, v in official.state_dict().items()}
    with pytest.raises(ValueError, match=r"'module\.heads\.0\.0\.0\.bias' is not a head entry"):
        ours.load_official_state_dict(wrapped)
    fewer = {k: v for k, v in official.state_dict().items() if not k.startswith("heads.4.")}
    with pytest.raises(ValueError, match="does not fit these 5 heads"):
        ours.load_official_state_dict(fewer)


# ----------------------------------------------------------------------------------------------
# DiffAugment parity: same seed, same augmented batch
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prob, cutout, size", [
    (1.0, 0.0, 256),  # RAE's config (DINOv2-B_decXL.yaml: prob 1, cutout 0), the decoder's image size
    (1.0, 0.2, 20),  # the class default cutout; 20 * 0.125 = 2.5 rounds half to even, to 2
    (0.5, 0.2, 36),  # ops switched on and off by the coins
])
def test_diff_augment_matches_the_official_one_seed_for_seed(prob, cutout, size):
    policy = DEFAULT_POLICY if cutout == 0 else ("translation", "color", "cutout")
    reference = DiffAug(prob=prob, cutout=cutout)
    worst = 0.0
    for seed in range(6):
        u = _images(100 + seed, 4, size)
        torch.manual_seed(seed)
        ref = reference.aug(u * 2 - 1)
        got = diff_augment(u, policy, cutout_ratio=cutout, prob=prob, generator=torch.Generator().manual_seed(seed))
        worst = max(worst, relative_difference(got * 2 - 1, ref))
        torch.manual_seed(seed)  # the global generator, as the official code draws
        worst = max(worst, relative_difference(diff_augment(u, policy, cutout_ratio=cutout, prob=prob) * 2 - 1, ref))
    print(f"prob {prob}, cutout {cutout}, {size} px: max rel diff {worst:.2e}")
    assert worst < TOLERANCE


def test_diff_augment_with_prob_zero_returns_the_images_and_draws_nothing():
    u = _images(0, 2, 16)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(diff_augment(u, prob=0.0, generator=g), u)
    assert torch.equal(g.get_state(), state)
