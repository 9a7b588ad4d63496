"""How values read on the page and in the figures: hyperparameters decoded from the searcher's labels, short."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment


def decoded(exp: Experiment, name: str, value: Any) -> Any:
    hp = next((h for h in exp.space.hyperparameters if h.name == name), None)
    try:
        return hp.decode(value) if hp is not None and value is not None else value
    except KeyError:
        return value


def params_text(exp: Experiment, trial_id: str) -> str:
    trial = next((t for t in exp.trials if t.trial_id == trial_id), None)
    if trial is None:
        return ""
    return ", ".join(f"{n} {short(decoded(exp, n, v))}" for n, v in trial.params.items())


def short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
