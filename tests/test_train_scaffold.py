"""The shared trainer scaffold on a 2-worker local Ray cluster (gloo, FSDP2 on CPU), with a tiny
stand-in model: resume after a worker failure is exact, relaunch by run name resumes (also on a
different worker count), corrupted checkpoints fall back, and the export round-trips."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from jobs.train.checkpointing import CheckpointError, ModelState, save_checkpoint, verify_checkpoint
from jobs.train.launch import launch, parse_num_workers, storage_location
from jobs.train.lr_schedule import LRSchedule
from jobs.train.checkpointing import restore_latest
from jobs.config_overrides import load_config
from jobs.train.parallelize import plan_batches
from jobs.train.optimizer_step import accumulate_gradients, apply_update
from jobs.train.loop import (
    LoopConfig,
    OptimConfig,
    SingleModelTask,
    exact_batches,
    fit,
    ray_shard_batches,
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

ROWS = 64


class TinyRegression(SingleModelTask):
    """A 2-layer MLP with dropout (so every step consumes RNG) on y = W x."""

    def __init__(self, fail_at: int | None = None, marker: str | None = None) -> None:
        super().__init__(OptimConfig(schedule=LRSchedule(base_lr=3e-2, final_lr=3e-3, hold_epochs=1,
                                                         decay_end_epoch=4)), ema_decay=0.5)
        self.fail_at, self.marker = fail_at, marker

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 2))

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return [model[0], model[3]]

    def per_sample_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)

    def export_config(self) -> dict:
        return {"kind": "tiny", "builder": "rae.none:none", "preset": "tiny", "kwargs": {}}

    def train_step(self, micro_batches, step, lr):
        if step == self.fail_at and ray.train.get_context().get_world_rank() == 0:
            if not Path(self.marker).exists():
                Path(self.marker).write_text("failed once")
                raise RuntimeError(f"injected failure at step {step}")
        return super().train_step(micro_batches, step, lr)


def _train_fn(config: dict) -> None:
    loop = LoopConfig(**config["loop"])
    rank = ray.train.get_context().get_world_rank()
    task = TinyRegression(config.get("fail_at"), config.get("marker"))
    export_dir = config.get("export_dir")

    def export(weights, cfg):
        torch.save(weights, Path(export_dir) / "ema.pt")

    fit(task, loop, run_name=config["run"], rows=ROWS,
        batches=ray_shard_batches("train", ["x", "y"], loop.shuffle_buffer, loop.seed, rank),
        export=export if export_dir else None)


def _dataset():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 2)).astype(np.float32)
    xs = rng.normal(size=(ROWS, 4)).astype(np.float32)
    return ray.data.from_items([{"x": x, "y": x @ weight} for x in xs])


def _run(tmp_path: Path, run: str, *, epochs: int, workers=2, fail_at=None, max_micro=4, **loop):
    config = {"run": run, "fail_at": fail_at, "marker": str(tmp_path / f"{run}.failed"),
              "loop": dict(dict(epochs=epochs, global_batch_size=16, max_micro_batch=max_micro,
                                checkpoint_every_steps=2, keep_checkpoints=3, log_every_steps=4,
                                shuffle_buffer=16), **loop)}
    return launch(_train_fn, config, run_name=run, storage=str(tmp_path / "runs"), num_workers=workers,
                  datasets={"train": _dataset()}, max_failures=1, cpus_per_worker=0.5)


def _final_weights(result) -> dict[str, torch.Tensor]:
    model = TinyRegression().build_model()
    with result.checkpoint.as_directory() as local:
        dcp.load({"model": ModelState(model)}, checkpoint_id=local)
    return model.state_dict()


@pytest.mark.slow
def test_resume_after_worker_failure_matches_uninterrupted_run(tmp_path, ray_cluster):
    plain = _run(tmp_path, "plain", epochs=2)
    failed = _run(tmp_path, "failed", epochs=2, fail_at=5)
    assert (tmp_path / "failed.failed").exists()  # the failure really happened
    assert failed.metrics["resumed_from_step"] == 4  # restored from the step-4 checkpoint
    assert plain.metrics["step"] == failed.metrics["step"] == 8
    a, b = _final_weights(plain), _final_weights(failed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    first_loss, last_loss = plain.metrics_dataframe["loss"].iloc[[0, -1]]
    assert last_loss < 0.5 * first_loss


@pytest.mark.slow
def test_relaunch_by_name_resumes_on_another_worker_count(tmp_path, ray_cluster):
    first = _run(tmp_path, "again", epochs=1)
    assert first.metrics["step"] == 4 and first.metrics["resumed_from_step"] == -1
    second = _run(tmp_path, "again", epochs=2, workers=1)
    assert second.metrics["resumed_from_step"] == 4
    assert second.metrics["step"] == 8


# ---------------------------------------------------------------- without Ray

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    loss = lambda model: (lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(1))  # noqa: E731
    big, small = _mlp(), _mlp()
    accumulate_gradients(big, [{"x": x, "y": y}], loss(big))
    chunks = [{"x": x[i:i + 4], "y": y[i:i + 4]} for i in (0, 4, 8)]
    local = accumulate_gradients(small, chunks, loss(small))
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(local.loss, loss(big)({"x": x, "y": y}).mean().detach())


def test_non_finite_loss_skips_the_step_and_keeps_the_weights():
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    nan_input = {"x": torch.full((2, 4), float("nan")), "y": torch.zeros(2, 2)}
    local = accumulate_gradients(model, [nan_input], lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(1))
    outcome = apply_update(model, optimizer, local.loss, lr=0.1, grad_clip=1.0)
    assert outcome.skipped and math.isnan(outcome.loss)
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_gradient_clipping_bounds_the_update_norm():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    batch = {"x": 100 * torch.randn(4, 4), "y": torch.zeros(4, 2)}
    local = accumulate_gradients(model, [batch], lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(1))
    outcome = apply_update(model, optimizer, local.loss, lr=1.0, grad_clip=1.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert outcome.grad_norm > 10 and not outcome.skipped
    assert math.isclose(float((after - before).norm()), 1.0, rel_tol=1e-4)


@pytest.mark.parametrize("world, micro, accum", [(1, 64, 4), (2, 64, 2), (4, 64, 1), (8, 32, 1), (3, None, None)])
def test_global_batch_is_kept_whatever_the_worker_count(world, micro, accum):
    if micro is None:
        with pytest.raises(ValueError, match="not divisible by 3 workers"):
            plan_batches(256, world, 64)
        return
    plan = plan_batches(256, world, 64)
    assert (plan.micro, plan.accum_steps) == (micro, accum)
    assert plan.micro * plan.accum_steps * world == 256


def test_exact_batches_rechunks_short_batches():
    stream = iter([{"v": torch.arange(0, 3)}, {"v": torch.arange(3, 8)}, {"v": torch.arange(8, 11)}])
    out = [b["v"].tolist() for b in exact_batches(stream, 4)]
    assert out == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the short tail (8, 9, 10) is dropped


def _saved(tmp_path: Path, step: int, value: float) -> Path:
    model = nn.Linear(3, 1)
    nn.init.constant_(model.weight, value)
    directory = tmp_path / f"ckpt{step}"
    save_checkpoint(directory, {"model": ModelState(model)}, {"step": step}, rank=0, world_size=1)
    return directory


def test_truncated_checkpoint_is_named_in_a_clear_error(tmp_path):
    directory = _saved(tmp_path, 2, 1.0)
    shard = next(directory.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"file {shard.name} is \d+ bytes, expected \d+"):
        verify_checkpoint(directory)
    (directory / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        verify_checkpoint(directory)


def test_restore_falls_back_to_the_previous_checkpoint_when_the_latest_is_corrupted(tmp_path):
    older, newer = _saved(tmp_path, 2, 1.0), _saved(tmp_path, 4, 2.0)
    shard = next(newer.glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, wrong bytes
    model = nn.Linear(3, 1)
    restored = restore_latest([newer, older], {"model": ModelState(model)},
                              lambda path: __import__("contextlib").nullcontext(path))
    assert restored["step"] == 2 and restored["restored_from"] == str(older)
    assert torch.all(model.weight == 1.0)


def test_config_overrides_are_typed_and_name_bad_keys():
    config = load_config(LoopConfig(), sets=["epochs=80", "seed=3", "wandb.project=rae"])
    assert (config.epochs, config.seed, config.wandb.project) == (80, 3, "rae")
    with pytest.raises(ValueError, match="no field 'epoch'"):
        load_config(LoopConfig(), sets=["epoch=80"])
    with pytest.raises(ValueError, match="config epochs: expected int"):
        load_config(LoopConfig(), sets=["epochs=many"])


def test_storage_urls_and_worker_counts():
    assert parse_num_workers("4") == 4 and parse_num_workers("2,8") == (2, 8)
    with pytest.raises(ValueError, match="--num-workers '8,2'"):
        parse_num_workers("8,2")
    path, filesystem = storage_location("memory://bucket/runs")
    assert path == "/bucket/runs" and filesystem is not None
    path, filesystem = storage_location("s3://bucket/runs")  # through s3fs, like every other artifact
    assert path == "bucket/runs" and filesystem.type_name == "py::fsspec+('s3', 's3a')"
