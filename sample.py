"""Draw an image grid from a checkpoint: `python sample.py --checkpoint ckpt.pt --sampler pc|ode --out grid.png`.

Thin wiring: parse the command line, load the checkpoint's EMA weights and config, draw with one of
trials.sampling.SAMPLERS using the checkpoint's `sample` settings (some overridable here), save the grid.
Bad input is one line and exit status 2; an ODE the solver cannot finish is one line and exit status 1.
Reads checkpoints of train.py (<out>/checkpoint.pt) and of tuning trials (<trial>/checkpoint_*/trainer.pt).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from trials.cli import EXIT_BAD_INPUT, OneLineArgumentParser, device_name, first_line, positive_int

PROG = "sample.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog=PROG, description="Sample an image grid from a trials.trainer checkpoint.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint file (train.py's checkpoint.pt) or a Tune checkpoint folder holding trainer.pt")
    p.add_argument("--sampler", choices=("pc", "ode"), default="pc",  # the names of trials.sampling.SAMPLERS
                   help="pc: predictor-corrector; ode: probability flow")
    p.add_argument("--n", type=positive_int, default=None, help="images (default: sample.n_images)")
    p.add_argument("--out", required=True, type=Path, help="PNG file for the grid")
    p.add_argument("--steps", type=positive_int, default=None, help="PC predictor steps (default: sample.pc_steps)")
    p.add_argument("--seed", type=int, default=None, help="default: sample.seed")
    p.add_argument("--device", type=device_name, default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:N'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status

    if args.steps is not None and args.sampler == "ode":
        return fail("--steps applies to --sampler pc; the ODE solver chooses its own steps")
    if not args.out.resolve().parent.is_dir():
        return fail(f"output folder does not exist: {args.out.parent}")

    import torch  # after the cheap checks: --help and typos answer at once

    from trials.model import score_fn
    from trials.odesolve import ODEFailure
    from trials.preview import checkpoint_file
    from trials.sampling import SAMPLERS, save_grid
    from trials.sde import make_sde
    from trials.trainer import eval_model_from_checkpoint, load_checkpoint, resolve_device

    path = checkpoint_file(args.checkpoint)
    if not path.is_file():
        return fail(f"checkpoint not found: {path}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail(f"--device {args.device}: CUDA is not available on this machine")
    device = resolve_device(args.device)
    try:
        cfg, model = eval_model_from_checkpoint(load_checkpoint(path, map_location=device), device)
    except Exception as exc:  # unpickling, missing keys, mismatched weights: all mean "not our checkpoint"
        return fail(f"{path} is not a trials.trainer checkpoint ({type(exc).__name__}: {first_line(exc)})")

    sde = make_sde(cfg.sde)
    sc = cfg.sample if args.steps is None else dataclasses.replace(cfg.sample, pc_steps=args.steps)
    n = args.n if args.n is not None else sc.n_images
    sampler = SAMPLERS[args.sampler]
    generator = torch.Generator(device=device).manual_seed(sc.seed if args.seed is None else args.seed)
    start = time.perf_counter()
    try:
        samples = sampler.draw(score_fn(model, sde), sde, cfg.dataset.batch_shape(n), eps=cfg.sde.sampling_eps,
                               sample=sc, generator=generator, device=device,
                               report=lambda line: print(line.strip(), file=sys.stderr, flush=True))
    except ODEFailure as exc:
        return fail(str(exc), 1)
    seconds = time.perf_counter() - start
    save_grid(samples.x, args.out, cfg.data.centered)
    settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sampler.settings(sc).items())
    print(f"{args.sampler}: {n} images, {samples.nfe} score evaluations ({settings}), {seconds:.1f} s "
          f"({seconds / n:.3f} s/image) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
