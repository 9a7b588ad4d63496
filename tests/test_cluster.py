"""Live: tune.py joins a two-node Ray cluster and logs to an MLflow tracking server over HTTP.

The module starts, on this machine, what docker/compose.yaml runs in containers: a Ray head and a second
Ray node (each `ray start --block` in its own process group and its own --temp-dir, with a token of its own),
and an `mlflow server`. Then it runs `tune.py --address ... --mlflow-uri http://...` as a user would, and
checks the cluster's own record of where each trial ran and what the tracking server received.

The driver attaches to the head's raylet, so the second node is one it neither started nor runs on; it
carries a custom resource, `worker_node`, that names it in Ray's node list.

Teardown stops only the process groups started here (never `ray stop`, which would end every Ray session
on the machine, other people's tests included).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.servers import wait_for_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_TRIALS = 4
WORKER_RESOURCE = "worker_node"
STARTUP_TIMEOUT_S = 180
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Cluster:
    address: str
    dashboard_port: int
    env: dict[str, str]  # what a process needs to join: the cluster's auth token
    head_node_id: str
    worker_node_id: str


@dataclass(frozen=True)
class Experiment:
    result: subprocess.CompletedProcess
    folder: Path
    cluster: Cluster
    tracking_uri: str
    artifacts_root: Path


# ---- processes ----------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on now (all held open at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # A session of its own makes the process the leader of a group that every process it spawns joins
    # (Ray's GCS, raylet, dashboard and workers; MLflow's uvicorn), so teardown can stop exactly those.
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the leader (`ray start --block` then drains its node and stops what it started), wait, then
    SIGKILL whatever is left in its group."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass
    proc.wait(timeout=10)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while text not in log.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[:3]} did not print {text!r} within {STARTUP_TIMEOUT_S} s")
        time.sleep(1)


def ray_list(cluster_address: str, env: dict[str, str], kind: str) -> list[dict]:
    """Ray's state API (`ray list nodes|workers|actors|tasks`) as parsed JSON; it remembers dead workers and actors."""
    out = subprocess.run(
        [
            str(BIN / "ray"),
            "list",
            kind,
            "--address",
            cluster_address,
            "--detail",
            "--format",
            "json",
            "--limit",
            "10000",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@contextmanager
def two_node_cluster(logs: Path, node_flags: list[str]) -> Iterator[tuple[str, int, dict[str, str]]]:
    """A head and a worker node on this machine, each started by `ray start` with `node_flags`; yields the
    address, the dashboard port and the environment a process needs to join. The worker carries
    WORKER_RESOURCE, so a test can tell where a task ran."""
    # Short paths: Ray puts Unix sockets under --temp-dir, and pytest's tmp paths overrun their ~107-byte limit.
    temp_root = Path(tempfile.mkdtemp(prefix="vpsde-ray-", dir="/tmp"))
    port, dashboard_port, client_port, head_agent_port, worker_agent_port = free_ports(5)
    address = f"127.0.0.1:{port}"
    # A token of this cluster's own, as in docker/compose.yaml: no other process on the machine can join it,
    # and it does not depend on whatever ~/.ray/auth_token holds.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    # Ray's default object store takes 30% of RAM per node; these trials pass a few MB.
    common = [*node_flags, "--object-store-memory=200000000", "--disable-usage-stats", "--block"]
    head_cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={head_agent_port}",
        f"--temp-dir={temp_root / 'head'}",
        *common,
    ]
    # Its own agent port and temp dir, so that two nodes on one machine do not collide.
    worker_cmd = [
        str(BIN / "ray"),
        "start",
        f"--address={address}",
        f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
        f"--dashboard-agent-listen-port={worker_agent_port}",
        f"--temp-dir={temp_root / 'worker'}",
        *common,
    ]
    started = []
    try:
        head = start(head_cmd, logs / "head.log", env)
        started.append(head)
        wait_for_line(head, logs / "head.log", "Ray runtime started")
        worker = start(worker_cmd, logs / "worker.log", env)
        started.append(worker)
        wait_for_line(worker, logs / "worker.log", "Ray runtime started")
        yield address, dashboard_port, env
    finally:
        for proc in reversed(started):  # the worker first, so it does not outlive its head
            stop(proc, grace_s=40)
        shutil.rmtree(temp_root, ignore_errors=True)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("cluster-logs"), ["--num-cpus=1"]) as (address, dashboard_port, env):
        nodes = [n for n in ray_list(address, env, "nodes") if n["state"] == "ALIVE"]
        assert len(nodes) == 2, nodes
        (head_node,) = [n for n in nodes if n["is_head_node"]]
        (worker_node,) = [n for n in nodes if WORKER_RESOURCE in n["resources_total"]]
        assert worker_node["node_id"] != head_node["node_id"]
        yield Cluster(address, dashboard_port, env, head_node["node_id"], worker_node["node_id"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    # One web worker and no job runner: the server here only has to take a few hundred requests.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = start(cmd, folder / "server.log", env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, folder / "server.log")
        yield f"http://127.0.0.1:{port}", folder / "artifacts"
    finally:
        stop(server, grace_s=15)


@pytest.fixture(scope="module")
def experiment(cluster, mlflow_server, tmp_path_factory):
    tracking_uri, artifacts_root = mlflow_server
    workdir = tmp_path_factory.mktemp("tune")
    cmd = [
        sys.executable,
        str(ROOT / "tune.py"),
        "--space",
        str(ROOT / "search_spaces" / "tiny.yaml"),
        "--address",
        cluster.address,
        "--mlflow-uri",
        tracking_uri,
        "--storage",
        str(workdir / "runs"),
        "--num-samples",
        str(NUM_TRIALS),
        "--max-concurrent",
        "2",
    ]
    # No MLFLOW_TRACKING_URI (tests/conftest.py): the run must reach the server through --mlflow-uri.
    result = subprocess.run(cmd, cwd=workdir, env=cluster.env, capture_output=True, text=True, timeout=600)
    return Experiment(result, workdir / "runs" / "tiny", cluster, tracking_uri, artifacts_root)


def succeeded(experiment: Experiment) -> Experiment:
    out = experiment.result
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return experiment


# ---- tests --------------------------------------------------------------------------------------
def test_trials_run_on_the_node_the_driver_is_not_on_with_the_drivers_code(experiment):
    exp = succeeded(experiment)
    cluster = exp.cluster
    assert f"Ray dashboard: http://127.0.0.1:{cluster.dashboard_port}" in exp.result.stdout

    table = pd.read_csv(exp.folder / "trials.csv")
    assert len(table) == NUM_TRIALS and set(table.status) <= {"completed", "stopped early"}

    # tune.py is the cluster's only driver, and it attached to the head's raylet.
    (driver,) = [w for w in ray_list(cluster.address, cluster.env, "workers") if w["worker_type"] == "DRIVER"]
    assert driver["node_id"] == cluster.head_node_id

    # Tune records the pid of the process that ran each trial; Ray's state API knows which node each
    # trial actor (and so each pid) lived on. All nodes here share one IP, so node_ip would prove nothing.
    actors_by_pid = {a["pid"]: a for a in ray_list(cluster.address, cluster.env, "actors")}
    node_of_trial = {}
    for result_file in exp.folder.glob("*/result.json"):
        last = json.loads(result_file.read_text().splitlines()[-1])
        actor = actors_by_pid.get(last["pid"])
        assert actor is not None and actor["repr_name"] == "run_trial", f"trial {last['trial_id']}: no actor"
        # The driver shipped its trials/ and tuner/ to the trial's worker as packages (runtime_env py_modules).
        assert len(json.loads(actor["serialized_runtime_env"]).get("py_modules", [])) == 2
        node_of_trial[last["trial_id"]] = actor["node_id"]
    assert set(node_of_trial) == set(table.trial_id)
    assert set(node_of_trial.values()) <= {cluster.head_node_id, cluster.worker_node_id}
    assert cluster.worker_node_id in node_of_trial.values(), "no trial ran on the node the driver is not on"

    rescores = [t for t in ray_list(cluster.address, cluster.env, "tasks") if t["name"] == "rescore_checkpoint"]
    assert len(rescores) == table.val_bpd_accurate.notna().sum() > 0
    assert {t["state"] for t in rescores} == {"FINISHED"}


def test_the_tracking_server_receives_every_run_and_artifact(experiment):
    exp = succeeded(experiment)
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    mlflow_experiment = client.get_experiment_by_name("vpsde-tune")
    # Artifacts go through the server (mlflow-artifacts:/), not to a path the driver writes itself.
    assert mlflow_experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([mlflow_experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert json.loads((exp.folder / "mlflow.json").read_text())["parent_run_id"] == parent.info.run_id

    table = pd.read_csv(exp.folder / "trials.csv")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(table.trial_id)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        steps = int(table[table.trial_id == child.data.tags["trial_id"]].steps.iloc[0])
        history = client.get_metric_history(child.info.run_id, "val_bpd")
        assert [m.step for m in history] == list(range(10, steps + 1, 10))

    assert {"best_config.yaml", "trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    downloaded = Path(
        client.download_artifacts(
            parent.info.run_id, "best_config.yaml", dst_path=str(exp.folder.parent / "downloaded")
        )
    )
    assert downloaded.read_bytes() == (exp.folder / "best_config.yaml").read_bytes()
    stored = list(exp.artifacts_root.glob(f"*/{parent.info.run_id}/artifacts/trials.csv"))
    assert len(stored) == 1 and stored[0].read_bytes() == (exp.folder / "trials.csv").read_bytes()
