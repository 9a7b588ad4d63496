"""The VP SDE against its defining integrals and the closed-form Gaussian case."""

import math

import pytest
import torch

from trials.sde import VPSDE, gaussian_logp, gaussian_marginal, gaussian_score

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
