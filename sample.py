"""Draw an image grid from a checkpoint or an MLflow model:

    python sample.py --checkpoint ckpt.pt --sampler pc|ode --out grid.png
    python sample.py --model models:/NAME/VERSION --sampler ode --out grid.png    # or runs:/<run id>/model

Thin wiring: parse the command line, load the EMA weights and config (a train.py or Tune checkpoint through
trials.trainer, an MLflow model train.py logged through tuner.mlflow_model), draw with one of
trials.sampling.IMAGE_SAMPLERS using the run's `sample` settings (some overridable here), save the grid.
Bad input (a missing checkpoint, a model URI that names nothing) is one line and exit status 2; an ODE the
solver cannot finish is one line and exit status 1. An MLflow model is a CPU export and samples on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from trials.cli import EXIT_BAD_INPUT, OneLineArgumentParser, UserError, device_name, first_line, positive_int
from trials.config import IMAGE_SAMPLER_NAMES

PROG = "sample.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog=PROG, description="Sample an image grid from a checkpoint or an MLflow model.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="a checkpoint file (train.py's checkpoint.pt) or a Tune checkpoint folder holding trainer.pt",
    )
    source.add_argument(
        "--model",
        metavar="URI",
        help="an MLflow model train.py logged: models:/NAME/VERSION, runs:/<run id>/model, or a local model folder",
    )
    p.add_argument("--mlflow-uri", help="tracking (and registry) URI for --model (default: $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--sampler",
        choices=IMAGE_SAMPLER_NAMES,
        default="pc",  # trials.sampling.IMAGE_SAMPLERS
        help="an image sampler of trials.sampling.IMAGE_SAMPLERS: %(choices)s (pc: predictor-corrector; ode: "
        "probability flow)",
    )
    p.add_argument("--n", type=positive_int, default=None, help="images (default: sample.n_images)")
    p.add_argument("--out", required=True, type=Path, help="PNG file for the grid")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="the sampler's steps, e.g. PC's predictor steps (sample.pc_steps)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: sample.seed")
    p.add_argument("--device", type=device_name, default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:N'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status

    if not args.out.resolve().parent.is_dir():
        return fail(f"output folder does not exist: {args.out.parent}")
    if args.model and args.device.startswith("cuda"):
        return fail(
            f"--device {args.device}: an MLflow model is a CPU export; sample it on the CPU, or a checkpoint on the GPU"
        )

    import torch  # after the cheap checks: --help and typos answer at once

    from trials.odesolve import ODEFailure
    from trials.portable import ScoreModel
    from trials.preview import checkpoint_file
    from trials.sampling import IMAGE_SAMPLERS, save_grid
    from trials.trainer import load_checkpoint, resolve_device

    steps_setting = IMAGE_SAMPLERS[args.sampler].steps_setting  # the table says what --steps sets, if anything
    if args.steps is not None and steps_setting is None:
        return fail(f"--steps does not apply to --sampler {args.sampler}: it chooses its own steps")

    if args.model:
        from tuner.mlflow_model import load_model

        try:
            network, config = load_model(args.model, args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"))
            model = ScoreModel(network, config)
        except UserError as exc:
            return fail(str(exc))
    else:
        path = checkpoint_file(args.checkpoint)
        if not path.is_file():
            return fail(f"checkpoint not found: {path}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            return fail(f"--device {args.device}: CUDA is not available on this machine")
        device = resolve_device(args.device)
        try:
            model = ScoreModel.from_checkpoint(load_checkpoint(path, map_location=device), device)
        except Exception as exc:  # unpickling, missing keys, mismatched weights: all mean "not our checkpoint"
            return fail(f"{path} is not a trials.trainer checkpoint ({type(exc).__name__}: {first_line(exc)})")

    cfg = model.cfg
    sc = cfg.sample if args.steps is None else dataclasses.replace(cfg.sample, **{steps_setting: args.steps})
    n = args.n if args.n is not None else sc.n_images
    start = time.perf_counter()
    try:
        samples = model.draw(
            n,
            args.sampler,
            sample=sc,
            seed=args.seed,
            report=lambda line: print(line.strip(), file=sys.stderr, flush=True),
        )
    except ODEFailure as exc:
        return fail(str(exc), 1)
    seconds = time.perf_counter() - start
    save_grid(samples.x, args.out, cfg.data.centered)
    settings = ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in IMAGE_SAMPLERS[args.sampler].settings(sc).items()
    )
    print(
        f"{args.sampler}: {n} images, {samples.nfe} score evaluations ({settings}), {seconds:.1f} s "
        f"({seconds / n:.3f} s/image) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
