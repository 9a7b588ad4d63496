"""The typed search space a space file becomes (tuner/space.py reads the file): the hyperparameters, the
search and resource settings, and the fixed config they are laid over.

A `Hyperparameter` holds every rule that depends on its kind (labels, ranges, middles, Optuna and Ray
domains), so no caller branches on `kind`. Choices whose values are lists (ch_mult) travel through Optuna as
string labels, because Optuna's categorical distributions only hold scalars; `SearchSpace.trial_config` turns
labels back into values.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from trials.config import TrialConfig, set_dotted

KINDS = ("loguniform", "uniform", "randint", "choice")


@dataclass(frozen=True)
class Hyperparameter:
    name: str  # as written in the file, and as Optuna and Ray see it
    path: str  # the TrialConfig field it sets, e.g. "train.lr"
    kind: str  # loguniform | uniform | randint | choice
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def labels(self) -> list[Any]:
        """The choices as the searcher sees them: scalars as they are, lists as 'a,b,c' strings."""
        return [self.label(v) for v in self.values]

    def label(self, value: Any) -> Any:
        """One value, as written in a space file or a config, as the searcher sees it."""
        return _label(value)

    def decode(self, sampled: Any) -> Any:
        if not self.is_choice:
            return sampled
        for value in self.values:
            if self.label(value) == sampled:
                return value
        raise KeyError(f"{self.name}: {sampled!r} is not one of the choices")

    # Every rule that depends on the kind lives here, so a caller never branches on `kind` itself.
    @property
    def is_choice(self) -> bool:
        return self.kind == "choice"

    @property
    def log_scale(self) -> bool:
        """True when the range is searched (and best plotted) on a log axis."""
        return self.kind == "loguniform"

    def contains(self, value: Any) -> bool:
        """Whether `value`, as written in a space file, is one of the choices or a number in the range."""
        if self.is_choice:
            return self.label(value) in self.labels()
        return not isinstance(value, bool) and isinstance(value, (int, float)) and self.low <= value <= self.high

    def middle(self) -> Any:
        """A representative value, as the searcher sees it: the middle choice, or the middle of the range
        (geometric on a log scale, rounded down for integers)."""
        if self.is_choice:
            return self.labels()[len(self.values) // 2]
        if self.log_scale:
            return math.sqrt(self.low * self.high)
        if self.kind == "randint":
            return int((self.low + self.high) // 2)
        return (self.low + self.high) / 2

    def probes(self) -> list[Any]:
        """The values that must all make a valid config: every choice, or both ends of the range."""
        if self.is_choice:
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        """'loguniform [1e-05, 0.01]', 'choice [16, 32]'."""
        return f"{self.kind} {list(self.values) if self.is_choice else [self.low, self.high]}"

    def distribution(self):
        """The Optuna distribution Optuna's samplers draw it from."""
        import optuna.distributions as od

        if self.is_choice:
            return od.CategoricalDistribution(self.labels())
        if self.kind == "randint":
            return od.IntDistribution(int(self.low), int(self.high))
        return od.FloatDistribution(self.low, self.high, log=self.log_scale)

    def ray_domain(self):
        """The same as a Ray Tune search domain."""
        from ray import tune

        if self.is_choice:
            return tune.choice(self.labels())
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Ray's upper bound is exclusive
        return (tune.loguniform if self.log_scale else tune.uniform)(self.low, self.high)


@dataclass(frozen=True)
class SearchSettings:
    algorithm: str = "tpe"  # an Optuna sampler: a name of tuner.search_tables.SEARCH_ALGORITHMS
    startup_trials: int = 10  # random trials before TPE or GP model the results (Optuna's default)
    scheduler: str = "asha"  # a name of tuner.search_tables.SCHEDULERS
    num_samples: int = 16
    max_concurrent: int = 2
    seed: int = 0
    grace_period: int = 100  # steps every trial gets before ASHA may stop it
    reduction_factor: int = 3
    top_k: int = 3  # trials re-scored at accurate fidelity after the search
    time_budget_s: float | None = None
    max_failures: int = 1  # retries of a trial that raises, from its last checkpoint


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # used only when the Ray cluster has GPUs


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str  # the file it came from
    sha256: str  # of the file's bytes: provenance in best_config.yaml
    hyperparameters: tuple[Hyperparameter, ...]
    fixed: dict[str, Any] = field(hash=False)  # TrialConfig dict the hyperparameters are laid over
    search: SearchSettings = SearchSettings()
    resources: Resources = Resources()
    # Configs tried first (e.g. a known-good setting), complete and as searcher labels.
    points_to_evaluate: tuple[dict[str, Any], ...] = ()

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The complete config of the trial that Optuna or Ray sampled `params` for."""
        tree = copy.deepcopy(self.fixed)
        by_name = {hp.name: hp for hp in self.hyperparameters}
        for name, sampled in params.items():
            hp = by_name[name]
            set_dotted(tree, hp.path, hp.decode(sampled))
        return TrialConfig.from_dict(tree)

    def check(self) -> None:
        """Raise ConfigError now if the fixed config is not a valid TrialConfig (e.g. data 'mnist', no root)."""
        _ = self.base_config

    @cached_property
    def base_config(self) -> TrialConfig:
        """The fixed part with every default filled in, checked once (a SpaceError-worthy ConfigError if not)."""
        return TrialConfig.from_dict(self.fixed)

    def to_optuna(self) -> dict[str, Any]:
        return {hp.name: hp.distribution() for hp in self.hyperparameters}

    def to_ray(self) -> dict[str, Any]:
        return {hp.name: hp.ray_domain() for hp in self.hyperparameters}


def _label(value: Any) -> Any:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
