"""What a tuning command asks for, checked before Ray starts: the options of `tune.py`, the space file with
the command line's overrides laid over it, and the experiment folder (new, or one to resume). Every problem
is one line (UsageError, SpaceError) before anything starts or is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from trials.cli import UserError
from tuner.search_space import SearchSpace
from tuner.space import load_space


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
    """The space with what the command line sets (counts, seed, name, data) laid over the file's values."""
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


def resume_command(options: TuneOptions, space: SearchSpace) -> str:
    """The command that continues this experiment, as the messages about an unfinished one print it."""
    return f"python tune.py --space {options.space} --name {space.name} --storage {options.storage} --resume"
