"""The tuning driver: start or join Ray, run the search, re-score the best trials, export, log to MLflow.

One call, `run(options)`, does one experiment:
  1. validate the space and the CLI (one-line errors before anything starts or is written);
  2. start a local Ray or join a cluster; load the data and build the shared evaluator once, and hand
     both to every trial through the object store (`tune.with_parameters`);
  3. `Tuner.fit` with an Optuna study (TPE, GP or random; tuner/searcher.py) and ASHA (or FIFO) on val
     bits/dim at fast fidelity, with an MLflow callback that writes a child run per trial;
  4. re-score the top k trials' checkpoints at accurate fidelity (as Ray tasks, so the driver never builds
     a model) and export `trials.csv` and `best_config.yaml`, attached to the MLflow parent run;

  5. write the experiment report (tuner/report/; the winner's samples drawn by a Ray task), attached too.

MLflow going away never stops a search (tuner/outbox.py): the files are always written, and the exit status is
3 instead of 0 when some records are still waiting for the store; `--resume` of a finished experiment re-runs
nothing and only sends those.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from trials.cli import EXIT_INTERRUPTED, UserError
from trials.data import load_data
from trials.likelihood import LikelihoodEvaluator
from trials.progress import Progress
from trials.trainable import rescore_checkpoint, run_trial, sample_checkpoint, time_training_steps
from tuner import cpu_only
from tuner.export import Export, rank_candidates, trials_table, write_outputs
from tuner.mlflow_runs import default_tracking_uri, trial_status
from tuner.outbox import EXIT_TRACKING_INCOMPLETE
from tuner.report import SAMPLE_SETTINGS, build_report, save_space
from tuner.searcher import METRIC, MODE, STUDY_FILE, build_search
from tuner.space import SearchSpace, load_space
from tuner.sync import complete_experiment
from tuner.tracking import ExperimentTracker, MlflowTrialLogger, read_state


class UsageError(UserError, ValueError):
    """The command line asks for something impossible; one line, exit 2."""


@dataclass(frozen=True)
class TuneOptions:
    space: Path
    name: str | None = None
    storage: Path = Path("runs")
    num_samples: int | None = None
    time_budget: float | None = None
    max_concurrent: int | None = None
    seed: int | None = None
    data: str | None = None
    data_root: str | None = None
    download: bool = False
    mlflow_uri: str | None = None
    address: str | None = None
    resume: bool = False
    top_k: int | None = None
    allow_cpu: bool = False  # run a space sized for GPUs on a cluster without GPUs anyway


def prepare(options: TuneOptions) -> tuple[SearchSpace, Path]:
    """Everything that can be checked before Ray starts: the space, the CLI overrides, the folder."""
    space = with_cli_overrides(load_space(options.space), options)
    experiment_dir = (options.storage / space.name).resolve()
    started = (experiment_dir / "tuner.pkl").exists()
    if options.resume and not started:
        raise UsageError(f"--resume: no experiment to resume at {experiment_dir} (run without --resume to start it)")
    if not options.resume and started:
        raise UsageError(
            f"experiment {space.name!r} already exists at {experiment_dir}: "
            "add --resume to continue it, or pick another --name"
        )
    return space, experiment_dir


def with_cli_overrides(space: SearchSpace, options: TuneOptions) -> SearchSpace:
    search = space.search
    for field, value in (
        ("num_samples", options.num_samples),
        ("time_budget_s", options.time_budget),
        ("max_concurrent", options.max_concurrent),
        ("top_k", options.top_k),
        ("seed", options.seed),
    ):
        if value is not None:  # tune.py's parser has already checked the counts are positive
            search = dataclasses.replace(search, **{field: value})
    if options.name is not None and (not options.name or any(c in options.name for c in "/\\ ")):
        raise UsageError(f"--name: must be a non-empty word without slashes or spaces, got {options.name!r}")
    fixed = {k: dict(v) if isinstance(v, dict) else v for k, v in space.fixed.items()}
    data = dict(fixed.get("data") or {})
    if options.data is not None:
        data["name"] = options.data
    if options.data_root is not None:
        data["root"] = options.data_root
    if options.download:
        data["download"] = True
    fixed["data"] = data
    space = dataclasses.replace(space, name=options.name or space.name, search=search, fixed=fixed)
    space.check()  # --data mnist without --data-root is caught here, before Ray starts
    return space


def run(options: TuneOptions, stand_in: Callable[..., None] | None = None) -> int:
    """One experiment. `stand_in` replaces the trial's training (bench/driver_load.py replays recorded curves
    through everything else): it is called as stand_in(params, space=space) and reports like run_trial."""
    space, experiment_dir = prepare(options)
    if options.resume and read_state(experiment_dir).get("status") == "FINISHED":
        return _send_unsent(experiment_dir, _resume_command(options, space))
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
            f"Continue with: {_resume_command(options, space)}\n"
            f"Report of the trials so far: python -m tuner.report {experiment_dir}",
            flush=True,
        )
        return EXIT_INTERRUPTED

    tracker.flush()  # what the store missed during the search, so the table gets every run id it can
    candidates = rank_candidates(analysis, statuses, space.search.top_k)
    rescores = _rescore(candidates, evaluator, space, gpus)
    table = trials_table(analysis, space, statuses, rescores, tracker.child_run_ids())
    export = write_outputs(experiment_dir, space, table, rescores, analysis, tracker)
    report = _write_report(experiment_dir, space, gpus, tracker)
    if report is not None:
        export.paths["report"] = report
    _print_summary(table, export, tracking_uri, tracker.experiment_id)
    tracker.finish("FINISHED")
    return _tracking_status(tracker, experiment_dir, _resume_command(options, space))


# ---- tracking that has not arrived yet -------------------------------------------------------------
def _resume_command(options: TuneOptions, space: SearchSpace) -> str:
    return f"python tune.py --space {options.space} --name {space.name} --storage {options.storage} --resume"


def _tracking_status(tracker: ExperimentTracker, experiment_dir: Path, resume_command: str) -> int:
    """0 when MLflow has everything; else say what is kept where and how to send it, and return 3."""
    if complete_experiment(tracker, experiment_dir):
        return 0
    outbox = tracker.outbox
    refused = f"; {outbox.rejected} refused by the store, kept in {outbox.rejected_path}" if outbox.rejected else ""
    print(
        f"\nThe search is complete and its files are written, but MLflow ({tracker.tracking_uri}) has not got "
        f"everything: {outbox.pending} records are kept in {outbox.path}{refused}. Send them when it answers "
        f"with: {resume_command}",
        flush=True,
    )
    return EXIT_TRACKING_INCOMPLETE


def _send_unsent(experiment_dir: Path, resume_command: str) -> int:
    """--resume of a finished experiment: nothing to re-run; send what MLflow has not received."""
    print(f"{experiment_dir} is a finished search: nothing to re-run; sending what MLflow has not received", flush=True)
    tracker = ExperimentTracker.attach(experiment_dir)
    status = _tracking_status(tracker, experiment_dir, resume_command)
    if status == 0:
        print(f"MLflow: {tracker.tracking_uri} has everything (parent run {tracker.parent_run_id})", flush=True)
    return status


# ---- pieces -------------------------------------------------------------------------------------
def _start_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ship this checkout's trials/ and tuner/ so the cluster runs the driver's code version.
        import trials
        import tuner

        ctx = ray.init(address=address, runtime_env={"py_modules": [trials, tuner]}, log_to_driver=True)
    else:
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
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


def _rescore(
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


def _write_report(experiment_dir: Path, space: SearchSpace, gpus: float, tracker: ExperimentTracker) -> Path | None:
    """The report, with the winner's samples drawn by a Ray task; attached to the MLflow parent run.

    A report that fails costs the report, not the experiment: the export is already written."""
    task = ray.remote(num_cpus=space.resources.cpus_per_trial, num_gpus=gpus)(sample_checkpoint)
    threads = max(1, int(space.resources.cpus_per_trial))

    def ray_sampler(checkpoint: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
        info = ray.get(task.remote(str(checkpoint), threads=threads, **settings))
        out.write_bytes(info.pop("png"))
        return info

    print(f"\nWriting the report (the winner's samples: ODE, rtol {SAMPLE_SETTINGS['rtol']:g}) ...", flush=True)
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


def _print_summary(table, export: Export, tracking_uri: str, experiment_id: str = "") -> None:
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
