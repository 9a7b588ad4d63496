"""Train a tuned config to its full length: `python train.py --config runs/<name>/best_config.yaml`.

Thin wiring: parse the command line, run `trials.full_run` (prepare, train, finish), log the result to
MLflow with `tuner.mlflow_runs`. User errors are one line and exit status 2; Ctrl-C saves a
checkpoint and exits 130, and the same command continues the run; exit status 3 says the run is complete on disk
but some MLflow records wait in <out>/mlflow_outbox.jsonl (`python -m tuner.sync <out>` sends them). See
README.md, "Full run".
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from trials.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OneLineArgumentParser, UserError, positive_int
from trials.datasets import DATASETS

PROG = "train.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog=PROG, description="Train a VP-SDE score model from a config (the tuner's "
                              "best_config.yaml) to its full length; report test bits/dim and samples.")
    p.add_argument("--config", required=True, type=Path, help="TrialConfig YAML, e.g. runs/<name>/best_config.yaml")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the config's train.steps)")
    p.add_argument("--out", type=Path, help="run folder (default: full_run/ next to the config)")
    p.add_argument("--data", choices=list(DATASETS), help="; ".join(f"{d.name}: {d.about}" for d in DATASETS.values()))
    p.add_argument("--data-root", help="folder with torchvision's MNIST/ (for --data mnist)")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST into --data-root")
    p.add_argument("--test-images", type=positive_int,
                   help="test images scored for bits/dim (default: eval.accurate.n_images; capped at the split's size)")
    p.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints (default: 500)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the tuning "
                   "experiment's, else sqlite:///<out>/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p.parse_args(argv)


class StopOnSignal:
    """Ctrl-C or SIGTERM asks training to stop at its next logged step with a checkpoint; a second one quits now."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping at the next logged step to save a checkpoint (press Ctrl-C again to quit without saving)",
              file=sys.stderr, flush=True)

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
        cfg = full_run.with_overrides(cfg, steps=args.steps, data=args.data, data_root=args.data_root,
                                      download=args.download)
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

    stop = StopOnSignal()
    previous = stop.install()
    try:
        outcome = full_run.run_training(plan, checkpoint_every=args.checkpoint_every, stop_requested=lambda: stop.requested,
                                 log=log)
    except KeyboardInterrupt:
        return fail(f"interrupted without saving; the last checkpoint is {plan.checkpoint_path} "
                    "(run the same command to continue from it)", EXIT_INTERRUPTED)
    except full_run.TrainingDiverged as exc:
        return fail(f"training diverged: {exc}; the last checkpoint is {plan.checkpoint_path}", 1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not outcome.completed:
        log("Run the same command to continue.")
        return EXIT_INTERRUPTED

    try:
        metrics = full_run.finish(plan, outcome, log=log)
    except KeyboardInterrupt:
        return fail(f"interrupted during evaluation; training is complete in {plan.checkpoint_path}: "
                    "run the same command again to evaluate", EXIT_INTERRUPTED)
    log(f"Wrote {plan.out_dir / full_run.METRICS_FILE}")

    if args.no_mlflow:
        return 0
    from tuner.mlflow_runs import full_run_tracking_uri, log_full_run
    from tuner.outbox import EXIT_TRACKING_INCOMPLETE

    uri = full_run_tracking_uri(args.mlflow_uri, os.environ.get("MLFLOW_TRACKING_URI"), plan.provenance, plan.out_dir)
    logged = log_full_run(uri, config_file=args.config, out_dir=plan.out_dir, params=plan.cfg.flat(), metrics=metrics,
                          provenance=plan.provenance, artifacts=full_run.output_files(plan, metrics))
    if not logged.complete:  # a store that is down or refuses: the results are safe on disk, say so
        outbox = logged.outbox
        print(f"{PROG}: the run is complete in {plan.out_dir}, but MLflow ({uri}) has not got everything: "
              f"{outbox.pending} records are kept in {outbox.path}"
              + (f" and {outbox.rejected} refused ones in {outbox.rejected_path}" if outbox.rejected else "")
              + f"; send them with: python -m tuner.sync {plan.out_dir}", file=sys.stderr, flush=True)
        return EXIT_TRACKING_INCOMPLETE
    log(f"MLflow: {uri} (run {logged.run_id})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while starting up or logging: nothing half-written to explain
        print(f"{PROG}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
