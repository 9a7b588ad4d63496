"""Training throughput on this machine, fp32 against bf16: images per second and their ratio.

    python bench/train_throughput.py [--steps 8] [--threads 1 2] [--rounds 3] [--models small cpu seed]

For a small CPU model, the cpu.yaml winner's size and the seed-size model, at each torch thread count, it
times whole training steps through `Trainer.run` (forward, backward, clipping, Adam, EMA) after a warm-up,
with train.precision fp32 and bf16. The two are measured alternately, `--rounds` times (fp32 first in even
rounds, bf16 first in odd ones), so a drift in the machine's load hits both alike; the table gives each
one's median images/s and the median of the per-round ratios. It also times, separately, the batch
preparation the loop does each step (index the uint8 tensor, dequantize, draw t and noise), as a share of
the fp32 step. The load average before and after is printed: other processes on the machine slow both
precisions, and the ratio is what to read when they do. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from trials.config import TrialConfig
from trials.data import load_data
from trials.model import count_parameters
from trials.precision import resolve_precision
from trials.trainer import Trainer

MODELS = {
    "small": (
        "small CPU (ch 16, [1,2,2], 1 block)",
        {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        64,
    ),
    "cpu": (
        "cpu.yaml winner (ch 12, [1,2,4], 2 blocks)",
        {"ch": 12, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        128,
    ),
    "seed": (
        "seed (ch 32, [1,2,2], 2 blocks, attn 7)",
        {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [7], "dropout": 0.1},
        128,
    ),
}


def measure(model: dict, batch: int, steps: int, threads: int, precision: str, data) -> dict:
    # val_images 1: Trainer.run validates at the step it stops at, and that forward pass is not training.
    cfg = TrialConfig.from_dict(
        {
            "model": model,
            "train": {
                "batch_size": batch,
                "steps": steps + 2,
                "num_threads": threads,
                "val_every": 10_000,
                "log_every": 10_000,
                "val_images": 1,
                "device": "cpu",
                "precision": precision,
            },
        }
    )
    trainer = Trainer(cfg, data)
    list(trainer.run(until_step=2))  # warm-up: allocator, kernels
    start = time.perf_counter()
    list(trainer.run(until_step=2 + steps))
    step_seconds = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for _ in range(steps):
        trainer._draw_batch()  # the loop's own batch preparation, timed alone
    batch_seconds = (time.perf_counter() - start) / steps
    return {
        "params": count_parameters(trainer.model),
        "images_per_sec": batch / step_seconds,
        "step_seconds": step_seconds,
        "batch_seconds": batch_seconds,
    }


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="alternating fp32/bf16 measurements of each row")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    data = load_data(TrialConfig().data)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"train.precision auto resolves to {resolve_precision('auto', torch.device('cpu'))} here; "
        f"{args.steps} timed steps x {args.rounds} rounds per row; load average before: {load()}\n"
    )
    print(
        "| model | params | batch | threads | fp32 images/s | bf16 images/s | bf16 / fp32 | fp32 ms/step | "
        "bf16 ms/step | time outside the model step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in args.models:
        name, model, batch = MODELS[key]
        for threads in args.threads:
            runs = {"fp32": [], "bf16": []}
            for i in range(args.rounds):
                for precision in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
                    runs[precision].append(measure(model, batch, args.steps, threads, precision, data))
            ips = {k: statistics.median(r["images_per_sec"] for r in v) for k, v in runs.items()}
            ratio = statistics.median(
                b["images_per_sec"] / a["images_per_sec"] for a, b in zip(runs["fp32"], runs["bf16"])
            )
            step = {k: statistics.median(r["step_seconds"] for r in v) for k, v in runs.items()}
            outside = statistics.median(r["batch_seconds"] for r in runs["fp32"]) / step["fp32"]
            print(
                f"| {name} | {runs['fp32'][0]['params']:,} | {batch} | {threads} | {ips['fp32']:.0f} | {ips['bf16']:.0f} | "
                f"{ratio:.2f}x | {1000 * step['fp32']:,.0f} | {1000 * step['bf16']:,.0f} | {100 * outside:.1f}% |",
                flush=True,
            )
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
