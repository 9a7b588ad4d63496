"""The searcher: Ray Tune asks, an Optuna study answers, and every result reaches it at its true fidelity.

Ray's own `OptunaSearch` tells Optuna that a trial ASHA stopped at step 40 is COMPLETE with its step-40
value, so TPE ranks 40-step and 160-step scores as if they were the same measurement. `OptunaSearcher`
drives the study by ask-and-tell instead:

  * every rung's val bits/dim is an intermediate value of the Optuna trial (`trial.report(value, step)`);
  * a trial that trained all `full_steps` is told COMPLETE with its last value;
  * a trial stopped early (by ASHA, or the time budget) is told PRUNED: Optuna's samplers rank pruned trials
    by the step they reached, then by their last intermediate value, below every completed trial;
  * a diverged trial (NaN loss) is PRUNED at the step it reached with no value there, which ranks it below
    every trial that got as far, so the sampler learns that its region is bad;
  * a trial that raised is told FAIL: an exception says nothing about its hyperparameters.

The study lives in an SQLite file in the experiment folder (`optuna.db`, study name = experiment name), so
`optuna-dashboard sqlite:///<experiment>/optuna.db` shows it live, and a resumed experiment keeps asking the
same study: the map from Tune trial ids to Optuna trial numbers is the only state Tune needs to save.

Concurrency follows Optuna's advice: TPE with `constant_liar` (running trials count as bad guesses, so two
concurrent asks do not land on the same point); the GP sampler treats running trials itself.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from tuner.search_tables import SCHEDULERS, SEARCH_ALGORITHMS

METRIC = "val_bpd"  # what every trial reports at each rung, and what the search minimises
MODE = "min"

if TYPE_CHECKING:
    from tuner.search_space import SearchSpace


STUDY_FILE = "optuna.db"


def optuna_storage(experiment_dir) -> str:
    """The study's SQLite URL in the experiment folder (what optuna-dashboard is pointed at)."""
    return f"sqlite:///{(experiment_dir / STUDY_FILE).resolve()}"


# ---- the one place a space's search settings become Ray Tune objects ------------------------------------------
# The names a space may use are the entries of tuner/search_tables.py; a new algorithm or scheduler is one entry there.
def make_sampler(algorithm: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler behind `search.algorithm`."""
    if algorithm not in SEARCH_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(SEARCH_ALGORITHMS)}, got {algorithm!r}")
    return SEARCH_ALGORITHMS[algorithm].sampler(seed, startup_trials)


def make_scheduler(name: str, full_steps: int, grace_period: int, reduction_factor: int) -> TrialScheduler:
    """The Tune scheduler behind `search.scheduler`."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name].build(full_steps, grace_period, reduction_factor)


def build_search(space: SearchSpace, experiment_dir: Path) -> tuple[Searcher, TrialScheduler]:
    """The searcher (Optuna study in the experiment folder, at most max_concurrent trials at once) and the
    scheduler of a search space."""
    s, full_steps = space.search, space.base_config.train.steps
    searcher = ConcurrencyLimiter(
        OptunaSearcher(
            space.to_optuna(),
            make_sampler(s.algorithm, s.seed, s.startup_trials),
            metric=METRIC,
            mode=MODE,
            full_steps=full_steps,
            study_name=space.name,
            storage=optuna_storage(experiment_dir),
            points_to_evaluate=[dict(p) for p in space.points_to_evaluate],
        ),
        max_concurrent=s.max_concurrent,
    )
    return searcher, make_scheduler(s.scheduler, full_steps, s.grace_period, s.reduction_factor)


def outcome(result: dict[str, Any] | None, full_steps: int, metric: str, error: bool) -> TrialState:
    """What a finished Tune trial is to Optuna: COMPLETE, PRUNED or FAIL (see the module docstring)."""
    if error:
        return TrialState.FAIL
    if not result or result.get("diverged"):
        return TrialState.PRUNED
    value = result.get(metric)
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    if finite and int(result.get("step", 0)) >= full_steps:
        return TrialState.COMPLETE
    return TrialState.PRUNED


class OptunaSearcher(Searcher):
    def __init__(
        self,
        space: dict[str, BaseDistribution],
        sampler: optuna.samplers.BaseSampler,
        *,
        metric: str,
        mode: str,
        full_steps: int,
        study_name: str,
        storage: str | None = None,
        points_to_evaluate: list[dict[str, Any]] | None = None,
        step_attr: str = "step",
    ):
        super().__init__(metric=metric, mode=mode)
        self._space = dict(space)
        self._sampler = sampler
        self._full_steps = full_steps
        self._study_name = study_name
        self._storage = storage
        self._step_attr = step_attr
        self._trial_numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._study: optuna.Study | None = None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.study  # created now, so a bad storage URL fails before any trial starts
        if not study.trials:  # a resumed study already holds its points
            for point in points_to_evaluate or []:
                study.enqueue_trial(dict(point))

    # ---- the study ------------------------------------------------------------------------------
    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            direction = "minimize" if self._mode == "min" else "maximize"
            self._study = optuna.create_study(
                storage=self._storage,
                study_name=self._study_name,
                sampler=self._sampler,
                direction=direction,
                load_if_exists=True,
            )
        return self._study

    def _trial(self, trial_id: str) -> optuna.Trial | None:
        number = self._trial_numbers.get(trial_id)
        if number is None:
            return None
        return optuna.Trial(self.study, self._frozen(number)._trial_id)

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        # One trial from the storage: `study.trials` copies (from SQLite: reads) every trial of the study, a
        # cost that grows with the search and was paid three times per report.
        storage = self.study._storage
        return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number))

    # ---- Ray Tune's Searcher interface ----------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        trial = self.study.ask(fixed_distributions=self._space)
        trial.set_user_attr("tune_trial_id", trial_id)
        self._trial_numbers[trial_id] = trial.number
        return dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        trial = self._trial(trial_id)
        value, step = result.get(self._metric), result.get(self._step_attr)
        if trial is None or step is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        frozen = self._frozen(trial.number)
        # A trial restored from its checkpoint reports its last rung again; Optuna keeps the first value.
        if frozen.state == TrialState.RUNNING and int(step) not in frozen.intermediate_values:
            trial.report(float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        number = self._trial_numbers.get(trial_id)
        if number is None or self._frozen(number).state != TrialState.RUNNING:
            return
        if result:
            self.on_trial_result(trial_id, result)
        state = outcome(result, self._full_steps, self._metric, error)
        value = float(result[self._metric]) if state == TrialState.COMPLETE else None
        self.study.tell(number, value, state=state)

    # ---- Tune's experiment checkpoint ------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        # The sampler goes too: Tune restores the searcher pickled when the search started, and a seeded
        # sampler from then would propose the same configs again after a resume.
        state = {"trial_numbers": dict(self._trial_numbers), "sampler": self._sampler}
        if self._storage is None:  # an in-memory study must travel with the state
            state["study"] = self.study
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self._trial_numbers = dict(state["trial_numbers"])
        if "sampler" in state:
            self._sampler = state["sampler"]
            if self._study is not None:
                self._study.sampler = self._sampler
        if "study" in state:
            self._study = state["study"]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        # Trials that were running when the experiment stopped come back under the same Tune ids, and
        # Optuna still holds them as RUNNING, so their later rungs and outcomes land on the same trials.
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher with the Tuner; the study (an open database) is reopened on use.
        state = self.__dict__.copy()
        if self._storage is not None:
            state["_study"] = None
        return state
