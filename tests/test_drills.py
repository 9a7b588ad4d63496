"""Fault drills, end to end: what a search does when a process or the tracking server dies under it.

Each drill runs `tune.py` as a user would, on a fast space (tiny.yaml with 40-step trials and FIFO, so every
trial lives through four rungs and there is time to hit one mid-way), injects the fault from outside, and checks
the outcome against Tune's own record of what the trials reported (each trial's result.json): that is exactly
what an undisturbed search sends to MLflow.

  1. The tracking server is SIGKILLed mid-search, and while it is down a trial's worker process is SIGKILLed too;
     the server comes back before the search ends (the driver is paused while it starts, so that "before"
     holds on any machine). The search finishes (exit 0) with one line about the outage; the trial is restored
     from its checkpoint without repeating a step; every rung reaches MLflow exactly once.
  2. The tracking server is SIGKILLed mid-search and stays down. The search finishes with all its files and
     exit 3; so does a full run of its winner. With the server back, `tune.py --resume` re-runs nothing and sends
     the rest, and `python -m tuner.sync` sends the full run's: the same runs as if it had never gone away.
  3. The driver is SIGKILLed mid-search and a running trial's checkpoint is truncated; `--resume` finishes the
     search: one parent, one child per trial, the export written, the damaged trial recorded as errored.

Only loopback addresses; every process started here is stopped here.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.servers import MlflowServer, kill_group

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
STEPS = 40
RUNGS = list(range(10, STEPS + 1, 10))
WAIT_S = 600
SMALL_SAMPLES = {"n_images": 4, "pc_steps": 10, "ode_rtol": 1.0e-3, "ode_atol": 1.0e-3}
pytestmark = pytest.mark.slow


# ---- running and watching a search ------------------------------------------------------------------------
def drill_space(tmp_path: Path, **search) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["fixed"]["train"]["steps"] = STEPS
    raw["search"].update(
        {"scheduler": "fifo", "num_samples": 2, "max_concurrent": 2, "top_k": 1, "max_failures": 1, **search}
    )
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    }


def tune_cmd(tmp_path: Path, space: Path, *extra: str) -> list[str]:
    """tune.py on the drill's experiment ("drill" under tmp_path/runs)."""
    runs = tmp_path / "runs"
    return [
        sys.executable,
        str(ROOT / "tune.py"),
        "--space",
        str(space),
        "--name",
        "drill",
        "--storage",
        str(runs),
        *extra,
    ]


def launch(tmp_path: Path, space: Path, *extra: str, log_name: str = "tune.log") -> tuple[subprocess.Popen, Path]:
    log = tmp_path / log_name
    with open(log, "w") as out:
        proc = subprocess.Popen(
            tune_cmd(tmp_path, space, *extra),
            cwd=tmp_path,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=WAIT_S)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return log.read_text()


