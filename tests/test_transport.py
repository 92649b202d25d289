"""Flow-matching transport: the dimension shift, the interpolant, time sampling, the loss."""
import math

import pytest
import torch

from rae.transport import (
    TransportConfig,
    interpolate,
    sample_timesteps,
    shift_alpha,
    shift_timesteps,
    training_loss,
    velocity_target,
)

PAPER_LATENT_DIM = 16 * 16 * 768  # 196,608


def test_shift_alpha_for_the_dinov2_b_latent_is_6_928() -> None:
    assert shift_alpha(PAPER_LATENT_DIM) == pytest.approx(6.9282, abs=1e-4)
    assert shift_alpha(4096) == 1.0


def test_shift_known_values() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    alpha = math.sqrt(48.0)
    expected = torch.tensor([0.0, alpha * 0.25 / (1 + (alpha - 1) * 0.25), alpha / (1 + alpha), 1.0], dtype=torch.float64)
    assert torch.allclose(shift_timesteps(t, PAPER_LATENT_DIM), expected)
    assert shift_timesteps(t, PAPER_LATENT_DIM)[2] == pytest.approx(0.87387, abs=1e-5)


def test_shift_is_monotone_with_fixed_endpoints_and_moves_towards_noise() -> None:
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = shift_timesteps(t, PAPER_LATENT_DIM)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert torch.all(shifted[1:] > shifted[:-1])
    assert torch.all(shifted[1:-1] > t[1:-1])  # alpha > 1: more time spent near noise
    assert torch.equal(shift_timesteps(t, 4096), t)  # the base dimension is not shifted


def test_interpolant_runs_from_data_at_t0_to_noise_at_t1() -> None:
    x, eps = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.equal(interpolate(x, eps, torch.zeros(2)), x)
    assert torch.equal(interpolate(x, eps, torch.ones(2)), eps)
    assert torch.allclose(interpolate(x, eps, torch.tensor([0.25, 0.75]))[1], 0.25 * x[1] + 0.75 * eps[1])


def test_velocity_target_is_the_time_derivative_of_the_interpolant() -> None:
    x, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t, h = torch.full((3,), 0.4, dtype=torch.float64), 1e-6
    derivative = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    assert torch.allclose(derivative, velocity_target(x, eps), atol=1e-8)


def test_uniform_times_cover_0_to_0_999_before_the_shift() -> None:
    config = TransportConfig(time_distribution="uniform", shift=False)
    t = sample_timesteps(100_000, PAPER_LATENT_DIM, config, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 0.999
    assert t.mean().item() == pytest.approx(0.4995, abs=0.005)


def test_logit_normal_times_have_median_one_half_and_respect_t_max() -> None:
    config = TransportConfig(time_distribution="logit_normal", shift=False)
    t = sample_timesteps(100_000, PAPER_LATENT_DIM, config, generator=torch.Generator().manual_seed(0))
    assert t.max() <= 0.999
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    # logit(t) ~ N(0, 1): P(t < sigmoid(1)) = Phi(1) = 0.8413.
    assert (t < torch.sigmoid(torch.tensor(1.0))).float().mean().item() == pytest.approx(0.8413, abs=0.005)


def test_logit_normal_times_follow_a_non_zero_mean_and_non_unit_std() -> None:
    config = TransportConfig(time_distribution="logit_normal", logit_mean=-0.8, logit_std=0.6, shift=False)
    t = sample_timesteps(100_000, PAPER_LATENT_DIM, config, generator=torch.Generator().manual_seed(0)).double()
    logits = torch.logit(t)  # ~ N(-0.8, 0.6^2); the cut at t_max = 0.999 lies 12.8 sigma out
    # Standard errors at n = 100,000: 0.0019 for the mean, 0.0013 for the std; a dropped mean or
    # std (0 or 1) is hundreds of them away.
    assert logits.mean().item() == pytest.approx(-0.8, abs=0.01)
    assert logits.std().item() == pytest.approx(0.6, abs=0.01)
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(-0.8)).item(), abs=0.005)


