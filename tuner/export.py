"""What a finished search leaves behind, written and read back: the trials table, the winner's config, and
their provenance.

  trials.csv        one row per trial: hyperparameters, status, last/best fast val bits/dim, the accurate
                    re-score where one was made with its paired difference to the winner's and whether it
                    is tied with the winner, steps, seconds, MLflow run id
  best_config.yaml  the winner's complete TrialConfig (what `train.py --config` loads unchanged) plus a
                    `provenance` section: scores, trial and MLflow ids, code version, space-file hash
  rescores.json     the accurate re-scores with their solver settings and NFE

The table's rows come from tuner/trials_table.py; the winner and its ties from tuner/winner.py, whose rule the
report reads these files by too. The readers here are what the report and the MLflow back-fill read.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from trials.files import atomic_path, atomic_write_text
from tuner.search_space import SearchSpace
from tuner.winner import paired_to_winner, pick_winner, ties_with_winner

TRIALS_CSV = "trials.csv"
RESCORES_JSON = "rescores.json"
BEST_CONFIG = "best_config.yaml"


@dataclass
class Export:
    winner_id: str
    winner_bpd: float
    winner_fidelity: str  # "accurate" when the re-score worked, else "fast"
    paths: dict[str, Path] = field(default_factory=dict)
    hyperparameter_columns: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # re-scored trials not distinguishable from the winner


# ---- what the export leaves, read back (the report, the MLflow back-fill) ---------------------------------------
def read_table(experiment_dir: Path) -> pd.DataFrame | None:
    """trials.csv, or None when the search has not finished."""
    path = Path(experiment_dir) / TRIALS_CSV
    return pd.read_csv(path, dtype={"trial_id": str}) if path.is_file() else None


def read_rescores(experiment_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(experiment_dir) / RESCORES_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def read_provenance(experiment_dir: Path) -> dict[str, Any]:
    """best_config.yaml's provenance section ({} when there is no best config)."""
    path = Path(experiment_dir) / BEST_CONFIG
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("provenance") or {}