def wait_for(what: str, predicate, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"tune.py ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    kill_group(proc)
    raise AssertionError(f"no {what} within {WAIT_S} s:\n{log.read_text()[-3000:]}")


def results(experiment_dir: Path) -> dict[str, list[dict]]:
    """trial_id -> every result Tune recorded for it, in order (the last line of a file may be half-written)."""
    out = {}
    for path in sorted(experiment_dir.glob("*/result.json")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            out.setdefault(record["trial_id"], []).append(record)
    return out


def running_trial(experiment_dir: Path, min_step: int = 10) -> dict | None:
    """The last result of a trial that has reported a rung at `min_step` or later and is not done yet.

    Tune logs a result before it registers the checkpoint that came with it, so only the rung before the last
    is sure to have a checkpoint: a trial that must be restored from one needs min_step of two rungs."""
    for records in results(experiment_dir).values():
        last = records[-1]
        if min_step <= last["step"] < STEPS and not last.get("done"):
            return last
    return None


def kill_running_trial(experiment_dir: Path, proc: subprocess.Popen, log: Path) -> dict:
    """SIGKILL the worker of a trial restorable from a checkpoint; on a loaded machine the one picked may end
    between the look and the kill, so look again until a kill lands."""
    while True:
        victim = wait_for("a running trial with a checkpoint", lambda: running_trial(experiment_dir, 20), proc, log)
        try:
            os.kill(victim["pid"], signal.SIGKILL)
            return victim
        except ProcessLookupError:
            time.sleep(0.3)


def rungs(records: list[dict], key: str = "val_bpd") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records]


# ---- checking MLflow against Tune ---------------------------------------------------------------------------
def check_mlflow_matches_tune(client: MlflowClient, experiment_dir: Path) -> tuple:
    """One parent, finished; one child per trial with exactly the rungs Tune recorded; the export attached."""
    state = json.loads((experiment_dir / "mlflow.json").read_text())
    runs = client.search_runs([state["experiment_id"]], max_results=1000)
    parents = [r for r in runs if r.info.run_name == "drill" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == state["parent_run_id"]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["search.num_samples"]
    assert "best_val_bpd_accurate" in parent.data.metrics
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "trial_id" in r.data.tags
    ]
    table = pd.read_csv(experiment_dir / "trials.csv")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(table.trial_id)  # one child per trial
    assert dict(zip(table.trial_id, table.mlflow_run_id)) == {c.data.tags["trial_id"]: c.info.run_id for c in children}
    recorded = results(experiment_dir)
    for child in children:
        trial_id = child.data.tags["trial_id"]
        assert child.data.tags["status"] == table[table.trial_id == trial_id].status.iloc[0]
        for key in ("val_bpd", "train_loss"):
            history = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, key)]
            assert history == rungs(recorded[trial_id], key), f"trial {trial_id}: {key} in MLflow differs from Tune's"
    for artifact in ("best_config.yaml", "trials.csv", "rescores.json"):
        downloaded = client.download_artifacts(
            parent.info.run_id, artifact, dst_path=str(experiment_dir.parent / f"downloaded-{artifact}")
        )
        assert Path(downloaded).read_bytes() == (experiment_dir / artifact).read_bytes(), artifact
    provenance = yaml.safe_load((experiment_dir / "best_config.yaml").read_text())["provenance"]
    assert provenance["mlflow_parent_run_id"] == parent.info.run_id
    assert provenance["mlflow_experiment_id"] == state["experiment_id"]
    assert provenance["mlflow_run_id"] == dict(zip(table.trial_id, table.mlflow_run_id))[provenance["trial_id"]]
    assert not (experiment_dir / "mlflow_outbox.jsonl").exists()
    return parent, children, table


# ---- the drills ---------------------------------------------------------------------------------------------
def test_tracking_server_and_a_trial_worker_killed_mid_search(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path).start()
    proc, log = launch(tmp_path, drill_space(tmp_path), "--mlflow-uri", server.uri)
    experiment = tmp_path / "runs" / "drill"
    try:
        wait_for("a first rung", lambda: running_trial(experiment), proc, log)
        server.kill()
        wait_for("the driver noticing the outage", lambda: "is not answering" in log.read_text(), proc, log)
        victim = kill_running_trial(experiment, proc, log)
        # The server must be back before the search ends, however long it takes to start on a loaded machine:
        # the driver is paused meanwhile (SIGSTOP), and learns of the dead worker when it goes on.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            server.start()  # the same port and database
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        output = finish(proc, log)
    finally:
        server.stop()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("is not answering") == 1 and "kept in" in output  # one line for the whole outage

    # The killed trial was restored from its checkpoint: a new process went on from the rung it had reached,
    # so every rung appears in order, and the restored session started past the first iteration. One rung may
    # appear twice: Tune logs a result before it registers the checkpoint that came with it, so a kill between
    # the two restores from the rung before, and the new process reports that rung again.
    records = results(experiment)[victim["trial_id"]]
    steps = [r["step"] for r in records]
    before = [r for r in records if r["pid"] == victim["pid"]]
    after = [r for r in records if r["pid"] != victim["pid"]]
    assert sorted(set(steps)) == RUNGS and steps == sorted(steps)
    assert steps == [r["step"] for r in before + after]  # the old process's rungs, then the new one's
    if len(steps) != len(RUNGS):  # only the rung at the hand-over may be repeated, and only once
        assert len(steps) == len(RUNGS) + 1 and before[-1]["step"] == after[0]["step"]
    assert after and after[0]["step"] > victim["step"] - 10 and after[0]["step"] > 10
    assert after[0]["iterations_since_restore"] < after[0]["training_iteration"]
    table = pd.read_csv(experiment / "trials.csv")
    assert list(table.status) == ["completed", "completed"]

    server.start()  # to read back what arrived
    try:
        check_mlflow_matches_tune(MlflowClient(tracking_uri=server.uri), experiment)
    finally:
        server.stop()


