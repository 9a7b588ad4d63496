"""Validation bits/dim by the probability-flow ODE: the number every trial is ranked by.

The probability-flow ODE of the VP SDE, dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t), moves samples so that
they keep the SDE's marginals p_t. Run forward from t = eps to T, it maps a data point x to a latent z, and
the instantaneous change of variables (Chen et al., 2018) gives

    log p_eps(x) = log p_T(z) + integral_eps^T div_x drift(x(t), t) dt,

where p_T is taken to be the prior N(0, I). So `log_likelihood` integrates the augmented state
(state, accumulated divergence) with a torchdiffeq solver; the divergence is a Hutchinson estimate
probe^T (d velocity / d state) probe from one vector-Jacobian product, so each function evaluation costs
one forward and one backward pass of the score model. An exact trace (one backward pass per dimension) is
there for tiny inputs, where the tests check the estimator against it.

The frame is a setting (`FidelityConfig.frame`, recorded with every score). "logsnr", the default,
integrates the same ODE in the clock lambda = log(sigma / alpha), where it reads
dx/dlambda = -sigma^2 x + sigma eps_theta and no term blows up as sigma -> 0; the linear part's divergence
integrates to D [log alpha(T) - log alpha(eps)] in closed form, leaving only sigma div_x eps_theta to
estimate (derivation in trials.sde). "t" integrates it as written above, in the SDE's time, where the drift is stiff
near eps: the old way, kept so that older scores can be reproduced. Both compute the same density, so a
score from either frame is comparable up to solver error; the logsnr frame reaches a given error with a
fraction of the function evaluations (bench/likelihood.py, docs/benchmarks.md).

In the logsnr frame the solver may also be a multistep one (`MULTISTEP_METHODS`, trials.odesolve): the
linear part is integrated exactly and the network's part from one evaluation per grid node, each reused by
the next steps; the divergence estimates at the same nodes are integrated by a quadrature, so a solve of
`steps` steps costs steps + 1 evaluations in all (bench/fidelity_bias.py measures it against rk4).

`LikelihoodEvaluator` is the shared yardstick of a tuning run. It is built once by the driver and holds a
fixed validation subset, fixed dequantization noise and fixed probes (common random numbers), so two trials'
scores differ only because their models differ. It never raises for a bad model: a score model that
returns NaN or inf, or an ODE that blows up, gives a `BPDResult` with failed=True, mean=inf and the reason.

Bits/dim of 8-bit images from the continuous density of uniformly dequantized data:
    BPD = -log p(x) / (D ln 2) + log2(256 / width of the data range),
the offset being 8 for data in [0, 1] and 7 for [-1, 1] (see `bpd_offset`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trials.config import ADAPTIVE_METHODS, FIXED_STEP_METHODS, ConfigError, EvalConfig, FidelityConfig
from trials.data import to_model_space
from trials.odesolve import (
    MULTISTEP_METHODS,
    ODEFailure,
    multistep_flow,
    multistep_grid,
    quadrature_weights,
    solve,
)
from trials.sde import SDE, FlowFrame, ScoreFn

# The uniform density on the data range scores exactly this many bits/dim in either scaling; a model
# that does worse than that has learned nothing (or diverged).
UNIFORM_BPD = 8.0

# Function evaluations allowed for one ODE solve. A healthy model needs a few hundred even at the accurate
# tolerance; a model that makes the ODE stiff would otherwise keep a trial busy for hours, shrinking its
# step size without ever failing.
DEFAULT_MAX_NFE = 5000

# |x| beyond which a non-finite score is blamed on the ODE state rather than on the model.
STATE_BLOWUP = 1e6


# ---- pure math ------------------------------------------------------------------------------------------
def bpd_offset(centered: bool) -> float:
    """log2(256 / width of the data range): 8 for pixels in [0, 1], 7 for [-1, 1].

    A pixel's 256 levels each own a bin of width 1/256 in [0, 1] (2/256 in [-1, 1]); the probability of
    a bin is about density * width, so -log2 P = -log2 p + log2(1 / width) per dimension.
    """
    data_range = 2.0 if centered else 1.0
    return math.log2(256.0 / data_range)


def bits_per_dim(logp: torch.Tensor, dims: int, centered: bool) -> torch.Tensor:
    """Bits/dim of the 8-bit images from the log-density (nats) of their dequantized continuous values."""
    return -logp / (dims * math.log(2.0)) + bpd_offset(centered)


def draw_probes(shape: tuple[int, ...], estimator: str, generator: torch.Generator) -> torch.Tensor | None:
    """Hutchinson probes with E[v v^T] = I: Rademacher (+-1) or standard normal; None for the exact trace."""
    if estimator == "exact":
        return None
    if estimator == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).float() * 2.0 - 1.0
    if estimator == "gaussian":
        return torch.randn(shape, generator=generator)
    raise ValueError(f"estimator must be 'rademacher', 'gaussian' or 'exact', got {estimator!r}")


class _AugmentedDynamics:
    """d/dtau (x, delta_logp) = (velocity, div part) of the probability-flow ODE in `frame`.

    `part` is the velocity less what the frame integrates in closed form (trials.sde.FlowFrame: in frame
    logsnr, the network's sigma eps_theta; in frame t, the whole drift). The velocity and that divergence
    come from one forward pass: the velocity is computed with x requiring grad, and one vector-Jacobian
    product of that same graph gives probe^T J probe (or, without probes, one per dimension gives the
    exact trace). Outputs are detached so that no graph outlives the evaluation. Counts evaluations in `nfe`.
    """

    def __init__(self, score: ScoreFn, frame: FlowFrame, probes: torch.Tensor | None, max_nfe: int | None):
        self.score = score
        self.frame = frame
        self.probes = probes
        self.max_nfe = max_nfe
        self.nfe = 0

    def __call__(self, tau: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        velocity, _, div = self.evaluate(tau, state[0])
        return velocity, div

    def evaluate(self, tau: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(velocity, its part whose divergence is estimated, that divergence) at clock tau, detached."""
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise ODEFailure(
                f"ODE needed more than {self.max_nfe} function evaluations (stiff or diverged "
                f"model), stopped at t={self.frame.time(tau).item():.4g}",
                self.nfe,
            )
        self.nfe += 1
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            velocity, part, score = self.frame.velocity(self.score, x, tau)
            div = self._divergence(part, x)
        # One host sync per evaluation; the solver makes one per step anyway to accept or reject it.
        if not bool(torch.isfinite(score).all() & torch.isfinite(div).all()):
            raise ODEFailure(f"{self._diagnose(x, score)} at t={self.frame.time(tau).item():.4g}", self.nfe)
        return velocity.detach(), part.detach(), div.detach()

    @staticmethod
    def _diagnose(x: torch.Tensor, score: torch.Tensor) -> str:
        if not torch.isfinite(x).all():
            return "the ODE state blew up (x is NaN/inf)"
        # Data and prior live within a few units of 0; a score that overflowed on an x far beyond that was
        # handed a state that had already blown up.
        if x.abs().max() > STATE_BLOWUP:
            return f"the ODE state blew up (|x| reached {x.abs().max().item():.3g})"
        if not torch.isfinite(score).all():
            return "the score model returned NaN/inf"
        return "the divergence is NaN/inf"

    def _divergence(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not velocity.requires_grad:  # a score that ignores x (the zero score of the tests)
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.probes is not None:
            (vjp,) = torch.autograd.grad((velocity * self.probes).sum(), x)
            return (vjp * self.probes).flatten(1).sum(dim=1)
        # Exact trace: the gradient of output i is row i of the Jacobian, whose entry i is J_ii. Summing
        # output i over the batch gets every image's row at once, as images do not interact. D backward
        # passes: tiny inputs only.
        flat = velocity.flatten(1)
        dims = flat.shape[1]
        trace = torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
        for i in range(dims):
            (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < dims - 1)
            trace = trace + row.flatten(1)[:, i]
        return trace


def log_likelihood(
    score: ScoreFn,
    sde: SDE,
    x: torch.Tensor,
    eps: float,
    *,
    probes: torch.Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    frame: str = "logsnr",
    steps: int = 0,
    max_nfe: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Log-density at x of the model defined by the probability-flow ODE, with its latent and the NFE.

    Precisely: the density at time eps of the distribution obtained by taking N(0, I) at time T and
    transporting it backwards to eps along the probability-flow ODE of `score`,

        logp = log N(z; 0, I) + integral_eps^T div drift(x(t), t) dt,   z = x(T), x(eps) = x,

    per image (summed over all dimensions, in nats, for the continuous x as given). With the true score of
    the data it is log p_eps(x) up to the prior mismatch log N(z; 0, I) - log p_T(z).

    `frame` "logsnr" integrates the same ODE in the clock lambda = log(sigma / alpha), adding the linear
    part's D [log alpha(T) - log alpha(eps)] in closed form so that only the network's divergence is
    estimated (trials.sde); "t" integrates it as written above. Both give the same number up to solver
    error; logsnr needs far fewer evaluations.
    `method` is an adaptive torchdiffeq method (rtol/atol), a fixed-step one (`steps` equal steps in the
    frame's clock; see trials.odesolve) or a multistep one of MULTISTEP_METHODS (frame logsnr, `steps`
    steps, steps + 1 evaluations; see `_multistep_solve`).

    `score(x, t)` is any callable with t of shape (B,); put a network in eval mode first (dropout would
    make the ODE random). `probes` (same shape as x, fixed over the solve) select the Hutchinson estimate
    of the divergence; None gives the exact trace (D backward passes per evaluation: tiny inputs only).
    The solve runs on x's device and dtype. Returns (logp (B,), z (B, ...), nfe); raises `ODEFailure`
    when the score or the state becomes non-finite, the solver gives up, or `max_nfe` is exceeded.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("log_likelihood needs autograd for the divergence: call it outside torch.inference_mode()")
    if probes is not None and probes.shape != x.shape:
        raise ValueError(f"probes have shape {tuple(probes.shape)}, expected the shape of x {tuple(x.shape)}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps}")
    if method not in MULTISTEP_METHODS and method not in ADAPTIVE_METHODS + FIXED_STEP_METHODS:
        raise ValueError(
            f"method must be one of {', '.join(ADAPTIVE_METHODS + FIXED_STEP_METHODS)} or "
            f"{', '.join(MULTISTEP_METHODS)}, got {method!r}"
        )
    flow = FlowFrame(sde, frame)
    dynamics = _AugmentedDynamics(score, flow, None if probes is None else probes.to(x), max_nfe)
    tau0, tau1 = flow.clock(eps), flow.clock(sde.T)
    # The state is a tuple, so torchdiffeq's error norm is the larger of the RMS errors of the state and of
    # delta_logp: the log-density gets a tolerance of its own instead of being one entry in D + 1 of a flat
    # state, as in score_sde's scipy solve. On a trained MNIST model at rtol = atol = 1e-3 that costs ~25%
    # more evaluations for a 6x smaller bits/dim error (bench/likelihood.py, docs/benchmarks.md).
    with torch.no_grad():
        if method in MULTISTEP_METHODS:
            z, delta_logp = _multistep_solve(dynamics, flow, x.detach(), tau0, tau1, steps, **MULTISTEP_METHODS[method])
        else:
            state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
            z, delta_logp = solve(dynamics, state0, tau0, tau1, method=method, rtol=rtol, atol=atol, steps=steps)
    logp = sde.prior_logp(z) + delta_logp + flow.closed_form_divergence(tau0, tau1, x[0].numel())
    if not torch.isfinite(logp).all():
        raise ODEFailure(
            f"non-finite log-likelihood after the ODE ({dynamics.nfe} evaluations): the state blew up", dynamics.nfe
        )
    return logp, z, dynamics.nfe


def _multistep_solve(
    dynamics: _AugmentedDynamics,
    flow: FlowFrame,
    x: torch.Tensor,
    tau0: float,
    tau1: float,
    steps: int,
    *,
    order: int,
    prediction: str = "noise",
    corrector: bool = True,
    quadrature: int = 4,
    warp: float = 0.0,
    ramp: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, integral of the estimated divergence) by trials.odesolve.exponential_multistep on `steps` steps.

    steps + 1 evaluations, at the nodes 0..steps: each gives the network's output for the state update and
    the divergence there; the divergence integral is a quadrature of `quadrature` points per interval over
    those nodes (it does not feed back into the state, so the rule may look ahead).
    """
    grid = multistep_grid(tau0, tau1, steps, warp, ramp)
    weights = quadrature_weights(grid, quadrature)
    delta_logp = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)

    def part_at(i: int, lam: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        nonlocal delta_logp
        _, part, div = dynamics.evaluate(lam, state)
        delta_logp = delta_logp + float(weights[i]) * div.double()
        return part

    z = multistep_flow(flow, part_at, x, grid, order=order, prediction=prediction, corrector=corrector)
    return z, delta_logp.to(x.dtype)


# ---- the shared evaluator -------------------------------------------------------------------------------
@dataclass
class BPDResult:
    """One validation score with how it was obtained.

    mean/stderr/per_image are bits/dim; nfe is the total number of function evaluations over all ODE solves
    (each solve covers up to eval.batch_size images); seconds is wall time. `fidelity` records the settings
    (name, n_images, rtol, atol, method, estimator, eps, batch_size, seed, frame, steps); a score without
    "frame" (written before it existed) was computed in frame "t". A failed score has mean = inf
    and the reason; `flagged` marks a mean above 8 bits/dim (worse than uniform noise: a broken or diverged
    model), with the reason saying so. reason is None for a healthy score.
    """

    mean: float
    stderr: float
    per_image: list[float]
    nfe: int
    seconds: float
    fidelity: dict[str, Any]
    failed: bool = False
    reason: str | None = None
    flagged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LikelihoodEvaluator:
    """Fixed validation images, dequantization noise and probes, scored at a 'fast' or 'accurate' fidelity.

    Only CPU tensors inside (a few MB for 500 MNIST images), so it pickles cheaply into Ray's object store
    and moves to the model's device at scoring time. The fast fidelity scores the first fast.n_images of
    the accurate subset, with the same noise and probes.
    """

    def __init__(
        self,
        x: torch.Tensor,
        probes: torch.Tensor | None,
        indices: torch.Tensor,
        cfg: EvalConfig,
        centered: bool,
        max_nfe: int | None = DEFAULT_MAX_NFE,
    ):
        self.x = x  # (N, C, H, W) dequantized validation images in model space
        self.probes = probes  # same shape, or None for the exact trace
        self.indices = indices  # which validation images, in order
        self.cfg = cfg
        self.centered = centered
        self.max_nfe = max_nfe

    @classmethod
    def build(
        cls, val_images_uint8: torch.Tensor, cfg: EvalConfig, centered: bool, *, max_nfe: int | None = DEFAULT_MAX_NFE
    ) -> LikelihoodEvaluator:
        """Draw the subset, the dequantization noise and the probes from cfg.seed (same seed, same evaluator)."""
        if val_images_uint8.dtype != torch.uint8 or val_images_uint8.dim() != 4:
            raise ValueError(
                f"validation images must be uint8 (N, C, H, W), got {val_images_uint8.dtype} "
                f"{tuple(val_images_uint8.shape)}"
            )
        n = cfg.accurate.n_images  # EvalConfig.check keeps fast.n_images <= this
        if n > len(val_images_uint8):
            raise ConfigError(f"eval.accurate.n_images: {n} is more than the {len(val_images_uint8)} validation images")
        gen = torch.Generator().manual_seed(cfg.seed)
        indices = torch.randperm(len(val_images_uint8), generator=gen)[:n]
        images = val_images_uint8[indices].cpu()
        noise = torch.rand(images.shape, generator=gen)
        x = to_model_space(images, noise, centered)
        probes = draw_probes(tuple(x.shape), cfg.estimator, gen)
        return cls(x, probes, indices, cfg, centered, max_nfe)

    def fidelity_config(self, fidelity: str) -> FidelityConfig:
        if fidelity == "fast":
            return self.cfg.fast
        if fidelity == "accurate":
            return self.cfg.accurate
        raise ValueError(f"fidelity must be 'fast' or 'accurate', got {fidelity!r}")

    def evaluate(
        self,
        score: ScoreFn,
        sde: SDE,
        eps: float,
        fidelity: str = "fast",
        device: torch.device | str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BPDResult:
        """Bits/dim of `score` (a model in eval mode) on the fixed images; never raises for a bad model.

        eps is the trial's sampling_eps, the lower end of the ODE. Images go through the ODE in chunks of
        eval.batch_size on `device` (default CPU), which must be where the score model lives. Errors that
        are not the model's numbers (a wrong device or shape, out of memory) are bugs and do propagate.
        `progress(images done, n_images)` is called after each chunk.
        """
        fid = self.fidelity_config(fidelity)
        settings = {
            "name": fidelity,
            "n_images": fid.n_images,
            "rtol": fid.rtol,
            "atol": fid.atol,
            "method": fid.method,
            "estimator": self.cfg.estimator,
            "eps": eps,
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "frame": fid.frame,
            "steps": fid.steps,
        }
        device = torch.device(device) if device is not None else torch.device("cpu")
        dims = self.x[0].numel()
        per_image: list[float] = []
        nfe = 0
        start = time.perf_counter()
        for lo in range(0, fid.n_images, self.cfg.batch_size):
            hi = min(lo + self.cfg.batch_size, fid.n_images)
            x = self.x[lo:hi].to(device)
            probes = None if self.probes is None else self.probes[lo:hi].to(device)
            try:
                logp, _, chunk_nfe = log_likelihood(
                    score,
                    sde,
                    x,
                    eps,
                    probes=probes,
                    rtol=fid.rtol,
                    atol=fid.atol,
                    method=fid.method,
                    frame=fid.frame,
                    steps=fid.steps,
                    max_nfe=self.max_nfe,
                )
            except ODEFailure as exc:
                return BPDResult(
                    mean=math.inf,
                    stderr=math.nan,
                    per_image=[],
                    nfe=nfe + exc.nfe,
                    seconds=time.perf_counter() - start,
                    fidelity=settings,
                    failed=True,
                    reason=f"images {lo}-{hi - 1}: {exc}",
                    flagged=True,
                )
            nfe += chunk_nfe
            per_image.extend(bits_per_dim(logp, dims, self.centered).double().cpu().tolist())
            if progress is not None:
                progress(hi, fid.n_images)
        values = torch.tensor(per_image, dtype=torch.float64)
        mean = values.mean().item()
        stderr = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
        flagged = mean > UNIFORM_BPD
        reason = (
            f"mean {mean:.3f} bits/dim is worse than uniform noise ({UNIFORM_BPD:g}): broken or diverged model"
            if flagged
            else None
        )
        return BPDResult(
            mean=mean,
            stderr=stderr,
            per_image=per_image,
            nfe=nfe,
            seconds=time.perf_counter() - start,
            fidelity=settings,
            flagged=flagged,
            reason=reason,
        )
