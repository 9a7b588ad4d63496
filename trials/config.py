"""Typed configuration of one trial: the single source of truth for what a trial needs.

A `TrialConfig` says everything a trial or a full run needs: data, model, SDE, training, evaluation and
sampling. It is built from a plain nested dict (a YAML file, or a search-space's fixed settings with one
trial's hyperparameters laid over them) and written back to one, so the config the tuner exports is exactly
the config the full run loads. Unknown keys, wrong types and bad values raise `ConfigError` with a one-line
message naming the field, e.g. ``train.lr: must be >= 0, got -1.0``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trials.cli import UserError
from trials.datasets import DATASETS, Dataset

# How the probability-flow ODE is integrated (trials.sde, trials.odesolve). "logsnr": in lambda =
# log(sigma / alpha) on the scaled state x / alpha, where trajectories are nearly straight; "t": in the
# SDE's own time on x, as before (kept to reproduce and compare older scores: it is the same density).
FRAMES = ("logsnr", "t")
SDE_KINDS = ("vp", "subvp")  # trials.sde.SDES: variance preserving, sub-VP
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
# Fixed-step torchdiffeq methods and their score evaluations per step: a fixed grid's NFE is known in advance.
FIXED_STEP_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
FIXED_STEP_METHODS = tuple(FIXED_STEP_STAGES)
# Exponential multistep methods of the logsnr frame (trials.odesolve.MULTISTEP_METHODS, whose keys a test keeps
# equal to these): the linear part of the ODE exactly, the network's part from one evaluation per step, reused
# by the next steps and by the divergence; `steps` steps on a fixed grid in lambda, steps + 1 evaluations.
MULTISTEP_METHODS = ("multistep",)
# The image samplers by name: trials.sampling.IMAGE_SAMPLERS, whose keys a test keeps equal to these. Here, and
# not read from that table, so that a config is checked without importing torch.
IMAGE_SAMPLER_NAMES = ("pc", "ode")
BOTH_SAMPLERS = "both"  # sample.sampler: every sampler of the table
# How often a full run scores val bits/dim unless train.score_every says: at the multiple of val_every where the
# scoring's estimated compute is SCORE_SHARE of the training's. The estimate: one fast score costs SCORE_COST
# training images per scored image and NFE (the divergence's vector-Jacobian product makes an NFE dearer than a
# forward pass; measured 1.8-3.9 in fp32 on a 2-core CPU, docs/configuration.md, "Full run"), an adaptive solver ADAPTIVE_NFE.
SCORE_SHARE = 0.05
SCORE_COST = 4.0
ADAPTIVE_NFE = 100


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message is one line that names the field."""


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist-5k"  # a row of trials.datasets.DATASETS: "mnist-5k" (embedded) or "mnist" (from `root`)
    root: str | None = None  # the local folder of a dataset that needs one (torchvision's MNIST/ for "mnist")
    download: bool = False  # let torchvision download into `root` when the files are missing
    centered: bool = False  # False: pixels in [0, 1]; True: in [-1, 1]
    split_seed: int = 0  # the train/validation split; fixed so every trial sees the same split

    def check(self, path: str) -> None:
        _require(self.name in DATASETS, f"{path}.name", f"must be one of {', '.join(DATASETS)}, got {self.name!r}")
        _require(
            not DATASETS[self.name].needs_root or bool(self.root),
            f"{path}.root",
            f"is required for data '{self.name}' (a folder holding MNIST/raw, or give download: true)",
        )


