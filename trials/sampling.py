"""Drawing images from a score model: the reverse-SDE predictor-corrector and the probability-flow ODE.

Both samplers start from the prior N(0, I) at t = T and run time backwards to t = eps (Song et al., 2021):

  pc_sample   Euler-Maruyama steps of the reverse SDE  dx = [f(x, t) - g(t)^2 score(x, t)] dt + g(t) dw_bar
              (the predictor), each preceded by Langevin MCMC steps that pull x towards p_t (the corrector).
  ode_sample  the probability-flow ODE  dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t), integrated by an adaptive
              torchdiffeq solver (by default in the logsnr frame of trials.sde) and ended with a denoising
              step; deterministic given the prior draw, and it reports its function evaluations.

`score(x, t)` is any callable with t of shape (B,): a network wrapped by `trials.model.score_fn` (put it
in eval mode first), or the closed-form `trials.sde.gaussian_score` that the tests use. The functions here
are pure: no files, no global state; randomness comes only from the `generator` passed in.

Run as a script to sample from a checkpoint written by trials.trainer:
    python -m trials.sampling --checkpoint ckpt.pt --sampler pc|ode --n 64 --out grid.png [--steps N]
"""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from trials.cli import first_line
from trials.odesolve import ODEFailure, solve
from trials.sde import SDE, make_sde, FlowFrame, ScoreFn, per_sample


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ---- reverse SDE: predictor and corrector ----------------------------------------------------------------
def euler_maruyama_step(score: ScoreFn, sde: SDE, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, *,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def langevin_correct(score: ScoreFn, x: torch.Tensor, t: torch.Tensor, *, snr: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One unadjusted Langevin step x + step * score(x, t) + sqrt(2 step) z, which leaves p_t nearly invariant."""
    score_value = score(x, t)
    noise = _noise_like(x, generator)
    step = langevin_step_size(score_value, noise, snr)
    return x + step * score_value + torch.sqrt(2.0 * step) * noise


@torch.no_grad()
def pc_sample(score: ScoreFn, sde: SDE, shape: tuple[int, ...], *, eps: float, steps: int,
              corrector_steps: int = 1, snr: float = 0.16, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", denoise: bool = True,
              progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
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
def ode_sample(score: ScoreFn, sde: SDE, shape: tuple[int, ...], *, eps: float, rtol: float = 1e-5,
               atol: float = 1e-5, method: str = "dopri5", frame: str = "logsnr", denoise: bool = True,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE from a prior draw at T back to eps; returns (x, nfe).

    `frame` "logsnr" integrates dx/dlambda = -sigma^2 x + sigma eps_theta in lambda = log(sigma / alpha)
    (trials.sde), "t" the ODE in the SDE's time; `method` is an adaptive torchdiffeq solver (dopri5, bosh3, ...), whose error
    control is over the whole batch, so all images share the step sizes. With `denoise` the result is the
    posterior mean E[x_0 | x_eps] = (x_eps + sigma^2 score) / alpha, one more score evaluation: what is left
    of the noise at eps (and of an under-trained score's errors) would otherwise speckle the images.
    nfe counts every score evaluation, rejected steps and the denoising one included: it is the cost of
    the sample. Raises trials.odesolve.ODEFailure when the solver gives up.
    """
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps}")
    x_T = sde.prior_sample(shape, generator=generator, device=device)
    flow = FlowFrame(sde, frame)
    field = _ProbabilityFlow(score, flow)
    tau_T, tau_eps = flow.clock(sde.T), flow.clock(eps)
    # An adaptive solver steps past its end point and interpolates back; past eps frame t would evaluate the
    # SDE at t < 0, where sigma(t) is not real. land_on_end makes the last step end exactly on eps instead.
    x = solve(field, x_T, tau_T, tau_eps, method=method, rtol=rtol, atol=atol, land_on_end=True)
    if denoise:
        t = torch.full((shape[0],), eps, dtype=x.dtype, device=x.device)
        x = sde.denoise(x, t, score(x, t))
        field.nfe += 1
    return x, field.nfe


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
def main(argv: list[str] | None = None) -> int:
    # Imported here: the samplers above need neither the network nor the trainer.
    from trials.cli import OneLineArgumentParser, positive_int
    from trials.model import score_fn
    from trials.trainer import eval_model_from_checkpoint, load_checkpoint, resolve_device

    parser = OneLineArgumentParser(prog="python -m trials.sampling",
                                    description="Sample an image grid from a trials.trainer checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by trials.trainer")
    parser.add_argument("--sampler", choices=("pc", "ode"), default="pc")
    parser.add_argument("--n", type=positive_int, default=None, help="images (default: sample.n_images)")
    parser.add_argument("--out", required=True, help="PNG file for the grid")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="PC predictor steps (default: sample.pc_steps)")
    parser.add_argument("--seed", type=int, default=None, help="default: sample.seed")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:N'")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    path = Path(args.checkpoint)
    if args.steps is not None and args.sampler == "ode":
        return fail("--steps applies to --sampler pc; the ODE solver chooses its own steps")
    if not path.is_file():
        return fail(f"checkpoint not found: {path}")
    if not Path(args.out).parent.is_dir():
        return fail(f"output folder does not exist: {Path(args.out).parent}")
    if not (args.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", args.device)):
        return fail(f"--device: must be 'auto', 'cpu' or 'cuda[:N]', got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail(f"--device {args.device}: CUDA is not available on this machine")
    device = resolve_device(args.device)
    try:
        ckpt = load_checkpoint(path, map_location=device)
        cfg, model = eval_model_from_checkpoint(ckpt, device)
    except Exception as exc:  # unpickling, missing keys, mismatched weights: all mean "not our checkpoint"
        return fail(f"{path} is not a trials.trainer checkpoint ({type(exc).__name__}: {first_line(exc)})")

    sde = make_sde(cfg.sde)
    sc = cfg.sample
    n = args.n if args.n is not None else sc.n_images
    generator = torch.Generator(device=device).manual_seed(sc.seed if args.seed is None else args.seed)
    shape = cfg.dataset.batch_shape(n)
    score = score_fn(model, sde)
    start = time.perf_counter()
    if args.sampler == "pc":
        steps = args.steps if args.steps is not None else sc.pc_steps
        x = pc_sample(score, sde, shape, eps=cfg.sde.sampling_eps, steps=steps,
                      corrector_steps=sc.corrector_steps, snr=sc.snr, generator=generator, device=device)
        cost = f"{steps} steps x (1 + {sc.corrector_steps} corrector) = {steps * (1 + sc.corrector_steps)} score evaluations"
    else:
        try:
            x, nfe = ode_sample(score, sde, shape, eps=cfg.sde.sampling_eps, rtol=sc.ode_rtol, atol=sc.ode_atol,
                                method=sc.ode_method, frame=sc.ode_frame, generator=generator, device=device)
        except ODEFailure as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 1
        cost = (f"{nfe} function evaluations ({sc.ode_frame} {sc.ode_method}, rtol {sc.ode_rtol:g}, "
                f"atol {sc.ode_atol:g})")
    seconds = time.perf_counter() - start
    save_grid(x, args.out, cfg.data.centered)
    print(f"{args.sampler}: {n} images, {cost}, {seconds:.1f} s ({seconds / n:.3f} s/image) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
