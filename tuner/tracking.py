"""MLflow tracking from the driver: one parent run per tuning experiment, one child run per trial.

Only the driver process writes to MLflow, so a local SQLite store never sees two writers. Every write goes
through the experiment folder's `Outbox` (tuner/outbox.py), sent by its background sender: Tune's callback only
appends to a local journal, so neither a slow tracking store nor one that stops answering slows the search, and
what it missed is sent when it answers again.

The ids that tie MLflow to the Tune experiment live in `<experiment dir>/mlflow.json` (the store's URI, the
experiment and parent run ids, the trials' child run ids, and the parent's last status); on `--resume` the same
parent run is reopened and each trial finds its existing child run by its `trial_id` tag, so no run is duplicated.
A parent run that could not be created yet (the store was down from the start) is known by its key there, and
gets its id when the outbox is sent.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from trials.files import atomic_write_text
from tuner.mlflow_runs import (
    MLFLOW_EXPERIMENT,
    ROLE_TAG,
    ROLE_TUNING,
    TRIAL_ID_TAG,
    artifact_location,
    completion_status,
    is_finite_number,
    param_value,
    trial_run_name,
)
from tuner.outbox import Outbox, new_key, now_ms

STATE_FILE = "mlflow.json"
METRIC_KEYS = ("train_loss", "val_dsm", "val_bpd", "val_bpd_stderr", "nfe", "eval_seconds", "images_per_sec", "seconds")

# One tracker per experiment folder and store in this process: the driver and Tune's callback share its outbox,
# so their records stay in one order.
_OPEN: dict[tuple[str, str], ExperimentTracker] = {}


def read_state(experiment_dir: Path) -> dict[str, Any]:
    path = Path(experiment_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class ExperimentTracker:
    def __init__(
        self, tracking_uri: str, experiment_dir: Path, run_name: str, *, reopen: bool = True, background: bool = False
    ):
        """The experiment's parent run: reopened (set RUNNING) when mlflow.json names one in this store, else
        created. `reopen=False` only attaches to what mlflow.json names (for sending what is unsent).
        `background`: records are sent by the outbox's sender thread, never by the caller."""
        self.tracking_uri = tracking_uri
        self.experiment_dir = Path(experiment_dir)
        self.state_path = self.experiment_dir / STATE_FILE
        self.outbox = Outbox(self.experiment_dir, tracking_uri, background=background)
        self._save_lock = threading.RLock()  # the sender's thread learns run ids while the driver saves its status
        self.outbox.on_resolved(self._resolved)
        state = read_state(self.experiment_dir)
        self._child_keys: dict[str, str] = {}  # trial_id -> child run key, for the trials seen in this process
        self._last_step: dict[str, int] = {}  # child run key -> the last step logged by this process
        self._client: MlflowClient | None = None
        if state.get("tracking_uri") == tracking_uri:
            self._state = state
            self.parent_key = state.get("parent_key") or new_key(state["parent_run_id"])
            if state.get("parent_run_id"):
                self.outbox.known(self.parent_key, state["parent_run_id"])
            for trial_id, run_id in state.get("child_runs", {}).items():
                self.outbox.known(self._child_key(trial_id), run_id)
            if reopen:
                self._state["status"] = "RUNNING"
                self._save()
                if state.get("parent_run_id"):
                    self.outbox.set_status(self.parent_key, "RUNNING")
                else:  # its creation is still in the outbox; asking again finds it rather than duplicating it
                    self._create_parent(run_name)
        else:
            self.parent_key = new_key()
            self._state = {
                "tracking_uri": tracking_uri,
                "experiment_id": None,
                "parent_run_id": None,
                "parent_key": self.parent_key,
                "child_runs": {},
                "status": "RUNNING",
            }
            self._save()
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

    # ---- ids ---------------------------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str | None:
        return self._state.get("experiment_id")

    @property
    def parent_run_id(self) -> str | None:
        return self._state.get("parent_run_id")

    @property
    def status(self) -> str | None:
        """The parent's last status as this folder knows it (FINISHED once a search has exported)."""
        return self._state.get("status")

    def _child_key(self, trial_id: str) -> str:
        return f"{self.parent_key}/{trial_id}"

    def _resolved(self, key: str, run_id: str, experiment_id: str) -> None:
        with self._save_lock:
            if key == self.parent_key:
                self._state.update(parent_run_id=run_id, experiment_id=experiment_id)
            elif key.startswith(self.parent_key + "/"):
                self._state.setdefault("child_runs", {})[key[len(self.parent_key) + 1 :]] = run_id
            else:
                return
            self._save()

    def _save(self) -> None:
        with self._save_lock:
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.state_path, json.dumps(self._state, indent=2))

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
        with self._save_lock:
            self._state["status"] = status
            self._save()
        self.outbox.terminate(self.parent_key, status)

    def flush(self) -> bool:
        """Send whatever is kept; True when everything this experiment logged has reached the store."""
        self.outbox.flush()
        return self.outbox.complete

    # ---- child runs ------------------------------------------------------------------------------
    def child_run(self, trial_id: str, trial_name: str, params: dict[str, Any]) -> str:
        """The trial's child run, created on first sight and found again after a resume or a retry.

        Returns its run id, or, while the store has not created it yet, the key later calls name it by."""
        if trial_id not in self._child_keys:
            key = self._child_keys[trial_id] = self._child_key(trial_id)
            self.outbox.create_run(
                key,
                experiment=MLFLOW_EXPERIMENT,
                name=trial_name,
                parent=self.parent_key,
                find_tags={TRIAL_ID_TAG: trial_id},
                reopen=True,
                tags={TRIAL_ID_TAG: trial_id, ROLE_TAG: "trial", "status": "running"},
                params={k: param_value(v) for k, v in params.items()},
            )
        return self.outbox.ref(self._child_keys[trial_id])

    def child_ref(self, trial_id: str) -> str | None:
        """The ref of a child run this process has already asked for, else None."""
        key = self._child_keys.get(trial_id)
        return None if key is None else self.outbox.ref(key)

    def child_run_ids(self) -> dict[str, str]:
        """trial_id -> child run id for the trials that have one (those the store has not created yet have none)."""
        ids = dict(self._state.get("child_runs", {}))
        parent = self.parent_run_id
        if parent and self.experiment_id:
            runs = self.outbox.read(
                lambda client: client.search_runs(
                    [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10_000
                ),
                [],
                what=f"listing the child runs of {parent}",
            )
            ids.update({r.data.tags[TRIAL_ID_TAG]: r.info.run_id for r in runs if TRIAL_ID_TAG in r.data.tags})
        return ids

    def log_rung(self, run_id: str, result: dict[str, Any]) -> None:
        """One rung of a trial, from Tune's callback: appended to the journal, never waiting for the store.

        A rung the run already holds is not logged again: a trial restored in this process from the checkpoint
        before a rung reports it again (checked here), and so does every trial of a driver killed after logging
        a rung but before Tune saved its state (checked by the sender against the store: `new_steps_of`)."""
        step, now = int(result.get("step", 0)), now_ms()
        key = self.outbox.key_of(run_id) or run_id
        if step <= self._last_step.get(key, -1):
            return
        self._last_step[key] = step
        metrics = [(k, float(result[k]), now, step) for k in METRIC_KEYS if k in result and is_finite_number(result[k])]
        tags = {"reason": str(result["reason"])} if result.get("reason") else {}
        if result.get("precision"):  # what train.precision resolved to on the trial's device
            tags["precision"] = str(result["precision"])
        self.outbox.log_batch(run_id, metrics=metrics, tags=tags, new_steps_of="seconds")

    def log_comparison(self, run_id: str, diff: float, stderr: float, tied: bool) -> None:
        """A re-scored trial's paired difference to the winner (see tuner.export.paired_to_winner)."""
        now = now_ms()
        self.outbox.log_batch(
            run_id,
            metrics=[("paired_diff_to_winner", diff, now, 0), ("paired_diff_to_winner_stderr", stderr, now, 0)],
            tags={"tied_with_winner": str(tied).lower()},
        )

    def finish_trial(self, run_id: str, status: str, reason: str = "") -> None:
        tags = {"status": status, **({"reason": reason[:4000]} if reason else {})}
        self.outbox.log_batch(run_id, tags=tags)
        mlflow_status = {"errored": "FAILED", "diverged": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")
        self.outbox.terminate(run_id, mlflow_status)


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
