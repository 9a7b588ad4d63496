"""One torchdiffeq solve from clock value tau0 to tau1, adaptive or on a fixed grid, failing in one way.

The likelihood evaluator and the ODE sampler both integrate the probability-flow ODE through `solve`:

  * an adaptive method (dopri5, bosh3, ...) chooses its own steps to meet rtol/atol;
  * a fixed-step method (midpoint, heun3, rk4, ...) takes `steps` equal steps in the clock, so its cost is
    known in advance (steps x stages evaluations) and does not depend on the model. That only makes sense
    in a clock where equal steps are equally hard, which is the logsnr frame's (see trials.sde).

`exponential_multistep` (below) is the third kind, for the logsnr frame only: it uses the frame's structure
(a linear part with a known flow) where torchdiffeq's methods see a generic right-hand side.

torchdiffeq signals a solve it cannot finish ("underflow in dt", non-finite values, too many steps) with
a bare AssertionError; `solve` turns that into `ODEFailure` with the evaluations spent, so callers catch
one exception type with a readable message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torchdiffeq import odeint

from trials.cli import first_line
from trials.config import ADAPTIVE_METHODS, FIXED_STEP_METHODS

if TYPE_CHECKING:
    from trials.sde import FlowFrame


class ODEFailure(RuntimeError):
    """The ODE could not be solved to a finite answer; the message says why."""

    def __init__(self, message: str, nfe: int):
        super().__init__(message)
        self.nfe = nfe  # function evaluations spent before giving up


class CountingField(Protocol):
    """A torchdiffeq right-hand side f(tau, state) that counts its evaluations in `nfe`."""

    nfe: int

    def __call__(self, tau: torch.Tensor, state): ...


def solve(
    field: CountingField,
    state0,
    tau0: float,
    tau1: float,
    *,
    method: str,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 0,
    land_on_end: bool = False,
):
    """The state at tau1 of d state/dtau = field(tau, state) from state0 at tau0 (state: tensor or tuple).

    Adaptive methods use rtol/atol (for a tuple state, torchdiffeq's error norm is the largest of the
    components' RMS errors); `land_on_end` makes the last step end exactly on tau1 instead of stepping past
    it and interpolating back, for fields that are undefined beyond tau1. Fixed-step methods take `steps`
    equal steps. Clock values are float64 inside torchdiffeq whatever the state's dtype. Raises
    `ODEFailure` when torchdiffeq gives up.
    """
    device = (state0[0] if isinstance(state0, tuple) else state0).device
    times = torch.tensor([tau0, tau1], dtype=torch.float64, device=device)
    if method in FIXED_STEP_METHODS:
        if steps < 1:
            raise ValueError(f"fixed-step method {method!r} needs steps >= 1, got {steps}")
        options = {
            "grid_constructor": lambda func, y0, t: torch.linspace(
                t[0], t[-1], steps + 1, dtype=t.dtype, device=t.device
            )
        }
    elif method in ADAPTIVE_METHODS:
        options = {"step_t": times[1:]} if land_on_end else {}
    else:
        raise ValueError(f"method must be one of {', '.join(ADAPTIVE_METHODS + FIXED_STEP_METHODS)}, got {method!r}")
    try:
        solution = odeint(field, state0, times, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as exc:  # torchdiffeq's way of failing: "underflow in dt", "non-finite values"
        raise ODEFailure(f"ODE solver failed after {field.nfe} evaluations: {first_line(exc)}", field.nfe) from None
    if isinstance(solution, tuple):
        return tuple(s[-1] for s in solution)
    return solution[-1]


# ---- the exponential multistep solver of the logsnr frame -------------------------------------------------
# In the logsnr frame dx/dlambda = (d log alpha / d lambda) x + sigma eps_theta(x, lambda) (trials.sde): a
# linear part whose flow is known exactly, x -> x alpha(b) / alpha(a), and the network's part. Variation of
# constants writes one step exactly as
#
#     x(b) = alpha(b) [x(a) / alpha(a) + integral_a^b e^lam eps_theta dlam]                   ("noise" form)
#          = sigma(b) [x(a) / sigma(a) - integral_a^b e^-lam x0_theta dlam],                   ("data" form)
#
# with x0_theta = (x - sigma eps_theta) / alpha, the denoiser; only the integral is approximated, by the
# polynomial in lambda through the network's outputs at the last few grid nodes (the exponential
# Adams-Bashforth rule of DPM-Solver++(2M)/(3M), here on any grid). One network evaluation per node, each
# reused by the next `order` steps. With `corrector`, each step is redone once the new node's output is known
# (exponential Adams-Moulton, as UniPC's UniC), which raises the order by one at no extra evaluation: the
# output at the new node is the one computed at the predicted state, and the next step reuses it.
GAUSS_NODES = 32  # Gauss-Legendre points for the step weights: exact to rounding for polynomial x exponential


def lagrange_integrals(nodes: np.ndarray, a: float, b: float, log_weight) -> np.ndarray:
    """integral_a^b exp(log_weight(lam)) l_j(lam) dlam for the Lagrange basis polynomials l_j of `nodes`."""
    points, weights = np.polynomial.legendre.leggauss(GAUSS_NODES)
    lam = 0.5 * (b - a) * points + 0.5 * (a + b)
    w = 0.5 * (b - a) * weights * np.exp(log_weight(lam))
    basis = np.ones((len(nodes), len(lam)))
    for j, node in enumerate(nodes):
        for m, other in enumerate(nodes):
            if m != j:
                basis[j] *= (lam - other) / (node - other)
    return basis @ w


def quadrature_weights(grid: np.ndarray, order: int) -> np.ndarray:
    """Weights w with integral over the grid of f ~ sum_i w_i f(grid_i): piecewise, each interval by the
    polynomial through the `order` nodes around it (fewer when the grid has fewer). Exact for polynomials
    of degree < order; order 2 is the trapezoidal rule."""
    n = len(grid) - 1
    q = min(order, n + 1)
    w = np.zeros(n + 1)
    for i in range(n):
        start = min(max(i - (q // 2 - 1), 0), n + 1 - q)
        idx = np.arange(start, start + q)
        w[idx] += lagrange_integrals(grid[idx], grid[i], grid[i + 1], lambda lam: np.zeros_like(lam))
    return w


def exponential_multistep(
    network,
    x0: torch.Tensor,
    grid: np.ndarray,
    log_alpha: np.ndarray,
    log_sigma: np.ndarray,
    *,
    order: int,
    prediction: str = "noise",
    corrector: bool = True,
) -> torch.Tensor:
    """x at grid[-1] of dx/dlam = (d log alpha / d lam) x + sigma eps_theta, from x0 at grid[0].

    `network(i, x)` is eps_theta at node i (clock grid[i]) for state x; it is called once per node, at
    nodes 0..N in order (N = len(grid) - 1), so the caller can record what else it computes there.
    `log_alpha`, `log_sigma` are the schedule at the nodes (float64). `prediction` picks the form the
    polynomial interpolates: "noise" (eps_theta) or "data" (x0_theta). The first steps use what nodes
    there are (order 1 for the first step, ...).
    """
    if prediction not in ("noise", "data"):
        raise ValueError(f"prediction must be 'noise' or 'data', got {prediction!r}")
    n = len(grid) - 1
    if n < 1 or order < 1:
        raise ValueError(f"need at least one step and order >= 1, got {n} steps and order {order}")

    def output(i: int, x: torch.Tensor) -> torch.Tensor:
        eps = network(i, x)
        if prediction == "noise":
            return eps
        return (x - math.exp(log_sigma[i]) * eps) * math.exp(-log_alpha[i])

    def step(i: int, x: torch.Tensor, idx: list[int], values: dict[int, torch.Tensor]) -> torch.Tensor:
        # One step from node i to i + 1: the linear part exactly, the integral of the interpolant of `idx`.
        if prediction == "noise":
            ratio = math.exp(log_alpha[i + 1] - log_alpha[i])
            coef = lagrange_integrals(grid[idx], grid[i], grid[i + 1], lambda lam: lam + log_alpha[i + 1])
        else:
            ratio = math.exp(log_sigma[i + 1] - log_sigma[i])
            coef = -lagrange_integrals(grid[idx], grid[i], grid[i + 1], lambda lam: log_sigma[i + 1] - lam)
        out = ratio * x
        for c, j in zip(coef, idx):
            out = out + float(c) * values[j]
        return out

    values = {0: output(0, x0)}
    x = x0
    for i in range(n):
        past = list(range(i, max(i - order, -1), -1))  # i, i - 1, ..., at most `order` nodes
        predicted = step(i, x, past, values)
        values[i + 1] = output(i + 1, predicted)
        x = step(i, x, [i + 1] + past, values) if corrector else predicted
        values.pop(i + 1 - order, None)  # no step needs it again
    return x


# The multistep methods of FidelityConfig.method and SampleConfig.ode_method (trials.config.MULTISTEP_METHODS)
# and their settings of `exponential_multistep` and `multistep_grid` (the likelihood's `_multistep_solve` may
# also take `quadrature`). "multistep": the order-3 exponential Adams-Bashforth step with its Adams-Moulton
# corrector (fourth order), noise prediction, equal steps in lambda except the one at the data end, which is
# split into 4 short ones (ramp 3). The first steps have no earlier evaluations to reuse, so they are of order
# 1 and 2; on models trained 800 steps scored from sampling_eps 1e-3, equal steps left 0.08 bits/dim of error
# there at 32 evaluations, the short ones 0.009 (bench/fidelity_bias.py, docs/metric.md). The other variants
# measured there (order 2 and 4, no corrector, data prediction, warped grids, other quadratures) did no
# better. A sampler runs the same grid the other way, so its short steps are its last ones, near the data.
MULTISTEP_METHODS: dict[str, dict[str, Any]] = {
    "multistep": {"order": 3, "corrector": True, "ramp": 3},
}


def multistep_grid(tau0: float, tau1: float, steps: int, warp: float = 0.0, ramp: int = 0) -> np.ndarray:
    """The nodes of a multistep solve in lambda: `steps` steps from tau0 (the data end) to tau1.

    Equal steps when warp = 0; otherwise equal steps in u with lambda = tau0 + (tau1 - tau0) (e^(warp u) - 1) /
    (e^warp - 1), u in [0, 1]: a step grows by the factor e^(warp / steps) from one to the next, so warp > 0
    puts the short steps at the data end. `ramp` > 0 lays out steps - ramp such steps and splits the first
    into ramp + 1 steps that double in length (h/15, 2h/15, 4h/15, 8h/15 for ramp 3): the solver's first
    steps have no earlier evaluations to reuse and are of lower order, so they are kept short.
    """
    if steps < 1:
        raise ValueError(f"multistep methods need steps >= 1, got {steps}")
    ramp = min(ramp, steps - 1)
    u = np.linspace(0.0, 1.0, steps - ramp + 1)
    if warp != 0.0:
        u = np.expm1(warp * u) / math.expm1(warp)
    grid = tau0 + (tau1 - tau0) * u
    if ramp > 0:
        lengths = 2.0 ** np.arange(ramp + 1) / (2.0 ** (ramp + 1) - 1)  # of the first step; they sum to 1
        head = grid[0] + (grid[1] - grid[0]) * np.cumsum(lengths[:-1])
        grid = np.concatenate([grid[:1], head, grid[1:]])
    grid[-1] = tau1
    return grid


def multistep_flow(
    frame: FlowFrame,
    part_at: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    grid: np.ndarray,
    *,
    order: int,
    prediction: str = "noise",
    corrector: bool = True,
) -> torch.Tensor:
    """x at grid[-1] of the probability-flow ODE in the logsnr frame, from x0 at grid[0], by
    `exponential_multistep`: the schedule at the nodes from `frame.sde`, and eps_theta from `part_at(i, lam, x)`,
    the network's part of the velocity (sigma eps_theta) at node i, called once per node in order. The
    likelihood runs it from the data end with its divergence recorded at each node; the sampler the other way."""
    if frame.name != "logsnr":
        raise ValueError(f"multistep methods integrate the logsnr frame, got frame {frame.name!r}")
    alpha, sigma = frame.sde.scale_and_std_at(torch.tensor(grid, dtype=torch.float64))
    log_alpha, log_sigma = torch.log(alpha).numpy(), torch.log(sigma).numpy()
    lam = torch.tensor(grid, dtype=torch.float64, device=x0.device)

    def network(i: int, x: torch.Tensor) -> torch.Tensor:
        return part_at(i, lam[i], x) / math.exp(log_sigma[i])

    return exponential_multistep(
        network, x0, grid, log_alpha, log_sigma, order=order, prediction=prediction, corrector=corrector
    )