@dataclass(frozen=True)
class ModelConfig:
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.1

    def resolutions(self, image_size: int) -> list[int]:
        """Feature-map sizes of the UNet's levels: 28, 14, 7 for three levels on 28x28 images."""
        return [image_size // 2**i for i in range(len(self.ch_mult))]

    def check(self, path: str) -> None:
        _require(self.ch >= 1, f"{path}.ch", f"must be >= 1, got {self.ch}")
        _require(len(self.ch_mult) >= 1, f"{path}.ch_mult", "must not be empty")
        _require(
            all(m >= 1 for m in self.ch_mult), f"{path}.ch_mult", f"entries must be >= 1, got {list(self.ch_mult)}"
        )
        _require(self.num_res_blocks >= 1, f"{path}.num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")

    def check_fits(self, path: str, image_size: int) -> None:
        """The levels and attention resolutions fit images of this size."""
        # Each downsampling halves the size (28 -> 14 -> 7); one more level would need an odd size halved
        # (7 -> 3) and back, which a UNet's skip connections cannot line up.
        sizes = [image_size]
        while sizes[-1] % 2 == 0:
            sizes.append(sizes[-1] // 2)
        _require(
            len(self.ch_mult) <= len(sizes),
            f"{path}.ch_mult",
            f"at most {len(sizes)} levels fit a {image_size}x{image_size} image "
            f"({' -> '.join(map(str, sizes))}), got {len(self.ch_mult)}",
        )
        bad = [r for r in self.attn_resolutions if r not in self.resolutions(image_size)]
        _require(
            not bad,
            f"{path}.attn_resolutions",
            f"{bad} not among the UNet's resolutions {self.resolutions(image_size)}",
        )


@dataclass(frozen=True)
class SDEConfig:
    kind: str = "vp"  # one of SDE_KINDS (trials.sde.SDES)
    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    sampling_eps: float = 1e-3  # where sampling stops and the likelihood ODE starts (tuned per trial)

    def check(self, path: str) -> None:
        _require(self.kind in SDE_KINDS, f"{path}.kind", f"must be one of {', '.join(SDE_KINDS)}, got {self.kind!r}")
        _require(self.beta_min > 0, f"{path}.beta_min", f"must be > 0, got {self.beta_min}")
        _require(
            self.beta_max > self.beta_min,
            f"{path}.beta_max",
            f"must be > beta_min ({self.beta_min}), got {self.beta_max}",
        )
        _require(self.T > 0, f"{path}.T", f"must be > 0, got {self.T}")
        _require(
            0 < self.sampling_eps < self.T,
            f"{path}.sampling_eps",
            f"must be in (0, T={self.T}), got {self.sampling_eps}",
        )


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-4
    batch_size: int = 128
    steps: int = 2000
    eps: float = 1e-5  # t ~ U[eps, T] in the DSM loss
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    warmup_steps: int = 0  # linear learning-rate warm-up
    ema_decay: float = 0.999  # 0 disables the EMA; the EMA weights are what gets evaluated and sampled
    dequantize: bool = True  # uniform dequantization of the 8-bit pixels
    seed: int = 0
    val_every: int = 200  # steps between validation DSM evaluations (and, in tuning, rung reports)
    # Full run only (train.py): steps between scores of val bits/dim at fast fidelity with the tuning experiment's
    # evaluator (its images and probes), also scored at the tuning trial's last step and at the end. A trial
    # scores at every val_every (its rungs); a full run that did would spend 10-35% of its time scoring on a
    # CPU. None: TrialConfig.score_interval picks a multiple of val_every that keeps scoring near SCORE_SHARE.
    score_every: int | None = None
    val_images: int = 256  # fixed validation images for the DSM loss
    log_every: int = 50
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    # "fp32", "bf16" (autocast for the network's training forward; trials/precision.py) or "auto" (bf16 where
    # the device has bf16 units). The default stays fp32 so configs written before it train as they did.
    precision: str = "fp32"

    def check(self, path: str) -> None:
        _require(self.lr >= 0 and math.isfinite(self.lr), f"{path}.lr", f"must be a finite number >= 0, got {self.lr}")
        _require(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.steps >= 1, f"{path}.steps", f"must be >= 1, got {self.steps}")
        _require(0 < self.eps < 1, f"{path}.eps", f"must be in (0, 1), got {self.eps}")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.ema_decay < 1, f"{path}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _require(self.val_every >= 1, f"{path}.val_every", f"must be >= 1, got {self.val_every}")
        _require(
            self.score_every is None or self.score_every >= 1,
            f"{path}.score_every",
            f"must be >= 1 (or null to keep scoring near {SCORE_SHARE:.0%} of the run), got {self.score_every}",
        )
        _require(self.val_images >= 1, f"{path}.val_images", f"must be >= 1, got {self.val_images}")
        _require(self.log_every >= 1, f"{path}.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.num_threads >= 0, f"{path}.num_threads", f"must be >= 0, got {self.num_threads}")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"{path}.device",
            f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )
        _require(
            self.precision in ("fp32", "bf16", "auto"),
            f"{path}.precision",
            f"must be 'fp32', 'bf16' or 'auto', got {self.precision!r}",
        )


@dataclass(frozen=True)
class FidelityConfig:
    """How hard the likelihood evaluator works: images scored, the ODE's frame, solver and tolerances."""

    n_images: int = 64
    rtol: float = 1e-3  # adaptive methods only
    atol: float = 1e-3  # adaptive methods only
    method: str = "dopri5"  # an adaptive torchdiffeq method, or a fixed-step one with `steps`
    frame: str = "logsnr"  # "logsnr" (straight trajectories, fewer NFE) or "t" (the SDE's time, the old way)
    steps: int = (
        0  # fixed-step methods: equal steps in lambda from eps to T (NFE = steps x stages); multistep: steps + 1
    )

    def check(self, path: str) -> None:
        _require(self.n_images >= 1, f"{path}.n_images", f"must be >= 1, got {self.n_images}")
        _require(self.rtol > 0, f"{path}.rtol", f"must be > 0, got {self.rtol}")
        _require(self.atol > 0, f"{path}.atol", f"must be > 0, got {self.atol}")
        _require(self.frame in FRAMES, f"{path}.frame", f"must be one of {', '.join(FRAMES)}, got {self.frame!r}")
        _require(
            self.method in ADAPTIVE_METHODS + FIXED_STEP_METHODS + MULTISTEP_METHODS,
            f"{path}.method",
            f"must be an adaptive torchdiffeq method ({', '.join(ADAPTIVE_METHODS)}), a fixed-step one "
            f"({', '.join(FIXED_STEP_METHODS)}) or a multistep one ({', '.join(MULTISTEP_METHODS)}), "
            f"got {self.method!r}",
        )
        if self.method in FIXED_STEP_METHODS + MULTISTEP_METHODS:
            kind = "fixed-step" if self.method in FIXED_STEP_METHODS else "multistep"
            _require(
                self.steps >= 1,
                f"{path}.steps",
                f"must be >= 1 for the {kind} method {self.method!r}, got {self.steps}",
            )
            # Equal steps in t put as much effort at t = 0.9 as at t = 1e-5, where frame t is stiff; the multistep
            # methods solve the logsnr frame's linear part exactly, which frame t does not have.
            _require(
                self.frame == "logsnr",
                f"{path}.frame",
                f"{kind} method {self.method!r} needs frame 'logsnr', got {self.frame!r}",
            )
        else:
            _require(
                self.steps == 0,
                f"{path}.steps",
                f"applies to fixed-step and multistep methods only ({self.method!r} chooses its own steps), "
                f"got {self.steps}",
            )

    @property
    def nfe(self) -> int | None:
        """Score evaluations per image batch of a fixed-step solve; None for an adaptive one (the model decides)."""
        if self.method in MULTISTEP_METHODS:
            return self.steps + 1
        return self.steps * FIXED_STEP_STAGES[self.method] if self.method in FIXED_STEP_STAGES else None

    def describe(self) -> str:
        """The solver in a few words, for logs: 'logsnr dopri5 rtol 1e-05 atol 1e-05' or 'logsnr midpoint 12 steps'."""
        if self.method in FIXED_STEP_METHODS + MULTISTEP_METHODS:
            return f"{self.frame} {self.method} {self.steps} steps"
        return f"{self.frame} {self.method} rtol {self.rtol:g} atol {self.atol:g}"


@dataclass(frozen=True)
class EvalConfig:
    """The shared likelihood evaluator (validation bits/dim by the probability-flow ODE)."""

    estimator: str = "rademacher"  # Hutchinson probes: "rademacher" or "gaussian"; "exact" for tiny inputs
    seed: int = 0  # fixes the validation subset, the dequantization noise and the probes
    batch_size: int = 128  # images per ODE solve
    # The logsnr frame and the exponential multistep solver (bench/fidelity_bias.py, docs/metric.md). Fast: 31
    # steps (32 NFE), within 0.01 bits/dim of a 1e-7 solve on every config measured, where rk4 on 7 steps (28
    # NFE, the fast default before) read 0.14-0.28 low by an amount that depends on the model. Accurate: 63
    # steps (64 NFE), within 0.005.
    fast: FidelityConfig = field(default_factory=lambda: FidelityConfig(n_images=64, method="multistep", steps=31))
    accurate: FidelityConfig = field(default_factory=lambda: FidelityConfig(n_images=500, method="multistep", steps=63))

    def check(self, path: str) -> None:
        _require(
            self.estimator in ("rademacher", "gaussian", "exact"),
            f"{path}.estimator",
            f"must be 'rademacher', 'gaussian' or 'exact', got {self.estimator!r}",
        )
        _require(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        self.fast.check(f"{path}.fast")
        self.accurate.check(f"{path}.accurate")
        _require(
            self.fast.n_images <= self.accurate.n_images,
            f"{path}.fast.n_images",
            f"must be <= accurate.n_images ({self.accurate.n_images}): fast scores a prefix of the accurate subset",
        )


@dataclass(frozen=True)
class SampleConfig:
    """Samplers of the full run: reverse-SDE predictor-corrector and the probability-flow ODE."""

    n_images: int = 64
    pc_steps: int = 1000  # Euler-Maruyama predictor steps from T to sampling_eps
    corrector_steps: int = 1  # Langevin steps after each predictor step
    snr: float = 0.16  # Langevin step size by signal-to-noise ratio
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    ode_method: str = "dopri5"  # an adaptive torchdiffeq method, or a multistep one with `ode_steps`
    ode_frame: str = "logsnr"  # the probability-flow ODE's frame, as in eval (FidelityConfig.frame)
    ode_steps: int = 0  # multistep methods only: steps from T to sampling_eps (steps + 1 evaluations)
    seed: int = 0
    # Grids drawn while a full run trains (as the seed's training script offers): every `every` steps (None:
    # only at the end), `every_images` images from `sampler` (a name of IMAGE_SAMPLER_NAMES, or "both").
    # The default sampler is the ODE: its few dozen score evaluations cost a fraction of PC's pc_steps x 2.
    every: int | None = None
    sampler: str = "ode"
    every_images: int = 16

    def samplers(self) -> tuple[str, ...]:
        """The samplers that draw the grids during training."""
        return IMAGE_SAMPLER_NAMES if self.sampler == BOTH_SAMPLERS else (self.sampler,)

    def check(self, path: str) -> None:
        _require(self.n_images >= 1, f"{path}.n_images", f"must be >= 1, got {self.n_images}")
        _require(self.pc_steps >= 1, f"{path}.pc_steps", f"must be >= 1, got {self.pc_steps}")
        _require(self.corrector_steps >= 0, f"{path}.corrector_steps", f"must be >= 0, got {self.corrector_steps}")
        _require(self.snr > 0, f"{path}.snr", f"must be > 0, got {self.snr}")
        _require(self.ode_rtol > 0 and self.ode_atol > 0, f"{path}.ode_rtol", "ode_rtol and ode_atol must be > 0")
        _require(
            self.ode_method in ADAPTIVE_METHODS + MULTISTEP_METHODS,
            f"{path}.ode_method",
            f"must be an adaptive torchdiffeq method ({', '.join(ADAPTIVE_METHODS)}) or a multistep one "
            f"({', '.join(MULTISTEP_METHODS)}), got {self.ode_method!r}",
        )
        _require(
            self.ode_frame in FRAMES, f"{path}.ode_frame", f"must be one of {', '.join(FRAMES)}, got {self.ode_frame!r}"
        )
        if self.ode_method in MULTISTEP_METHODS:
            _require(
                self.ode_steps >= 1, f"{path}.ode_steps", f"must be >= 1 for {self.ode_method}, got {self.ode_steps}"
            )
            _require(
                self.ode_frame == "logsnr",
                f"{path}.ode_frame",
                f"must be 'logsnr' for {self.ode_method} (it integrates the logsnr frame), got {self.ode_frame!r}",
            )
        _require(
            self.every is None or self.every >= 1,
            f"{path}.every",
            f"must be >= 1 (steps between grids during training; null for none), got {self.every}",
        )
        _require(
            self.sampler in (*IMAGE_SAMPLER_NAMES, BOTH_SAMPLERS),
            f"{path}.sampler",
            f"must be one of {', '.join((*IMAGE_SAMPLER_NAMES, BOTH_SAMPLERS))}, got {self.sampler!r}",
        )
        _require(self.every_images >= 1, f"{path}.every_images", f"must be >= 1, got {self.every_images}")


@dataclass(frozen=True)
class TrialConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def check(self, path: str = "") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f"{path}{f.name}")
        self.model.check_fits(f"{path}model", self.dataset.image_size)

    @property
    def score_interval(self) -> int:
        """Steps between a full run's val bits/dim scores: train.score_every, else the smallest multiple of
        train.val_every at which the estimated cost of a fast score is at most SCORE_SHARE of the training between
        two scores (cpu.yaml's batch 128: every 320 steps; batch 32: every 1,280)."""
        train, fast = self.train, self.eval.fast
        if train.score_every:
            return train.score_every
        steps = SCORE_COST * fast.n_images * (fast.nfe or ADAPTIVE_NFE) / (train.batch_size * SCORE_SHARE)
        return max(1, math.ceil(steps / train.val_every)) * train.val_every

    @property
    def dataset(self) -> Dataset:
        """The row of trials.datasets.DATASETS that `data.name` names."""
        return DATASETS[self.data.name]

    # ---- plain-dict round trip ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> TrialConfig:
        """Build and validate a config; missing keys take their defaults, unknown ones are errors."""
        cfg = build_dataclass(cls, raw or {}, "")
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (lists, not tuples) that `from_dict` turns back into this config."""
        return _lists_not_tuples(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """{'train.lr': ..., 'model.ch_mult': [1, 2, 2], ...}: for logging params and for tables."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree['a']['b'] = value for dotted = 'a.b', creating the inner dicts; tree is changed in place."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
    node[leaf] = value


def field_paths(cls: type = TrialConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config class as {'train.lr': <type>, ...}."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(field_paths(tp, f"{path}."))
        else:
            out[path] = tp
    return out


# ---- conversion with one-line errors --------------------------------------------------------------
def build_dataclass(cls: type, raw: Any, path: str = ""):
    """Any config dataclass from a plain mapping: unknown keys and wrong types raise ConfigError."""
    where = path.rstrip(".") or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, f"{path}{name}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, f"{path}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config type {tp}")  # a bug in this module, not user input


def _lists_not_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists_not_tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists_not_tuples(v) for v in value]
    return value


def read_yaml(path: str | Path) -> tuple[Any, bytes]:
    """Parse a YAML file; returns (data, raw bytes). Errors are one line naming the file (and line)."""
    import yaml

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(raw), raw
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def load_config_file(path: str | Path) -> tuple[TrialConfig, dict[str, Any]]:
    """A TrialConfig YAML (such as the tuner's best_config.yaml) and its optional `provenance` section."""
    raw, _ = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of config sections (data, model, sde, train, eval, sample)")
    provenance = raw.pop("provenance", None) or {}
    if not isinstance(provenance, dict):
        raise ConfigError(f"{path}: provenance: must be a mapping")
    try:
        return TrialConfig.from_dict(raw), provenance
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
