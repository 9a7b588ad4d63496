"""The full run: train the tuner's best config to its full length, then measure it on held-out images.

`python train.py --config runs/<name>/best_config.yaml` is this module wired to a command line and to MLflow
(tuner/mlflow_runs.py logs what `finish` wrote); here is only PyTorch and files. Three steps, each a function:

  prepare       the config with its command-line overrides, the data, the test-set evaluator and the trainer,
                and whether <out>/checkpoint.pt continues this run. It writes nothing, so a bad config, a
                missing data folder or a checkpoint of another config fails before any file appears.
  run_training  trains to train.steps with an atomic checkpoint every `checkpoint_every` steps and at the
                end, printing a progress line at every logged step. A stop request (Ctrl-C) is honoured at
                the next logged step, where the trainer's state is consistent, and leaves a checkpoint there;
                the next `prepare` finds it and training continues with the same step, weights, EMA,
                optimiser and RNG.
  finish        test bits/dim at accurate fidelity, PC and ODE sample grids, and metrics.json.

Outputs in the run folder: checkpoint.pt, config.yaml (the config used, with the tuner's provenance),
metrics.json, samples_pc.png, samples_ode.png.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from trials.cli import UserError, first_line
from trials.config import ConfigError, EvalConfig, TrialConfig
from trials.data import MnistData, load_data
from trials.likelihood import LikelihoodEvaluator
from trials.files import atomic_write_text
from trials.odesolve import ODEFailure
from trials.progress import Progress
from trials.sampling import SAMPLERS, save_grid
from trials.trainer import Trainer, load_checkpoint, resolve_device

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
PC_GRID = "samples_pc.png"
ODE_GRID = "samples_ode.png"

# Fields that may change between an interrupted run and its continuation: a longer (or shorter) run is
# the same run up to the step it has reached. Anything else would silently mix two configs in one model.
RESUMABLE_CHANGES = ("train.steps",)

Log = Callable[[str], None]
PROGRESS_EVERY_S = 10.0  # sampling progress lines, at most this often


class ResumeError(UserError, ValueError):
    """An existing checkpoint cannot continue this run; the message is one line saying what to do."""


class TrainingDiverged(RuntimeError):
    """The training loss or the validation loss became NaN or inf."""


# ---- prepare ----------------------------------------------------------------------------------------------
@dataclass
class FullRunPlan:
    """Everything a full run needs, checked; nothing written yet."""

    cfg: TrialConfig
    provenance: dict[str, Any]  # the tuner's record of where the config came from ({} for a hand-written one)
    config_path: Path
    out_dir: Path
    data: MnistData
    trainer: Trainer
    evaluator: LikelihoodEvaluator  # test bits/dim: the official test set, or mnist-5k's held-out split
    resume: dict[str, Any] | None  # the checkpoint to continue from, None for a fresh start

    @property
    def test_split(self) -> str:
        return "val" if self.data.test_is_val else "test"

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE


def with_overrides(cfg: TrialConfig, *, steps: int | None = None, data: str | None = None,
                   data_root: str | None = None, download: bool = False) -> TrialConfig:
    """The config with the command line's settings laid over it, validated again (ConfigError)."""
    tree = cfg.to_dict()
    if steps is not None:
        tree["train"]["steps"] = steps
    if data is not None:
        tree["data"]["name"] = data
    if data_root is not None:
        tree["data"]["root"] = data_root
    if download:
        tree["data"]["download"] = True
    return TrialConfig.from_dict(tree)


