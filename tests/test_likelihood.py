"""The likelihood evaluator against closed forms, and its guarantees to the tuner (CRN, failures).

Gaussian data stay Gaussian under the VP SDE, so with the exact score the probability-flow ODE is a
per-dimension affine map z = mean_T + (std_T / std_eps) (x - mean_eps) and everything the evaluator
computes has a closed form. Inputs are tiny (16 dimensions) so that the exact trace is cheap.
"""

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from trials.config import MULTISTEP_METHODS as MULTISTEP_NAMES
from trials.config import ConfigError, EvalConfig, FidelityConfig
from trials.likelihood import (
    BPDResult,
    LikelihoodEvaluator,
    ODEFailure,
    bits_per_dim,
    bpd_offset,
    draw_probes,
    log_likelihood,
)
from trials.odesolve import (
    MULTISTEP_METHODS,
    exponential_multistep,
    lagrange_integrals,
    multistep_grid,
    quadrature_weights,
)
from trials.sde import VPSDE, SubVPSDE, gaussian_logp, gaussian_marginal, gaussian_score

SHAPE = (1, 4, 4)  # a 16-pixel "image"
DIMS = 16
EPS = 1e-3


def gaussian_case(dtype=torch.float64, stds=(0.05, 0.7)):
    """Per-pixel means and stds (spread over `stds`) of Gaussian data, all different, and a few points to score."""
    mean = torch.linspace(-0.6, 0.9, DIMS, dtype=dtype).reshape(SHAPE)
    std = torch.linspace(*stds, DIMS, dtype=dtype).reshape(SHAPE)
    gen = torch.Generator().manual_seed(0)
    x = mean + 1.5 * std * torch.randn((6, *SHAPE), generator=gen, dtype=dtype)
    return mean, std, x


def t_of(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), value, dtype=like.dtype)


# ---- bits/dim offset -------------------------------------------------------------------------------------
def test_offset_is_8_bits_for_unit_range_and_7_for_centered():
    assert bpd_offset(centered=False) == 8.0
    assert bpd_offset(centered=True) == 7.0


@pytest.mark.parametrize("centered, width", [(False, 1.0), (True, 2.0)])
def test_uniform_density_on_the_data_range_scores_exactly_8_bits(centered, width):
    # The uniform density over the data range is the uniform distribution over the 256 levels.
    logp = torch.tensor([-DIMS * math.log(width)], dtype=torch.float64)
    assert bits_per_dim(logp, DIMS, centered).item() == pytest.approx(8.0, abs=1e-12)


# ---- log_likelihood against the Gaussian closed form -----------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0, 1.0), VPSDE(0.1, 4.0, 1.0)], ids=["default", "short"])
def test_exact_score_reproduces_the_analytic_log_density(sde):
    # The "short" SDE (beta_max = 4) leaves p_T far from N(0, I), so the prior mismatch is large and the
    # comparison below only holds if it is accounted for exactly.
    mean, std, x = gaussian_case()
    logp, z, nfe = log_likelihood(gaussian_score(sde, mean, std), sde, x, EPS, probes=None, rtol=1e-9, atol=1e-9)

    mean_eps, std_eps = gaussian_marginal(sde, mean, std, t_of(EPS, x))
    mean_T, std_T = gaussian_marginal(sde, mean, std, t_of(sde.T, x))
    torch.testing.assert_close(z, mean_T + std_T / std_eps * (x - mean_eps), rtol=0, atol=1e-7)

    delta_logp = logp - sde.prior_logp(z)
    expected_delta = torch.log(std_T / std_eps).sum().expand(len(x))
    torch.testing.assert_close(delta_logp, expected_delta, rtol=0, atol=1e-6)

    prior_mismatch = sde.prior_logp(z) - gaussian_logp(sde, mean, std, z, t_of(sde.T, x))
    expected = gaussian_logp(sde, mean, std, x, t_of(EPS, x)) + prior_mismatch
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)
    if sde.beta_max < 10:
        assert prior_mismatch.abs().min() > 0.1
    assert nfe > 0


