"""Denoising score matching for the VP SDE: the loss, and a training loop a reader can hold in their head.

The `Trainer` owns the model, its EMA, the optimiser and every random stream, so a checkpoint of its state
dict resumes exactly where it stopped. `Trainer.run(until_step)` is a generator: it trains and yields
metric dicts (every `log_every` steps, and with the validation DSM loss every `val_every` steps). It knows
nothing about Ray, MLflow or files; the tuning adapter and the full run decide what to do with the metrics.
A NaN or inf loss ends the run with a final ``{"diverged": True, ...}`` record instead of an exception.
With train.precision bf16 (or auto on bf16 hardware) the network's training forward runs under bf16
autocast and everything else stays float32 (trials/precision.py); every record says which precision ran.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from trials.config import TrialConfig
from trials.data import DatasetSplits, to_model_space
from trials.files import atomic_path
from trials.model import score_fn, unet_for
from trials.precision import autocast_forward, resolve_precision, use_cuda_fast_math
from trials.sde import SDE, ScoreFn, make_sde, per_sample


def dsm_loss(score: ScoreFn, sde: SDE, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-image sum of (sigma(t) score(x_t, t) + z)^2.

    With x_t = alpha x_0 + sigma z the conditional score is -z / sigma, so sigma * score + z is zero for the
    perfect score; weighting the score error by sigma^2 (the 'likelihood-free' weighting of score_sde)
    keeps the loss O(D) at every t.
    """
    x_t = sde.perturb(x0, t, noise)
    sigma = per_sample(sde.marginal_std(t), x0)
    residual = sigma * score(x_t, t) + noise
    return residual.pow(2).flatten(1).sum(dim=1).mean()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available on this machine")
    return torch.device(name)


def trial_device(name: str, assigned_gpus: list[str]) -> tuple[torch.device, str | None]:
    """The device a tuning trial trains on, and a one-line note when it cannot use the GPU it was given.

    A cluster may declare GPUs that this process's torch cannot use (a CPU build of torch, a missing driver,
    a node that declares GPUs it does not have); the trial then trains on the CPU rather than failing, and
    says so once. Without an assigned GPU, `train.device` means what it means everywhere else."""
    if assigned_gpus and name != "cpu" and not torch.cuda.is_available():
        cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        return torch.device("cpu"), (
            f"Ray assigned GPU {','.join(assigned_gpus)} but torch {torch.__version__} "
            f"({cuda}) sees no CUDA device: training on the CPU instead"
        )
    return resolve_device(name), None


def ema_avg_fn(decay: float):
    """EMA update for AveragedModel with the decay warmed up as min(decay, (1 + n) / (10 + n)).

    A fixed 0.999 would leave a 500-step tuning trial's EMA mostly at its random initial weights; the
    warm-up lets the average track the model early and settle to `decay` later.
    """

    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


