"""What the driver does once the search has ended: re-score the top trials' checkpoints at accurate fidelity
and draw the winner's samples for the report, both as Ray tasks (the driver never builds a model), and
print the summary of the results.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from trials.likelihood import LikelihoodEvaluator
from trials.progress import Progress
from trials.trainable import rescore_checkpoint, sample_checkpoint
from tuner.export import Export
from tuner.report import SAMPLE_SETTINGS, build_report
from tuner.search_space import SearchSpace

if TYPE_CHECKING:
    from tuner.tracking import ExperimentTracker


def rescore(
    candidates: list[tuple[Any, str]], evaluator: LikelihoodEvaluator, space: SearchSpace, gpus: float
) -> dict[str, dict[str, Any]]:
    """Accurate-fidelity val bits/dim of each candidate's last checkpoint, as parallel Ray tasks."""
    if not candidates:
        return {}
    print(
        f"\nRe-scoring the top {len(candidates)} trials at accurate fidelity "
        f"({space.base_config.eval.accurate.n_images} images, {space.base_config.eval.accurate.describe()}) ...",
        flush=True,
    )
    task = ray.remote(num_cpus=space.resources.cpus_per_trial, num_gpus=gpus)(rescore_checkpoint)
    evaluator_ref = ray.put(evaluator)
    threads = max(1, int(space.resources.cpus_per_trial))
    refs = {task.remote(path, evaluator_ref, threads=threads): trial.trial_id for trial, path in candidates}
    progress = Progress("Re-scoring", len(refs))
    out, pending = {}, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        trial_id = refs[ready[0]]
        try:
            out[trial_id] = ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # a lost checkpoint or a dead node costs one re-score, not the export
            out[trial_id] = {
                "failed": True,
                "mean": math.inf,
                "stderr": math.nan,
                "nfe": 0,
                "reason": f"re-scoring failed: {str(exc).strip().splitlines()[-1][:300]}",
            }
        r = out[trial_id]
        status = (
            f"failed: {r['reason']}" if r["failed"] else f"{r['mean']:.4f} ± {r['stderr']:.4f} bits/dim, NFE {r['nfe']}"
        )
        progress.done(len(out), f"{trial_id}: {status}")
    return {trial.trial_id: out[trial.trial_id] for trial, _ in candidates}


def write_report(experiment_dir: Path, space: SearchSpace, gpus: float, tracker: ExperimentTracker) -> Path | None:
    """The report, with the winner's samples drawn by a Ray task; attached to the MLflow parent run.

    A report that fails costs the report, not the experiment: the export is already written."""
    task = ray.remote(num_cpus=space.resources.cpus_per_trial, num_gpus=gpus)(sample_checkpoint)
    threads = max(1, int(space.resources.cpus_per_trial))

    def ray_sampler(checkpoint: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
        info = ray.get(task.remote(str(checkpoint), threads=threads, **settings))
        out.write_bytes(info.pop("png"))
        return info

    how = f"ODE, {SAMPLE_SETTINGS['method']} {SAMPLE_SETTINGS['steps']} steps"
    print(f"\nWriting the report (the winner's samples: {how}) ...", flush=True)
    try:
        report = build_report(experiment_dir, space, sampler=ray_sampler)
    except Exception as exc:  # noqa: BLE001 - any bug in a figure must not cost the finished search
        print(
            f"Report failed ({type(exc).__name__}: {exc}); rebuild it with: python -m tuner.report {experiment_dir}",
            file=sys.stderr,
            flush=True,
        )
        return None
    tracker.log_report(report.files)
    return report.html


def print_summary(table, export: Export, tracking_uri: str, experiment_id: str = "") -> None:
    """The best trials, the winner and its ties, the files written and where MLflow shows the runs."""
    import pandas as pd

    columns = [
        c
        for c in [
            "trial_id",
            "status",
            *export.hyperparameter_columns,
            "val_bpd_last",
            "val_bpd_accurate",
            "paired_diff",
            "paired_diff_stderr",
            "steps",
            "seconds",
        ]
        if c in table.columns
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print("\nBest trials:")
        print(table[columns].head(5).to_string(index=False))
    print(f"\nWinner: {export.winner_id} with val bits/dim {export.winner_bpd:.4f} ({export.winner_fidelity} fidelity)")
    if export.winner_fidelity == "accurate":
        rows = table.set_index("trial_id")
        if export.tied:
            ties = ", ".join(
                f"{tid} (+{rows.at[tid, 'paired_diff']:.4f} ± {rows.at[tid, 'paired_diff_stderr']:.4f})"
                for tid in export.tied
            )
            print(f"Tied with the winner (paired difference on the same images within 2 standard errors): {ties}")
        else:
            print("No re-scored trial is tied with the winner (every paired difference exceeds 2 standard errors).")
    print("Wrote:")
    for label, path in export.paths.items():
        print(f"  {label:<12} {path}")
    local = tracking_uri.startswith("sqlite:")
    print(
        f"  {'mlflow':<12} {tracking_uri}"
        + (f"   (browse: mlflow ui --backend-store-uri {tracking_uri})" if local else "")
    )
    # MLflow 3.17's UI opens every experiment on its GenAI view unless the URL asks for model training.
    ui = "http://127.0.0.1:5000" if local else tracking_uri.rstrip("/")
    if experiment_id and (local or tracking_uri.startswith("http")):
        print(f"  {'':<12} trials: {ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    print(f"Full run: python train.py --config {export.paths['best_config']}")
    sys.stdout.flush()
