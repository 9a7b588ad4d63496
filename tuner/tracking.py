"""MLflow tracking from the driver: one parent run per tuning experiment, one child run per trial.

Only the driver process writes to MLflow, so a local SQLite store never sees two writers. The ids that tie
MLflow to the Tune experiment live in `<experiment dir>/mlflow.json`; on `--resume` the same parent run is
reopened and each trial finds its existing child run by its `trial_id` tag, so no run is duplicated.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from tuner.full_run_tracking import mark_model_training

MLFLOW_EXPERIMENT = "vpsde-tune"
STATE_FILE = "mlflow.json"
METRIC_KEYS = ("train_loss", "val_dsm", "val_bpd", "val_bpd_stderr", "nfe", "eval_seconds", "images_per_sec", "seconds")


def default_tracking_uri(storage: Path) -> str:
    return f"sqlite:///{(storage / 'mlflow.db').resolve()}"


class ExperimentTracker:
    def __init__(self, tracking_uri: str, experiment_dir: Path, run_name: str, storage: Path):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.state_path = experiment_dir / STATE_FILE
        self._child_runs: dict[str, str] = {}
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        if state.get("tracking_uri") == tracking_uri:
            self.experiment_id = state["experiment_id"]
            self.parent_run_id = state["parent_run_id"]
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            self.experiment_id = self._experiment_id(storage)
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={"vpsde.role": "tuning-experiment"})
            self.parent_run_id = run.info.run_id
            experiment_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"tracking_uri": tracking_uri, "experiment_id": self.experiment_id,
                                       "parent_run_id": self.parent_run_id}, indent=2))
            tmp.replace(self.state_path)
        mark_model_training(self.client, self.experiment_id)  # MLflow's UI then opens it on the runs

    def _experiment_id(self, storage: Path) -> str:
        found = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if found is not None:
            return found.experiment_id
        # A local SQLite store keeps artifacts beside it under the storage folder, not in the working dir.
        location = (storage / "mlartifacts").resolve().as_uri() if self.tracking_uri.startswith("sqlite") else None
        return self.client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=location)

    # ---- parent run ----------------------------------------------------------------------------------
    def log_experiment(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        existing = self.client.get_run(self.parent_run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}  # params are write-once in MLflow
        self.client.log_batch(self.parent_run_id, params=[Param(k, _param(v)) for k, v in new.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str], artifacts: list[Path]) -> None:
        now = _now_ms()
        self.client.log_batch(self.parent_run_id,
                              metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        for path in artifacts:
            self.client.log_artifact(self.parent_run_id, str(path))

    def log_report(self, files: list[Path]) -> None:
        """The experiment report (tuner/report.py) under the parent run's report/ folder."""
        for path in files:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path="report")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    # ---- child runs ------------------------------------------------------------------------------
    def child_run(self, trial_id: str, trial_name: str, params: dict[str, Any]) -> str:
        """The trial's child run, created on first sight and found again after a resume or a retry."""
        if trial_id in self._child_runs:
            return self._child_runs[trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.trial_id = '{trial_id}'",
            max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=trial_name, tags={
                "mlflow.parentRunId": self.parent_run_id, "trial_id": trial_id, "status": "running"})
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        self._child_runs[trial_id] = run_id
        return run_id

    def child_run_ids(self) -> dict[str, str]:
        """trial_id -> child run id for the trials that have one."""
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
                                       max_results=10_000)
        return {r.data.tags["trial_id"]: r.info.run_id for r in runs if "trial_id" in r.data.tags}

    def log_rung(self, run_id: str, result: dict[str, Any]) -> None:
        step, now = int(result.get("step", 0)), _now_ms()
        metrics = [Metric(k, float(result[k]), now, step) for k in METRIC_KEYS if k in result and _finite(result[k])]
        tags = [RunTag("reason", str(result["reason"]))] if result.get("reason") else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def log_comparison(self, run_id: str, diff: float, stderr: float, tied: bool) -> None:
        """A re-scored trial's paired difference to the winner (see tuner.export.paired_to_winner)."""
        self.client.log_batch(run_id, metrics=[Metric("paired_diff_to_winner", diff, _now_ms(), 0),
                                               Metric("paired_diff_to_winner_stderr", stderr, _now_ms(), 0)],
                              tags=[RunTag("tied_with_winner", str(tied).lower())])

    def finish_trial(self, run_id: str, status: str, reason: str = "") -> None:
        tags = [RunTag("status", status)] + ([RunTag("reason", reason[:4000])] if reason else [])
        self.client.log_batch(run_id, tags=tags)
        mlflow_status = {"errored": "FAILED", "diverged": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")
        self.client.set_terminated(run_id, status=mlflow_status)


class MlflowTrialLogger(tune.Callback):
    """Mirrors Tune's trial events into child runs of the experiment's parent run, from the driver.

    Tune pickles its callbacks with the experiment state; this one keeps only plain settings and connects
    to MLflow lazily, so after `Tuner.restore` it reopens the same parent run from mlflow.json.
    """

    def __init__(self, tracking_uri: str, experiment_dir: Path, run_name: str, storage: Path, space, max_steps: int):
        self.settings = (tracking_uri, experiment_dir, run_name, storage)
        self.space = space
        self.max_steps = max_steps
        self._tracker: ExperimentTracker | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> ExperimentTracker:
        if self._tracker is None:
            self._tracker = ExperimentTracker(*self.settings)
        return self._tracker

    def _run_id(self, trial) -> str:
        params = {"trial_id": trial.trial_id, **self.space.trial_config(trial.config).flat()}
        return self.tracker.child_run(trial.trial_id, str(trial), params)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.log_rung(self._run_id(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        status = completion_status(last, self.max_steps)
        self.tracker.finish_trial(self._run_id(trial), status, str(last.get("reason") or ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.finish_trial(self._run_id(trial), "errored", _error_summary(trial))


def completion_status(last_result: dict[str, Any], max_steps: int) -> str:
    """How a trial that ended without an exception ended.

    "stopped early" is ASHA's verdict or the experiment's time budget; "not started" is a trial the
    budget ended before its first report.
    """
    if last_result.get("diverged"):
        return "diverged"
    if "step" not in last_result:
        return "not started"
    return "completed" if int(last_result["step"]) >= max_steps else "stopped early"


def trial_status(trial, max_steps: int) -> str:
    """Status words for any trial in a finished or interrupted experiment (the table and MLflow agree)."""
    if trial.status == "ERROR":
        return "errored"
    if trial.status == "TERMINATED":
        return completion_status(trial.last_result or {}, max_steps)
    return "interrupted"


def _error_summary(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines() if path and os.path.exists(path) else []
    except OSError:
        text = []
    return text[-1] if text else "the trial raised an exception (see its error.txt in the experiment folder)"


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