class Trainer:
    def __init__(self, cfg: TrialConfig, data: DatasetSplits, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if self.device.type == "cuda":
            use_cuda_fast_math()
        self.precision = resolve_precision(cfg.train.precision, self.device)  # "fp32" or "bf16"
        self.sde = make_sde(cfg.sde)
        self.train_images = data.train
        torch.manual_seed(cfg.train.seed)  # model init and dropout
        self.model = unet_for(cfg).to(self.device)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=ema_avg_fn(cfg.train.ema_decay), use_buffers=True)
            if cfg.train.ema_decay > 0
            else None
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.step = 0
        self.rng = torch.Generator().manual_seed(cfg.train.seed)  # batches, dequantization, t and z
        self._val_batch = self._fixed_val_batch(data.val)

    # ---- what the rest of the system evaluates --------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample from: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @contextmanager
    def evaluating(self) -> Iterator[ScoreFn]:
        """The evaluation weights' score function, in eval mode (no dropout) for the duration."""
        model = self.eval_model
        was_training = model.training
        model.eval()
        try:
            yield score_fn(model, self.sde)
        finally:
            model.train(was_training)

    # ---- training ---------------------------------------------------------------------------------
    def _draw_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tc = self.cfg.train
        idx = torch.randint(len(self.train_images), (tc.batch_size,), generator=self.rng)
        images = self.train_images[idx]
        deq = torch.rand(images.shape, generator=self.rng) if tc.dequantize else 0.5
        x0 = to_model_space(images, deq, self.cfg.data.centered)
        t = tc.eps + (self.sde.T - tc.eps) * torch.rand(tc.batch_size, generator=self.rng)
        z = torch.randn(x0.shape, generator=self.rng)
        return x0.to(self.device), t.to(self.device), z.to(self.device)

    def _fixed_val_batch(self, val_images: torch.Tensor):
        # Common random numbers: the same images, t and noise at every validation, in every trial.
        n = min(self.cfg.train.val_images, len(val_images))
        gen = torch.Generator().manual_seed(12345)
        images = val_images[:n]
        x0 = to_model_space(images, torch.rand(images.shape, generator=gen), self.cfg.data.centered)
        t = self.cfg.train.eps + (self.sde.T - self.cfg.train.eps) * torch.rand(n, generator=gen)
        z = torch.randn(x0.shape, generator=gen)
        return x0, t, z

    def _lr_at(self, step: int) -> float:
        warm = self.cfg.train.warmup_steps
        return self.cfg.train.lr * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    @torch.no_grad()
    def val_dsm(self) -> float:
        """DSM loss of the evaluation weights on the fixed validation batch, in float32 at any precision."""
        x0, t, z = self._val_batch
        chunk = max(self.cfg.train.batch_size, 64)
        total = 0.0
        with self.evaluating() as score:
            for i in range(0, len(x0), chunk):
                sl = slice(i, i + chunk)
                loss = dsm_loss(score, self.sde, x0[sl].to(self.device), t[sl].to(self.device), z[sl].to(self.device))
                total += loss.item() * len(x0[sl])
        return total / len(x0)

    def run(self, until_step: int | None = None) -> Iterator[dict[str, Any]]:
        """Train up to `until_step` (default: the configured length), yielding metric records."""
        tc = self.cfg.train
        until = tc.steps if until_step is None else until_step
        self.model.train()
        # Only the network's forward runs in bf16; dsm_loss gets its output in float32 (trials/precision.py).
        score = score_fn(autocast_forward(self.model, self.device.type, self.precision), self.sde)
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        while self.step < until:
            x0, t, z = self._draw_batch()
            loss = dsm_loss(score, self.sde, x0, t, z)
            if not torch.isfinite(loss):
                yield {
                    "step": self.step,
                    "diverged": True,
                    "reason": f"non-finite DSM loss {loss.item()} at step {self.step}",
                }
                return
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr_at(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            window_loss += loss.item()
            window_steps += 1
            at_val = self.step % tc.val_every == 0 or self.step == until
            if self.step % tc.log_every == 0 or at_val:
                seconds = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "train_loss": window_loss / window_steps,
                    "images_per_sec": window_steps * tc.batch_size / max(seconds, 1e-9),
                    "lr": self._lr_at(self.step - 1),
                    "precision": self.precision,
                    "diverged": False,
                }
                if at_val:
                    record["val_dsm"] = self.val_dsm()
                    if not math.isfinite(record["val_dsm"]):
                        yield {
                            **record,
                            "diverged": True,
                            "reason": f"non-finite validation DSM loss at step {self.step}",
                        }
                        return
                yield record
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout on the CPU
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,  # dropout on GPUs
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self, path: str | Path, **extra: Any) -> None:
        """Write the state (plus any `extra` entries the caller keeps with it) atomically: a crash
        mid-write leaves the previous checkpoint intact."""
        with atomic_path(path) as tmp:
            torch.save({**self.state_dict(), **extra}, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict; `TrialConfig.from_dict(ckpt["config"])` gives its config."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def eval_model_from_checkpoint(
    ckpt: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[TrialConfig, nn.Module]:
    """Rebuild the evaluation weights (EMA when saved) of a checkpoint without an optimiser or data."""
    cfg = TrialConfig.from_dict(ckpt["config"])
    model = unet_for(cfg)
    if ckpt.get("ema") is not None:
        # AveragedModel's state dict holds the wrapped module under "module." plus its counter.
        model.load_state_dict({k[len("module.") :]: v for k, v in ckpt["ema"].items() if k.startswith("module.")})
    else:
        model.load_state_dict(ckpt["model"])
    return cfg, model.to(device).eval()
