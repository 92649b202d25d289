"""LR schedules: the reference values at the points a user would check."""
import math

import pytest

from jobs.train.lr_schedule import LRSchedule


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