def config_differences(saved: TrialConfig, wanted: TrialConfig, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """'field: <saved> in the checkpoint, <wanted> now' for every field that differs, apart from `ignore`."""
    old, new = saved.flat(), wanted.flat()
    return [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(old.keys() | new.keys())
            if k not in ignore and old.get(k) != new.get(k)]


def read_resume_state(path: Path, cfg: TrialConfig) -> dict[str, Any] | None:
    """The checkpoint at `path` when there is one that `cfg` continues; None when there is none.

    Raises ResumeError when it is unreadable, was written for another config (anything but the step
    count differs), or is already past the steps asked for.
    """
    if not path.exists():
        return None
    fix = "delete it or choose another --out"
    try:
        state = load_checkpoint(path)
        saved = TrialConfig.from_dict(state["config"])
        step = int(state["step"])
    except ConfigError as exc:
        raise ResumeError(f"{path}: the checkpoint's config is not valid here ({exc}); {fix}") from None
    except Exception as exc:  # unpickling or a missing key: either way not a checkpoint this code wrote
        raise ResumeError(f"{path}: not a readable full-run checkpoint ({first_line(exc)}); {fix}") from None
    diffs = config_differences(saved, cfg)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ResumeError(f"{path} was written for a different config ({diffs[0]}{more}); only the step count "
                          f"may change when a run continues: {fix}")
    if step > cfg.train.steps:
        raise ResumeError(f"{path} is already at step {step}, past the {cfg.train.steps} steps asked for: "
                          f"use --steps {step} or more, or {fix}")
    return state


def held_out_eval_config(cfg: TrialConfig, available: int, n_images: int | None = None) -> EvalConfig:
    """cfg.eval with accurate.n_images set to `n_images` (default: as configured), capped at the split size."""
    n = min(n_images or cfg.eval.accurate.n_images, available)
    accurate = dataclasses.replace(cfg.eval.accurate, n_images=n)
    fast = dataclasses.replace(cfg.eval.fast, n_images=min(cfg.eval.fast.n_images, n))  # only `accurate` is used
    return dataclasses.replace(cfg.eval, accurate=accurate, fast=fast)


def prepare(cfg: TrialConfig, provenance: dict[str, Any], config_path: Path, out_dir: Path, *,
            test_images: int | None = None) -> FullRunPlan:
    """Check everything that can be checked before training; raises ConfigError, DataError or ResumeError."""
    try:
        resolve_device(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    resume = read_resume_state(out_dir / CHECKPOINT_FILE, cfg)  # before loading data: the cheaper check first
    data = load_data(cfg.data)
    evaluator = LikelihoodEvaluator.build(data.test, held_out_eval_config(cfg, len(data.test), test_images),
                                          cfg.data.centered)
    trainer = Trainer(cfg, data)
    return FullRunPlan(cfg, dict(provenance), config_path, out_dir, data, trainer, evaluator, resume)


def describe(plan: FullRunPlan) -> list[str]:
    """The lines a full run starts with: where the config came from, the data, the model, the schedule."""
    prov, cfg = plan.provenance, plan.cfg
    origin = (f"trial {prov['trial_id']} of tuning experiment '{prov.get('experiment', '?')}'" if prov.get("trial_id")
              else "a hand-written config")
    n_test = plan.evaluator.cfg.accurate.n_images
    split = ("the held-out split (mnist-5k has no separate test set)" if plan.data.test_is_val
             else "the official test set")
    params = sum(t.numel() for t in plan.trainer.model.parameters())
    return [
        f"Full run of {origin}: {plan.config_path}",
        f"Data: {plan.data.name}, {len(plan.data.train):,} training images; test bits/dim on {split}, "
        f"{n_test:,} of {len(plan.data.test):,} images",
        f"Model: {params:,} parameters on {plan.trainer.device}, {plan.trainer.precision} training; "
        f"{cfg.train.steps:,} steps of batch {cfg.train.batch_size}; output in {plan.out_dir}",
    ]


def write_config(plan: FullRunPlan) -> Path:
    """The config this run uses (after command-line overrides), with the tuner's provenance beside it."""
    tree = plan.cfg.to_dict()
    if plan.provenance:
        tree["provenance"] = plan.provenance
    header = f"# Config of the full run in this folder (from {plan.config_path}).\n"
    path = plan.out_dir / CONFIG_FILE
    atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=False))
    return path


