"""TrialConfig: round trip, defaults, and one-line errors naming the field."""

import pytest

from trials.config import ConfigError, TrialConfig, field_paths, set_dotted


def test_round_trip_through_plain_dict():
    cfg = TrialConfig.from_dict({"model": {"ch_mult": [1, 2, 4], "ch": 48}, "train": {"lr": 3e-4}})
    again = TrialConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.model.ch_mult == (1, 2, 4)
    assert cfg.to_dict()["model"]["ch_mult"] == [1, 2, 4]  # plain lists, so YAML stays readable
    assert set(cfg.flat()) == set(field_paths())


def test_defaults_are_the_seed_settings():
    cfg = TrialConfig.from_dict({})
    assert (cfg.sde.beta_min, cfg.sde.beta_max, cfg.sde.T) == (0.1, 20.0, 1.0)
    assert cfg.train.eps == 1e-5 and cfg.data.name == "mnist-5k"


def test_yaml_style_exponent_strings_are_numbers():
    assert TrialConfig.from_dict({"train": {"lr": "1e-3"}}).train.lr == 1e-3


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"train": {"lrr": 1e-3}}, "train.lrr: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"train": {"lr": -1.0}}, "train.lr: must be"),
        ({"train": {"lr": "fast"}}, "train.lr: must be a number"),
        ({"train": {"batch_size": 12.5}}, "train.batch_size: must be an integer"),
        ({"train": {"batch_size": True}}, "train.batch_size: must be an integer"),
        ({"train": {"steps": 0}}, "train.steps: must be >= 1"),
        ({"model": {"ch_mult": [1, 2, 2, 2]}}, "model.ch_mult: at most 3 levels"),
        ({"model": {"ch_mult": "122"}}, "model.ch_mult: must be a list"),
        ({"model": {"attn_resolutions": [5]}}, "model.attn_resolutions"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"sde": {"beta_max": 0.05}}, "sde.beta_max: must be > beta_min"),
        ({"sde": {"sampling_eps": 0.0}}, "sde.sampling_eps"),
        ({"data": {"name": "cifar"}}, "data.name"),
        ({"data": {"name": "mnist"}}, "data.root: is required"),
        ({"eval": {"fast": {"rtol": 0}}}, "eval.fast.rtol"),
        ({"eval": {"estimator": "exactly"}}, "eval.estimator"),
        ({"eval": {"fast": {"frame": "sigma"}}}, "eval.fast.frame: must be one of logsnr, t"),
        ({"eval": {"fast": {"method": "leapfrog"}}}, "eval.fast.method"),
        ({"eval": {"fast": {"method": "rk4"}}}, "eval.fast.steps: must be >= 1"),
        ({"eval": {"accurate": {"method": "rk4", "steps": 8, "frame": "t"}}}, "eval.accurate.frame: fixed-step"),
        ({"eval": {"accurate": {"method": "dopri5", "steps": 8}}}, "eval.accurate.steps: applies to fixed-step"),
        ({"sample": {"ode_frame": "lambda"}}, "sample.ode_frame"),
        ({"sample": {"ode_method": "rk4"}}, "sample.ode_method"),
        ({"sample": {"ode_method": "multistep"}}, "sample.ode_steps"),  # a multistep method needs its steps
        ({"sample": {"ode_method": "multistep", "ode_steps": 31, "ode_frame": "t"}}, "sample.ode_frame"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"train": {"precision": "fp16"}}, "train.precision"),
        ({"train": 3}, "train: must be a mapping"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(raw)
    message = str(info.value)
    assert message.startswith(field) and "\n" not in message


def test_fidelity_settings_describe_their_solver():
    cfg = TrialConfig.from_dict(
        {"eval": {"fast": {"method": "rk4", "steps": 7}, "accurate": {"frame": "t", "rtol": 1e-5, "atol": 1e-5}}}
    )
    assert cfg.eval.fast.describe() == "logsnr rk4 7 steps"
    assert cfg.eval.accurate.describe() == "t dopri5 rtol 1e-05 atol 1e-05"


def test_set_dotted_builds_nested_overrides():
    tree = {"train": {"lr": 1.0}}
    set_dotted(tree, "train.batch_size", 64)
    set_dotted(tree, "model.ch", 8)
    assert tree == {"train": {"lr": 1.0, "batch_size": 64}, "model": {"ch": 8}}
    with pytest.raises(ConfigError, match="train.lr.x"):
        set_dotted(tree, "train.lr.x", 1)
