"""The one adapter between a trial and Ray Tune.

`run_trial` is the function Tune runs for each sampled config: it builds the trial's `TrialConfig`, trains
with `Trainer`, and at every rung (each `train.val_every` steps) scores the EMA model with the shared
likelihood evaluator at fast fidelity and calls `tune.report` with the metrics and a checkpoint. Everything
else in trials/ is plain PyTorch; this is the only module that imports Ray.

The driver never builds a model, so what it needs from one runs here, as Ray tasks:
  `rescore_checkpoint`   the best trials after the search: the same evaluator at accurate fidelity on a
                         trial's last checkpoint;
  `sample_checkpoint`    the winner's sample grid for the experiment report (trials.preview);
  `time_training_steps`  a couple of training steps of a config, timed: how the driver estimates what a
                         GPU-sized space would cost on a cluster without GPUs.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import ray
import torch
from ray import tune

from trials.config import TrialConfig
from trials.data import DatasetSplits
from trials.layout import CHECKPOINT_FILE
from trials.likelihood import BPDResult, LikelihoodEvaluator
from trials.model import score_fn
from trials.preview import draw_grid
from trials.sde import make_sde
from trials.trainer import Trainer, eval_model_from_checkpoint, load_checkpoint, trial_device


class TrialSpace(Protocol):
    """What the driver hands in to turn sampled hyperparameters into a complete config."""

    def trial_config(self, params: dict[str, Any]) -> TrialConfig: ...


def run_trial(
    params: dict[str, Any], *, space: TrialSpace, data: DatasetSplits, evaluator: LikelihoodEvaluator, threads: int = 1
) -> None:
    cfg = space.trial_config(params)
    if cfg.train.num_threads == 0:
        # As many torch threads as CPUs the trial owns: torch's default (every core) would make concurrent
        # trials fight over them. Kept out of the config, so the exported config runs anywhere.
        torch.set_num_threads(threads)
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device, note = trial_device(cfg.train.device, gpu_ids)
    if note:
        print(note, flush=True)
    trainer = Trainer(cfg, data, device=device)
    placement = _placement(trainer.device, gpu_ids)
    seconds_before = 0.0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a resumed experiment
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        trainer.load_state_dict(state)
        seconds_before = float(state.get("seconds", 0.0))

    start = time.perf_counter()
    for record in trainer.run():
        if record["diverged"]:
            # inf, not a large number: no searcher or table can mistake it for a real score.
            tune.report(
                {
                    "step": record["step"],
                    "val_bpd": math.inf,
                    "diverged": True,
                    "reason": record["reason"],
                    "seconds": seconds_before + time.perf_counter() - start,
                }
            )
            return
        if "val_dsm" not in record:
            continue
        with trainer.evaluating() as score:
            bpd = evaluator.evaluate(score, trainer.sde, cfg.sde.sampling_eps, "fast", device=trainer.device)
        metrics = {
            "step": record["step"],
            "train_loss": record["train_loss"],
            "val_dsm": record["val_dsm"],
            "val_bpd": bpd.mean,
            "val_bpd_stderr": bpd.stderr,
            "nfe": bpd.nfe,
            "eval_seconds": bpd.seconds,
            "images_per_sec": record["images_per_sec"],
            "precision": record["precision"],  # what train.precision resolved to on this device
            "seconds": seconds_before + time.perf_counter() - start,
            "diverged": False,
            "bpd_failed": bpd.failed,
            "reason": bpd.reason or "",
            **placement,
        }
        if trainer.device.type == "cuda":
            metrics["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(Path(folder) / CHECKPOINT_FILE, seconds=metrics["seconds"])
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _placement(device: torch.device, gpu_ids: list[str]) -> dict[str, Any]:
    """Where the trial runs, in every report: what Ray assigned it and what torch could use of that, so a
    GPU cluster's packing (several trials on one GPU) and a trial that fell back to the CPU both show."""
    out = {
        "device": str(device),
        "gpu_ids": ",".join(gpu_ids),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "cuda_available": torch.cuda.is_available(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "started_at": time.time(),
    }
    if device.type == "cuda":
        out.update(
            gpu_name=torch.cuda.get_device_name(device),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return out


def rescore_checkpoint(
    checkpoint_dir: str, evaluator: LikelihoodEvaluator, device: str = "auto", threads: int = 1
) -> dict[str, Any]:
    """Accurate-fidelity val bits/dim of a trial's checkpoint (its EMA weights), as a plain dict."""
    torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE)
    cfg, model = eval_model_from_checkpoint(ckpt, device)
    sde = make_sde(cfg.sde)
    result: BPDResult = evaluator.evaluate(score_fn(model, sde), sde, cfg.sde.sampling_eps, "accurate", device=device)
    return {**result.to_dict(), "step": int(ckpt["step"])}


def sample_checkpoint(checkpoint_dir: str, *, threads: int = 1, **settings: Any) -> dict[str, Any]:
    """`trials.preview.draw_grid` on a trial's checkpoint; the PNG comes back as bytes under "png", so the
    driver can write it wherever the report lives, whichever node the task ran on."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "samples.png"
        info = draw_grid(checkpoint_dir, out, threads=threads, report=lambda line: print(line, flush=True), **settings)
        info["png"] = out.read_bytes()
    info.pop("out")
    return info


def time_training_steps(cfg: TrialConfig, data: DatasetSplits, *, steps: int = 2, threads: int = 1) -> dict[str, Any]:
    """Seconds per training step of `cfg` on this worker: the mean of `steps` steps after one untimed warm-up
    step (which pays for allocations and kernel selection). Validation is kept out of the timing."""
    torch.set_num_threads(threads)
    # A record after every step, and the run's end (where validation would happen) never reached.
    cfg = replace(cfg, train=replace(cfg.train, steps=steps + 2, val_every=steps + 2, log_every=1))
    trainer = Trainer(cfg, data)
    records = trainer.run()
    next(records)  # warm-up
    per_step = [cfg.train.batch_size / next(records)["images_per_sec"] for _ in range(steps)]
    records.close()
    return {
        "seconds_per_step": sum(per_step) / steps,
        "steps": steps,
        "threads": threads,
        "device": str(trainer.device),
    }
