"""How far each fidelity setting reads from a tight solve, and whether it ranks configs as the tight solve does.

bench/likelihood.py measures the error across checkpoints of one training run; a tuning run compares
different configs, whose models make the ODE hard in different places. This bench trains CONFIGS (cpu.yaml
grid points: the leaders of the replay grid bench/data/cpu_curves.csv at step 160, and slower learners)
with the project's Trainer on mnist-5k, exactly as a tuning trial does (cpu.yaml's fixed settings, bf16
where the CPU has it), keeps the EMA weights at each of --steps, and scores every kept model with every
setting of SETTINGS on the same validation images, dequantization noise and Rademacher probes as the
fast fidelity of a cpu.yaml run (its evaluator's first --images images), each at the config's sampling_eps.

Per setting it prints NFE, seconds, the mean and worst |bias| against the reference setting, and the
agreement of the configs' ranking with the reference's: Kendall tau and the number of adjacent pairs (in
the reference order) that the setting swaps, per training length.

Resumable in every phase: run the same command again after an interruption.
  train   trains each config to each of --steps in turn (every config to 160 before any goes on to 800),
          keeping the trainer's state under --state (gitignored) and the EMA weights under --weights;
  score   scores each kept model with each setting, appending one JSON line per (model, setting) to
          --scores (bench/data/fidelity_scores.jsonl, committed);
  report  prints the tables from the scores.
`--budget-min` stops a phase after the model or score in progress once that many minutes have passed.

    nice -n 19 .venv/bin/python -m bench.fidelity_bias [--phase train|score|report|all] [--steps 160 800]
        [--images 16] [--settings NAME ...] [--budget-min 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trials.config import FidelityConfig, TrialConfig

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "cpu.yaml"
# The EMA weights (~50 MB for 9 configs at 2 lengths) and the trainers' states stay out of git; the scores,
# every per-image bits/dim of every setting, are committed.
DEFAULT_WEIGHTS = ROOT / "runs" / "fidelity_bias" / "models"
DEFAULT_STATE = ROOT / "runs" / "fidelity_bias" / "state"
DEFAULT_SCORES = ROOT / "bench" / "data" / "fidelity_scores.jsonl"

# (lr, batch_size, num_res_blocks, ch_mult, sampling_eps). The first six are the best of the replay grid at
# step 160 (val_bpd 2.44-2.59 there), each at the sampling_eps that scored it best; configs 4 and 5 are
# 0.0006 apart, a near tie. The last three learn slower (2.88, 3.13, 4.34 at step 160).
CONFIGS = [
    (1e-2, 64, 2, (1, 2, 2), 1e-4),
    (3.2e-3, 128, 2, (1, 2, 4), 1e-5),
    (1e-2, 32, 2, (1, 2, 4), 1e-4),
    (3.2e-3, 128, 2, (1, 2, 8), 1e-4),
    (3.2e-3, 128, 2, (1, 2, 2), 1e-5),
    (1e-2, 128, 2, (1, 2, 4), 1e-3),
    (1e-3, 128, 2, (1, 2, 2), 1e-5),
    (1e-3, 64, 1, (1, 2, 2), 1e-4),
    (3.2e-4, 128, 2, (1, 2, 8), 1e-3),
]


def config_name(c) -> str:
    lr, b, r, m, eps = c
    return f"lr{lr:g}_b{b}_r{r}_m{'-'.join(map(str, m))}_eps{eps:g}"


def trial_config(c) -> TrialConfig:
    from tuner.space import load_space

    lr, b, r, m, _ = c
    return load_space(SPACE).trial_config(
        {"lr": lr, "batch_size": b, "num_res_blocks": r, "ch_mult": ",".join(map(str, m))}
    )


def selected(names: list[str] | None) -> list:
    """CONFIGS, or those of `names` in that order (the order a phase works through them)."""
    if names is None:
        return CONFIGS
    by_name = {config_name(c): c for c in CONFIGS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; the configs are {', '.join(by_name)}")
    return [by_name[n] for n in names]


# ---- training -------------------------------------------------------------------------------------------
def train_phase(args, deadline: float) -> None:
    from trials.data import load_data
    from trials.trainer import Trainer, load_checkpoint

    data = None
    for step in sorted(args.steps):
        for c in selected(args.configs):
            name = config_name(c)
            out = args.weights / f"{name}_step{step}.pt"
            if out.exists():
                continue
            if time.time() > deadline:
                print("train: time budget spent; run again to go on", flush=True)
                return
            cfg = trial_config(c)
            if data is None:
                data = load_data(cfg.data)
            trainer = Trainer(cfg, data, device="cpu")
            state_path = args.state / f"{name}.pt"
            if state_path.exists():
                trainer.load_state_dict(load_checkpoint(state_path))
            start, from_step = time.perf_counter(), trainer.step
            # In chunks, saving the state after each, so that a stop loses at most one chunk.
            while trainer.step < step:
                for record in trainer.run(until_step=min(step, trainer.step + 40)):
                    if record["diverged"]:
                        raise RuntimeError(f"{name} diverged: {record.get('reason')}")
                trainer.save_checkpoint(state_path)
                if time.time() > deadline and trainer.step < step:
                    print(f"train: {name} at step {trainer.step}; time budget spent, run again", flush=True)
                    return
            args.weights.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().float().clone() for k, v in trainer.eval_model.state_dict().items()}
            torch.save({"config": cfg.to_dict(), "step": step, "model": weights}, out)
            print(
                f"train: {name} step {from_step} -> {step} in {time.perf_counter() - start:.0f} s "
                f"(precision {trainer.precision})",
                flush=True,
            )


# ---- scoring ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    name: str
    fidelity: FidelityConfig
    role: str = ""  # "fast (default)", "fast (before)", "accurate (default)", "accurate (before)", ...


def _f(method: str, steps: int = 0, tol: float = 1e-3) -> FidelityConfig:
    return FidelityConfig(n_images=1, method=method, steps=steps, rtol=tol, atol=tol)


# Variants of the multistep solver measured here (trials.likelihood._multistep_solve's settings); each is
# registered in trials.odesolve.MULTISTEP_METHODS under its own name for this process only.
VARIANTS: dict[str, dict] = {
    # "multistep" as first built: equal steps from the data end on, the first ones of lower order and as long
    # as the rest. Its scores were recorded as multistepxN before the short start-up steps (ramp) were added.
    "ab3c-even": {"order": 3, "corrector": True},
    "ab3": {"order": 3, "corrector": False},
    "ab2c": {"order": 2, "corrector": True},
    "ab3c-data": {"order": 3, "corrector": True, "prediction": "data"},
    "ab4c": {"order": 4, "corrector": True},
    "ab3c-q2": {"order": 3, "corrector": True, "quadrature": 2},
    "ab3c-q6": {"order": 3, "corrector": True, "quadrature": 6},
    "ab3c-w1": {"order": 3, "corrector": True, "warp": 1.0},
    "ab3c-w-1": {"order": 3, "corrector": True, "warp": -1.0},
    "ab3c-w2": {"order": 3, "corrector": True, "warp": 2.0},
    "ab3c-w3": {"order": 3, "corrector": True, "warp": 3.0},
    "ab3c-w4": {"order": 3, "corrector": True, "warp": 4.0},
}

SETTINGS = [
    Setting("rk4x7", _f("rk4", 7), "fast (before)"),
    Setting("rk4x32", _f("rk4", 32), "accurate (before)"),
    Setting("rk4x128", _f("rk4", 128), "reference"),
    Setting("dopri5-1e-7", _f("dopri5", tol=1e-7), "check of the reference"),
    Setting("multistepx27", _f("multistep", 27), "variant"),
    Setting("multistepx31", _f("multistep", 31), "fast (default)"),
    Setting("multistepx63", _f("multistep", 63), "accurate (default)"),
    *[Setting(f"{v}x{n}", _f(v, n), "variant") for v in VARIANTS for n in (15, 27, 31, 63, 255)],
    Setting("multistepx15", _f("multistep", 15), "variant"),
    Setting("multistepx255", _f("multistep", 255), "check of the reference"),
]
BY_NAME = {s.name: s for s in SETTINGS}
REFERENCE = "rk4x128"
MAIN = ("rk4x7", "rk4x32", "multistepx31", "multistepx63")  # the per-config tables show these
TIGHT = "dopri5-1e-7"  # the check of the reference, on a few configs
DEFAULT_SETTINGS = ["rk4x7", "rk4x32", "rk4x128"]


def register_variants() -> None:
    from trials.odesolve import MULTISTEP_METHODS

    for name, params in VARIANTS.items():
        MULTISTEP_METHODS.setdefault(name, params)


def load_model(path: Path):
    from trials.model import unet_for

    saved = torch.load(path, weights_only=True)
    cfg = TrialConfig.from_dict(saved["config"])
    model = unet_for(cfg)
    model.load_state_dict(saved["model"])
    return cfg, model.eval()


def read_scores(path: Path) -> dict[tuple[str, int, str], dict]:
    scores = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                scores[(row["config"], row["step"], row["setting"])] = row
    return scores


def score_phase(args, deadline: float) -> None:
    from trials.config import EvalConfig
    from trials.data import load_data
    from trials.likelihood import LikelihoodEvaluator
    from trials.model import score_fn
    from trials.sde import make_sde

    base = trial_config(CONFIGS[0])
    data = load_data(base.data)
    # The evaluator of a cpu.yaml run: its fast fidelity scores the first fast.n_images of these.
    full = LikelihoodEvaluator.build(data.val, base.eval, base.data.centered)
    x, probes = full.x[: args.images], full.probes[: args.images]
    register_variants()
    scores_path = args.scores
    scores = read_scores(scores_path)
    for step in sorted(args.steps):
        for c in selected(args.configs):
            name = config_name(c)
            path = args.weights / f"{name}_step{step}.pt"
            if not path.exists():
                continue
            todo = [s for s in args.settings if (name, step, s) not in scores]
            if not todo:
                continue
            cfg, model = load_model(path)
            sde = make_sde(cfg.sde)
            for setting_name in todo:
                if time.time() > deadline:
                    print("score: time budget spent; run again to go on", flush=True)
                    return
                fid = replace(BY_NAME[setting_name].fidelity, n_images=args.images)
                ecfg = EvalConfig(estimator="rademacher", batch_size=args.images, fast=fid, accurate=fid)
                evaluator = LikelihoodEvaluator(
                    x, probes, torch.arange(args.images), ecfg, base.data.centered, max_nfe=None
                )
                r = evaluator.evaluate(score_fn(model, sde), sde, c[4], "accurate")
                if r.failed:
                    raise RuntimeError(f"{name} step {step} {setting_name}: {r.reason}")
                row = {
                    "config": name,
                    "step": step,
                    "setting": setting_name,
                    "images": args.images,
                    "mean": r.mean,
                    "per_image": r.per_image,
                    "nfe": r.nfe,
                    "seconds": r.seconds,
                    "load": os.getloadavg()[0],
                }
                with scores_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                scores[(name, step, setting_name)] = row
                print(
                    f"score: {name} step {step} {setting_name}: {r.mean:.4f} ({r.nfe} NFE, {r.seconds:.0f} s)",
                    flush=True,
                )


# ---- the report ------------------------------------------------------------------------------------------
def kendall_and_adjacent_swaps(reference: list[float], values: list[float]) -> tuple[float, int]:
    """Kendall tau-a between two scorings of the same configs, and the adjacent pairs (in the reference
    order) that `values` puts the other way round."""
    n = len(reference)
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = np.sign(reference[i] - reference[j]) * np.sign(values[i] - values[j])
            concordant += s > 0
            discordant += s < 0
    tau = (concordant - discordant) / (n * (n - 1) / 2) if n > 1 else math.nan
    order = np.argsort(reference)
    swaps = sum(values[order[k]] > values[order[k + 1]] for k in range(n - 1))
    return float(tau), int(swaps)


# The targets of the fast and the accurate fidelity (issue 23): NFE at most, mean and worst |bias| at most
# (bits/dim, against the reference), Kendall tau with the reference's ranking at least.
TARGETS = {"fast": (32, 0.03, 0.05, 0.9), "accurate": (64, None, 0.005, None)}


def report(args) -> None:
    scores = read_scores(args.scores)
    print(
        f"Fidelity bias across configs: {args.images} mnist-5k validation images (cpu.yaml's fast subset, its "
        f"dequantization noise and Rademacher probes), reference {REFERENCE}; {os.cpu_count()} cores"
    )
    for step in sorted(args.steps):
        names = [config_name(c) for c in CONFIGS if (config_name(c), step, REFERENCE) in scores]
        if not names:
            continue
        ref = np.array([scores[(n, step, REFERENCE)]["mean"] for n in names])
        print()
        print(
            f"Step {step}: {len(names)} configs; reference bits/dim "
            + ", ".join(f"{n.split('_eps')[0]} {v:.4f}" for n, v in zip(names, ref))
        )
        print()
        print(
            "| setting | role | NFE | seconds per config | mean abs. bias | worst abs. bias | mean bias | "
            "Kendall tau | adjacent swaps | fast target | accurate target |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for s in SETTINGS:
            if s.name == REFERENCE or not all((n, step, s.name) in scores for n in names):
                continue
            rows = [scores[(n, step, s.name)] for n in names]
            values = np.array([r["mean"] for r in rows])
            bias = values - ref
            tau, swaps = kendall_and_adjacent_swaps(list(ref), list(values))
            nfe = max(r["nfe"] for r in rows)
            meets = {}
            for kind, (most_nfe, mean_bias, worst_bias, least_tau) in TARGETS.items():
                meets[kind] = (
                    nfe <= most_nfe
                    and (mean_bias is None or np.abs(bias).mean() <= mean_bias)
                    and np.abs(bias).max() <= worst_bias
                    and (least_tau is None or tau >= least_tau)
                )
            print(
                f"| {s.name} | {s.role or '-'} | {nfe} | {np.mean([r['seconds'] for r in rows]):.1f} | "
                f"{np.abs(bias).mean():.4f} | {np.abs(bias).max():.4f} | {bias.mean():+.4f} | {tau:.3f} | {swaps} | "
                f"{'met' if meets['fast'] else 'not met'} | {'met' if meets['accurate'] else 'not met'} |"
            )
        main = [s for s in SETTINGS if s.name in MAIN and all((n, step, s.name) in scores for n in names)]
        print()
        print("Per config, bits/dim of the reference and each setting's bias:")
        print()
        print("| config | sampling_eps | reference | " + " | ".join(s.name for s in main) + " |")
        print("|---|---:|---:|" + "---:|" * len(main))
        for n, r in zip(names, ref):
            print(
                f"| {n.split('_eps')[0]} | {n.split('_eps')[1]} | {r:.4f} | "
                + " | ".join(f"{scores[(n, step, s.name)]['mean'] - r:+.4f}" for s in main)
                + " |"
            )
        gaps = np.diff(np.sort(ref))
        print()
        print(
            f"Gaps between neighbours in the reference ranking: smallest {gaps.min():.4f}, median "
            f"{np.median(gaps):.4f} bits/dim."
            if len(gaps)
            else ""
        )
    check_reference(scores, sorted(args.steps))


def check_reference(scores: dict, steps: list[int]) -> None:
    """How far the reference is from the 1e-7 solve, where that was run, and each main setting's distance
    from the 1e-7 solve itself (the targets are stated against it)."""
    rows = [
        (n, step)
        for step in steps
        for n in map(config_name, CONFIGS)
        if (n, step, TIGHT) in scores and (n, step, REFERENCE) in scores
    ]
    if not rows:
        return
    main = list(MAIN)
    print()
    print(f"Check of the reference against {TIGHT} (bits/dim; each setting's difference from {TIGHT}):")
    print()
    print(f"| config | step | {TIGHT} | its NFE | {REFERENCE} | " + " | ".join(main) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(main))
    for n, step in rows:
        tight = scores[(n, step, TIGHT)]
        cells = [
            f"{scores[(n, step, s)]['mean'] - tight['mean']:+.4f}" if (n, step, s) in scores else "-"
            for s in [REFERENCE, *main]
        ]
        print(f"| {n} | {step} | {tight['mean']:.4f} | {tight['nfe']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("train", "score", "report", "all"), default="all")
    parser.add_argument("--steps", type=int, nargs="+", default=[160, 800])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(BY_NAME))
    parser.add_argument(
        "--configs", nargs="+", default=None, help="train and score only these configs (names as printed)"
    )
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--scores", type=Path, default=DEFAULT_SCORES)
    parser.add_argument("--budget-min", type=float, default=math.inf)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    deadline = time.time() + args.budget_min * 60
    if args.phase in ("train", "all"):
        train_phase(args, deadline)
    if args.phase in ("score", "all"):
        score_phase(args, deadline)
    if args.phase in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()
