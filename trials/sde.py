"""The variance-preserving SDE (Song et al., 2021): all of its math, in one place.

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,    beta(t) = beta_min + t (beta_max - beta_min),  t in [0, T]

Training (perturbation kernel), sampling (reverse SDE, probability-flow ODE) and the likelihood evaluator
all take their formulas from here. A score is passed in as a tensor (or a callable where an ODE needs one),
so these functions are pure and work equally for a network and for a closed-form score in the tests.

Time tensors `t` have shape (B,) and broadcast against a batch `x` of shape (B, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) time-dependent coefficient so it multiplies a (B, ...) batch."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    # --- the forward SDE -------------------------------------------------------------------------
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * per_sample(self.beta(t), x) * x

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    # --- marginals p_t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I) ----------------------------------
    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -1/2 * integral_0^t beta(s) ds."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        # 1 - alpha^2 written with expm1: at t ~ 1e-5 the naive form loses most of its digits in float32.
        return torch.sqrt(-torch.expm1(2.0 * self.log_mean_coeff(t)))

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t given x_0 with the supplied standard-normal `noise`."""
        return per_sample(self.mean_coeff(t), x0) * x0 + per_sample(self.marginal_std(t), x0) * noise

    # --- the prior at t = T --------------------------------------------------------------------------
    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I), summed over all but the batch dimension."""
        dims = z[0].numel()
        return -0.5 * dims * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(dim=1)

    # --- the reverse-time processes, given the score of p_t -------------------------------------
    def reverse_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Drift of the reverse-time SDE, dx = [f - g^2 score] dt + g dw_bar (time runs from T to 0)."""
        return self.drift(x, t) - per_sample(self.beta(t), x) * score

    def probability_flow_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Drift of the probability-flow ODE, dx/dt = f - 1/2 g^2 score, which shares the SDE's marginals."""
        return self.drift(x, t) - 0.5 * per_sample(self.beta(t), x) * score


def gaussian_marginal(sde: VPSDE, mean: torch.Tensor, std: torch.Tensor, t: torch.Tensor):
    """Mean and std of p_t when the data are N(mean, std^2) per dimension (independent).

    A Gaussian stays Gaussian under the VP SDE: x_t = alpha x_0 + sigma z, so
    mean_t = alpha * mean and var_t = alpha^2 std^2 + sigma^2. This closed form is what the tests use to
    check the training target, the samplers and the likelihood evaluator.
    """
    a = sde.mean_coeff(t)
    s = sde.marginal_std(t)
    a_ = a.reshape(-1, *([1] * mean.dim()))
    s_ = s.reshape(-1, *([1] * mean.dim()))
    mean_t = a_ * mean
    std_t = torch.sqrt(a_**2 * std**2 + s_**2)
    return mean_t, std_t


def gaussian_score(sde: VPSDE, mean: torch.Tensor, std: torch.Tensor):
    """The exact score function of p_t for N(mean, std^2) data: a drop-in for a trained network."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean_t, std_t = gaussian_marginal(sde, mean, std, t)
        return -(x - mean_t) / std_t**2

    return score


def gaussian_logp(sde: VPSDE, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
    """Exact log p_t(x) for N(mean, std^2) data, summed over all but the batch dimension."""
    mean_t, std_t = gaussian_marginal(sde, mean, std, t)
    logp = -0.5 * ((x - mean_t) / std_t) ** 2 - torch.log(std_t) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).sum(dim=1)
