"""MLflow for the full run: one run with the config as params, the measurements, the loss curve and the files.

The run goes into the tuning experiments' MLflow experiment ("vpsde-tune") and carries tags naming the
tuning experiment, trial and MLflow runs its config came from (`tuning.*`). When it is logged to the same
store as the tuning experiment, it is also nested under that experiment's parent run, so the MLflow UI shows
the full run beside the trials it was chosen from. It never carries a `trial_id` tag: that tag is how the
tuning driver finds its own trials' runs.

A store that does not answer never costs the run its results: the records go to the run folder's outbox
(tuner/outbox.py), train.py exits 3 instead of 0, and the next train.py logging to that folder, or
`python -m tuner.sync <run folder>`, sends them.

Kept apart from tuner/tracking.py, which imports Ray: the full run needs neither Ray nor its start-up time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.outbox import Outbox, new_key, now_ms

MLFLOW_EXPERIMENT = "vpsde-tune"  # the same experiment tuner/tracking.py logs the tuning runs to
# MLflow 3's UI opens an experiment by this tag's value; without it, it guesses "GenAI apps & agents" and opens
# on traces. "custom_model_development" is what its "Machine learning" choice writes (mlflow/server/js).
ROLE_TAG = "vpsde.role"
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def resolve_tracking_uri(cli_uri: str | None, env_uri: str | None, provenance: dict[str, Any], out_dir: Path) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the tuning experiment's store, else <out>/mlflow.db."""
    return (cli_uri or env_uri or provenance.get("mlflow_tracking_uri")
            or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}")


def provenance_tags(provenance: dict[str, Any]) -> dict[str, str]:
    names = {"experiment": "tuning.experiment", "trial_id": "tuning.trial_id",
             "mlflow_parent_run_id": "tuning.parent_run_id", "mlflow_run_id": "tuning.trial_run_id",
             "mlflow_tracking_uri": "tuning.tracking_uri", "code_version": "tuning.code_version"}
    return {tag: str(provenance[key]) for key, tag in names.items() if provenance.get(key) not in (None, "")}


@dataclass
class FullRunLog:
    run_id: str | None  # None while the store has not created the run
    complete: bool  # everything reached the store; else the rest is kept in outbox.path
    outbox: Outbox


def log_full_run(tracking_uri: str, *, run_name: str, params: dict[str, Any], metrics: dict[str, float],
                 history: list[dict[str, Any]], tags: dict[str, str], provenance: dict[str, Any],
                 artifacts: list[Path], out_dir: Path) -> FullRunLog:
    """Create the run, log everything, mark it finished, through the run folder's outbox.

    `metrics` are logged at the last training step; `history` (the trainer's log records) as the curves
    train_loss, val_dsm and images_per_sec over steps. A store that does not answer costs a few seconds: what
    it did not get is kept in `<out_dir>/mlflow_outbox.jsonl`, behind anything an earlier run left there.
    """
    outbox = Outbox(out_dir, tracking_uri)
    key = new_key()
    same_store = provenance.get("mlflow_tracking_uri") == tracking_uri
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # A fresh SQLite store keeps its artifacts beside the database, not in the working directory.
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    outbox.create_run(key, experiment=MLFLOW_EXPERIMENT, name=run_name,
                      tags={ROLE_TAG: "full-run", **provenance_tags(provenance), **tags},
                      parent_if_exists=str(provenance["mlflow_parent_run_id"])
                      if same_store and provenance.get("mlflow_parent_run_id") else None,
                      params={k: _param(v) for k, v in params.items()}, artifact_location=location)
    now = now_ms()
    last_step = int(metrics.get("steps", 0))
    points = [(k, float(v), now, last_step) for k, v in metrics.items()]
    for record in history:
        points += [(k, float(record[k]), now, int(record["step"]))
                   for k in ("train_loss", "val_dsm", "images_per_sec") if _finite(record.get(k))]
    outbox.log_batch(key, metrics=points)
    for path in artifacts:
        outbox.log_artifact(key, path)
    outbox.terminate(key, "FINISHED")
    return FullRunLog(outbox.run_id(key), outbox.complete, outbox)


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