def test_tracking_server_gone_for_good_then_back_and_backfilled(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path).start()
    space = drill_space(tmp_path)
    proc, log = launch(tmp_path, space, "--mlflow-uri", server.uri)
    experiment = tmp_path / "runs" / "drill"
    try:
        wait_for("a first rung", lambda: running_trial(experiment), proc, log)
        server.kill()
        output = finish(proc, log)
    finally:
        server.stop()
    # The search is done and on disk; the exit status says MLflow is not complete.
    assert proc.returncode == 3, output[-3000:]
    assert output.count("is not answering") == 1
    assert "--resume" in output.split("has not got everything")[-1]
    for name in ("trials.csv", "best_config.yaml", "rescores.json"):
        assert (experiment / name).exists(), name
    assert (experiment / "mlflow_outbox.jsonl").exists()
    before = results(experiment)
    assert all([r["step"] for r in rs] == RUNGS for rs in before.values())

    # A full run of the winner while the server is still down: results on disk, records kept, exit 3.
    config = yaml.safe_load((experiment / "best_config.yaml").read_text())
    config["sample"] = SMALL_SAMPLES  # the tiny space keeps the default 1,000-step sampler
    config["eval"]["accurate"].update(n_images=4, rtol=1.0e-2, atol=1.0e-2)  # a quick test score
    (experiment / "quick_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    full_run = experiment / "full_run"
    result = run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(experiment / "quick_config.yaml"), "--steps", "10"],
        tmp_path,
    )
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"python -m tuner.sync {full_run}" in result.stderr
    assert (full_run / "metrics.json").exists() and (full_run / "mlflow_outbox.jsonl").exists()

    server.start()
    try:
        resumed = run(tune_cmd(tmp_path, space, "--resume"), tmp_path)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "finished search: nothing to re-run" in resumed.stdout
        assert results(experiment) == before  # nothing trained again
        synced = run([sys.executable, "-m", "tuner.sync", str(full_run)], tmp_path)
        assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]

        client = MlflowClient(tracking_uri=server.uri)
        parent, children, table = check_mlflow_matches_tune(client, experiment)
        assert table.mlflow_run_id.notna().all()  # ids the export could not know are filled in
        metrics = json.loads((full_run / "metrics.json").read_text())
        (run_,) = client.search_runs([parent.info.experiment_id], filter_string="tags.`vpsde.role` = 'full-run'")
        assert run_.info.status == "FINISHED" and run_.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run_.data.metrics["test_bpd"] == pytest.approx(metrics["test_bpd"]["mean"])
        assert [m.step for m in client.get_metric_history(run_.info.run_id, "train_loss")] == [
            r["step"] for r in metrics["history"]
        ]
        assert {"metrics.json", "config.yaml", "samples_pc.png", "samples_ode.png"} <= {
            a.path for a in client.list_artifacts(run_.info.run_id)
        }
        assert not (full_run / "mlflow_outbox.jsonl").exists()
    finally:
        server.stop()


def test_driver_killed_and_a_checkpoint_truncated_then_resumed(tmp_path):
    space = drill_space(tmp_path, num_samples=3)
    proc, log = launch(tmp_path, space)
    experiment = tmp_path / "runs" / "drill"
    victim = wait_for("a running trial with a checkpoint", lambda: running_trial(experiment), proc, log)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only; then whatever of its Ray is left, so nothing trains on
    proc.wait(timeout=60)
    time.sleep(1)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    damaged = []
    for path in experiment.glob(f"*{victim['trial_id']}*/checkpoint_*/trainer.pt"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        damaged.append(path)
    assert damaged, f"trial {victim['trial_id']} has no checkpoint on disk"

    resumed = run(tune_cmd(tmp_path, space, "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    table = pd.read_csv(experiment / "trials.csv")
    assert len(table) == 3
    statuses = dict(zip(table.trial_id, table.status))
    assert statuses.pop(victim["trial_id"]) == "errored"  # no earlier checkpoint to fall back on: recorded, not hidden
    assert set(statuses.values()) == {"completed"}  # the search went on
    assert (experiment / "best_config.yaml").exists()
    winner = yaml.safe_load((experiment / "best_config.yaml").read_text())["provenance"]["trial_id"]
    assert winner != victim["trial_id"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vpsde-tune").experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert len(children) == len(by_trial) == 3 and set(by_trial) == set(table.trial_id)
    broken = by_trial[victim["trial_id"]]
    assert broken.info.status == "FAILED" and broken.data.tags["status"] == "errored" and broken.data.tags["reason"]
    for trial_id in statuses:
        steps = [m.step for m in client.get_metric_history(by_trial[trial_id].info.run_id, "val_bpd")]
        assert steps == RUNGS, f"trial {trial_id}: {steps}"  # no rung twice, though the driver died mid-trial
