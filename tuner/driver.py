"""The tuning driver: start or join Ray, run the search, then hand over to what comes after it.

One call, `run(options)`, does one experiment:
  1. validate the space and the CLI (tuner/options.py: one-line errors before anything starts or is written);
  2. start a local Ray or join a cluster; load the data and build the shared evaluator once, and hand
     both to every trial through the object store (`tune.with_parameters`);
  3. `Tuner.fit` with an Optuna study (TPE, GP or random; tuner/searcher.py) and ASHA (or FIFO) on val
     bits/dim at fast fidelity, with an MLflow callback that writes a child run per trial;
  4. re-score the top k trials' checkpoints at accurate fidelity (as Ray tasks, tuner/after_search.py, so the
     driver never builds a model) and export `trials.csv` and `best_config.yaml` (tuner/export.py), attached
     to the MLflow parent run;
  5. write the experiment report (tuner/report/; the winner's samples drawn by a Ray task), attached too,
     and print the summary.

MLflow going away never stops a search (tuner/outbox.py): the files are always written, and the exit status is
3 instead of 0 when some records are still waiting for the store; `--resume` of a finished experiment re-runs
nothing and only sends those.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from trials.cli import EXIT_INTERRUPTED
from trials.data import load_data
from trials.likelihood import LikelihoodEvaluator
from trials.trainable import run_trial, time_training_steps
from tuner import cpu_only
from tuner.after_search import print_summary, rescore, write_report
from tuner.export import write_outputs
from tuner.mlflow_runs import default_tracking_uri, trial_status
from tuner.options import TuneOptions, UsageError, prepare, resume_command
from tuner.outbox import EXIT_TRACKING_INCOMPLETE
from tuner.report import save_space
from tuner.search_space import SearchSpace
from tuner.searcher import METRIC, MODE, STUDY_FILE, build_search
from tuner.sync import complete_experiment
from tuner.tracking import ExperimentTracker, MlflowTrialLogger, read_state
from tuner.trials_table import rank_candidates, trials_table


def run(options: TuneOptions, stand_in: Callable[..., None] | None = None) -> int:
    """One experiment. `stand_in` replaces the trial's training (bench/driver_load.py replays recorded curves
    through everything else): it is called as stand_in(params, space=space) and reports like run_trial."""
    space, experiment_dir = prepare(options)
    if options.resume and read_state(experiment_dir).get("status") == "FINISHED":
        return _send_unsent(experiment_dir, resume_command(options, space))
    base = space.base_config
    data = load_data(base.data)
    storage = options.storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tracking_uri = options.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage)

    # Built before Ray starts, so that more evaluation images than the validation split holds is an
    # error before anything runs.
    evaluator = LikelihoodEvaluator.build(data.val, base.eval, base.data.centered)
    _start_ray(options.address)
    gpus = _gpus_per_trial(space, data, options.allow_cpu)
    trial = (
        tune.with_parameters(stand_in, space=space)
        if stand_in is not None
        else tune.with_parameters(
            run_trial, space=space, data=data, evaluator=evaluator, threads=max(1, int(space.resources.cpus_per_trial))
        )
    )
    trainable = tune.with_resources(trial, {"cpu": space.resources.cpus_per_trial, "gpu": gpus})

    tracker = ExperimentTracker.open(tracking_uri, experiment_dir, space.name)
    tracker.log_experiment(_experiment_params(space), {"space_file": space.source, "space_sha256": space.sha256})
    # Sent now, before the search, for the ids printed below; from here on the outbox's sender does the sending.
    tracker.flush()
    ids = (
        f"experiment {tracker.experiment_id}, parent run {tracker.parent_run_id}"
        if tracker.parent_run_id
        else "parent run not created yet"
    )
    print(f"MLflow: {tracking_uri} ({ids})", flush=True)
    save_space(experiment_dir, space)  # the report is rebuilt from the folder alone

    _forward_sigterm_as_sigint()
    # Keeping one checkpoint per trial makes Tune snapshot its state at every report and warn about it each
    # time; at a handful of reports a minute the snapshots are cheap and the warning is only noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if options.resume:
        print(f"Resuming {experiment_dir}", flush=True)
        tuner = tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, resume_errored=False)
    else:
        # A study left by a start that died before Tune saved anything holds no trial worth keeping.
        (experiment_dir / STUDY_FILE).unlink(missing_ok=True)
        tuner = tune.Tuner(
            trainable,
            tune_config=_tune_config(space, experiment_dir),
            run_config=tune.RunConfig(
                name=space.name,
                storage_path=str(storage),
                callbacks=[MlflowTrialLogger(tracking_uri, experiment_dir, space.name, space, base.train.steps)],
                failure_config=tune.FailureConfig(max_failures=space.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    tuner.fit()

    analysis = _load_analysis(experiment_dir)
    statuses = {t.trial_id: trial_status(t, base.train.steps) for t in analysis.trials}
    # Trials the time budget cut short end TERMINATED; only Ctrl-C/SIGTERM leaves some PENDING or RUNNING.
    if any(s == "interrupted" for s in statuses.values()):
        tracker.finish("KILLED")
        kept = "" if tracker.flush() else f" (and the MLflow records kept in {tracker.outbox.path})"
        print(
            f"\nInterrupted; state saved in {experiment_dir}{kept}.\n"
            f"Continue with: {resume_command(options, space)}\n"
            f"Report of the trials so far: python -m tuner.report {experiment_dir}",
            flush=True,
        )
        return EXIT_INTERRUPTED

    tracker.flush()  # what the store missed during the search, so the table gets every run id it can
    candidates = rank_candidates(analysis, statuses, space.search.top_k)
    rescores = rescore(candidates, evaluator, space, gpus)
    table = trials_table(analysis, space, statuses, rescores, tracker.child_run_ids())
    export = write_outputs(experiment_dir, space, table, rescores, analysis, tracker)
    report = write_report(experiment_dir, space, gpus, tracker)
    if report is not None:
        export.paths["report"] = report
    print_summary(table, export, tracking_uri, tracker.experiment_id)
    tracker.finish("FINISHED")
    return _tracking_status(tracker, experiment_dir, resume_command(options, space))


# ---- tracking that has not arrived yet -------------------------------------------------------------
def _tracking_status(tracker: ExperimentTracker, experiment_dir: Path, command: str) -> int:
    """0 when MLflow has everything; else say what is kept where and how to send it, and return 3."""
    if complete_experiment(tracker, experiment_dir):
        return 0
    outbox = tracker.outbox
    refused = f"; {outbox.rejected} refused by the store, kept in {outbox.rejected_path}" if outbox.rejected else ""
    print(
        f"\nThe search is complete and its files are written, but MLflow ({tracker.tracking_uri}) has not got "
        f"everything: {outbox.pending} records are kept in {outbox.path}{refused}. Send them when it answers "
        f"with: {command}",
        flush=True,
    )
    return EXIT_TRACKING_INCOMPLETE


def _send_unsent(experiment_dir: Path, command: str) -> int:
    """--resume of a finished experiment: nothing to re-run; send what MLflow has not received."""
    print(f"{experiment_dir} is a finished search: nothing to re-run; sending what MLflow has not received", flush=True)
    tracker = ExperimentTracker.attach(experiment_dir)
    status = _tracking_status(tracker, experiment_dir, command)
    if status == 0:
        print(f"MLflow: {tracker.tracking_uri} has everything (parent run {tracker.parent_run_id})", flush=True)
    return status


# ---- Ray, the trials' resources and the Tuner ---------------------------------------------------
def _start_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ship this checkout's trials/ and tuner/ so the cluster runs the driver's code version.
        import trials
        import tuner

        ctx = ray.init(address=address, runtime_env={"py_modules": [trials, tuner]}, log_to_driver=True)
    else:
        # "local", not None: ray.init() without an address joins the last cluster `ray start` left on this
        # machine (another user's, another test's), while the promise is a Ray of this search's own.
        ctx = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    url = getattr(ctx, "dashboard_url", None)
    if not url:
        print("Ray dashboard: not running on this cluster", flush=True)
    elif _token_auth_enabled():
        # Ray 2.5x protects the dashboard with the cluster's token and has no URL that carries it: the
        # browser asks once and keeps it (a cookie, 30 days). `ray get-auth-token` prints it, for a local
        # Ray (~/.ray/auth_token) and for a joined one ($RAY_AUTH_TOKEN) alike.
        ray_cli = Path(sys.executable).with_name("ray")
        print(
            f"Ray dashboard: http://{url}  (it asks for a token: paste what "
            f"`{ray_cli if ray_cli.exists() else 'ray'} get-auth-token` prints)",
            flush=True,
        )
    else:
        print(f"Ray dashboard: http://{url}", flush=True)


def _token_auth_enabled() -> bool:
    try:  # Ray's own check; older Rays have no token authentication (and no such module)
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except (ImportError, AttributeError):
        return False


def _gpus_per_trial(space: SearchSpace, data, allow_cpu: bool) -> float:
    if space.resources.gpus_per_trial <= 0:
        return 0.0
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if cluster_gpus <= 0:
        # A GPU request on a CPU-only cluster would leave every trial pending forever; running the trials on
        # the CPUs instead takes days for a GPU-sized space, so say so and stop unless told to go on.
        _check_cpu_only(space, data, allow_cpu)
        print(f"--allow-cpu: trials run on CPU (ignoring gpus_per_trial={space.resources.gpus_per_trial})", flush=True)
        return 0.0
    gpus = space.resources.gpus_per_trial
    # Whole trials per GPU: Ray packs fractional requests onto one GPU until its share is used up.
    per_gpu = int(1 / gpus + 1e-9)
    print(
        f"GPUs: {cluster_gpus:g} on the Ray cluster, {gpus:g} per trial ({per_gpu} trial{'s' if per_gpu > 1 else ''} "
        f"per GPU): up to {int(cluster_gpus) * per_gpu} trials at a time on them",
        flush=True,
    )
    return gpus


def _check_cpu_only(space: SearchSpace, data, allow_cpu: bool) -> None:
    params = cpu_only.middle_params(space)
    cfg = space.trial_config(params)
    threads = max(1, int(space.resources.cpus_per_trial))
    described = (
        ", ".join(f"{hp.name} {hp.decode(params[hp.name])}" for hp in space.hyperparameters if hp.is_choice)
        + f"; {threads} thread{'s' if threads > 1 else ''}"
    )
    print(cpu_only.headline(space), flush=True)
    print(f"Timing 2 training steps of its model on a worker ({described}) ...", flush=True)
    task = ray.remote(num_cpus=space.resources.cpus_per_trial)(time_training_steps)
    measured = ray.get(task.remote(cfg, data, steps=2, threads=threads))
    est = cpu_only.estimate(space, measured["seconds_per_step"], ray.cluster_resources().get("CPU", 1.0))
    for line in cpu_only.explain(space, est, described):
        print(line, flush=True)
    if not allow_cpu:
        raise UsageError(
            f"{space.source}: resources.gpus_per_trial: the space is sized for GPUs and this Ray "
            f"cluster has none; use {cpu_only.CPU_SPACE}, or add --allow-cpu to run it anyway"
        )


def _tune_config(space: SearchSpace, experiment_dir: Path) -> tune.TuneConfig:
    experiment_dir.mkdir(parents=True, exist_ok=True)
    searcher, scheduler = build_search(space, experiment_dir)
    return tune.TuneConfig(
        metric=METRIC,
        mode=MODE,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=space.search.num_samples,
        time_budget_s=space.search.time_budget_s,
    )


def _experiment_params(space: SearchSpace) -> dict[str, Any]:
    params = {f"search.{k}": v for k, v in dataclasses.asdict(space.search).items()}
    params.update({f"resources.{k}": v for k, v in dataclasses.asdict(space.resources).items()})
    params.update({f"space.{hp.name}": hp.describe() for hp in space.hyperparameters})
    return params


def _forward_sigterm_as_sigint() -> None:
    """Tune saves its state and stops cleanly on SIGINT; give SIGTERM (docker stop, kill) the same path."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def _load_analysis(experiment_dir: Path) -> tune.ExperimentAnalysis:
    # Trials the time budget stopped before their first report have no result files; Tune warns about
    # each one, which says nothing the trials table does not.
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return tune.ExperimentAnalysis(str(experiment_dir), default_metric=METRIC, default_mode=MODE)
    finally:
        logger.setLevel(level)