def test_float32_at_the_accurate_tolerance_is_within_solver_error():
    sde = VPSDE()
    mean, std, x = gaussian_case(torch.float32)
    logp, z, _ = log_likelihood(gaussian_score(sde, mean, std), sde, x, EPS, rtol=1e-5, atol=1e-5)
    prior_mismatch = sde.prior_logp(z) - gaussian_logp(sde, mean, std, z, t_of(sde.T, x))
    expected = gaussian_logp(sde, mean, std, x, t_of(EPS, x)) + prior_mismatch
    # 1e-3 nats over 16 dimensions is below 1e-4 bits/dim.
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-3)


def test_rademacher_probes_are_exact_for_a_diagonal_jacobian_and_gaussian_probes_are_not():
    # The Gaussian case's drift acts on each pixel separately, so v^T J v = sum J_ii v_i^2, which is
    # the trace when v_i^2 = 1.
    sde = VPSDE()
    mean, std, x = gaussian_case()
    score = gaussian_score(sde, mean, std)
    gen = torch.Generator().manual_seed(1)
    exact, _, _ = log_likelihood(score, sde, x, EPS, rtol=1e-8, atol=1e-8)
    rademacher = draw_probes(tuple(x.shape), "rademacher", gen).double()
    gaussian = draw_probes(tuple(x.shape), "gaussian", gen).double()
    hutch_r, _, _ = log_likelihood(score, sde, x, EPS, probes=rademacher, rtol=1e-8, atol=1e-8)
    hutch_g, _, _ = log_likelihood(score, sde, x, EPS, probes=gaussian, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(hutch_r, exact, rtol=0, atol=1e-6)
    assert (hutch_g - exact).abs().max() > 0.1


# ---- Hutchinson against the exact trace on a network with a dense Jacobian ------------------------------
class TinyScore(nn.Module):
    """A random MLP score(x, t) on flat 6-dimensional inputs: every output depends on every input."""

    def __init__(self, dims: int = 6, hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dims + 1, hidden), nn.Tanh(), nn.Linear(hidden, dims))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


