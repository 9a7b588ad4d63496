"""Record real learning curves over a grid of a search space, once, for the tuning replay.

    python bench/record_curves.py [--space search_spaces/cpu.yaml] [--out bench/data/cpu_curves.csv]
                                  [--weights runs/curve_weights] [--phase train|score|both]
                                  [--workers 2] [--lrs 1e-5 ...] [--eps 1e-5 1e-4 1e-3]

Every grid point (lr x batch_size x num_res_blocks x ch_mult from the space's choices, with the `--lrs`
grid for the log-uniform learning rate) trains for the space's full `train.steps`, exactly as a tuning
trial does (the space's fixed config, the trial code, one torch thread per worker). At every rung
(`train.val_every` steps) the EMA model is scored by the same shared evaluator a tuning run builds, once
for each sampling eps in `--eps`: sampling_eps changes only the evaluation, so one training run serves
every eps. Training seconds and evaluation seconds are kept apart (so the table can be re-timed), with
the NFE of every evaluation.

Two phases, each resumable (run the same command again after an interruption):
  train   trains every grid point and keeps its EMA weights at every rung under --weights (with the
          training seconds, losses and precision), a config at a time;
  score   scores every kept rung with the space's evaluator at each eps and appends one CSV row per
          (config, rung, eps) to --out, a config at a time.
Keeping the weights lets the table be re-scored when the evaluator changes, without training again.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = [
    "lr",
    "batch_size",
    "num_res_blocks",
    "ch_mult",
    "step",
    "sampling_eps",
    "val_bpd",
    "val_bpd_stderr",
    "nfe",
    "eval_seconds",
    "train_seconds",
    "setup_seconds",
    "train_loss",
    "val_dsm",
    "diverged",
    "precision",
]
DEFAULT_LRS = [1e-5, 5.6e-5, 3.2e-4, 1e-3, 3.2e-3, 1e-2]
DEFAULT_EPS = [1e-5, 1e-4, 1e-3]

_worker: dict = {}


def grid(space, lrs: list[float]) -> list[dict]:
    by_name = {hp.name: hp for hp in space.hyperparameters}
    labels = [by_name[n].labels() for n in ("batch_size", "num_res_blocks", "ch_mult")]
    points = [
        {"lr": lr, "batch_size": b, "num_res_blocks": r, "ch_mult": m}
        for lr, b, r, m in itertools.product(lrs, *labels)
    ]
    # A fixed shuffle: a recording that stops part-way leaves a balanced sample of the grid, not its corner.
    random.Random(0).shuffle(points)
    return points


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
    _worker.update(space=space, data=data, evaluator=LikelihoodEvaluator.build(data.val, base.eval, base.data.centered))


def _folder(weights: Path, point: dict) -> Path:
    lr, b, r, m = key(point)
    return weights / f"lr{lr}_b{b}_r{r}_m{m.replace(',', '-')}"


def train_one(args: tuple[dict, str]) -> dict:
    """Train one grid point through every rung, keeping the EMA weights at each."""
    import json

    import torch

    from trials.trainer import Trainer

    point, weights = args
    space, data = _worker["space"], _worker["data"]
    cfg = space.trial_config({n: point[n] for n in ("lr", "batch_size", "num_res_blocks", "ch_mult")})
    folder = _folder(Path(weights), point)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = Trainer(cfg, data)
    setup = time.perf_counter() - start
    rungs, segment_start = [], time.perf_counter()
    for record in trainer.run():
        if not record["diverged"] and "val_dsm" not in record:
            continue
        rung = {
            "step": record["step"],
            "train_seconds": time.perf_counter() - segment_start,
            "train_loss": record.get("train_loss", math.nan),
            "val_dsm": record.get("val_dsm", math.nan),
            "precision": record.get("precision", trainer.precision),
            "diverged": bool(record["diverged"]),
        }
        rungs.append(rung)
        if record["diverged"]:
            break
        torch.save(
            {"config": cfg.to_dict(), "model": trainer.eval_model.state_dict(), "ema": None},
            folder / f"step{record['step']}.pt",
        )
        segment_start = time.perf_counter()
    summary = {**point, "setup_seconds": setup, "rungs": rungs}
    (folder / "rungs.json").write_text(json.dumps(summary))  # written last: the config's "done" mark
    return summary


def score_one(args: tuple[dict, str, list[float]]) -> list[dict]:
    """Score every kept rung of one grid point at every eps with the space's evaluator."""
    import json

    import torch

    from trials.model import score_fn
    from trials.sde import make_sde
    from trials.trainer import eval_model_from_checkpoint

    point, weights, eps_grid = args
    evaluator = _worker["evaluator"]
    folder = _folder(Path(weights), point)
    summary = json.loads((folder / "rungs.json").read_text())
    rows = []
    for rung in summary["rungs"]:
        common = {
            **point,
            **{k: rung[k] for k in ("step", "train_seconds", "train_loss", "val_dsm", "precision")},
            "setup_seconds": summary["setup_seconds"],
        }
        if rung["diverged"]:
            rows += [
                {
                    **common,
                    "sampling_eps": eps,
                    "val_bpd": math.inf,
                    "val_bpd_stderr": math.nan,
                    "nfe": 0,
                    "eval_seconds": 0.0,
                    "diverged": True,
                }
                for eps in eps_grid
            ]
            continue
        cfg, model = eval_model_from_checkpoint(torch.load(folder / f"step{rung['step']}.pt", weights_only=True))
        sde = make_sde(cfg.sde)
        for eps in eps_grid:
            r = evaluator.evaluate(score_fn(model, sde), sde, eps, "fast")
            rows.append(
                {
                    **common,
                    "sampling_eps": eps,
                    "val_bpd": r.mean,
                    "val_bpd_stderr": r.stderr,
                    "nfe": r.nfe,
                    "eval_seconds": r.seconds,
                    "diverged": False,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "data" / "cpu_curves.csv"))
    parser.add_argument("--weights", default=str(ROOT / "runs" / "curve_weights"))
    parser.add_argument("--phase", choices=("train", "score", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS)
    parser.add_argument("--eps", type=float, nargs="+", default=DEFAULT_EPS)
    parser.add_argument("--limit", type=int, default=None, help="do at most this many grid points in each phase")
    args = parser.parse_args(argv)

    from tuner.space import load_space

    points = grid(load_space(args.space), args.lrs)
    weights = Path(args.weights)
    out = Path(args.out)
    scored = set()
    if out.exists():
        with out.open() as f:
            scored = {key(r) for r in csv.DictReader(f)}
    if args.phase in ("train", "both"):
        # Weights stay on the machine that trained them; a config already in the table needs none.
        trained = [p for p in points if (_folder(weights, p) / "rungs.json").exists() or key(p) in scored]
        todo = [p for p in points if p not in trained][: args.limit]
        _run_pool(
            f"train: {len(points)} grid points, {len(trained)} trained",
            args,
            train_one,
            [(p, str(weights)) for p in todo],
            lambda s: f"step {s['rungs'][-1]['step']}, {sum(r['train_seconds'] for r in s['rungs']):.0f} s of training",
        )
    if args.phase in ("score", "both"):
        out.parent.mkdir(parents=True, exist_ok=True)
        done = scored
        todo = [p for p in points if key(p) not in done and (_folder(weights, p) / "rungs.json").exists()][: args.limit]
        new_file = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new_file:
                writer.writeheader()

            def append(rows):
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
                return f"{len(rows)} rows, last val_bpd {rows[-1]['val_bpd']:.3f}"

            _run_pool(
                f"score: {len(points)} grid points, {len(done)} in {out}",
                args,
                score_one,
                [(p, str(weights), args.eps) for p in todo],
                append,
            )
    return 0


def _run_pool(title: str, args, fn, jobs: list, describe) -> None:
    print(f"{title}, {len(jobs)} to go ({args.workers} workers, 1 torch thread each)", flush=True)
    if not jobs:
        return
    start = time.time()
    ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread pools inherited from the parent
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.space,)) as pool:
        for i, result in enumerate(pool.imap_unordered(fn, jobs), 1):
            elapsed = time.time() - start
            print(f"[{i}/{len(jobs)}] {describe(result)}; ETA {elapsed / i * (len(jobs) - i) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    sys.exit(main())
