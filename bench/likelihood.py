"""The likelihood evaluator on CPU: against the published way of computing it, and fast against accurate.

A small UNet (ch 16, ch_mult 1-2-2, 1 res block) is trained on mnist-5k and snapshotted at increasing step
counts (the EMA weights, as a trial would be scored), giving checkpoints of different quality. Then:

  1. Reference comparison, on the last checkpoint and one batch: `trials.likelihood.log_likelihood`
     against `reference_log_likelihood` below, written the way score_sde_pytorch's likelihood.py does it
     (scipy solve_ivp RK45 on a flattened float64 numpy state; the drift evaluated by one forward pass and
     the divergence by a second forward pass plus a backward pass), at the same tolerances (the fast and
     the accurate one), on the same dequantized images with the same Rademacher probes: BPD agreement,
     NFE and wall time. The two solvers' error norms differ (see `log_likelihood`), so the NFE can too.
  2. Fast against accurate: every checkpoint scored by one `LikelihoodEvaluator` at both fidelities:
     NFE, time, the BPD difference on the images both score, and the Spearman rank correlation of the
     checkpoints' mean BPDs.

Each setting is timed once on a shared machine: read the times with the load average printed above the
tables. The reference baseline lives here and only here; it is not part of the product.

    .venv/bin/python -m bench.likelihood [--steps 0 10 25 50 100 200] [--fast-images 8] \
        [--accurate-images 16] [--compare-images 16] [--compare-tol 1e-3 1e-5] [--sizing-images 0] \
        [--threads 1] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import integrate, stats

from trials.config import EvalConfig, FidelityConfig, TrialConfig
from trials.data import load_data
from trials.likelihood import LikelihoodEvaluator, ScoreFn, bits_per_dim, log_likelihood
from trials.model import UNet, count_parameters, score_fn
from trials.sde import VPSDE
from trials.train import Trainer

SMALL_MODEL = {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1}
FAST_TOL = 1e-3
ACCURATE_TOL = 1e-5


# ---- the baseline: score_sde_pytorch's likelihood computation, transcribed ------------------------------
def reference_log_likelihood(score: ScoreFn, sde: VPSDE, x: torch.Tensor, eps: float, probes: torch.Tensor,
                             rtol: float, atol: float) -> tuple[torch.Tensor, int]:
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
    cfg = TrialConfig.from_dict({
        "model": SMALL_MODEL,
        "train": {"batch_size": 64, "lr": 1e-3, "val_every": 10**6, "log_every": 10**6, "device": "cpu"},
    })
    cached = cache / "snapshots.pt" if cache is not None else None
    if cached is not None and cached.exists():
        saved = torch.load(cached, weights_only=True)
        if saved["config"] == cfg.to_dict() and set(steps) <= set(saved["weights"]):
            snapshots = {}
            for step in steps:
                model = UNet(cfg.model)
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


def compare_with_reference(score: ScoreFn, sde: VPSDE, x: torch.Tensor, probes: torch.Tensor, eps: float,
                           tol: float, centered: bool) -> dict:
    dims = x[0].numel()
    (ours, seconds_ours) = timed(lambda: log_likelihood(score, sde, x, eps, probes=probes, rtol=tol, atol=tol))
    (reference, seconds_ref) = timed(lambda: reference_log_likelihood(score, sde, x, eps, probes, tol, tol))
    bpd_ours = bits_per_dim(ours[0].double(), dims, centered)
    bpd_ref = bits_per_dim(reference[0].double(), dims, centered)
    print(f"reference comparison at {tol:g} done ({seconds_ours:.0f} s + {seconds_ref:.0f} s)", flush=True)
    return {"tol": tol, "nfe_ours": ours[2], "nfe_ref": reference[1], "s_ours": seconds_ours, "s_ref": seconds_ref,
            "bpd_ours": bpd_ours.mean().item(), "bpd_ref": bpd_ref.mean().item(),
            "max_diff": (bpd_ours - bpd_ref).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 25, 50, 100, 200],
                        help="DSM steps at which to snapshot a checkpoint (at least 6 for the rank study)")
    parser.add_argument("--fast-images", type=int, default=8, help="images scored at the fast fidelity")
    parser.add_argument("--accurate-images", type=int, default=16, help="images scored at the accurate fidelity")
    parser.add_argument("--compare-images", type=int, default=16, help="batch for the reference comparison")
    parser.add_argument("--compare-tol", type=float, nargs="+", default=[FAST_TOL, ACCURATE_TOL],
                        help="rtol = atol values of the reference comparison")
    parser.add_argument("--sizing-images", type=int, default=0,
                        help="also time one fast and one accurate evaluation of this many images (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the trained snapshots in")
    args = parser.parse_args()
    if args.fast_images > args.accurate_images:
        parser.error("--fast-images must not exceed --accurate-images (fast scores a prefix of the same images)")
    if args.compare_images > args.accurate_images:
        parser.error("--compare-images must not exceed --accurate-images (it compares on a prefix of them)")
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]

    data = load_data(TrialConfig().data)
    cfg, snapshots = trained_snapshots(args.steps, data, args.cache)
    sde = VPSDE(cfg.sde.beta_min, cfg.sde.beta_max, cfg.sde.T)
    eps = cfg.sde.sampling_eps
    centered = cfg.data.centered
    eval_cfg = EvalConfig(estimator="rademacher", seed=0, batch_size=args.accurate_images,
                          fast=FidelityConfig(n_images=args.fast_images, rtol=FAST_TOL, atol=FAST_TOL),
                          accurate=FidelityConfig(n_images=args.accurate_images, rtol=ACCURATE_TOL,
                                                  atol=ACCURATE_TOL))
    evaluator = LikelihoodEvaluator.build(data.val, eval_cfg, centered=centered)

    # 1. Against the reference, on the best checkpoint.
    last = max(args.steps)
    best = score_fn(snapshots[last], sde)
    x, probes = evaluator.x[:args.compare_images], evaluator.probes[:args.compare_images]
    comparisons = [compare_with_reference(best, sde, x, probes, eps, tol, centered) for tol in args.compare_tol]

    # 2. Fast against accurate, on every checkpoint.
    rows = []
    for step in sorted(args.steps):
        score = score_fn(snapshots[step], sde)
        fast = evaluator.evaluate(score, sde, eps, "fast")
        accurate = evaluator.evaluate(score, sde, eps, "accurate")
        same_images = float(np.mean(accurate.per_image[:args.fast_images]))
        rows.append((step, fast, accurate, fast.mean - same_images))
        print(f"step {step}: fast {fast.mean:.3f} ({fast.nfe} NFE, {fast.seconds:.0f} s), "
              f"accurate {accurate.mean:.3f} ({accurate.nfe} NFE, {accurate.seconds:.0f} s)", flush=True)

    # 3. Optionally, what one evaluation of a tuning-sized subset costs (EvalConfig's default tolerances).
    sizing = []
    if args.sizing_images > 0:
        default = EvalConfig()
        sizing_cfg = EvalConfig(batch_size=args.sizing_images,
                                fast=dataclasses.replace(default.fast, n_images=args.sizing_images),
                                accurate=dataclasses.replace(default.accurate, n_images=args.sizing_images))
        sizing_evaluator = LikelihoodEvaluator.build(data.val, sizing_cfg, centered=centered)
        for fidelity in ("fast", "accurate"):
            sizing.append(sizing_evaluator.evaluate(best, sde, eps, fidelity))
            print(f"sizing {fidelity}: {sizing[-1].nfe} NFE, {sizing[-1].seconds:.0f} s", flush=True)

    print()
    print(f"Likelihood evaluator on CPU ({args.threads} thread(s); small UNet "
          f"{count_parameters(snapshots[last]) / 1e6:.2f}M params; mnist-5k validation, [0, 1] data, "
          f"eps = {eps:g}; {os.cpu_count()} cores, 1-minute load average {load_at_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end)")
    print()
    print(f"Against the reference (checkpoint at step {last}, {args.compare_images} images, same dequantization "
          f"and Rademacher probes; reference = scipy RK45 on a numpy state with drift and divergence evaluated "
          f"separately; ours = torchdiffeq dopri5 with one forward pass per NFE):")
    print()
    print("| rtol = atol | reference NFE | ours NFE | reference s | ours s | speed-up | per-NFE speed-up | "
          "reference BPD | ours BPD | largest per-image difference |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in comparisons:
        per_nfe = (c["s_ref"] / c["nfe_ref"]) / (c["s_ours"] / c["nfe_ours"])
        print(f"| {c['tol']:g} | {c['nfe_ref']} | {c['nfe_ours']} | {c['s_ref']:.1f} | {c['s_ours']:.1f} | "
              f"{c['s_ref'] / c['s_ours']:.2f}x | {per_nfe:.2f}x | {c['bpd_ref']:.4f} | {c['bpd_ours']:.4f} | "
              f"{c['max_diff']:.4f} |")
    print()
    print(f"Fast (first {args.fast_images} images, rtol = atol = {FAST_TOL:g}) against accurate "
          f"({args.accurate_images} images, rtol = atol = {ACCURATE_TOL:g}), one evaluator, same noise and probes:")
    print()
    print("| checkpoint (DSM steps) | fast BPD | fast NFE | fast s | accurate BPD | accurate NFE | accurate s | "
          "fast - accurate, same images |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step, fast, accurate, diff in rows:
        print(f"| {step} | {fast.mean:.3f} ± {fast.stderr:.3f} | {fast.nfe} | {fast.seconds:.1f} | "
              f"{accurate.mean:.3f} ± {accurate.stderr:.3f} | {accurate.nfe} | {accurate.seconds:.1f} | {diff:+.4f} |")
    rho = stats.spearmanr([r[1].mean for r in rows], [r[2].mean for r in rows]).statistic
    time_ratio = sum(r[2].seconds for r in rows) / sum(r[1].seconds for r in rows)
    nfe_ratio = sum(r[2].nfe for r in rows) / sum(r[1].nfe for r in rows)
    largest_diff = max(abs(r[3]) for r in rows)
    print()
    print(f"Spearman rank correlation fast vs accurate over {len(rows)} checkpoints: {rho:.3f}. Accurate costs "
          f"{time_ratio:.1f}x the time and {nfe_ratio:.1f}x the NFE of fast; largest |fast - accurate| on the same "
          f"images: {largest_diff:.4f} bits/dim.")
    if sizing:
        print()
        print(f"One evaluation of {args.sizing_images} images in one batch, checkpoint at step {last}, EvalConfig's "
              f"default tolerances:")
        print()
        print("| fidelity | rtol = atol | NFE | seconds | BPD |")
        print("|---|---:|---:|---:|---:|")
        for result in sizing:
            print(f"| {result.fidelity['name']} | {result.fidelity['rtol']:g} | {result.nfe} | {result.seconds:.1f} | "
                  f"{result.mean:.3f} ± {result.stderr:.3f} |")


if __name__ == "__main__":
    main()
