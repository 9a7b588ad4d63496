"""The full run (train.py): loads the tuner's export, trains, resumes exactly, measures, logs to MLflow.

The best_config.yaml under test is written by tuner.export.write_outputs itself, into a real MLflow store
with the tuning experiment's parent and trial runs; only Ray's analysis object is replaced by the two
attributes write_outputs reads from it. The command line runs in subprocesses, as a user runs it.
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from trials import full_run
from trials.config import TrialConfig, load_config_file
from trials.likelihood import LikelihoodEvaluator
from trials.portable import ScoreModel
from trials.trainer import Trainer, load_checkpoint
from tuner.export import write_outputs
from tuner.mlflow_model import tracking_store
from tuner.space import parse_space

ROOT = Path(__file__).resolve().parents[1]
TRIAL_ID = "a1b2c3d4"
TRIAL_LR = 2e-3
FIXED = {
    "model": {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "train": {
        "steps": 20,
        "batch_size": 16,
        "val_every": 10,
        "log_every": 5,
        "val_images": 32,
        "ema_decay": 0.9,
        "num_threads": 1,
        "score_every": 50,
    },
    "eval": {
        "batch_size": 8,
        "fast": {"n_images": 8, "rtol": 1e-2, "atol": 1e-2},
        "accurate": {"n_images": 8, "rtol": 1e-2, "atol": 1e-2},
    },
    "sample": {"n_images": 4, "pc_steps": 10, "ode_rtol": 1e-3, "ode_atol": 1e-3, "every_images": 4},
}
GRID_PIXELS = 2 * 28 + 3 * 2  # 4 images in a 2 x 2 grid, 2-pixel padding around and between them


class DriverTracker:
    """The attributes and the one call of tuner.tracking.ExperimentTracker that write_outputs uses, on a real
    MLflow store (the real tracker needs Ray)."""

    def __init__(self, tracking_uri: str, storage: Path):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_id = self.client.create_experiment(
            "vpsde-tune", artifact_location=(storage / "mlartifacts").resolve().as_uri()
        )
        self.parent_run_id = self.client.create_run(self.experiment_id, run_name="tiny-full").info.run_id
        self.trial_run_id = self.client.create_run(
            self.experiment_id, run_name=TRIAL_ID, tags={"mlflow.parentRunId": self.parent_run_id, "trial_id": TRIAL_ID}
        ).info.run_id

    def log_summary(self, metrics, tags, artifacts):
        for path in artifacts:
            self.client.log_artifact(self.parent_run_id, str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """runs/tiny-full/best_config.yaml as the tuning driver exports it, for a one-trial experiment."""
    storage = tmp_path_factory.mktemp("runs")
    space = parse_space(
        {
            "name": "tiny-full",
            "fixed": FIXED,
            "hyperparameters": {"lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3}},
            "search": {"grace_period": 10},
        },
        "tiny-full.yaml",
        sha256="0" * 64,
    )
    tracker = DriverTracker(f"sqlite:///{storage / 'mlflow.db'}", storage)
    table = pd.DataFrame(
        [
            {
                "trial_id": TRIAL_ID,
                "status": "completed",
                "lr": TRIAL_LR,
                "val_bpd_last": 9.1,
                "val_bpd_accurate": 9.0,
                "val_bpd_accurate_stderr": 0.1,
                "steps": 20,
                "mlflow_run_id": tracker.trial_run_id,
            }
        ]
    )
    rescores = {TRIAL_ID: {"mean": 9.0, "stderr": 0.1, "nfe": 50, "failed": False, "fidelity": {"name": "accurate"}}}
    analysis = SimpleNamespace(
        trials=[SimpleNamespace(trial_id=TRIAL_ID, config={"lr": TRIAL_LR})], get_last_checkpoint=lambda trial: None
    )
    export = write_outputs(storage / "tiny-full", space, table, rescores, analysis, tracker)
    return SimpleNamespace(
        path=export.paths["best_config"], config=space.trial_config({"lr": TRIAL_LR}), tracker=tracker
    )


def train_py(*args, cwd: Path, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny(**train) -> TrialConfig:
    tree = {k: dict(v) for k, v in FIXED.items()}
    tree["train"] = {**tree["train"], "lr": TRIAL_LR, **train}
    return TrialConfig.from_dict(tree)


def assert_same_state(a: dict, b: dict) -> None:
    """Two trainer state dicts hold identical tensors (model, EMA, optimiser, RNG) and the same step."""
    assert a["step"] == b["step"]
    for key in ("model", "ema", "optimizer", "rng", "torch_rng"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ---- the export ------------------------------------------------------------------------------------------
def test_the_drivers_export_loads_unchanged(exported):
    text = exported.path.read_text()
    assert "provenance:" in text and f"python train.py --config {exported.path}" in text
    cfg, provenance = load_config_file(exported.path)
    assert cfg == exported.config and cfg.train.lr == TRIAL_LR
    assert full_run.with_overrides(cfg) == cfg
    assert provenance["trial_id"] == TRIAL_ID and provenance["experiment"] == "tiny-full"
    assert provenance["mlflow_run_id"] == exported.tracker.trial_run_id


# ---- end to end ------------------------------------------------------------------------------------------
def full_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`tuning.trial_id` = '{TRIAL_ID}'")


def wait_for(probe, timeout: float = 60.0):
    """probe() until it returns something true: the outbox may send in the background."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
    return found


