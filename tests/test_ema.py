"""EMA of weights: the update rule on parameters and buffers, copying to and from a model."""
import pytest
import torch
from torch import nn

from rae.ema import EMA, ema_update_


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_is_decay_times_average_plus_one_minus_decay_times_value() -> None:
    average, value = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    ema_update_(average, value, 0.9)
    assert torch.allclose(average, torch.tensor([0.9 * 1.0 + 0.1 * 3.0, 0.9 * -2.0]))


def test_update_averages_parameters_and_float_buffers_and_copies_counters() -> None:
    model = _model()
    ema = EMA(model, decay=0.75)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves running stats and bumps num_batches_tracked
    ema.update(model)
    after = model.state_dict()
    for name in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(ema.shadow[name], 0.75 * before[name] + 0.25 * after[name]), name
    assert ema.shadow["1.num_batches_tracked"] == 1


def test_repeated_updates_towards_fixed_weights_decay_geometrically() -> None:
    model = _model()
    start = model[0].weight.detach().clone()
    ema = EMA(model)  # paper default decay 0.9995
    assert ema.decay == 0.9995
    with torch.no_grad():
        model[0].weight.zero_()
    for _ in range(100):
        ema.update(model)
    assert torch.allclose(ema.shadow["0.weight"], start * 0.9995**100, atol=1e-6)


def test_copy_to_and_copy_from_move_weights_between_model_and_average() -> None:
    model, other = _model(), _model()
    ema = EMA(model, decay=0.5)
    ema.copy_to(other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with torch.no_grad():
        other[0].weight.fill_(7.0)
    ema.copy_from(other)
    assert torch.equal(ema.shadow["0.weight"], torch.full((4, 3), 7.0))


def test_bf16_model_keeps_a_float32_average() -> None:
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.9995)
    assert ema.shadow["weight"].dtype == torch.float32
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    # A 5e-4 step would round away in bf16; in float32 it is kept.
    assert torch.allclose(ema.shadow["weight"] - start, torch.full((4, 4), 5e-4), rtol=0.02, atol=5e-6)


def test_state_dict_round_trip_and_mismatched_models_are_refused() -> None:
    model = _model()
    ema = EMA(model, decay=0.9)
    restored = EMA(_model(), decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9
    assert all(torch.equal(ema.shadow[k], restored.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(3, 4))
