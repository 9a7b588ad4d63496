"""Progress lines with the time left, for the driver's long phases (re-scoring, the report).

    Re-scoring 2/3: 5f0c1a2e 2.6890 ± 0.1060 bits/dim, NFE 524 (1:12 elapsed, about 0:36 left)

The time left extrapolates the mean time per finished item to the items still to come, so it is a guess
until the first item finishes (and none is printed before), and tasks that run side by side make it a
pessimistic one.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, out: TextIO | None = None):
        self.label = label
        self.total = total
        self.out = out
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self, done: int, what: str) -> str:
        elapsed = self.elapsed
        timing = f"{clock(elapsed)} elapsed"
        if 0 < done < self.total:
            timing += f", about {clock(elapsed / done * (self.total - done))} left"
        return f"{self.label} {done}/{self.total}: {what} ({timing})"

    def done(self, done: int, what: str) -> None:
        print(self.line(done, what), file=self.out or sys.stdout, flush=True)


def clock(seconds: float) -> str:
    """0:07, 12:30, 1:02:03."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
