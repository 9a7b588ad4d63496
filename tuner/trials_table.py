"""The trials table of a finished search, built from Tune's results: one row per trial (its hyperparameters
as the config holds them, status, fast and accurate scores, steps, seconds, MLflow run id), best first; and
the top k trials whose checkpoints are re-scored at accurate fidelity.

`analysis` is Tune's ExperimentAnalysis, read only through `trials`, `trial_dataframes` and
`get_last_checkpoint`, so the tests hand in a stand-in without Ray.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from tuner.mlflow_runs import is_finite_number
from tuner.search_space import SearchSpace
from tuner.winner import NOT_CANDIDATES


def rank_candidates(analysis, statuses: dict[str, str], top_k: int) -> list[tuple[Any, str]]:
    """The top k trials by their last fast val bits/dim (the score of the checkpoint they leave)."""
    scored = []
    for trial in analysis.trials:
        bpd = (trial.last_result or {}).get("val_bpd")
        if statuses.get(trial.trial_id) in NOT_CANDIDATES or not is_finite_number(bpd):
            continue
        checkpoint = analysis.get_last_checkpoint(trial)
        if checkpoint is not None:
            scored.append((bpd, trial, checkpoint.path))
    scored.sort(key=lambda item: item[0])
    return [(trial, path) for _, trial, path in scored[:top_k]]


def trials_table(
    analysis, space: SearchSpace, statuses: dict[str, str], rescores: dict[str, dict], run_ids: dict[str, str]
) -> pd.DataFrame:
    histories = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        history = histories.get(trial.trial_id)
        reported = history["val_bpd"] if history is not None and "val_bpd" in history else pd.Series(dtype=float)
        rescore = rescores.get(trial.trial_id, {})
        row = {"trial_id": trial.trial_id, "status": statuses.get(trial.trial_id, "unknown")}
        for hp in space.hyperparameters:
            value = hp.decode(trial.config[hp.name]) if hp.name in trial.config else None
            row[hp.name] = json.dumps(list(value)) if isinstance(value, (list, tuple)) else value
        row.update(
            {
                "val_bpd_last": last.get("val_bpd", math.nan),
                "val_bpd_best": reported.replace([math.inf], math.nan).min() if len(reported) else math.nan,
                "val_bpd_accurate": math.nan if rescore.get("failed", True) else rescore["mean"],
                "val_bpd_accurate_stderr": rescore.get("stderr", math.nan),
                "accurate_nfe": rescore.get("nfe", math.nan),
                "steps": last.get("step", 0),
                "seconds": last.get("seconds", math.nan),
                "mlflow_run_id": run_ids.get(trial.trial_id, ""),
                "reason": last.get("reason", "") or rescore.get("reason") or "",
            }
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["val_bpd_accurate", "val_bpd_last"], na_position="last", kind="stable").reset_index(
        drop=True
    )
