"""What a tuning experiment's folder knows of its MLflow runs: `<experiment dir>/mlflow.json`.

The file ties MLflow to the Tune experiment: the store's URI, the experiment and parent run ids, the trials'
child run ids, and the parent's last status. It outlives the process, so `--resume` reopens the same parent run
rather than making another; a parent run that could not be created yet (the store was down from the start) is
known by its key, and gets its id when the outbox is sent. Apart from tuner/tracking.py because it is plain file
state, written from two threads (the driver's, and the outbox sender's as runs get their ids), and needs no Ray.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from trials.files import atomic_write_text
from tuner.outbox import new_key

STATE_FILE = "mlflow.json"


def read_state(experiment_dir: Path) -> dict[str, Any]:
    path = Path(experiment_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class TrackingState:
    """mlflow.json of one experiment folder, for one store. Runs are named by keys until they have ids: the
    parent's key is kept in the file, a child's is the parent's key and its trial id."""

    def __init__(self, experiment_dir: Path, tracking_uri: str):
        """The file's runs when it names this store (`found`), else a new parent key and nothing known yet."""
        self.experiment_dir = Path(experiment_dir)
        self.path = self.experiment_dir / STATE_FILE
        self._lock = threading.RLock()  # the sender's thread learns run ids while the driver saves its status
        state = read_state(self.experiment_dir)
        self.found = state.get("tracking_uri") == tracking_uri
        if self.found:
            self._state = state
            self.parent_key = state.get("parent_key") or new_key(state["parent_run_id"])
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

    @property
    def experiment_id(self) -> str | None:
        return self._state.get("experiment_id")

    @property
    def parent_run_id(self) -> str | None:
        return self._state.get("parent_run_id")

    @property
    def status(self) -> str | None:
        return self._state.get("status")

    def child_key(self, trial_id: str) -> str:
        return f"{self.parent_key}/{trial_id}"

    def child_run_ids(self) -> dict[str, str]:
        """trial_id -> child run id, for the children the file knows."""
        return dict(self._state.get("child_runs", {}))

    def run_ids(self) -> dict[str, str]:
        """Key -> run id of every run the file knows, the parent first."""
        ids = {self.parent_key: self.parent_run_id} if self.parent_run_id else {}
        return ids | {self.child_key(trial_id): run_id for trial_id, run_id in self.child_run_ids().items()}

    def set_status(self, status: str) -> None:
        with self._lock:
            self._state["status"] = status
            self.save()

    def resolved(self, key: str, run_id: str, experiment_id: str) -> None:
        """The outbox's hook: a key of this experiment got its run id."""
        with self._lock:
            if key == self.parent_key:
                self._state.update(parent_run_id=run_id, experiment_id=experiment_id)
            elif key.startswith(self.parent_key + "/"):
                self._state.setdefault("child_runs", {})[key[len(self.parent_key) + 1 :]] = run_id
            else:
                return
            self.save()

    def save(self) -> None:
        with self._lock:
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self._state, indent=2))
