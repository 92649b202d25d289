"""Recovery and storage of a real run (the tiny DiT^DH, the cheaper of the two), on a 2-worker local
Ray cluster: a corrupted latest checkpoint is reported and the relaunch falls back to the one
before it; wandb (offline) writes one run, on rank 0, whose id is the run name; and a whole run
with the latent store and the checkpoints on s3:// (a loopback moto server) through s3fs."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from builders import CHANNELS, TOKENS, class_latent_store, tiny_dit_config

from jobs.train.export import export_url, load_exported_model
from jobs.train.dit import train_dit

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 4  # 64 rows / global batch 16


@pytest.fixture(scope="module")
def ray_env(s3) -> dict[str, str]:
    """The S3 server starts before Ray, so the workers inherit its endpoint; wandb writes offline
    (where: the run's folder, not set here)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _run(store: str, storage: str, run: str, epochs: int, **sets):
    config = tiny_dit_config(store, **{"loop.epochs": epochs, "loop.checkpoint_every_steps": STEPS_PER_EPOCH,
                                   "loop.keep_checkpoints": 5, **sets})
    result = train_dit(config, run_name=run, storage=storage, num_workers=2, max_failures=0, cpus_per_worker=0.5)
    assert result.error is None, result.error
    return result


def _worker_logs() -> str:
    """Everything the Ray workers of this session wrote to their log files."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return "\n".join(p.read_text(errors="replace") for p in (session / "logs").rglob("*")
                     if p.is_file() and p.suffix in (".err", ".out", ".log"))


def test_corrupted_latest_checkpoint_is_reported_and_the_relaunch_falls_back(tmp_path, class_store, ray_cluster):
    storage = str(tmp_path / "runs")
    first = _run(class_store, storage, "dit-recover", epochs=2)
    assert first.metrics["step"] == 2 * STEPS_PER_EPOCH
    latest = Path(storage) / "dit-recover" / "checkpoint_step000000008"
    shard = sorted(latest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a save cut short

    second = _run(class_store, storage, "dit-recover", epochs=3)
    assert second.metrics["resumed_from_step"] == STEPS_PER_EPOCH  # the step-4 checkpoint, not step 8
    assert second.metrics["step"] == 3 * STEPS_PER_EPOCH
    message = f"checkpoint_step000000008: file {shard.name} is"
    assert message in _worker_logs() and "falling back to the previous checkpoint" in _worker_logs()


def test_wandb_offline_run_is_written_once_in_the_runs_folder_with_the_run_name_as_id(tmp_path, class_store,
                                                                                      ray_cluster, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    _run(class_store, str(tmp_path / "runs"), "dit-wandb", epochs=1, **{"loop.wandb.project": "rae-test"})
    runs = sorted((tmp_path / "runs" / "dit-wandb" / "wandb").glob("offline-run-*"))  # not in Ray's session folder
    assert len(runs) == 1 and runs[0].name.endswith("-dit-wandb")  # one run (rank 0 only), id = run name
    assert (runs[0] / "run-dit-wandb.wandb").is_file()


def test_dit_run_with_store_and_checkpoints_on_s3(s3, ray_cluster):
    import s3fs

    store = class_latent_store("s3://rae-test/store")
    storage = "s3://rae-test/runs"
    result = _run(store, storage, "dit-s3", epochs=1)
    assert result.metrics["step"] == STEPS_PER_EPOCH
    assert str(result.checkpoint.path).endswith("dit-s3/checkpoint_step000000004")
    files = s3fs.S3FileSystem().ls("rae-test/runs/dit-s3/checkpoint_step000000004")
    assert any(f.endswith(".distcp") for f in files) and any(f.endswith("trainer_state.json") for f in files)
    model, config = load_exported_model(export_url(storage, "dit-s3"))
    assert config["store"] == store and config["step"] == STEPS_PER_EPOCH
    x = torch.randn(2, TOKENS, CHANNELS)
    assert torch.isfinite(model(x, torch.tensor([0.3, 0.7]), torch.tensor([0, 1]))).all()
