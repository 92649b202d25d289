"""`rae train dit` on a tiny latent store (written in the store format, 2 Ray workers, gloo, FSDP2
on CPU): the loss falls, the EMA export loads into a working model, and a store made with another
the DiT takes its latent space from the store's LatentSpec, which its export copies verbatim."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import CHANNELS, CLASSES, ROWS, TOKENS, class_latent_store, tiny_dit_config

from jobs.cli.app import main as cli_main
from jobs.train.export import export_url, load_exported_model
from jobs.train.dit import DiTRunConfig, store_facts, train_dit
from pipelines import latent_store
from pipelines.store_reader import open_store, read_latents
from rae.dit import build_dit
from rae.transport import training_loss
from rae.latent_spec import STATS_FILE

pytestmark = pytest.mark.slow

def flow_matching_loss(model: torch.nn.Module, store: str) -> float:
    """The training objective over the whole store, at fixed noise and times (the same for every model)."""
    data = read_latents(store)
    x = open_store(store).stats.normalize(torch.from_numpy(data["latent"].astype(np.float32)))
    with torch.no_grad():
        losses = training_loss(model.eval(), x, torch.from_numpy(data["label"]).long(),
                               generator=torch.Generator().manual_seed(0))
    return losses.mean().item()


def test_defaults_are_the_papers_dit_run():
    config = DiTRunConfig()
    assert (config.model, config.ema_decay, config.loop.global_batch_size) == ("ditdh-xl", 0.9995, 1024)
    schedule = config.optim.schedule
    assert (schedule(0), schedule(40), schedule(800)) == (2e-4, 2e-4, 2e-5)
    assert config.optim.grad_clip == 1.0 and config.optim.betas == (0.9, 0.95)


def test_a_store_of_an_older_format_is_refused_before_launch(tmp_path):
    url = class_latent_store(str(tmp_path / "old-store"))
    manifest = json.loads((tmp_path / "old-store" / "manifest.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "old-store" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format version 1; this version of rae reads versions 2, 3 .*`rae encode`"):
        train_dit(tiny_dit_config(url), run_name="refused", storage=str(tmp_path / "runs"), num_workers=2)
    assert not (tmp_path / "runs").exists()  # nothing launched, no run directory


def test_store_facts_follow_the_manifest(class_store):
    manifest = latent_store.require_manifest(class_store)
    facts = store_facts(manifest, tiny_dit_config(class_store), class_store)
    spec = facts.latent_spec
    assert (facts.rows, spec.grid, spec.channels, facts.num_classes) == (ROWS, 4, CHANNELS, CLASSES)
    assert spec.to_dict() == manifest["latent_spec"]


def test_dit_loss_decreases_and_export_loads(tmp_path, class_store, ray_cluster):
    storage = str(tmp_path / "runs")
    result = train_dit(tiny_dit_config(class_store), run_name="dit-tiny", storage=storage, num_workers=2,
                       max_failures=0, cpus_per_worker=0.5)
    losses = result.metrics_dataframe["loss"].tolist()  # mean over each 8-step window
    assert result.metrics["step"] == 16 and result.metrics["skipped_steps"] == 0
    assert losses[-1] < 0.9 * losses[0], losses
    model, config = load_exported_model(export_url(storage, "dit-tiny"))
    assert config["step"] == 16 and config["kwargs"]["num_classes"] == CLASSES
    assert config["latent_spec"] == latent_store.require_manifest(class_store)["latent_spec"]  # verbatim
    assert (Path(export_url(storage, "dit-tiny")) / STATS_FILE).read_bytes() == (Path(class_store) / STATS_FILE).read_bytes()
    x = torch.randn(2, TOKENS, CHANNELS)
    velocity = model(x, torch.tensor([0.5, 0.9]), torch.tensor([0, 1]))
    assert velocity.shape == x.shape and torch.isfinite(velocity).all()
    untrained = flow_matching_loss(build_dit(config["preset"], **config["kwargs"]), class_store)
    exported = flow_matching_loss(model, class_store)
    assert exported < 0.9 * untrained, (exported, untrained)  # the export holds the trained EMA, not the init
    history = json.loads((Path(export_url(storage, "dit-tiny")) / "history.json").read_text())
    assert history[-1]["step"] == 16 and all(a["step"] < b["step"] for a, b in zip(history, history[1:]))
    assert all(math.isfinite(row["loss"]) for row in history) and "history" not in config
    print(f"DiT tiny: window-mean loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"whole-store loss of the export {exported:.4f}, untrained {untrained:.4f}")


def test_the_cli_trains_on_a_relative_store_and_ends_with_where_the_export_is(tmp_path, class_store, ray_cluster,
                                                                               monkeypatch, capsys):
    """Paths are relative to where the command runs, not to Ray's session folder the workers run in
    (the export reads the store's statistics there)."""
    monkeypatch.chdir(tmp_path)
    tiny = json.loads(json.dumps(dataclasses.asdict(tiny_dit_config(class_store))))  # tuples as lists
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))  # YAML is a superset of JSON
    store = os.path.relpath(class_store, tmp_path)
    code = cli_main(["train", "dit", "--run", "dit-cli", "--storage", "runs", "--store", store, "--config", "tiny.json",
                     "--epochs", "1", "--num-workers", "1", "--max-failures", "0"])
    out, err = capsys.readouterr()
    export = tmp_path / "runs" / "dit-cli" / "export"
    assert code == 0, err.splitlines()[-1:]  # the failure's one line
    assert [line for line in out.splitlines() if line.startswith("rae train dit:")] == [
        f"rae train dit: finished run dit-cli at step 4; export at {export}"]
    _, config = load_exported_model(str(export))
    assert config["step"] == 4 and config["store"] == class_store
    assert (export / STATS_FILE).read_bytes() == (Path(class_store) / STATS_FILE).read_bytes()
