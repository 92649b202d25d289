"""Samplers, time conventions and guidance, checked against a closed-form velocity field.

For Gaussian data x ~ N(mu, S) and eps ~ N(0, I) on the linear path x_t = (1 - t) x + t eps, the
pair (v, x_t) with v = eps - x is jointly Gaussian:
    E[x_t] = (1 - t) mu,       Cov(x_t) = S_t = (1 - t)^2 S + t^2 I,
    E[v]   = -mu,              Cov(v, x_t) = C_t = t I - (1 - t) S,
so the optimal (minimum-MSE) velocity is the Gaussian conditional mean
    v*(x_t, t) = E[eps - x | x_t] = -mu + C_t S_t^{-1} (x_t - (1 - t) mu),
with conditional covariance Cov(v | x_t) = (I + S) - C_t S_t^{-1} C_t. Integrating dx/dt = v* from
t = 1 (x ~ N(0, I)) to the grid's last time t_e transports N(0, I) exactly onto N((1 - t_e) mu, S_t_e)
(the official sampler stops there, t_e = 0.001 unshifted); what a sampler adds is only its
discretisation error.
"""
import math

import pytest
import torch

from rae.dit import build_dit
from rae.sampling import (
    SamplerConfig,
    autoguidance,
    classifier_free_guidance,
    integrate,
    sample,
    time_grid,
)
from rae.transport import shift_timesteps, training_loss

MU = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
_Q, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64))
SIGMA = _Q @ torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)) @ _Q.T
EYE = torch.eye(3, dtype=torch.float64)
PAPER_LATENT_DIM = 16 * 16 * 768


pytestmark = pytest.mark.usefixtures("one_thread")


def optimal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v*(x_t, t) for x ~ N(MU, SIGMA); x is (B, 3) or (B, 1, 3), all samples at one time."""
    assert torch.all(t == t[0]), "closed form written for one time per call"
    s = float(t[0])
    cov_xt = (1 - s) ** 2 * SIGMA + s**2 * EYE
    cov_v_xt = s * EYE - (1 - s) * SIGMA
    gain = cov_v_xt @ torch.linalg.inv(cov_xt)
    flat = x.reshape(-1, 3).double()
    v = -MU + (flat - (1 - s) * MU) @ gain.T
    return v.reshape(x.shape).to(x.dtype)


def affine_map(method: str, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler applied to v* is affine, noise -> A noise + b; read A and b off basis probes."""
    probes = torch.cat([torch.zeros(1, 3, dtype=torch.float64), EYE])
    out = integrate(optimal_velocity, probes, times, method)
    return (out[1:] - out[0]).T, out[0]


# Discretisation error of the covariance at 50 steps (max abs entry; ||SIGMA|| = 4). Measured with
# `affine_map` (no sampling noise): Euler 0.137 unshifted / 0.205 shifted, Heun 8.3e-4 / 1.0e-2;
# doubling the steps halves (Euler) or quarters (Heun) them, see test_integrators_converge_at_their_order.
# The bounds below leave about 1.5x room.
COV_DISCRETISATION = {("euler", False): 0.2, ("euler", True): 0.3, ("heun", False): 2e-3, ("heun", True): 1.5e-2}


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
def test_sampler_reproduces_gaussian_data_distribution(method: str, shifted: bool) -> None:
    n = 100_000
    times = time_grid(50, latent_dim=PAPER_LATENT_DIM if shifted else None)
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = integrate(optimal_velocity, noise, times, method)
    t_end = float(times[-1])
    mu, sigma = (1 - t_end) * MU, (1 - t_end) ** 2 * SIGMA + t_end**2 * EYE  # exact law at t_end

    mean = samples.mean(0)
    cov = torch.cov(samples.T)
    # Sampling error of n independent draws: se(mean_i) = sqrt(S_ii / n),
    # se(cov_ij) = sqrt((S_ii S_jj + S_ij^2) / n). Allow 4.5 standard errors (a false alarm
    # for one of 3 + 9 entries is < 1e-4) plus the discretisation bound.
    var = torch.diagonal(sigma)
    mean_tol = 4.5 * torch.sqrt(var / n) + 1e-3
    cov_tol = 4.5 * torch.sqrt((var[:, None] * var[None, :] + sigma**2) / n) + COV_DISCRETISATION[method, shifted]
    assert torch.all((mean - mu).abs() <= mean_tol), (mean, mu)
    assert torch.all((cov - sigma).abs() <= cov_tol), (cov, sigma)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_integrators_converge_at_their_order(method: str, order: int) -> None:
    def error(steps: int) -> float:
        times = time_grid(steps)
        t = float(times[-1])
        # The exact map from noise to x_t is affine: S_t^(1/2) noise + (1 - t) mu (S and I commute).
        root = _Q @ torch.diag(((1 - t) ** 2 * torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64) + t**2).sqrt()) @ _Q.T
        a, b = affine_map(method, times)
        return float((a - root).abs().max() + (b - (1 - t) * MU).abs().max())

    ratio = error(50) / error(100)
    assert 2**order * 0.8 < ratio < 2**order * 1.25, ratio


