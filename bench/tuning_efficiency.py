"""Tuning efficiency: does the search find better configs faster than random search + FIFO (the seed's setup)?

    python bench/tuning_efficiency.py --replay [--seeds 50] [--slots 2] [--budgets 5 10 20 40] [--table ...]
                                      [--truth ANOTHER_TABLE]
    python bench/tuning_efficiency.py --live [--budget 480] [--seeds 0] [--strategies default random-fifo]

--replay (minutes on 2 cores) replays each strategy against the recorded learning curves of
bench/record_curves.py in simulated time, `--slots` trials at a time (2 by default), over many seeds, driving
the libraries' own searcher and scheduler code (bench/replay.py). It prints, per strategy, the median best
fast val bits/dim at each budget (5, 10, 20 and 40 minutes at 2 slots) with its 95% interval and
interquartile range, the median time to a common target (random + FIFO's median best at the last budget)
and, as the last line, `speedup_vs_random_fifo: X`: random + FIFO's median time to target over the default
strategy's (the space's own search settings). `--truth` reads each run's best pick (its grid point, eps and
step) in a second table of the same grid scored another way, such as by a more accurate fast fidelity
(record_curves.py --also): how good the search's choice really is, not how good it looked.

At more slots the default budgets shrink in proportion (at 8 slots: 1.25, 2.5, 5 and 10 minutes), so every
slot count is compared at the same compute, in trial-minutes; `--budgets` sets wall-clock minutes instead.

--live runs `tune.py` on the real space once per (strategy, seed) with a wall-clock budget and reports the
same figures from the trials' real histories.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUDGETS_MIN = (5, 10, 20, 40)
BUDGET_SLOTS = 2  # the slots BUDGETS_MIN are for; other slot counts get the same trial-minutes by default


def replay_budgets(slots: int, budgets: list[float] | None = None) -> tuple[float, ...]:
    """The budgets in wall-clock minutes: as given, or BUDGETS_MIN's compute spread over `slots`."""
    if budgets:
        return tuple(sorted(budgets))
    return tuple(b * BUDGET_SLOTS / slots for b in BUDGETS_MIN)


def minutes(value: float) -> str:
    return f"{value:g} min"


LIVE = {"default": None, "random-fifo": ("random", "fifo")}  # None: the space's own search settings


