"""MLflow on a real PostgreSQL: the tracking server the docker/ setup runs, started here from Debian's packages.

A throwaway PostgreSQL cluster (initdb in a temp folder, loopback port; as the `postgres` user when the tests run
as root, since PostgreSQL refuses root), an `mlflow server` on it with served artifacts, then two tiny searches at
once against that server and a short full run of one's winner. Every parent, child, metric step and artifact must
arrive, the two searches' runs must stay apart, and the rows must really be in PostgreSQL.

Outside CI a machine without PostgreSQL skips this with the reason; .ci/run installs it, so in CI it runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.servers import MlflowServer, Postgres, postgres_bin

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
pytestmark = pytest.mark.slow
SMALL_SAMPLES = {"n_images": 4, "pc_steps": 10, "ode_rtol": 1.0e-3, "ode_atol": 1.0e-3}


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    bindir = postgres_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    postgres = Postgres(bindir).start()
    try:
        server = MlflowServer(postgres.uri, tmp_path_factory.mktemp("mlflow-pg")).start()
        try:
            yield server, postgres
        finally:
            server.stop()
    finally:
        postgres.stop()


def tune_results(experiment_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """trial_id -> (step, val_bpd) of every rung Tune recorded, in order: what MLflow must hold."""
    out = {}
    for path in experiment_dir.glob("*/result.json"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["trial_id"], []).append((r["step"], r["val_bpd"]))
    return out


def test_two_searches_at_once_and_a_full_run_on_postgres(pg_server, tmp_path):
    server, postgres = pg_server
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["search"].update(num_samples=2, max_concurrent=1)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    env = dict(os.environ)
    names = ["tiny-a", "tiny-b"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tune.py"),
                "--space",
                str(space),
                "--name",
                name,
                "--storage",
                str(tmp_path / "runs"),
                "--mlflow-uri",
                server.uri,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("vpsde-tune")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served by the server, not a local path
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents) == names
    for name in names:
        folder = tmp_path / "runs" / name
        parent = parents[name]
        assert parent.info.status == "FINISHED"
        assert json.loads((folder / "mlflow.json").read_text())["parent_run_id"] == parent.info.run_id
        table = pd.read_csv(folder / "trials.csv")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        # Each search's children are its own trials, and nothing else: the two searches kept apart.
        assert sorted(c.data.tags["trial_id"] for c in children) == sorted(table.trial_id)
        assert dict(zip(table.trial_id, table.mlflow_run_id)) == {
            c.data.tags["trial_id"]: c.info.run_id for c in children
        }
        results = tune_results(folder)
        for child in children:
            assert child.info.status == "FINISHED" and child.data.params["train.lr"]
            history = client.get_metric_history(child.info.run_id, "val_bpd")
            assert [(m.step, m.value) for m in history] == results[child.data.tags["trial_id"]]
        for artifact in ("best_config.yaml", "trials.csv", "rescores.json"):
            downloaded = client.download_artifacts(parent.info.run_id, artifact, dst_path=str(tmp_path / name))
            assert Path(downloaded).read_bytes() == (folder / artifact).read_bytes()
    assert len(runs) == 2 + 2 * 2  # two parents, two children each: no stray or duplicate run

    # A short full run of tiny-a's winner logs to the same server (the provenance's URI), nested under its parent.
    config = yaml.safe_load((tmp_path / "runs" / "tiny-a" / "best_config.yaml").read_text())
    config["sample"] = SMALL_SAMPLES  # the tiny space keeps the default 1,000-step sampler
    config["eval"]["accurate"].update(n_images=4, rtol=1.0e-2, atol=1.0e-2)  # a quick test score
    config_path = tmp_path / "runs" / "tiny-a" / "quick_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config_path), "--steps", "10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "runs" / "tiny-a" / "full_run"
    metrics = json.loads((out / "metrics.json").read_text())
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`vpsde.role` = 'full-run'")
    assert f"(run {run.info.run_id})" in result.stdout and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parents["tiny-a"].info.run_id
    assert run.data.tags["tuning.trial_id"] == config["provenance"]["trial_id"]
    assert run.data.metrics["test_bpd"] == pytest.approx(metrics["test_bpd"]["mean"])
    curve = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in curve] == [r["step"] for r in metrics["history"]]
    assert {"metrics.json", "config.yaml", "samples_pc.png", "samples_ode.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }

    # The rows are in PostgreSQL, not in some SQLite file beside the server.
    import psycopg

    with psycopg.connect(postgres.uri) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == len(runs) + 1
        cursor.execute("SELECT count(DISTINCT step) FROM metrics WHERE key = 'val_bpd'")
        assert cursor.fetchone()[0] >= 2
