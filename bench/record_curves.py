"""Record real learning curves over a grid of a search space, once, for the tuning replay.

    python bench/record_curves.py [--space search_spaces/cpu.yaml] [--out bench/data/cpu_curves.csv]
                                  [--also OTHER_SPACE.yaml=OTHER_TABLE.csv ...]
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
`both` (the default) does the two for each config in turn in one worker, so that a stop leaves whole
configs in the table and no worker waits at the end of a phase. Keeping the weights lets the table be
re-scored when the evaluator changes, without training again; `--also SPACE=CSV` scores the same weights
with another space's evaluator into a second table as well (a paired comparison of two fidelities: the
spaces must differ in `eval` only).
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


def _init_worker(space_paths: list[str]) -> None:
    import torch

    from trials.data import load_data
    from trials.likelihood import LikelihoodEvaluator
    from tuner.space import load_space

    torch.set_num_threads(1)
    spaces = [load_space(p) for p in space_paths]
    base = spaces[0].base_config
    data = load_data(base.data)
    evaluators = [LikelihoodEvaluator.build(data.val, s.base_config.eval, base.data.centered) for s in spaces]
    _worker.update(space=spaces[0], data=data, evaluators=evaluators)


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


def score_one(args: tuple[dict, str, list[float], int]) -> list[dict]:
    """Score every kept rung of one grid point at every eps with the evaluator of space number `which`."""
    import json

    import torch

    from trials.model import score_fn
    from trials.sde import make_sde
    from trials.trainer import eval_model_from_checkpoint

    point, weights, eps_grid, which = args
    evaluator = _worker["evaluators"][which]
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


def record_one(args: tuple[dict, str, list[float], list[int]]) -> tuple[dict, dict[int, list[dict]]]:
    """Train one grid point unless its weights are kept, then score it into each table numbered in `tables`."""
    point, weights, eps_grid, tables = args
    if not _is_trained(Path(weights), point):
        train_one((point, weights))
    return point, {i: score_one((point, weights, eps_grid, i)) for i in tables}


def _table(spec: str) -> tuple[str, Path]:
    space, sep, out = spec.partition("=")
    if not sep or not space or not out:
        raise SystemExit(f"record_curves.py: --also {spec!r}: expected SPACE.yaml=TABLE.csv")
    return space, Path(out)


def _check_same_training(spaces: list[str]) -> None:
    """Every table scores the first space's weights, so the spaces may differ in how they score only."""
    from tuner.space import load_space

    def without_eval(path):
        raw = load_space(path).base_config.to_dict()
        raw.pop("eval")
        return raw

    first = without_eval(spaces[0])
    for other in spaces[1:]:
        if without_eval(other) != first:
            raise SystemExit(f"record_curves.py: --also {other}: differs from {spaces[0]} outside `eval`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "data" / "cpu_curves.csv"))
    parser.add_argument("--also", action="append", default=[], metavar="SPACE=CSV", help="score into a second table")
    parser.add_argument("--weights", default=str(ROOT / "runs" / "curve_weights"))
    parser.add_argument("--phase", choices=("train", "score", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS)
    parser.add_argument("--eps", type=float, nargs="+", default=DEFAULT_EPS)
    parser.add_argument("--limit", type=int, default=None, help="do at most this many grid points")
    args = parser.parse_args(argv)

    from tuner.space import load_space

    tables = [(args.space, Path(args.out)), *map(_table, args.also)]
    spaces = [space for space, _ in tables]
    _check_same_training(spaces)
    points = grid(load_space(args.space), args.lrs)
    weights = Path(args.weights)
    scored = [_keys_in(out) for _, out in tables]  # per table: the grid points already in it

    def missing(p):
        return [i for i, done in enumerate(scored) if key(p) not in done]

    if args.phase == "train":
        # Weights stay on the machine that trained them; a config already in every table needs none.
        untrained = [p for p in points if not _is_trained(weights, p) and missing(p)]
        _run_pool(
            f"train: {len(points)} grid points, {len(points) - len(untrained)} trained or scored",
            args.workers,
            spaces,
            train_one,
            [(p, str(weights)) for p in untrained[: args.limit]],
            lambda s: f"step {s['rungs'][-1]['step']}, {sum(r['train_seconds'] for r in s['rungs']):.0f} s of training",
        )
        return 0
    todo = [p for p in points if missing(p) and (args.phase == "both" or _is_trained(weights, p))][: args.limit]
    files = []
    for _, out in tables:
        out.parent.mkdir(parents=True, exist_ok=True)
        new_file = not out.exists()
        files.append(out.open("a", newline=""))
        if new_file:
            csv.DictWriter(files[-1], fieldnames=COLUMNS).writeheader()
    writers = [csv.DictWriter(f, fieldnames=COLUMNS) for f in files]

    def append(result):
        _point, rows_by_table = result
        for i, rows in rows_by_table.items():
            writers[i].writerows(rows)
            files[i].flush()
            os.fsync(files[i].fileno())
        return ", ".join(
            f"{Path(tables[i][1]).name}: last val_bpd {rows[-1]['val_bpd']:.3f}" for i, rows in rows_by_table.items()
        )

    try:
        _run_pool(
            f"{args.phase}: {len(points)} grid points, {min(map(len, scored))} in every table",
            args.workers,
            spaces,
            record_one,
            [(p, str(weights), args.eps, missing(p)) for p in todo],
            append,
        )
    finally:
        for f in files:
            f.close()
    return 0


def _is_trained(weights: Path, point: dict) -> bool:
    return (_folder(weights, point) / "rungs.json").exists()  # written last by train_one: the config's "done" mark


def _keys_in(table: Path) -> set[tuple]:
    if not table.exists():
        return set()
    with table.open() as f:
        return {key(r) for r in csv.DictReader(f)}


def _run_pool(title: str, workers: int, spaces: list[str], fn, jobs: list, describe) -> None:
    print(f"{title}, {len(jobs)} to go ({workers} workers, 1 torch thread each)", flush=True)
    if not jobs:
        return
    start = time.time()
    ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread pools inherited from the parent
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spaces,)) as pool:
        for i, result in enumerate(pool.imap_unordered(fn, jobs), 1):
            elapsed = time.time() - start
            print(f"[{i}/{len(jobs)}] {describe(result)}; ETA {elapsed / i * (len(jobs) - i) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    sys.exit(main())
