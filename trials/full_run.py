"""The full run: train the tuner's best config to its full length, then measure it on held-out images.

`python train.py --config runs/<name>/best_config.yaml` is this module wired to a command line and to MLflow
(tuner/mlflow_runs.py); here is only PyTorch and files. Whoever follows the run as it goes (train.py: MLflow)
hands `run_training` a `Watcher`. Three steps, each a function:

  prepare       the config with its command-line overrides, the data, the test-set evaluator and the trainer,
                and whether <out>/checkpoint.pt continues this run. It writes nothing, so a bad config, a
                missing data folder or a checkpoint of another config fails before any file appears.
  run_training  trains to train.steps with an atomic checkpoint every `checkpoint_every` steps and at the
                end, printing a progress line at every logged step. The training log: the training loss at
                every logged step, val DSM at every validation, and val bits/dim at fast fidelity with the
                tuning experiment's own evaluator (its images and probes) every score_interval steps (TrialConfig),
                at the tuning trial's last step (where the full run's weights are the trial's, so the two
                curves meet) and at the end; grids every sample.every steps when asked. A stop request
                (Ctrl-C) is honoured at the next logged step, where the trainer's state is consistent, and
                leaves a checkpoint there; the next `prepare` finds it and training continues with the same
                step, weights, EMA, optimiser and RNG.
  finish        test bits/dim at accurate fidelity, a grid from every sampler of IMAGE_SAMPLERS, metrics.json.

Outputs in the run folder: checkpoint.pt, config.yaml (the config used, with the tuner's provenance),
metrics.json, samples_<sampler>.png (samples_pc.png, samples_ode.png), samples/step_<step>_<sampler>.png.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trials.cli import UserError, first_line
from trials.config import ConfigError, EvalConfig, TrialConfig
from trials.data import DatasetSplits, load_data
from trials.files import atomic_write_text
from trials.likelihood import LikelihoodEvaluator
from trials.odesolve import ODEFailure
from trials.progress import Progress, duration
from trials.sampling import IMAGE_SAMPLERS, save_grid
from trials.trainer import Trainer, load_checkpoint, resolve_device

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SAMPLES_DIR = "samples"  # the grids drawn during training


def grid_file(sampler: str) -> str:
    """The end-of-run grid of one sampler of trials.sampling.IMAGE_SAMPLERS: samples_pc.png, samples_ode.png."""
    return f"samples_{sampler}.png"


# Fields that may change between an interrupted run and its continuation: a longer (or shorter) run is
# the same run up to the step it has reached, and what is scored or drawn along the way never touches the
# weights. Anything else would silently mix two configs in one model.
RESUMABLE_CHANGES = ("train.steps", "train.score_every", "sample.every", "sample.sampler", "sample.every_images")

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
    data: DatasetSplits
    trainer: Trainer
    evaluator: LikelihoodEvaluator  # test bits/dim: the official test set, or mnist-5k's held-out split
    # val bits/dim during training: built as the tuning driver builds it (validation split, cfg.eval), so the
    # same images, dequantization noise and probes as every rung of the tuning experiment
    val_evaluator: LikelihoodEvaluator
    resume: dict[str, Any] | None  # the checkpoint to continue from, None for a fresh start

    @property
    def trial_steps(self) -> int | None:
        """The tuning trial's length (its last rung), when the provenance says and the run goes past it."""
        steps = self.provenance.get("steps_trained")
        return int(steps) if isinstance(steps, int) and 0 < steps < self.cfg.train.steps else None

    def scores_at(self, step: int) -> bool:
        """Whether val bits/dim is scored at this step: every score_interval steps (TrialConfig), at the trial's last
        step and at the end."""
        return step == self.cfg.train.steps or step == self.trial_steps or step % self.cfg.score_interval == 0

    def next_stop(self, step: int, checkpoint_every: int) -> int:
        """The next step after `step` where training hands back control with a record: a checkpoint, a score
        or a grid (Trainer.run validates where it stops, so every one of them has a val DSM loss)."""

        def after(every: int | None) -> int:
            return (step // every + 1) * every if every else self.cfg.train.steps

        stops = [
            after(checkpoint_every),
            after(self.cfg.score_interval),
            after(self.cfg.sample.every),
            self.cfg.train.steps,
        ]
        if self.trial_steps is not None and self.trial_steps > step:
            stops.append(self.trial_steps)
        return min(stops)

    @property
    def test_split(self) -> str:
        return "val" if self.data.test_is_val else "test"

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE


def with_overrides(
    cfg: TrialConfig,
    *,
    steps: int | None = None,
    data: str | None = None,
    data_root: str | None = None,
    download: bool = False,
    sample_every: int | None = None,
) -> TrialConfig:
    """The config with the command line's settings laid over it, validated again (ConfigError)."""
    tree = cfg.to_dict()
    if steps is not None:
        tree["train"]["steps"] = steps
    if sample_every is not None:
        tree["sample"]["every"] = sample_every
    if data is not None:
        tree["data"]["name"] = data
    if data_root is not None:
        tree["data"]["root"] = data_root
    if download:
        tree["data"]["download"] = True
    return TrialConfig.from_dict(tree)


def config_differences(
    saved: TrialConfig, wanted: TrialConfig, ignore: tuple[str, ...] = RESUMABLE_CHANGES
) -> list[str]:
    """'field: <saved> in the checkpoint, <wanted> now' for every field that differs, apart from `ignore`."""
    old, new = saved.flat(), wanted.flat()
    return [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in sorted(old.keys() | new.keys())
        if k not in ignore and old.get(k) != new.get(k)
    ]


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
        raise ResumeError(
            f"{path} was written for a different config ({diffs[0]}{more}); only the step count "
            f"may change when a run continues: {fix}"
        )
    if step > cfg.train.steps:
        raise ResumeError(
            f"{path} is already at step {step}, past the {cfg.train.steps} steps asked for: "
            f"use --steps {step} or more, or {fix}"
        )
    return state


def held_out_eval_config(cfg: TrialConfig, available: int, n_images: int | None = None) -> EvalConfig:
    """cfg.eval with accurate.n_images set to `n_images` (default: as configured), capped at the split size."""
    n = min(n_images or cfg.eval.accurate.n_images, available)
    accurate = dataclasses.replace(cfg.eval.accurate, n_images=n)
    fast = dataclasses.replace(cfg.eval.fast, n_images=min(cfg.eval.fast.n_images, n))  # only `accurate` is used
    return dataclasses.replace(cfg.eval, accurate=accurate, fast=fast)


def prepare(
    cfg: TrialConfig, provenance: dict[str, Any], config_path: Path, out_dir: Path, *, test_images: int | None = None
) -> FullRunPlan:
    """Check everything that can be checked before training; raises ConfigError, DataError or ResumeError."""
    try:
        resolve_device(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    resume = read_resume_state(out_dir / CHECKPOINT_FILE, cfg)  # before loading data: the cheaper check first
    data = load_data(cfg.data)
    evaluator = LikelihoodEvaluator.build(
        data.test, held_out_eval_config(cfg, len(data.test), test_images), cfg.data.centered
    )
    val_evaluator = LikelihoodEvaluator.build(data.val, cfg.eval, cfg.data.centered)  # as tuner/driver.py does
    trainer = Trainer(cfg, data)
    return FullRunPlan(cfg, dict(provenance), config_path, out_dir, data, trainer, evaluator, val_evaluator, resume)


def describe(plan: FullRunPlan) -> list[str]:
    """The lines a full run starts with: where the config came from, the data, the model, the schedule."""
    prov, cfg = plan.provenance, plan.cfg
    origin = (
        f"trial {prov['trial_id']} of tuning experiment '{prov.get('experiment', '?')}'"
        if prov.get("trial_id")
        else "a hand-written config"
    )
    n_test = plan.evaluator.cfg.accurate.n_images
    split = (
        "the held-out split (mnist-5k has no separate test set)" if plan.data.test_is_val else "the official test set"
    )
    params = sum(t.numel() for t in plan.trainer.model.parameters())
    fast = cfg.eval.fast
    trial = f", at step {plan.trial_steps} (the trial's last)" if plan.trial_steps else ""
    lines = [
        f"Full run of {origin}: {plan.config_path}",
        f"Data: {plan.data.name}, {len(plan.data.train):,} training images; test bits/dim on {split}, "
        f"{n_test:,} of {len(plan.data.test):,} images",
        f"Model: {params:,} parameters on {plan.trainer.device}, {plan.trainer.precision} training; "
        f"{cfg.train.steps:,} steps of batch {cfg.train.batch_size}; output in {plan.out_dir}",
        f"Training log: val DSM every {cfg.train.val_every} steps; val bits/dim at fast fidelity ({fast.n_images} "
        f"validation images, {fast.describe()}) every {cfg.score_interval} steps{trial} and at the end",
    ]
    if cfg.sample.every:
        lines.append(
            f"Samples during training: {cfg.sample.every_images} images from {' and '.join(cfg.sample.samplers())} "
            f"every {cfg.sample.every} steps, in {plan.out_dir / SAMPLES_DIR}"
        )
    return lines


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
class Watcher:
    """Who follows a full run as it trains (train.py hands in one that writes to MLflow). The methods do nothing
    here; a watcher overrides those it needs. They are called from the training loop: keep them quick."""

    def on_record(self, record: dict[str, Any]) -> None:
        """A record of the training log as it is appended to the history: step, train_loss, images_per_sec;
        val_dsm at validations; val_bpd (with val_bpd_stderr, val_bpd_nfe, val_bpd_seconds) where scored."""

    def on_samples(self, step: int, drawn: list[dict[str, Any]]) -> None:
        """Grids drawn during training at `step`: one dict per sampler (sampler, path, nfe, seconds, ...)."""


@dataclass
class TrainOutcome:
    step: int
    completed: bool  # False when a stop request ended training early
    seconds: float  # training wall time over every session of this run, scoring and grids included
    history: list[dict[str, Any]] = field(default_factory=list)  # the training log, every session
    resumed_from: int | None = None  # the step this session started at, when it continued a checkpoint
    scoring_seconds: float = 0.0  # of `seconds`: val bits/dim during training
    sampling_seconds: float = 0.0  # of `seconds`: grids during training
    samples: list[dict[str, Any]] = field(default_factory=list)  # the grids drawn during training

    def saved(self) -> dict[str, Any]:
        """What travels with the trainer state in the checkpoint, so metrics.json sees every session."""
        return {
            "seconds": self.seconds,
            "history": self.history,
            "scoring_seconds": self.scoring_seconds,
            "sampling_seconds": self.sampling_seconds,
            "samples": self.samples,
        }


def run_training(
    plan: FullRunPlan,
    *,
    checkpoint_every: int,
    stop_requested: Callable[[], bool] = lambda: False,
    log: Log = print,
    watcher: Watcher | None = None,
) -> TrainOutcome:
    """Train to cfg.train.steps, resuming from plan.resume; raises TrainingDiverged on a NaN/inf loss.

    `stop_requested` is polled at every logged step (every train.log_every steps, and at validations, scores,
    grids and checkpoints): the only points where the trainer's generator hands back control with its state
    whole. Scoring and drawing read the EMA weights and draw no numbers from the trainer's random streams, so
    the weights are those of a run that does neither.
    """
    trainer, total = plan.trainer, plan.cfg.train.steps
    watcher = watcher or Watcher()
    outcome = TrainOutcome(trainer.step, False, 0.0)
    if plan.resume is not None:
        trainer.load_state_dict(plan.resume)
        saved = plan.resume.get("full_run") or {}
        outcome = TrainOutcome(
            trainer.step,
            False,
            float(saved.get("seconds", 0.0)),
            list(saved.get("history", [])),
            trainer.step,
            float(saved.get("scoring_seconds", 0.0)),
            float(saved.get("sampling_seconds", 0.0)),
            list(saved.get("samples", [])),
        )
        done = " (training already complete)" if trainer.step >= total else ""
        log(f"Resumed from {plan.checkpoint_path} at step {trainer.step}{done}")
    seconds_before = outcome.seconds
    start, start_step = time.perf_counter(), trainer.step
    width = len(str(total))

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    while trainer.step < total:
        for record in trainer.run(until_step=plan.next_stop(trainer.step, checkpoint_every)):
            if record["diverged"]:
                raise TrainingDiverged(record["reason"])
            step = record["step"]
            if plan.scores_at(step):
                record.update(score_validation(plan))
                outcome.scoring_seconds += record["val_bpd_seconds"]
            outcome.history.append(record)
            watcher.on_record(record)
            session_seconds = time.perf_counter() - start
            eta = (total - trainer.step) * session_seconds / max(trainer.step - start_step, 1)
            log(progress_line(record, total, width, eta))
            if plan.cfg.sample.every and step % plan.cfg.sample.every == 0:
                drawn = draw_during_training(plan, step, log)
                outcome.samples += drawn
                outcome.sampling_seconds += sum(d["seconds"] for d in drawn)
                watcher.on_samples(step, drawn)
            if stop_requested():
                break
        outcome.step, outcome.seconds = trainer.step, elapsed()
        trainer.save_checkpoint(plan.checkpoint_path, full_run=outcome.saved())
        if stop_requested() and trainer.step < total:
            log(f"Stopped at step {trainer.step}; checkpoint saved to {plan.checkpoint_path}")
            return outcome
    last = outcome.history[-1] if outcome.history else None
    if last is not None and last["step"] == total and "val_bpd" not in last:
        # The run reached this length in an earlier session, when it was not yet its end (stopped there, then
        # continued with --steps at that step): the end is scored now, into the record it already has.
        last.setdefault("val_dsm", trainer.val_dsm())
        last.update(score_validation(plan))
        outcome.scoring_seconds += last["val_bpd_seconds"]
        watcher.on_record(last)
        trainer.save_checkpoint(plan.checkpoint_path, full_run={**outcome.saved(), "seconds": elapsed()})
    outcome.step, outcome.seconds, outcome.completed = trainer.step, elapsed(), True
    return outcome


def score_validation(plan: FullRunPlan) -> dict[str, Any]:
    """Val bits/dim of the EMA weights at fast fidelity, as a tuning rung scores it (trials/trainable.py)."""
    trainer = plan.trainer
    with trainer.evaluating() as score:
        bpd = plan.val_evaluator.evaluate(score, trainer.sde, plan.cfg.sde.sampling_eps, "fast", device=trainer.device)
    out = {"val_bpd": bpd.mean, "val_bpd_stderr": bpd.stderr, "val_bpd_nfe": bpd.nfe, "val_bpd_seconds": bpd.seconds}
    if bpd.failed or bpd.flagged:
        out["val_bpd_reason"] = bpd.reason
    return out


def draw_during_training(plan: FullRunPlan, step: int, log: Log) -> list[dict[str, Any]]:
    """sample.every_images images from each sampler sample.sampler names, as samples/step_<step>_<sampler>.png.
    The same seed every time: each grid starts from the same noise, so the grids show the model, not the draw."""
    folder = plan.out_dir / SAMPLES_DIR
    folder.mkdir(exist_ok=True)
    width = len(str(plan.cfg.train.steps))
    drawn = []
    with plan.trainer.evaluating() as score:
        for name in plan.cfg.sample.samplers():
            path = folder / f"step_{step:0{width}d}_{name}.png"
            info = draw_samples(
                plan.trainer, score, name, path, log=lambda _: None, n_images=plan.cfg.sample.every_images
            )
            drawn.append(
                {
                    "step": step,
                    "sampler": name,
                    "path": str(path.relative_to(plan.out_dir)) if info["file"] else None,
                    **{k: info[k] for k in ("n_images", "nfe", "seconds", "failed", "reason")},
                }
            )
            log(
                f"  {name} samples at step {step}: {info['n_images']} images, {info['nfe']} score evaluations, "
                f"{info['seconds']:.1f} s -> {path}"
                if not info["failed"]
                else f"  {name} samples at step {step} failed: {info['reason']}"
            )
    return drawn


def progress_line(record: dict[str, Any], total: int, width: int, eta_seconds: float) -> str:
    step = record["step"]
    val = f"  val_dsm {record['val_dsm']:.4g}" if "val_dsm" in record else ""
    if "val_bpd" in record:
        val += f"  val_bpd {record['val_bpd']:.4f}"
    return (
        f"step {step:>{width}}/{total} ({100 * step / total:5.1f}%)  loss {record['train_loss']:.4g}{val}"
        f"  {record['images_per_sec']:.0f} img/s  ETA {duration(eta_seconds)}"
    )


# ---- finish: measure and write ------------------------------------------------------------------------------
def finish(plan: FullRunPlan, outcome: TrainOutcome, log: Log = print) -> dict[str, Any]:
    """Test bits/dim, a grid from every sampler and metrics.json for a completed training; returns the metrics."""
    trainer, cfg = plan.trainer, plan.cfg
    fid = plan.evaluator.cfg.accurate
    log(f"Test bits/dim on the {plan.test_split} split: {fid.n_images} images, {fid.describe()} ...")
    samples = {}
    with trainer.evaluating() as score:
        scoring = Progress("  Test bits/dim", fid.n_images)

        def report_scoring(done: int, total: int) -> None:
            if done < total:  # the result line follows the last chunk
                log(scoring.line(done, "images"))

        bpd = plan.evaluator.evaluate(
            score, trainer.sde, cfg.sde.sampling_eps, "accurate", device=trainer.device, progress=report_scoring
        )
        log(
            f"  {bpd.mean:.4f} ± {bpd.stderr:.4f} bits/dim, NFE {bpd.nfe}, {bpd.seconds:.1f} s"
            if not bpd.failed
            else f"  failed: {bpd.reason}"
        )
        if bpd.flagged and not bpd.failed:
            log(f"  warning: {bpd.reason}")
        for name in IMAGE_SAMPLERS:
            s = samples[name] = draw_samples(trainer, score, name, plan.out_dir / grid_file(name), log)
            log(
                f"{name} samples: {s['n_images']} images, {s['nfe']} score evaluations, {s['seconds']:.1f} s -> "
                f"{s['file']}"
                if not s["failed"]
                else f"{name} samples failed: {s['reason']}"
            )
    val_dsm = trainer.val_dsm()

    last_loss = next((r["train_loss"] for r in reversed(outcome.history) if "train_loss" in r), None)
    test_bpd = {"split": plan.test_split, **bpd.to_dict()}
    metrics = {
        "config_file": str(plan.config_path),
        "provenance": plan.provenance,
        "device": str(trainer.device),
        "data": {
            "name": plan.data.name,
            "train_images": len(plan.data.train),
            "val_images": len(plan.data.val),
            "test_split": plan.test_split,
            "test_split_images": len(plan.data.test),
        },
        "train": {
            "steps": outcome.step,
            "precision": trainer.precision,
            "final_train_loss": last_loss,
            "val_dsm": val_dsm,
            "val_dsm_images": min(cfg.train.val_images, len(plan.data.val)),
            "seconds": outcome.seconds,
            "resumed_from_step": outcome.resumed_from,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            # what the training log's val bits/dim cost: the share of the wall time spent on it
            "score_every": cfg.score_interval,
            "trial_steps": plan.trial_steps,
            "scoring_seconds": outcome.scoring_seconds,
            "scoring_share": outcome.scoring_seconds / outcome.seconds if outcome.seconds > 0 else None,
            "sampling_seconds": outcome.sampling_seconds,
        },
        "val_bpd_fidelity": {
            "name": "fast",
            "n_images": cfg.eval.fast.n_images,
            "solver": cfg.eval.fast.describe(),
            "eps": cfg.sde.sampling_eps,
            "seed": cfg.eval.seed,
            "estimator": cfg.eval.estimator,
        },
        "test_bpd": test_bpd,
        "samples": samples,
        "samples_during_training": outcome.samples,
        "history": outcome.history,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(plan.out_dir / METRICS_FILE, json.dumps(_json_safe(metrics), indent=2) + "\n")
    return metrics


def draw_samples(
    trainer: Trainer, score, sampler: str, path: Path, log: Log = print, n_images: int | None = None
) -> dict[str, Any]:
    """A grid from one of trials.sampling.IMAGE_SAMPLERS (sample.n_images, or `n_images`), with its settings,
    cost and progress lines.

    An ODE the solver cannot finish is recorded, not raised, so the run keeps its other results (an ODE
    that cannot be solved is itself a finding about the model).
    """
    cfg, sc = trainer.cfg, trainer.cfg.sample
    n = n_images or sc.n_images
    chosen = IMAGE_SAMPLERS[sampler]
    settings = {"file": path.name, "n_images": n, **chosen.settings(sc), "eps": cfg.sde.sampling_eps, "seed": sc.seed}
    generator = torch.Generator(device=trainer.device).manual_seed(sc.seed)
    start = time.perf_counter()
    try:
        samples = chosen.draw(
            score,
            trainer.sde,
            cfg.dataset.batch_shape(n),
            eps=cfg.sde.sampling_eps,
            sample=sc,
            generator=generator,
            device=trainer.device,
            report=log,
            every=PROGRESS_EVERY_S,
        )
    except ODEFailure as exc:
        return {
            **settings,
            "file": None,
            "nfe": None,
            "seconds": time.perf_counter() - start,
            "failed": True,
            "reason": str(exc),
        }
    seconds = time.perf_counter() - start
    save_grid(samples.x, path, cfg.data.centered)
    return {
        **settings,
        "nfe": samples.nfe,
        "seconds": seconds,
        "finite": bool(torch.isfinite(samples.x).all()),
        "failed": False,
        "reason": None,
    }


def output_files(plan: FullRunPlan, metrics: dict[str, Any]) -> list[Path]:
    """The files a finished run leaves for the record: metrics.json, config.yaml and the sample grids drawn."""
    files = [plan.out_dir / METRICS_FILE, plan.out_dir / CONFIG_FILE]
    return files + [plan.out_dir / s["file"] for s in metrics["samples"].values() if s.get("file")]


def exportable_network(plan: FullRunPlan) -> nn.Module:
    """A CPU copy of the evaluation weights (the EMA network) in eval mode: what is exported as the MLflow model
    (trials/portable.py says how to use it), whatever device the run trained on."""
    return copy.deepcopy(plan.trainer.eval_model).cpu().eval()


def _json_safe(value: Any) -> Any:
    """NaN and inf to null: metrics.json stays standard JSON (a failed score says so in `failed`)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