@pytest.mark.parametrize("estimator", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(estimator):
    sde = VPSDE()
    model = TinyScore().double()
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    exact, _, _ = log_likelihood(model, sde, points, EPS, rtol=1e-7, atol=1e-7)

    replicas = 200  # independent probes per point, solved together as one batch
    x = points.repeat_interleave(replicas, dim=0)
    probes = draw_probes(tuple(x.shape), estimator, gen).double()
    estimates, _, _ = log_likelihood(model, sde, x, EPS, probes=probes, rtol=1e-7, atol=1e-7)
    estimates = estimates.reshape(len(points), replicas)
    stderr = estimates.std(dim=1) / math.sqrt(replicas)
    assert (stderr > 1e-3).all()  # the estimator is genuinely random here, so the check below means something
    assert ((estimates.mean(dim=1) - exact).abs() < 4 * stderr).all()


# ---- the logsnr frame: the same density from a better-conditioned clock -----------------------------------
def gaussian_answer(sde, mean, std, x, z, eps):
    """log p_eps(x) of the Gaussian data, plus the prior mismatch at the flow's latent z (see above)."""
    prior_mismatch = sde.prior_logp(z) - gaussian_logp(sde, mean, std, z, t_of(sde.T, x))
    return gaussian_logp(sde, mean, std, x, t_of(eps, x)) + prior_mismatch


def nats_to_bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    return nats / (DIMS * math.log(2.0))


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-2])
@pytest.mark.parametrize("method, steps", [("dopri5", 0), ("rk4", 64)])
def test_logsnr_frame_exact_trace_matches_the_gaussian_answer(eps, method, steps):
    sde = VPSDE()
    mean, std, x = gaussian_case()
    logp, z, nfe = log_likelihood(
        gaussian_score(sde, mean, std), sde, x, eps, frame="logsnr", method=method, steps=steps, rtol=1e-5, atol=1e-5
    )
    mean_eps, std_eps = gaussian_marginal(sde, mean, std, t_of(eps, x))
    mean_T, std_T = gaussian_marginal(sde, mean, std, t_of(sde.T, x))
    torch.testing.assert_close(z, mean_T + std_T / std_eps * (x - mean_eps), rtol=0, atol=1e-3)
    error = nats_to_bits_per_dim(logp - gaussian_answer(sde, mean, std, x, z, eps))
    assert error.abs().max() < 1e-3
    if steps:
        assert nfe == 4 * steps  # a fixed grid: its cost is known in advance


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-2])
def test_logsnr_frame_hutchinson_is_unbiased_within_its_standard_error(eps):
    sde = VPSDE()
    model = TinyScore().double()
    gen = torch.Generator().manual_seed(4)
    points = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    exact, _, _ = log_likelihood(model, sde, points, eps, frame="logsnr", rtol=1e-6, atol=1e-6)
    replicas = 200
    x = points.repeat_interleave(replicas, dim=0)
    probes = draw_probes(tuple(x.shape), "gaussian", gen).double()
    estimates, _, _ = log_likelihood(model, sde, x, eps, probes=probes, frame="logsnr", rtol=1e-6, atol=1e-6)
    estimates = estimates.reshape(len(points), replicas)
    stderr = estimates.std(dim=1) / math.sqrt(replicas)
    assert (stderr > 1e-3).all()
    assert ((estimates.mean(dim=1) - exact).abs() < 4 * stderr).all()


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_both_frames_compute_the_same_density_of_a_network(eps):
    # A score with a dense Jacobian and no closed form: the frames differ in clock and in what is integrated
    # numerically, so agreement at a tight tolerance checks the change of variables and the closed-form part.
    sde = VPSDE()
    model = TinyScore(seed=5).double()
    points = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_frame, z_t, _ = log_likelihood(model, sde, points, eps, frame="t", rtol=1e-9, atol=1e-9)
    logsnr, z_logsnr, _ = log_likelihood(model, sde, points, eps, frame="logsnr", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z_logsnr, z_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(logsnr, t_frame, rtol=0, atol=1e-5)


def test_logsnr_frame_is_cheaper_where_frame_t_is_stiff():
    # Data concentrated near a point (std 0.0005, a fraction of a dequantization bin) make frame t's drift
    # grow like 1/sigma^2 near eps; the logsnr frame's stays bounded. Same density, fewer evaluations (on
    # MNIST models the NFE is mostly spent elsewhere: README, bench/likelihood.py).
    sde = VPSDE()
    mean, _, _ = gaussian_case()
    std = torch.full(SHAPE, 0.0005, dtype=torch.float64)
    x = mean + std * torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    score = gaussian_score(sde, mean, std)
    t_frame, _, nfe_t = log_likelihood(score, sde, x, 1e-5, frame="t", rtol=1e-5, atol=1e-5)
    logsnr, _, nfe_logsnr = log_likelihood(score, sde, x, 1e-5, frame="logsnr", rtol=1e-5, atol=1e-5)
    assert nats_to_bits_per_dim(logsnr - t_frame).abs().max() < 1e-3
    assert nfe_logsnr < 0.75 * nfe_t


def test_fixed_step_methods_need_steps_and_unknown_methods_are_refused():
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="steps >= 1"):
        log_likelihood(zero_score, VPSDE(), x, EPS, method="rk4")
    with pytest.raises(ValueError, match="method must be one of"):
        log_likelihood(zero_score, VPSDE(), x, EPS, method="leapfrog")


# ---- the evaluator ---------------------------------------------------------------------------------------
def small_eval_config(estimator="rademacher", seed=0) -> EvalConfig:
    return EvalConfig(
        estimator=estimator,
        seed=seed,
        batch_size=4,
        fast=FidelityConfig(n_images=5, rtol=1e-3, atol=1e-3),
        accurate=FidelityConfig(n_images=10, rtol=1e-5, atol=1e-5),
    )


