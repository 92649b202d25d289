"""`rae sample` on a local 2-CPU Ray cluster with a tiny DiT^DH and decoder (untrained, exported in
the test): 16 tokens x 384 channels like the offline DINOv2-S at 56 px, 64 px images.

The reference run (12 items, parts of 4, batches of 2, 3 Euler steps) is made through the CLI; the
other runs must reproduce its images bit for bit, except the one that changes the batch size, which
may move a pixel by one 8-bit level (the model's kernels round differently for another batch shape).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import time

import numpy as np
import pytest
import torch
from builders import latent_manifest, write_latent_store

from jobs.cli import sample as cli_sample
from jobs.train.export import load_exported_model
from jobs.train.dit import DiTRunConfig, store_facts, write_self_contained_export
from pipelines import latent_store
from pipelines.exports import load_latent_stats, read_export_facts, write_export
from pipelines.sample_job import PARTS_DIR, SampleActor, SampleConfig, plan_labels, run_sampling
from pipelines.sample_models import item_seed
from pipelines.store_reader import open_store
from rae.decoder import build_decoder
from rae.dit import build_dit
from rae.encoders import ENCODER_PRESETS
from rae.evaluation import read_adm_npz
from rae.image_tensors import quantize
from rae.latent_spec import STATS_FILE, LatentSpec
from rae.sampling import SamplerConfig, conditional, integrate, time_grid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
ENCODER, INPUT_SIZE, TOKENS, CHANNELS, CLASSES = "dinov2-s-offline", 56, 16, 384, 4
SPEC = ENCODER_PRESETS[ENCODER].with_input_size(INPUT_SIZE).latent_spec("d" * 64, stats=STATS_FILE)
RAW = dataclasses.replace(SPEC, stats=None)  # what a decoder records: the same latents, unnormalized
NUM, PART, BATCH, STEPS = 12, 4, 2, 3


def make_store(url: str) -> str:
    """A complete latent store whose statistics have a clear mean and scale (so denormalization shows)."""
    rng = np.random.default_rng(0)
    latents = (3.0 + 2.0 * rng.normal(size=(8, 1, TOKENS, CHANNELS))).astype(np.float16)
    manifest = latent_manifest(SPEC, class_names=[f"c{i}" for i in range(CLASSES)])
    return write_latent_store(url, manifest, latents, [i % CLASSES for i in range(8)])


def untrained_dit() -> torch.nn.Module:
    """Random weights everywhere, including the zero-initialised adaLN and output layers, so the
    velocity depends on x, t and the class."""
    torch.manual_seed(1)
    dit = build_dit("ditdh-tiny", latent_channels=CHANNELS, grid=4, num_classes=CLASSES)
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return dit


def decoder_export(url: str, spec: LatentSpec) -> str:
    torch.manual_seed(2)
    decoder = build_decoder("tiny", latent_channels=spec.channels, grid=4)
    write_export(url, decoder.state_dict(), {"kind": "decoder", "builder": "rae.decoder:build_decoder",
                                             "preset": "tiny", "kwargs": {"latent_channels": spec.channels, "grid": 4},
                                             "latent_spec": spec.to_dict()})
    return url


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    store = make_store(str(root / "store"))
    run = DiTRunConfig(store=store, model="ditdh-tiny")
    facts = store_facts(latent_store.require_manifest(store), run, store)
    kwargs = {"latent_channels": CHANNELS, "grid": 4, "num_classes": CLASSES}
    write_self_contained_export(str(root / "dit"), untrained_dit().state_dict(), {
        "kind": "dit", "builder": "rae.dit:build_dit", "preset": "ditdh-tiny", "kwargs": kwargs,
        "latent_spec": facts.latent_spec.to_dict()}, facts)
    other_encoder = dataclasses.replace(RAW, encoder="dinov2-s-reg4")
    return {"store": store, "dit": str(root / "dit"), "decoder": decoder_export(str(root / "dec"), RAW),
            "other_encoder": decoder_export(str(root / "dec-s-reg4"), other_encoder),
            "other_shape": decoder_export(str(root / "dec-768"), dataclasses.replace(RAW, channels=768))}


def config(exports: dict, out, **changes) -> SampleConfig:
    base = dict(dit=exports["dit"], decoder=exports["decoder"], out=str(out), num_samples=NUM,
                sampler=SamplerConfig(num_steps=STEPS), batch_size=BATCH, part_size=PART, num_actors=1,
                device="cpu", progress=False)
    return SampleConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def reference(exports, tmp_path_factory):
    """The uninterrupted run, through `rae sample`."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    parser = argparse.ArgumentParser()
    cli_sample.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", "--dit", exports["dit"], "--decoder", exports["decoder"], "--out", str(out),
                              "--num-samples", str(NUM), "--steps", str(STEPS), "--batch-size", str(BATCH),
                              "--part-size", str(PART), "--num-actors", "1", "--device", "cpu"])
    assert args.func(args) == 0
    return out


