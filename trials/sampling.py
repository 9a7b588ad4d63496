"""Drawing images from a score model: the reverse-SDE predictor-corrector and the probability-flow ODE.

Both samplers start from the prior N(0, I) at t = T and run time backwards to t = eps (Song et al., 2021):

  pc_sample   Euler-Maruyama steps of the reverse SDE  dx = [f(x, t) - g(t)^2 score(x, t)] dt + g(t) dw_bar
              (the predictor), each preceded by Langevin MCMC steps that pull x towards p_t (the corrector).
  ode_sample  the probability-flow ODE  dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t), integrated by an adaptive
              torchdiffeq solver (by default in the logsnr frame of trials.sde) or by the exponential
              multistep solver of the logsnr frame on a fixed number of steps (trials.odesolve), and ended
              with a denoising step; deterministic given the prior draw, and it reports its evaluations.

`score(x, t)` is any callable with t of shape (B,): a network wrapped by `trials.model.score_fn` (put it
in eval mode first), or the closed-form `trials.sde.gaussian_score` that the tests use. The functions here
are pure: no files, no global state; randomness comes only from the `generator` passed in.

`IMAGE_SAMPLERS` gives both one shape (`Sampler.draw` -> `Samples`), with settings from a SampleConfig; the
full run, the report's preview and `python sample.py` (a checkpoint to a grid) draw through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trials.config import SampleConfig
from trials.odesolve import MULTISTEP_METHODS, multistep_flow, multistep_grid, solve
from trials.progress import Progress
from trials.sde import SDE, FlowFrame, ScoreFn, per_sample


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ---- reverse SDE: predictor and corrector ----------------------------------------------------------------
def euler_maruyama_step(
    score: ScoreFn,
    sde: SDE,
    x: torch.Tensor,
    t: torch.Tensor,
    dt: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler-Maruyama step of the reverse SDE from time t to t - dt (dt > 0).

    Returns (x_next, x_next_mean): the sample, and the same step without its noise, which the last step of
    a sampler returns as the denoised image.
    """
    x_mean = x - sde.reverse_drift(x, t, score(x, t)) * dt
    g = per_sample(sde.diffusion(t), x)
    x_next = x_mean + g * torch.sqrt(dt) * _noise_like(x, generator)
    return x_next, x_mean


def langevin_step_size(score_value: torch.Tensor, noise: torch.Tensor, snr: float) -> torch.Tensor:
    """Step size 2 (snr ||z|| / ||score||)^2 of a Langevin step, with the norms averaged over the batch.

    The rule (score_sde's LangevinCorrector) makes the drift step `step * score` about `snr` times as long
    as the noise step sqrt(2 step) z. Two choices, both checked on Gaussian data in tests/test_sampling.py:

    * Batch-averaged norms, as score_sde does, not a step per sample. A per-sample step depends on the
      sample's own position: near the mode ||score|| is small, so the step and its noise kick are large,
      which pushes samples outwards. For a D-dimensional Gaussian that inflates the variance the chain
      settles at by at least D / (D - 2) (we measured +26% at D = 16 and +9% at D = 64 with snr = 0.16).
      With the norms averaged over the batch the step is, up to O(1/B), the same for every sample, and a
      fixed-step Langevin chain keeps a Gaussian's mean exact and inflates its variance only by
      1 / (1 - snr^2) (+2.6% at snr = 0.16). The price: a sample depends weakly on its batch-mates.
    * No DDPM factor alpha_i = 1 - beta_i (score_sde multiplies the step by it for the VP SDE). It exists
      to match DDPM's N = 1000 discrete noise levels; the continuous VP SDE sampled on any grid has no
      such level, and for N = 1000 the factor differs from 1 by at most beta_max / N = 2%, well inside
      the slack of the snr heuristic itself.
    """
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    score_norm = score_value.flatten(1).norm(dim=1).mean()
    return 2.0 * (snr * noise_norm / score_norm) ** 2


