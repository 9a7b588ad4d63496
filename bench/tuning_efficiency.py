"""Tuning efficiency under one CPU time budget: TPE + ASHA against random search + FIFO (the seed's setup).

    python bench/tuning_efficiency.py [--budget 180] [--seeds 0 1] [--space search_spaces/cpu.yaml]

Runs `tune.py` once per (strategy, seed) on mnist-5k with the same wall-clock budget and a trial count
large enough that the budget, not the count, ends the search. From each experiment's trial histories it
reads the best fast val bits/dim reached and the time (from the first trial's start) at which each run
first reached a common target: the worst of all runs' best values, so every run reaches it. Prints a
markdown table. Each run starts its own local Ray.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"TPE + ASHA": ("tpe", "asha"), "random + FIFO": ("random", "fifo")}


def run_experiment(space: dict, algorithm: str, scheduler: str, seed: int, budget: float, workdir: Path) -> pd.DataFrame:
    raw = yaml.safe_load(yaml.safe_dump(space))
    raw["name"] = f"{algorithm}-{scheduler}-{seed}"
    raw["search"].update(algorithm=algorithm, scheduler=scheduler, seed=seed, num_samples=200, top_k=1)
    path = workdir / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(ROOT / "tune.py"), "--space", str(path), "--storage", str(workdir / "runs"),
           "--time-budget", str(budget)]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=180.0, help="seconds per experiment")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu.yaml")
    args = p.parse_args()
    space = yaml.safe_load(args.space.read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (algorithm, scheduler) in STRATEGIES.items():
            for seed in args.seeds:
                history = run_experiment(space, algorithm, scheduler, seed, args.budget, Path(tmp))
                results.append((label, seed, history))
    target = max(h["val_bpd"].min() for _, _, h in results)
    print(f"\nspace {args.space.name}, budget {args.budget:.0f} s per run, target = worst run's best = {target:.3f} bits/dim\n")
    print("| strategy | seed | trials started | rung reports | best val bpd (fast) | time to target (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for label, seed, h in results:
        reached = h[h["val_bpd"] <= target + 1e-12]["elapsed"].min()
        print(f"| {label} | {seed} | {h['trial_id'].nunique()} | {len(h)} | {h['val_bpd'].min():.3f} | {reached:.0f} |")
        summary.setdefault(label, []).append((h["val_bpd"].min(), reached))
    print()
    for label, values in summary.items():
        best = sum(v[0] for v in values) / len(values)
        when = sum(v[1] for v in values) / len(values)
        print(f"{label}: mean best {best:.3f} bits/dim, mean time to target {when:.0f} s")


if __name__ == "__main__":
    main()
