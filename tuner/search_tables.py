"""What a space's `search.algorithm` and `search.scheduler` may name: one entry each, a new one is one entry.

The entries are plain data: the space check (tuner/space.py), the CPU estimate (tuner/cpu_only.py) and the
report read them without importing Ray or Optuna. An entry imports those only when it builds its object,
which happens in one place, `tuner.searcher.build_search`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SearchAlgorithm:
    name: str
    about: str
    sampler: Callable[[int, int], Any]  # (seed, startup_trials) -> an optuna.samplers.BaseSampler


@dataclass(frozen=True)
class Scheduler:
    """The steps arguments are the same for every function: (full_steps, grace_period, reduction_factor)."""

    name: str
    about: str  # what it does to the trials, as the CPU estimate says it
    rungs: Callable[[int, int, int], list[int]]  # the steps below full_steps at which it may stop a trial
    expected_steps: Callable[[int, int, int], float]  # the steps a trial trains on average
    stopping_rule: Callable[[int, int], str]  # (grace_period, reduction_factor) -> its rule, for the report
    build: Callable[[int, int, int], Any]  # -> a ray.tune.schedulers.TrialScheduler


# ---- algorithms: Optuna samplers -------------------------------------------------------------------------
def _tpe(seed: int, startup: int):
    import optuna

    # constant_liar: running trials count as bad guesses, so concurrent asks do not land on the same point.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def _gp(seed: int, startup: int):
    import optuna

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)


def _random(seed: int, startup: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SEARCH_ALGORITHMS: dict[str, SearchAlgorithm] = {
    a.name: a
    for a in (
        SearchAlgorithm("tpe", "Optuna's multivariate TPE, constant liar for concurrent trials", _tpe),
        SearchAlgorithm("gp", "Optuna's Gaussian-process sampler", _gp),
        SearchAlgorithm("random", "uniform random sampling", _random),
    )
}


# ---- schedulers: Ray Tune trial schedulers ---------------------------------------------------------------
def asha_rungs(full_steps: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The steps at which ASHA may stop a trial (Ray's milestones grace * eta^k), below the full length."""
    rungs, r = [], grace_period
    while r < full_steps:
        rungs.append(r)
        r *= reduction_factor
    return rungs


def _asha_expected_steps(full_steps: int, grace_period: int, reduction_factor: int) -> float:
    # Every trial trains to the first rung and a fraction 1/eta survives each rung (ASHA's promotion rule),
    # so a trial trains on average sum_k (r_k - r_{k-1}) / eta^k steps.
    eta = reduction_factor
    bounds = [0, *asha_rungs(full_steps, grace_period, eta), full_steps]
    return sum((bounds[k + 1] - bounds[k]) / eta**k for k in range(len(bounds) - 1))


def _asha(full_steps: int, grace_period: int, reduction_factor: int):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step", max_t=full_steps, grace_period=grace_period, reduction_factor=reduction_factor
    )


def _fifo(full_steps: int, grace_period: int, reduction_factor: int):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


SCHEDULERS: dict[str, Scheduler] = {
    s.name: s
    for s in (
        Scheduler(
            "asha",
            "ASHA stops most trials early",
            asha_rungs,
            _asha_expected_steps,
            lambda grace, eta: (
                f"ASHA's rungs (grace period {grace} steps, reduction factor {eta}), where it "
                f"keeps the better 1/{eta} of the trials"
            ),
            _asha,
        ),
        Scheduler(
            "fifo",
            "every trial to the end",
            lambda full, grace, eta: [],
            lambda full, grace, eta: float(full),
            lambda grace, eta: "FIFO scheduler: no trial is stopped early",
            _fifo,
        ),
    )
}