def random_images(n=20, low=0, high=256, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, *SHAPE), generator=gen, dtype=torch.uint8)


def zero_score(x, t):
    return torch.zeros_like(x)


@pytest.mark.parametrize("centered", [False, True])
def test_evaluator_bpd_matches_the_zero_score_closed_form(centered):
    # With score 0 the ODE is dx/dt = -beta x / 2: z = x alpha(T) / alpha(eps), and the divergence
    # integrates to D log(alpha(T) / alpha(eps)). Checks the subset, chunking, formula and offset end to end.
    sde = VPSDE()
    evaluator = LikelihoodEvaluator.build(random_images(), small_eval_config(), centered)
    result = evaluator.evaluate(zero_score, sde, EPS, "accurate")

    log_ratio = (sde.log_mean_coeff(torch.tensor(sde.T)) - sde.log_mean_coeff(torch.tensor(EPS))).item()
    x = evaluator.x.double()
    logp = sde.prior_logp(x * math.exp(log_ratio)) + DIMS * log_ratio
    expected = -logp / (DIMS * math.log(2)) + (7 if centered else 8)
    assert result.per_image == pytest.approx(expected.tolist(), abs=1e-4)
    assert result.mean == pytest.approx(expected.mean().item(), abs=1e-4)
    assert not result.failed
    assert result.flagged and "worse than uniform" in result.reason  # ~16 bits/dim: an untrained model

    fast = evaluator.evaluate(zero_score, sde, EPS, "fast")
    assert fast.fidelity == {
        "name": "fast",
        "n_images": 5,
        "rtol": 1e-3,
        "atol": 1e-3,
        "method": "dopri5",
        "estimator": "rademacher",
        "eps": EPS,
        "batch_size": 4,
        "seed": 0,
        "frame": "logsnr",
        "steps": 0,
    }
    assert fast.per_image == pytest.approx(expected[:5].tolist(), abs=1e-3)  # a prefix of the same images


def test_exact_gaussian_score_on_concentrated_images_matches_closed_form_and_is_not_flagged():
    # Images near mid-gray fit a narrow Gaussian far better than uniform noise: well under 8 bits/dim.
    sde = VPSDE()
    evaluator = LikelihoodEvaluator.build(random_images(low=110, high=146), small_eval_config(), centered=False)
    mean = evaluator.x.mean(dim=0)
    std = evaluator.x.std(dim=0)
    result = evaluator.evaluate(gaussian_score(sde, mean, std), sde, EPS, "accurate")

    x = evaluator.x.double()
    mean, std = mean.double(), std.double()
    mean_eps, std_eps = gaussian_marginal(sde, mean, std, t_of(EPS, x))
    mean_T, std_T = gaussian_marginal(sde, mean, std, t_of(sde.T, x))
    z = mean_T + std_T / std_eps * (x - mean_eps)
    logp = (
        gaussian_logp(sde, mean, std, x, t_of(EPS, x))
        - gaussian_logp(sde, mean, std, z, t_of(sde.T, x))
        + sde.prior_logp(z)
    )
    expected = bits_per_dim(logp, DIMS, centered=False)
    assert result.per_image == pytest.approx(expected.tolist(), abs=1e-3)
    assert result.stderr == pytest.approx((expected.std() / math.sqrt(len(expected))).item(), rel=1e-2)
    assert result.mean < 6 and not result.flagged and result.reason is None


def conv_score(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 1, 3, padding=1))


def as_score(net: nn.Module):
    return lambda x, t: net(x) * (1 + t).reshape(-1, 1, 1, 1)


def test_same_evaluator_and_model_give_the_same_bpd():
    sde = VPSDE()
    net = conv_score(0)
    evaluator = LikelihoodEvaluator.build(random_images(), small_eval_config(), centered=False)
    first = evaluator.evaluate(as_score(net), sde, EPS, "fast")
    second = evaluator.evaluate(as_score(net), sde, EPS, "fast")
    assert first.per_image == second.per_image and first.nfe == second.nfe


