"""Replay tuning strategies against recorded learning curves, in simulated time.

A strategy is a searcher and a scheduler: the libraries' own code, driven directly (Optuna's samplers through
`tuner.searcher.OptunaSearcher`, or Ray's `OptunaSearch` for the setup before it; Ray's `ASHAScheduler` or
`FIFOScheduler`). The simulation runs `slots` trials at a time like Tune does: a free slot asks the searcher
for a config; the config is snapped to the nearest recorded grid point (log scale for lr and sampling eps);
each rung costs the recorded training seconds plus the evaluation seconds at that eps; the rung's val
bits/dim goes to the searcher and the scheduler, and a STOP (or the last rung, or divergence) frees the slot.
Only the clock is simulated: every decision is the real library's.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from ray.tune.schedulers import TrialScheduler

HP = ("lr", "batch_size", "num_res_blocks", "ch_mult")


@dataclass(frozen=True)
class Rung:
    step: int
    train_seconds: float
    by_eps: dict[float, tuple[float, float]]  # eps -> (val_bpd, eval_seconds)
    diverged: bool


class CurveTable:
    """The recorded grid: for each config, its rungs; lookups snap a proposal to the nearest grid point."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self.lrs = np.array(sorted(frame["lr"].unique()))
        self.eps = np.array(sorted(frame["sampling_eps"].unique()))
        self.curves: dict[tuple, list[Rung]] = {}
        self.setup: dict[tuple, float] = {}
        for key, rows in frame.groupby(list(HP), sort=False):
            rungs = []
            for step, at in rows.groupby("step", sort=True):
                by_eps = {float(r.sampling_eps): (float(r.val_bpd), float(r.eval_seconds)) for r in at.itertuples()}
                first = at.iloc[0]
                rungs.append(Rung(int(step), float(first.train_seconds), by_eps, bool(first.diverged)))
            self.curves[self._key(*key)] = rungs
            self.setup[self._key(*key)] = float(rows.iloc[0].setup_seconds)
        self.full_steps = int(frame["step"].max())

    @classmethod
    def read(cls, path) -> CurveTable:
        return cls(pd.read_csv(path, dtype={"ch_mult": str}))

    @staticmethod
    def _key(lr, batch_size, num_res_blocks, ch_mult) -> tuple:
        return (round(float(lr), 12), int(batch_size), int(num_res_blocks), str(ch_mult))

    @staticmethod
    def _nearest_log(grid: np.ndarray, value: float) -> float:
        return float(grid[np.argmin(np.abs(np.log(grid) - math.log(value)))])

    def value(self, key: tuple, eps: float, step: int) -> float:
        """The recorded val bits/dim of a grid point at one rung and eps (a pick read in another table)."""
        (rung,) = [r for r in self.curves[key] if r.step == step]
        return rung.by_eps[eps][0]

    def snap(self, params: dict) -> tuple[tuple, float]:
        """The grid point a proposal lands on, and its eps."""
        key = self._key(
            self._nearest_log(self.lrs, params["lr"]), params["batch_size"], params["num_res_blocks"], params["ch_mult"]
        )
        return key, self._nearest_log(self.eps, params.get("sampling_eps", self.eps[0]))


@dataclass
class Strategy:
    make_searcher: Callable[[int], object]  # seed -> a Ray Tune Searcher
    make_scheduler: Callable[[], object]
    eps_at_scoring: bool = False  # score every recorded eps at each rung and report the best


