"""`rae train dit` on a tiny latent store (written in the store format, 2 Ray workers, gloo, FSDP2
on CPU): the loss falls, the EMA export loads into a working model, and a store made with another
the DiT takes its latent space from the store's LatentSpec, which its export copies verbatim."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import latent_manifest, write_latent_store

from jobs.config_overrides import load_config
from jobs.train.export import export_url, load_exported_model
from jobs.train.dit import DiTRunConfig, store_facts, train_dit
from pipelines import latent_store
from pipelines.store_reader import open_store, read_latents
from rae.dit import build_dit
from rae.transport import training_loss
from rae.encoders import ENCODER_PRESETS
from rae.latent_spec import STATS_FILE

pytestmark = pytest.mark.slow

ENCODER, INPUT_SIZE = "dinov2-s-offline", 56  # 4x4 grid of 384-channel tokens
TOKENS, CHANNELS, CLASSES, ROWS = 16, 384, 4, 64


def make_store(url: str, *, rows: int = ROWS, seed: int = 0) -> str:
    """A complete store of class-dependent Gaussian latents, through the pipeline's own writer."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, TOKENS, CHANNELS)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=rows)
    latents = centres[labels] + 0.3 * rng.normal(size=(rows, TOKENS, CHANNELS)).astype(np.float32)
    spec = ENCODER_PRESETS[ENCODER].with_input_size(INPUT_SIZE).latent_spec("synthetic", stats=STATS_FILE)
    manifest = latent_manifest(spec, parts=2, class_names=[f"c{i}" for i in range(CLASSES)])
    return write_latent_store(url, manifest, latents[:, None].astype(np.float16), labels)


def flow_matching_loss(model: torch.nn.Module, store: str) -> float:
    """The training objective over the whole store, at fixed noise and times (the same for every model)."""
    data = read_latents(store)
    x = open_store(store).stats.normalize(torch.from_numpy(data["latent"].astype(np.float32)))
    with torch.no_grad():
        losses = training_loss(model.eval(), x, torch.from_numpy(data["label"]).long(),
                               generator=torch.Generator().manual_seed(0))
    return losses.mean().item()


def tiny_config(store: str, **sets: str) -> DiTRunConfig:
    items = [f"{k}={v}" for k, v in {
        "store": store, "model": "ditdh-tiny", "ema_decay": 0.9,
        "loop.epochs": 4, "loop.global_batch_size": 16, "loop.max_micro_batch": 8,
        "loop.checkpoint_every_steps": 8, "loop.log_every_steps": 4, "loop.shuffle_buffer": 32,
        "optim.schedule.base_lr": 3e-3, "optim.schedule.final_lr": 3e-4,
        "optim.schedule.hold_epochs": 3, "optim.schedule.decay_end_epoch": 4, **sets}.items()]
    return load_config(DiTRunConfig(), sets=items)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(str(tmp_path_factory.mktemp("store") / "latents"))


def test_defaults_are_the_papers_dit_run():
    config = DiTRunConfig()
    assert (config.model, config.ema_decay, config.loop.global_batch_size) == ("ditdh-xl", 0.9995, 1024)
    schedule = config.optim.schedule
    assert (schedule(0), schedule(40), schedule(800)) == (2e-4, 2e-4, 2e-5)
    assert config.optim.grad_clip == 1.0 and config.optim.betas == (0.9, 0.95)


def test_a_store_of_an_older_format_is_refused_before_launch(tmp_path):
    url = make_store(str(tmp_path / "old-store"))
    manifest = json.loads((tmp_path / "old-store" / "manifest.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "old-store" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format version 1; this version of rae reads version 2 .*`rae encode`"):
        train_dit(tiny_config(url), run_name="refused", storage=str(tmp_path / "runs"), num_workers=2)
    assert not (tmp_path / "runs").exists()  # nothing launched, no run directory


def test_store_facts_follow_the_manifest(store):
    manifest = latent_store.require_manifest(store)
    facts = store_facts(manifest, tiny_config(store), store)
    spec = facts.latent_spec
    assert (facts.rows, spec.grid, spec.channels, facts.num_classes) == (ROWS, 4, CHANNELS, CLASSES)
    assert spec.to_dict() == manifest["latent_spec"]


def test_dit_loss_decreases_and_export_loads(tmp_path, store, ray_cluster):
    storage = str(tmp_path / "runs")
    result = train_dit(tiny_config(store), run_name="dit-tiny", storage=storage, num_workers=2,
                       max_failures=0, cpus_per_worker=0.5)
    losses = result.metrics_dataframe["loss"].tolist()  # mean over each 8-step window
    assert result.metrics["step"] == 16 and result.metrics["skipped_steps"] == 0
    assert losses[-1] < 0.9 * losses[0], losses
    model, config = load_exported_model(export_url(storage, "dit-tiny"))
    assert config["step"] == 16 and config["kwargs"]["num_classes"] == CLASSES
    assert config["latent_spec"] == latent_store.require_manifest(store)["latent_spec"]  # verbatim
    assert (Path(export_url(storage, "dit-tiny")) / STATS_FILE).read_bytes() == (Path(store) / STATS_FILE).read_bytes()
    x = torch.randn(2, TOKENS, CHANNELS)
    velocity = model(x, torch.tensor([0.5, 0.9]), torch.tensor([0, 1]))
    assert velocity.shape == x.shape and torch.isfinite(velocity).all()
    untrained = flow_matching_loss(build_dit(config["preset"], **config["kwargs"]), store)
    exported = flow_matching_loss(model, store)
    assert exported < 0.9 * untrained, (exported, untrained)  # the export holds the trained EMA, not the init
    history = json.loads((Path(export_url(storage, "dit-tiny")) / "history.json").read_text())
    assert history[-1]["step"] == 16 and all(a["step"] < b["step"] for a, b in zip(history, history[1:]))
    assert all(math.isfinite(row["loss"]) for row in history) and "history" not in config
    print(f"DiT tiny: window-mean loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"whole-store loss of the export {exported:.4f}, untrained {untrained:.4f}")
