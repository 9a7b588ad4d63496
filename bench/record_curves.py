"""Record real learning curves over a grid of a search space, once, for the tuning replay.

    python bench/record_curves.py [--space search_spaces/cpu.yaml] [--out bench/data/cpu_curves.csv]
                                  [--workers 2] [--lrs 1e-5 ...] [--eps 1e-5 1e-4 1e-3]

Every grid point (lr x batch_size x num_res_blocks x ch_mult from the space's choices, with the `--lrs`
grid for the log-uniform learning rate) trains for the space's full `train.steps`, exactly as a tuning
trial does (the space's fixed config, the trial code, one torch thread per worker). At every rung
(`train.val_every` steps) the EMA model is scored by the same shared evaluator a tuning run builds, once
for each sampling eps in `--eps`: sampling_eps changes only the evaluation, so one training run serves
every eps. Training seconds and evaluation seconds are kept apart (so the table can be re-timed), with
the NFE of every evaluation.

One CSV row per (config, rung, eps). A config's rows are appended when it finishes, so an interrupted
recording resumes where it stopped: run the same command again.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ["lr", "batch_size", "num_res_blocks", "ch_mult", "step", "sampling_eps", "val_bpd", "val_bpd_stderr",
           "nfe", "eval_seconds", "train_seconds", "setup_seconds", "train_loss", "val_dsm", "diverged", "precision"]
DEFAULT_LRS = [1e-5, 5.6e-5, 3.2e-4, 1e-3, 3.2e-3, 1e-2]
DEFAULT_EPS = [1e-5, 1e-4, 1e-3]

_worker: dict = {}


def grid(space, lrs: list[float]) -> list[dict]:
    by_name = {hp.name: hp for hp in space.hyperparameters}
    labels = [by_name[n].labels() for n in ("batch_size", "num_res_blocks", "ch_mult")]
    return [{"lr": lr, "batch_size": b, "num_res_blocks": r, "ch_mult": m}
            for lr, b, r, m in itertools.product(lrs, *labels)]


def key(point: dict) -> tuple:
    return (f"{float(point['lr']):.6g}", str(point["batch_size"]), str(point["num_res_blocks"]), str(point["ch_mult"]))


def _init_worker(space_path: str) -> None:
    import torch

    from trials.data import load_data
    from trials.likelihood import LikelihoodEvaluator
    from tuner.space import load_space

    torch.set_num_threads(1)
    space = load_space(space_path)
    base = space.base_config
    data = load_data(base.data)
    _worker.update(space=space, data=data,
                   evaluator=LikelihoodEvaluator.build(data.val, base.eval, base.data.centered))


def record_one(args: tuple[dict, list[float]]) -> list[dict]:
    """Train one grid point through every rung; score each rung at every eps."""
    point, eps_grid = args
    from trials.train import Trainer

    space, data, evaluator = _worker["space"], _worker["data"], _worker["evaluator"]
    params = {n: point[n] for n in ("lr", "batch_size", "num_res_blocks", "ch_mult")}
    params["sampling_eps"] = eps_grid[0]
    cfg = space.trial_config(params)
    start = time.perf_counter()
    trainer = Trainer(cfg, data)
    setup = time.perf_counter() - start
    rows, segment_start = [], time.perf_counter()
    for record in trainer.run():
        if not record["diverged"] and "val_dsm" not in record:
            continue
        train_seconds = time.perf_counter() - segment_start
        common = {**point, "step": record["step"], "train_seconds": train_seconds, "setup_seconds": setup,
                  "train_loss": record.get("train_loss", math.nan), "val_dsm": record.get("val_dsm", math.nan),
                  "precision": record.get("precision", getattr(cfg.train, "precision", "fp32"))}
        if record["diverged"]:
            rows += [{**common, "sampling_eps": eps, "val_bpd": math.inf, "val_bpd_stderr": math.nan, "nfe": 0,
                      "eval_seconds": 0.0, "diverged": True} for eps in eps_grid]
            break
        with trainer.evaluating() as score:
            for eps in eps_grid:
                r = evaluator.evaluate(score, trainer.sde, eps, "fast", device=trainer.device)
                rows.append({**common, "sampling_eps": eps, "val_bpd": r.mean, "val_bpd_stderr": r.stderr,
                             "nfe": r.nfe, "eval_seconds": r.seconds, "diverged": False})
        segment_start = time.perf_counter()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "data" / "cpu_curves.csv"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS)
    parser.add_argument("--eps", type=float, nargs="+", default=DEFAULT_EPS)
    parser.add_argument("--limit", type=int, default=None, help="record at most this many new grid points")
    args = parser.parse_args(argv)

    from tuner.space import load_space

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = grid(load_space(args.space), args.lrs)
    done = set()
    if out.exists():
        with out.open() as f:
            done = {key(r) for r in csv.DictReader(f)}
    todo = [p for p in points if key(p) not in done][: args.limit]
    print(f"{len(points)} grid points, {len(points) - len(todo) if args.limit is None else len(done)} recorded, "
          f"{len(todo)} to go ({args.workers} workers, 1 torch thread each); writing {out}", flush=True)
    if not todo:
        return 0
    new_file = not out.exists()
    start = time.time()
    ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread pools inherited from the parent
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.space,)) as pool, out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for i, rows in enumerate(pool.imap_unordered(record_one, [(p, args.eps) for p in todo]), 1):
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
            elapsed = time.time() - start
            last = rows[-1]
            print(f"[{i}/{len(todo)}] lr={last['lr']:.3g} batch={last['batch_size']} blocks={last['num_res_blocks']} "
                  f"ch_mult={last['ch_mult']}: step {last['step']} val_bpd {last['val_bpd']:.3f} "
                  f"(eps {last['sampling_eps']:g}); ETA {elapsed / i * (len(todo) - i) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
