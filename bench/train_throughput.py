"""Training throughput on this machine: images per second, and the share of time spent outside the model.

    python bench/train_throughput.py [--steps 20] [--threads 2]

For a small CPU model and for the seed-size model (ch 32, ch_mult [1,2,2], 2 resblocks, batch 128), it
times whole training steps through `Trainer.run` and, separately, just the batch preparation the loop does
each step (index the uint8 tensor, dequantize, draw t and noise). The ratio is the fraction of the CPU's
time that is not the model's forward/backward/optimiser step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from trials.config import TrialConfig
from trials.data import load_data
from trials.model import count_parameters
from trials.train import Trainer

MODELS = {
    "small CPU (ch 16, [1,2,2], 1 block)": ({"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}, 64),
    "seed (ch 32, [1,2,2], 2 blocks, attn 7)": ({"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [7], "dropout": 0.1}, 128),
}


def measure(model: dict, batch: int, steps: int, threads: int, data) -> dict:
    cfg = TrialConfig.from_dict({"model": model, "train": {"batch_size": batch, "steps": steps + 2, "num_threads": threads,
                                                          "val_every": 10_000, "log_every": 10_000, "device": "cpu"}})
    trainer = Trainer(cfg, data)
    list(trainer.run(until_step=2))  # warm-up: allocator, kernels
    start = time.perf_counter()
    list(trainer.run(until_step=2 + steps))
    step_seconds = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for _ in range(steps):
        trainer._draw_batch()  # the loop's own batch preparation, timed alone
    batch_seconds = (time.perf_counter() - start) / steps
    return {"params": count_parameters(trainer.model), "images_per_sec": batch / step_seconds,
            "step_ms": 1000 * step_seconds, "outside_model": batch_seconds / step_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    data = load_data(TrialConfig().data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.steps} timed steps\n")
    print("| model | params | batch | threads | images/s | ms/step | time outside the model step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (model, batch) in MODELS.items():
        for threads in args.threads:
            r = measure(model, batch, args.steps, threads, data)
            print(f"| {name} | {r['params']:,} | {batch} | {threads} | {r['images_per_sec']:.0f} | {r['step_ms']:.0f} | "
                  f"{100 * r['outside_model']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
