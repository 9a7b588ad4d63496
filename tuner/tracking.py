"""MLflow tracking from the driver: one parent run per tuning experiment, one child run per trial.

Only the driver process writes to MLflow, so a local SQLite store never sees two writers. Every write goes
through the experiment folder's `Outbox` (tuner/outbox.py), sent by its background sender: Tune's callback only
appends to a local journal, so neither a slow tracking store nor one that stops answering slows the search, and
what it missed is sent when it answers again.

The ids that tie MLflow to the Tune experiment live in `<experiment dir>/mlflow.json` (tuner/tracking_state.py);
on `--resume` the same parent run is reopened and each trial finds its existing child run by its `trial_id` tag
(tuner/trial_runs.py), so no run is duplicated. This module holds the parent run, the one tracker a process
shares per experiment, and Tune's callback (kept here: Tune pickles it with the experiment, by this module's
name, and `Tuner.restore` of an existing experiment must find it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from tuner.mlflow_runs import (
    MLFLOW_EXPERIMENT,
    ROLE_TAG,
    ROLE_TUNING,
    artifact_location,
    completion_status,
    is_finite_number,
    param_value,
    trial_run_name,
)
from tuner.outbox import Outbox, now_ms
from tuner.tracking_state import TrackingState, read_state
from tuner.trial_runs import TrialRuns

# One tracker per experiment folder and store in this process: the driver and Tune's callback share its outbox,
# so their records stay in one order.
_OPEN: dict[tuple[str, str], ExperimentTracker] = {}


class ExperimentTracker:
    """The MLflow runs of one tuning experiment: its parent run here, its child runs in `trials`."""

    def __init__(
        self, tracking_uri: str, experiment_dir: Path, run_name: str, *, reopen: bool = True, background: bool = False
    ):
        """The experiment's parent run: reopened (set RUNNING) when mlflow.json names one in this store, else
        created. `reopen=False` only attaches to what mlflow.json names (for sending what is unsent).
        `background`: records are sent by the outbox's sender thread, never by the caller."""
        self.tracking_uri = tracking_uri
        self.experiment_dir = Path(experiment_dir)
        self.outbox = Outbox(self.experiment_dir, tracking_uri, background=background)
        self.state = TrackingState(self.experiment_dir, tracking_uri)
        self.outbox.on_resolved(self.state.resolved)
        self.parent_key = self.state.parent_key
        self.trials = TrialRuns(self.outbox, self.state)
        self._client: MlflowClient | None = None
        for key, run_id in self.state.run_ids().items():
            self.outbox.known(key, run_id)
        if not self.state.found:
            self.state.save()
            self._create_parent(run_name)
        elif reopen:
            self.state.set_status("RUNNING")
            if self.state.parent_run_id:
                self.outbox.set_status(self.parent_key, "RUNNING")
            else:  # its creation is still in the outbox; asking again finds it rather than duplicating it
                self._create_parent(run_name)

    @classmethod
    def open(cls, tracking_uri: str, experiment_dir: Path, run_name: str) -> ExperimentTracker:
        """This process's tracker for the running experiment (created, or reopened from mlflow.json, on first
        use), sending in the background."""
        key = (tracking_uri, str(Path(experiment_dir).resolve()))
        if key not in _OPEN:
            _OPEN[key] = cls(tracking_uri, experiment_dir, run_name, background=True)
        return _OPEN[key]

    @classmethod
    def attach(cls, experiment_dir: Path) -> ExperimentTracker:
        """The tracker of an experiment that is not running, to send what it left unsent; starts nothing."""
        state = read_state(experiment_dir)
        return cls(state["tracking_uri"], experiment_dir, "", reopen=False)

    def _create_parent(self, run_name: str) -> None:
        self.outbox.create_run(
            self.parent_key,
            experiment=MLFLOW_EXPERIMENT,
            name=run_name,
            tags={ROLE_TAG: ROLE_TUNING},
            reopen=True,
            artifact_location=artifact_location(self.tracking_uri),
        )

    @property
    def client(self) -> MlflowClient:
        """A plain client of the store, for reads. Writes go through `self.outbox`, which survives an outage."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str | None:
        return self.state.experiment_id

    @property
    def parent_run_id(self) -> str | None:
        return self.state.parent_run_id

    @property
    def status(self) -> str | None:
        """The parent's last status as this folder knows it (FINISHED once a search has exported)."""
        return self.state.status

    # ---- parent run ----------------------------------------------------------------------------------
    def log_experiment(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        # Params are write-once in MLflow: the outbox sends only those the run does not have yet.
        self.outbox.log_batch(self.parent_key, params={k: param_value(v) for k, v in params.items()}, tags=tags)

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str], artifacts: list[Path]) -> None:
        """Metrics and tags on the parent run, and files or folders attached to it."""
        now = now_ms()
        self.outbox.log_batch(
            self.parent_key,
            metrics=[(k, float(v), now, 0) for k, v in metrics.items() if is_finite_number(v)],
            tags=tags,
        )
        for path in artifacts:
            self.outbox.log_artifact(self.parent_key, Path(path))

    def set_experiment_tag(self, key: str, value: str) -> None:
        """A tag on the MLflow experiment ("vpsde-tune") itself."""
        self.outbox.set_experiment_tag(MLFLOW_EXPERIMENT, key, value)

    def log_report(self, files: list[Path]) -> None:
        """The experiment report (tuner/report/) under the parent run's report/ folder."""
        for path in files:
            self.outbox.log_artifact(self.parent_key, Path(path), artifact_path="report")

    def finish(self, status: str) -> None:
        self.state.set_status(status)
        self.outbox.terminate(self.parent_key, status)

    def flush(self) -> bool:
        """Send whatever is kept; True when everything this experiment logged has reached the store."""
        self.outbox.flush()
        return self.outbox.complete

    # ---- child runs (tuner/trial_runs.py) -----------------------------------------------------------
    def child_run(self, trial_id: str, trial_name: str, params: dict[str, Any]) -> str:
        """The trial's child run id, or its key while the store has not created it yet."""
        return self.trials.run(trial_id, trial_name, params)

    def child_ref(self, trial_id: str) -> str | None:
        return self.trials.ref(trial_id)

    def child_run_ids(self) -> dict[str, str]:
        return self.trials.run_ids()

    def log_rung(self, run_id: str, result: dict[str, Any]) -> None:
        self.trials.log_rung(run_id, result)

    def log_comparison(self, run_id: str, diff: float, stderr: float, tied: bool) -> None:
        self.trials.log_comparison(run_id, diff, stderr, tied)

    def finish_trial(self, run_id: str, status: str, reason: str = "") -> None:
        self.trials.finish(run_id, status, reason)


