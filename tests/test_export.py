"""The export without Ray: ranking, the winner and its ties, trials.csv, best_config.yaml.

Tune's analysis object is replaced by the few attributes the export reads (trials with a config and a last
result, their histories, their last checkpoints); the tracker by a recorder of what it is sent.
"""

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import yaml

from tuner.export import write_outputs
from tuner.space import parse_space
from tuner.trials_table import rank_candidates, trials_table
from tuner.winner import TIE_STDERRS, paired_to_winner, pick_winner, ties_with_winner

SPACE = parse_space(
    {
        "name": "unit",
        "fixed": {"train": {"steps": 40, "val_every": 20}},
        "hyperparameters": {
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "ch_mult": {"type": "choice", "values": [[1, 2, 2], [1, 2, 4]]},
        },
        "search": {"grace_period": 20},
    },
    "unit.yaml",
    sha256="0" * 64,
)


def rescore(per_image, failed=False):
    mean = sum(per_image) / len(per_image)
    return {"mean": mean, "per_image": per_image, "failed": failed}


def test_paired_difference_separates_trials_whose_error_bars_overlap():
    rng = random.Random(0)
    images = [rng.uniform(1.5, 4.5) for _ in range(32)]  # image-to-image spread ~0.9 bits/dim
    winner = [v + rng.gauss(0, 0.01) for v in images]
    slightly_worse = [v + 0.05 + rng.gauss(0, 0.01) for v in images]  # 0.05 worse on every image
    same = [v + rng.gauss(0, 0.01) for v in images]
    rescores = {"w": rescore(winner), "worse": rescore(slightly_worse), "same": rescore(same)}

    # Unpaired, the two means are far inside each other's error bars ...
    se = lambda xs: (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5
    assert abs(rescores["worse"]["mean"] - rescores["w"]["mean"]) < se(winner) + se(slightly_worse)
    # ... paired, the difference is measured to a fraction of that.
    out = paired_to_winner(rescores, "w")
    assert math.isclose(out["worse"]["paired_diff"], 0.05, abs_tol=0.01)
    assert out["worse"]["paired_diff_stderr"] < 0.005
    assert out["worse"]["tied_with_winner"] is False
    assert out["same"]["tied_with_winner"] is True
    assert out["w"] == {"paired_diff": 0.0, "paired_diff_stderr": 0.0, "tied_with_winner": True}


def test_tie_rule_is_two_standard_errors():
    base = [2.0, 3.0, 4.0, 5.0]
    for shift, tied in ((0.0, True), (1.0, False)):
        noisy = [b + shift + d for b, d in zip(base, (0.1, -0.1, 0.1, -0.1))]
        c = paired_to_winner({"w": rescore(base), "x": rescore(noisy)}, "w")["x"]
        assert c["tied_with_winner"] is (c["paired_diff"] <= TIE_STDERRS * c["paired_diff_stderr"]) is tied


def test_failed_or_unpaired_rescores_are_left_out():
    rescores = {
        "w": rescore([2.0, 3.0, 4.0]),
        "failed": rescore([2.0, 3.0, 4.0], failed=True),
        "other_images": rescore([2.0, 3.0]),
        "blown_up": rescore([2.0, math.inf, 4.0]),
    }
    assert set(paired_to_winner(rescores, "w")) == {"w"}
    assert paired_to_winner(rescores, "missing") == {}


# ---- ranking, table and winner, from a stand-in for Tune's analysis ---------------------------------------------
def fake_analysis(rows):
    """rows: (trial_id, lr, ch_mult label, val_bpd history by step or None, has checkpoint)."""
    trials, histories, checkpoints = [], {}, {}
    for trial_id, lr, ch_mult, history, has_ckpt in rows:
        last = {"step": max(history), "val_bpd": history[max(history)], "seconds": 1.0} if history else {}
        trials.append(SimpleNamespace(trial_id=trial_id, config={"lr": lr, "ch_mult": ch_mult}, last_result=last))
        if history:
            histories[trial_id] = pd.DataFrame({"step": list(history), "val_bpd": list(history.values())})
        if has_ckpt:
            checkpoints[trial_id] = SimpleNamespace(path=f"/ckpt/{trial_id}")
    return SimpleNamespace(
        trials=trials, trial_dataframes=histories, get_last_checkpoint=lambda trial: checkpoints.get(trial.trial_id)
    )


ROWS = [
    ("a", 1e-3, "1,2,2", {20: 5.0, 40: 3.1}, True),
    ("b", 2e-3, "1,2,4", {20: 4.0, 40: 2.9}, True),
    ("c", 3e-3, "1,2,2", {20: 3.5}, True),  # stopped early, with the best rung-1 score
    ("d", 1e-2, "1,2,4", {20: math.inf}, True),  # diverged
    ("e", 5e-3, "1,2,2", {20: 2.0, 40: 2.5}, False),  # no checkpoint left: cannot be re-scored
    ("f", 4e-3, "1,2,4", None, False),
]  # never reported
STATUSES = {
    "a": "completed",
    "b": "completed",
    "c": "stopped early",
    "d": "diverged",
    "e": "completed",
    "f": "not started",
}


def test_candidates_are_the_best_last_scores_with_a_checkpoint():
    ranked = rank_candidates(fake_analysis(ROWS), STATUSES, top_k=3)
    assert [(t.trial_id, path) for t, path in ranked] == [("b", "/ckpt/b"), ("a", "/ckpt/a"), ("c", "/ckpt/c")]
    assert [t.trial_id for t, _ in rank_candidates(fake_analysis(ROWS), STATUSES, top_k=1)] == ["b"]


def test_the_table_sorts_by_accurate_then_fast_and_decodes_choices():
    rescores = {
        "a": {"mean": 2.7, "stderr": 0.1, "nfe": 128, "failed": False},
        "b": {"mean": 2.8, "stderr": 0.1, "nfe": 128, "failed": False},
        "c": {"mean": math.inf, "failed": True, "reason": "ODE failed"},
    }
    table = trials_table(fake_analysis(ROWS), SPACE, STATUSES, rescores, {"a": "run-a"})
    assert list(table.trial_id) == ["a", "b", "e", "c", "d", "f"]
    a = table.iloc[0]
    assert a.ch_mult == "[1, 2, 2]" and a.val_bpd_accurate == 2.7 and a.mlflow_run_id == "run-a"
    assert table.set_index("trial_id").loc["e", "val_bpd_best"] == 2.0  # the best rung, not the last
    assert table.set_index("trial_id").loc["c", "reason"] == "ODE failed"
    assert math.isnan(table.set_index("trial_id").loc["c", "val_bpd_accurate"])
    assert table.set_index("trial_id").loc["f", "steps"] == 0


class RecordingTracker:
    tracking_uri, experiment_id, parent_run_id = "sqlite:///x.db", "1", "parent"

    def __init__(self):
        self.comparisons, self.summary = {}, None

    def log_comparison(self, run_id, diff, stderr, tied):
        self.comparisons[run_id] = (diff, stderr, tied)

    def log_summary(self, metrics, tags, artifacts):
        self.summary = (metrics, tags, [Path(p).name for p in artifacts])


def test_the_accurate_winner_its_ties_and_best_config(tmp_path):
    per_image = {"a": [2.70, 2.60, 2.80, 2.75], "b": [2.71, 2.62, 2.81, 2.77], "c": [3.1, 3.0, 3.2, 3.3]}
    rescores = {
        tid: {"mean": sum(v) / 4, "stderr": 0.05, "per_image": v, "failed": False, "fidelity": {"name": "accurate"}}
        for tid, v in per_image.items()
    }
    analysis = fake_analysis(ROWS)
    table = trials_table(analysis, SPACE, STATUSES, rescores, {"a": "run-a", "b": "run-b", "c": "run-c"})
    tracker = RecordingTracker()
    export = write_outputs(tmp_path, SPACE, table, rescores, analysis, tracker)
    assert (export.winner_id, export.winner_fidelity) == ("a", "accurate")
    assert export.tied == []  # b is worse on every image: paired, not tied, though the error bars overlap
    assert tracker.comparisons["run-b"][0] > 0 and tracker.comparisons["run-b"][2] is False
    written = pd.read_csv(tmp_path / "trials.csv")
    assert list(written.trial_id[:3]) == ["a", "b", "c"] and not written.tied_with_winner[1]
    best = yaml.safe_load((tmp_path / "best_config.yaml").read_text())
    assert best["train"]["lr"] == 1e-3 and best["model"]["ch_mult"] == [1, 2, 2]
    assert best["provenance"]["trial_id"] == "a" and best["provenance"]["mlflow_run_id"] == "run-a"
    assert best["provenance"]["checkpoint"] == "/ckpt/a"
    metrics, tags, artifacts = tracker.summary
    assert tags == {"winner_trial_id": "a"} and metrics["trials"] == 6
    assert artifacts == ["trials.csv", "rescores.json", "best_config.yaml"]


def test_without_rescores_the_fast_score_picks_the_winner(tmp_path):
    analysis = fake_analysis(ROWS)
    table = trials_table(analysis, SPACE, STATUSES, {}, {})
    export = write_outputs(tmp_path, SPACE, table, {}, analysis, RecordingTracker())
    assert (export.winner_id, export.winner_fidelity) == ("e", "fast")  # 2.5, finite; d's inf is not a score


# ---- the one rule for the winner and its ties (the report reads an experiment folder by the same functions) ----------
def test_the_fast_winner_is_never_an_errored_or_diverged_trial():
    rows = [("x", "errored", 1.0), ("y", "diverged", math.inf), ("z", "stopped early", 2.0), ("w", "completed", 2.0)]
    assert pick_winner({}, rows) == ("z", 2.0, "fast")  # x's last score is lower, but it raised; ties go to the first
    rescores = {"w": {"mean": 3.0, "failed": False}, "z": {"mean": 1.0, "failed": True}}
    assert pick_winner(rescores, rows) == ("w", 3.0, "accurate")  # any working re-score beats every fast score
    assert pick_winner({}, rows[:2]) is None


def test_ties_use_the_recorded_paired_verdicts_else_say_the_rule_is_the_rough_one():
    rescores = {
        "w": rescore([2.0, 3.0, 4.0, 5.0]),
        "x": rescore([2.1, 2.9, 4.1, 4.9]),
        "y": rescore([3.0, 4.0, 5.0, 6.0]),
        "bad": rescore([1.0, 1.0, 1.0, 1.0], failed=True),
    }
    for r in rescores.values():
        r["stderr"] = 0.6  # every interval overlaps the winner's
    assert ties_with_winner(rescores, "w") == ({"w": True, "x": True, "y": True}, "overlap")
    paired = {tid: {**r, **paired_to_winner(rescores, "w").get(tid, {})} for tid, r in rescores.items()}
    assert ties_with_winner(paired, "w") == (
        {"w": True, "x": True, "y": False},
        "paired",
    )  # y: 1.0 worse on every image
    assert ties_with_winner(rescores, "gone") == ({}, "missing")
