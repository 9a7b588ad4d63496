"""One torchdiffeq solve from clock value tau0 to tau1, adaptive or on a fixed grid, failing in one way.

The likelihood evaluator and the ODE sampler both integrate the probability-flow ODE through `solve`:

  * an adaptive method (dopri5, bosh3, ...) chooses its own steps to meet rtol/atol;
  * a fixed-step method (midpoint, heun3, rk4, ...) takes `steps` equal steps in the clock, so its cost is
    known in advance (steps x stages evaluations) and does not depend on the model. That only makes sense
    in a clock where equal steps are equally hard, which is the logsnr frame's (see trials.sde).

torchdiffeq signals a solve it cannot finish ("underflow in dt", non-finite values, too many steps) with
a bare AssertionError; `solve` turns that into `ODEFailure` with the evaluations spent, so callers catch
one exception type with a readable message.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torchdiffeq import odeint

from trials.cli import first_line
from trials.config import ADAPTIVE_METHODS, FIXED_STEP_METHODS


class ODEFailure(RuntimeError):
    """The ODE could not be solved to a finite answer; the message says why."""

    def __init__(self, message: str, nfe: int):
        super().__init__(message)
        self.nfe = nfe  # function evaluations spent before giving up


class CountingField(Protocol):
    """A torchdiffeq right-hand side f(tau, state) that counts its evaluations in `nfe`."""

    nfe: int

    def __call__(self, tau: torch.Tensor, state): ...


def solve(field: CountingField, state0, tau0: float, tau1: float, *, method: str, rtol: float = 1e-5,
          atol: float = 1e-5, steps: int = 0, land_on_end: bool = False):
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
        options = {"grid_constructor": lambda func, y0, t: torch.linspace(t[0], t[-1], steps + 1, dtype=t.dtype,
                                                                           device=t.device)}
    elif method in ADAPTIVE_METHODS:
        options = {"step_t": times[1:]} if land_on_end else {}
    else:
        raise ValueError(f"method must be one of {', '.join(ADAPTIVE_METHODS + FIXED_STEP_METHODS)}, got {method!r}")
    try:
        solution = odeint(field, state0, times, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as exc:  # torchdiffeq's way of failing: "underflow in dt", "non-finite values"
        raise ODEFailure(f"ODE solver failed after {field.nfe} evaluations: {first_line(exc)}",
                         field.nfe) from None
    if isinstance(solution, tuple):
        return tuple(s[-1] for s in solution)
    return solution[-1]
