"""The diffusion SDEs (Song et al., 2021): all of their math, in one place.

Every SDE here has Gaussian perturbation kernels x_t = alpha(t) x_0 + sigma(t) z with a linear drift,

    dx = f(t) x dt + g(t) dw,    f = d log alpha / dt,    g^2 = d sigma^2/dt - 2 f sigma^2,

and `SDE` derives from a subclass's alpha, sigma, f and g everything else: the perturbation, the prior, the
reverse-time SDE and probability-flow drifts, the denoiser and the clock lambda = log(sigma / alpha) of
the logsnr frame. Two are defined, chosen by `sde.kind` through `make_sde`:

    vp      dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,        sigma^2 = 1 - alpha^2
    subvp   dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - alpha^4)) dw,   sigma = 1 - alpha^2

both with beta(t) = beta_min + t (beta_max - beta_min) and alpha(t) = exp(-1/2 integral_0^t beta). A new
SDE is a subclass here, its name in `SDES` and in `trials.config.SDE_KINDS`.

Training (perturbation kernel), sampling (reverse SDE, probability-flow ODE) and the likelihood evaluator
all take their formulas from here. A score is passed in as a tensor (or a callable where an ODE needs one),
so these functions are pure and work equally for a network and for a closed-form score in the tests.

Time tensors `t` have shape (B,) and broadcast against a batch `x` of shape (B, ...).

The probability-flow ODE in two frames
--------------------------------------
With x_t = alpha x_0 + sigma z and the noise prediction eps_theta = -sigma * score, the probability-flow
ODE in the SDE's own time is

    dx/dt = -1/2 beta x - 1/2 beta score = -1/2 beta x + beta eps_theta / (2 sigma)           (frame "t")

whose second term grows like 1/sigma as t -> 0: stiff near eps. Scale by the signal level, y = x / alpha
and s = sigma / alpha (the noise level of y = x_0 + s z). From d log alpha / dt = -beta / 2 and
s^2 = 1 / alpha^2 - 1:

    dy/dt = (dx/dt) / alpha + beta x / (2 alpha) = beta eps_theta / (2 sigma alpha)
    ds/dt = beta / (2 s alpha^2) = beta / (2 sigma alpha)
    =>  dy/ds = eps_theta(alpha y, t(s)),

the form behind DDIM, EDM and DPM-Solver, where trajectories are nearly straight. Its clock is
lambda = log s = log(sigma / alpha) = -1/2 log SNR, which spreads the noise levels evenly (t = 1e-5 ... 1
is lambda = -6.9 ... 5.0 for the default beta): dt/dlambda = 2 sigma^2 / beta, and

    dy/dlambda = s eps_theta,      or, back in x = alpha y,
    dx/dlambda = -sigma^2 x + sigma eps_theta(x, t(lambda)) = -sigma^2 (x + score)             (frame "logsnr")

Frame "logsnr" integrates the second form: the clock is lambda (which is what removes the stiffness: every
term is bounded as sigma -> 0), the state stays x. In y the state grows like e^lambda at high noise, which
a Runge-Kutta step in lambda has to resolve: on the MNIST UNets of bench/likelihood.py the y state gave
about twice the bits/dim error of the x state at the same number of evaluations.

Densities. Along dx/dlambda = v, d log p / dlambda = -div_x v, and div_x v = -D sigma^2 + sigma div_x eps_theta.
The first term is the linear part's, and integrates in closed form, since sigma^2 dlambda = beta/2 dt:
-D integral sigma^2 dlambda = D [log alpha(T) - log alpha(eps)]. So, from eps to T,

    log p_eps(x) = log p_T(x_T) + D [log alpha(T) - log alpha(eps)] + integral sigma div_x eps_theta dlambda,

which is the change of variables to y (log p_y = log p_x + D log alpha; div_y(s eps_theta) = sigma div_x eps_theta)
written out. Check against frame t: there div_x drift = -1/2 beta D + beta div_x eps_theta / (2 sigma); the
first term integrates to the same D [log alpha(T) - log alpha(eps)], and the second, with dt = 2 sigma^2 /
beta dlambda, to the same integral of sigma div_x eps_theta. Only that integral needs a divergence
estimate, and its integrand stays bounded as sigma -> 0 (for a good model eps_theta ~ (x - alpha x_0) /
sigma, so div ~ D / sigma), where frame t's grows like 1/sigma^2. `FlowFrame` holds both frames; the
t(lambda) it needs is the closed-form inverse `time_at_neg_log_mean_coeff` of the quadratic -log alpha(t).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trials.config import FRAMES

if TYPE_CHECKING:
    from trials.config import SDEConfig

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) time-dependent coefficient so it multiplies a (B, ...) batch."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class SDE(ABC):
    """An SDE with Gaussian kernels x_t = alpha(t) x_0 + sigma(t) z and the prior N(0, I) at t = T.

    Subclasses give beta-free formulas for alpha, sigma, the drift coefficient and the diffusion, and the
    clock lambda = log(sigma / alpha) with its inverse; the rest is derived here, once.
    """

    T: float

    # --- what a subclass defines ---------------------------------------------------------------------
    @abstractmethod
    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t)."""

    @abstractmethod
    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t)."""

    @abstractmethod
    def drift_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """f(t) = d log alpha / dt: the drift is f(t) x."""

    @abstractmethod
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t)."""

    @abstractmethod
    def time_at(self, lam: torch.Tensor) -> torch.Tensor:
        """The time t at which log(sigma / alpha) = lam: the inverse of `log_noise_scale`."""

    @abstractmethod
    def scale_and_std_at(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at log(sigma / alpha) = lam, straight from lam (no round trip through t)."""

    @abstractmethod
    def dlog_alpha_dlambda(self, lam: torch.Tensor) -> torch.Tensor:
        """d log alpha / d lambda at lam: the linear coefficient of the probability flow in the logsnr frame."""

    # --- derived ----------------------------------------------------------------------------------
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return per_sample(self.drift_coeff(t), x) * x

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mean_coeff(t))

    def log_noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(sigma / alpha)."""
        return torch.log(self.marginal_std(t)) - self.log_mean_coeff(t)

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t given x_0 with the supplied standard-normal `noise`."""
        return per_sample(self.mean_coeff(t), x0) * x0 + per_sample(self.marginal_std(t), x0) * noise

    def prior_sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I), summed over all but the batch dimension."""
        dims = z[0].numel()
        return -0.5 * dims * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(dim=1)

    def reverse_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Drift of the reverse-time SDE, dx = [f - g^2 score] dt + g dw_bar (time runs from T to 0)."""
        return self.drift(x, t) - per_sample(self.diffusion(t) ** 2, x) * score

    def probability_flow_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Drift of the probability-flow ODE, dx/dt = f - 1/2 g^2 score, which shares the SDE's marginals."""
        return self.drift(x, t) - 0.5 * per_sample(self.diffusion(t) ** 2, x) * score

    def denoise(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The posterior mean E[x_0 | x_t] = (x - sigma eps_theta) / alpha = (x + sigma^2 score) / alpha (Tweedie)."""
        alpha, sigma = per_sample(self.mean_coeff(t), x), per_sample(self.marginal_std(t), x)
        return (x + sigma**2 * score) / alpha


@dataclass(frozen=True)
class LinearBetaSDE(SDE):
    """What vp and subvp share: beta(t) = beta_min + t (beta_max - beta_min), the drift -1/2 beta x and so
    alpha(t) = exp(-1/2 integral_0^t beta). Subclasses give sigma, g and the lambda clock."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -1/2 * integral_0^t beta(s) ds."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min


@dataclass(frozen=True)
class VPSDE(LinearBetaSDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, sigma^2 = 1 - alpha^2."""

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        # 1 - alpha^2 written with expm1: at t ~ 1e-5 the naive form loses most of its digits in float32.
        return torch.sqrt(-torch.expm1(2.0 * self.log_mean_coeff(t)))

    def log_noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(sigma / alpha) = 1/2 log(1/alpha^2 - 1), written with expm1 for small t."""
        return 0.5 * torch.log(torch.expm1(-2.0 * self.log_mean_coeff(t)))

    def time_at(self, lam: torch.Tensor) -> torch.Tensor:
        # alpha^2 = 1 / (1 + s^2), so -log alpha = 1/2 log(1 + e^(2 lam)), exactly, for any lam.
        neg_log_alpha = 0.5 * torch.logaddexp(torch.zeros_like(lam), 2.0 * lam)
        return time_at_neg_log_mean_coeff(neg_log_alpha, self.beta_min, self.beta_max)

    def scale_and_std_at(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), 2.0 * lam)
        return torch.exp(log_alpha), torch.exp(lam + log_alpha)

    def dlog_alpha_dlambda(self, lam: torch.Tensor) -> torch.Tensor:
        return -(self.scale_and_std_at(lam)[1] ** 2)  # -sigma^2


@dataclass(frozen=True)
class SubVPSDE(LinearBetaSDE):
    """Sub-VP (Song et al., 2021): dx = -1/2 beta x dt + sqrt(beta (1 - alpha^4)) dw, sigma = 1 - alpha^2.

    Its variance stays below the VP SDE's at every t; same alpha, same beta(t).
    """

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(4.0 * self.log_mean_coeff(t)))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(2.0 * self.log_mean_coeff(t))  # 1 - alpha^2, accurate at small t

    def time_at(self, lam: torch.Tensor) -> torch.Tensor:
        return time_at_neg_log_mean_coeff(self._neg_log_alpha(lam), self.beta_min, self.beta_max)

    def scale_and_std_at(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        neg_log_alpha = self._neg_log_alpha(lam)
        return torch.exp(-neg_log_alpha), torch.exp(lam - neg_log_alpha)  # sigma = s alpha exactly

    @staticmethod
    def _neg_log_alpha(lam: torch.Tensor) -> torch.Tensor:
        # s = sigma / alpha = (1 - alpha^2) / alpha, so alpha^2 + s alpha - 1 = 0 and 1 / alpha = s/2 + sqrt(s^2/4 + 1):
        # -log alpha = asinh(s / 2), which keeps its digits at small s where log(alpha ~ 1) would not; for
        # lam > 0 it is written as lam + log(1/2 + sqrt(1/4 + e^(-2 lam))), which cannot overflow (an adaptive
        # solver's first trial step may probe lambda far beyond T).
        small = torch.asinh(0.5 * torch.exp(torch.clamp(lam, max=0.0)))
        large = lam + torch.log(0.5 + torch.sqrt(0.25 + torch.exp(-2.0 * torch.clamp(lam, min=0.0))))
        return torch.where(lam > 0, large, small)

    def dlog_alpha_dlambda(self, lam: torch.Tensor) -> torch.Tensor:
        # lambda = log(1 - alpha^2) - log alpha, so d lambda / d log alpha = -(1 + alpha^2) / (1 - alpha^2).
        alpha, sigma = self.scale_and_std_at(lam)
        return -sigma / (1.0 + alpha**2)


SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE}  # the names trials.config.SDE_KINDS allows


def make_sde(cfg: SDEConfig) -> SDE:
    """The SDE a config's `sde` section describes."""
    return SDES[cfg.kind](cfg.beta_min, cfg.beta_max, cfg.T)


def time_at_neg_log_mean_coeff(c: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """The t >= 0 with -log alpha(t) = 1/4 t^2 (beta_max - beta_min) + 1/2 t beta_min = c >= 0.

    The positive root of a t^2 + b t - c, in the form 2c / (b + sqrt(b^2 + 4ac)): the textbook
    (-b + sqrt(b^2 + 4ac)) / 2a cancels catastrophically at small c (t ~ 1e-5), and this one also
    covers a = 0 (constant beta), where t = c / b.
    """
    a = 0.25 * (beta_max - beta_min)
    b = 0.5 * beta_min
    return 2.0 * c / (b + torch.sqrt(b * b + 4.0 * a * c))


@dataclass(frozen=True)
class FlowFrame:
    """The probability-flow ODE of `sde` in one frame: its clock tau and the velocity dx/dtau.

    frame "t":      tau = t,       dx/dtau = f x - 1/2 g^2 score (the probability-flow drift)
    frame "logsnr": tau = lambda,  dx/dtau = (d log alpha / d lambda) x - sigma^2 score(x, t(lambda))
                                   (for vp, -sigma^2 x - sigma^2 score)

    For the density, `velocity` also returns the part of dx/dtau whose divergence has to be estimated, and
    `closed_form_divergence(tau0, tau1, dims)` the integral of the rest's: in frame logsnr the linear part
    -sigma^2 x, D [log alpha(tau1) - log alpha(tau0)]; in frame t nothing is split off (its old way, kept
    as it was). Then log p(x at tau0) = log p(x at tau1) + integral of div(part) + closed_form_divergence.
    Clock values tau are 0-dim tensors (torchdiffeq keeps them in float64).
    """

    sde: SDE
    name: str = "logsnr"

    def __post_init__(self):
        if self.name not in FRAMES:
            raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {self.name!r}")

    def clock(self, t: float) -> float:
        """The frame's clock at SDE time t."""
        if self.name == "t":
            return float(t)
        return self.sde.log_noise_scale(torch.tensor(t, dtype=torch.float64)).item()

    def time(self, tau: torch.Tensor) -> torch.Tensor:
        """The SDE time t at clock value tau (float64)."""
        tau = tau.to(torch.float64)
        return tau if self.name == "t" else self.sde.time_at(tau)

    def velocity(
        self, score: ScoreFn, x: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx/dtau, its part whose divergence is not in closed form, the score) at clock tau.

        Differentiable in x; the score model sees t of shape (B,) in x's dtype.
        """
        t = self.time(tau)
        t_batch = t.to(x.dtype).expand(x.shape[0])
        score_value = score(x, t_batch)
        if self.name == "t":
            drift = self.sde.probability_flow_drift(x, t_batch, score_value)
            return drift, drift, score_value
        lam = tau.to(torch.float64)
        sigma2 = self.sde.scale_and_std_at(lam)[1].pow(2).to(x.dtype)
        linear = self.sde.dlog_alpha_dlambda(lam).to(x.dtype)
        # sigma eps_theta with eps_theta = -sigma score: one scalar factor, so a network's score_fn (which
        # divides its noise prediction by sigma) costs no more here than its raw output would.
        network = -sigma2 * score_value
        return network + linear * x, network, score_value

    def closed_form_divergence(self, tau0: float, tau1: float, dims: int) -> float:
        """Integral from tau0 to tau1 of the divergence of the part of dx/dtau that `velocity` splits off."""
        if self.name == "t":
            return 0.0
        log_alpha = self.sde.log_mean_coeff(self.time(torch.tensor([tau0, tau1], dtype=torch.float64)))
        return dims * (log_alpha[1] - log_alpha[0]).item()


def gaussian_marginal(sde: SDE, mean: torch.Tensor, std: torch.Tensor, t: torch.Tensor):
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


def gaussian_score(sde: SDE, mean: torch.Tensor, std: torch.Tensor):
    """The exact score function of p_t for N(mean, std^2) data: a drop-in for a trained network."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean_t, std_t = gaussian_marginal(sde, mean, std, t)
        return -(x - mean_t) / std_t**2

    return score


def gaussian_logp(sde: SDE, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
    """Exact log p_t(x) for N(mean, std^2) data, summed over all but the batch dimension."""
    mean_t, std_t = gaussian_marginal(sde, mean, std, t)
    logp = -0.5 * ((x - mean_t) / std_t) ** 2 - torch.log(std_t) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).sum(dim=1)
