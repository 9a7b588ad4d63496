"""What the report concludes from an experiment beyond its records: which trials tie with the winner (by the
export's rule, tuner/winner.py, so the page never disagrees with trials.csv) and where the scheduler may stop
a trial (by the scheduler table, tuner/search_tables.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.search_tables import SCHEDULERS
from tuner.winner import TIE_STDERRS, ties_with_winner

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment
    from tuner.search_space import SearchSpace


TIE_NOTES = {
    "paired": (
        f"Tied: the export's paired comparison with the winner on the same images cannot tell them apart "
        f"(paired difference within {TIE_STDERRS:g} standard errors; paired_diff ± paired_diff_stderr in the table)."
    ),
    "overlap": (
        "No paired differences were recorded, so tied means only that the mean ± stderr intervals "
        "overlap: a rough rule that ignores that every trial is scored on the same images."
    ),
    "missing": "The winner's re-score is missing.",
}


def ties(exp: Experiment) -> tuple[dict[str, bool], str]:
    """Which re-scored trials are tied with the winner, and how that was decided."""
    if exp.winner is None or exp.winner.fidelity != "accurate":
        return {}, "No accurate re-scores yet (the search has not finished)."
    tied, rule = ties_with_winner(exp.rescores, exp.winner.trial_id, exp.table)
    return tied, TIE_NOTES[rule]


def stopping_rule(space: SearchSpace) -> tuple[list[int], str]:
    """The steps below the full length at which the space's scheduler may stop a trial (none for FIFO), and
    its rule in words: the report's one question to the scheduler table (the curves draw the rungs, the
    caption says the rule)."""
    s = space.search
    scheduler = SCHEDULERS[s.scheduler]
    return (
        scheduler.rungs(space.base_config.train.steps, s.grace_period, s.reduction_factor),
        scheduler.stopping_rule(s.grace_period, s.reduction_factor),
    )
