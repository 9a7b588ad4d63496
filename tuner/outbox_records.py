"""The records an outbox takes: one method per MLflow write, each turning the caller's arguments into one record.

Apart from tuner/outbox.py so that the vocabulary (what MLflow is asked to do, and what each record holds)
reads on its own, apart from run keys, the journal and the sending. tuner/mlflow_ops.py gives each record's
`op` its meaning; the `Outbox` says where a record goes and how it names a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuner.mlflow_ops import now_ms


class OutboxRecords:
    """The writes an outbox offers. A subclass supplies `_submit` (journal the record and send it) and `_ref`
    (how a record names a run: its id when known, else its key)."""

    def _submit(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _ref(self, ref: str | None) -> str | None:
        raise NotImplementedError

    def create_run(
        self,
        key: str,
        *,
        experiment: str,
        name: str,
        tags: dict[str, str] | None = None,
        find_tags: dict[str, str] | None = None,
        parent: str | None = None,
        parent_if_exists: str | None = None,
        params: dict[str, str] | None = None,
        artifact_location: str | None = None,
        reopen: bool = False,
    ) -> None:
        """Create the run `key` in `experiment`, or find it again (by `find_tags`, else by its key tag).

        `parent`: a run ref whose id becomes mlflow.parentRunId (and part of the search); `parent_if_exists`:
        a run id used as parent only if the store has it. `reopen`: a found run is set RUNNING again.
        """
        self._submit(
            {
                "op": "create_run",
                "key": key,
                "experiment": experiment,
                "name": name,
                "tags": tags or {},
                "find_tags": find_tags or {},
                "parent": self._ref(parent),
                "parent_if_exists": parent_if_exists,
                "params": params or {},
                "artifact_location": artifact_location,
                "reopen": reopen,
                "start_time": now_ms(),
            }
        )

    def log_batch(
        self,
        ref: str,
        *,
        metrics: Iterable[tuple[str, float, int, int]] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        new_steps_of: str | None = None,
    ) -> None:
        """metrics: (key, value, timestamp ms, step); non-finite values are left out (MLflow's charts choke on them).
        `new_steps_of`: a metric name; the record is dropped if the run already holds its step for that metric
        (a rung reported again by a trial resumed from an earlier checkpoint)."""
        points = [[k, float(v), int(ts), int(step)] for k, v, ts, step in metrics if math.isfinite(float(v))]
        if points or params or tags:
            record = {
                "op": "log_batch",
                "run": self._ref(ref),
                "metrics": points,
                "params": params or {},
                "tags": tags or {},
            }
            self._submit({**record, "new_steps_of": new_steps_of} if new_steps_of else record)

    def log_artifact(self, ref: str, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file or a folder (under `artifact_path` in the run's artifacts); what is sent is what the
        path holds when the record is sent."""
        self._submit(
            {
                "op": "log_artifact",
                "run": self._ref(ref),
                "path": str(Path(path).resolve()),
                "artifact_path": artifact_path,
            }
        )

    def set_status(self, ref: str, status: str) -> None:
        self._submit({"op": "set_status", "run": self._ref(ref), "status": status})

    def terminate(self, ref: str, status: str) -> None:
        self._submit({"op": "terminate", "run": self._ref(ref), "status": status, "end_time": now_ms()})

    def set_experiment_tag(self, experiment: str, key: str, value: str) -> None:
        self._submit({"op": "experiment_tag", "experiment": experiment, "key": key, "value": str(value)})