def test_optimal_velocity_attains_the_minimum_training_loss() -> None:
    """Ties the transport's interpolant and target to the sampler's convention (t = 1 is noise):
    at a fixed t the loss of v* must equal tr(Cov(v | x_t)) / 3."""
    n, t = 100_000, 0.3
    gen = torch.Generator().manual_seed(1)
    x = MU + torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    losses = training_loss(
        lambda x_t, t_, y: optimal_velocity(x_t, t_), x, torch.zeros(n, dtype=torch.long),
        generator=gen, t=torch.full((n,), t, dtype=torch.float64),
    )
    cov_xt = (1 - t) ** 2 * SIGMA + t**2 * EYE
    cov_v_xt = t * EYE - (1 - t) * SIGMA
    expected = torch.trace(EYE + SIGMA - cov_v_xt @ torch.linalg.solve(cov_xt, cov_v_xt)) / 3
    standard_error = losses.std() / math.sqrt(n)
    assert abs(losses.mean() - expected) < 5 * standard_error, (losses.mean(), expected)


def test_time_grid_is_the_official_one_and_stops_at_the_shifted_t_min() -> None:
    times = time_grid(50, latent_dim=PAPER_LATENT_DIM)
    assert times.shape == (50,)  # 50 points, 49 steps, no extra step to t = 0
    assert times[0] == 1.0
    assert torch.all(times[1:] < times[:-1])
    expected_last = shift_timesteps(torch.tensor(0.001, dtype=torch.float64), PAPER_LATENT_DIM)
    assert float(times[-1]) == pytest.approx(float(expected_last), rel=1e-4)  # float32 grid, as official
    assert 0.0068 < float(times[-1]) < 0.0070
    assert torch.allclose(time_grid(5), torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 0.001], dtype=torch.float64))
    with pytest.raises(ValueError, match="grid points"):
        time_grid(1)


def test_euler_is_exact_for_constant_velocity_and_heun_for_velocity_linear_in_t() -> None:
    x1 = torch.randn(4, 6, 3)
    v = torch.randn(4, 6, 3)
    times = time_grid(7, latent_dim=PAPER_LATENT_DIM)
    t_end = float(times[-1])
    assert torch.allclose(integrate(lambda x, t: v, x1, times, "euler"), x1 - (1 - t_end) * v, atol=1e-6)
    # dx/dt = t * v  =>  x(t_e) = x(1) - (1 - t_e^2) v / 2; Heun (trapezoid) integrates linear-in-t exactly.
    out = integrate(lambda x, t: t[:, None, None] * v, x1, times, "heun")
    assert torch.allclose(out, x1 - (1 - t_end**2) / 2 * v, atol=1e-6)


