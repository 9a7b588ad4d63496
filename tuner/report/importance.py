"""Which hyperparameters moved the score: fANOVA importance over the trials that reached the full length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuner.mlflow_runs import is_finite_number

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment


@dataclass
class Importance:
    values: dict[str, float] | None  # None: omitted, see note
    trial_ids: list[str]
    note: str


def importance(exp: Experiment) -> Importance:
    """fANOVA importance (Optuna's default evaluator, seeded) for the final fast val bits/dim, over the trials
    that reached the full length: a trial ASHA stopped early was scored after fewer steps, so its score
    answers another question. The study is built in memory from the records, not taken from the searcher."""
    import optuna  # here, not at the top: reading and drawing the rest of the report does not need it

    full = [
        t for t in exp.trials if t.status == "completed" and t.steps >= exp.max_steps and is_finite_number(t.final_bpd)
    ]
    ids = [t.trial_id for t in full]
    if len(full) < 2:
        return Importance(
            None,
            ids,
            f"Omitted: importance needs at least 2 trials that reached the full "
            f"{exp.max_steps} steps, and this experiment has {len(full)}.",
        )
    if len({t.final_bpd for t in full}) == 1:
        return Importance(None, ids, "Omitted: every trial that reached the full length has the same score.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = exp.space.to_optuna()
    study = optuna.create_study(direction="minimize")
    try:
        for t in full:
            study.add_trial(
                optuna.trial.create_trial(
                    params={name: t.params[name] for name in distributions},
                    distributions=distributions,
                    value=t.final_bpd,
                )
            )
    except (KeyError, ValueError) as exc:
        return Importance(None, ids, f"Omitted: a trial's hyperparameters do not fit the space file ({exc}).")
    values = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    n = len(full)
    rough = (
        "With this few trials the estimate is rough: it says which hyperparameters moved the score among "
        "these trials, not how they act over the whole space."
        if n < 20
        else "It says which hyperparameters moved the score among these trials."
    )
    note = (
        f"fANOVA (Optuna's FanovaImportanceEvaluator, 64 trees, seed 0) over the {n} of {len(exp.trials)} trials "
        f"that reached the full {exp.max_steps} steps, for their final val bits/dim (fast fidelity). {rough}"
    )
    return Importance({k: float(v) for k, v in values.items()}, ids, note)
