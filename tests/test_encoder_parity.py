"""Parity with the official RAE encoder (bytetriper/RAE at a4d18c4).

The official encoder is `Dinov2withNorm` (src/stage1/encoders/dinov2.py): transformers'
`Dinov2WithRegistersModel` with its final LayerNorm's affine removed, returning
`last_hidden_state[:, 5:]` (class and 4 register tokens dropped). `RAE.encode` (src/stage1/rae.py)
feeds it the image resized with `F.interpolate(mode="bicubic", align_corners=False)` and normalised
with the image processor's ImageNet mean/std. Here that computation runs on randomly initialised
transformers models (every parameter drawn at random, layer scales and norms included, so no identity
hides a wrong mapping); their weights, converted by rae.hf_dinov2, go into the project's timm encoder,
whose patch tokens must equal the official ones to 1e-5 of their largest magnitude.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from jobs.demo.photos import load_photo
from rae.encoders import ENCODER_PRESETS, EncoderSpec, encoder_from_state_dict, load_encoder
from rae.hf_dinov2 import (positions_preimage, resample_positions, state_dict_from_hf_dinov2,
                           state_dict_to_hf_dinov2)

TOLERANCE = 1e-5  # max |ours - official| / max |official|
HF_TABLE_SIZE = 518  # transformers' DINOv2 configs: a 37x37 position table


class OfficialDinov2withNorm(torch.nn.Module):
    """The official `Dinov2withNorm`, given a model instead of a hub path (same body otherwise)."""

    def __init__(self, model: torch.nn.Module, unused_token_num: int):
        super().__init__()
        self.encoder = model.eval()
        self.encoder.requires_grad_(False)
        self.encoder.layernorm.elementwise_affine = False
        self.encoder.layernorm.weight = None
        self.encoder.layernorm.bias = None
        self.unused_token_num = unused_token_num  # 5 in the official code: 1 CLS + 4 register tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x, output_hidden_states=True)
        return x.last_hidden_state[:, self.unused_token_num:]


def official_encode(official: OfficialDinov2withNorm, images: torch.Tensor, input_size: int) -> torch.Tensor:
    """The official `RAE.encode` up to the encoder output (no noise, no latent statistics, not reshaped)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    x = images
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return official((x - mean) / std)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every parameter at random: weights ~ N(0, 1/fan_in), biases and tokens off zero, norm
    weights around 1, layer scales in [0.2, 1.2] (transformers initialises them all to constants)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_token = name.startswith("embeddings.") and "patch_embeddings" not in name
            if "lambda1" in name:
                p.copy_(0.2 + torch.rand(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2 and not is_token:  # linear and patch-projection weights
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:  # biases, class/register/mask tokens, position table
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def small_hf_model(registers: bool, seed: int = 0) -> torch.nn.Module:
    """A random transformers DINOv2 of width 64, 2 layers, 4 heads, patch 14, 518 px table."""
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  patch_size=14, image_size=HF_TABLE_SIZE)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    return randomise(model, seed)


def small_project_encoder(hf_model: torch.nn.Module, registers: bool, input_size: int):
    """The project's encoder on timm's DINOv2 architecture at the small model's size, holding its weights."""
    timm_name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    spec = EncoderSpec("small-dinov2", timm_name, None, input_size, 14, 64,
                       tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    with torch.device("meta"):
        trunk = timm.create_model(timm_name, embed_dim=64, depth=2, num_heads=4, img_size=input_size, num_classes=0)
    return encoder_from_state_dict(spec, trunk, hf_model.state_dict())


def photos(size: int) -> torch.Tensor:
    """Centre squares of three real photographs, resized to ``size`` px, in [0, 1]."""
    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = torch.from_numpy(np.ascontiguousarray(load_photo(name))).permute(2, 0, 1).float() / 255
        h, w = image.shape[1:]
        s = min(h, w)
        square = image[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(out).clamp(0, 1)


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# ---- the weight conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("registers", [True, False], ids=["with-registers", "plain"])
@pytest.mark.parametrize("input_size", [224, 448, HF_TABLE_SIZE])
def test_converted_trunk_gives_the_official_patch_tokens(registers, input_size):
    hf_model = small_hf_model(registers)
    official = OfficialDinov2withNorm(small_hf_model(registers), unused_token_num=5 if registers else 1)
    encoder = small_project_encoder(hf_model, registers, input_size)
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = official(x)
        tokens = encoder.trunk.forward_features(x)[:, encoder.num_prefix_tokens:]
        ours = F.layer_norm(tokens, (64,), eps=encoder.norm_eps)
    diff = relative_difference(ours, reference)
    print(f"trunk, {'reg4' if registers else 'plain'} at {input_size} px: max relative difference {diff:.2e}")
    assert reference.shape == (2, (input_size // 14) ** 2, 64)
    assert diff < TOLERANCE


@pytest.mark.parametrize("registers", [True, False], ids=["with-registers", "plain"])
def test_image_path_gives_the_official_tokens_for_real_photos(registers):
    """256 px photos in [0, 1] -> tokens: the project's resize, normalisation, trunk and norm against
    `RAE.encode` with `Dinov2withNorm`."""
    hf_model = small_hf_model(registers)
    official = OfficialDinov2withNorm(small_hf_model(registers), unused_token_num=5 if registers else 1)
    encoder = small_project_encoder(hf_model, registers, 224)
    images = photos(encoder.spec.image_size)
    assert images.shape[-1] == 256
    with torch.no_grad():
        ours = encoder(images)
    reference = official_encode(official, images, 224)
    diff = relative_difference(ours, reference)
    print(f"image path, {'reg4' if registers else 'plain'}: max relative difference {diff:.2e}")
    assert diff < TOLERANCE


def test_resize_is_the_official_plain_bicubic_not_antialiased():
    """The tokens follow the official resize and measurably not the antialiased one."""
    hf_model = small_hf_model(True)
    official = OfficialDinov2withNorm(small_hf_model(True), unused_token_num=5)
    encoder = small_project_encoder(hf_model, True, 224)
    images = photos(256)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    antialiased = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        ours = encoder(images)
        other = official((antialiased - mean) / std)
    assert relative_difference(ours, official_encode(official, images, 224)) < TOLERANCE
    assert relative_difference(ours, other) > 100 * TOLERANCE


def test_in_memory_transformers_names_convert_like_the_saved_ones(tmp_path):
    """transformers 5 names attention `q_proj`/`o_proj` in memory and saves `attention.attention.query`
    / `attention.output.dense` (the hub checkpoints' names): both convert to the same tensors."""
    from safetensors.torch import load_file

    hf_model = small_hf_model(True)
    hf_model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    in_memory = hf_model.state_dict()
    assert "encoder.layer.0.attention.attention.query.weight" in saved
    assert "encoder.layer.0.attention.q_proj.weight" in in_memory
    a = state_dict_from_hf_dinov2(saved, (16, 16))
    b = state_dict_from_hf_dinov2(in_memory, (16, 16))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["pos_embed"].shape == (1, 256, 64) and a["reg_token"].shape == (1, 4, 64)


@pytest.mark.parametrize("registers", [True, False])
def test_positions_resampled_back_are_the_grid_table(registers):
    table = torch.randn(1, 16 * 16, 8)
    preimage = positions_preimage(table, 37, antialias=registers)
    assert preimage.shape == (1, 37 * 37, 8)
    assert relative_difference(resample_positions(preimage, 16, antialias=registers), table) < 1e-6


@pytest.mark.parametrize("registers", [True, False])
def test_timm_weights_convert_back_to_the_transformers_names(registers, tmp_path):
    """state_dict_to_hf_dinov2 gives every key transformers saves, and converts back to the same timm weights."""
    from safetensors.torch import load_file

    hf_model = small_hf_model(registers)
    hf_model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    timm_state = state_dict_from_hf_dinov2(saved, (16, 16))
    back = state_dict_to_hf_dinov2(timm_state, 37)
    assert back.keys() == saved.keys()
    assert all(torch.equal(back[k], saved[k]) for k in saved if "embeddings." not in k)
    again = state_dict_from_hf_dinov2(back, (16, 16))
    assert again.keys() == timm_state.keys()
    assert all(torch.equal(again[k], timm_state[k]) for k in timm_state if k not in ("pos_embed", "cls_token"))
    for key in ("pos_embed", "cls_token"):
        assert relative_difference(again[key], timm_state[key]) < 1e-6


# ---- the presets, loaded from a Hugging Face model folder ---------------------------------------


@pytest.fixture(scope="module")
def vit_s_reg4_folder(tmp_path_factory):
    """A random transformers Dinov2WithRegistersModel of ViT-S/14 reg4 size, saved as a model folder
    (config.json + model.safetensors) as facebook/dinov2-with-registers-small is."""
    config = Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                       intermediate_size=1536, patch_size=14, image_size=HF_TABLE_SIZE,
                                       num_register_tokens=4)
    folder = tmp_path_factory.mktemp("dinov2-with-registers-small")
    randomise(Dinov2WithRegistersModel(config), seed=3).save_pretrained(folder)
    return folder


def test_preset_loaded_from_a_hf_folder_gives_the_official_tokens(vit_s_reg4_folder):
    official = OfficialDinov2withNorm(Dinov2WithRegistersModel.from_pretrained(vit_s_reg4_folder), 5)
    from_folder = load_encoder("dinov2-s-reg4", weights=vit_s_reg4_folder)
    from_file = load_encoder("dinov2-s-reg4", weights=vit_s_reg4_folder / "model.safetensors")
    assert from_folder.spec.mean == pytest.approx(IMAGENET_DEFAULT_MEAN)  # the preset's mean/std are the official's
    assert from_folder.spec.std == pytest.approx(IMAGENET_DEFAULT_STD)
    images = photos(ENCODER_PRESETS["dinov2-s-reg4"].image_size)
    with torch.no_grad():
        ours = from_folder(images)
        assert torch.equal(from_file(images), ours)
    reference = official_encode(official, images, 224)
    diff = relative_difference(ours, reference)
    print(f"dinov2-s-reg4 preset from a HF folder, 256 px photos: max relative difference {diff:.2e}")
    assert ours.shape == (3, 256, 384)
    assert diff < TOLERANCE
    assert from_folder.weights_digest == from_file.weights_digest


def test_hf_config_that_computes_otherwise_is_refused(vit_s_reg4_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "wrong-heads"
    shutil.copytree(vit_s_reg4_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 12  # same weight shapes, another computation
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"wrong-heads does not fit encoder dinov2-s-reg4.*num_attention_heads 12 "
                                         r"where the encoder has 6"):
        load_encoder("dinov2-s-reg4", weights=folder)


def test_hf_registers_model_does_not_fit_a_plain_preset(vit_s_reg4_folder):
    with pytest.raises(ValueError, match=r"does not fit encoder dinov2-s-offline.*num_register_tokens 4 where the encoder has 0"):
        load_encoder("dinov2-s-offline", weights=vit_s_reg4_folder)


def test_folder_without_the_model_files_names_what_is_absent(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks \['model.safetensors'\]"):
        load_encoder("dinov2-s-reg4", weights=tmp_path)


# ---- refusals naming the key at fault -----------------------------------------------------------


def test_missing_hf_key_is_refused_naming_it():
    state = small_hf_model(True).state_dict()
    del state["encoder.layer.1.layer_scale2.lambda1"]
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.layer_scale2.lambda1'\], unexpected keys \[\]"):
        state_dict_from_hf_dinov2(state, (16, 16))


def test_unexpected_hf_key_is_refused_naming_it(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in small_hf_model(True).state_dict().items()}
    state["pooler.dense.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['pooler.dense.weight'\]"):
        state_dict_from_hf_dinov2(state, (16, 16))
    save_file(state, str(tmp_path / "extra.safetensors"))  # the loader says which file, too
    with pytest.raises(ValueError, match=r"extra.safetensors is not a Hugging Face DINOv2 state dict.*'pooler.dense.weight'"):
        load_encoder("dinov2-s-reg4", weights=tmp_path / "extra.safetensors")


def test_swiglu_mlp_weights_are_refused_naming_them():
    state = small_hf_model(True).state_dict()
    state["encoder.layer.0.mlp.weights_in.weight"] = state.pop("encoder.layer.0.mlp.fc1.weight")
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.0.mlp.fc1.weight'\], "
                                         r"unexpected keys \['encoder.layer.0.mlp.weights_in.weight'\]"):
        state_dict_from_hf_dinov2(state, (16, 16))
