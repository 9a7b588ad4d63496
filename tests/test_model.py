"""The UNet: shapes for every supported layout, time conditioning, attention placement, score_fn, dropout."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from trials.config import ModelConfig
from trials.model import AttnBlock, UNet, count_parameters, group_norm, score_fn
from trials.sde import VPSDE


def make_unet(seed: int = 0, perturb: bool = True, **cfg) -> UNet:
    """A small UNet; `perturb` adds noise to every weight so the zero-initialised layers stop hiding the rest."""
    torch.manual_seed(seed)
    model = UNet(ModelConfig(**{"ch": 8, "num_res_blocks": 1, **cfg}), channels=1, image_size=28)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ch_mult", [(1, 2, 2), (1, 2, 4), (1, 2, 8)])
@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_output_shape(ch_mult, num_res_blocks):
    model = make_unet(ch_mult=ch_mult, num_res_blocks=num_res_blocks)
    out = model(images(2), torch.tensor([0.2, 0.9]))
    assert out.shape == (2, 1, 28, 28)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("ch_mult", [(1,), (2, 1)])
def test_fewer_levels(ch_mult):
    out = make_unet(ch_mult=ch_mult, attn_resolutions=())(images(2), torch.tensor([0.2, 0.9]))
    assert out.shape == (2, 1, 28, 28)


def test_group_norm_groups_divide_channels():
    # ch = 24 gives 24- and 48-channel feature maps, which a fixed 32 groups cannot split.
    model = make_unet(ch=24, ch_mult=(1, 2, 2))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    groups = {m.num_channels: m.num_groups for m in norms}
    assert set(groups) >= {24, 48}
    assert groups[24] == 6 and groups[48] == 12  # min(C // 4, 32) where it divides C
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    assert model(images(1), torch.tensor([0.5])).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("channels, groups", [(1, 1), (7, 1), (8, 2), (32, 8), (64, 16), (128, 32), (144, 24)])
def test_group_norm_rule(channels, groups):
    assert group_norm(channels).num_groups == groups


def test_untrained_network_predicts_zero_noise():
    model = make_unet(perturb=False)
    assert torch.equal(model(images(2), torch.tensor([0.1, 0.8])), torch.zeros(2, 1, 28, 28))


def test_time_conditioning_changes_output():
    model = make_unet().eval()
    x = images(2)
    early, late = model(x, torch.full((2,), 0.1)), model(x, torch.full((2,), 0.9))
    # Not a rounding-level change: the time embedding must survive every GroupNorm after it.
    assert (early - late).abs().max() > 0.01 * early.abs().max()


def test_each_sample_uses_its_own_time():
    # Row i of a batch with mixed times equals running sample i alone: no mixing across the batch.
    model = make_unet().eval()
    x, t = images(3), torch.tensor([0.05, 0.5, 1.0])
    batched = model(x, t)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], model(x[i : i + 1], t[i : i + 1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn_resolutions", [(), (7,), (14,), (28, 7)])
def test_attention_only_at_listed_resolutions(attn_resolutions):
    num_res_blocks = 2
    model = make_unet(attn_resolutions=attn_resolutions, num_res_blocks=num_res_blocks)
    seen = []
    for m in model.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    model(images(1), torch.tensor([0.5]))
    # Per listed resolution: num_res_blocks on the way down, num_res_blocks + 1 on the way up;
    # plus the one in the middle, always at 7.
    expected = Counter({r: 2 * num_res_blocks + 1 for r in attn_resolutions}) + Counter({7: 1})
    assert Counter(seen) == expected
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == sum(expected.values())


def test_score_fn_is_minus_noise_over_sigma():
    model, sde = make_unet().eval(), VPSDE(beta_min=0.1, beta_max=20.0)
    x, t = images(4), torch.tensor([0.01, 0.3, 0.7, 1.0])
    score = score_fn(model, sde)(x, t)
    eps = model(x, t)
    for i, ti in enumerate(t.tolist()):
        # sigma(t)^2 = 1 - exp(-integral_0^t beta), written out here independently of VPSDE.
        sigma = math.sqrt(1.0 - math.exp(-(0.5 * ti**2 * (20.0 - 0.1) + ti * 0.1)))
        torch.testing.assert_close(score[i], -eps[i] / sigma, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter():
    model = make_unet(ch_mult=(1, 2), attn_resolutions=(14,))
    out = model(images(2), torch.tensor([0.3, 0.6]))
    (out * images(2, seed=2)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_dropout_only_in_train_mode():
    x, t = images(2), torch.tensor([0.3, 0.6])
    model = make_unet(dropout=0.5)
    model.train()
    assert not torch.equal(model(x, t), model(x, t))
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    # Without dropout, train mode is deterministic too: the randomness above came from dropout.
    no_dropout = make_unet(dropout=0.0).train()
    assert torch.equal(no_dropout(x, t), no_dropout(x, t))


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2