class _Trial:
    """The little of a Tune Trial that the schedulers read."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


@dataclass
class Run:
    """One simulated search: every rung report as (seconds, val_bpd), what each reported on as (grid point,
    eps, step) in the same order, and the trials started."""

    reports: list[tuple[float, float]]
    trials: int
    picks: list[tuple[tuple, float, int]] = field(default_factory=list)

    def best_by(self, seconds: float) -> float:
        values = [v for t, v in self.reports if t <= seconds and math.isfinite(v)]
        return min(values) if values else math.inf

    def best_pick_by(self, seconds: float) -> tuple[tuple, float, int] | None:
        """The (grid point, eps, step) behind best_by(seconds): what the search would call its best so far."""
        seen = [(v, i) for i, (t, v) in enumerate(self.reports) if t <= seconds and math.isfinite(v)]
        return self.picks[min(seen)[1]] if seen else None

    def time_to(self, target: float) -> float:
        for t, v in sorted(self.reports):
            if v <= target:
                return t
        return math.inf


def simulate(strategy: Strategy, table: CurveTable, seed: int, horizon_s: float, slots: int = 2) -> Run:
    np.random.seed(seed)  # ASHA picks brackets with numpy's global generator
    searcher, scheduler = strategy.make_searcher(seed), strategy.make_scheduler()
    events: list[tuple[float, int, str]] = []  # (time the next rung is reported, tiebreak, trial id)
    state: dict[str, dict] = {}
    counter = itertools.count()
    reports: list[tuple[float, float]] = []
    picks: list[tuple[tuple, float, int]] = []

    def rung_cost(s: dict, i: int) -> float:
        rung = s["rungs"][i]
        if strategy.eps_at_scoring:
            evals = sum(sec for _, sec in rung.by_eps.values())
        else:
            evals = rung.by_eps[s["eps"]][1]
        return rung.train_seconds + evals + (s["setup"] if i == 0 else 0.0)

    def start(now: float) -> None:
        trial_id = f"t{len(state)}"
        params = searcher.suggest(trial_id)
        key, eps = table.snap(params)
        s = {"key": key, "rungs": table.curves[key], "eps": eps, "setup": table.setup[key], "i": 0}
        state[trial_id] = s
        scheduler.on_trial_add(None, _Trial(trial_id))
        heapq.heappush(events, (now + rung_cost(s, 0), next(counter), trial_id))

    for _ in range(slots):
        start(0.0)
    while events and events[0][0] <= horizon_s:
        now, _, trial_id = heapq.heappop(events)
        s = state[trial_id]
        rung = s["rungs"][s["i"]]
        if strategy.eps_at_scoring:
            eps, (value, _) = min(rung.by_eps.items(), key=lambda kv: kv[1][0])
        else:
            eps, value = s["eps"], rung.by_eps[s["eps"]][0]
        result = {
            "step": rung.step,
            "val_bpd": value,
            "sampling_eps": eps,
            "diverged": rung.diverged,
            "training_iteration": s["i"] + 1,
        }
        reports.append((now, value))
        picks.append((s["key"], eps, rung.step))
        decision = scheduler.on_trial_result(None, _Trial(trial_id), result)
        searcher.on_trial_result(trial_id, result)
        last = s["i"] + 1 >= len(s["rungs"]) or rung.diverged
        if decision == TrialScheduler.STOP or last:
            scheduler.on_trial_complete(None, _Trial(trial_id), result)
            searcher.on_trial_complete(trial_id, result)
            start(now)
        else:
            s["i"] += 1
            heapq.heappush(events, (now + rung_cost(s, s["i"]), next(counter), trial_id))
    return Run(reports, len(state), picks)


def table_agreement(table: CurveTable, other: CurveTable) -> pd.DataFrame:
    """Per rung step, how `other` reads the points of `table` (the same weights scored another way): the
    points finite in both, the median, lowest and highest of other - table, and Kendall's tau between the two
    orderings of the points (grid point and eps), which is what a search compares: over all of them, and over
    the best quarter by `other`, where a search's late decisions are made and the bad points cannot pad it."""
    from scipy.stats import kendalltau

    cols = [*HP, "step", "sampling_eps"]

    def keyed(t: CurveTable) -> pd.Series:
        f = t.frame.assign(ch_mult=t.frame["ch_mult"].astype(str), lr=t.frame["lr"].round(12))
        return f.set_index(cols)["val_bpd"]

    both = pd.concat({"table": keyed(table), "other": keyed(other)}, axis=1, join="inner")
    both = both[np.isfinite(both["table"]) & np.isfinite(both["other"])]
    rows = []
    for step, at in both.groupby(level="step"):
        gap = at["other"] - at["table"]
        best = at[at["other"] <= at["other"].quantile(0.25)]
        rows.append(
            {
                "step": int(step),
                "points": len(at),
                "gap_median": float(gap.median()),
                "gap_min": float(gap.min()),
                "gap_max": float(gap.max()),
                "kendall_tau": float(kendalltau(at["table"], at["other"]).statistic),
                "kendall_tau_best_quarter": float(kendalltau(best["table"], best["other"]).statistic),
            }
        )
    return pd.DataFrame(rows)


# ---- statistics -------------------------------------------------------------------------------------
def median_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Median and a distribution-free confidence interval for it (binomial order statistics)."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    alpha = 1 - confidence
    k = int(binom.ppf(alpha / 2, n, 0.5))  # the interval is [x_(k), x_(n-k+1)] in 1-based order statistics
    return float(np.median(x)), float(x[max(k - 1, 0)]), float(x[min(n - k, n - 1)])


def quartiles(values) -> tuple[float, float]:
    """25th and 75th percentiles; inf (a run that never reached the target) counts as the largest value."""
    x = np.asarray(values, dtype=float)
    return float(np.percentile(x, 25, method="lower")), float(np.percentile(x, 75, method="higher"))


def compare_medians(ours: tuple[float, float, float], theirs: tuple[float, float, float]) -> str:
    """Two (median, low, high) of values where lower is better: which is better, with intervals apart."""
    if ours[2] < theirs[1]:
        return "better, intervals apart"
    if ours[1] > theirs[2]:
        return "worse, intervals apart"
    return "intervals overlap"


def speedup_interval(
    baseline_times, times, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap interval for median(baseline_times) / median(times), resampling the seeds of
    each strategy on its own. A target never reached is inf, so a resampled ratio can be inf (or 0)."""
    rng = np.random.default_rng(seed)
    # Sorted, so that the same times give the same interval in whatever order the runs finished.
    base, ours = np.sort(np.asarray(baseline_times, dtype=float)), np.sort(np.asarray(times, dtype=float))
    b = np.median(rng.choice(base, (resamples, len(base))), axis=1)
    o = np.median(rng.choice(ours, (resamples, len(ours))), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(np.isinf(b) & np.isinf(o), np.nan, b / o)
    ratios = ratios[~np.isnan(ratios)]
    alpha = (1 - confidence) / 2
    return (
        float(np.percentile(ratios, 100 * alpha, method="lower")),
        float(np.percentile(ratios, 100 * (1 - alpha), method="higher")),
    )
