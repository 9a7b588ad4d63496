"""`python -m tuner.report runs/<name> [--space FILE] [--no-samples]`: rebuild the report from the folder alone."""

from __future__ import annotations

import sys
from pathlib import Path

from trials.cli import OneLineArgumentParser, UserError
from tuner.report.build import build_report
from tuner.report.experiment import SPACE_COPY
from tuner.report.sampling import subprocess_sampler
from tuner.space import load_space


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m tuner.report", description="Rebuild the report of a finished or interrupted tuning experiment."
    )
    parser.add_argument("experiment", type=Path, help="the experiment folder, e.g. runs/cpu")
    parser.add_argument("--space", type=Path, help=f"the space file it ran with (default: the folder's {SPACE_COPY})")
    parser.add_argument(
        "--no-samples",
        action="store_true",
        help="do not draw the winner's samples (an unchanged earlier grid is still used)",
    )
    args = parser.parse_args(argv)
    try:
        space = load_space(args.space) if args.space is not None else None
        report = build_report(args.experiment, space, sampler=None if args.no_samples else subprocess_sampler)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {report.html}")
    return 0
