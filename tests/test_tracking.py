"""The driver's MLflow tracking on a real SQLite store, without Ray: statuses, a child run found again after a
resume, what a child run holds, and the conventions every run shares (tuner/mlflow_runs.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from tuner.mlflow_runs import (
    MLFLOW_EXPERIMENT,
    ROLE_TAG,
    artifact_location,
    completion_status,
    default_tracking_uri,
    is_finite_number,
    param_value,
    trial_status,
)
from tuner.tracking import ExperimentTracker


@pytest.mark.parametrize(
    "last, status",
    [
        ({"step": 40, "val_bpd": 3.0}, "completed"),
        ({"step": 80, "val_bpd": 3.0}, "completed"),
        ({"step": 20, "val_bpd": 3.0}, "stopped early"),
        ({"step": 20, "diverged": True}, "diverged"),
        ({}, "not started"),
    ],
)
def test_how_a_trial_ended(last, status):
    assert completion_status(last, max_steps=40) == status
    assert trial_status(SimpleNamespace(status="TERMINATED", last_result=last), 40) == status


def test_errored_and_unfinished_trials():
    assert trial_status(SimpleNamespace(status="ERROR", last_result={"step": 40}), 40) == "errored"
    assert trial_status(SimpleNamespace(status="RUNNING", last_result={"step": 20}), 40) == "interrupted"


def test_conventions():
    assert param_value([1, 2, 4]) == "[1, 2, 4]" and param_value(0.001) == "0.001"
    assert not is_finite_number(float("inf")) and not is_finite_number(True) and is_finite_number(3)
    uri = default_tracking_uri(Path("/tmp/somewhere"))
    assert uri == "sqlite:////tmp/somewhere/mlflow.db"
    assert artifact_location(uri) == "file:///tmp/somewhere/mlartifacts"
    assert artifact_location("http://127.0.0.1:5000") is None  # the server decides


def test_a_resumed_tracker_finds_its_parent_and_child_runs_again(tmp_path):
    uri = default_tracking_uri(tmp_path)
    experiment_dir = tmp_path / "exp"
    tracker = ExperimentTracker(uri, experiment_dir, "exp")
    run_id = tracker.child_run("t1", "run_trial_t1", {"train.lr": 0.001, "model.ch_mult": [1, 2, 2]})
    tracker.log_rung(run_id, {"step": 20, "val_bpd": 4.0, "train_loss": 1.5, "precision": "bf16"})
    tracker.log_rung(run_id, {"step": 20, "val_bpd": 4.0})  # the same rung again (a resumed trial): ignored
    assert tracker.flush()
    parent_id = tracker.parent_run_id

    # A new process (tune.py --resume): the same parent, the same child, later rungs appended.
    again = ExperimentTracker(uri, experiment_dir, "exp")
    assert again.parent_run_id == parent_id
    assert again.child_run("t1", "run_trial_t1", {"train.lr": 0.001, "model.ch_mult": [1, 2, 2]}) == run_id
    again.log_rung(run_id, {"step": 40, "val_bpd": 3.0})
    again.finish_trial(run_id, "completed")
    again.finish("FINISHED")
    assert again.flush()
    assert again.child_run_ids() == {"t1": run_id}

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    child = client.get_run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.data.tags["trial_id"] == "t1"
    assert child.data.tags["status"] == "completed" and child.data.tags["precision"] == "bf16"
    assert child.data.tags[ROLE_TAG] == "trial" and child.info.status == "FINISHED"
    assert child.data.params["model.ch_mult"] == "[1, 2, 2]"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_bpd")] == [(20, 4.0), (40, 3.0)]
    parent = client.get_run(parent_id)
    assert parent.data.tags[ROLE_TAG] == "tuning-experiment" and parent.info.status == "FINISHED"


def test_a_tracker_sending_in_the_background_leaves_the_same_record(tmp_path):
    """What Tune's callback does through `ExperimentTracker.open`: appends only; the sender thread sends; the
    runs, histories, statuses and the ids in mlflow.json come out as a tracker sending in the foreground leaves them."""
    uri = default_tracking_uri(tmp_path)
    experiment_dir = tmp_path / "exp"
    tracker = ExperimentTracker(uri, experiment_dir, "exp", background=True)
    refs = {tid: tracker.child_run(tid, f"trial {tid}", {"train.lr": 0.001}) for tid in ("t1", "t2")}
    for step in (10, 20, 30):
        for ref in refs.values():
            tracker.log_rung(ref, {"step": step, "val_bpd": 5.0 - step / 10, "seconds": float(step)})
    tracker.log_rung(refs["t1"], {"step": 30, "val_bpd": 2.0, "seconds": 30.0})  # a repeated rung: ignored
    for ref in refs.values():
        tracker.finish_trial(ref, "completed")
    tracker.finish("FINISHED")
    assert tracker.flush() and tracker.outbox.pending == 0
    tracker.outbox.close()

    ids = tracker.child_run_ids()
    state = json.loads((experiment_dir / "mlflow.json").read_text())
    assert set(ids) == {"t1", "t2"} and state["child_runs"] == ids and state["parent_run_id"] == tracker.parent_run_id
    client = MlflowClient(tracking_uri=uri)
    for tid, run_id in ids.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == tid
        assert run.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_bpd")] == [
            (10, 4.0),
            (20, 3.0),
            (30, 2.0),
        ]
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"
