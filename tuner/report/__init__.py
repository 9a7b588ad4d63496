"""The experiment report: what a tuning run found, as PNG figures and one self-contained HTML page.

    python -m tuner.report runs/<name> [--space FILE] [--no-samples]

`tune.py` writes it at the end of a search (and after `--resume`) and attaches it to the MLflow parent run;
this command rebuilds it from the experiment folder alone, finished or interrupted, without Ray. It reads:

  space.yaml                 the search space (tune.py keeps a copy; --space for older experiments)
  <trial folders>            Tune's params.json and result.json per trial: the val bits/dim at every rung
  experiment_state-*.json    Tune's trial statuses, for an experiment that never reached the export
  trials.csv, rescores.json, best_config.yaml   the export, when the search finished

and writes <experiment>/report/:

  report.html            everything below on one page; figures embedded as base64 PNGs, no scripts, nothing
                         fetched, so it opens offline and travels as one file
  learning_curves.png    val bits/dim (fast fidelity) against step for every trial: the best few and the winner
                         strong and named, the rest faint; the scheduler's rungs and where each trial ended
  importance.png         Optuna's fANOVA importance of each hyperparameter for the final val bits/dim, over
                         the trials that reached the full length (omitted, with the reason, below two)
  hyperparameters.png    each hyperparameter against the final val bits/dim (log axes for log ranges)
  rescores.png           the accurate re-scores with their standard errors, and which tie with the winner
  samples.png            the winner's samples: probability-flow ODE on a short fixed grid, from its checkpoint
  report.json            the numbers behind the page (importance and the trials it used, ties, samples)

The driver side never builds a model, so the sample grid comes from trial-side code: a Ray task during
tune.py (the `sampler` argument), or `python -m trials.preview` as a subprocess here. An unchanged
checkpoint reuses the grid already drawn (report/samples.json records the checkpoint's hash).

One module a job: experiment (reading the folder, the winner), analysis (ties, rungs), importance, curves and
figures, sampling, page (the HTML), build (all of it), cli (the command; __main__ runs it).
"""

from tuner.report.analysis import stopping_rule, ties
from tuner.report.build import FIGURES, REPORT_DIR, Report, build_report
from tuner.report.cli import main
from tuner.report.curves import STRONG, learning_curves_figure, plot_learning_curves, strong_trials
from tuner.report.experiment import (
    SPACE_COPY,
    Experiment,
    ReportError,
    TrialRecord,
    Winner,
    find_winner,
    load_experiment,
    save_space,
)
from tuner.report.figures import END_MARKERS, STATUS_COLOURS, plot_hyperparameters, plot_importance, plot_rescores
from tuner.report.importance import Importance, importance
from tuner.report.sampling import SAMPLE_SETTINGS, Sampler, subprocess_sampler, winner_samples

__all__ = [
    "END_MARKERS",
    "FIGURES",
    "REPORT_DIR",
    "SAMPLE_SETTINGS",
    "SPACE_COPY",
    "STATUS_COLOURS",
    "STRONG",
    "Experiment",
    "Importance",
    "Report",
    "ReportError",
    "Sampler",
    "TrialRecord",
    "Winner",
    "build_report",
    "find_winner",
    "importance",
    "learning_curves_figure",
    "load_experiment",
    "main",
    "plot_hyperparameters",
    "plot_importance",
    "plot_learning_curves",
    "plot_rescores",
    "save_space",
    "stopping_rule",
    "strong_trials",
    "subprocess_sampler",
    "ties",
    "winner_samples",
]
