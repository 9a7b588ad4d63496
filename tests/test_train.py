"""Denoising score matching and the training loop."""

import math

import pytest
import torch

from tests.conftest import tiny_config
from trials.sde import VPSDE, gaussian_score
from trials.trainer import Trainer, dsm_loss, eval_model_from_checkpoint, load_checkpoint

SDE = VPSDE()


def _draws(n, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = 1e-5 + (1 - 1e-5) * torch.rand(n, generator=gen)
    return t, torch.randn((n, *shape), generator=gen)


def test_dsm_target_is_zero_for_the_exact_score_of_a_point_mass():
    # For data concentrated at x0, p_t = N(alpha x0, sigma^2) and sigma * score(x_t) = -z exactly.
    x0 = torch.full((512, 1, 4, 4), 0.3)
    t, z = _draws(512, (1, 4, 4))
    exact = gaussian_score(SDE, torch.full((1, 4, 4), 0.3), torch.zeros(1, 4, 4))
    assert dsm_loss(exact, SDE, x0, t, z).item() < 1e-8
    # the wrong sign or scale is penalised by the closed-form amount: (c - 1)^2 E|z|^2 = (c - 1)^2 D
    flipped = dsm_loss(lambda x, s: -exact(x, s), SDE, x0, t, z).item()
    doubled = dsm_loss(lambda x, s: 2 * exact(x, s), SDE, x0, t, z).item()
    d, mean_sq = 16, z.pow(2).flatten(1).sum(1).mean().item()
    assert math.isclose(flipped, 4 * mean_sq, rel_tol=1e-5) and abs(mean_sq / d - 1) < 0.05
    assert math.isclose(doubled, mean_sq, rel_tol=1e-5)


def test_exact_score_of_gaussian_data_minimises_the_dsm_loss():
    mean, std = torch.full((1, 4, 4), 0.4), torch.full((1, 4, 4), 0.2)
    gen = torch.Generator().manual_seed(1)
    x0 = mean + std * torch.randn((20000, 1, 4, 4), generator=gen)
    t, z = _draws(20000, (1, 4, 4), seed=2)
    exact = gaussian_score(SDE, mean, std)
    best = dsm_loss(exact, SDE, x0, t, z).item()
    for scale in (0.9, 1.1):
        assert dsm_loss(lambda x, s: scale * exact(x, s), SDE, x0, t, z).item() > best


def test_short_run_lowers_validation_dsm(mnist5k):
    trainer = Trainer(tiny_config(steps=60, val_every=60), mnist5k)
    before = trainer.val_dsm()
    records = list(trainer.run())
    assert records[-1]["step"] == 60 and not records[-1]["diverged"]
    assert records[-1]["val_dsm"] < 0.7 * before


def test_learning_rate_zero_leaves_weights_unchanged_and_positive_changes_them(mnist5k):
    for lr, should_change in ((0.0, False), (1e-3, True)):
        trainer = Trainer(tiny_config(lr=lr, steps=3, ema_decay=0.0), mnist5k)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        list(trainer.run())
        changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        assert changed == should_change


def test_learning_rate_is_the_one_configured(mnist5k):
    trainer = Trainer(tiny_config(lr=3.7e-4, steps=1), mnist5k)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3.7e-4)


def test_nan_loss_is_reported_as_diverged_without_raising(mnist5k):
    trainer = Trainer(tiny_config(steps=10), mnist5k)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    records = list(trainer.run())
    assert records[-1]["diverged"] and "non-finite" in records[-1]["reason"]
    assert trainer.step == 0


def test_training_is_reproducible_from_the_seed(mnist5k):
    runs = []
    for _ in range(2):
        trainer = Trainer(tiny_config(steps=4), mnist5k)
        runs.append([r["train_loss"] for r in trainer.run()])
    assert runs[0] == runs[1]
    other = Trainer(tiny_config(steps=4, seed=1), mnist5k)
    assert [r["train_loss"] for r in other.run()] != runs[0]


def test_checkpoint_resume_continues_the_same_run(mnist5k, tmp_path):
    straight = Trainer(tiny_config(steps=8), mnist5k)
    list(straight.run())

    first = Trainer(tiny_config(steps=8), mnist5k)
    list(first.run(until_step=5))
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = Trainer(tiny_config(steps=8), mnist5k)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert resumed.step == 5
    list(resumed.run())
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.eval_model.parameters(), resumed.eval_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ema_weights_are_what_is_evaluated(mnist5k, tmp_path):
    trainer = Trainer(tiny_config(steps=5, ema_decay=0.9), mnist5k)
    list(trainer.run())
    assert trainer.eval_model is not trainer.model
    assert any(not torch.equal(a, b) for a, b in zip(trainer.eval_model.parameters(), trainer.model.parameters()))
    trainer.save_checkpoint(tmp_path / "c.pt")
    cfg, model = eval_model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert cfg == trainer.cfg
    for a, b in zip(model.parameters(), trainer.eval_model.parameters()):
        torch.testing.assert_close(a, b)
    no_ema = Trainer(tiny_config(steps=1, ema_decay=0.0), mnist5k)
    assert no_ema.eval_model is no_ema.model
