"""MLflow for the full run: one run with the config as params, the measurements, the loss curve and the files.

The run goes into the tuning experiments' MLflow experiment ("vpsde-tune") and carries tags naming the
tuning experiment, trial and MLflow runs its config came from (`tuning.*`). When it is logged to the same
store as the tuning experiment, it is also nested under that experiment's parent run, so the MLflow UI shows
the full run beside the trials it was chosen from. It never carries a `trial_id` tag: that tag is how the
tuning driver finds its own trials' runs.

Kept apart from tuner/tracking.py, which imports Ray: the full run needs neither Ray nor its start-up time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

MLFLOW_EXPERIMENT = "vpsde-tune"  # the same experiment tuner/tracking.py logs the tuning runs to
# MLflow 3's UI opens an experiment by this tag's value; without it, it guesses "GenAI apps & agents" and opens
# on traces. "custom_model_development" is what its "Machine learning" choice writes (mlflow/server/js).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
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


def log_full_run(tracking_uri: str, *, run_name: str, params: dict[str, Any], metrics: dict[str, float],
                 history: list[dict[str, Any]], tags: dict[str, str], provenance: dict[str, Any],
                 artifacts: list[Path]) -> str:
    """Create the run, log everything, mark it finished; returns its run id.

    `metrics` are logged at the last training step; `history` (the trainer's log records) as the curves
    train_loss, val_dsm and images_per_sec over steps.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, tracking_uri)
    tags = {ROLE_TAG: "full-run", **provenance_tags(provenance), **tags}
    parent = provenance.get("mlflow_parent_run_id")
    if parent and provenance.get("mlflow_tracking_uri") == tracking_uri and _run_exists(client, parent):
        tags["mlflow.parentRunId"] = str(parent)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        last_step = int(metrics.get("steps", 0))
        points = [Metric(k, v, now, last_step) for k, v in metrics.items()]
        for record in history:
            points += [Metric(k, float(record[k]), now, int(record["step"]))
                       for k in ("train_loss", "val_dsm", "images_per_sec") if _finite(record.get(k))]
        client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        for i in range(0, len(points), BATCH):
            client.log_batch(run_id, metrics=points[i:i + BATCH])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training for MLflow's UI, unless someone already chose a kind there."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def _experiment_id(client: MlflowClient, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    if found is not None:
        mark_model_training(client, found.experiment_id)
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # A fresh SQLite store keeps its artifacts beside the database, not in the working directory.
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    experiment_id = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=location)
    mark_model_training(client, experiment_id)
    return experiment_id


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