def test_common_random_numbers_two_copies_score_identically_and_another_model_does_not():
    sde = VPSDE()
    images = random_images()
    net = conv_score(0)
    # Built twice (as the driver and a resumed driver would) and shipped through pickle (as Ray does).
    evaluator_a = LikelihoodEvaluator.build(images, small_eval_config(), centered=False)
    evaluator_b = pickle.loads(pickle.dumps(LikelihoodEvaluator.build(images, small_eval_config(), centered=False)))
    a = evaluator_a.evaluate(as_score(net), sde, EPS, "fast")
    b = evaluator_b.evaluate(as_score(copy.deepcopy(net)), sde, EPS, "fast")
    assert a.per_image == b.per_image
    other = evaluator_a.evaluate(as_score(conv_score(1)), sde, EPS, "fast")
    assert other.mean != a.mean


def test_evaluator_holds_only_small_cpu_tensors_fixed_by_the_seed():
    images = random_images()
    evaluator = LikelihoodEvaluator.build(images, small_eval_config(), centered=False)
    same = LikelihoodEvaluator.build(images, small_eval_config(), centered=False)
    other_seed = LikelihoodEvaluator.build(images, small_eval_config(seed=1), centered=False)
    for tensor in (evaluator.x, evaluator.probes, evaluator.indices):
        assert tensor.device.type == "cpu"
    assert torch.equal(evaluator.x, same.x) and torch.equal(evaluator.probes, same.probes)
    assert not torch.equal(evaluator.probes, other_seed.probes)
    assert set(evaluator.probes.unique().tolist()) == {-1.0, 1.0}
    assert len(pickle.dumps(evaluator)) < 10_000


def test_exact_estimator_evaluator_has_no_probes_and_agrees_with_rademacher_on_a_diagonal_model():
    sde = VPSDE()
    images = random_images()
    exact = LikelihoodEvaluator.build(images, small_eval_config("exact"), centered=False)
    hutch = LikelihoodEvaluator.build(images, small_eval_config("rademacher"), centered=False)
    assert exact.probes is None
    a = exact.evaluate(zero_score, sde, EPS, "fast")
    b = hutch.evaluate(zero_score, sde, EPS, "fast")
    assert a.per_image == pytest.approx(b.per_image, abs=1e-5)


# ---- failures are explicit -------------------------------------------------------------------------------
def nan_score(x, t):
    return torch.full_like(x, math.nan)


def nan_late_score(x, t):
    # Fine for t < 0.5, NaN afterwards: the failure happens mid-solve.
    return torch.where((t > 0.5).reshape(-1, 1, 1, 1), math.nan, -x)


def exploding_score(x, t):
    # score = -c x makes dx/dt = beta (c - 1) x / 2; with c = 200 x grows like exp(995), past float32's range.
    return -200.0 * x


@pytest.mark.parametrize("score, words", [(nan_score, "NaN"), (nan_late_score, "NaN"), (exploding_score, "blew up")])
def test_broken_models_give_a_failed_score_not_an_exception(score, words):
    evaluator = LikelihoodEvaluator.build(random_images(), small_eval_config(), centered=False)
    result = evaluator.evaluate(score, VPSDE(), EPS, "fast")
    assert isinstance(result, BPDResult)
    assert result.failed and result.flagged and result.mean == math.inf
    assert words in result.reason
    assert result.to_dict()["failed"] is True


def test_an_ode_that_needs_too_many_evaluations_fails_with_that_reason():
    images = random_images()
    evaluator = LikelihoodEvaluator.build(images, small_eval_config(), centered=False, max_nfe=10)
    result = evaluator.evaluate(as_score(conv_score(0)), VPSDE(), EPS, "accurate")
    assert result.failed and "more than 10 function evaluations" in result.reason


