"""The likelihood evaluator on CPU: frame t (the old way), frame logsnr (the default) and the published way.

A small UNet (ch 16, ch_mult 1-2-2, 1 res block) is trained on mnist-5k and snapshotted at increasing step
counts (the EMA weights, as a trial would be scored), giving checkpoints from barely to well trained. Every
checkpoint is scored on the same images, dequantization noise and Rademacher probes by:

  * frame t, adaptive dopri5: the evaluator before the logsnr frame, at the fast (1e-2, cpu.yaml) and
    accurate (1e-5) tolerances, and at 1e-3 and 1e-4 in between;
  * frame logsnr, fixed-step rk4 uniform in lambda: the fast default (7 steps), the accurate fidelity before
    the multistep solver (32 steps; bench/fidelity_bias.py measures that one), and 16 steps in between;
  * the published approach: `published_log_likelihood` below, written the way score_sde_pytorch's
    likelihood.py does it (scipy solve_ivp RK45 on a flattened float64 numpy state; the drift by one
    forward pass, the divergence by a second forward pass plus a backward pass), at the fast and the
    accurate tolerance.

Each is compared with a reference for the same images and probes: frame logsnr with rk4 on 128 steps. A
solve at rtol = atol = 1e-7 needs ~2,500 evaluations per checkpoint (the UNet's time embedding of 999 t
oscillates with a period of 0.006 in t, which an adaptive solver resolves at tight tolerances), too many
for six checkpoints; so on one checkpoint (--confirm-step) the bench also solves at rtol = atol = 1e-7 in
both frames and prints how far the rk4 reference is from each (on the checkpoints we tried: < 2e-4 bits/dim).

The settings of one checkpoint run back to back, so machine-load drifts hit them alike; read the times
with the load averages printed above the tables. The published baseline lives here and only here; it is
not part of the product.

    .venv/bin/python -m bench.likelihood [--steps 0 10 25 50 100 200] [--images 16] [--eps 1e-5] \
        [--reference-steps 128] [--confirm-step 100] [--threads 1] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import integrate, stats

from trials.config import EvalConfig, FidelityConfig, TrialConfig
from trials.data import load_data
from trials.likelihood import LikelihoodEvaluator, ScoreFn, bits_per_dim, log_likelihood
from trials.model import count_parameters, score_fn, unet_for
from trials.sde import SDE, make_sde
from trials.trainer import Trainer

SMALL_MODEL = {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1}
TARGET_ERROR = 0.005  # bits/dim from the reference: what "equal error" means in the table


# ---- the baseline: score_sde_pytorch's likelihood computation, transcribed ------------------------------
def published_log_likelihood(
    score: ScoreFn, sde: SDE, x: torch.Tensor, eps: float, probes: torch.Tensor, rtol: float, atol: float
) -> tuple[torch.Tensor, int]:
    """log p(x) by scipy RK45 on the flattened state [x, delta_logp], as the published reference does.

    Every function evaluation converts the numpy state to a tensor, runs the drift (one forward pass
    without a graph) and the Hutchinson divergence (a second forward pass with a graph and one backward
    pass) separately, and converts both back to numpy.
    """
    shape, batch = x.shape, x.shape[0]

    def drift_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sde.probability_flow_drift(xt, t, score(xt, t))

    def div_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            fn_probe = (sde.probability_flow_drift(xt, t, score(xt, t)) * probes).sum()
            (grad,) = torch.autograd.grad(fn_probe, xt)
        return (grad * probes).flatten(1).sum(dim=1)

    def ode_func(t: float, state: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(state[:-batch].reshape(shape)).to(x.device, torch.float32)
        vec_t = torch.full((batch,), t, device=x.device)
        drift = drift_fn(xt, vec_t).cpu().numpy().reshape(-1)
        logp_grad = div_fn(xt, vec_t).cpu().numpy().reshape(-1)
        return np.concatenate([drift, logp_grad])

    init = np.concatenate([x.cpu().numpy().reshape(-1), np.zeros(batch)])
    solution = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    end = solution.y[:, -1]
    z = torch.from_numpy(end[:-batch].reshape(shape))
    delta_logp = torch.from_numpy(end[-batch:])
    return sde.prior_logp(z) + delta_logp, int(solution.nfev)


# ---- checkpoints of different quality ---------------------------------------------------------------------
def trained_snapshots(steps: list[int], data, cache: Path | None) -> tuple[TrialConfig, dict[int, torch.nn.Module]]:
    """The EMA weights after each number of DSM steps, from one training run (or the cache of one)."""
    cfg = TrialConfig.from_dict(
        {
            "model": SMALL_MODEL,
            "train": {"batch_size": 64, "lr": 1e-3, "val_every": 10**6, "log_every": 10**6, "device": "cpu"},
        }
    )
    cached = cache / "snapshots.pt" if cache is not None else None
    if cached is not None and cached.exists():
        saved = torch.load(cached, weights_only=True)
        if saved["config"] == cfg.to_dict() and set(steps) <= set(saved["weights"]):
            snapshots = {}
            for step in steps:
                model = unet_for(cfg)
                model.load_state_dict(saved["weights"][step])
                snapshots[step] = model.eval()
            print(f"loaded {len(steps)} snapshots from {cached}", flush=True)
            return cfg, snapshots

    trainer = Trainer(cfg, data, device="cpu")
    snapshots = {}
    start = time.perf_counter()
    for step in sorted(steps):
        for _ in trainer.run(until_step=step):
            pass
        snapshots[step] = copy.deepcopy(trainer.eval_model).eval()
        print(f"trained to step {step} ({time.perf_counter() - start:.0f} s)", flush=True)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg.to_dict(), "weights": {s: m.state_dict() for s, m in snapshots.items()}}, cached)
    return cfg, snapshots


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@dataclass(frozen=True)
class Setting:
    approach: str  # "t frame", "logsnr frame", "published"
    role: str  # "fast", "accurate" or "" (a setting in between, for the equal-error comparison)
    fidelity: FidelityConfig | None  # None: the published approach at `tol`
    tol: float = 0.0

    @property
    def label(self) -> str:
        if self.fidelity is None:
            return f"scipy RK45 {self.tol:g}"
        return self.fidelity.describe().split(" ", 1)[1]


def settings(images: int) -> list[Setting]:
    def t_frame(tol):
        return FidelityConfig(n_images=images, rtol=tol, atol=tol, frame="t", method="dopri5")

    def logsnr(steps):
        return FidelityConfig(n_images=images, frame="logsnr", method="rk4", steps=steps)

    return [
        Setting("t frame", "fast", t_frame(1e-2)),
        Setting("t frame", "", t_frame(1e-3)),
        Setting("t frame", "", t_frame(1e-4)),
        Setting("t frame", "accurate", t_frame(1e-5)),
        Setting("logsnr frame", "fast", logsnr(7)),
        Setting("logsnr frame", "", logsnr(16)),
        Setting("logsnr frame", "accurate", logsnr(32)),
        Setting("published", "fast", None, 1e-2),
        Setting("published", "accurate", None, 1e-5),
    ]


def score_setting(
    setting: Setting, score: ScoreFn, sde: SDE, x: torch.Tensor, probes: torch.Tensor, eps: float, centered: bool
) -> tuple[np.ndarray, int, float]:
    """Per-image bits/dim, NFE and seconds of one setting: the evaluator itself, or the published code."""
    dims = x[0].numel()
    if setting.fidelity is None:
        (logp, nfe), seconds = timed(
            lambda: published_log_likelihood(score, sde, x, eps, probes, setting.tol, setting.tol)
        )
        return bits_per_dim(logp.double(), dims, centered).numpy(), nfe, seconds
    cfg = EvalConfig(estimator="rademacher", batch_size=len(x), fast=setting.fidelity, accurate=setting.fidelity)
    evaluator = LikelihoodEvaluator(x, probes, torch.arange(len(x)), cfg, centered)
    result = evaluator.evaluate(score, sde, eps, "accurate")
    if result.failed:
        raise RuntimeError(f"{setting.label}: {result.reason}")
    return np.array(result.per_image), result.nfe, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[0, 10, 25, 50, 100, 200],
        help="DSM steps at which to snapshot a checkpoint (at least 6 for the rank study)",
    )
    parser.add_argument("--images", type=int, default=16, help="validation images, one ODE batch")
    parser.add_argument("--eps", type=float, default=1e-5, help="lower end of the ODE (sampling_eps)")
    parser.add_argument("--reference-steps", type=int, default=128, help="rk4 steps of the logsnr reference")
    parser.add_argument(
        "--confirm-step",
        type=int,
        default=100,
        help="checkpoint also solved at rtol = atol = 1e-7 in both frames (-1: skip)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the trained snapshots in")
    args = parser.parse_args()
    if args.confirm_step not in (-1, *args.steps):
        parser.error(f"--confirm-step must be one of --steps ({args.steps}) or -1")
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    start = time.perf_counter()

    data = load_data(TrialConfig().data)
    cfg, snapshots = trained_snapshots(args.steps, data, args.cache)
    sde = make_sde(cfg.sde)
    centered = cfg.data.centered
    eps = args.eps
    template = LikelihoodEvaluator.build(
        data.val,
        EvalConfig(
            batch_size=args.images,
            fast=FidelityConfig(n_images=args.images),
            accurate=FidelityConfig(n_images=args.images),
        ),
        centered=centered,
    )
    x, probes = template.x, template.probes
    dims = x[0].numel()
    reference_setting = Setting(
        "reference", "", FidelityConfig(n_images=args.images, frame="logsnr", method="rk4", steps=args.reference_steps)
    )
    all_settings = settings(args.images)

    rows = []  # (step, reference bpd per image, {setting: (bpd per image, nfe, seconds)})
    confirmation = None
    for step in sorted(args.steps):
        score = score_fn(snapshots[step], sde)
        reference, ref_nfe, ref_seconds = score_setting(reference_setting, score, sde, x, probes, eps, centered)
        results = {}
        for setting in all_settings:
            results[setting] = score_setting(setting, score, sde, x, probes, eps, centered)
        rows.append((step, reference, results))
        print(
            f"step {step}: reference {reference.mean():.4f} ({ref_nfe} NFE, {ref_seconds:.0f} s); "
            + ", ".join(
                f"{s.approach} {s.label}: {r[0].mean() - reference.mean():+.4f} ({r[1]} NFE, {r[2]:.0f} s)"
                for s, r in results.items()
            ),
            flush=True,
        )
        if step == args.confirm_step:
            tight = {}
            for frame in ("logsnr", "t"):
                (logp, _, nfe), seconds = timed(
                    lambda: log_likelihood(score, sde, x, eps, probes=probes, rtol=1e-7, atol=1e-7, frame=frame)
                )
                tight[frame] = (bits_per_dim(logp.double(), dims, centered).numpy(), nfe, seconds)
                print(
                    f"step {step}: {frame} frame at rtol = atol = 1e-7: {tight[frame][0].mean():.5f} "
                    f"({nfe} NFE, {seconds:.0f} s)",
                    flush=True,
                )
            confirmation = (step, reference, tight)

    print()
    print(
        f"Likelihood evaluator on CPU ({args.threads} thread(s); small UNet "
        f"{count_parameters(snapshots[max(args.steps)]) / 1e6:.2f}M params; {args.images} mnist-5k validation "
        f"images in one batch, [0, 1] data, eps = {eps:g}, Rademacher probes; {os.cpu_count()} cores, 1-minute "
        f"load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        f"{(time.perf_counter() - start) / 60:.1f} min in all)"
    )
    if confirmation is not None:
        step, reference, tight = confirmation
        print()
        print(
            f"Reference (logsnr rk4, {args.reference_steps} steps) against rtol = atol = 1e-7 at checkpoint {step}: "
            + "; ".join(
                f"{frame} frame {bpd.mean():.5f} bits/dim ({nfe} NFE, {seconds:.0f} s), mean difference "
                f"{abs(bpd.mean() - reference.mean()):.5f}, largest per image {np.abs(bpd - reference).max():.5f}"
                for frame, (bpd, nfe, seconds) in tight.items()
            )
            + f"; the two frames differ by {abs(tight['t'][0].mean() - tight['logsnr'][0].mean()):.5f}."
        )
    print()
    print("Per checkpoint: NFE, seconds and |bits/dim - reference| of the mean over the images.")
    print()
    print(
        "| checkpoint (DSM steps) | reference bpd | approach | fidelity | setting | NFE | seconds | bpd | "
        "abs. error | largest per-image error |"
    )
    print("|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
    for step, reference, results in rows:
        for setting, (bpd, nfe, seconds) in results.items():
            print(
                f"| {step} | {reference.mean():.4f} | {setting.approach} | {setting.role or '-'} | {setting.label} | "
                f"{nfe} | {seconds:.1f} | {bpd.mean():.4f} | {abs(bpd.mean() - reference.mean()):.4f} | "
                f"{np.abs(bpd - reference).max():.4f} |"
            )

    def summary(setting: Setting) -> dict:
        per = [r[2][setting] for r in rows]
        errors = [abs(p[0].mean() - r[1].mean()) for p, r in zip(per, rows)]
        return {
            "nfe": float(np.mean([p[1] for p in per])),
            "seconds": sum(p[2] for p in per),
            "max_error": max(errors),
            "means": [p[0].mean() for p in per],
        }

    sums = {s: summary(s) for s in all_settings}
    accurate = {s.approach: s for s in all_settings if s.role == "accurate"}
    print()
    print(
        f"Over the {len(rows)} checkpoints (Spearman: rank agreement of the checkpoints' mean bits/dim with the "
        f"same approach's accurate setting):"
    )
    print()
    print(
        "| approach | fidelity | setting | mean NFE | seconds, all checkpoints | largest abs. error | "
        f"within {TARGET_ERROR:g} | Spearman with accurate |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|")
    for setting, sm in sums.items():
        rho = stats.spearmanr(sm["means"], sums[accurate[setting.approach]]["means"]).statistic
        print(
            f"| {setting.approach} | {setting.role or '-'} | {setting.label} | {sm['nfe']:.0f} | {sm['seconds']:.1f} | "
            f"{sm['max_error']:.4f} | {'yes' if sm['max_error'] <= TARGET_ERROR else 'no'} | {rho:.3f} |"
        )

    def cheapest_within_target(approach: str):
        ok = [
            (sums[s]["nfe"], s) for s in all_settings if s.approach == approach and sums[s]["max_error"] <= TARGET_ERROR
        ]
        return min(ok, key=lambda pair: pair[0]) if ok else None

    print()
    old, new = cheapest_within_target("t frame"), cheapest_within_target("logsnr frame")
    if old and new:
        print(
            f"Equal error (every checkpoint within {TARGET_ERROR:g} bits/dim of the reference): t frame needs "
            f"{old[0]:.0f} NFE ({old[1].label}), logsnr frame {new[0]:.0f} NFE ({new[1].label}): "
            f"{new[0] / old[0]:.2f} of it."
        )
    published, ours = sums[accurate["published"]], sums[accurate["logsnr frame"]]
    print(
        f"Accurate fidelity: logsnr frame {ours['seconds']:.1f} s against the published approach's "
        f"{published['seconds']:.1f} s over the checkpoints: {published['seconds'] / ours['seconds']:.1f}x faster "
        f"(t frame: {published['seconds'] / sums[accurate['t frame']]['seconds']:.1f}x)."
    )


if __name__ == "__main__":
    main()
