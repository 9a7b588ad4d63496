"""Progress lines with the time left, for long phases on both sides (re-scoring, the report, the full
run's test score and samples, a sample preview).

    Re-scoring 2/3: 5f0c1a2e 2.6890 ± 0.1060 bits/dim, NFE 524 (1:12 elapsed, about 0:36 left)

The time left extrapolates the mean time per finished unit to the units still to come, so it is a guess
until the first unit finishes (and none is printed before), and tasks that run side by side make it a
pessimistic one. `ScoreProgress` measures an ODE solve's progress in its clock lambda = log(sigma / alpha),
where adaptive steps are roughly even (trials.sde).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

import torch

from trials.sde import SDE, ScoreFn


class Progress:
    """`done(k, what)` prints '<label> k/total: what (elapsed, about ... left)'; `due()` rate-limits it."""

    def __init__(self, label: str, total: float, out: TextIO | None = None, every: float = 0.0):
        self.label = label
        self.total = total
        self.out = out
        self.every = every
        self.start = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self, done: float, what: str) -> str:
        elapsed = self.elapsed
        timing = f"{clock(elapsed)} elapsed"
        if 0 < done < self.total:
            timing += f", about {clock(elapsed / done * (self.total - done))} left"
        count = f"{done:g}/{self.total:g}" if isinstance(self.total, int) else f"{100 * done / self.total:.0f}%"
        return f"{self.label} {count}: {what} ({timing})"

    def due(self) -> bool:
        """True at most once every `every` seconds (always when every = 0)."""
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True

    def done(self, done: float, what: str) -> None:
        print(self.line(done, what), file=self.out or sys.stdout, flush=True)


class ScoreProgress:
    """Wraps a score function to report how far a probability-flow solve from T down to eps has come.

    Every `every` seconds it calls `report` with a Progress line: the share of lambda covered, the score
    evaluations so far, and the time left.
    """

    def __init__(self, score: ScoreFn, sde: SDE, eps: float, label: str, report: Callable[[str], None],
                 every: float = 5.0):
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


def clock(seconds: float) -> str:
    """0:07, 12:30, 1:02:03."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
