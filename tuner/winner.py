"""Who won a search and who ties with the winner: the one rule the export writes (trials.csv, rescores.json,
best_config.yaml) and the report reads those files by, so the two never disagree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

import pandas as pd

from tuner.mlflow_runs import is_finite_number

# Trials whose score says nothing about their config: never re-scored, never the winner.
NOT_CANDIDATES = ("errored", "diverged")
# A re-scored trial is tied with the winner when its paired difference is within this many standard errors.
TIE_STDERRS = 2.0


def paired_to_winner(rescores: dict[str, dict], winner_id: str) -> dict[str, dict[str, Any]]:
    """Each re-score's mean per-image difference to the winner's, its standard error, and whether it ties.

    The evaluator scores every trial on the same images with the same dequantization noise and probes, so
    per-image bits/dim are paired: the difference cancels the image-to-image spread that dominates each
    score's own error bar, and two trials whose error bars overlap can still be told apart.
    """
    base = rescores.get(winner_id, {}).get("per_image") or []
    out = {}
    for trial_id, r in rescores.items():
        values = r.get("per_image") or []
        if r.get("failed") or len(values) != len(base) or len(base) < 2:
            continue
        diffs = [a - b for a, b in zip(values, base)]
        if not all(math.isfinite(d) for d in diffs):
            continue
        mean, stderr = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
        out[trial_id] = {
            "paired_diff": mean,
            "paired_diff_stderr": stderr,
            "tied_with_winner": bool(mean <= TIE_STDERRS * stderr),
        }
    return out


def pick_winner(
    rescores: dict[str, dict], last_scores: Iterable[tuple[str, str, Any]]
) -> tuple[str, float, str] | None:
    """The winner as (trial id, bits/dim, fidelity), or None when no trial has a score.

    The best accurate re-score wins, so the winner is not picked by the fast estimate's noise. Without one
    (the search has not finished, or every re-score failed) the best last fast score of the trials that may be
    candidates wins: `last_scores` is (trial id, status, last fast val bits/dim) per trial, ties to the first.
    """
    good = {tid: r["mean"] for tid, r in rescores.items() if not r.get("failed") and is_finite_number(r.get("mean"))}
    if good:
        tid = min(good, key=good.get)
        return tid, float(good[tid]), "accurate"
    fast = [
        (tid, float(bpd)) for tid, status, bpd in last_scores if status not in NOT_CANDIDATES and is_finite_number(bpd)
    ]
    if fast:
        tid, bpd = min(fast, key=lambda item: item[1])
        return tid, bpd, "fast"
    return None


def ties_with_winner(
    rescores: dict[str, dict], winner_id: str, table: pd.DataFrame | None = None
) -> tuple[dict[str, bool], str]:
    """Which re-scored trials tie with the winner, and by which rule:

    "paired"   the verdicts `paired_to_winner` recorded (in the re-scores, or trials.csv's column);
    "overlap"  an export that recorded none (older than the paired comparison): the mean ± stderr
               intervals overlap, a rough rule that ignores that every trial is scored on the same images;
    "missing"  the winner has no re-score.
    """
    scored = {tid: r for tid, r in rescores.items() if not r.get("failed") and is_finite_number(r.get("mean"))}
    recorded = {tid: bool(r["tied_with_winner"]) for tid, r in scored.items() if "tied_with_winner" in r}
    if table is not None and "tied_with_winner" in table.columns and not recorded:
        recorded = {
            tid: bool(v) for tid, v in zip(table.trial_id, table.tied_with_winner) if tid in scored and not pd.isna(v)
        }
    if recorded:
        recorded[winner_id] = True
        return recorded, "paired"
    w = scored.get(winner_id)
    if w is None:
        return {}, "missing"
    width = lambda r: float(r["stderr"]) if is_finite_number(r.get("stderr")) else 0.0
    return {tid: abs(r["mean"] - w["mean"]) <= width(r) + width(w) for tid, r in scored.items()}, "overlap"
