"""A quick look at a checkpoint: a grid of samples from the probability-flow ODE on a short fixed grid.

This is the winner's picture in the experiment report. By default it solves the ODE with the likelihood's
multistep solver on 63 steps (the accurate fidelity's setting: 64 score evaluations, and one more for the
denoising step). On a tuning-sized model its grid matches one drawn at rtol = 1e-5 as closely as dopri5 at
rtol = 1e-3 does (RMS 0.03 against 0.02 on a [-1, 1] scale) for 65 evaluations where dopri5 took 159, so a
6 x 6 grid costs seconds on a CPU (docs/benchmarks.md, the main job).
`--method dopri5` (with --rtol, --atol) draws it the adaptive way. It draws through
`trials.sampling.IMAGE_SAMPLERS["ode"]`: the same sampler the full run uses.

The report runs this from the driver side, where no model may be built: as a Ray task during `tune.py`
(`trials.trainable.sample_checkpoint`), and as this command from `python -m tuner.report`:

    python -m trials.preview --checkpoint CHECKPOINT_DIR_OR_FILE --out grid.png [--n 36] [--method multistep]
                             [--steps 63] [--rtol 1e-3] [--atol 1e-3] [--seed 0] [--device auto|cpu|cuda[:N]]
                             [--threads N]

It prints progress with an estimate of the time left on stderr, and one JSON line with the settings, the
NFE and the seconds on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trials.config import ConfigError
from trials.layout import CHECKPOINT_FILE
from trials.model import score_fn
from trials.odesolve import ODEFailure
from trials.sampling import IMAGE_SAMPLERS, save_grid
from trials.sde import make_sde
from trials.trainer import eval_model_from_checkpoint, load_checkpoint, resolve_device

PREVIEW_METHOD = "multistep"
PREVIEW_STEPS = 63
LOOSE_TOLERANCE = 1e-3  # --method dopri5 (or another adaptive one)
PROGRESS_EVERY_S = 5.0


def checkpoint_file(path: str | Path) -> Path:
    """A Tune checkpoint folder (holding trainer.pt) or the checkpoint file itself."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def draw_grid(
    checkpoint: str | Path,
    out: str | Path,
    *,
    n: int = 36,
    method: str = PREVIEW_METHOD,
    steps: int = PREVIEW_STEPS,
    rtol: float = LOOSE_TOLERANCE,
    atol: float = LOOSE_TOLERANCE,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sample `n` images with the checkpoint's evaluation weights (EMA when saved); write a PNG grid.

    Returns the settings and costs as plain values: n_images, sampler, method, rtol, atol, eps, seed,
    nfe, seconds, device, step (the checkpoint's training step), checkpoint, out.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    path = checkpoint_file(checkpoint)
    ckpt = load_checkpoint(path, map_location=dev)
    cfg, model = eval_model_from_checkpoint(ckpt, dev)
    sde = make_sde(cfg.sde)
    eps = cfg.sde.sampling_eps
    quick = dataclasses.replace(cfg.sample, ode_method=method, ode_steps=steps, ode_rtol=rtol, ode_atol=atol)
    quick.check("preview")  # a method or steps it cannot take is a one-line error, before the model runs
    generator = torch.Generator(device=dev).manual_seed(seed)
    start = time.perf_counter()
    samples = IMAGE_SAMPLERS["ode"].draw(
        score_fn(model, sde),
        sde,
        cfg.dataset.batch_shape(n),
        eps=eps,
        sample=quick,
        generator=generator,
        device=dev,
        report=report,
        every=PROGRESS_EVERY_S,
    )
    seconds = time.perf_counter() - start
    save_grid(samples.x, out, cfg.data.centered)
    return {
        "n_images": n,
        "sampler": "probability-flow ODE",
        **IMAGE_SAMPLERS["ode"].settings(quick),
        "eps": eps,
        "seed": seed,
        "nfe": int(samples.nfe),
        "seconds": seconds,
        "device": str(dev),
        "step": int(ckpt.get("step", 0)),
        "checkpoint": str(path),
        "out": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    from trials.cli import OneLineArgumentParser, device_name, positive_float, positive_int

    parser = OneLineArgumentParser(
        prog="python -m trials.preview",
        description="A sample grid from a checkpoint: the probability-flow ODE on a short fixed grid.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a Tune checkpoint folder (with trainer.pt) or a trials.trainer checkpoint file",
    )
    parser.add_argument("--out", required=True, help="PNG file for the grid")
    parser.add_argument("--n", type=positive_int, default=36, help="images (default 36: a 6 x 6 grid)")
    parser.add_argument(
        "--method", default=PREVIEW_METHOD, help=f"ODE solver: multistep or an adaptive one (default {PREVIEW_METHOD})"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=PREVIEW_STEPS, help=f"multistep steps (default {PREVIEW_STEPS})"
    )
    parser.add_argument("--rtol", type=positive_float, default=LOOSE_TOLERANCE, help="adaptive methods only")
    parser.add_argument("--atol", type=positive_float, default=LOOSE_TOLERANCE, help="adaptive methods only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", type=device_name, default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:N'"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    path = checkpoint_file(args.checkpoint)
    if not path.is_file():
        return fail(f"checkpoint not found: {path}")
    if not Path(args.out).resolve().parent.is_dir():
        return fail(f"output folder does not exist: {Path(args.out).parent}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail(f"--device {args.device}: CUDA is not available on this machine")
    try:
        info = draw_grid(
            path,
            args.out,
            n=args.n,
            method=args.method,
            steps=args.steps,
            rtol=args.rtol,
            atol=args.atol,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
            report=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ODEFailure as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # --method or --steps it cannot take
        return fail(str(exc))
    except (KeyError, RuntimeError, ValueError, OSError) as exc:  # not a trials.trainer checkpoint
        return fail(f"{path}: cannot sample from it ({type(exc).__name__}: {str(exc).strip()[:200]})")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
