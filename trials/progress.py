"""Progress lines with the time left, for long phases on both sides (re-scoring, the report, the full
run's training, test score and samples, a sample preview), and the one way durations are written.

    Re-scoring 2/3: 5f0c1a2e 2.6890 ± 0.1060 bits/dim, NFE 524 (1:12 elapsed, about 0:36 left)

The time left extrapolates the mean time per finished unit to the units still to come, so it is a guess
until the first unit finishes (and none is printed before), and tasks that run side by side make it a
pessimistic one. Plain Python, no torch: the driver side prints these lines too.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


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
        timing = f"{duration(elapsed)} elapsed"
        if 0 < done < self.total:
            timing += f", about {duration(elapsed / done * (self.total - done))} left"
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


def duration(seconds: float, words: bool = False) -> str:
    """As a clock for progress lines (0:07, 12:30, 1:02:03), or in words for estimates that may run to days
    (7 s, 12 minutes, 1.5 hours, 3.3 days)."""
    if words:
        if seconds < 90:
            return f"{seconds:.0f} s"
        if seconds < 90 * 60:
            return f"{seconds / 60:.0f} minutes"
        if seconds < 48 * 3600:
            return f"{seconds / 3600:.1f} hours"
        return f"{seconds / 86400:.1f} days"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
