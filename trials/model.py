"""The noise-prediction UNet: the DDPM architecture (Ho et al., 2020) sized for 1x28x28 MNIST.

The network predicts the noise that perturbed x_0 into x_t, eps(x_t, t) ~ -sigma(t) * grad log p_t(x_t);
`score_fn` turns it into the score by dividing by -sigma(t), as score_sde_pytorch does for the continuous
VP SDE. Time t in [0, 1] enters through a sinusoidal embedding of 999 * t, the discrete DDPM timestep scale
that the sinusoid frequencies were designed for.

Layout, for ch_mult = (1, 2, 2) at resolutions 28, 14, 7:
    conv_in -> [ResBlock x num_res_blocks (+ attention), downsample] per level
            -> middle ResBlock, attention, ResBlock
            -> [ResBlock x (num_res_blocks + 1) on concatenated skips (+ attention), upsample] per level
            -> GroupNorm, SiLU, conv_out
The last conv of every residual branch and conv_out start at zero, so each block starts as the identity
and the untrained network predicts zero noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trials.config import ModelConfig, TrialConfig
from trials.sde import SDE, ScoreFn, per_sample


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups that divide `channels`, at most 32 and at least 4 channels each.

    This is score_sde's min(C // 4, 32) wherever that divides C (32 -> 8, 64 -> 16, 128 -> 32), extended
    to any C (24 -> 6, 144 -> 24, C < 8 -> 1). Groups of one channel would be a trap: normalising a single
    channel removes its mean, and with it the time embedding that each ResBlock adds per channel.
    """
    most = min(32, channels // 4)
    return nn.GroupNorm(max((g for g in range(1, most + 1) if channels % g == 0), default=1), channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of 999 * t, with geometric frequencies from 1 to 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = 999.0 * t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class UNet(nn.Module):
    """The noise predictor for images of `channels` x `image_size` x `image_size` (a trials.datasets row)."""

    def __init__(self, cfg: ModelConfig, channels: int, image_size: int):
        super().__init__()
        ch, temb_dim, resolutions = cfg.ch, 4 * cfg.ch, cfg.resolutions(image_size)
        attn = set(cfg.attn_resolutions)
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim), nn.SiLU())
        self.conv_in = nn.Conv2d(channels, ch, 3, padding=1)

        # Down path; `skip_chs` records the channels of every feature map the up path will concatenate.
        self.down, skip_chs, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.blocks.append(ResBlock(cur, ch * mult, temb_dim, cfg.dropout))
                cur = ch * mult
                stage.attns.append(AttnBlock(cur) if resolutions[level] in attn else nn.Identity())
                skip_chs.append(cur)
            stage.downsample = None
            if level < len(cfg.ch_mult) - 1:
                stage.downsample = nn.Conv2d(cur, cur, 3, stride=2, padding=1)
                skip_chs.append(cur)
            self.down.append(stage)

        self.mid_block1 = ResBlock(cur, cur, temb_dim, cfg.dropout)
        self.mid_attn = AttnBlock(cur)
        self.mid_block2 = ResBlock(cur, cur, temb_dim, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.blocks.append(ResBlock(cur + skip_chs.pop(), ch * mult, temb_dim, cfg.dropout))
                cur = ch * mult
                stage.attns.append(AttnBlock(cur) if resolutions[level] in attn else nn.Identity())
            stage.upsample = nn.Conv2d(cur, cur, 3, padding=1) if level > 0 else None
            self.up.append(stage)
        assert not skip_chs  # every skip connection is consumed exactly once

        self.norm_out = group_norm(cur)
        self.conv_out = zero_init(nn.Conv2d(cur, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(h, temb))
                skips.append(h)
            if stage.downsample is not None:
                h = stage.downsample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)

        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            if stage.upsample is not None:
                h = stage.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def unet_for(cfg: TrialConfig) -> UNet:
    """The UNet a trial config describes, for the images of its dataset."""
    return UNet(cfg.model, cfg.dataset.channels, cfg.dataset.image_size)


def score_fn(model: nn.Module, sde: SDE) -> ScoreFn:
    """The score grad log p_t(x) of a noise-predicting model: -eps(x, t) / sigma(t), per sample."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = per_sample(sde.marginal_std(t), x)
        return -model(x, t) / sigma

    return score


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