# ---- train ------------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    step: int
    completed: bool  # False when a stop request ended training early
    seconds: float  # training wall time over every session of this run
    history: list[dict[str, Any]] = field(default_factory=list)  # the trainer's log records, every session
    resumed_from: int | None = None  # the step this session started at, when it continued a checkpoint


def run_training(plan: FullRunPlan, *, checkpoint_every: int, stop_requested: Callable[[], bool] = lambda: False,
          log: Log = print) -> TrainOutcome:
    """Train to cfg.train.steps, resuming from plan.resume; raises TrainingDiverged on a NaN/inf loss.

    `stop_requested` is polled at every logged step (every train.log_every steps, and at validations and
    checkpoints): the only points where the trainer's generator hands back control with its state whole.
    """
    trainer, total = plan.trainer, plan.cfg.train.steps
    seconds_before, history, resumed_from = 0.0, [], None
    if plan.resume is not None:
        trainer.load_state_dict(plan.resume)
        saved = plan.resume.get("full_run") or {}
        seconds_before, history = float(saved.get("seconds", 0.0)), list(saved.get("history", []))
        resumed_from = trainer.step
        done = " (training already complete)" if trainer.step >= total else ""
        log(f"Resumed from {plan.checkpoint_path} at step {trainer.step}{done}")
    start, start_step = time.perf_counter(), trainer.step
    width = len(str(total))

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    while trainer.step < total:
        # Each chunk ends on a checkpoint step; Trainer.run also validates there, so every checkpoint
        # comes with a val DSM loss in the log.
        boundary = min(total, (trainer.step // checkpoint_every + 1) * checkpoint_every)
        for record in trainer.run(until_step=boundary):
            if record["diverged"]:
                raise TrainingDiverged(record["reason"])
            history.append(record)
            session_seconds = time.perf_counter() - start
            eta = (total - trainer.step) * session_seconds / max(trainer.step - start_step, 1)
            log(progress_line(record, total, width, eta))
            if stop_requested():
                break
        # The run's clock and loss curve travel with the trainer state, so metrics.json sees every session.
        trainer.save_checkpoint(plan.checkpoint_path, full_run={"seconds": elapsed(), "history": history})
        if stop_requested() and trainer.step < total:
            log(f"Stopped at step {trainer.step}; checkpoint saved to {plan.checkpoint_path}")
            return TrainOutcome(trainer.step, False, elapsed(), history, resumed_from)
    return TrainOutcome(trainer.step, True, elapsed(), history, resumed_from)


def progress_line(record: dict[str, Any], total: int, width: int, eta_seconds: float) -> str:
    step = record["step"]
    val = f"  val_dsm {record['val_dsm']:.4g}" if "val_dsm" in record else ""
    return (f"step {step:>{width}}/{total} ({100 * step / total:5.1f}%)  loss {record['train_loss']:.4g}{val}"
            f"  {record['images_per_sec']:.0f} img/s  ETA {format_seconds(eta_seconds)}")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- finish: measure and write ------------------------------------------------------------------------------
def finish(plan: FullRunPlan, outcome: TrainOutcome, log: Log = print) -> dict[str, Any]:
    """Test bits/dim, both sample grids and metrics.json for a completed training; returns the metrics."""
    trainer, cfg = plan.trainer, plan.cfg
    fid = plan.evaluator.cfg.accurate
    log(f"Test bits/dim on the {plan.test_split} split: {fid.n_images} images, {fid.describe()} ...")
    with trainer.evaluating() as score:
        scoring = Progress("  Test bits/dim", fid.n_images)

        def report_scoring(done: int, total: int) -> None:
            if done < total:  # the result line follows the last chunk
                log(scoring.line(done, "images"))

        bpd = plan.evaluator.evaluate(score, trainer.sde, cfg.sde.sampling_eps, "accurate", device=trainer.device,
                                      progress=report_scoring)
        log(f"  {bpd.mean:.4f} ± {bpd.stderr:.4f} bits/dim, NFE {bpd.nfe}, {bpd.seconds:.1f} s"
            if not bpd.failed else f"  failed: {bpd.reason}")
        if bpd.flagged and not bpd.failed:
            log(f"  warning: {bpd.reason}")
        pc = draw_samples(trainer, score, "pc", plan.out_dir / PC_GRID, log)
        log(f"PC samples: {pc['n_images']} images, {pc['nfe']} score evaluations, {pc['seconds']:.1f} s -> {pc['file']}")
        ode = draw_samples(trainer, score, "ode", plan.out_dir / ODE_GRID, log)
        log(f"ODE samples: {ode['n_images']} images, NFE {ode['nfe']}, {ode['seconds']:.1f} s -> {ode['file']}"
            if not ode["failed"] else f"ODE samples failed: {ode['reason']}")
    val_dsm = trainer.val_dsm()

    last_loss = next((r["train_loss"] for r in reversed(outcome.history) if "train_loss" in r), None)
    test_bpd = {"split": plan.test_split, **bpd.to_dict()}
    metrics = {
        "config_file": str(plan.config_path),
        "provenance": plan.provenance,
        "device": str(trainer.device),
        "data": {"name": plan.data.name, "train_images": len(plan.data.train), "val_images": len(plan.data.val),
                 "test_split": plan.test_split, "test_split_images": len(plan.data.test)},
        "train": {"steps": outcome.step, "precision": trainer.precision, "final_train_loss": last_loss, "val_dsm": val_dsm,
                  "val_dsm_images": min(cfg.train.val_images, len(plan.data.val)),
                  "seconds": outcome.seconds, "resumed_from_step": outcome.resumed_from,
                  "parameters": sum(p.numel() for p in trainer.model.parameters())},
        "test_bpd": test_bpd,
        "samples": {"pc": pc, "ode": ode},
        "history": outcome.history,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(plan.out_dir / METRICS_FILE, json.dumps(_json_safe(metrics), indent=2) + "\n")
    return metrics


def draw_samples(trainer: Trainer, score, sampler: str, path: Path, log: Log = print) -> dict[str, Any]:
    """A grid from one of trials.sampling.SAMPLERS, with its settings, cost and progress lines.

    An ODE the solver cannot finish is recorded, not raised, so the run keeps its other results (an ODE
    that cannot be solved is itself a finding about the model).
    """
    cfg, sc = trainer.cfg, trainer.cfg.sample
    chosen = SAMPLERS[sampler]
    settings = {"file": path.name, "n_images": sc.n_images, **chosen.settings(sc), "eps": cfg.sde.sampling_eps,
                "seed": sc.seed}
    generator = torch.Generator(device=trainer.device).manual_seed(sc.seed)
    start = time.perf_counter()
    try:
        samples = chosen.draw(score, trainer.sde, cfg.dataset.batch_shape(sc.n_images), eps=cfg.sde.sampling_eps,
                              sample=sc, generator=generator, device=trainer.device, report=log,
                              every=PROGRESS_EVERY_S)
    except ODEFailure as exc:
        return {**settings, "file": None, "nfe": None, "seconds": time.perf_counter() - start, "failed": True,
                "reason": str(exc)}
    seconds = time.perf_counter() - start
    save_grid(samples.x, path, cfg.data.centered)
    return {**settings, "nfe": samples.nfe, "seconds": seconds, "finite": bool(torch.isfinite(samples.x).all()),
            "failed": False, "reason": None}


def output_files(plan: FullRunPlan, metrics: dict[str, Any]) -> list[Path]:
    """The files a finished run leaves for the record: metrics.json, config.yaml and the sample grids drawn."""
    files = [plan.out_dir / METRICS_FILE, plan.out_dir / CONFIG_FILE]
    return files + [plan.out_dir / s["file"] for s in metrics["samples"].values() if s.get("file")]


def _json_safe(value: Any) -> Any:
    """NaN and inf to null: metrics.json stays standard JSON (a failed score says so in `failed`)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
