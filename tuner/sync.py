"""Send what a tracking outage left unsent: `python -m tuner.sync FOLDER [FOLDER ...]`.

A FOLDER is a tuning experiment (`runs/<name>`, with its mlflow.json) or a full run's output folder
(`runs/<name>/full_run`); each keeps its unsent MLflow records in `mlflow_outbox.jsonl` (tuner/outbox.py). For an
experiment, the export's files then get the MLflow ids they could not know while the store was down (trials.csv's
mlflow_run_id, best_config.yaml's provenance), and are attached again. `tune.py --space ... --resume` of a
finished experiment does the same. Exit status 0 when everything has arrived, 3 when the store still does not
answer (the records stay kept), 2 for a folder that does not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trials.cli import OneLineArgumentParser
from tuner.export import fill_mlflow_ids
from tuner.outbox import EXIT_TRACKING_INCOMPLETE, OUTBOX_FILE, Outbox

PROG = "python -m tuner.sync"


def complete_experiment(tracker, experiment_dir: Path) -> bool:
    """Send the experiment's kept records, then complete the export's MLflow ids; True when all has arrived."""
    if not tracker.flush():
        return False
    changed = fill_mlflow_ids(experiment_dir, tracker.experiment_id, tracker.parent_run_id, tracker.child_run_ids())
    if changed:
        tracker.log_summary({}, {}, changed)  # the parent's copies get the ids too
    return tracker.flush()


def sync_folder(folder: Path) -> bool:
    if (folder / "mlflow.json").exists():
        from tuner.tracking import ExperimentTracker  # imports Ray: only for experiment folders

        tracker = ExperimentTracker.attach(folder)
        done, outbox = complete_experiment(tracker, folder), tracker.outbox
    else:
        outbox = Outbox(folder, None)
        done = outbox.flush() and outbox.complete
    if done:
        print(f"{folder}: everything has reached MLflow", flush=True)
    else:
        print(
            f"{folder}: {outbox.pending} MLflow records still unsent, kept in {outbox.path}"
            + (f"; {outbox.rejected} refused, kept in {outbox.rejected_path}" if outbox.rejected else ""),
            flush=True,
        )
    return done


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Send the MLflow records a tracking outage left in "
        f"{OUTBOX_FILE} (an experiment folder, or a full run's folder).",
    )
    p.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    args = p.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            print(f"{PROG}: error: {folder}: no such folder", file=sys.stderr)
            return 2
    results = [sync_folder(folder) for folder in args.folders]
    return 0 if all(results) else EXIT_TRACKING_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
