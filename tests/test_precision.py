"""train.precision: bf16 autocast for the network's training forward, everything else float32."""

import pytest
import torch

from tests.conftest import tiny_config
from trials.config import ConfigError, TrialConfig
from trials.precision import auto_precision, resolve_precision
from trials.trainer import Trainer, load_checkpoint


@pytest.mark.parametrize(
    "device_type, cuda_bf16, capabilities, expected",
    [
        ("cuda", True, {}, "bf16"),
        ("cuda", False, {"avx512_bf16": True}, "fp32"),  # a pre-Ampere GPU; the host CPU does not matter
        ("cpu", False, {"avx512_f": True, "avx512_bf16": True, "amx_bf16": False}, "bf16"),
        ("cpu", False, {"avx512_bf16": False, "amx_bf16": True}, "bf16"),
        ("cpu", False, {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, "fp32"),
        ("cpu", True, {"architecture": "aarch64", "bf16": True}, "fp32"),
        ("cpu", False, {}, "fp32"),
        ("mps", False, {"avx512_bf16": True}, "fp32"),
    ],
)
def test_auto_is_bf16_only_where_the_device_has_bf16_units(device_type, cuda_bf16, capabilities, expected):
    assert auto_precision(device_type, cuda_bf16, capabilities) == expected


def test_auto_resolves_by_the_rule_on_this_machine_and_explicit_settings_pass_through():
    cpu = torch.device("cpu")
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    assert resolve_precision("auto", cpu) == auto_precision("cpu", False, capabilities)
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("value", ["fp16", "BF16", "float32", ""])
def test_a_bad_precision_is_a_one_line_config_error_naming_the_field(value):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict({"train": {"precision": value}})
    assert str(info.value).startswith("train.precision: must be 'fp32', 'bf16' or 'auto'")
    assert "\n" not in str(info.value)


def test_the_default_stays_fp32_and_the_setting_is_exported():
    assert TrialConfig.from_dict({}).train.precision == "fp32"  # configs written before the field
    cfg = TrialConfig.from_dict({"train": {"precision": "auto"}})
    assert cfg.flat()["train.precision"] == "auto" and TrialConfig.from_dict(cfg.to_dict()) == cfg


def _conv_output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.down[0].blocks[0].conv1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision, activations", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_setting_reaches_the_network_and_the_state_stays_float32(mnist5k, precision, activations):
    trainer = Trainer(tiny_config(steps=5, precision=precision), mnist5k)
    training, validation = _conv_output_dtypes(trainer.model), _conv_output_dtypes(trainer.eval_model)
    records = list(trainer.run(until_step=3))  # 3 training steps, then the validation DSM at step 3
    assert trainer.precision == precision and records[-1]["precision"] == precision
    assert training == [activations] * 3
    assert validation and set(validation) == {torch.float32}  # the validation DSM is float32 at any precision
    # The master weights, their gradients, Adam's moments and the EMA are float32 whatever the precision.
    for p in trainer.model.parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.eval_model.parameters())


def test_auto_reaches_the_trainer_resolved(mnist5k):
    trainer = Trainer(tiny_config(steps=1, precision="auto"), mnist5k)
    assert trainer.precision == resolve_precision("auto", trainer.device) in ("fp32", "bf16")


@pytest.mark.slow  # 2 x 60 training steps, bf16 on a CPU
def test_bf16_training_lowers_the_dsm_loss_as_fp32_does(mnist5k):
    val = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(steps=60, val_every=60, precision=precision), mnist5k)
        before = trainer.val_dsm()
        after = list(trainer.run())[-1]["val_dsm"]
        val[precision] = (before, after)
    (before32, after32), (before16, after16) = val["fp32"], val["bf16"]
    assert before16 == before32  # same seed, same initial weights, and validation is float32 in both
    assert after32 < 0.7 * before32 and after16 < 0.7 * before16
    # bf16 rounds the activations (8 significant bits), so the runs drift apart, but they learn alike: from
    # 780 both end near 40, within 25% of each other (fp32 with another seed ends 13% away).
    assert 0.8 < after16 / after32 < 1.25
    assert after16 != after32  # and bf16 really ran


def test_a_bf16_run_resumes_bit_for_bit(mnist5k, tmp_path):
    straight = Trainer(tiny_config(steps=8, precision="bf16"), mnist5k)
    list(straight.run())
    first = Trainer(tiny_config(steps=8, precision="bf16"), mnist5k)
    list(first.run(until_step=5))
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = Trainer(tiny_config(steps=8, precision="bf16"), mnist5k)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    list(resumed.run())
    for a, b in zip(straight.eval_model.parameters(), resumed.eval_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