@pytest.mark.slow
def test_full_run_end_to_end_live_in_mlflow_stops_resumes_measures_and_logs_a_model(exported, mnist5k, tmp_path):
    out = exported.path.parent / "full_run"  # the default --out
    client, experiment_id = exported.tracker.client, exported.tracker.experiment_id
    # A long run logs to the tuning experiment's store (the provenance's URI) from its first step: while it
    # trains, its MLflow run is RUNNING and holds the training log so far, val bits/dim at the trial's last step
    # (step 20) included.
    cmd = [sys.executable, "-u", str(ROOT / "train.py"), "--config", str(exported.path), "--steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if re.match(r"step +20/100000 .*val_bpd", line):
            break
    live = wait_for(
        lambda: [
            r
            for r in full_runs(client, experiment_id)
            if [m.step for m in client.get_metric_history(r.info.run_id, "val_bpd")] == [20]
        ]
    )[0]
    assert live.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(live.info.run_id, "train_loss")][:4] == [5, 10, 15, 20]
    # Ctrl-C: a checkpoint at the next logged step, exit 130, the MLflow run KILLED with the curves so far.
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    stopped_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert stopped_at % 5 == 0 and f"Stopped at step {stopped_at}; checkpoint saved" in stdout
    assert not (out / "metrics.json").exists()
    killed = client.get_run(live.info.run_id)
    assert killed.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(live.info.run_id, "train_loss")] == list(
        range(5, stopped_at + 1, 5)
    )

    # The same config with its own step count continues from there (only the step count, and what is scored or
    # drawn along the way, may change), in the same MLflow run; the model is logged and registered at the end.
    steps = stopped_at + 10
    result = train_py(
        "--config",
        exported.path,
        "--steps",
        steps,
        "--checkpoint-every",
        8,
        "--sample-every",
        10,
        "--register-model",
        "tiny-vpsde",
        cwd=tmp_path,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {out / 'checkpoint.pt'} at step {stopped_at}" in result.stdout
    assert f"run {live.info.run_id} (continued)" in result.stdout
    logged = [int(line.split()[1].split("/")[0]) for line in result.stdout.splitlines() if line.startswith("step ")]
    # every log_every = 5 steps, at each checkpoint (8), grid (10) and val bits/dim score (every 50 steps)
    expected = sorted(
        {s for s in range(stopped_at + 1, steps + 1) if s % 5 == 0 or s % 8 == 0 or s % 10 == 0} | {steps}
    )
    assert logged == expected

    # Exactly the weights, EMA, optimiser and RNG of an uninterrupted run, which neither scores nor draws; and the
    # val bits/dim at the trial's last step is what the tuning evaluator (same images and probes) gives its model.
    straight = Trainer(full_run.with_overrides(exported.config, steps=steps), mnist5k)
    list(straight.run(until_step=20))
    tuning_evaluator = LikelihoodEvaluator.build(mnist5k.val, exported.config.eval, exported.config.data.centered)
    with straight.evaluating() as score:
        at_20 = tuning_evaluator.evaluate(score, straight.sde, exported.config.sde.sampling_eps, "fast").mean
    list(straight.run())
    assert_same_state(load_checkpoint(out / "checkpoint.pt"), straight.state_dict())

    metrics = json.loads((out / "metrics.json").read_text())
    bpd = metrics["test_bpd"]
    assert bpd["split"] == "val" and metrics["data"]["test_split"] == "val"  # mnist-5k: the held-out split
    assert 0 < bpd["mean"] < 30 and bpd["stderr"] > 0 and bpd["nfe"] > 0 and not bpd["failed"]
    assert bpd["fidelity"]["name"] == "accurate" and bpd["fidelity"]["n_images"] == 8 == len(bpd["per_image"])
    assert metrics["train"]["steps"] == steps and metrics["train"]["resumed_from_step"] == stopped_at
    assert metrics["train"]["precision"] == "fp32"  # the config does not set it: the default
    assert {r["precision"] for r in metrics["history"]} == {"fp32"}
    history_steps = [r["step"] for r in metrics["history"]]
    assert history_steps[-len(expected) :] == expected and history_steps[:4] == [5, 10, 15, 20]  # both sessions
    scored = {r["step"]: r["val_bpd"] for r in metrics["history"] if "val_bpd" in r}
    assert sorted(scored) == sorted({20, steps} | {s for s in history_steps if s % 50 == 0})
    assert scored[20] == pytest.approx(at_20, rel=1e-6)
    assert 0 < metrics["train"]["scoring_seconds"] < metrics["train"]["seconds"]
    assert metrics["train"]["final_train_loss"] == metrics["history"][-1]["train_loss"]
    assert metrics["samples"]["pc"]["nfe"] == 10 * 2 and metrics["samples"]["ode"]["nfe"] > 0
    for name in ("samples_pc.png", "samples_ode.png"):
        assert Image.open(out / name).size == (GRID_PIXELS, GRID_PIXELS)
    during = metrics["samples_during_training"]
    assert [d["step"] for d in during] == [s for s in range(stopped_at + 1, steps + 1) if s % 10 == 0]
    assert all(d["sampler"] == "ode" and (out / d["path"]).is_file() for d in during)
    used, provenance = load_config_file(out / "config.yaml")
    assert used == full_run.with_overrides(exported.config, steps=steps, sample_every=10)
    assert provenance["trial_id"] == TRIAL_ID

    # The report: one self-contained page (figures embedded), with the test score, the grids and the samples.
    page = (out / "report.html").read_text()
    assert "<script" not in page and 'src="http' not in page
    assert page.count("data:image/png;base64,") == 1 + 2 + len(during)  # curves, the two grids, the grids on the way
    assert f"Test bits/dim: {bpd['mean']:.4f}" in page and "were not found" in page  # no trial results in this test

    # One MLflow run, the same since step 5, in the tuning experiment's store, tagged with its origin.
    runs = full_runs(client, experiment_id)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == live.info.run_id and run.info.status == "FINISHED"
    assert f"(run {run.info.run_id})" in result.stdout
    assert run.data.tags["tuning.experiment"] == "tiny-full"
    assert run.data.tags["tuning.trial_run_id"] == exported.tracker.trial_run_id
    assert run.data.tags["mlflow.parentRunId"] == exported.tracker.parent_run_id
    assert "trial_id" not in run.data.tags  # the driver finds its trials' runs by that tag
    assert run.data.params["train.lr"] == str(TRIAL_LR) and run.data.params["model.ch_mult"] == "[1, 2, 2]"
    assert run.data.metrics["test_bpd"] == pytest.approx(bpd["mean"])
    assert run.data.metrics["ode_nfe"] == metrics["samples"]["ode"]["nfe"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "samples_pc.png", "samples_ode.png", "report", "samples"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {
        "report/report.html",
        "report/curves.png",
    }
    assert len(client.list_artifacts(run.info.run_id, "samples")) == len(during)
    for key in ("train_loss", "val_bpd"):  # each step once, though steps after the checkpoint ran twice
        history = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert history == (history_steps if key == "train_loss" else sorted(scored))

    # The model: the EMA network, loaded from MLflow without this repository's checkpoint format, by its run and
    # by its registered name, computes what the checkpoint's network computes; sample.py draws from it.
    uri = exported.tracker.tracking_uri
    assert "registered as models:/tiny-vpsde/1" in result.stdout
    ema = ScoreModel.from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    x, t = torch.rand(3, 1, 28, 28), torch.tensor([0.01, 0.5, 1.0])
    with tracking_store(uri):
        for model_uri in (f"runs:/{run.info.run_id}/model", "models:/tiny-vpsde/1"):
            network = mlflow.pytorch.load_model(model_uri)
            torch.testing.assert_close(network(x, t), ema(x, t), rtol=1e-4, atol=1e-5)
            assert mlflow.models.get_model_info(model_uri).metadata["vpsde"]["config"] == used.to_dict()
    grid = tmp_path / "from_registry.png"
    sampled = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            "--model",
            "models:/tiny-vpsde/1",
            "--mlflow-uri",
            uri,
            "--sampler",
            "ode",
            "--n",
            "4",
            "--out",
            str(grid),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert Image.open(grid).size == (GRID_PIXELS, GRID_PIXELS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "uri, expected",
    [
        ("models:/no-such-model/1", "models:/no-such-model/1: cannot load it in sqlite"),
        ("runs:/0123456789abcdef/model", "runs:/0123456789abcdef/model: cannot load"),
        ("no-model-here", "no-model-here: not a model URI"),
    ],
)
def test_sample_py_refuses_a_model_uri_that_names_nothing_in_one_line(exported, tmp_path, uri, expected):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            "--model",
            uri,
            "--mlflow-uri",
            exported.tracker.tracking_uri,
            "--out",
            str(tmp_path / "g.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("sample.py: error: ")
    assert expected in result.stderr and not (tmp_path / "g.png").exists()


# ---- resuming, in process ----------------------------------------------------------------------------------
def plan(cfg: TrialConfig, out: Path) -> full_run.FullRunPlan:
    out.mkdir(exist_ok=True)
    return full_run.prepare(cfg, {}, Path("config.yaml"), out)


def test_steps_k_then_steps_n_equals_an_uninterrupted_run(mnist5k, tmp_path):
    lines = []
    straight = plan(tiny(steps=20), tmp_path / "straight")
    full_run.run_training(straight, checkpoint_every=100, log=lines.append)

    short = plan(tiny(steps=10), tmp_path / "split")
    assert short.resume is None
    first = full_run.run_training(short, checkpoint_every=100, log=lines.append)
    assert first.completed and first.step == 10

    longer = plan(tiny(steps=20), tmp_path / "split")
    assert longer.resume is not None and longer.resume["step"] == 10
    outcome = full_run.run_training(longer, checkpoint_every=100, log=lines.append)
    assert outcome.completed and outcome.resumed_from == 10 and outcome.step == 20
    assert f"Resumed from {tmp_path / 'split' / 'checkpoint.pt'} at step 10" in lines
    assert [r["step"] for r in outcome.history] == [5, 10, 15, 20]
    assert outcome.seconds >= first.seconds
    assert_same_state(load_checkpoint(tmp_path / "split" / "checkpoint.pt"), straight.trainer.state_dict())


def test_a_stop_request_is_honoured_at_the_next_logged_step(mnist5k, tmp_path):
    run = plan(tiny(steps=20), tmp_path)
    stopped = full_run.run_training(
        run, checkpoint_every=100, stop_requested=lambda: run.trainer.step >= 7, log=lambda _: None
    )
    # log_every = 5: the request made after step 7 is seen at step 10, where the trainer's state is whole.
    assert not stopped.completed and stopped.step == 10
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 10 and [r["step"] for r in saved["full_run"]["history"]] == [5, 10]


def test_the_test_score_and_both_samplers_report_progress_with_the_time_left(mnist5k, tmp_path, monkeypatch):
    monkeypatch.setattr(full_run, "PROGRESS_EVERY_S", 0.0)  # a line at every step: the run is seconds long
    cfg = TrialConfig.from_dict({**tiny(steps=5).to_dict(), "eval": {**FIXED["eval"], "batch_size": 4}})
    run = plan(cfg, tmp_path)
    outcome = full_run.run_training(run, checkpoint_every=100, log=lambda _: None)
    lines = []
    metrics = full_run.finish(run, outcome, log=lines.append)
    # 8 test images in chunks of 4: one line after the first chunk, then the result.
    scoring = [line for line in lines if line.startswith("  Test bits/dim 4/8: images (")]
    assert len(scoring) == 1 and "left)" in scoring[0]
    pc = [line for line in lines if line.startswith("  PC sampling ")]
    assert [line.split()[2] for line in pc] == [f"{k}/10:" for k in range(1, 10)] and all("left)" in x for x in pc)
    ode = [line for line in lines if line.startswith("  ODE sampling ")]
    shares = [int(line.split()[2].rstrip("%:")) for line in ode]
    assert len(ode) >= 3 and shares == sorted(shares) and shares[-1] > 50  # lambda covered, in order
    assert metrics["samples"]["ode"]["nfe"] >= len(ode)


def test_only_the_step_count_may_change_on_resume(mnist5k, tmp_path):
    trainer = Trainer(tiny(steps=5), mnist5k)
    list(trainer.run())
    path = tmp_path / "checkpoint.pt"
    trainer.save_checkpoint(path, full_run={"seconds": 1.0, "history": []})
    assert full_run.read_resume_state(path, tiny(steps=30))["step"] == 5
    assert full_run.read_resume_state(tmp_path / "none.pt", tiny()) is None
    with pytest.raises(
        full_run.ResumeError, match=r"different config \(train.lr: 0.002 in the checkpoint, 0.001 now\)"
    ):
        full_run.read_resume_state(path, tiny(lr=1e-3))
    with pytest.raises(full_run.ResumeError, match="already at step 5, past the 3 steps"):
        full_run.read_resume_state(path, tiny(steps=3))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(full_run.ResumeError, match="not a readable full-run checkpoint"):
        full_run.read_resume_state(path, tiny())


# ---- errors from the command line ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_of_another_config_is_refused_with_one_line(exported, mnist5k, tmp_path):
    other = Trainer(tiny(lr=1e-3, steps=2), mnist5k)
    list(other.run())
    out = tmp_path / "out"
    out.mkdir()
    other.save_checkpoint(out / "checkpoint.pt", full_run={"seconds": 1.0, "history": []})
    result = train_py("--config", exported.path, "--out", out, "--no-mlflow", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("train.py: error: ")
    assert "train.lr: 0.001 in the checkpoint, 0.002 now" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "problem",
    [
        "missing file",
        "unknown key",
        "bad value",
        "zero steps",
        "sample.every 0",
        "unknown sampler",
        "score_every 0",
        "register without mlflow",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(exported, tmp_path, problem):
    config = tmp_path / "best_config.yaml"
    text = exported.path.read_text()
    extra, expected = [], ""
    if problem == "missing file":
        config, expected = tmp_path / "nope.yaml", "nope.yaml: no such file"
    elif problem == "unknown key":
        config.write_text(text.replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  warmup: 3\n"))
        expected = "train.warmup: unknown key"
    elif problem == "bad value":
        config.write_text(text.replace("  batch_size: 16\n", "  batch_size: -4\n"))
        expected = "train.batch_size: must be >= 1, got -4"
    elif problem == "sample.every 0":
        config.write_text(text.replace("  every: null\n", "  every: 0\n"))
        expected = "sample.every: must be >= 1"
    elif problem == "unknown sampler":
        config.write_text(text.replace("  sampler: ode\n", "  sampler: ddim\n"))
        expected = "sample.sampler: must be one of pc, ode, both, got 'ddim'"
    elif problem == "score_every 0":
        config.write_text(text.replace("  score_every: 50\n", "  score_every: 0\n"))
        expected = "train.score_every: must be >= 1"
    elif problem == "register without mlflow":
        config.write_text(text)
        extra, expected = ["--register-model", "m", "--no-mlflow"], "--register-model needs MLflow"
    else:
        config.write_text(text)
        extra, expected = ["--steps", "0"], "--steps: must be a positive integer, got 0"
    before = sorted(tmp_path.rglob("*"))
    result = train_py("--config", config, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("train.py: error: ")
    assert expected in result.stderr and result.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before
