"""Recovery and storage of a real run (the tiny DiT^DH, the cheaper of the two), on a 2-worker local
Ray cluster: a corrupted latest checkpoint is reported, the relaunch falls back to the one before
it and retrains the lost steps as they were first trained, and a relaunch after that resumes again;
wandb (offline) writes one run, on rank 0, whose id is the run name; and a whole run with the
latent store and the checkpoints on s3:// (a loopback moto server) through s3fs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray
import torch
from builders import CHANNELS, TOKENS, class_latent_store, tiny_dit_config

from jobs.train.export import export_url, load_exported_model
from jobs.train.dit import train_dit

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 4  # 64 rows / global batch 16


# On a loaded machine (load average 15-45 on 2 cores) this cluster's processes can be starved for tens of
# seconds, and a run here has max_failures=0: so a starved node or worker is slow, not dead. Generous
# deadlines for the GCS's node health check, the start of Ray Train's worker group, and wandb's start of
# its service and of its run; and Ray's memory monitor, which kills the newest worker when the machine
# (all of its users) is short of memory, off for these few small workers.
LIVENESS_ON_A_LOADED_MACHINE = {
    "RAY_health_check_period_ms": "10000", "RAY_health_check_timeout_ms": "60000",
    "RAY_health_check_failure_threshold": "30", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
    "RAY_memory_monitor_refresh_ms": "0", "WANDB_INIT_TIMEOUT": "600", "WANDB__SERVICE_WAIT": "600",
}


@pytest.fixture(scope="module")
def ray_env(s3) -> dict[str, str]:
    """The S3 server starts before Ray, so the workers inherit its endpoint; wandb writes offline
    (where: the run's folder, not set here)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", **LIVENESS_ON_A_LOADED_MACHINE}


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


def _only(paths) -> Path:
    (path,) = paths
    return path


def _history(storage: str, run: str) -> list[dict]:
    """The logged metrics of the run's last export: [{step, loss, grad_norm, lr}, ...]."""
    return json.loads(Path(storage, run, "export", "history.json").read_text())


@pytest.mark.timeout(1800)  # three runs: ~1.5 min in all on an idle 2-core machine, ~15 min at load average 28
def test_a_run_that_fell_back_past_a_corrupted_checkpoint_finishes_and_resumes_again(tmp_path, class_store,
                                                                                      ray_cluster):
    storage = str(tmp_path / "runs")
    first = _run(class_store, storage, "dit-recover", epochs=2)
    assert first.metrics["step"] == 2 * STEPS_PER_EPOCH
    uninterrupted = _history(storage, "dit-recover")
    latest = _only(Path(storage, "dit-recover").glob("checkpoint_step000000008*"))
    shard = sorted(latest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a save cut short

    # Two checkpoints kept: Ray prunes the corrupted step-8 one once the run has taken step 8 again.
    second = _run(class_store, storage, "dit-recover", epochs=3, **{"loop.keep_checkpoints": 2})
    assert second.metrics["resumed_from_step"] == STEPS_PER_EPOCH  # the step-4 checkpoint, not step 8
    assert second.metrics["step"] == 3 * STEPS_PER_EPOCH
    message = f"{latest.name}: file {shard.name} is"
    assert message in _worker_logs() and "falling back to the previous checkpoint" in _worker_logs()
    assert not latest.exists() and _only(Path(storage, "dit-recover").glob("checkpoint_step000000008*")) != latest
    fell_back = _history(storage, "dit-recover")
    assert [row["step"] for row in fell_back] == [4, 8, 12]
    assert fell_back[:2] == [pytest.approx(row, rel=1e-5) for row in uninterrupted]  # steps 5-8 trained again alike

    third = _run(class_store, storage, "dit-recover", epochs=4)  # before: the run snapshot named a deleted folder
    assert third.metrics["resumed_from_step"] == 3 * STEPS_PER_EPOCH and third.metrics["step"] == 4 * STEPS_PER_EPOCH
    resumed = _history(storage, "dit-recover")
    assert [row["step"] for row in resumed] == [4, 8, 12, 16] and resumed[:3] == fell_back


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
    name = re.search(r"dit-s3/(checkpoint_step000000004-[0-9a-f]{8})$", str(result.checkpoint.path)).group(1)
    files = s3fs.S3FileSystem().ls(f"rae-test/runs/dit-s3/{name}")
    assert any(f.endswith(".distcp") for f in files) and any(f.endswith("trainer_state.json") for f in files)
    model, config = load_exported_model(export_url(storage, "dit-s3"))
    assert config["store"] == store and config["step"] == STEPS_PER_EPOCH
    x = torch.randn(2, TOKENS, CHANNELS)
    assert torch.isfinite(model(x, torch.tensor([0.3, 0.7]), torch.tensor([0, 1]))).all()