def test_logit_normal_times_are_truncated_at_t_max_for_any_mean() -> None:
    """logit(t) ~ N(1, 1) cut at logit(0.9) = 2.197: P(t <= 0.9) = Phi(1.197) = 0.8844 before the cut,
    so below the mean lies 0.5 / 0.8844 = 0.5654 of the truncated law."""
    config = TransportConfig(time_distribution="logit_normal", logit_mean=1.0, t_max=0.9, shift=False)
    t = sample_timesteps(100_000, PAPER_LATENT_DIM, config, generator=torch.Generator().manual_seed(0))
    assert t.max() <= 0.9
    below_mean = (t < torch.sigmoid(torch.tensor(1.0))).double().mean().item()
    assert below_mean == pytest.approx(0.5 / 0.8844, abs=0.01)  # standard error 0.0016


def test_sampled_times_are_shifted_by_the_latent_dimension() -> None:
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = sample_timesteps(1000, PAPER_LATENT_DIM, TransportConfig(shift=False), generator=gen())
    shifted = sample_timesteps(1000, PAPER_LATENT_DIM, TransportConfig(), generator=gen())
    assert torch.allclose(shifted, shift_timesteps(plain.double(), PAPER_LATENT_DIM).float(), atol=1e-6)
    assert shifted.median() > 0.85  # alpha = 6.93 moves the median from 0.5 to 0.874


def test_training_loss_is_per_sample_and_reproducible_with_a_generator() -> None:
    model = lambda x_t, t, y: 0.5 * x_t  # noqa: E731
    x, y = torch.randn(6, 16, 4), torch.zeros(6, dtype=torch.long)
    first = training_loss(model, x, y, generator=torch.Generator().manual_seed(7))
    second = training_loss(model, x, y, generator=torch.Generator().manual_seed(7))
    assert first.shape == (6,)
    assert torch.equal(first, second)


def test_training_times_are_shifted_by_one_samples_latent_size_not_the_batchs() -> None:
    x, y = torch.randn(4, 64, 16), torch.zeros(4, dtype=torch.long)  # 1024 values a sample: alpha = 1/2
    seen = {}

    def model(x_t, t, y_):
        seen["t"] = t
        return torch.zeros_like(x_t)

    training_loss(model, x, y, generator=torch.Generator().manual_seed(3))
    expected = sample_timesteps(4, 1024, TransportConfig(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen["t"], expected)


def test_training_loss_is_the_mse_against_eps_minus_x() -> None:
    x, y = torch.randn(4, 8, 3), torch.zeros(4, dtype=torch.long)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    seen = {}

    def model(x_t, t_, y_):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    losses = training_loss(model, x, y, generator=torch.Generator().manual_seed(0), t=t)
    # Recover eps from x_t = (1 - t) x + t eps, then check the loss of a zero prediction.
    eps = (seen["x_t"] - (1 - t)[:, None, None] * x) / t[:, None, None]
    assert torch.allclose(losses, (eps - x).pow(2).mean(dim=(1, 2)), atol=1e-5)
    assert eps.std().item() == pytest.approx(1.0, abs=0.25)


def test_a_perfect_single_point_denoiser_has_zero_loss() -> None:
    """With one data point x, eps is recoverable from x_t, so v = (x_t - x) / t is exact."""
    x = torch.randn(1, 8, 3).expand(5, -1, -1)
    oracle = lambda x_t, t, y: (x_t - x) / t[:, None, None]  # noqa: E731
    losses = training_loss(oracle, x, torch.zeros(5, dtype=torch.long), generator=torch.Generator().manual_seed(0),
                           config=TransportConfig(time_distribution="uniform"))
    assert losses.max() < 1e-8


def test_transport_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="time_distribution"):
        TransportConfig(time_distribution="cosine")
    with pytest.raises(ValueError, match="t_max"):
        TransportConfig(t_max=1.5)


def test_training_loss_rejects_a_model_with_the_wrong_output_shape() -> None:
    with pytest.raises(ValueError, match="model returned shape"):
        training_loss(lambda x_t, t, y: x_t[:, :1], torch.randn(2, 4, 3), torch.zeros(2, dtype=torch.long))