def test_log_likelihood_raises_odefailure_for_nan_scores():
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ODEFailure, match="NaN"):
        log_likelihood(nan_score, VPSDE(), x, EPS, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("frame", ["logsnr", "t"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_the_sub_vp_sde_has_the_exact_gaussian_likelihood_in_both_frames(frame, eps):
    # The evaluator never names an SDE: a second one, defined in trials.sde alone, gets the exact answer.
    sde = SubVPSDE(0.1, 20.0, 1.0)
    mean, std, x = gaussian_case()
    logp, z, _ = log_likelihood(gaussian_score(sde, mean, std), sde, x, eps, frame=frame, rtol=1e-7, atol=1e-7)
    mean_eps, std_eps = gaussian_marginal(sde, mean, std, t_of(eps, x))
    mean_T, std_T = gaussian_marginal(sde, mean, std, t_of(sde.T, x))
    torch.testing.assert_close(z, mean_T + std_T / std_eps * (x - mean_eps), rtol=0, atol=1e-4)
    error = nats_to_bits_per_dim(logp - gaussian_answer(sde, mean, std, x, z, eps))
    assert error.abs().max() < 1e-3


# ---- the exponential multistep methods of the logsnr frame ----------------------------------------------


def test_the_config_names_the_multistep_methods_the_evaluator_has():
    assert set(MULTISTEP_NAMES) == set(MULTISTEP_METHODS)


def gaussian_error(sde, eps, method, steps, dtype=torch.float64, stds=(0.05, 0.7)):
    """(largest bits/dim error, largest latent error, NFE) of an exact-trace solve of the Gaussian case."""
    mean, std, x = gaussian_case(dtype, stds)
    logp, z, nfe = log_likelihood(gaussian_score(sde, mean, std), sde, x, eps, method=method, steps=steps)
    mean_eps, std_eps = gaussian_marginal(sde, mean, std, t_of(eps, x))
    mean_T, std_T = gaussian_marginal(sde, mean, std, t_of(sde.T, x))
    z_error = (z - (mean_T + std_T / std_eps * (x - mean_eps))).abs().max().item()
    bpd_error = nats_to_bits_per_dim(logp - gaussian_answer(sde, mean, std, x, z, eps)).abs().max().item()
    return bpd_error, z_error, nfe


@pytest.mark.parametrize("method", MULTISTEP_NAMES)
@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0, 1.0), SubVPSDE(0.1, 20.0, 1.0)], ids=["vp", "subvp"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-2])
def test_multistep_methods_reproduce_the_gaussian_answer(method, sde, eps):
    bpd_error, z_error, nfe = gaussian_error(sde, eps, method, 64)
    assert bpd_error < 1e-3 and z_error < 1e-3
    assert nfe == 64 + 1  # one evaluation per grid node, known in advance


@pytest.mark.parametrize("method", MULTISTEP_NAMES)
def test_multistep_methods_converge_at_fourth_order(method):
    # The order-3 predictor with its corrector is a fourth-order method: doubling the steps divides the error
    # by about 16 once the steps are small. A wrong step weight, a corrector that does not correct or a
    # first-order start would show here as a ratio near 2, 4 or 8.
    sde = VPSDE()
    errors = [gaussian_error(sde, 1e-5, method, steps) for steps in (128, 256)]
    assert errors[1][0] < 1e-5
    assert errors[0][1] / errors[1][1] > 12 and errors[0][0] / errors[1][0] > 12


@pytest.mark.parametrize("method", MULTISTEP_NAMES)
def test_multistep_float32_at_28_evaluations_is_within_the_fast_target(method):
    # In float32 as the evaluator runs, at the fast fidelity's budget: the Gaussian answer to well within the
    # 0.03 bits/dim the fast fidelity is allowed on trained models (bench/fidelity_bias.py).
    bpd_error, _, nfe = gaussian_error(VPSDE(), 1e-5, method, 27, torch.float32)
    assert nfe == 28 and bpd_error < 5e-3


