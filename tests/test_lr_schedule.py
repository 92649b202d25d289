"""LR schedules: the reference values at the points a user would check, and the DiT^DH schedule step
by step against the official code's, both as a function and as the training loop applies it."""
import dataclasses
import math
from pathlib import Path

import pytest
from fit_harness import ROWS, FakeRayTrain, TinyTask, run_fit

from jobs.config_overrides import load_config
from jobs.train.dit import DiTRunConfig
from jobs.train.loop import LoopConfig
from jobs.train.lr_schedule import LRSchedule

DITDH_XL = Path(__file__).parents[1] / "jobs" / "configs" / "ditdh-xl.yaml"
IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 1024  # ImageNet-1k train at the paper's global batch


def official_linear_lr(step: int, steps_per_epoch: int, base_lr: float, final_lr: float, warmup_epochs: float,
                       decay_end_epoch: float) -> float:
    """The LR of the official run's optimizer step ``step`` (0-based): bytetriper/RAE
    src/utils/optim_utils.py ``build_scheduler``, type ``linear`` with ``warmup_from_zero: false``, a
    ``LambdaLR`` whose factor starts at ``lr_lambda(0)`` and moves on by one after every optimizer step."""
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    decay_end_steps = max(int(decay_end_epoch * steps_per_epoch), warmup_steps)
    total_decay_steps = max(decay_end_steps - warmup_steps, 1)
    final_ratio = final_lr / base_lr
    if step < warmup_steps:
        factor = 1.0
    elif step >= decay_end_steps:
        factor = final_ratio
    else:
        factor = 1.0 - (1.0 - final_ratio) * (step - warmup_steps) / total_decay_steps
    return base_lr * factor


def test_dit_schedule_holds_then_decays_linearly_to_final():
    schedule = LRSchedule()  # paper: 2e-4 for 40 epochs, linear to 2e-5 at epoch 800
    assert schedule(0) == schedule(40) == 2e-4
    assert math.isclose(schedule(420), (2e-4 + 2e-5) / 2, rel_tol=1e-12)
    assert schedule(800) == schedule(1000) == 2e-5


def test_decoder_schedule_warms_up_then_follows_a_cosine():
    schedule = LRSchedule(kind="warmup_cosine", base_lr=2e-4, final_lr=2e-5, warmup_epochs=1,
                          decay_end_epoch=16)
    assert schedule(0) == 0.0 and math.isclose(schedule(0.5), 1e-4)
    assert math.isclose(schedule(1), 2e-4) and math.isclose(schedule(8.5), 1.1e-4)
    assert math.isclose(schedule(16), 2e-5) and schedule(20) == 2e-5


@pytest.mark.parametrize("kwargs", [dict(kind="step"), dict(base_lr=0), dict(hold_epochs=50, decay_end_epoch=40)])
def test_bad_schedules_are_refused(kwargs):
    with pytest.raises(ValueError, match="LRSchedule"):
        LRSchedule(**kwargs)


def test_with_epochs_moves_the_horizon_and_keeps_the_hold_unless_it_outlasts_the_run():
    dit = LRSchedule()  # hold 40, decay to epoch 800
    shorter = dit.with_epochs(80)
    assert (shorter.decay_end_epoch, shorter.hold_epochs, shorter.base_lr, shorter.final_lr) == (80, 40, 2e-4, 2e-5)
    assert shorter(80) == 2e-5 and math.isclose(shorter(60), (2e-4 + 2e-5) / 2, rel_tol=1e-12)
    assert dit.with_epochs(20).hold_epochs == 20  # a hold longer than the run ends with it
    decoder = LRSchedule(kind="warmup_cosine", warmup_epochs=1, decay_end_epoch=16).with_epochs(32)
    assert (decoder.kind, decoder.warmup_epochs, decoder.decay_end_epoch) == ("warmup_cosine", 1, 32)
    assert LRSchedule(kind="warmup_cosine", warmup_epochs=4, decay_end_epoch=16).with_epochs(2).warmup_epochs == 2


def _official_dit(schedule: LRSchedule, step: int, steps_per_epoch: int) -> float:
    return official_linear_lr(step, steps_per_epoch, schedule.base_lr, schedule.final_lr, schedule.hold_epochs,
                              schedule.decay_end_epoch)


def test_the_ditdh_xl_schedule_gives_the_official_lr_at_every_step_that_matters():
    schedule = load_config(DiTRunConfig(), str(DITDH_XL)).optim.schedule
    assert (schedule.kind, schedule.base_lr, schedule.final_lr, schedule.hold_epochs, schedule.decay_end_epoch) == (
        "constant_linear", 2e-4, 2e-5, 40, 800)
    per_epoch = IMAGENET_STEPS_PER_EPOCH
    hold, end = 40 * per_epoch, 800 * per_epoch
    for step in (0, 1, hold - 1, hold, hold + 1, hold + 777, (hold + end) // 2, end - 1, end, end + 1, 1400 * per_epoch):
        ours = schedule(step / per_epoch)  # what the loop asks for: fractional epochs before the step
        assert math.isclose(ours, _official_dit(schedule, step, per_epoch), rel_tol=1e-12, abs_tol=0), step


def test_the_training_loop_gives_each_step_the_official_lr(tmp_path, monkeypatch):
    """Read one step late (or early), the LR differs from the official one on every step of the decay."""
    paper = load_config(DiTRunConfig(), str(DITDH_XL)).optim.schedule
    schedule = dataclasses.replace(paper, hold_epochs=2, decay_end_epoch=5)  # the paper's LRs, a short run
    loop = LoopConfig(epochs=6, global_batch_size=4, max_micro_batch=4, checkpoint_every_steps=100, log_every_steps=100)
    per_epoch = ROWS // loop.global_batch_size
    FakeRayTrain(tmp_path).install(monkeypatch)
    task = TinyTask(schedule)
    run_fit(task, loop)
    assert sorted(task.lrs) == list(range(6 * per_epoch))
    for step, lr in task.lrs.items():
        assert math.isclose(lr, _official_dit(schedule, step, per_epoch), rel_tol=1e-12, abs_tol=0), step
