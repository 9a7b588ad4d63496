"""Tune a VP-SDE score model's hyperparameters: `python tune.py --space search_spaces/vpsde.yaml`.

Thin wiring: parse the command line, hand it to `tuner.driver.run`, turn user errors into one line and
exit status 2. See docs/configuration.md for the options and what the experiment writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trials.cli import EXIT_BAD_INPUT, OneLineArgumentParser, UserError, positive_float, positive_int
from trials.datasets import DATASETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(
        prog="tune.py", description="Tune VP-SDE score models with Ray Tune, Optuna/ASHA and MLflow."
    )
    p.add_argument("--space", required=True, type=Path, help="search-space YAML (see search_spaces/)")
    p.add_argument("--name", help="experiment name (default: the space's name)")
    p.add_argument(
        "--storage",
        type=Path,
        default=Path("runs"),
        help="results folder; shared storage on a cluster (default: runs/)",
    )
    p.add_argument("--num-samples", type=positive_int, help="number of trials (overrides the space)")
    p.add_argument(
        "--time-budget",
        type=positive_float,
        metavar="SECONDS",
        help="stop the search after this long, then still re-score and export the best so far",
    )
    p.add_argument("--max-concurrent", type=positive_int, help="trials running at once (overrides the space)")
    p.add_argument("--seed", type=int, help="searcher seed (overrides the space)")
    p.add_argument("--top-k", type=positive_int, help="trials re-scored at accurate fidelity after the search")
    p.add_argument("--data", choices=list(DATASETS), help="; ".join(f"{d.name}: {d.about}" for d in DATASETS.values()))
    p.add_argument("--data-root", help="folder with torchvision's MNIST/ (for --data mnist)")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST into --data-root")
    p.add_argument(
        "--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)"
    )
    p.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment of the same --name")
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run a space sized for GPUs (resources.gpus_per_trial > 0) on a cluster without GPUs anyway",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help and bad flags answer instantly.
    from tuner.driver import TuneOptions, run

    options = TuneOptions(**{k: v for k, v in vars(args).items()})
    try:
        return run(options)
    except UserError as exc:
        print(f"tune.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