def langevin_correct(
    score: ScoreFn, x: torch.Tensor, t: torch.Tensor, *, snr: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One unadjusted Langevin step x + step * score(x, t) + sqrt(2 step) z, which leaves p_t nearly invariant."""
    score_value = score(x, t)
    noise = _noise_like(x, generator)
    step = langevin_step_size(score_value, noise, snr)
    return x + step * score_value + torch.sqrt(2.0 * step) * noise


@torch.no_grad()
def pc_sample(
    score: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    eps: float,
    steps: int,
    corrector_steps: int = 1,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    denoise: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Predictor-corrector sampling of the reverse SDE on a uniform grid of `steps` steps from T to eps.

    At each grid time t_i (T = t_0 > ... > t_steps = eps) the corrector takes `corrector_steps` Langevin
    steps towards p_{t_i}, then the predictor takes one Euler-Maruyama step to t_{i+1}; the order is
    score_sde's, so the final step ends exactly at eps. With `denoise` the final step's noise is left out
    and its mean returned (score_sde's `denoise=True`): the noise added at t ~ eps is far below the 8-bit
    quantisation and only makes the images grainy. Costs steps * (1 + corrector_steps) score evaluations.
    `progress(i, steps)` is called after each predictor step. Returns a tensor of `shape` on `device`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps}")
    x = sde.prior_sample(shape, generator=generator, device=device)
    times = torch.linspace(sde.T, eps, steps + 1, device=device, dtype=x.dtype)
    batch = shape[0]
    x_mean = x
    for i in range(steps):
        t = times[i].repeat(batch)
        for _ in range(corrector_steps):
            x = langevin_correct(score, x, t, snr=snr, generator=generator)
        x, x_mean = euler_maruyama_step(score, sde, x, t, times[i] - times[i + 1], generator=generator)
        if progress is not None:
            progress(i + 1, steps)
    return x_mean if denoise else x


# ---- probability-flow ODE ----------------------------------------------------------------------------------
class _ProbabilityFlow:
    """The probability-flow ODE's dx/dtau in `frame` for torchdiffeq, counting its evaluations."""

    def __init__(self, score: ScoreFn, frame: FlowFrame):
        self.score = score
        self.frame = frame
        self.nfe = 0

    def __call__(self, tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.frame.velocity(self.score, x, tau)[0]


@torch.no_grad()
def ode_sample(
    score: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    eps: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    frame: str = "logsnr",
    steps: int = 0,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE from a prior draw at T back to eps; returns (x, nfe).

    `frame` "logsnr" integrates dx/dlambda = -sigma^2 x + sigma eps_theta in lambda = log(sigma / alpha)
    (trials.sde), "t" the ODE in the SDE's time. `method` is an adaptive torchdiffeq solver (dopri5, bosh3,
    ...), whose error control is over the whole batch, so all images share the step sizes; or a multistep
    one (frame logsnr only), which takes `steps` steps for steps + 1 evaluations, whatever the model.
    With `denoise` the result is the posterior mean E[x_0 | x_eps] = (x_eps + sigma^2 score) / alpha, one
    more score evaluation: what is left of the noise at eps (and of an under-trained score's errors) would
    otherwise speckle the images.
    nfe counts every score evaluation, rejected steps and the denoising one included: it is the cost of
    the sample. Raises trials.odesolve.ODEFailure when the solver gives up.
    """
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps}")
    x_T = sde.prior_sample(shape, generator=generator, device=device)
    flow = FlowFrame(sde, frame)
    field = _ProbabilityFlow(score, flow)
    tau_T, tau_eps = flow.clock(sde.T), flow.clock(eps)
    if method in MULTISTEP_METHODS:
        x = _multistep_sample(field, x_T, tau_eps, tau_T, steps, **MULTISTEP_METHODS[method])
    else:
        # An adaptive solver steps past its end point and interpolates back; past eps frame t would evaluate
        # the SDE at t < 0, where sigma(t) is not real. land_on_end makes the last step end exactly on eps.
        x = solve(field, x_T, tau_T, tau_eps, method=method, rtol=rtol, atol=atol, land_on_end=True)
    if denoise:
        t = torch.full((shape[0],), eps, dtype=x.dtype, device=x.device)
        x = sde.denoise(x, t, score(x, t))
        field.nfe += 1
    return x, field.nfe


def _multistep_sample(
    field: _ProbabilityFlow,
    x_T: torch.Tensor,
    tau_eps: float,
    tau_T: float,
    steps: int,
    *,
    order: int,
    corrector: bool = True,
    prediction: str = "noise",
    warp: float = 0.0,
    ramp: int = 0,
    **_likelihood_only: Any,
) -> torch.Tensor:
    """x at eps by trials.odesolve.multistep_flow: the likelihood's grid, run from T to eps."""
    grid = multistep_grid(tau_eps, tau_T, steps, warp, ramp)[::-1].copy()

    def part_at(i: int, lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        field.nfe += 1
        return field.frame.velocity(field.score, x, lam)[1]

    return multistep_flow(field.frame, part_at, x_T, grid, order=order, prediction=prediction, corrector=corrector)


# ---- one shape for every sampler ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Samples:
    x: torch.Tensor  # the images, in model space
    nfe: int  # score evaluations spent


@dataclass(frozen=True)
class Sampler:
    """A sampler as the full run, the report preview and sample.py use it.

    `draw(score, sde, shape, *, eps, sample, generator, device, report)` takes its settings from a
    SampleConfig and sends a progress line with the time left to `report` (when given) at most every
    `every` seconds; `settings(sample)` is what is recorded beside the images. It raises
    trials.odesolve.ODEFailure when an ODE cannot be solved.
    """

    name: str
    about: str
    draw: Callable[..., Samples]
    settings: Callable[[SampleConfig], dict[str, Any]]
    # The SampleConfig field `sample.py --steps` sets, or None for a sampler that chooses its own steps.
    steps_setting: str | None


class ScoreProgress:
    """Wraps a score function to report how far a probability-flow solve from T down to eps has come.

    Progress is measured in the solve's clock lambda = log(sigma / alpha), where adaptive steps are roughly
    even (trials.sde). Every `every` seconds it calls `report` with a Progress line: the share of lambda
    covered, the score evaluations so far, and the time left.
    """

    def __init__(
        self, score: ScoreFn, sde: SDE, eps: float, label: str, report: Callable[[str], None], every: float = 5.0
    ):
        self.score, self.sde, self.report = score, sde, report
        self.lam_T, self.lam_eps = (self._lam(v) for v in (sde.T, eps))
        self.progress = Progress(label, 1.0, every=every)
        self.calls = 0

    def _lam(self, t: float) -> float:
        return self.sde.log_noise_scale(torch.tensor(t, dtype=torch.float64)).item()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.progress.due():
            t_now = float(t.reshape(-1)[0])
            share = min(max((self.lam_T - self._lam(t_now)) / (self.lam_T - self.lam_eps), 1e-6), 1.0)
            self.report(self.progress.line(share, f"t = {t_now:.3g}, {self.calls} score evaluations"))
        return self.score(x, t)


def draw_pc(
    score: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    eps: float,
    sample: SampleConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    report: Callable[[str], None] | None = None,
    every: float = 10.0,
) -> Samples:
    progress = Progress("  PC sampling", sample.pc_steps, every=every)

    def step_done(step: int, steps: int) -> None:
        if report is not None and step < steps and progress.due():
            report(progress.line(step, "predictor steps"))

    x = pc_sample(
        score,
        sde,
        shape,
        eps=eps,
        steps=sample.pc_steps,
        corrector_steps=sample.corrector_steps,
        snr=sample.snr,
        generator=generator,
        device=device,
        progress=step_done,
    )
    return Samples(x, sample.pc_steps * (1 + sample.corrector_steps))


def draw_ode(
    score: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    eps: float,
    sample: SampleConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    report: Callable[[str], None] | None = None,
    every: float = 10.0,
) -> Samples:
    if report is not None:
        score = ScoreProgress(score, sde, eps, "  ODE sampling", report, every=every)
    x, nfe = ode_sample(
        score,
        sde,
        shape,
        eps=eps,
        rtol=sample.ode_rtol,
        atol=sample.ode_atol,
        method=sample.ode_method,
        frame=sample.ode_frame,
        steps=sample.ode_steps,
        generator=generator,
        device=device,
    )
    return Samples(x, nfe)


def _ode_settings(sc: SampleConfig) -> dict[str, Any]:
    how = {"steps": sc.ode_steps} if sc.ode_method in MULTISTEP_METHODS else {"rtol": sc.ode_rtol, "atol": sc.ode_atol}
    return {**how, "method": sc.ode_method, "frame": sc.ode_frame, "denoise": True}


IMAGE_SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler(
            "pc",
            "reverse-SDE predictor-corrector (Euler-Maruyama + Langevin), denoised last step",
            draw_pc,
            lambda sc: {"steps": sc.pc_steps, "corrector_steps": sc.corrector_steps, "snr": sc.snr},
            "pc_steps",
        ),
        Sampler(
            "ode",
            "probability-flow ODE (adaptive or multistep solver, logsnr frame by default) + a denoising step",
            draw_ode,
            _ode_settings,
            None,  # an adaptive solver picks its steps; a multistep one's are `ode_steps`, in the settings
        ),
    )
}


# ---- images --------------------------------------------------------------------------------------------------
def to_image_range(x: torch.Tensor, centered: bool) -> torch.Tensor:
    """Model space ([0, 1], or [-1, 1] when centered) to pixel intensities in [0, 1], clamped."""
    pixels = (x + 1.0) / 2.0 if centered else x
    return pixels.clamp(0.0, 1.0)


def save_grid(x: torch.Tensor, path: str | Path, centered: bool, nrow: int | None = None) -> None:
    """Write a batch (B, C, H, W) in model space as one PNG grid, `nrow` images per row (default ~sqrt(B))."""
    from torchvision.utils import save_image  # here: importing torchvision costs ~1.5 s at start-up

    if nrow is None:
        nrow = math.ceil(math.sqrt(x.shape[0]))
    save_image(to_image_range(x.detach().float().cpu(), centered), Path(path), nrow=nrow)


# ---- command line --------------------------------------------------------------------------------------------