@pytest.mark.parametrize("method", MULTISTEP_NAMES)
def test_multistep_hutchinson_is_unbiased_within_its_standard_error(method):
    # The divergence comes from the same evaluations as the state update, weighted by a quadrature: still an
    # unbiased estimate of the exact-trace solve with the same grid.
    sde = VPSDE()
    model = TinyScore().double()
    gen = torch.Generator().manual_seed(7)
    points = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    exact, _, _ = log_likelihood(model, sde, points, 1e-3, method=method, steps=40)
    replicas = 200
    x = points.repeat_interleave(replicas, dim=0)
    probes = draw_probes(tuple(x.shape), "gaussian", gen).double()
    estimates, _, _ = log_likelihood(model, sde, x, 1e-3, probes=probes, method=method, steps=40)
    estimates = estimates.reshape(len(points), replicas)
    stderr = estimates.std(dim=1) / math.sqrt(replicas)
    assert (stderr > 1e-3).all()
    assert ((estimates.mean(dim=1) - exact).abs() < 4 * stderr).all()


@pytest.mark.parametrize("method", MULTISTEP_NAMES)
def test_multistep_agrees_with_a_tight_solve_on_a_network(method):
    # A dense Jacobian and no closed form: against dopri5 at 1e-9 in frame t (the other frame, the other solver).
    sde = VPSDE()
    model = TinyScore(seed=5).double()
    points = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tight, z_tight, _ = log_likelihood(model, sde, points, 1e-5, frame="t", rtol=1e-9, atol=1e-9)
    logp, z, _ = log_likelihood(model, sde, points, 1e-5, method=method, steps=128)
    torch.testing.assert_close(z, z_tight, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp, tight, rtol=0, atol=1e-4)


def test_a_multistep_fidelity_is_checked_and_costs_steps_plus_one():
    method = MULTISTEP_NAMES[0]
    fidelity = FidelityConfig(n_images=4, method=method, steps=27)
    fidelity.check("eval.fast")
    assert fidelity.nfe == 28 and fidelity.describe() == f"logsnr {method} 27 steps"
    with pytest.raises(ConfigError, match="eval.fast.steps: must be >= 1 for the multistep method"):
        FidelityConfig(method=method).check("eval.fast")
    with pytest.raises(ConfigError, match="eval.fast.frame: multistep method"):
        FidelityConfig(method=method, steps=8, frame="t").check("eval.fast")


def test_multistep_methods_need_steps_and_the_logsnr_frame():
    x = torch.zeros(2, *SHAPE)
    method = MULTISTEP_NAMES[0]
    with pytest.raises(ValueError, match="steps >= 1"):
        log_likelihood(zero_score, VPSDE(), x, EPS, method=method)
    with pytest.raises(ValueError, match="logsnr frame"):
        log_likelihood(zero_score, VPSDE(), x, EPS, method=method, steps=8, frame="t")


def test_lagrange_integrals_are_exact_for_exponential_times_polynomial():
    # integral_0^h e^lam (lam - 0)(lam - a) ... has a closed form; check the basis against direct integrals of
    # e^lam lam^k on an uneven node set.
    nodes = np.array([0.3, -0.4, -1.5, -1.9])
    a, b = 0.3, 1.1
    w = lagrange_integrals(nodes, a, b, lambda lam: lam)
    for k in range(4):
        # sum_j w_j nodes_j^k is the integral of e^lam times the interpolant of lam^k, which is lam^k itself.
        exact = {0: math.exp(b) - math.exp(a)}
        exact[1] = (b - 1) * math.exp(b) - (a - 1) * math.exp(a)
        exact[2] = (b * b - 2 * b + 2) * math.exp(b) - (a * a - 2 * a + 2) * math.exp(a)
        exact[3] = (b**3 - 3 * b * b + 6 * b - 6) * math.exp(b) - (a**3 - 3 * a * a + 6 * a - 6) * math.exp(a)
        assert float(w @ nodes**k) == pytest.approx(exact[k], rel=1e-12)


