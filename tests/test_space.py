"""Search-space files: the shipped spaces load, bad spaces fail with one line, conversion to Optuna/Ray."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuner.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
GOOD = {
    "name": "t",
    "hyperparameters": {
        "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
        "batch_size": {"type": "choice", "values": [128, 256, 512]},
        "num_res_blocks": {"type": "choice", "values": [1, 2]},
        "ch_mult": {"type": "choice", "values": [[1, 2, 2], [1, 2, 4], [1, 2, 8]]},
        "sampling_eps": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
    },
    "fixed": {"model": {"ch": 16}, "train": {"steps": 100, "val_every": 20}},
    "search": {"grace_period": 20},
}


def write(tmp_path, raw) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def variant(**changes):
    """GOOD with dotted-path changes; a value of ... deletes the key."""
    import copy

    raw = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            node.pop(leaf)
        else:
            node[leaf] = value
    return raw


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert {hp.name for hp in space.hyperparameters} >= {"lr", "batch_size", "ch_mult"}


def test_cpu_and_gpu_spaces_tune_the_seeds_five_hyperparameters():
    five = {"lr", "batch_size", "num_res_blocks", "ch_mult", "sampling_eps"}
    gpu = load_space(ROOT / "search_spaces" / "vpsde.yaml")
    cpu = load_space(ROOT / "search_spaces" / "cpu.yaml")
    assert {hp.name for hp in gpu.hyperparameters} == five == {hp.name for hp in cpu.hyperparameters}
    by = {hp.name: hp for hp in gpu.hyperparameters}
    assert (by["lr"].kind, by["lr"].low, by["lr"].high) == ("loguniform", 1e-5, 1e-2)
    assert by["batch_size"].values == (128, 256, 512) and by["num_res_blocks"].values == (1, 2)
    assert by["ch_mult"].values == ([1, 2, 2], [1, 2, 4], [1, 2, 8])
    assert (by["sampling_eps"].low, by["sampling_eps"].high) == (1e-5, 1e-3)
    assert gpu.resources.gpus_per_trial > 0
    assert cpu.base_config.model.ch < gpu.base_config.model.ch
    assert cpu.base_config.train.steps < gpu.base_config.train.steps


BAD = [
    (variant(colour="red"), "colour: unknown section"),
    (
        variant(hyperparameters__depth={"type": "choice", "values": [1, 2]}),
        "hyperparameters.depth: unknown hyperparameter",
    ),
    (
        variant(hyperparameters__lr={"type": "loguniform", "low": 1e-2, "high": 1e-5}),
        "hyperparameters.lr.low: must be < high",
    ),
    (
        variant(hyperparameters__lr={"type": "loguniform", "low": 0, "high": 1e-2}),
        "hyperparameters.lr.low: must be > 0",
    ),
    (
        variant(hyperparameters__lr={"type": "loguniform", "low": -1e-3, "high": 1e-2}),
        "hyperparameters.lr.low: must be > 0",
    ),
    (
        variant(hyperparameters__lr={"type": "loguniform", "low": "small", "high": 1e-2}),
        "hyperparameters.lr.low: must be a finite number",
    ),
    (variant(hyperparameters__lr={"type": "gaussian", "low": 1, "high": 2}), "hyperparameters.lr.type: must be one of"),
    (
        variant(hyperparameters__lr={"type": "loguniform", "low": 1e-5, "high": 1e-2, "step": 2}),
        "hyperparameters.lr.step: unknown key",
    ),
    (
        variant(hyperparameters__batch_size={"type": "choice", "values": []}),
        "hyperparameters.batch_size.values: must be a non-empty list",
    ),
    (
        variant(hyperparameters__batch_size={"type": "choice", "values": [64, 64]}),
        "hyperparameters.batch_size.values: has duplicates",
    ),
    (
        variant(hyperparameters__batch_size={"type": "choice", "values": [128, "big"]}),
        "hyperparameters.batch_size: value 'big' is not usable: train.batch_size: must be an integer",
    ),
    (
        variant(hyperparameters__ch_mult={"type": "choice", "values": [[1, 2, 2], [1, 2, 2, 2]]}),
        "hyperparameters.ch_mult: value [1, 2, 2, 2] is not usable",
    ),
    (
        variant(hyperparameters__num_res_blocks={"type": "choice", "values": [0, 1]}),
        "hyperparameters.num_res_blocks: value 0 is not usable",
    ),
    (
        variant(hyperparameters__sampling_eps={"type": "loguniform", "low": 1e-5, "high": 2.0}),
        "hyperparameters.sampling_eps: value 2.0 is not usable",
    ),
    (variant(hyperparameters={}), "hyperparameters: must be a non-empty mapping"),
    (variant(hyperparameters__lr=0.001), "hyperparameters.lr: must be a mapping"),
    (variant(fixed__train__lrate=0.1), "fixed.train.lrate: unknown key"),
    (variant(fixed__model__ch="wide"), "fixed.model.ch: must be an integer"),
    (variant(search__algorithm="bayes"), "search.algorithm: must be one of tpe, gp, random"),
    (variant(search__scheduler="pbt"), "search.scheduler: must be one of asha, fifo"),
    (variant(search__num_samples=0), "search.num_samples: must be >= 1"),
    (variant(search__num_samples="many"), "search.num_samples: must be an integer"),
    (variant(search__patience=3), "search.patience: unknown key"),
    (variant(search__grace_period=5), "search.grace_period: must be >= fixed.train.val_every"),
    (variant(search__grace_period=500), "search.grace_period: must be <= fixed.train.steps"),
    (variant(search__points_to_evaluate=[{"lr": 1.0}]), "search.points_to_evaluate[0].lr: must be a number in"),
    (
        variant(search__points_to_evaluate=[{"ch_mult": [1, 1, 1]}]),
        "search.points_to_evaluate[0].ch_mult: [1, 1, 1] is not one of",
    ),
    (variant(resources__gpus_per_trial=2), "resources.gpus_per_trial: must be in [0, 1]"),
    (variant(resources__cpus_per_trial=0), "resources.cpus_per_trial: must be > 0"),
    (variant(name="a/b"), "name: must be a non-empty word"),
    ("hyperparameters: [unclosed", "not valid YAML at line 1"),
    ("- just\n- a list\n", "must be a mapping with sections"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m for _, m in BAD])
def test_bad_spaces_give_one_line_errors_naming_file_and_field(tmp_path, raw, message):
    path = write(tmp_path, raw)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_missing_file(tmp_path):
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "nope.yaml")


def test_conversion_to_optuna_and_ray(tmp_path):
    import optuna
    from ray.tune.search.sample import Categorical, Float

    space = load_space(write(tmp_path, GOOD))
    dists = space.to_optuna()
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log
    assert (dists["lr"].low, dists["lr"].high) == (1e-5, 1e-2)
    assert dists["ch_mult"].choices == ("1,2,2", "1,2,4", "1,2,8")  # Optuna holds scalars only
    assert dists["batch_size"].choices == (128, 256, 512)
    ray_space = space.to_ray()
    assert isinstance(ray_space["lr"], Float) and isinstance(ray_space["ch_mult"], Categorical)
    assert ray_space["ch_mult"].categories == ["1,2,2", "1,2,4", "1,2,8"]
    # Optuna's own sampling goes through the decoder into a valid TrialConfig
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask(dists)
        cfg = space.trial_config(trial.params)
        assert cfg.model.ch_mult in ((1, 2, 2), (1, 2, 4), (1, 2, 8))
        assert cfg.train.lr == trial.params["lr"] and cfg.train.batch_size == trial.params["batch_size"]
        assert cfg.sde.sampling_eps == trial.params["sampling_eps"]
        assert cfg.model.ch == 16  # the fixed settings stay


def test_dotted_hyperparameters_and_randint(tmp_path):
    raw = variant()
    raw["hyperparameters"]["model.dropout"] = {"type": "uniform", "low": 0.0, "high": 0.3}
    raw["hyperparameters"]["train.warmup_steps"] = {"type": "randint", "low": 0, "high": 50}
    space = load_space(write(tmp_path, raw))
    cfg = space.trial_config({"model.dropout": 0.2, "train.warmup_steps": 7, "lr": 1e-3})
    assert cfg.model.dropout == 0.2 and cfg.train.warmup_steps == 7
    assert space.to_ray()["train.warmup_steps"].upper == 51  # Ray's randint excludes its upper bound


def test_each_kind_answers_the_questions_callers_ask(tmp_path):
    raw = variant()
    raw["hyperparameters"]["model.dropout"] = {"type": "uniform", "low": 0.0, "high": 0.3}
    raw["hyperparameters"]["train.warmup_steps"] = {"type": "randint", "low": 0, "high": 50}
    by = {hp.name: hp for hp in load_space(write(tmp_path, raw)).hyperparameters}
    lr, ch, dropout, warmup = by["lr"], by["ch_mult"], by["model.dropout"], by["train.warmup_steps"]
    assert lr.log_scale and not lr.is_choice and ch.is_choice and not dropout.log_scale and not warmup.is_choice
    assert lr.middle() == pytest.approx(1e-5**0.5 * 1e-2**0.5) and dropout.middle() == pytest.approx(0.15)
    assert warmup.middle() == 25 and ch.middle() == "1,2,4"  # the searcher's label of the middle choice
    assert ch.probes() == [[1, 2, 2], [1, 2, 4], [1, 2, 8]] and lr.probes() == [1e-5, 1e-2]
    assert warmup.probes() == [0, 50] and all(type(v) is int for v in warmup.probes())
    assert ch.contains([1, 2, 4]) and not ch.contains([1, 1, 1])
    assert lr.contains(1e-3) and not lr.contains(1.0) and not lr.contains(True) and not lr.contains("0.001")
    assert lr.describe() == "loguniform [1e-05, 0.01]" and ch.describe() == "choice [[1, 2, 2], [1, 2, 4], [1, 2, 8]]"


def test_points_to_evaluate_fill_in_the_hyperparameters_they_do_not_name(tmp_path):
    raw = variant(search__points_to_evaluate=[{"lr": 1e-3}])
    raw["hyperparameters"]["num_res_blocks"] = {"type": "choice", "values": [1, 3]}  # fixed 2 is not a choice
    raw["hyperparameters"]["model.dropout"] = {"type": "uniform", "low": 0.2, "high": 0.3}  # fixed 0.1 is outside
    raw["hyperparameters"]["train.warmup_steps"] = {"type": "randint", "low": 10, "high": 51}  # fixed 0 is outside
    (point,) = load_space(write(tmp_path, raw)).points_to_evaluate
    assert point == {
        "lr": 1e-3,
        "batch_size": 128,
        "num_res_blocks": 1,
        "ch_mult": "1,2,2",
        "sampling_eps": 1e-3,
        "model.dropout": pytest.approx(0.25),
        "train.warmup_steps": 30,
    }


def test_space_hash_tracks_the_file(tmp_path):
    a = load_space(write(tmp_path, GOOD))
    b = load_space(write(tmp_path, variant(search__seed=3)))
    assert len(a.sha256) == 64 and a.sha256 != b.sha256


@pytest.mark.slow
def test_tune_cli_rejects_a_bad_space_with_one_line_and_exit_2(tmp_path):
    bad = write(tmp_path, variant(hyperparameters__lr={"type": "loguniform", "low": 0, "high": 1}))
    storage = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, str(ROOT / "tune.py"), "--space", str(bad), "--storage", str(storage)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "hyperparameters.lr.low" in out.stderr
    assert "Traceback" not in out.stderr and not storage.exists()  # nothing started, nothing written


@pytest.mark.slow
def test_tune_cli_rejects_mnist_without_root_before_starting(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tune.py"),
            "--space",
            str(ROOT / "search_spaces" / "tiny.yaml"),
            "--data",
            "mnist",
            "--storage",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2 and "data.root" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_the_readme_example_space_is_a_valid_space(tmp_path):
    readme = (ROOT / "docs" / "configuration.md").read_text()  # the README's reference pages
    section = readme.split("### Search spaces", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    space = load_space(write(tmp_path, example))
    assert space.name == "cpu" and {hp.name for hp in space.hyperparameters} == {"lr", "ch_mult"}
    assert space.search.startup_trials == 4 and space.points_to_evaluate == ()
