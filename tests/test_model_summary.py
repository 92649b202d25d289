"""count_parameters: what a model weighs, or what of it trains; buffers are neither."""
import pytest
import torch
from torch import nn

from rae.model_summary import count_parameters


def test_frozen_parameters_count_in_the_weight_not_in_what_trains() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 16 + 10 parameters
    model[0].requires_grad_(False)
    model.register_buffer("positions", torch.zeros(5, 5))
    assert count_parameters(model, trainable_only=False) == 26
    assert count_parameters(model, trainable_only=True) == 10


def test_what_is_counted_must_be_said() -> None:
    with pytest.raises(TypeError):
        count_parameters(nn.Linear(2, 2))
