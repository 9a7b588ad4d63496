"""The searcher tells Optuna what really happened to each trial, at the fidelity it happened at."""

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from tuner.search_tables import SCHEDULERS, SEARCH_ALGORITHMS
from tuner.searcher import OptunaSearcher, make_sampler, make_scheduler, optuna_storage, outcome

SPACE = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "batch_size": CategoricalDistribution([16, 32])}
FULL = 40


def searcher(tmp_path, algorithm="tpe", **kwargs):
    return OptunaSearcher(
        SPACE,
        make_sampler(algorithm, seed=0, startup_trials=2),
        metric="val_bpd",
        mode="min",
        full_steps=FULL,
        study_name="exp",
        storage=optuna_storage(tmp_path),
        **kwargs,
    )


def rung(step, value, **extra):
    return {"step": step, "val_bpd": value, **extra}


def test_outcome_classifies_by_fidelity_reached():
    assert outcome(rung(40, 3.0), FULL, "val_bpd", error=False) == TrialState.COMPLETE
    assert outcome(rung(20, 3.0), FULL, "val_bpd", error=False) == TrialState.PRUNED  # stopped early
    assert outcome(rung(10, math.inf, diverged=True), FULL, "val_bpd", error=False) == TrialState.PRUNED
    assert outcome(rung(40, math.inf), FULL, "val_bpd", error=False) == TrialState.PRUNED  # failed score
    assert outcome(rung(40, 3.0), FULL, "val_bpd", error=True) == TrialState.FAIL
    assert outcome(None, FULL, "val_bpd", error=False) == TrialState.PRUNED


def test_study_holds_each_trial_at_its_true_fidelity(tmp_path):
    s = searcher(tmp_path)
    ids = ["a", "b", "c", "d"]
    params = {tid: s.suggest(tid) for tid in ids}
    assert all(set(p) == set(SPACE) for p in params.values())
    for step in (10, 20, 30, 40):  # a: runs to the end
        s.on_trial_result("a", rung(step, 5.0 - step / 20))
    s.on_trial_complete("a", rung(40, 3.0))
    s.on_trial_result("b", rung(10, 6.0))  # b: ASHA stops it at step 20
    s.on_trial_result("b", rung(20, 5.5))
    s.on_trial_complete("b", rung(20, 5.5))
    s.on_trial_result("c", rung(10, 7.0))  # c: diverges at step 20
    s.on_trial_complete("c", rung(20, math.inf, diverged=True))
    s.on_trial_complete("d", None, error=True)  # d: raised

    study = optuna.load_study(study_name="exp", storage=optuna_storage(tmp_path))
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert by_id["a"].state == TrialState.COMPLETE and by_id["a"].value == 3.0
    assert by_id["a"].intermediate_values == {10: 4.5, 20: 4.0, 30: 3.5, 40: 3.0}
    # Optuna files a pruned trial under its last intermediate value; the samplers rank it by the step first.
    assert by_id["b"].state == TrialState.PRUNED and by_id["b"].value == 5.5
    assert by_id["b"].intermediate_values == {10: 6.0, 20: 5.5}
    assert by_id["c"].state == TrialState.PRUNED and by_id["c"].intermediate_values == {10: 7.0}
    assert by_id["d"].state == TrialState.FAIL
    for tid in ids:
        assert by_id[tid].params == params[tid]


def test_a_repeated_rung_after_a_restore_keeps_the_first_value(tmp_path):
    s = searcher(tmp_path)
    s.suggest("a")
    s.on_trial_result("a", rung(10, 5.0))
    s.on_trial_result("a", rung(10, 4.9))  # the trial restarted from its step-10 checkpoint
    s.on_trial_result("a", rung(20, 4.0))
    trial = optuna.load_study(study_name="exp", storage=optuna_storage(tmp_path)).trials[0]
    assert trial.intermediate_values == {10: 5.0, 20: 4.0}


def test_saved_state_resumes_the_same_study(tmp_path):
    first = searcher(tmp_path)
    first.suggest("a")
    first.suggest("b")
    first.on_trial_complete("a", rung(40, 3.0))
    first.save(str(tmp_path / "searcher.pkl"))

    # A new driver process: Tune unpickles the searcher and restores its state from the experiment folder.
    import pickle

    second = pickle.loads(pickle.dumps(first))
    second.restore(str(tmp_path / "searcher.pkl"))
    second.on_trial_result("b", rung(10, 4.0))
    second.on_trial_complete("b", rung(40, 3.5))
    second.suggest("c")
    study = optuna.load_study(study_name="exp", storage=optuna_storage(tmp_path))
    assert [t.user_attrs["tune_trial_id"] for t in study.trials] == ["a", "b", "c"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    assert study.trials[1].intermediate_values == {10: 4.0, 40: 3.5}


def test_points_to_evaluate_are_asked_first_and_only_once(tmp_path):
    point = {"lr": 1e-3, "batch_size": 32}
    s = searcher(tmp_path, points_to_evaluate=[point])
    assert s.suggest("a") == point
    assert s.suggest("b") != point
    reopened = searcher(tmp_path, points_to_evaluate=[point])  # a resumed experiment
    assert reopened.suggest("c") != point


@pytest.mark.parametrize("algorithm", list(SEARCH_ALGORITHMS))
def test_every_algorithm_drives_the_study_past_its_startup_trials(tmp_path, algorithm):
    s = searcher(tmp_path, algorithm)
    for i in range(5):
        p = s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", rung(40, math.log(p["lr"]) ** 2))
    study = optuna.load_study(study_name="exp", storage=optuna_storage(tmp_path))
    assert len(study.trials) == 5 and all(t.state == TrialState.COMPLETE for t in study.trials)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="algorithm"):
        make_sampler("bayes", 0, 1)


def test_every_scheduler_entry_builds_the_tune_scheduler_its_rungs_describe():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    built = {name: make_scheduler(name, 160, 40, 2) for name in SCHEDULERS}
    assert isinstance(built["asha"], ASHAScheduler) and type(built["fifo"]) is FIFOScheduler
    assert SCHEDULERS["asha"].rungs(160, 40, 2) == [40, 80] and SCHEDULERS["fifo"].rungs(160, 40, 2) == []
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler("pbt", 160, 40, 2)


@pytest.mark.parametrize("algorithm", ["tpe", "random"])
def test_a_resumed_search_does_not_propose_its_first_configs_again(tmp_path, algorithm):
    import pickle

    first = searcher(tmp_path, algorithm)
    at_start = pickle.dumps(first)  # what Tune keeps in tuner.pkl when the search starts
    proposed = [first.suggest(f"t{i}") for i in range(2)]
    for i in range(2):
        first.on_trial_complete(f"t{i}", rung(40, 3.0 + i))
    first.save(str(tmp_path / "searcher.pkl"))

    resumed = pickle.loads(at_start)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    again = [resumed.suggest(f"t{i}") for i in range(2, 4)]
    assert not any(p in proposed for p in again), (proposed, again)
