"""Train a tuned config to its full length: `python train.py --config runs/<name>/best_config.yaml`.

Thin wiring: parse the command line, run `trials.full_run` (prepare, train, finish) with an MLflow run that
follows it live (`tuner.mlflow_runs.FullRunTracker`), write the run's report (`tuner.full_run_report`) and log
the network as an MLflow model (`tuner.mlflow_model`). User errors are one line and exit status 2; Ctrl-C saves
a checkpoint, ends the MLflow run KILLED and exits 130, and the same command continues the run (and the MLflow
run); exit status 3 says the run is complete on disk but some MLflow records wait in <out>/mlflow_outbox.jsonl
(`python -m tuner.sync <out>` sends them). See docs/configuration.md, "Full run".
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from trials.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OneLineArgumentParser, UserError, positive_int
from trials.datasets import DATASETS

PROG = "train.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(
        prog=PROG,
        description="Train a VP-SDE score model from a config (the tuner's "
        "best_config.yaml) to its full length; report test bits/dim and samples.",
    )
    p.add_argument("--config", required=True, type=Path, help="TrialConfig YAML, e.g. runs/<name>/best_config.yaml")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the config's train.steps)")
    p.add_argument("--out", type=Path, help="run folder (default: full_run/ next to the config)")
    p.add_argument("--data", choices=list(DATASETS), help="; ".join(f"{d.name}: {d.about}" for d in DATASETS.values()))
    p.add_argument("--data-root", help="folder with torchvision's MNIST/ (for --data mnist)")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST into --data-root")
    p.add_argument(
        "--test-images",
        type=positive_int,
        help="test images scored for bits/dim (default: eval.accurate.n_images; capped at the split's size)",
    )
    p.add_argument(
        "--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints (default: 500)"
    )
    p.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the tuning "
        "experiment's, else sqlite:///<out>/mlflow.db)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--register-model",
        metavar="NAME",
        type=model_name,
        help="register the logged model under NAME in MLflow's model registry (models:/NAME/VERSION)",
    )
    p.add_argument(
        "--sample-every",
        type=positive_int,
        metavar="N",
        help="draw a small grid every N steps while training (sets sample.every; sample.sampler picks the sampler)",
    )
    args = p.parse_args(argv)
    if args.register_model and args.no_mlflow:
        p.error("--register-model needs MLflow: drop --no-mlflow")
    return args


def model_name(text: str) -> str:
    if not text.strip() or "/" in text:
        raise argparse.ArgumentTypeError(f"must be a name without '/', got {text!r}")
    return text


class StopOnSignal:
    """Ctrl-C or SIGTERM asks training to stop at its next logged step with a checkpoint; a second one quits now."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nStopping at the next logged step to save a checkpoint (press Ctrl-C again to quit without saving)",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> dict:
        handlers = {signal.SIGINT: signal.signal(signal.SIGINT, self)}
        if hasattr(signal, "SIGTERM"):
            handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self)
        return handlers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status

    def log(line: str) -> None:
        print(line, flush=True)

    # The config is checked before torch is imported, so a typo answers at once.
    from trials.config import load_config_file

    try:
        cfg, provenance = load_config_file(args.config)
    except UserError as exc:
        return fail(str(exc))

    from trials import full_run

    out_dir = args.out if args.out is not None else args.config.parent / "full_run"
    try:
        cfg = full_run.with_overrides(
            cfg,
            steps=args.steps,
            data=args.data,
            data_root=args.data_root,
            download=args.download,
            sample_every=args.sample_every,
        )
        plan = full_run.prepare(cfg, provenance, args.config, out_dir, test_images=args.test_images)
    except UserError as exc:
        return fail(str(exc))

    for line in full_run.describe(plan):
        log(line)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        full_run.write_config(plan)
    except OSError as exc:
        return fail(f"--out {out_dir}: cannot write there ({exc.strerror or exc})")

    tracker = uri = None
    if not args.no_mlflow:
        from tuner.mlflow_runs import FullRunTracker, full_run_tracking_uri

        uri = full_run_tracking_uri(args.mlflow_uri, os.environ.get("MLFLOW_TRACKING_URI"), plan.provenance, out_dir)
        tracker = FullRunTracker(
            uri,
            out_dir,
            config_file=args.config,
            params=plan.cfg.flat(),
            provenance=plan.provenance,
            log=log,
            tags={"precision": plan.trainer.precision, "test_split": plan.test_split},
        )
        log(
            f"MLflow: {uri}, run {tracker.run_id or '(not created yet: the store does not answer)'}"
            + (" (continued)" if tracker.resumed else "")
        )

    def ended(status: str) -> None:
        if tracker is not None:
            tracker.end(status)
            tracker.flush()  # what a stopped run logged reaches the store before the process ends, if it answers

    stop = StopOnSignal()
    previous = stop.install()
    try:
        outcome = full_run.run_training(
            plan,
            checkpoint_every=args.checkpoint_every,
            stop_requested=lambda: stop.requested,
            log=log,
            watcher=tracker,
        )
    except KeyboardInterrupt:
        ended("KILLED")
        return fail(
            f"interrupted without saving; the last checkpoint is {plan.checkpoint_path} "
            "(run the same command to continue from it)",
            EXIT_INTERRUPTED,
        )
    except full_run.TrainingDiverged as exc:
        ended("FAILED")
        return fail(f"training diverged: {exc}; the last checkpoint is {plan.checkpoint_path}", 1)
    except BaseException:
        ended("FAILED")
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not outcome.completed:
        ended("KILLED")
        log("Run the same command to continue.")
        return EXIT_INTERRUPTED

    try:
        metrics = full_run.finish(plan, outcome, log=log)
    except KeyboardInterrupt:
        ended("KILLED")
        return fail(
            f"interrupted during evaluation; training is complete in {plan.checkpoint_path}: "
            "run the same command again to evaluate",
            EXIT_INTERRUPTED,
        )
    except BaseException:
        ended("FAILED")
        raise
    log(f"Wrote {plan.out_dir / full_run.METRICS_FILE}")
    train = metrics["train"]
    if train["scoring_share"] is not None:
        log(
            f"Val bits/dim during training took {train['scoring_seconds']:.0f} s, "
            f"{100 * train['scoring_share']:.1f}% of the {train['seconds']:.0f} s of training"
        )

    from tuner.full_run_report import write_report

    report = write_report(plan.out_dir)
    log(f"Wrote {report[0]}")
    if tracker is None:
        return 0
    try:
        return log_to_mlflow(args, plan, metrics, report, tracker, uri, log)
    except KeyboardInterrupt:
        ended("KILLED")
        return fail(f"interrupted while logging to MLflow; the results are in {plan.out_dir}", EXIT_INTERRUPTED)


