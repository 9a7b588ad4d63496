"""Sampling cost per image on CPU: reverse-SDE predictor-corrector and probability-flow ODE.

For a small UNet (ch 16, ch_mult 1-2-2, 1 res block) and the seed-size one (ch 32, ch_mult 1-2-2, 2 res
blocks), each briefly trained on mnist-5k so that its score is not the zero an untrained UNet predicts
(that would make the ODE trivially easy), it times one batch per setting and prints a markdown table:

  * PC at a few (steps, corrector steps): the cost is steps * (1 + corrector steps) score evaluations,
    so the table also extrapolates the measured seconds per evaluation to the config default of 1000 x 1;
  * the ODE at a loose and at the sampling default tolerance, in the logsnr frame (the default) and in
    frame t (the old way), with its NFE (the final denoising step included).

A model trained for a few dozen steps is far from a converged one, whose ODE is usually stiffer near
eps: read the ODE NFE as a lower bound. Each setting is timed once (on a shared machine, expect noise).

    .venv/bin/python -m bench.sampling [--batch 8] [--train-steps 30] [--threads 1] [--ode-only]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from trials.config import TrialConfig
from trials.data import load_data
from trials.model import count_parameters, score_fn
from trials.sampling import ode_sample, pc_sample
from trials.sde import make_sde
from trials.trainer import Trainer

MODELS = {
    "small (ch 16, 1 res block)": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1},
    "seed (ch 32, 2 res blocks)": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2},
}
PC_SETTINGS = [(50, 0), (50, 1), (100, 1)]  # (predictor steps, corrector steps per step)
PC_DEFAULT = (1000, 1)  # SampleConfig's default, too slow to run here: extrapolated
ODE_TOLERANCES = [1e-3, 1e-5]
ODE_FRAMES = ["logsnr", "t"]


def briefly_trained(model_cfg: dict, train_steps: int, data) -> tuple[TrialConfig, torch.nn.Module]:
    cfg = TrialConfig.from_dict(
        {
            "model": {**model_cfg, "dropout": 0.0},
            "train": {
                "steps": max(train_steps, 1),
                "batch_size": 16,
                "lr": 2e-3,
                "ema_decay": 0.0,
                "val_every": max(train_steps, 1),
                "val_images": 16,
                "device": "cpu",
            },
        }
    )
    trainer = Trainer(cfg, data, device="cpu")
    if train_steps > 0:
        for _ in trainer.run():
            pass
    return cfg, trainer.eval_model.eval()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per sampling call")
    parser.add_argument("--train-steps", type=int, default=30, help="DSM steps before timing (0: untrained)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ode-only", action="store_true", help="time only the ODE sampler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]

    data = load_data(TrialConfig().data)
    rows = []
    for name, model_cfg in MODELS.items():
        (cfg, model), train_seconds = timed(lambda: briefly_trained(model_cfg, args.train_steps, data))
        sde_cfg = cfg.sde
        sde = make_sde(sde_cfg)
        score = score_fn(model, sde)
        shape = (args.batch, 1, 28, 28)
        label = f"{name}, {count_parameters(model) / 1e6:.2f}M params"
        print(f"{label}: trained {args.train_steps} steps in {train_seconds:.0f} s", flush=True)

        if not args.ode_only:
            seconds_per_eval = []
            for steps, corrector in PC_SETTINGS:
                x, seconds = timed(
                    lambda: pc_sample(
                        score,
                        sde,
                        shape,
                        eps=sde_cfg.sampling_eps,
                        steps=steps,
                        corrector_steps=corrector,
                        generator=torch.Generator().manual_seed(0),
                    )
                )
                evals = steps * (1 + corrector)
                seconds_per_eval.append(seconds / evals)
                rows.append(
                    (label, "PC", f"{steps} steps x (1 + {corrector})", evals, seconds / args.batch, "measured")
                )
                print(f"  PC {steps}x(1+{corrector}): {seconds:.1f} s", flush=True)
            steps, corrector = PC_DEFAULT
            evals = steps * (1 + corrector)
            per_eval = sum(seconds_per_eval) / len(seconds_per_eval)
            rows.append(
                (
                    label,
                    "PC",
                    f"{steps} steps x (1 + {corrector})",
                    evals,
                    per_eval * evals / args.batch,
                    "extrapolated",
                )
            )

        for tol in ODE_TOLERANCES:
            for frame in ODE_FRAMES:  # back to back, so load drifts hit both frames alike
                (x, nfe), seconds = timed(
                    lambda: ode_sample(
                        score,
                        sde,
                        shape,
                        eps=sde_cfg.sampling_eps,
                        rtol=tol,
                        atol=tol,
                        frame=frame,
                        generator=torch.Generator().manual_seed(0),
                    )
                )
                rows.append(
                    (
                        label,
                        "ODE",
                        f"{frame} frame, dopri5, rtol = atol = {tol:g}",
                        nfe,
                        seconds / args.batch,
                        "measured",
                    )
                )
                print(f"  ODE {frame} {tol:g}: {nfe} NFE, {seconds:.1f} s", flush=True)

    print()
    print(
        f"Sampling cost on CPU ({args.threads} thread(s), batches of {args.batch} images, "
        f"models trained {args.train_steps} DSM steps; {os.cpu_count()} cores, 1-minute load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    )
    print()
    print("| model | sampler | setting | score evaluations | s / image | ms / evaluation / image | timing |")
    print("|---|---|---|---:|---:|---:|---|")
    for label, sampler, setting, evals, per_image, how in rows:
        print(
            f"| {label} | {sampler} | {setting} | {evals} | {per_image:.2f} | {1e3 * per_image / evals:.1f} | {how} |"
        )


if __name__ == "__main__":
    main()
