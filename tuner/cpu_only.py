"""A GPU-sized search space on a cluster without GPUs: say so before anything runs, and what it would cost.

A space is sized for GPUs when it asks for them: `resources.gpus_per_trial > 0` (vpsde.yaml: 0.25). Such a
space on a Ray cluster with no GPU would still run, on the CPUs, but its trials were sized for a GPU (a ch 32
UNet with attention, batches of 128 to 512, 6,000 steps), so the search would take days. The driver
measures a couple of training steps of the space's model on a worker (trial-side code, as a Ray task),
prints the estimate and the CPU space to use instead, and stops with exit status 2 unless the user insists
(`tune.py --allow-cpu`).

The estimate counts training steps only, as many per trial as the space's scheduler lets a trial train on
average (tuner/search_tables.py: under ASHA a fraction 1 / reduction_factor of the trials survives each rung);
the scores at the rungs come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trials.progress import duration
from tuner.search_space import SearchSpace
from tuner.search_tables import SCHEDULERS

CPU_SPACE = "search_spaces/cpu.yaml"


def sized_for_gpus(space: SearchSpace) -> bool:
    return space.resources.gpus_per_trial > 0


def middle_params(space: SearchSpace) -> dict[str, Any]:
    """A representative trial: the middle choice of each choice, the (geometric) middle of each range."""
    return {hp.name: hp.middle() for hp in space.hyperparameters}


def expected_steps_per_trial(space: SearchSpace) -> float:
    s = space.search
    return SCHEDULERS[s.scheduler].expected_steps(space.base_config.train.steps, s.grace_period, s.reduction_factor)


@dataclass(frozen=True)
class Estimate:
    seconds_per_step: float
    steps_per_trial: float
    trials: int
    parallel: int
    time_budget_s: float | None

    @property
    def seconds(self) -> float:
        total = self.seconds_per_step * self.steps_per_trial * self.trials / self.parallel
        return min(total, self.time_budget_s) if self.time_budget_s else total


def estimate(space: SearchSpace, seconds_per_step: float, cluster_cpus: float) -> Estimate:
    parallel = max(1, min(space.search.max_concurrent, int(cluster_cpus // space.resources.cpus_per_trial)))
    return Estimate(
        seconds_per_step,
        expected_steps_per_trial(space),
        space.search.num_samples,
        parallel,
        space.search.time_budget_s,
    )


def headline(space: SearchSpace) -> str:
    return (
        f"{space.source} is sized for GPUs (resources.gpus_per_trial: {space.resources.gpus_per_trial:g}), "
        "but this Ray cluster has no GPU."
    )


def explain(space: SearchSpace, est: Estimate, measured: str) -> list[str]:
    """The lines printed after the measurement, before stopping (or, with --allow-cpu, running anyway)."""
    budget = (
        f"; the time budget of {duration(est.time_budget_s, words=True)} stops it first, after a fraction of its trials"
        if est.time_budget_s
        and est.time_budget_s < est.seconds_per_step * est.steps_per_trial * est.trials / est.parallel
        else ""
    )
    return [
        f"Measured here: {est.seconds_per_step:.2f} s per training step of its model ({measured}).",
        f"Estimate: {est.trials} trials x about {est.steps_per_trial:,.0f} steps each "
        f"({SCHEDULERS[space.search.scheduler].about}), "
        f"{est.parallel} at a time: about {duration(est.seconds, words=True)} of training, plus the scoring at each rung{budget}.",
        f"For a CPU use {CPU_SPACE} (about 7 minutes on 2 cores), or add --allow-cpu to run this space here anyway.",
    ]
