"""The training loop's parts, without Ray: the micro-batch accumulator, the checkpointer's cadence and
its save, the metrics logger's windows and history, and the per-step data stream on resume."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from fit_harness import FakeRayTrain, TinyTask, run_fit
from torch import nn

from jobs.train.checkpointing import Checkpointer, ModelState, restore_latest, save_checkpoint, verify_checkpoint
from jobs.train.metrics_logger import MetricsLogger
from jobs.train.optimizer_step import accumulate_gradients, read_logs
from jobs.train.parallelize import plan_batches
from jobs.train.loop import LoopConfig, RunContext, step_batches
from jobs.train.lr_schedule import LRSchedule


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def _scalar_loss_with_logs(model: nn.Module):
    def loss(batch):
        error = model(batch["x"]) - batch["y"]
        mse = (error ** 2).mean()
        return mse, {"mse": mse.detach(), "bias": error.detach().mean()}
    return loss


def test_accumulated_scalar_losses_give_the_big_batchs_gradients_and_mean_logs():
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    big, small = _mlp(), _mlp()
    whole = accumulate_gradients(big, [{"x": x, "y": y}], _scalar_loss_with_logs(big))
    chunks = [{"x": x[i:i + 3], "y": y[i:i + 3]} for i in (0, 3, 6, 9)]
    parts = accumulate_gradients(small, chunks, _scalar_loss_with_logs(small))
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.loss, whole.loss)
    assert set(parts.logs) == {"mse", "bias"}
    torch.testing.assert_close(parts.logs["mse"], whole.logs["mse"])
    torch.testing.assert_close(parts.logs["bias"], whole.logs["bias"])  # equal chunks: mean of means
    assert read_logs(parts.logs) == pytest.approx({"mse": whole.logs["mse"].item(), "bias": whole.logs["bias"].item()})


def test_accumulator_refuses_a_loss_that_is_neither_per_sample_nor_scalar():
    model = _mlp()
    with pytest.raises(ValueError, match=r"per-sample \(B,\) or a scalar, got shape \(3, 2\)"):
        accumulate_gradients(model, [{"x": torch.randn(3, 4)}], lambda b: model(b["x"]))


def test_accumulator_runs_each_forward_under_the_requested_autocast():
    model = _mlp()
    seen = set()
    model[0].register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    batch = {"x": torch.randn(3, 4), "y": torch.randn(3, 2)}
    accumulate_gradients(model, [batch], lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(1), dtype=torch.bfloat16)
    accumulate_gradients(model, [batch], lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(1))
    assert seen == {torch.bfloat16, torch.float32}
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def _checkpointer(every: int, total: int, state=dict) -> Checkpointer:
    return Checkpointer(state, every_steps=every, total_steps=total, rank=0, world_size=1)


def test_checkpoints_are_due_on_the_cadence_and_at_the_last_step():
    assert [s for s in range(1, 11) if _checkpointer(4, 10).due(s)] == [4, 8, 10]
    assert [s for s in range(1, 7) if _checkpointer(3, 6).due(s)] == [3, 6]
    with pytest.raises(ValueError, match="checkpoints every 0 steps"):
        _checkpointer(0, 10)


def test_a_saved_checkpoint_is_reported_with_its_metrics_and_restores(tmp_path, monkeypatch):
    import ray.train

    reported = []

    def report(metrics, checkpoint, checkpoint_dir_name):  # what Ray Train keeps: a copy of the directory
        shutil.copytree(checkpoint.path, tmp_path / checkpoint_dir_name)
        reported.append((metrics, tmp_path / checkpoint_dir_name))

    monkeypatch.setattr(ray.train, "report", report)
    model = nn.Linear(3, 1)
    nn.init.constant_(model.weight, 2.0)
    checkpointer = _checkpointer(2, 4, state=lambda: {"model": ModelState(model)})
    checkpointer.save(2, {"loss": 0.5, "step": 2}, {"skipped_steps": 1, "history": [{"step": 2, "loss": 0.5}]})
    (metrics, directory), = reported
    assert metrics == {"loss": 0.5, "step": 2} and re.fullmatch(r"checkpoint_step000000002-[0-9a-f]{8}", directory.name)
    assert verify_checkpoint(directory) == {"step": 2, "skipped_steps": 1, "history": [{"step": 2, "loss": 0.5}],
                                            "world_size": 1}
    nn.init.constant_(model.weight, 0.0)
    restored = restore_latest([directory], {"model": ModelState(model)}, contextlib.nullcontext)
    assert restored["step"] == 2 and torch.all(model.weight == 2.0)


def _logger(**kwargs) -> MetricsLogger:
    return MetricsLogger(**dict(dict(run_name="r", rank=0, total_steps=6, steps_per_epoch=3, global_batch=8,
                                     log_every_steps=4), **kwargs))


def test_log_lines_hold_means_since_the_last_line_and_reports_since_the_last_checkpoint(capsys):
    logger = _logger()
    for step, loss in enumerate([4.0, 2.0, 6.0, 0.0, 1.0, 3.0], start=1):
        logger.log(step, lr=0.1, metrics={"loss": loss, "skipped": 0.0})
        if step == 3:
            assert logger.report(step, lr=0.1) == {"loss": 4.0, "step": 3, "epoch": 1.0, "lr": 0.1,
                                                   "skipped_steps": 0, "resumed_from_step": -1}
    assert logger.history == [{"loss": 3.0, "step": 4, "lr": 0.1}, {"loss": 2.0, "step": 6, "lr": 0.1}]
    assert logger.report(6, lr=0.1)["loss"] == pytest.approx(4 / 3)  # steps 4-6
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[r] step 4/6 epoch 1.33 loss=3 lr=0.1 ")


def test_skipped_steps_are_counted_announced_and_kept_out_of_the_means(capsys):
    logger = _logger(log_every_steps=2)
    logger.log(1, lr=0.1, metrics={"loss": float("nan"), "grad_norm": 1.0, "skipped": 1.0})
    logger.log(2, lr=0.1, metrics={"loss": 2.0, "grad_norm": 3.0, "skipped": 0.0})
    assert logger.history == [{"loss": 2.0, "grad_norm": 2.0, "step": 2, "lr": 0.1}]
    assert logger.trainer_state() == {"skipped_steps": 1, "history": logger.history}
    assert "[r] step 1: non-finite loss or gradient (loss=nan); step skipped (1 so far)" in capsys.readouterr().out


def test_a_resumed_logger_continues_the_history_and_the_skipped_count_and_only_rank_0_prints(capsys):
    state = {"step": 4, "skipped_steps": 2, "history": [{"loss": 3.0, "step": 4, "lr": 0.1}]}
    logger = _logger(rank=1, start_step=4, trainer_state=state)
    logger.log(5, lr=0.1, metrics={"loss": 1.0, "skipped": 0.0})
    logger.log(6, lr=0.1, metrics={"loss": 3.0, "skipped": 0.0})
    assert [row["step"] for row in logger.history] == [4, 6]
    assert logger.report(6, lr=0.1)["resumed_from_step"] == 4 and logger.skipped_steps == 2
    assert capsys.readouterr().out == ""


def test_a_resumed_run_skips_the_micro_batches_its_steps_already_trained_on():
    ctx = RunContext(rank=0, world=1, device=torch.device("cpu"), plan=plan_batches(4, 1, 2), steps_per_epoch=3)

    def batches(epoch: int, micro: int):
        for index in range(8):  # more than an epoch's worth, as a shard with a remainder has
            yield {"id": torch.tensor([100 * epoch + index])}

    def ids(start: int) -> list[list[int]]:
        return [[int(b["id"]) for b in step] for step in step_batches(batches, ctx, start, total_steps=5)]

    assert ids(0) == [[0, 1], [2, 3], [4, 5], [100, 101], [102, 103]]
    assert ids(2) == [[4, 5], [100, 101], [102, 103]]
    assert ids(4) == [[102, 103]]


def test_data_running_out_names_the_epoch_and_step():
    ctx = RunContext(rank=0, world=1, device=torch.device("cpu"), plan=plan_batches(4, 1, 2), steps_per_epoch=3)
    short = lambda epoch, micro: iter([{"id": torch.tensor([i])} for i in range(3)])  # noqa: E731
    with pytest.raises(RuntimeError, match="data ran out in epoch 0 at step 1"):
        list(step_batches(short, ctx, 0, total_steps=3))



def test_a_checkpoint_whose_files_pass_their_checksums_but_that_dcp_rejects_falls_back(tmp_path, caplog):
    good, bad = tmp_path / "checkpoint_step000000002", tmp_path / "checkpoint_step000000004"
    saved = nn.Linear(3, 1)
    nn.init.constant_(saved.weight, 2.0)
    save_checkpoint(good, {"model": ModelState(saved)}, {"step": 2}, rank=0, world_size=1)
    other_structure = nn.Linear(3, 2)  # intact files, checksums written: only DCP's load can tell
    save_checkpoint(bad, {"model": ModelState(other_structure)}, {"step": 4}, rank=0, world_size=1)
    assert verify_checkpoint(bad)["step"] == 4

    model = nn.Linear(3, 1)
    with caplog.at_level(logging.ERROR, logger="jobs.train.checkpointing"):
        restored = restore_latest([bad, good], {"model": ModelState(model)}, contextlib.nullcontext)
    assert restored["step"] == 2 and restored["restored_from"] == str(good) and torch.all(model.weight == 2.0)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "jobs.train.checkpointing"]
    assert message.startswith(f"checkpoint {bad}: DCP could not load it: rank 0: ValueError: Size mismatch") and "model.model.weight" in message
    assert "falling back to the previous checkpoint" in message and "\n" not in message


def test_a_run_resumed_mid_epoch_with_accumulation_ends_with_the_uninterrupted_runs_weights_and_ema(
        tmp_path, monkeypatch):
    # 3 steps per epoch of 2 micro-batches each; checkpoints after steps 2 and 4 are both mid-epoch
    loop = LoopConfig(epochs=2, global_batch_size=4, max_micro_batch=2, checkpoint_every_steps=2, log_every_steps=100)
    schedule = LRSchedule(base_lr=3e-2, final_lr=3e-3, hold_epochs=1, decay_end_epoch=2)

    FakeRayTrain(tmp_path / "whole").install(monkeypatch)
    whole = TinyTask(schedule)
    whole_ema = run_fit(whole, loop)

    interrupted = FakeRayTrain(tmp_path / "interrupted")
    interrupted.install(monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        run_fit(TinyTask(schedule, fail_at=5), loop)
    assert [r.metrics["step"] for r in interrupted.reported] == [2, 4]
    resumed = TinyTask(schedule)
    resumed_ema = run_fit(resumed, loop)  # relaunch: epoch 1, 1 step (= 2 micro-batches) in
    assert interrupted.reported[-1].metrics["resumed_from_step"] == 4 and sorted(resumed.lrs) == [4, 5]

    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    assert whole_ema.keys() == resumed_ema.keys()
    for name, value in whole_ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(whole_ema["3.weight"], whole.model.state_dict()["3.weight"])  # the EMA lags


def test_a_run_that_fell_back_past_a_corrupt_checkpoint_saves_under_new_names_and_resumes_again(
        tmp_path, monkeypatch):
    loop = LoopConfig(epochs=2, global_batch_size=4, max_micro_batch=4, checkpoint_every_steps=3, log_every_steps=100)
    schedule = LRSchedule(base_lr=3e-2, final_lr=3e-3, hold_epochs=1, decay_end_epoch=3)
    ray_train = FakeRayTrain(tmp_path)  # keeps every reported name, as Ray's run snapshot does
    ray_train.install(monkeypatch)
    run_fit(TinyTask(schedule), loop)
    stale = ray_train.reported[-1].checkpoint.path
    shard = next(Path(stale).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])  # a save cut short

    longer = dataclasses.replace(loop, epochs=3)
    run_fit(TinyTask(schedule), longer)  # falls back to step 3, takes step 6 again, then 9
    assert [r.metrics["step"] for r in ray_train.reported] == [3, 6, 6, 9]
    assert ray_train.reported[-1].metrics["resumed_from_step"] == 3
    names = [Path(r.checkpoint.path).name for r in ray_train.reported]
    assert len(set(names)) == 4 and names == sorted(names, key=lambda name: name[:24])  # sortable by step

    resumed = TinyTask(schedule)
    run_fit(resumed, dataclasses.replace(loop, epochs=4))  # relaunch: the newest step-9 checkpoint
    assert ray_train.reported[-1].metrics["resumed_from_step"] == 9 and sorted(resumed.lrs) == [9, 10, 11]


def test_restore_takes_the_newest_attempt_of_a_step_saved_twice(tmp_path, monkeypatch):
    FakeRayTrain(tmp_path).install(monkeypatch)
    model = nn.Linear(3, 1)
    for weight in (1.0, 2.0):  # two attempts (a fallback, then the same step again), each its own Checkpointer
        nn.init.constant_(model.weight, weight)
        _checkpointer(2, 4, state=lambda: {"model": ModelState(model)}).save(2, {"step": 2}, {})
    nn.init.constant_(model.weight, 0.0)
    restored = _checkpointer(2, 4, state=lambda: {"model": ModelState(model)}).restore()
    assert restored["step"] == 2 and torch.all(model.weight == 2.0)


@pytest.mark.parametrize("configured", [0, 2])
def test_a_cpu_run_sets_torchs_threads_only_when_configured_and_says_how_many(configured, tmp_path, monkeypatch,
                                                                             capsys):
    """Ray starts a worker holding under 2 CPUs with one thread; loop.cpu_threads sets another count
    (the demo's one decoder worker takes the machine's cores), 0 keeps what the worker has."""
    loop = LoopConfig(epochs=1, global_batch_size=4, max_micro_batch=4, log_every_steps=100, cpu_threads=configured)
    FakeRayTrain(tmp_path).install(monkeypatch)
    before = torch.get_num_threads()
    try:
        run_fit(TinyTask(LRSchedule(base_lr=1e-2, final_lr=1e-3, hold_epochs=1, decay_end_epoch=1)), loop)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads == (configured or before)
    start_line = next(line for line in capsys.readouterr().out.splitlines() if "fresh start" in line)
    assert f"fresh start on cpu with {threads} torch thread{'s' * (threads > 1)};" in start_line