def test_sample_is_deterministic_given_a_generator() -> None:
    config = SamplerConfig(method="heun", num_steps=8)
    draw = lambda seed: sample(  # noqa: E731
        optimal_velocity, (16, 1, 3), config=config, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    assert torch.equal(draw(3), draw(3))
    assert not torch.allclose(draw(3), draw(4))


def test_sample_shifts_its_grid_by_the_latent_dimension() -> None:
    shape = (8, 256, 12)  # 3072 values: alpha = sqrt(3072 / 4096)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    seen: list[float] = []

    def record(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    out = sample(record, shape, config=SamplerConfig(num_steps=4), generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, noise)
    expected = time_grid(4, latent_dim=3072)[:-1]
    assert torch.allclose(torch.tensor(seen, dtype=torch.float64), expected, atol=1e-6)


@pytest.fixture(scope="module")
def random_dit() -> torch.nn.Module:
    """A tiny DiT^DH with every weight random (adaLN-Zero would otherwise make all outputs 0)."""
    torch.manual_seed(0)
    model = build_dit("ditdh-tiny", latent_channels=8, grid=4, num_classes=5, width=32, heads=2,
                      head_width=32, head_heads=2, depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 16, 8), torch.tensor([0, 3, 1, 4])


def test_cfg_with_scale_one_is_the_conditional_velocity(random_dit) -> None:
    x, y = _batch()
    t = torch.full((4,), 0.6)
    guided = classifier_free_guidance(random_dit, y, 1.0, null_class=5)(x, t)
    assert torch.allclose(guided, random_dit(x, t, y), atol=1e-6)


def test_cfg_combines_conditional_and_null_class_velocities(random_dit) -> None:
    x, y = _batch()
    t = torch.full((4,), 0.6)
    v_c, v_u = random_dit(x, t, y), random_dit(x, t, torch.full_like(y, 5))
    assert not torch.allclose(v_c, v_u)
    guided = classifier_free_guidance(random_dit, y, 3.0, null_class=5)(x, t)
    assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-5)


def test_cfg_outside_the_guidance_interval_is_conditional(random_dit) -> None:
    x, y = _batch()
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])  # interval [0.2, 0.8]: samples 1 and 2 guided
    velocity = classifier_free_guidance(random_dit, y, 4.0, null_class=5, interval=(0.2, 0.8))
    guided = velocity(x, t)
    v_c, v_u = random_dit(x, t, y), random_dit(x, t, torch.full_like(y, 5))
    inside = torch.tensor([False, True, True, False])
    assert torch.allclose(guided[~inside], v_c[~inside], atol=1e-6)
    assert torch.allclose(guided[inside], (v_u + 4.0 * (v_c - v_u))[inside], atol=1e-5)
    assert not torch.allclose(guided[inside], v_c[inside], atol=1e-3)


@pytest.mark.parametrize("guidance", ["cfg", "autoguidance"])
def test_guidance_on_the_default_interval_applies_at_the_first_step_t_equal_one(guidance: str) -> None:
    """The default interval [0, 1] is closed: the first step of a guided sample, at t = 1, is guided."""
    model = lambda x, t, y: x + y[:, None, None].to(x.dtype)  # noqa: E731
    guide = lambda x, t, y: 0.5 * x  # noqa: E731
    y, null = torch.tensor([0, 2]), torch.tensor([3, 3])
    if guidance == "cfg":
        velocity = classifier_free_guidance(model, y, 2.5, null_class=3)
        weak = lambda x, t: model(x, t, null)  # noqa: E731
    else:
        velocity = autoguidance(model, guide, y, 2.5)
        weak = lambda x, t: guide(x, t, y)  # noqa: E731
    times = time_grid(2, latent_dim=PAPER_LATENT_DIM)  # one step, from t = 1
    assert times[0] == 1.0
    noise = torch.randn(2, 4, 3)
    t1 = torch.ones(2)
    guided = weak(noise, t1) + 2.5 * (model(noise, t1, y) - weak(noise, t1))
    assert not torch.allclose(guided, model(noise, t1, y))
    expected = noise + (float(times[1]) - 1.0) * guided
    assert torch.allclose(integrate(velocity, noise, times), expected, rtol=1e-6, atol=1e-6)


def test_cfg_interval_is_closed_at_both_ends(random_dit) -> None:
    x, y = _batch()
    t = torch.tensor([0.2, 0.8, 0.19, 0.81])  # the bounds themselves are guided, just outside is not
    guided = classifier_free_guidance(random_dit, y, 4.0, null_class=5, interval=(0.2, 0.8))(x, t)
    v_c, v_u = random_dit(x, t, y), random_dit(x, t, torch.full_like(y, 5))
    assert torch.allclose(guided[:2], (v_u + 4.0 * (v_c - v_u))[:2], atol=1e-5)
    assert torch.allclose(guided[2:], v_c[2:], atol=1e-6)


def test_autoguidance_extrapolates_from_the_guide_towards_the_main_model() -> None:
    x = torch.randn(3, 5, 2)
    y = torch.tensor([1, 2, 0])
    main = lambda x, t, y: 2.0 * x + y[:, None, None]  # noqa: E731
    guide = lambda x, t, y: -x + t[:, None, None]  # noqa: E731
    t = torch.tensor([0.1, 0.5, 0.9])
    out = autoguidance(main, guide, y, 1.42, interval=(0.3, 1.0))(x, t)
    v_main, v_guide = main(x, t, y), guide(x, t, y)
    expected = v_guide + 1.42 * (v_main - v_guide)
    assert torch.allclose(out[1:], expected[1:])
    assert torch.allclose(out[0], v_main[0])


def test_guidance_rejects_an_interval_outside_unit_time() -> None:
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(lambda x, t, y: x, torch.zeros(1, dtype=torch.long), 2.0, null_class=1,
                                 interval=(0.5, 1.5))


def test_sampler_config_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="method"):
        SamplerConfig(method="rk4")

