"""Reading an experiment folder: Tune's trial folders and state file, and the export's files (read by the
export's own readers) when the search finished; the winner is the export's, or the export's rule applied to
the scores so far. No Ray: it works on a copy of the folder on a laptop."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from trials.cli import UserError
from trials.files import atomic_write_bytes
from trials.layout import CHECKPOINT_FILE
from tuner.export import read_provenance, read_rescores, read_table
from tuner.mlflow_runs import is_finite_number, trial_status
from tuner.search_space import SearchSpace
from tuner.space import SpaceError, load_space
from tuner.winner import pick_winner

SPACE_COPY = "space.yaml"


class ReportError(UserError, ValueError):
    """The folder is not an experiment the report can read; one line, exit 2."""


@dataclass
class TrialRecord:
    trial_id: str
    status: str
    params: dict[str, Any]  # as the searcher sampled them (list choices as their 'a,b,c' labels)
    history: pd.DataFrame  # one row per reported step: step, val_bpd, val_bpd_stderr (read-only once made)
    folder: Path | None = None

    # Cached: sorting and drawing a thousand trials asks for these tens of thousands of times.
    @cached_property
    def steps(self) -> int:
        return int(self.history["step"].iloc[-1]) if len(self.history) else 0

    @cached_property
    def final_bpd(self) -> float:
        return float(self.history["val_bpd"].iloc[-1]) if len(self.history) else math.nan

    def checkpoint(self) -> Path | None:
        """The trial's newest Tune checkpoint folder that holds a trainer checkpoint."""
        if self.folder is None:
            return None
        found = sorted(p for p in self.folder.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
        return found[-1] if found else None


@dataclass
class Winner:
    trial_id: str
    bpd: float
    stderr: float
    fidelity: str  # "accurate": best re-score; "fast": best last fast score (the search did not finish)
    checkpoint: Path | None


def find_winner(trials: list[TrialRecord], rescores: dict[str, dict], provenance: dict[str, Any]) -> Winner | None:
    """The export's winner (best_config.yaml's provenance) when the search finished, else the export's rule
    applied to what there is so far; None when no trial has a score."""
    by_id = {t.trial_id: t for t in trials}
    trial_id, fidelity = provenance.get("trial_id"), None
    if trial_id is None:
        picked = pick_winner(rescores, ((t.trial_id, t.status, t.final_bpd) for t in trials))
        if picked is None:
            return None
        trial_id, _, fidelity = picked
    rescore = rescores.get(trial_id, {})
    if fidelity is None:
        fidelity = "accurate" if is_finite_number(provenance.get("val_bpd_accurate")) else "fast"
    trial = by_id.get(trial_id)
    if fidelity == "accurate":
        bpd, stderr = (
            float(rescore.get("mean", provenance.get("val_bpd_accurate"))),
            float(rescore.get("stderr", math.nan)),
        )
    else:
        bpd = trial.final_bpd if trial is not None else float(provenance.get("val_bpd_fast") or math.nan)
        stderr = (
            float(trial.history["val_bpd_stderr"].iloc[-1]) if trial is not None and len(trial.history) else math.nan
        )
    checkpoint = trial.checkpoint() if trial is not None else None
    if (
        checkpoint is None
        and provenance.get("checkpoint")
        and (Path(provenance["checkpoint"]) / CHECKPOINT_FILE).is_file()
    ):
        checkpoint = Path(provenance["checkpoint"])
    return Winner(trial_id, bpd, stderr, fidelity, checkpoint)


@dataclass
class Experiment:
    folder: Path
    space: SearchSpace
    trials: list[TrialRecord]
    rescores: dict[str, dict[str, Any]]
    table: pd.DataFrame | None  # trials.csv when the search finished
    winner: Winner | None
    finished: bool

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def max_steps(self) -> int:
        return self.space.base_config.train.steps


def save_space(experiment_dir: Path, space: SearchSpace) -> None:
    """Keep the space file in the experiment folder (once: a resume leaves the original), so the report can
    be rebuilt from the folder alone."""
    target = Path(experiment_dir) / SPACE_COPY
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, Path(space.source).read_bytes())


def load_experiment(folder: Path, space: SearchSpace | None = None) -> Experiment:
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such experiment folder")
    if space is None:
        if not (folder / SPACE_COPY).is_file():
            raise ReportError(
                f"{folder}: no {SPACE_COPY} (an experiment started before the report existed?): "
                "pass the space it ran with as --space FILE"
            )
        try:
            space = load_space(folder / SPACE_COPY)
        except SpaceError as exc:
            raise ReportError(str(exc)) from None
    states = _tune_states(folder)
    table = read_table(folder)
    csv_status = dict(zip(table.trial_id, table.status)) if table is not None and len(table) else {}
    rescores = read_rescores(folder)

    trials = []
    # In the order Tune created the trials (its state lists them so; the searcher's study has the same order),
    # which makes the seeded importance reproducible: fANOVA's forest depends on the row order.
    created = {name: i for i, name in enumerate(states)}
    subs = [p for p in folder.iterdir() if (p / "params.json").is_file()]
    for sub in sorted(subs, key=lambda p: (created.get(p.name, len(created)), p.name)):
        records = _results(sub / "result.json")
        state = states.get(sub.name, {})
        trial_id = state.get("trial_id") or (records[-1].get("trial_id") if records else None) or sub.name
        last = records[-1] if records else {}
        if trial_id in csv_status:
            status = csv_status[trial_id]
        elif state:
            status = trial_status(
                SimpleNamespace(status=state["status"], last_result=last), space.base_config.train.steps
            )
        else:
            status = "interrupted"
        # A trial retried from its checkpoint reports the steps after that checkpoint again; keep the latest.
        by_step = {int(r["step"]): r for r in records if "step" in r}
        steps = sorted(by_step)
        history = pd.DataFrame(
            {
                "step": pd.Series(steps, dtype="int64"),
                "val_bpd": [float(by_step[s].get("val_bpd", math.nan)) for s in steps],
                "val_bpd_stderr": [float(by_step[s].get("val_bpd_stderr", math.nan)) for s in steps],
            },
            columns=["step", "val_bpd", "val_bpd_stderr"],
        )
        params = json.loads((sub / "params.json").read_text())
        trials.append(TrialRecord(trial_id, status, params, history, sub))
    if not trials and table is None:
        raise ReportError(f"{folder}: no trials found (not a tune.py experiment folder, or none has started)")
    winner = find_winner(trials, rescores, read_provenance(folder))
    return Experiment(folder, space, trials, rescores, table, winner, finished=table is not None)


def _tune_states(folder: Path) -> dict[str, dict[str, str]]:
    """Tune's own record of each trial (by its folder name): trial_id and status (TERMINATED, ERROR, ...)."""
    files = sorted(folder.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        raw = json.loads(files[-1].read_text())
        out = {}
        for entry in raw.get("trial_data", []):
            trial = json.loads(entry[0])
            out[Path(trial.get("relative_logdir", "")).name] = {
                "trial_id": trial["trial_id"],
                "status": trial["status"],
            }
        return out
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}  # a state file from another Ray version: statuses then come from trials.csv or the results


def _results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by an interruption
    return records
