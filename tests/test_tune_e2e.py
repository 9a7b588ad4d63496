"""End to end on a local Ray: tune.py runs a tiny experiment, survives a failing trial, and resumes.

Each test starts its own Ray through `tune.py` in a subprocess, exactly as a user would run it.
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from trials.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
pytestmark = pytest.mark.slow


def space_file(tmp_path: Path, **search) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["search"].update(search)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tune(tmp_path, space: Path, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--storage", str(tmp_path / "runs"), *extra]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return out


def mlflow_runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vpsde-tune")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def study_trials(experiment: Path) -> dict:
    """The searcher's Optuna study, by Tune trial id."""
    study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    ids = [t.user_attrs["tune_trial_id"] for t in study.trials]
    assert len(ids) == len(set(ids)), f"a Tune trial was asked twice: {ids}"
    return dict(zip(ids, study.trials))


def test_tiny_experiment_with_a_failing_trial(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    # One hyperparameter value that raises inside the trial on any machine with fewer than 8 GPUs; the
    # first point forces it, so the experiment must record an errored trial and still finish.
    raw["hyperparameters"]["train.device"] = {"type": "choice", "values": ["cpu", "cuda:7"]}
    raw["search"].update(
        num_samples=4, points_to_evaluate=[{"train.device": "cuda:7"}, {"train.device": "cpu"}], max_failures=1
    )
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))

    out = tune(tmp_path, space)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in out.stdout

    experiment = tmp_path / "runs" / "tiny"
    table = pd.read_csv(experiment / "trials.csv")
    assert len(table) == 4
    errored = table[table.status == "errored"]
    assert len(errored) >= 1 and set(errored["train.device"]) == {"cuda:7"}
    ok = table[table.status != "errored"]
    assert len(ok) >= 1 and ok["val_bpd_last"].map(math.isfinite).all()
    assert set(table.status) <= {"completed", "stopped early", "errored"}

    cfg, provenance = load_config_file(experiment / "best_config.yaml")  # what train.py --config loads
    assert provenance["trial_id"] in set(ok.trial_id)
    assert cfg.train.device == "cpu" and cfg.model.ch == TINY["fixed"]["model"]["ch"]
    assert provenance["space_sha256"] and provenance["code_version"]
    winner = table[table.trial_id == provenance["trial_id"]].iloc[0]
    assert math.isclose(provenance["val_bpd_accurate"], winner.val_bpd_accurate)
    # the winner is the best accurate re-score, not the best fast score
    assert winner.val_bpd_accurate == table.val_bpd_accurate.min()

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_id == provenance["mlflow_parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "rescores.json"} <= artifacts
    report = experiment / "report" / "report.html"  # written at the end, named in the output, attached
    assert report.is_file() and str(report) in out.stdout
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "best_val_bpd_accurate" in parent.data.metrics
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert set(by_trial) == set(table.trial_id)
    for trial_id, run in by_trial.items():
        status = table[table.trial_id == trial_id].status.iloc[0]
        assert run.data.tags["status"] == status
        assert run.data.params["train.lr"]  # the trial's full config is logged as params
        if status == "errored":
            assert run.info.status == "FAILED" and "CUDA" in run.data.tags.get("reason", "")
        else:
            history = client.get_metric_history(run.info.run_id, "val_bpd")
            assert [m.step for m in history] == list(
                range(10, int(table[table.trial_id == trial_id].steps.iloc[0]) + 1, 10)
            )

    # The searcher's study saw each trial at the fidelity it reached: stopped trials are pruned at their
    # last rung with every rung as an intermediate value, not completed with an early value.
    study = study_trials(experiment)
    assert set(study) == set(table.trial_id)
    expected_state = {
        "completed": optuna.trial.TrialState.COMPLETE,
        "stopped early": optuna.trial.TrialState.PRUNED,
        "errored": optuna.trial.TrialState.FAIL,
    }
    for row in table.itertuples():
        trial = study[row.trial_id]
        assert trial.state == expected_state[row.status], row.trial_id
        if row.status != "errored":
            history = client.get_metric_history(by_trial[row.trial_id].info.run_id, "val_bpd")
            assert trial.intermediate_values == {m.step: m.value for m in history}
        if row.status == "completed":
            assert math.isclose(trial.value, row.val_bpd_last)
    # The re-scored trials carry their paired difference to the winner; the winner ties with itself.
    rescored = table[table.val_bpd_accurate.notna()]
    assert rescored.paired_diff.notna().all() and (rescored.paired_diff_stderr >= 0).all()
    assert winner.paired_diff == 0 and bool(winner.tied_with_winner)


def test_interrupted_experiment_resumes_without_duplicate_runs(tmp_path):
    space = space_file(tmp_path, num_samples=4, max_concurrent=1)
    proc = tune(tmp_path, space, wait=False)
    try:
        deadline = time.time() + 300
        finished = []
        while time.time() < deadline and not finished:
            time.sleep(2)
            if (tmp_path / "runs" / "mlflow.db").exists():
                try:
                    _, _, children = mlflow_runs(tmp_path)
                except Exception:  # the driver may be creating the tables right now
                    continue
                finished = [c for c in children if c.info.status == "FINISHED"]
        assert finished, "no trial finished within 300 s"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "--resume" in output
    assert not (tmp_path / "runs" / "tiny" / "best_config.yaml").exists()
    _, _, before = mlflow_runs(tmp_path)
    done_before = {c.data.tags["trial_id"] for c in before if c.info.status == "FINISHED"}

    out = tune(tmp_path, space, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    trial_ids = [c.data.tags["trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 4  # one child run per trial, none duplicated
    table = pd.read_csv(tmp_path / "runs" / "tiny" / "trials.csv")
    assert len(table) == 4 and set(table.trial_id) == set(trial_ids)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_bpd")]
        assert len(steps) == len(set(steps)), f"trial {run.data.tags['trial_id']} re-ran steps {steps}"
    assert done_before <= set(trial_ids)
    study = study_trials(tmp_path / "runs" / "tiny")  # the resumed search kept asking the same study
    assert set(study) == set(trial_ids)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.values())
    assert (tmp_path / "runs" / "tiny" / "best_config.yaml").exists()
    assert (tmp_path / "runs" / "tiny" / "report" / "report.html").exists()  # the report comes after a resume too


def test_resume_without_an_experiment_is_a_one_line_error(tmp_path):
    out = tune(tmp_path, ROOT / "search_spaces" / "tiny.yaml", "--resume")
    assert out.returncode == 2 and "no experiment to resume" in out.stderr and "Traceback" not in out.stderr
