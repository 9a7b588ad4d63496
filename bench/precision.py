"""Does bf16 training keep val bits/dim? And would a bf16 likelihood evaluator?

    python bench/precision.py [--seeds 0 1 2] [--workers 2] [--accurate] [--eval fast accurate dopri5:1e-5]
                              [--eval-only]

1. Training. Two configs of the CPU space (search_spaces/cpu.yaml's `fixed`: ch 12, 160 steps, EMA 0.99):
   the main job's winner and a small-learning-rate one. Each trains with train.seed 0, 1, 2 in fp32 and in
   bf16 (same seed: same initial weights and batches), and the EMA weights are scored by the same evaluator
   the tuner builds (LikelihoodEvaluator.build(data.val, cfg.eval, centered): the same images, dequantization
   noise and probes), at fast fidelity (and accurate with --accurate). Printed per run: val bits/dim in
   both precisions, their paired difference and the training seconds; per config, the mean paired
   difference with its standard error, beside the seed-to-seed spread of fp32.
2. Evaluation. The fp32-trained winner (seed 0) is scored on the fast subset (16 images, same probes) by
   the fp32 evaluator and by the same evaluator with the network under bf16 autocast (forward and the
   vector-Jacobian product of the divergence), with each solver of --eval: the space's fast or accurate
   setting, or "METHOD:TOL" for an adaptive method in the logsnr frame. --eval-only trains just that model.

Each run uses 1 torch thread; --workers of them run at once (2 on this 2-core machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from trials.config import TrialConfig, read_yaml, set_dotted
from trials.data import load_data
from trials.likelihood import LikelihoodEvaluator
from trials.model import count_parameters, score_fn, unet_for
from trials.precision import autocast_forward
from trials.sde import make_sde
from trials.trainer import Trainer

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "cpu.yaml"
CONFIGS = {
    "winner": {
        "train.lr": 3.2e-3,
        "train.batch_size": 128,
        "model.num_res_blocks": 2,
        "model.ch_mult": [1, 2, 4],
        "sde.sampling_eps": 1.1e-5,
    },
    "small lr": {
        "train.lr": 3e-4,
        "train.batch_size": 64,
        "model.num_res_blocks": 1,
        "model.ch_mult": [1, 2, 2],
        "sde.sampling_eps": 1e-4,
    },
}


def config(name: str, seed: int, precision: str, steps: int | None = None) -> TrialConfig:
    tree = read_yaml(SPACE)[0]["fixed"]
    for path, value in {
        **CONFIGS[name],
        "train.seed": seed,
        "train.precision": precision,
        "train.num_threads": 1,
        "train.device": "cpu",
        **({"train.steps": steps} if steps else {}),
    }.items():
        set_dotted(tree, path, value)
    return TrialConfig.from_dict(tree)


# A bf16 network can make the ODE too rough for a tight tolerance; past this many evaluations (4x what fp32
# needs at 1e-5) the check records a failure instead of running for many minutes.
EVAL_CHECK_MAX_NFE = 2000


def evaluator_for(cfg: TrialConfig, data, max_nfe: int | None = None, **fast) -> LikelihoodEvaluator:
    """The tuner's evaluator (tuner/driver.py), with the fast fidelity's tolerances optionally changed."""
    ecfg = dataclasses.replace(cfg.eval, fast=dataclasses.replace(cfg.eval.fast, **fast)) if fast else cfg.eval
    if max_nfe is None:
        return LikelihoodEvaluator.build(data.val, ecfg, cfg.data.centered)
    return LikelihoodEvaluator.build(data.val, ecfg, cfg.data.centered, max_nfe=max_nfe)


def train_and_score(name: str, seed: int, precision: str, accurate: bool, steps: int | None) -> dict:
    torch.set_num_threads(1)
    cfg = config(name, seed, precision, steps)
    data = load_data(cfg.data)
    evaluator = evaluator_for(cfg, data)
    trainer = Trainer(cfg, data)
    start = time.perf_counter()
    records = list(trainer.run())
    seconds = time.perf_counter() - start
    assert not records[-1]["diverged"], records[-1]
    out = {
        "name": name,
        "seed": seed,
        "precision": trainer.precision,
        "train_seconds": seconds,
        "val_dsm": records[-1]["val_dsm"],
        "params": count_parameters(trainer.model),
        "state": {k: v.clone() for k, v in trainer.eval_model.state_dict().items()},
    }
    with trainer.evaluating() as score:
        for fidelity in ("fast", "accurate") if accurate else ("fast",):
            r = evaluator.evaluate(score, trainer.sde, cfg.sde.sampling_eps, fidelity)
            assert not r.failed, r.reason
            out[fidelity] = {"bpd": r.mean, "stderr": r.stderr, "nfe": r.nfe, "seconds": r.seconds}
    return out


def solver_settings(setting: str, cfg: TrialConfig) -> dict:
    """FidelityConfig fields of an --eval setting: 'fast', 'accurate' or 'METHOD:TOL' (adaptive)."""
    if setting in ("fast", "accurate"):
        fid = getattr(cfg.eval, setting)
        return {"frame": fid.frame, "method": fid.method, "steps": fid.steps, "rtol": fid.rtol, "atol": fid.atol}
    method, tol = setting.split(":")
    return {"method": method, "steps": 0, "rtol": float(tol), "atol": float(tol)}


def score_in(name: str, state: dict, setting: str, precision: str) -> dict:
    """Fast-subset bits/dim of trained weights with one solver setting, the network in fp32 or bf16 autocast."""
    torch.set_num_threads(1)
    cfg = config(name, 0, "fp32")
    data = load_data(cfg.data)
    model = unet_for(cfg)
    model.load_state_dict(state)
    model.eval()
    sde = make_sde(cfg.sde)
    score = score_fn(autocast_forward(model, "cpu", precision), sde)
    evaluator = evaluator_for(cfg, data, EVAL_CHECK_MAX_NFE, **solver_settings(setting, cfg))
    r = evaluator.evaluate(score, sde, cfg.sde.sampling_eps, "fast")
    return {
        "setting": f"{setting} ({evaluator.cfg.fast.describe()})",
        "precision": precision,
        "bpd": r.mean,
        "nfe": r.nfe,
        "seconds": r.seconds,
        "failed": r.failed,
        "reason": r.reason,
        "per_image": r.per_image,
    }


def mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--accurate", action="store_true", help="also score at accurate fidelity (32 images)")
    p.add_argument(
        "--eval",
        nargs="*",
        default=["fast", "accurate", "dopri5:1e-5"],
        help="evaluator settings for the bf16 evaluator check",
    )
    p.add_argument("--eval-only", action="store_true", help="only the evaluator check (trains one fp32 model)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the space's 160)")
    args = p.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"1 torch thread per run, {args.workers} at once; load average at start "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n",
        flush=True,
    )
    wall = time.perf_counter()
    # fp32 and bf16 of the same (config, seed) are submitted together, so they run side by side under the
    # same machine load.
    jobs = [(n, s, prec) for n in args.configs for s in args.seeds for prec in ("fp32", "bf16")]
    if args.eval_only:
        args.configs, args.seeds, jobs = args.configs[:1], args.seeds[:1], [(args.configs[0], args.seeds[0], "fp32")]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_score, *job, args.accurate, args.steps) for job in jobs]
        runs = {}
        for job, fut in zip(jobs, futures):
            runs[job] = fut.result()
            r = runs[job]
            print(
                f"  trained {job}: {r['train_seconds']:.0f} s, fast bpd {r['fast']['bpd']:.4f}",
                file=sys.stderr,
                flush=True,
            )

        fidelities = ("fast", "accurate") if args.accurate else ("fast",)
        base = config(args.configs[0], args.seeds[0], "fp32", args.steps)
        for fidelity in fidelities if not args.eval_only else ():
            fid = base.eval.fast if fidelity == "fast" else base.eval.accurate
            print(
                f"### val bits/dim at {fidelity} fidelity ({fid.n_images} images, {fid.describe()}), "
                f"after {base.train.steps} steps\n"
            )
            print("| config | seed | fp32 bpd | bf16 bpd | bf16 - fp32 | fp32 train s | bf16 train s |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for n in args.configs:
                for s in args.seeds:
                    a, b = runs[(n, s, "fp32")], runs[(n, s, "bf16")]
                    print(
                        f"| {n} | {s} | {a[fidelity]['bpd']:.4f} | {b[fidelity]['bpd']:.4f} | "
                        f"{b[fidelity]['bpd'] - a[fidelity]['bpd']:+.4f} | {a['train_seconds']:.0f} | {b['train_seconds']:.0f} |"
                    )
            print()
            print(
                "| config | mean paired diff (bf16 - fp32) ± stderr | fp32 seed-to-seed sd | mean train s fp32 / bf16 |"
            )
            print("|---|---:|---:|---:|")
            every = []
            for n in args.configs:
                diffs = [
                    runs[(n, s, "bf16")][fidelity]["bpd"] - runs[(n, s, "fp32")][fidelity]["bpd"] for s in args.seeds
                ]
                every += diffs
                m, se = mean_stderr(diffs)
                sd = (
                    statistics.stdev([runs[(n, s, "fp32")][fidelity]["bpd"] for s in args.seeds])
                    if len(args.seeds) > 1
                    else math.nan
                )
                t32 = statistics.fmean(runs[(n, s, "fp32")]["train_seconds"] for s in args.seeds)
                t16 = statistics.fmean(runs[(n, s, "bf16")]["train_seconds"] for s in args.seeds)
                print(f"| {n} | {m:+.4f} ± {se:.4f} | {sd:.4f} | {t32:.0f} / {t16:.0f} ({t32 / t16:.2f}x) |")
            m, se = mean_stderr(every)
            print(f"| all {len(every)} pairs | {m:+.4f} ± {se:.4f} | | |\n")

        if args.eval:
            name = args.configs[0]
            state = runs[(name, args.seeds[0], "fp32")]["state"]
            cfg = config(name, args.seeds[0], "fp32")
            jobs = [(setting, prec) for setting in args.eval for prec in ("fp32", "bf16")]
            futures = [pool.submit(score_in, name, state, setting, prec) for setting, prec in jobs]
            res = {job: fut.result() for job, fut in zip(jobs, futures)}
            print(
                f"### the likelihood evaluator in bf16: the fp32-trained {name} (seed {args.seeds[0]}), "
                f"{cfg.eval.fast.n_images} images, same noise and probes\n"
            )
            print(
                "| solver | fp32 bpd | bf16 bpd | bf16 - fp32 | max per-image abs diff | fp32 NFE | bf16 NFE | fp32 s | bf16 s |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for setting in args.eval:
                a, b = res[(setting, "fp32")], res[(setting, "bf16")]
                if a["failed"] or b["failed"]:
                    print(
                        f"| {a['setting']} | {a['bpd']:.4f} | {b['bpd']:.4f} | failed: {a['reason'] or b['reason']} | | {a['nfe']} | {b['nfe']} | | |"
                    )
                    continue
                worst = max(abs(x - y) for x, y in zip(a["per_image"], b["per_image"]))
                print(
                    f"| {a['setting']} | {a['bpd']:.4f} | {b['bpd']:.4f} | {b['bpd'] - a['bpd']:+.4f} | {worst:.4f} | "
                    f"{a['nfe']} | {b['nfe']} | {a['seconds']:.1f} | {b['seconds']:.1f} |"
                )
    print(
        f"\nwall time {time.perf_counter() - wall:.0f} s; load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
