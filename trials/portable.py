"""A trained network with the config it needs, as one object that samples by itself.

The full run logs its EMA network to MLflow as a PyTorch model in MLflow's safe `pt2` format (tuner/mlflow_model.py):
a torch.export program of the noise predictor eps_theta(x, t), with the run's TrialConfig in the model's metadata.
Loading it needs neither this repository's checkpoint format nor its code:

    net = mlflow.pytorch.load_model("models:/NAME/1")          # eps_theta(x, t): x (B, C, H, W), t (B,) in [eps, T]
    config = mlflow.models.get_model_info("models:/NAME/1").metadata["vpsde"]["config"]
    # score(x, t) = -eps_theta(x, t) / sigma(t); sigma(t) of the SDE in config["sde"] (trials/sde.py)

With this repository, `ScoreModel(net, config).sample(16)` draws images with the samplers of trials/sampling.py,
as `python sample.py --model models:/NAME/1` does. A train.py checkpoint gives the same object through
`ScoreModel.from_checkpoint`. Plain PyTorch: trials/ never imports MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trials.config import SampleConfig, TrialConfig
from trials.model import score_fn
from trials.sampling import IMAGE_SAMPLERS, Samples, to_image_range
from trials.sde import make_sde
from trials.trainer import eval_model_from_checkpoint

# What the MLflow model's forward computes, written into its metadata beside the config.
OUTPUT = (
    "eps_theta(x, t): the noise that perturbed x_0 into x_t = alpha(t) x_0 + sigma(t) z; "
    "score(x, t) = -eps_theta(x, t) / sigma(t)"
)


class ScoreModel(nn.Module):
    """The noise-prediction network of a run and its config: forward(x, t) is eps_theta, `score` the score."""

    def __init__(self, network: nn.Module, config: dict[str, Any] | TrialConfig):
        super().__init__()
        self.network = network
        self.cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
        self.sde = make_sde(self.cfg.sde)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device | str = "cpu") -> ScoreModel:
        """The evaluation weights (EMA when saved) of a trials.trainer checkpoint dict."""
        cfg, network = eval_model_from_checkpoint(ckpt, device)
        return cls(network, cfg)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, t)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score_fn(self.network, self.sde)(x, t)

    @torch.no_grad()
    def draw(
        self,
        n: int,
        sampler: str = "ode",
        *,
        sample: SampleConfig | None = None,
        seed: int | None = None,
        report: Callable[[str], None] | None = None,
    ) -> Samples:
        """n images in model space from trials.sampling.IMAGE_SAMPLERS[sampler], with the run's sample settings
        (or `sample`) and its sampling eps; raises trials.odesolve.ODEFailure when the ODE cannot be solved."""
        sc = sample or self.cfg.sample
        generator = torch.Generator(device=self.device).manual_seed(sc.seed if seed is None else seed)
        return IMAGE_SAMPLERS[sampler].draw(
            score_fn(self.network, self.sde),
            self.sde,
            self.cfg.dataset.batch_shape(n),
            eps=self.cfg.sde.sampling_eps,
            sample=sc,
            generator=generator,
            device=self.device,
            report=report,
        )

    def sample(self, n: int = 16, sampler: str = "ode", *, seed: int | None = None) -> torch.Tensor:
        """n images (n, C, H, W) with pixel intensities in [0, 1]."""
        return to_image_range(self.draw(n, sampler, seed=seed).x, self.cfg.data.centered)