def samples(out) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as data:
        return read_adm_npz(out / "samples.npz"), data["arr_1"]


def test_dit_export_carries_the_store_statistics_and_latent_spec(exports):
    model_json = load_exported_model(exports["dit"])[1]
    assert model_json["latent_spec"] == SPEC.to_dict() and SPEC.shape == (TOKENS, CHANNELS)
    carried = load_latent_stats(read_export_facts(exports["dit"], "dit"))
    store = open_store(exports["store"]).stats
    assert torch.equal(carried.mean, store.mean) and torch.equal(carried.var, store.var)


def test_npz_is_the_adm_layout_with_balanced_classes(reference):
    images, labels = samples(reference)
    assert images.shape == (NUM, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % CLASSES for i in range(NUM)]
    assert np.bincount(labels).tolist() == [NUM // CLASSES] * CLASSES
    assert len({images[i].tobytes() for i in range(NUM)}) == NUM  # every item has its own noise


def test_images_are_the_models_applied_to_each_items_noise(reference, exports):
    """Item i: noise from Generator(item_seed(0, i)), Euler on the shifted grid, denormalized with the
    store's statistics, decoded, rounded to 8 bits."""
    dit, decoder = load_exported_model(exports["dit"])[0], load_exported_model(exports["decoder"])[0]
    stats = open_store(exports["store"]).stats
    items = [4, 5]  # one batch of the run
    noise = torch.stack([torch.randn(TOKENS, CHANNELS, generator=torch.Generator().manual_seed(item_seed(0, i)))
                         for i in items])
    y = torch.tensor([i % CLASSES for i in items])
    z = integrate(conditional(dit, y), noise, time_grid(STEPS, latent_dim=TOKENS * CHANNELS))
    with torch.no_grad():
        expected = quantize(decoder(stats.denormalize(z))).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(samples(reference)[0][items], expected)


def test_two_workers_give_identical_images_and_a_rerun_does_no_work(reference, exports, tmp_path):
    result = run_sampling(config(exports, tmp_path / "two", num_actors=2), loader=load_exported_model)
    assert result.sampled_parts == NUM // PART
    np.testing.assert_array_equal(samples(tmp_path / "two")[0], samples(reference)[0])
    again = run_sampling(config(exports, tmp_path / "two", num_actors=2), loader=load_exported_model)
    assert again.sampled_parts == 0


def test_another_batch_size_changes_at_most_rounding(reference, exports, tmp_path):
    run_sampling(config(exports, tmp_path / "b4", batch_size=4), loader=load_exported_model)
    a, b = samples(tmp_path / "b4")[0].astype(int), samples(reference)[0].astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_interrupted_job_resumes_to_the_same_npz(reference, exports, tmp_path):
    out = tmp_path / "killed"

    class DiesOnSecondPart(SampleActor):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("injected failure")
            return super().__call__(batch)

    with pytest.raises(Exception, match="injected failure"):
        run_sampling(config(exports, out), loader=load_exported_model, actor_cls=DiesOnSecondPart)
    done = len(list((out / PARTS_DIR).glob("*.npz")))
    assert 1 <= done < NUM // PART and not (out / "samples.npz").exists()
    result = run_sampling(config(exports, out), loader=load_exported_model)
    assert result.sampled_parts == NUM // PART - done
    np.testing.assert_array_equal(samples(out)[0], samples(reference)[0])
    np.testing.assert_array_equal(samples(out)[1], samples(reference)[1])


def test_deleted_parts_are_resampled_and_no_others(reference, exports, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(reference, out)
    (out / "samples.npz").unlink()
    parts = sorted((out / PARTS_DIR).glob("*.npz"))
    kept_mtime = parts[1].stat().st_mtime_ns
    for part in (parts[0], parts[2]):
        part.unlink()
    time.sleep(0.01)
    result = run_sampling(config(exports, out), loader=load_exported_model)
    assert result.sampled_parts == 2 and parts[1].stat().st_mtime_ns == kept_mtime
    np.testing.assert_array_equal(samples(out)[0], samples(reference)[0])


def test_other_settings_on_an_existing_output_are_refused(reference, exports):
    with pytest.raises(ValueError, match=r"other settings.*\n.*seed: .* has 0, this run asks for 7"):
        run_sampling(config(exports, reference, seed=7), loader=load_exported_model)


@pytest.mark.parametrize("decoder, message", [
    ("other_encoder", r"works on dinov2-s-offline at 56 px \(16 tokens x 384[\s\S]*\n  encoder: the DiT \(.*\) "
                      r"has 'dinov2-s-offline', the decoder \(.*dec-s-reg4\) has 'dinov2-s-reg4'"),
    ("other_shape", r"16 tokens x 384 channels.*16 tokens x 768 channels[\s\S]*\n  channels: the DiT \(.*\) has 384, "
                    r"the decoder \(.*dec-768\) has 768"),
])
def test_decoder_for_other_latents_is_refused(exports, tmp_path, decoder, message):
    with pytest.raises(ValueError, match=message):
        run_sampling(config(exports, tmp_path / "x", decoder=exports[decoder]), loader=load_exported_model)
    assert not (tmp_path / "x").exists()


def test_labels_random_are_seeded_and_subsets_balanced(exports):
    cfg = config(exports, "unused", num_samples=1000, labels="random", classes=(1, 3))
    labels = plan_labels(cfg, CLASSES)
    assert set(labels.tolist()) == {1, 3} and 400 < (labels == 1).sum() < 600
    np.testing.assert_array_equal(labels, plan_labels(cfg, CLASSES))
    assert not np.array_equal(labels, plan_labels(config(exports, "u", num_samples=1000, labels="random",
                                                         classes=(1, 3), seed=1), CLASSES))
    assert plan_labels(config(exports, "u", num_samples=6, classes=(1, 3)), CLASSES).tolist() == [1, 3] * 3
    with pytest.raises(ValueError, match=r"--classes \[5\] must be .* in \[0, 4\)"):
        plan_labels(config(exports, "u", classes=(5,)), CLASSES)


def test_gpu_request_without_gpus_fails_fast(exports, tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="need 1 GPU each but none started within 3s"):
        run_sampling(config(exports, tmp_path / "gpu", device="gpu", gpu_wait_s=3), loader=load_exported_model)
    assert time.monotonic() - start < 60


def test_tf32_precision_turns_tf32_matmuls_on_only_inside_and_restores_the_flags():
    from pipelines.sample_models import matmul_precision

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with matmul_precision("fp32"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(ValueError, match="precision must be one of tf32, fp32, bf16, got 'fp16'"):
        dataclasses.replace(SampleConfig(dit="d", decoder="e", out="o"), precision="fp16")