@pytest.mark.parametrize("order", [2, 4, 6])
def test_quadrature_weights_integrate_polynomials_below_their_order_exactly(order):
    grid = multistep_grid(-6.9, 5.0, 13, warp=1.5)  # uneven steps
    w = quadrature_weights(grid, order)
    for k in range(order):
        exact = (grid[-1] ** (k + 1) - grid[0] ** (k + 1)) / (k + 1)
        assert float(w @ grid**k) == pytest.approx(exact, rel=1e-10, abs=1e-10)
    assert float(w @ grid**order) != pytest.approx(
        (grid[-1] ** (order + 1) - grid[0] ** (order + 1)) / (order + 1), rel=1e-8
    )


@pytest.mark.parametrize("warp", [0.0, 2.0, -1.0])
def test_multistep_grid_spans_the_interval_with_geometric_steps(warp):
    grid = multistep_grid(-6.0, 5.0, 10, warp)
    assert grid[0] == -6.0 and grid[-1] == 5.0 and len(grid) == 11
    steps = np.diff(grid)
    assert (steps > 0).all()
    np.testing.assert_allclose(steps[1:] / steps[:-1], math.exp(warp / 10), rtol=1e-9)


def test_multistep_grid_ramp_splits_the_first_step_into_doubling_ones():
    grid = multistep_grid(-6.0, 5.0, 10, ramp=3)
    assert grid[0] == -6.0 and grid[-1] == 5.0 and len(grid) == 11
    steps = np.diff(grid)
    h = 11.0 / 7  # 10 - 3 equal steps, the first of them split in four
    np.testing.assert_allclose(steps[:4], h * np.array([1, 2, 4, 8]) / 15, rtol=1e-12)
    np.testing.assert_allclose(steps[4:], h, rtol=1e-12)
    assert len(multistep_grid(-6.0, 5.0, 2, ramp=3)) == 3  # never more steps than asked for


def test_short_start_up_steps_keep_the_error_small_where_the_data_scale_meets_sigma_at_eps(monkeypatch):
    # Gaussian data with stds of 0.01-0.03 scored from eps = 1e-3, where sigma is 0.01: the network's part
    # changes fastest in the first steps, which are the solver's low-order ones (no earlier evaluations yet).
    # With them as long as the rest the closed-form answer is missed by over 0.005 bits/dim at 32 evaluations;
    # split into short ones (the method's ramp) by under half of that. Real models do the same, more so
    # (docs/metric.md).
    def error() -> float:
        bpd_error, _, nfe = gaussian_error(VPSDE(), 1e-3, "multistep", 31, stds=(0.01, 0.03))
        assert nfe == 32
        return bpd_error

    ramped = error()
    monkeypatch.setitem(MULTISTEP_METHODS, "multistep", {**MULTISTEP_METHODS["multistep"], "ramp": 0})
    equal = error()
    assert equal > 0.005 and ramped < 0.5 * equal


def test_exponential_multistep_solves_the_linear_part_exactly():
    # With eps_theta = 0 the ODE is linear and the multistep solve is exact on any grid, however coarse:
    # x(b) = x(a) alpha(b) / alpha(a).
    sde = VPSDE()
    grid = multistep_grid(-6.0, 5.0, 2)
    alpha, sigma = sde.scale_and_std_at(torch.tensor(grid, dtype=torch.float64))
    x0 = torch.randn(3, 4, dtype=torch.float64)
    for prediction, atol in (("noise", 1e-15), ("data", 1e-8)):
        x = exponential_multistep(
            lambda i, x: torch.zeros_like(x),
            x0,
            grid,
            torch.log(alpha).numpy(),
            torch.log(sigma).numpy(),
            order=3,
            prediction=prediction,
        )
        # The data form gets x(T) ~ 0.007 x(eps) as a difference of numbers ~1, which costs it digits.
        torch.testing.assert_close(x, x0 * alpha[-1] / alpha[0], rtol=0, atol=atol)