def run_experiment(space: dict, label: str, seed: int, budget: float, workdir: Path) -> pd.DataFrame:
    raw = yaml.safe_load(yaml.safe_dump(space))
    raw["name"] = f"{label}-{seed}"
    if LIVE[label] is not None:
        raw["search"].update(algorithm=LIVE[label][0], scheduler=LIVE[label][1])
    raw["search"].update(seed=seed, num_samples=200, top_k=1)
    path = workdir / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [
        sys.executable,
        str(ROOT / "tune.py"),
        "--space",
        str(path),
        "--storage",
        str(workdir / "runs"),
        "--time-budget",
        str(budget),
    ]
    print(f"running {raw['name']} ({budget:.0f} s budget) ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{raw['name']} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return trial_histories(workdir / "runs" / raw["name"])


def trial_histories(experiment: Path) -> pd.DataFrame:
    """Every rung report of every trial, with seconds since the experiment's first trial started."""
    frames = []
    for progress in experiment.glob("*/progress.csv"):
        frame = pd.read_csv(progress)
        if "val_bpd" in frame:
            frames.append(frame[["timestamp", "time_total_s", "val_bpd", "trial_id"]])
    rows = pd.concat(frames, ignore_index=True)
    start = (rows["timestamp"] - rows["time_total_s"]).min()
    rows["elapsed"] = rows["timestamp"] - start
    return rows[rows["val_bpd"].map(math.isfinite)].sort_values("elapsed")


# ---- replay ----------------------------------------------------------------------------------------------
NAMES = {"tpe": "TPE", "gp": "GP", "random": "random", "asha": "ASHA", "fifo": "FIFO"}


def strategy_label(algorithm: str, scheduler: str, grace: int, rf: int, startup: int) -> str:
    label = f"{NAMES[algorithm]} + {NAMES[scheduler]}"
    if scheduler == "asha":
        label += f", grace {grace}, rf {rf}"
    if algorithm != "random":
        label += f", {startup} start-up"
    return label


def replay_strategies(space, table) -> tuple[dict, str]:
    """(label -> Strategy, the label of the space's own settings). The first label is the baseline."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from bench.replay import Strategy
    from tuner.searcher import METRIC, MODE, OptunaSearcher, make_sampler

    full = table.full_steps
    s = space.search

    def ours(algorithm: str, startup: int, drop: tuple[str, ...] = ()):
        dists = {k: v for k, v in space.to_optuna().items() if k not in drop}
        return lambda seed: OptunaSearcher(
            dists,
            make_sampler(algorithm, seed, startup),
            metric=METRIC,
            mode=MODE,
            full_steps=full,
            study_name=f"replay-{seed}",
        )

    def ray_tpe(seed):  # the searcher before issue 12: every trial told COMPLETE at whatever step it ended
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return OptunaSearch(
            space=space.to_optuna(),
            metric=METRIC,
            mode=MODE,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
        )

    def scheduler(name: str, grace: int = 40, rf: int = 2):
        if name == "fifo":
            return FIFOScheduler
        return lambda: ASHAScheduler(
            time_attr="step", metric=METRIC, mode=MODE, max_t=full, grace_period=grace, reduction_factor=rf
        )

    def row(algorithm, sched, grace=40, rf=2, startup=4):
        label = strategy_label(algorithm, sched, grace, rf, startup)
        return label, Strategy(ours(algorithm, startup), scheduler(sched, grace, rf))

    def variant(suffix: str, searcher, **strategy):  # TPE + ASHA, grace 40, rf 2, 4 start-up, changed as named
        label = f"{strategy_label('tpe', 'asha', 40, 2, 4)}, {suffix}"
        return label, Strategy(searcher, scheduler("asha"), **strategy)

    rows = dict(
        [
            row("random", "fifo"),
            row("random", "asha"),
            variant("Ray's OptunaSearch (before)", ray_tpe),
            row("tpe", "asha"),
            row("tpe", "fifo"),
            row("gp", "asha"),
            row("gp", "fifo"),
            variant("eps at scoring", ours("tpe", 4, ("sampling_eps",)), eps_at_scoring=True),
            row("tpe", "asha", rf=3),
            row("tpe", "asha", rf=4),
            row("tpe", "asha", grace=80),
            row("tpe", "asha", startup=8),
            # Candidates for vpsde.yaml (8 slots): its own rf 3 with Optuna's 10 start-up trials, and around them.
            row("tpe", "asha", rf=3, startup=10),
            row("tpe", "asha", rf=3, startup=8),
            row("tpe", "asha", rf=4, startup=8),
            row("tpe", "asha", rf=4, startup=16),
        ]
    )
    default, strategy = row(s.algorithm, s.scheduler, s.grace_period, s.reduction_factor, s.startup_trials)
    rows.setdefault(default, strategy)
    return rows, default


def _init_replay_worker() -> None:
    # Optuna's GP sampler fits with torch; one thread per worker keeps two workers off each other's core.
    import torch

    torch.set_num_threads(1)


_WORKER_CACHE: dict[tuple[str, str], tuple] = {}


def _replay_job(job):
    label, seed, args = job
    from bench.replay import CurveTable, simulate
    from tuner.space import load_space

    key = (args["space"], args["table"])
    if key not in _WORKER_CACHE:  # read once per worker, not once per run: a run at 8 slots takes about 1 s
        space = load_space(args["space"])
        table = CurveTable.read(args["table"])
        _WORKER_CACHE[key] = table, replay_strategies(space, table)[0]
    table, strategies = _WORKER_CACHE[key]
    return label, seed, simulate(strategies[label], table, seed, args["horizon_min"] * 60.0, slots=args["slots"])


def replay(args) -> None:
    import multiprocessing as mp
    import time

    from bench.replay import CurveTable, compare_medians, median_ci, quartiles, speedup_interval
    from tuner.space import load_space

    space = load_space(args.space)
    table = CurveTable.read(args.table)
    truth = CurveTable.read(args.truth) if args.truth else None
    if truth and (set(table.curves) - set(truth.curves) or set(table.eps) - set(truth.eps)):
        raise SystemExit(f"tuning_efficiency.py: --truth {args.truth}: does not hold every grid point of {args.table}")
    strategies, default = replay_strategies(space, table)
    baseline = next(iter(strategies))
    labels = list(strategies)
    if args.strategies:  # the baseline and the default always run: the last line compares them
        labels = [label for label in labels if any(w in label for w in args.strategies) or label in (baseline, default)]
    budgets = replay_budgets(args.slots, args.budgets)
    horizon_min = budgets[-1]
    jobs = [
        (
            label,
            seed,
            {"space": str(args.space), "table": str(args.table), "slots": args.slots, "horizon_min": horizon_min},
        )
        for label in labels
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]
    print(
        f"replaying {len(labels)} strategies x {args.seeds} seeds on {args.table} "
        f"({len(table.curves)} recorded configs, {args.slots} trials at a time) ...",
        file=sys.stderr,
        flush=True,
    )
    runs: dict[str, list] = {label: [] for label in labels}
    start = time.time()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_replay_worker) as pool:
        for i, (label, _seed, run) in enumerate(pool.imap_unordered(_replay_job, jobs), 1):
            runs[label].append(run)
            if i % 25 == 0 or i == len(jobs):
                print(f"  {i}/{len(jobs)} runs, {time.time() - start:.0f} s", file=sys.stderr, flush=True)

    horizon = horizon_min * 60
    target = float(np.median([r.best_by(horizon) for r in runs[baseline]]))
    best_grid = table.frame.loc[table.frame.val_bpd.map(math.isfinite), "val_bpd"].min()
    seeds = f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
    print(
        f"\nReplay of {args.table} ({len(table.curves)} configs, best recorded {best_grid:.3f} bits/dim), "
        f"{args.seeds} seeds ({seeds}), {args.slots} trials at a time, budgets in wall-clock minutes "
        f"({horizon_min * args.slots:g} trial-minutes at the last). Best fast val bits/dim by budget: median "
        f"[95% interval of the median] (IQR). Target = random + FIFO's median best at {minutes(horizon_min)} "
        f"= {target:.3f}.\n"
    )
    print(
        "| strategy | " + " | ".join(minutes(b) for b in budgets) + " | time to target, min: median (IQR) | reached | "
        f"trials in {minutes(horizon_min)} |"
    )
    print("|---|" + "---:|" * (len(budgets) + 3))
    ttt, times_min, medians = {}, {}, {}  # per label: median time to target, the times, (median, lo, hi) per budget
    for label in labels:
        cells = []
        for b in budgets:
            best = [r.best_by(b * 60) for r in runs[label]]
            medians[label, b] = med, lo, hi = median_ci(best)
            q1, q3 = quartiles(best)
            cells.append(f"{med:.3f} [{lo:.3f}, {hi:.3f}] ({q1:.3f}-{q3:.3f})")
        times_min[label] = times = [r.time_to(target) / 60 for r in runs[label]]
        ttt[label] = float(np.median(times))
        q1, q3 = quartiles(times)
        reached = sum(math.isfinite(t) for t in times)
        trials = np.median([r.trials for r in runs[label]])
        name = f"**{label}** (default)" if label == default else label
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {ttt[label]:.1f} ({q1:.1f}-{q3:.1f}) | {reached}/{len(times)} | {trials:.0f} |"
        )
    print()
    for b in budgets:  # the test: medians better with the 95% intervals of the medians apart
        ours, theirs = medians[default, b], medians[baseline, b]
        print(
            f"{minutes(b)}: default {ours[0]:.3f} [{ours[1]:.3f}, {ours[2]:.3f}] against random + FIFO "
            f"{theirs[0]:.3f} [{theirs[1]:.3f}, {theirs[2]:.3f}]: {compare_medians(ours, theirs)}"
        )
    lo, hi = speedup_interval(times_min[baseline], times_min[default])
    print(f"speedup 95% interval (bootstrap over seeds): [{lo:.2f}, {hi:.2f}]")
    if truth:
        print_truth_of_picks(table, truth, args.truth, runs, budgets, default)
    print(f"speedup_vs_random_fifo: {ttt[baseline] / ttt[default]:.2f}")


def print_truth_of_picks(table, truth, path: Path, runs: dict, budgets, default: str) -> None:
    """How `truth` reads the table's points, then per strategy and budget the median [95% interval] of the
    best pick's val bits/dim read in `truth`."""
    from bench.replay import median_ci, table_agreement

    print(f"\nThe same points read in {path} (its value minus this table's; tau: the two orderings of the points)\n")
    print("| step | points | median gap | lowest | highest | Kendall tau | tau, best quarter |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in table_agreement(table, truth).itertuples():
        print(
            f"| {r.step} | {r.points} | {r.gap_median:+.3f} | {r.gap_min:+.3f} | {r.gap_max:+.3f} | "
            f"{r.kendall_tau:.3f} | {r.kendall_tau_best_quarter:.3f} |"
        )
    print(f"\nThe best pick read in {path} (the same grid point, eps and step, scored there): median [95% interval]\n")
    print("| strategy | " + " | ".join(minutes(b) for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for label, label_runs in runs.items():
        cells = []
        for b in budgets:
            picks = [r.best_pick_by(b * 60) for r in label_runs]
            med, lo, hi = median_ci([truth.value(*p) if p else math.inf for p in picks])
            cells.append(f"{med:.3f} [{lo:.3f}, {hi:.3f}]")
        name = f"**{label}** (default)" if label == default else label
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def live(args) -> None:
    space = yaml.safe_load(args.space.read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.strategies or list(LIVE):
            for seed in args.live_seeds:
                history = run_experiment(space, label, seed, args.budget, Path(tmp))
                results.append((label, seed, history))
    print(f"\nspace {args.space.name}, live, budget {args.budget:.0f} s per run\n")
    print(
        "| strategy | seed | trials started | rung reports | "
        + " | ".join(f"best by {b} min" for b in BUDGETS_MIN if b * 60 <= args.budget)
        + " | best |"
    )
    print("|---|---:|---:|---:|" + "---:|" * (sum(b * 60 <= args.budget for b in BUDGETS_MIN) + 1))
    for label, seed, h in results:
        cells = [f"{h[h.elapsed <= b * 60].val_bpd.min():.3f}" for b in BUDGETS_MIN if b * 60 <= args.budget]
        print(
            f"| {label} | {seed} | {h['trial_id'].nunique()} | {len(h)} | "
            + " | ".join(cells)
            + f" | {h.val_bpd.min():.3f} |"
        )


def main() -> None:
    from trials.cli import OneLineArgumentParser, positive_float, positive_int

    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--replay", action="store_true", help="replay strategies against the recorded curves")
    mode.add_argument("--live", action="store_true", help="run tune.py for real under a time budget")
    p.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu.yaml")
    p.add_argument("--table", type=Path, default=ROOT / "bench" / "data" / "cpu_curves.csv")
    p.add_argument("--truth", type=Path, default=None, help="replay: read each best pick in this table too")
    p.add_argument("--seeds", type=positive_int, default=50, help="replay: seeds per strategy")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="replay: seeds first-seed .. first-seed + seeds - 1 (a fresh range checks a pick made on another)",
    )
    p.add_argument("--slots", type=positive_int, default=2, help="replay: trials at a time")
    p.add_argument(
        "--budgets",
        type=positive_float,
        nargs="+",
        default=None,
        metavar="MINUTES",
        help="replay: budgets in wall-clock minutes (default: 5 10 20 40 at 2 slots, the same "
        "trial-minutes at other slot counts)",
    )
    p.add_argument("--workers", type=int, default=2, help="replay: processes")
    p.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="replay: run only the strategies whose label contains one of these words (random + FIFO and the default always run); live: default, random-fifo",
    )
    p.add_argument("--budget", type=float, default=480.0, help="live: seconds per experiment")
    p.add_argument("--live-seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    if args.first_seed < 0:  # numpy seeds are unsigned; caught here rather than in a pool worker
        p.error(f"--first-seed must be 0 or more, got {args.first_seed}")
    replay(args) if args.replay else live(args)


if __name__ == "__main__":
    main()
