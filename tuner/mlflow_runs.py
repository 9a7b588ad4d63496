"""What this project's MLflow runs look like, in one Ray-free place: the tuning driver's callback
(tuner/tracking.py), the export and train.py's full run all use it.

  * one MLflow experiment, "vpsde-tune", holds everything; a run's `vpsde.role` tag says what it is:
    a tuning experiment's parent run, a trial's child run (found again by its `trial_id` tag) or a full run;
  * params are the flattened TrialConfig (`train.lr`, `model.ch_mult`, ...), lists as JSON;
  * only finite numbers become metrics;
  * a local SQLite store keeps its artifacts beside the database (`mlartifacts/`), whoever creates the
    experiment, so the tuning runs and a full run logged to the same store share one artifact folder.

A full run is one run with the config as params, the measurements, the loss curve and its files. It carries
`tuning.*` tags naming the tuning experiment, trial and runs its config came from, and, when it is logged to
the tuning experiment's store, it is nested under that experiment's parent run. It never carries a
`trial_id` tag: that is how the driver finds its own trials' runs. A store that does not answer never costs
the run its results: the records go to the run folder's outbox (tuner/outbox.py).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.outbox import Outbox, new_key, now_ms

MLFLOW_EXPERIMENT = "vpsde-tune"
ROLE_TAG = "vpsde.role"
ROLE_TUNING = "tuning-experiment"
ROLE_FULL_RUN = "full-run"
TRIAL_ID_TAG = "trial_id"  # on a trial's child run only
FULL_RUN_CURVES = ("train_loss", "val_dsm", "images_per_sec")  # metrics.json history -> MLflow curves


def default_tracking_uri(folder: Path) -> str:
    """The local store when none is given: `<folder>/mlflow.db` (SQLite)."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite database; the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def param_value(value: Any) -> str:
    """A config value as an MLflow param: lists and mappings as JSON, the rest as str."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (numpy's included, bools not): what may become a metric, a plotted point or a
    ranked score."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ---- the full run ---------------------------------------------------------------------------------------
def full_run_tracking_uri(cli_uri: str | None, env_uri: str | None, provenance: dict[str, Any], out_dir: Path) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the tuning experiment's store, else <out>/mlflow.db."""
    return cli_uri or env_uri or provenance.get("mlflow_tracking_uri") or default_tracking_uri(out_dir)


def provenance_tags(provenance: dict[str, Any]) -> dict[str, str]:
    names = {"experiment": "tuning.experiment", "trial_id": "tuning.trial_id",
             "mlflow_parent_run_id": "tuning.parent_run_id", "mlflow_run_id": "tuning.trial_run_id",
             "mlflow_tracking_uri": "tuning.tracking_uri", "code_version": "tuning.code_version"}
    return {tag: str(provenance[key]) for key, tag in names.items() if provenance.get(key) not in (None, "")}


def full_run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a full run's metrics.json under flat names; missing or non-finite ones left out."""
    bpd, tr, pc, ode = metrics["test_bpd"], metrics["train"], metrics["samples"]["pc"], metrics["samples"]["ode"]
    values = {
        "test_bpd": bpd["mean"], "test_bpd_stderr": bpd["stderr"], "test_bpd_nfe": bpd["nfe"],
        "test_bpd_seconds": bpd["seconds"], "test_bpd_images": bpd["fidelity"]["n_images"],
        "train_loss": tr["final_train_loss"], "val_dsm": tr["val_dsm"], "steps": tr["steps"],
        "train_seconds": tr["seconds"], "pc_nfe": pc["nfe"], "pc_seconds": pc["seconds"],
        "ode_nfe": ode["nfe"], "ode_seconds": ode["seconds"],
    }
    return {k: float(v) for k, v in values.items() if is_finite_number(v)}


@dataclass
class FullRunLog:
    run_id: str | None  # None while the store has not created the run
    complete: bool  # everything reached the store; else the rest is kept in outbox.path
    outbox: Outbox


def log_full_run(tracking_uri: str, *, config_file: Path, out_dir: Path, params: dict[str, Any],
                 metrics: dict[str, Any], provenance: dict[str, Any], artifacts: list[Path]) -> FullRunLog:
    """One MLflow run for a finished full run (metrics = its metrics.json), through `out_dir`'s outbox.

    The headline numbers are logged at the last training step, the history as the curves
    FULL_RUN_CURVES over steps. A store that does not answer costs a few seconds: what it did not get is kept
    in `<out_dir>/mlflow_outbox.jsonl`, behind anything an earlier run left there.
    """
    outbox = Outbox(out_dir, tracking_uri)
    key = new_key()
    origin = "/".join(str(provenance[k]) for k in ("experiment", "trial_id") if provenance.get(k))
    tags = {ROLE_TAG: ROLE_FULL_RUN, **provenance_tags(provenance), "test_split": metrics["test_bpd"]["split"],
            "out_dir": str(Path(out_dir).resolve()), "config_file": str(config_file),
            "precision": str(metrics["train"]["precision"])}
    same_store = provenance.get("mlflow_tracking_uri") == tracking_uri
    outbox.create_run(key, experiment=MLFLOW_EXPERIMENT, name=f"full-run {origin}".strip(), tags=tags,
                      parent_if_exists=str(provenance["mlflow_parent_run_id"])
                      if same_store and provenance.get("mlflow_parent_run_id") else None,
                      params={k: param_value(v) for k, v in params.items()},
                      artifact_location=artifact_location(tracking_uri))
    now = now_ms()
    headline = full_run_metrics(metrics)
    last_step = int(headline.get("steps", 0))
    points = [(k, v, now, last_step) for k, v in headline.items()]
    for record in metrics["history"]:
        points += [(k, float(record[k]), now, int(record["step"])) for k in FULL_RUN_CURVES
                   if is_finite_number(record.get(k))]
    outbox.log_batch(key, metrics=points)
    for path in artifacts:
        outbox.log_artifact(key, path)
    outbox.terminate(key, "FINISHED")
    return FullRunLog(outbox.run_id(key), outbox.complete, outbox)
