"""What this project's MLflow runs look like, in one Ray-free place: the tuning driver's callback
(tuner/tracking.py), the export and train.py's full run all use it.

  * one MLflow experiment, "vpsde-tune", holds everything; a run's `vpsde.role` tag says what it is:
    a tuning experiment's parent run, a trial's child run (found again by its `trial_id` tag) or a full run;
  * params are the flattened TrialConfig (`train.lr`, `model.ch_mult`, ...), lists as JSON;
  * only finite numbers become metrics;
  * a local SQLite store keeps its artifacts beside the database (`mlartifacts/`), whoever creates the
    experiment, so the tuning runs and a full run logged to the same store share one artifact folder.

A full run is one run, live from its first step (`FullRunTracker`): the config as params, the training log as
curves while it trains (train loss, val DSM, val bits/dim), the grids drawn along the way, then the measurements,
its files and report, and a status that says how it ended (FINISHED, FAILED, KILLED). A resumed run continues
the same MLflow run (its key is kept in the run folder). It carries `tuning.*` tags naming the tuning experiment,
trial and runs its config came from, and, when it is logged to the tuning experiment's store, it is nested under
that experiment's parent run. It never carries a `trial_id` tag: that is how the driver finds its own trials'
runs. A store that does not answer never costs the run its results: the records go to the run folder's outbox
(tuner/outbox.py).

A trial's child run is named by its hyperparameters (`trial_run_name`), so the runs table tells trials apart.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.outbox import Outbox, new_key, now_ms

MLFLOW_EXPERIMENT = "vpsde-tune"
ROLE_TAG = "vpsde.role"
ROLE_TUNING = "tuning-experiment"
ROLE_FULL_RUN = "full-run"
TRIAL_ID_TAG = "trial_id"  # on a trial's child run only
# The training log (metrics.json history) -> MLflow curves by step
FULL_RUN_CURVES = ("train_loss", "val_dsm", "val_bpd", "val_bpd_stderr", "images_per_sec")
FULL_RUN_STATE = "mlflow_run.json"  # in the run folder: the store, the run's key and id, the last step it holds
SAMPLES_ARTIFACTS = "samples"  # the grids drawn during training, in the run's artifacts
REPORT_ARTIFACTS = "report"
# How a hyperparameter is shown in a trial's run name; other names show their last dotted part (model.dropout: dropout).
NAME_ABBREVIATIONS = {"lr": "lr", "batch_size": "bs", "num_res_blocks": "rb", "ch_mult": "ch", "sampling_eps": "eps"}


def default_tracking_uri(folder: Path) -> str:
    """The local store when none is given: `<folder>/mlflow.db` (SQLite)."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite database; the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def param_value(value: Any) -> str:
    """A config value as an MLflow param: lists and mappings as JSON, the rest as str."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


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
    """Status words for any trial in a finished or interrupted experiment (the table and MLflow agree).
    `trial` needs only Tune's `status` (ERROR, TERMINATED, ...) and `last_result`: the report reads them from
    the experiment folder without Ray."""
    if trial.status == "ERROR":
        return "errored"
    if trial.status == "TERMINATED":
        return completion_status(trial.last_result or {}, max_steps)
    return "interrupted"


def is_finite_number(value: Any) -> bool:
    """A real, finite number (numpy's included, bools not): what may become a metric, a plotted point or a
    ranked score."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ---- a trial's run name ------------------------------------------------------------------------------------
def short_number(value: float) -> str:
    """3.2e-3, 1e-4, 0.25, 128: what a person reads in a table, 2 significant digits for small and large values."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def trial_run_name(hyperparameters: dict[str, Any], trial_id: str) -> str:
    """'lr 3.2e-3 · bs 128 · rb 2 · ch 1-2-4 · eps 1e-4 · 05e85_00003': a trial's searched values (by their names
    in the space, in its order) and its id, short enough for MLflow's runs table."""

    def shown(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "-".join(shown(v) for v in value)
        if isinstance(value, float):
            return short_number(value)
        return str(value)

    parts = [
        f"{NAME_ABBREVIATIONS.get(name, name.rsplit('.', 1)[-1])} {shown(value)}"
        for name, value in hyperparameters.items()
    ]
    return " · ".join([*parts, trial_id])


# ---- the full run ---------------------------------------------------------------------------------------
def full_run_tracking_uri(cli_uri: str | None, env_uri: str | None, provenance: dict[str, Any], out_dir: Path) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the tuning experiment's store, else <out>/mlflow.db."""
    return cli_uri or env_uri or provenance.get("mlflow_tracking_uri") or default_tracking_uri(out_dir)


def provenance_tags(provenance: dict[str, Any]) -> dict[str, str]:
    names = {
        "experiment": "tuning.experiment",
        "trial_id": "tuning.trial_id",
        "mlflow_parent_run_id": "tuning.parent_run_id",
        "mlflow_run_id": "tuning.trial_run_id",
        "mlflow_tracking_uri": "tuning.tracking_uri",
        "code_version": "tuning.code_version",
    }
    return {tag: str(provenance[key]) for key, tag in names.items() if provenance.get(key) not in (None, "")}


def full_run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a full run's metrics.json under flat names; missing or non-finite ones left out.
    Each sampler's grid gives <sampler>_nfe and <sampler>_seconds (pc_nfe, ode_seconds, ...)."""
    bpd, tr = metrics["test_bpd"], metrics["train"]
    values = {
        "test_bpd": bpd["mean"],
        "test_bpd_stderr": bpd["stderr"],
        "test_bpd_nfe": bpd["nfe"],
        "test_bpd_seconds": bpd["seconds"],
        "test_bpd_images": bpd["fidelity"]["n_images"],
        "final_train_loss": tr["final_train_loss"],
        "final_val_dsm": tr["val_dsm"],
        "steps": tr["steps"],
        "train_seconds": tr["seconds"],
        "scoring_seconds": tr.get("scoring_seconds"),
        "scoring_share": tr.get("scoring_share"),
    }
    for name, grid in metrics["samples"].items():
        values[f"{name}_nfe"], values[f"{name}_seconds"] = grid["nfe"], grid["seconds"]
    return {k: float(v) for k, v in values.items() if is_finite_number(v)}


class FullRunTracker:
    """The MLflow run of one full run, from its first step to its end, through the run folder's outbox.

    Created (or, when <out>/mlflow_run.json names a run in this store, reopened: set RUNNING again) before
    training starts; `on_record` and `on_samples` are trials.full_run's Watcher, called as the training log
    grows; `log_results` adds the measurements and files of a finished run; `end` sets how the run ended.
    A record at a step the run already holds is not sent again: a run killed between two checkpoints repeats
    those steps when it resumes, with the same values.
    """

    def __init__(
        self,
        tracking_uri: str,
        out_dir: Path,
        *,
        config_file: Path,
        params: dict[str, Any],
        provenance: dict[str, Any],
        tags: dict[str, str],
        log: Callable[[str], None] = print,
    ):
        self.tracking_uri, self.out_dir = tracking_uri, Path(out_dir)
        self.state_path = self.out_dir / FULL_RUN_STATE
        self.outbox = Outbox(self.out_dir, tracking_uri, log=log)
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.resumed = state.get("tracking_uri") == tracking_uri and bool(state.get("key"))
        self._state = (
            state
            if self.resumed
            else {"tracking_uri": tracking_uri, "key": new_key(), "run_id": None, "logged_through": -1}
        )
        self.key = self._state["key"]
        if self._state.get("run_id"):
            self.outbox.known(self.key, self._state["run_id"])
        self.outbox.on_resolved(self._resolved)
        self._save()
        origin = "/".join(str(provenance[k]) for k in ("experiment", "trial_id") if provenance.get(k))
        same_store = provenance.get("mlflow_tracking_uri") == tracking_uri
        self.outbox.create_run(
            self.key,
            experiment=MLFLOW_EXPERIMENT,
            name=f"full-run {origin}".strip(),
            reopen=True,
            tags={
                ROLE_TAG: ROLE_FULL_RUN,
                **provenance_tags(provenance),
                "out_dir": str(self.out_dir.resolve()),
                "config_file": str(config_file),
                **tags,
            },
            parent_if_exists=str(provenance["mlflow_parent_run_id"])
            if same_store and provenance.get("mlflow_parent_run_id")
            else None,
            params={k: param_value(v) for k, v in params.items()},
            artifact_location=artifact_location(tracking_uri),
        )

    @property
    def run_id(self) -> str | None:
        """None while the store has not created the run."""
        return self.outbox.run_id(self.key)

    @property
    def complete(self) -> bool:
        return self.outbox.complete

    def _resolved(self, key: str, run_id: str, experiment_id: str) -> None:
        if key == self.key:
            self._state["run_id"] = run_id
            self._save()

    def _save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2))
        tmp.replace(self.state_path)

    # ---- trials.full_run.Watcher -----------------------------------------------------------------------
    def on_record(self, record: dict[str, Any]) -> None:
        step, through = int(record["step"]), self._state["logged_through"]
        sent = set(self._state.get("logged_keys", [])) if step == through else set()
        keys = [k for k in FULL_RUN_CURVES if is_finite_number(record.get(k)) and k not in sent]
        if step < through or not keys:  # a step the run holds already (or its last step, with nothing new)
            return
        now = now_ms()
        self.outbox.log_batch(self.key, metrics=[(k, float(record[k]), now, step) for k in keys])
        self._state.update(logged_through=step, logged_keys=sorted(sent | set(keys)))
        self._save()

    def on_samples(self, step: int, drawn: list[dict[str, Any]]) -> None:
        for grid in drawn:
            if grid.get("path"):
                self.outbox.log_artifact(self.key, self.out_dir / grid["path"], artifact_path=SAMPLES_ARTIFACTS)

    # ---- the end ---------------------------------------------------------------------------------------
    def log_results(self, metrics: dict[str, Any], artifacts: list[Path], report: list[Path] = ()) -> None:
        """A finished run's headline numbers (at its last step), files, and report under report/."""
        headline = full_run_metrics(metrics)
        now, step = now_ms(), int(headline.get("steps", 0))
        self.outbox.log_batch(
            self.key,
            metrics=[(k, v, now, step) for k, v in headline.items()],
            tags={"test_split": str(metrics["test_bpd"]["split"])},
        )
        for path in artifacts:
            self.outbox.log_artifact(self.key, path)
        for path in report:
            self.outbox.log_artifact(self.key, path, artifact_path=REPORT_ARTIFACTS)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.outbox.terminate(self.key, status)

    def flush(self) -> bool:
        """Send what is kept; True when everything has reached the store."""
        self.outbox.flush()
        return self.outbox.complete
