"""What a person sees after a search, checked through the servers the browser talks to.

One tiny experiment, run by tune.py with a space that asks for GPUs on this CPU-only machine and
`--allow-cpu`; then the MLflow UI's data over the MLflow server's REST API (the parent run, its nested trials,
the metrics by step, the report among the parent's artifacts) and the Optuna dashboard's API on the study in
the experiment folder. Screenshots of the same pages in Chromium are in docs/ (docs/shoot.py takes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --allow-cpu would not be needed")
    tmp = tmp_path_factory.mktemp("ui")
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
    raw["resources"]["gpus_per_trial"] = 0.5
    raw["search"]["num_samples"] = 3
    space = tmp / "gpu.yaml"
    space.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--storage", str(tmp / "runs"), "--allow-cpu"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "runs", out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(request, timeout=60) as resp:
        raw = resp.read()
    return json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw


@contextlib.contextmanager
def serving(cmd: list[str], port: int, timeout: float = 240):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=10).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not come up on {base}") from exc
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_tune_says_it_runs_a_gpu_space_on_cpu_and_where_the_report_is(experiment):
    storage, stdout = experiment
    assert "is sized for GPUs (resources.gpus_per_trial: 0.5), but this Ray cluster has no GPU" in stdout
    assert "--allow-cpu: trials run on CPU" in stdout
    assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+ .*get-auth-token", stdout)
    assert re.search(r"Re-scoring 1/\d: \w+: [\d.]+ ± [\d.]+ bits/dim", stdout)
    found = re.search(r"^\s+report\s+(\S+report\.html)$", stdout, re.M)
    assert found and Path(found.group(1)) == storage / "tiny" / "report" / "report.html"
    assert Path(found.group(1)).is_file()


def test_mlflow_server_serves_the_parent_its_trials_their_curves_and_the_report(experiment):
    storage, _ = experiment
    table = pd.read_csv(storage / "tiny" / "trials.csv", dtype={"trial_id": str})
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{storage / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with serving(cmd, port) as base:
        api = base + "/api/2.0/mlflow"
        experiment_ = get(f"{api}/experiments/get-by-name?experiment_name=vpsde-tune")["experiment"]
        assert {t["key"]: t["value"] for t in experiment_.get("tags", [])}[
            "mlflow.experimentKind"
        ] == "custom_model_development"
        runs = get(f"{api}/runs/search", {"experiment_ids": [experiment_["experiment_id"]], "max_results": 100})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parents = [rid for rid, t in tags.items() if "mlflow.parentRunId" not in t]
        assert len(parents) == 1
        parent = parents[0]
        children = {t["trial_id"]: rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent}
        assert set(children) == set(table.trial_id)  # the UI nests one run per trial under the parent

        for row in table.itertuples():
            history = get(f"{api}/metrics/get-history?run_id={children[row.trial_id]}&metric_key=val_bpd")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(10, row.steps + 1, 10))  # the chart's x axis
            assert tags[children[row.trial_id]]["status"] == row.status

        listed = get(f"{api}/artifacts/list?run_id={parent}&path=report")["files"]
        names = {Path(f["path"]).name for f in listed}
        assert {
            "report.html",
            "learning_curves.png",
            "importance.png",
            "hyperparameters.png",
            "rescores.png",
            "samples.png",
        } <= names
        page = get(f"{base}/get-artifact?" + urllib.parse.urlencode({"path": "report/report.html", "run_uuid": parent}))
        assert b"data:image/png;base64," in page and b"Learning curves" in page
        assert b"<html" in get(base + "/").lower()  # the UI itself is served


def test_optuna_dashboard_shows_the_study_with_intermediate_values(experiment):
    pytest.importorskip("optuna_dashboard")
    storage, _ = experiment
    table = pd.read_csv(storage / "tiny" / "trials.csv", dtype={"trial_id": str})
    port = free_port()
    cmd = [
        str(BIN / "optuna-dashboard"),
        f"sqlite:///{storage / 'tiny' / 'optuna.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with serving(cmd, port) as base:
        studies = get(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
        study = get(f"{base}/api/studies/{studies[0]['study_id']}")
        trials = {next(a["value"] for a in t["user_attrs"] if a["key"] == "tune_trial_id"): t for t in study["trials"]}
        assert set(trials) == set(table.trial_id)
        for row in table.itertuples():
            steps = sorted(v["step"] for v in trials[row.trial_id]["intermediate_values"])
            assert steps == list(range(10, row.steps + 1, 10))  # the history and intermediate-values plots