def write_outputs(
    experiment_dir: Path, space: SearchSpace, table: pd.DataFrame, rescores: dict[str, dict], analysis, tracker
) -> Export:
    experiment_dir.mkdir(parents=True, exist_ok=True)
    export = _pick_winner(table, rescores)
    export.hyperparameter_columns = [hp.name for hp in space.hyperparameters]
    comparison = paired_to_winner(rescores, export.winner_id) if export.winner_fidelity == "accurate" else {}
    if len(table):
        for column, missing in (
            ("paired_diff", math.nan),
            ("paired_diff_stderr", math.nan),
            ("tied_with_winner", None),
        ):
            table[column] = [comparison.get(tid, {}).get(column, missing) for tid in table.trial_id]
    rescores = {tid: {**r, **comparison.get(tid, {})} for tid, r in rescores.items()}
    if comparison:  # only paired verdicts: the summary prints each tie's paired difference
        tied, _ = ties_with_winner(rescores, export.winner_id)
        export.tied = [tid for tid, is_tied in tied.items() if is_tied and tid != export.winner_id]
    paths = {"trials_csv": experiment_dir / TRIALS_CSV}
    atomic_write_text(paths["trials_csv"], table.to_csv(index=False))
    paths["rescores"] = experiment_dir / RESCORES_JSON
    atomic_write_text(paths["rescores"], json.dumps(rescores, indent=2, default=str))
    run_ids = dict(zip(table.trial_id, table.mlflow_run_id)) if len(table) else {}
    for trial_id, c in comparison.items():
        if run_ids.get(trial_id):
            tracker.log_comparison(run_ids[trial_id], c["paired_diff"], c["paired_diff_stderr"], c["tied_with_winner"])
    artifacts = [paths["trials_csv"], paths["rescores"]]
    if export is not None and export.winner_id:
        trial = next(t for t in analysis.trials if t.trial_id == export.winner_id)
        config = space.trial_config(trial.config).to_dict()
        winner_row = table[table.trial_id == export.winner_id].iloc[0]
        rescore = rescores.get(export.winner_id, {})
        config["provenance"] = {
            "experiment": space.name,
            "trial_id": export.winner_id,
            "val_bpd_fast": _yaml_scalar(winner_row["val_bpd_last"]),
            "val_bpd_accurate": _yaml_scalar(winner_row["val_bpd_accurate"]),
            "val_bpd_accurate_stderr": _yaml_scalar(winner_row["val_bpd_accurate_stderr"]),
            "accurate_fidelity": rescore.get("fidelity"),
            "steps_trained": int(winner_row["steps"]),
            "checkpoint": str(analysis.get_last_checkpoint(trial).path)
            if analysis.get_last_checkpoint(trial)
            else None,
            "mlflow_tracking_uri": tracker.tracking_uri,
            "mlflow_experiment_id": tracker.experiment_id,
            "mlflow_parent_run_id": tracker.parent_run_id,
            "mlflow_run_id": str(winner_row["mlflow_run_id"]),
            "space_file": space.source,
            "space_sha256": space.sha256,
            "code_version": code_version(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        paths["best_config"] = experiment_dir / BEST_CONFIG
        header = (
            f"# Best config of tuning experiment '{space.name}' (trial {export.winner_id}).\n"
            f"# Full run: python train.py --config {paths['best_config']}\n"
        )
        atomic_write_text(paths["best_config"], header + yaml.safe_dump(config, sort_keys=False))
        artifacts.append(paths["best_config"])
    tracker.log_summary(
        metrics={
            "best_val_bpd_fast": table["val_bpd_last"].min() if len(table) else math.nan,
            "best_val_bpd_accurate": export.winner_bpd if export.winner_fidelity == "accurate" else math.nan,
            "trials": len(table),
        },
        tags={"winner_trial_id": export.winner_id or "none"},
        artifacts=artifacts,
    )
    export.paths = paths
    return export


def _pick_winner(table: pd.DataFrame, rescores: dict[str, dict]) -> Export:
    rows = zip(table.trial_id, table.status, table.val_bpd_last) if len(table) else ()
    picked = pick_winner(rescores, rows)
    return Export(*picked) if picked else Export("", math.nan, "none")


def fill_mlflow_ids(
    experiment_dir: Path, experiment_id: str | None, parent_run_id: str | None, run_ids: dict[str, str]
) -> list[Path]:
    """Fill in the MLflow ids that an export written while the tracking store was down could not know yet
    (trials.csv's mlflow_run_id, best_config.yaml's provenance); only empty ones, nothing else is touched.
    Returns the files it changed."""
    changed = []
    table = experiment_dir / TRIALS_CSV
    if table.exists():
        with open(table, newline="") as f:
            rows = list(csv.reader(f))
        if rows and {"trial_id", "mlflow_run_id"} <= set(rows[0]):
            tid, rid = rows[0].index("trial_id"), rows[0].index("mlflow_run_id")
            missing = [row for row in rows[1:] if not row[rid] and run_ids.get(row[tid])]
            for row in missing:
                row[rid] = run_ids[row[tid]]
            if missing:
                with atomic_path(table) as tmp, open(tmp, "w", newline="") as f:
                    csv.writer(f, lineterminator="\n").writerows(rows)  # the quoting pandas wrote
                changed.append(table)
    best = experiment_dir / BEST_CONFIG
    if best.exists():
        text = best.read_text()
        config = yaml.safe_load(text)
        provenance = config.get("provenance") or {}
        wanted = {
            "mlflow_experiment_id": experiment_id,
            "mlflow_parent_run_id": parent_run_id,
            "mlflow_run_id": run_ids.get(str(provenance.get("trial_id"))),
        }
        updates = {k: v for k, v in wanted.items() if v and not provenance.get(k)}
        if updates:
            provenance.update(updates)
            header = "".join(line for line in text.splitlines(keepends=True)[:2] if line.startswith("#"))
            atomic_write_text(best, header + yaml.safe_dump(config, sort_keys=False))
            changed.append(best)
    return changed


def code_version() -> str:
    """The git commit of this checkout when there is one (with -dirty), else the installed version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"vpsde-tune {importlib.metadata.version('vpsde-tune')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _yaml_scalar(value: Any) -> Any:
    """numpy scalars and NaN to what YAML writes plainly (NaN -> null)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value