class MlflowTrialLogger(tune.Callback):
    """Mirrors Tune's trial events into child runs of the experiment's parent run, from the driver.

    Tune pickles its callbacks with the experiment state; this one keeps only plain settings and connects
    to MLflow lazily, so after `Tuner.restore` it reopens the same parent run from mlflow.json.
    """

    def __init__(self, tracking_uri: str, experiment_dir: Path, run_name: str, space, max_steps: int):
        self.settings = (tracking_uri, experiment_dir, run_name)
        self.space = space
        self.max_steps = max_steps
        self._tracker: ExperimentTracker | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> ExperimentTracker:
        if self._tracker is None:
            self._tracker = ExperimentTracker.open(*self.settings)
        return self._tracker

    def _run_id(self, trial) -> str:
        known = self.tracker.child_ref(trial.trial_id)
        if known is not None:  # every report but a trial's first: no config to build in Tune's loop
            return known
        flat = self.space.trial_config(trial.config).flat()
        name = trial_run_name({hp.name: flat[hp.path] for hp in self.space.hyperparameters}, trial.trial_id)
        return self.tracker.child_run(trial.trial_id, name, {"trial_id": trial.trial_id, **flat})

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


def _error_summary(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines() if path and os.path.exists(path) else []
    except OSError:
        text = []
    return text[-1] if text else "the trial raised an exception (see its error.txt in the experiment folder)"
