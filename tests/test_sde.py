"""The VP SDE against its defining integrals and the closed-form Gaussian case."""

import math

import pytest
import torch

from trials.config import SDE_KINDS
from trials.sde import (
    SDES,
    VPSDE,
    FlowFrame,
    SubVPSDE,
    gaussian_logp,
    gaussian_marginal,
    gaussian_score,
    make_sde,
    time_at_neg_log_mean_coeff,
)

SDE = VPSDE(beta_min=0.1, beta_max=20.0, T=1.0)
TIMES = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)


@pytest.fixture(autouse=True)
def float64():
    """The identities are checked to 1e-9, which float32 cannot resolve; restore the default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_mean_coefficient_squared_plus_variance_is_one():
    total = SDE.mean_coeff(TIMES) ** 2 + SDE.marginal_std(TIMES) ** 2
    torch.testing.assert_close(total, torch.ones_like(TIMES), rtol=0, atol=1e-12)


def test_marginal_std_matches_the_integral_of_beta():
    # sigma(t)^2 = 1 - exp(-int_0^t beta(s) ds); integrate beta numerically instead of using the formula.
    for t in TIMES.tolist():
        s = torch.linspace(0.0, t, 20001, dtype=torch.float64)
        integral = torch.trapezoid(SDE.beta(s), s)
        expected = math.sqrt(1.0 - math.exp(-integral.item()))
        assert abs(SDE.marginal_std(torch.tensor([t])).item() - expected) < 1e-9 * max(1.0, 1 / expected)


def test_marginal_std_is_accurate_at_tiny_t_in_float32():
    t = torch.tensor([1e-5], dtype=torch.float32)
    exact = math.sqrt(1 - math.exp(-2 * (0.25 * 1e-10 * 19.9 + 0.5 * 1e-5 * 0.1)))
    assert abs(VPSDE().marginal_std(t).item() / exact - 1) < 1e-4


def test_perturbation_kernel_has_the_marginal_moments():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7)
    t = torch.full((200_000,), 0.3)
    xt = SDE.perturb(x0, t, torch.randn(x0.shape, generator=gen))
    a, s = SDE.mean_coeff(t[:1]).item(), SDE.marginal_std(t[:1]).item()
    assert abs(xt.mean().item() - 0.7 * a) < 4 * s / math.sqrt(len(xt))
    assert abs(xt.std().item() - s) < 0.01 * s


def test_drift_and_diffusion_reproduce_the_marginal_variance_ode():
    # For the VP SDE, d var/dt = -beta var + beta (the Fokker-Planck moment equation): check it against
    # the closed-form variance of Gaussian data with a central difference.
    mean, std = torch.tensor([0.4]), torch.tensor([0.2])
    t, h = torch.tensor([0.37]), 1e-5
    var = lambda tt: gaussian_marginal(SDE, mean, std, tt)[1].pow(2)
    dvar = (var(t + h) - var(t - h)) / (2 * h)
    beta = SDE.beta(t)
    torch.testing.assert_close(dvar, -beta * var(t) + SDE.diffusion(t) ** 2, rtol=1e-6, atol=1e-9)
    # and the mean follows dm/dt = f(m, t)
    m = lambda tt: gaussian_marginal(SDE, mean, std, tt)[0]
    dm = (m(t + h) - m(t - h)) / (2 * h)
    torch.testing.assert_close(dm, SDE.drift(m(t), t), rtol=1e-6, atol=1e-9)


def test_gaussian_score_is_the_gradient_of_the_gaussian_logp():
    mean, std = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.5, 0.1, 1.0])
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0.01, 0.2, 0.6, 1.0])
    (grad,) = torch.autograd.grad(gaussian_logp(SDE, mean, std, x, t).sum(), x)
    torch.testing.assert_close(gaussian_score(SDE, mean, std)(x, t), grad)


def test_prior_logp_is_the_standard_normal_density():
    z = torch.randn(5, 1, 2, 2)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(SDE.prior_logp(z), expected)


def test_reverse_and_probability_flow_drifts():
    x, t, score = torch.randn(3, 4), torch.tensor([0.1, 0.5, 0.9]), torch.randn(3, 4)
    beta = SDE.beta(t)[:, None]
    torch.testing.assert_close(SDE.reverse_drift(x, t, score), -0.5 * beta * x - beta * score)
    torch.testing.assert_close(SDE.probability_flow_drift(x, t, score), -0.5 * beta * x - 0.5 * beta * score)


# ---- the log noise-scale clock lambda = log(sigma / alpha) and its inverse --------------------------------
LAMBDAS = torch.tensor([-12.0, -6.9, -3.0, 0.0, 2.5, 5.0, 9.0], dtype=torch.float64)


def test_log_noise_scale_is_log_sigma_over_alpha():
    expected = torch.log(SDE.marginal_std(TIMES) / SDE.mean_coeff(TIMES))
    torch.testing.assert_close(SDE.log_noise_scale(TIMES), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sde", [SDE, VPSDE(0.1, 4.0, 1.0), VPSDE(1.0, 1.0, 1.0)], ids=["default", "short", "constant"])
def test_time_at_inverts_log_noise_scale_both_ways(sde):
    # Round trips to ~machine precision, also at t = 1e-5 where the textbook root (-b + sqrt(b^2 + 4ac)) / 2a
    # cancels, and for constant beta, where the quadratic degenerates to a line.
    times = torch.tensor([1e-9, 1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sde.time_at(sde.log_noise_scale(times)), times, rtol=1e-12, atol=0)
    lambdas = LAMBDAS[LAMBDAS < sde.log_noise_scale(torch.tensor(2.0, dtype=torch.float64))]
    torch.testing.assert_close(sde.log_noise_scale(sde.time_at(lambdas)), lambdas, rtol=1e-10, atol=1e-12)


def test_the_quadratic_inverse_solves_minus_log_alpha():
    c = torch.tensor([1e-12, 1e-6, 0.01, 1.0, 5.0], dtype=torch.float64)
    t = time_at_neg_log_mean_coeff(c, SDE.beta_min, SDE.beta_max)
    torch.testing.assert_close(-SDE.log_mean_coeff(t), c, rtol=1e-13, atol=0)
    assert (t > 0).all()


def test_scale_and_std_at_lambda_are_the_marginals_at_t_of_lambda():
    alpha, sigma = SDE.scale_and_std_at(LAMBDAS)
    t = SDE.time_at(LAMBDAS)
    torch.testing.assert_close(alpha, SDE.mean_coeff(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma, SDE.marginal_std(t), rtol=1e-10, atol=0)
    torch.testing.assert_close(sigma / alpha, torch.exp(LAMBDAS), rtol=1e-12, atol=0)


def test_dt_dlambda_is_two_sigma_squared_over_beta():
    lam, h = torch.tensor([-6.0, -1.0, 0.5, 4.0]), 1e-5
    dt = (SDE.time_at(lam + h) - SDE.time_at(lam - h)) / (2 * h)
    sigma = SDE.scale_and_std_at(lam)[1]
    torch.testing.assert_close(dt, 2 * sigma**2 / SDE.beta(SDE.time_at(lam)), rtol=1e-7, atol=0)


def test_logsnr_velocity_is_the_probability_flow_drift_times_dt_dlambda():
    x, score_value = torch.randn(3, 4), torch.randn(3, 4)
    lam = torch.tensor(-0.7)
    t = SDE.time_at(lam).expand(3)
    alpha, sigma = SDE.scale_and_std_at(lam)
    velocity, part, seen = FlowFrame(SDE, "logsnr").velocity(lambda xx, tt: score_value, x, lam)
    beta = SDE.beta(t)[:, None]
    torch.testing.assert_close(
        velocity, SDE.probability_flow_drift(x, t, score_value) * 2 * sigma**2 / beta, rtol=1e-10, atol=1e-12
    )
    # The part left for the divergence estimate is the network's sigma eps_theta, eps_theta = -sigma score ...
    torch.testing.assert_close(part, sigma * (-sigma * score_value), rtol=1e-12, atol=1e-12)
    assert seen is score_value
    # ... and in y = x / alpha the same flow is dy/dlambda = s eps_theta (s = sigma / alpha): the DDIM form.
    torch.testing.assert_close(
        velocity / alpha + x / alpha * sigma**2, sigma / alpha * (-sigma * score_value), rtol=1e-10, atol=1e-12
    )


def test_closed_form_divergence_is_the_integral_of_the_linear_parts_divergence():
    # The linear part of dx/dlambda is -sigma^2 x: divergence -D sigma^2, integrated numerically in lambda.
    frame, dims = FlowFrame(SDE, "logsnr"), 7
    lam0, lam1 = SDE.log_noise_scale(torch.tensor(1e-5)).item(), SDE.log_noise_scale(torch.tensor(1.0)).item()
    grid = torch.linspace(lam0, lam1, 200001)
    numeric = torch.trapezoid(-dims * SDE.scale_and_std_at(grid)[1] ** 2, grid).item()
    assert frame.closed_form_divergence(lam0, lam1, dims) == pytest.approx(numeric, rel=1e-8)
    expected = dims * (SDE.log_mean_coeff(torch.tensor(1.0)) - SDE.log_mean_coeff(torch.tensor(1e-5))).item()
    assert frame.closed_form_divergence(lam0, lam1, dims) == pytest.approx(expected, rel=1e-12)
    assert FlowFrame(SDE, "t").closed_form_divergence(1e-5, 1.0, dims) == 0.0


def test_frames_clock_and_time_invert_each_other():
    for name in ("t", "logsnr"):
        frame = FlowFrame(SDE, name)
        for t in (1e-5, 0.3, 1.0):
            assert frame.time(torch.tensor(frame.clock(t))).item() == pytest.approx(t, rel=1e-12)
    assert FlowFrame(SDE, "logsnr").clock(0.3) == pytest.approx(SDE.log_noise_scale(torch.tensor(0.3)).item())
    with pytest.raises(ValueError, match="frame"):
        FlowFrame(SDE, "sigma")


def test_denoise_is_the_posterior_mean_for_gaussian_data():
    # For N(m, v) data, E[x0 | x_t] = m + alpha v (x_t - alpha m) / (alpha^2 v + sigma^2).
    mean, std = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.1])
    x, t = torch.randn(4, 2), torch.tensor([0.01, 0.2, 0.6, 1.0])
    alpha, sigma = SDE.mean_coeff(t)[:, None], SDE.marginal_std(t)[:, None]
    expected = mean + alpha * std**2 * (x - alpha * mean) / (alpha**2 * std**2 + sigma**2)
    torch.testing.assert_close(SDE.denoise(x, t, gaussian_score(SDE, mean, std)(x, t)), expected)


# ---- the SDE interface: a second SDE (sub-VP) comes from the SDE module and the config alone ----------------
SDES_UNDER_TEST = [VPSDE(0.1, 20.0, 1.0), SubVPSDE(0.1, 20.0, 1.0), SubVPSDE(0.1, 4.0, 1.0)]
SDE_IDS = ["vp", "subvp", "subvp-short"]


@pytest.mark.parametrize("sde", SDES_UNDER_TEST, ids=SDE_IDS)
def test_the_diffusion_matches_the_marginals(sde):
    # For kernels N(alpha x0, sigma^2) and drift f x, the SDE's own g^2 must equal d sigma^2/dt - 2 f sigma^2;
    # every derived formula (reverse drift, probability flow, the logsnr frame) relies on it.
    t = torch.tensor([1e-3, 0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    h = 1e-6
    dvar = (sde.marginal_std(t + h) ** 2 - sde.marginal_std(t - h) ** 2) / (2 * h)
    expected = dvar - 2 * sde.drift_coeff(t) * sde.marginal_std(t) ** 2
    torch.testing.assert_close(sde.diffusion(t) ** 2, expected, rtol=1e-6, atol=1e-9)
    dlog_alpha = (sde.log_mean_coeff(t + h) - sde.log_mean_coeff(t - h)) / (2 * h)
    torch.testing.assert_close(sde.drift_coeff(t), dlog_alpha, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sde", SDES_UNDER_TEST, ids=SDE_IDS)
def test_lambda_clock_inverse_and_slope(sde):
    times = torch.tensor([1e-7, 1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    lam = sde.log_noise_scale(times)
    torch.testing.assert_close(lam, torch.log(sde.marginal_std(times) / sde.mean_coeff(times)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sde.time_at(lam), times, rtol=1e-9, atol=0)
    alpha, sigma = sde.scale_and_std_at(lam)
    torch.testing.assert_close(alpha, sde.mean_coeff(times), rtol=1e-10, atol=0)
    torch.testing.assert_close(sigma, sde.marginal_std(times), rtol=1e-8, atol=0)
    h = 1e-6
    slope = (torch.log(sde.scale_and_std_at(lam + h)[0]) - torch.log(sde.scale_and_std_at(lam - h)[0])) / (2 * h)
    torch.testing.assert_close(sde.dlog_alpha_dlambda(lam), slope, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sde", SDES_UNDER_TEST, ids=SDE_IDS)
def test_logsnr_velocity_is_the_probability_flow_drift_times_dt_dlambda_for_any_sde(sde):
    x, score_value = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    lam = torch.tensor(-0.7, dtype=torch.float64)
    t, h = sde.time_at(lam), 1e-6
    dt_dlam = (sde.time_at(lam + h) - sde.time_at(lam - h)) / (2 * h)
    velocity, _, _ = FlowFrame(sde, "logsnr").velocity(lambda xx, tt: score_value, x, lam)
    drift = sde.probability_flow_drift(x, t.expand(3), score_value)
    torch.testing.assert_close(velocity, drift * dt_dlam, rtol=1e-6, atol=1e-9)


def test_make_sde_builds_the_configured_kind():
    from trials.config import SDEConfig

    assert make_sde(SDEConfig()) == VPSDE(0.1, 20.0, 1.0)
    assert make_sde(SDEConfig(kind="subvp", beta_max=4.0)) == SubVPSDE(0.1, 4.0, 1.0)
    assert set(SDES) == set(SDE_KINDS)
