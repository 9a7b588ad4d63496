"""The full run as it trains: the training log with val bits/dim, grids along the way, the live MLflow run that
follows it (on a real SQLite store), its report, and the names that tell runs apart."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_MODEL
from trials import full_run
from trials.config import IMAGE_SAMPLER_NAMES, TrialConfig
from trials.portable import OUTPUT, ScoreModel
from trials.sampling import IMAGE_SAMPLERS
from trials.trainer import Trainer
from tuner.full_run_report import trial_curve, write_report
from tuner.mlflow_model import ModelURIError, load_model, log_model
from tuner.mlflow_runs import FullRunTracker, trial_run_name


def config(**sections) -> TrialConfig:
    tree = {
        "model": TINY_MODEL,
        "train": {
            "lr": 2e-3,
            "batch_size": 16,
            "steps": 20,
            "val_every": 5,
            "log_every": 5,
            "val_images": 32,
            "num_threads": 1,
            "ema_decay": 0.9,
            "score_every": 10,
        },
        "eval": {
            "batch_size": 8,
            "fast": {"n_images": 4, "method": "rk4", "steps": 2},
            "accurate": {"n_images": 4, "method": "rk4", "steps": 2},
        },
        "sample": {"n_images": 4, "pc_steps": 4, "ode_rtol": 1e-2, "ode_atol": 1e-2, "every_images": 4},
    }
    for name, values in sections.items():
        tree[name] = {**tree[name], **values}
    return TrialConfig.from_dict(tree)


class Recorder(full_run.Watcher):
    def __init__(self):
        self.records, self.samples = [], []

    def on_record(self, record):
        self.records.append(dict(record))

    def on_samples(self, step, drawn):
        self.samples.append((step, [d["path"] for d in drawn]))


def test_the_sampler_names_a_config_accepts_are_the_tables():
    assert IMAGE_SAMPLER_NAMES == tuple(IMAGE_SAMPLERS)


def test_val_bpd_is_scored_every_score_every_steps_at_the_trials_last_step_and_at_the_end(mnist5k, tmp_path):
    cfg = config(train={"steps": 25}, sample={"every": 10, "sampler": "both"})
    plan = full_run.prepare(cfg, {"steps_trained": 15}, Path("best_config.yaml"), tmp_path)
    watcher, lines = Recorder(), []
    outcome = full_run.run_training(plan, checkpoint_every=100, log=lines.append, watcher=watcher)
    # The watcher sees each record as it is appended, val bits/dim where scored; the grids as they are drawn.
    assert [r["step"] for r in watcher.records] == [5, 10, 15, 20, 25] == [r["step"] for r in outcome.history]
    scored = [r["step"] for r in outcome.history if "val_bpd" in r]
    assert scored == [10, 15, 20, 25]  # every 10 steps, the trial's last step (15), the end
    assert all(r["val_bpd"] > 0 and r["val_bpd_nfe"] == 4 * 2 for r in outcome.history if "val_bpd" in r)
    assert outcome.scoring_seconds == pytest.approx(
        sum(r["val_bpd_seconds"] for r in outcome.history if "val_bpd" in r)
    )
    assert watcher.samples == [
        (step, [f"samples/step_{step}_pc.png", f"samples/step_{step}_ode.png"]) for step in (10, 20)
    ]
    assert all((tmp_path / path).is_file() for _, paths in watcher.samples for path in paths)
    assert any("val_bpd" in line for line in lines if line.startswith("step 10/25"))

    metrics = full_run.finish(plan, outcome, log=lambda _: None)
    assert metrics["train"]["trial_steps"] == 15 and metrics["train"]["score_every"] == 10
    assert 0 < metrics["train"]["scoring_share"] < 1
    assert [d["step"] for d in metrics["samples_during_training"]] == [10, 10, 20, 20]
    assert set(metrics["samples"]) == set(IMAGE_SAMPLERS)  # one end-of-run grid per sampler of the table


def test_scoring_reads_the_ema_weights_and_leaves_the_run_unchanged(mnist5k, tmp_path):
    scored = full_run.prepare(config(sample={"every": 5}), {}, Path("c.yaml"), tmp_path / "a")
    plain = full_run.prepare(config(train={"score_every": 1000}), {}, Path("c.yaml"), tmp_path / "b")
    for plan in (scored, plain):
        plan.out_dir.mkdir()
        full_run.run_training(plan, checkpoint_every=100, log=lambda _: None)
    for a, b in zip(scored.trainer.eval_model.parameters(), plain.trainer.eval_model.parameters()):
        assert a.equal(b)
    assert scored.trainer.rng.get_state().equal(plain.trainer.rng.get_state())


def test_a_run_resumed_with_other_scoring_and_grids_continues(mnist5k, tmp_path):
    first = full_run.prepare(config(train={"steps": 10}), {}, Path("c.yaml"), tmp_path)
    full_run.run_training(first, checkpoint_every=100, log=lambda _: None)
    later = full_run.prepare(
        config(train={"steps": 20, "score_every": 5}, sample={"every": 10}), {}, Path("c.yaml"), tmp_path
    )
    assert later.resume is not None
    outcome = full_run.run_training(later, checkpoint_every=100, log=lambda _: None)
    assert [r["step"] for r in outcome.history if "val_bpd" in r] == [10, 15, 20]
    assert [d["step"] for d in outcome.samples] == [20] and outcome.resumed_from == 10


def test_a_run_stopped_and_continued_to_the_step_it_stopped_at_scores_its_end(mnist5k, tmp_path):
    long = full_run.prepare(config(train={"steps": 30, "score_every": 100}), {}, Path("c.yaml"), tmp_path)
    stopped = full_run.run_training(
        long, checkpoint_every=100, stop_requested=lambda: long.trainer.step >= 10, log=lambda _: None
    )
    assert stopped.step == 10 and "val_bpd" not in stopped.history[-1]
    short = full_run.prepare(config(train={"steps": 10, "score_every": 100}), {}, Path("c.yaml"), tmp_path)
    watcher = Recorder()
    outcome = full_run.run_training(short, checkpoint_every=100, log=lambda _: None, watcher=watcher)
    assert outcome.completed and [r["step"] for r in outcome.history] == [5, 10]
    assert outcome.history[-1]["val_bpd"] > 0 and "val_dsm" in outcome.history[-1] and outcome.scoring_seconds > 0
    assert [r["step"] for r in watcher.records] == [10]
    assert "val_bpd" in full_run.load_checkpoint(tmp_path / "checkpoint.pt")["full_run"]["history"][-1]


# ---- the MLflow run, live ----------------------------------------------------------------------------------
def test_the_mlflow_run_is_live_continues_when_resumed_and_says_how_it_ended(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "full_run"
    kwargs = dict(
        config_file=Path("best_config.yaml"),
        params={"train.lr": 0.002},
        provenance={"trial_id": "t1"},
        tags={"precision": "fp32"},
        log=lambda _: None,
    )
    tracker = FullRunTracker(uri, out, **kwargs)
    client = MlflowClient(uri)
    tracker.flush()
    run_id = tracker.run_id
    assert run_id and client.get_run(run_id).info.status == "RUNNING"  # there from the first step
    for step in (5, 10):
        tracker.on_record(
            {
                "step": step,
                "train_loss": 1.0 / step,
                "images_per_sec": 100.0,
                **({"val_dsm": 0.5, "val_bpd": 3.0, "val_bpd_stderr": 0.1} if step == 10 else {}),
            }
        )
    grid = out / "samples" / "step_10_ode.png"
    grid.parent.mkdir(parents=True)
    grid.write_bytes(b"png")
    tracker.on_samples(10, [{"path": "samples/step_10_ode.png"}])
    tracker.end("KILLED")
    tracker.flush()
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "val_bpd")] == [10]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_10_ode.png"]

    # The same folder and store: the same run, RUNNING again; steps it holds are not sent twice.
    again = FullRunTracker(uri, out, **kwargs)
    again.flush()
    assert again.resumed and again.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    for step in (10, 15):
        again.on_record({"step": step, "train_loss": 1.0 / step, "images_per_sec": 100.0})
    # The end of a run continued with --steps at the step it stopped at is scored into its last record: only the
    # new values go out.
    again.on_record({"step": 15, "train_loss": 1.0 / 15, "images_per_sec": 100.0, "val_bpd": 2.5})
    again.end("FAILED")
    again.flush()
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [5, 10, 15]
    assert [m.step for m in client.get_metric_history(run_id, "val_bpd")] == [10, 15]
    assert client.get_run(run_id).info.status == "FAILED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    # Another store: a run of its own there.
    other = FullRunTracker(f"sqlite:///{tmp_path / 'other.db'}", out, **kwargs)
    other.flush()
    assert not other.resumed and other.run_id != run_id


# ---- names and the report ----------------------------------------------------------------------------------
def test_a_trials_run_name_says_its_hyperparameters():
    name = trial_run_name(
        {
            "lr": 3.2e-3,
            "batch_size": 128,
            "num_res_blocks": 2,
            "ch_mult": [1, 2, 4],
            "sampling_eps": 1e-4,
            "model.dropout": 0.1,
        },
        "05e85_00003",
    )
    assert name == "lr 3.2e-3 · bs 128 · rb 2 · ch 1-2-4 · eps 1e-4 · dropout 0.1 · 05e85_00003"
    assert trial_run_name({"lr": 0.0123, "sampling_eps": 2.5e-5}, "a") == "lr 0.0123 · eps 2.5e-5 · a"


def test_the_trials_own_curve_is_found_in_its_experiment_folder(tmp_path):
    experiment = tmp_path / "cpu"
    for trial_id, folder in (("t2", "run_trial_t2"), ("t1", "run_trial_t1")):
        (experiment / folder).mkdir(parents=True)
        rows = [{"trial_id": trial_id, "step": s, "val_bpd": 5.0 - s / 100} for s in (40, 80, 40, 160)]
        (experiment / folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (experiment / "best_config.yaml").write_text("data: {name: mnist-5k}\neval: {seed: 0}\n")
    metrics = {
        "provenance": {"trial_id": "t1", "experiment": "cpu"},
        "config_file": str(experiment / "best_config.yaml"),
    }
    curve, note = trial_curve(metrics, {"data": {"name": "mnist-5k"}, "eval": {"seed": 0}})
    assert [r["step"] for r in curve] == [40, 80, 160] and "t1" in note and "run_trial_t1" in note
    assert trial_curve(metrics, {"data": {"name": "mnist"}, "eval": {"seed": 0}})[0] == []  # another measure
    assert "hand-written" in trial_curve({"provenance": {}}, None)[1]


def test_the_report_is_one_self_contained_page_with_the_trials_curve(mnist5k, tmp_path):
    experiment = tmp_path / "cpu"
    (experiment / "run_trial_t1").mkdir(parents=True)
    rows = [{"trial_id": "t1", "step": s, "val_bpd": 9.0, "train_loss": 500.0, "val_dsm": 400.0} for s in (5, 10)]
    (experiment / "run_trial_t1" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(sample={"every": 10})
    (experiment / "best_config.yaml").write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    out = experiment / "full_run"
    out.mkdir()
    plan = full_run.prepare(
        cfg, {"trial_id": "t1", "experiment": "cpu", "steps_trained": 10}, experiment / "best_config.yaml", out
    )
    full_run.write_config(plan)
    full_run.finish(plan, full_run.run_training(plan, checkpoint_every=100, log=lambda _: None), log=lambda _: None)
    page_path, curves = write_report(out)
    page = page_path.read_text()
    assert curves.is_file() and "<script" not in page and 'src="http' not in page
    assert page.count("data:image/png;base64,") == 1 + len(IMAGE_SAMPLERS) + 2  # curves, end grids, steps 10, 20
    assert "Dashed: tuning trial t1" in page and "At step 10, the trial's last rung" in page
    assert "Test bits/dim: " in page and "95% interval" in page and "Provenance" in page


def test_a_full_run_scores_as_often_as_keeps_scoring_near_its_share_of_the_run():
    # cpu.yaml's fast fidelity (16 images, multistep x 31 = 32 NFE) and val_every 40: bigger batches, more
    # frequent scores
    cfg = config(
        train={"val_every": 40, "score_every": None},
        eval={"fast": {"n_images": 16, "method": "multistep", "steps": 31}, "accurate": {"n_images": 32}},
    )
    intervals = {
        b: TrialConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "batch_size": b}}).score_interval
        for b in (32, 64, 128)
    }
    assert intervals == {32: 1280, 64: 640, 128: 320}  # 4 x 16 x 32 / (batch x 5%), up to a multiple of 40
    assert config(train={"score_every": 7}).score_interval == 7


# ---- the model in MLflow ----------------------------------------------------------------------------------
def test_a_portable_model_samples_by_itself_with_the_runs_settings(mnist5k):
    cfg = config()
    trainer = Trainer(cfg, mnist5k)
    list(trainer.run(until_step=3))  # an untrained network predicts no noise: a zero score, no Langevin step size
    model = ScoreModel(copy.deepcopy(trainer.eval_model).eval(), cfg.to_dict())
    images = model.sample(4, "pc", seed=3)
    assert images.shape == (4, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    with trainer.evaluating() as score:
        expected = IMAGE_SAMPLERS["pc"].draw(
            score,
            trainer.sde,
            (4, 1, 28, 28),
            eps=cfg.sde.sampling_eps,
            sample=cfg.sample,
            generator=torch.Generator().manual_seed(3),
        )
    torch.testing.assert_close(model.draw(4, "pc", seed=3).x, expected.x)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("models:/nothing/1", "cannot load it in sqlite"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "cannot load it"),
        ("models:/", "cannot load it"),
        ("a/folder", "not a model URI"),
    ],
)
def test_a_model_uri_that_names_nothing_is_one_line(tmp_path, uri, expected):
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # an empty store
    with pytest.raises(ModelURIError, match=expected) as error:
        load_model(uri, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "\n" not in str(error.value)
    with pytest.raises(ModelURIError, match="there is no MLflow store at"):
        load_model("models:/nothing/1", f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_the_network_round_trips_through_the_registry_and_a_local_copy(mnist5k, tmp_path):
    cfg = config()
    trainer = Trainer(cfg, mnist5k)
    list(trainer.run(until_step=5))
    network = copy.deepcopy(trainer.eval_model).eval()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    experiment = client.create_experiment("vpsde-tune", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    logged = log_model(
        uri,
        run_id,
        network,
        cfg.to_dict(),
        input_shape=(1, 28, 28),
        output=OUTPUT,
        step=5,
        out_dir=tmp_path,
        register_as="tiny",
    )
    assert logged.registered_uri == "models:/tiny/1" and logged.local_copy is None
    x, t = torch.rand(5, 1, 28, 28), torch.rand(5)  # another batch size than the export's example
    for model_uri in (logged.registered_uri, f"runs:/{run_id}/model", logged.model_uri):
        loaded, config_dict = load_model(model_uri, uri)
        torch.testing.assert_close(loaded(x, t), network(x, t), rtol=1e-4, atol=1e-5)
        assert TrialConfig.from_dict(config_dict) == cfg
    # No run (the store never created it): the model is kept in the run folder and handed on for later.
    kept = []
    local = log_model(
        uri,
        None,
        network,
        cfg.to_dict(),
        input_shape=(1, 28, 28),
        output=OUTPUT,
        step=5,
        out_dir=tmp_path,
        keep_locally=kept.append,
    )
    assert local.model_uri is None and kept == [tmp_path / "mlflow_model"]
    loaded, _ = load_model(str(local.local_copy))
    torch.testing.assert_close(loaded(x, t), network(x, t), rtol=1e-4, atol=1e-5)
    # Logging and loading used MLflow's process-wide store only for the call: a subprocess started now (a tuning
    # driver) would otherwise inherit $MLFLOW_TRACKING_URI and write its runs to this store.
    assert os.environ.get("MLFLOW_TRACKING_URI") == before


def test_a_trials_child_run_is_named_by_its_hyperparameters(tmp_path):
    from types import SimpleNamespace

    from tuner.space import load_space
    from tuner.tracking import MlflowTrialLogger

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MlflowTrialLogger(uri, tmp_path / "tiny", "tiny", space, max_steps=20)
    trial = SimpleNamespace(
        trial_id="0a1b2_00003",
        config={"lr": 0.00123, "batch_size": 16, "num_res_blocks": 2, "ch_mult": "1,2,4", "sampling_eps": 3e-4},
    )
    logger.on_trial_start(0, [], trial)
    logger.tracker.flush()
    run = MlflowClient(uri).get_run(logger.tracker.child_run_ids()["0a1b2_00003"])
    assert run.info.run_name == "lr 1.2e-3 · bs 16 · rb 2 · ch 1-2-4 · eps 3e-4 · 0a1b2_00003"