def log_to_mlflow(args, plan, metrics, report, tracker, uri: str, log) -> int:
    """The finished run's results, report and model into its MLflow run; exit status 0, or 3 when the store has
    not got everything yet."""
    from trials import full_run
    from trials.portable import OUTPUT
    from tuner.mlflow_model import MODEL_NAME, log_model
    from tuner.outbox import EXIT_TRACKING_INCOMPLETE

    tracker.log_results(metrics, full_run.output_files(plan, metrics), report)
    tracker.flush()  # the model is logged by MLflow's own client, to a run that must exist by now
    log("Logging the EMA network to MLflow as a PyTorch model (torch.export) ...")
    started = time.perf_counter()
    model = log_model(
        uri,
        tracker.run_id,
        full_run.exportable_network(plan),
        plan.cfg.to_dict(),
        input_shape=plan.cfg.dataset.batch_shape(1)[1:],
        output=OUTPUT,
        step=metrics["train"]["steps"],
        out_dir=plan.out_dir,
        register_as=args.register_model,
        log=log,
        keep_locally=lambda folder: tracker.outbox.log_artifact(tracker.key, folder, MODEL_NAME),
    )
    exported_in = time.perf_counter() - started
    tracker.end("FINISHED")
    complete = tracker.flush()
    if model.model_uri:
        log(
            f"MLflow model: runs:/{tracker.run_id}/{MODEL_NAME} ({model.model_uri})"
            + (f", registered as {model.registered_uri}" if model.registered_uri else "")
            + f"; exported and logged in {exported_in:.0f} s"
        )
    if model.local_copy:
        print(
            f"{PROG}: the model is saved in {model.local_copy} (mlflow.pytorch.load_model loads it from there)"
            + (f"; it was not registered as {args.register_model}" if args.register_model else ""),
            file=sys.stderr,
            flush=True,
        )
    if not complete:  # a store that is down or refuses: the results are safe on disk, say so
        outbox = tracker.outbox
        print(
            f"{PROG}: the run is complete in {plan.out_dir}, but MLflow ({uri}) has not got everything: "
            f"{outbox.pending} records are kept in {outbox.path}"
            + (f" and {outbox.rejected} refused ones in {outbox.rejected_path}" if outbox.rejected else "")
            + f"; send them with: python -m tuner.sync {plan.out_dir}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_TRACKING_INCOMPLETE
    if args.register_model and not model.registered_uri:
        return EXIT_TRACKING_INCOMPLETE
    log(f"MLflow: {uri} (run {tracker.run_id})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while starting up or logging: nothing half-written to explain
        print(f"{PROG}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
