"""The outbox (tuner/outbox.py): a tracking store that goes away costs one line and a few seconds, never a record.

The store under test is a real MLflow SQLite store behind a switch: `down` makes every call fail the way a dead
server does (MLflow's "API request ... failed" exception), `lose` makes the next writes reach the store and then
fail as if the answer had been lost, the case that tempts a naive retry into duplicating runs and steps. Every
metric point the store receives is counted: MLflow's SQL stores happen to drop exact duplicates themselves, so
only the count shows whether the outbox sent a point twice.
Time is a fake clock, so the probe interval is exact and nothing sleeps.
"""

import json
import shutil
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tuner import mlflow_ops
from tuner import outbox as outbox_module
from tuner.export import fill_mlflow_ids
from tuner.outbox import OUTBOX_FILE, PROBE_INTERVAL_S, REJECTED_FILE, STATE_FILE, Outbox, new_key

URI_LABEL = "http://127.0.0.1:5999"  # what the outbox believes it talks to; the calls go to SQLite
WRITES = {"create_run", "log_batch", "set_terminated", "update_run", "log_artifact"}


class SwitchableStore:
    """An MlflowClient on SQLite that can be switched off, or made to lose the answers to its next writes."""

    def __init__(self, db: Path):
        self.client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        self.down = False
        self.lose = 0
        self.calls = 0
        self.received = []  # (run id, key, step) of every metric point that reached the store

    def __call__(self, uri):  # the outbox's client factory
        return self

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                raise MlflowException(
                    f"API request to {URI_LABEL}/api/2.0/mlflow/{name} failed with exception "
                    "HTTPConnectionPool(host='127.0.0.1', port=5999): Connection refused"
                )
            result = method(*args, **kwargs)
            if name == "log_batch":
                run_id = args[0] if args else kwargs["run_id"]
                self.received += [(run_id, m.key, m.step) for m in kwargs.get("metrics", ())]
            if self.lose and name in WRITES:
                self.lose -= 1
                raise MlflowException(f"API request to {URI_LABEL} failed with timeout exception Read timed out")
            return result

        return call


class Clock:
    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def keep_mlflow_http_settings(monkeypatch):
    """The outbox shortens MLflow's HTTP retries for its process; here that process is pytest's, which other
    tests share, so the settings stay as they were."""
    monkeypatch.setattr(outbox_module, "shorten_http_retries", lambda: None)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty, migrated SQLite store; each test gets a copy (creating one costs seconds of migrations)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    store = SwitchableStore(tmp_path / "mlflow.db")
    # Artifacts in the test's folder: a SQLite store would otherwise put them under ./mlruns.
    store.client.create_experiment("vpsde-tune", artifact_location=(tmp_path / "artifacts").as_uri())
    return store


def make_outbox(folder: Path, store: SwitchableStore, clock: Clock, lines: list) -> Outbox:
    return Outbox(folder, URI_LABEL, log=lines.append, client_factory=store, clock=clock, sleep=clock.sleep)


def history(store, run_id, key="val_bpd"):
    return [(m.step, m.value) for m in store.client.get_metric_history(run_id, key)]


def all_runs(store):
    experiment = store.client.get_experiment_by_name("vpsde-tune")
    return store.client.search_runs([experiment.experiment_id], max_results=100)


def sent_once(store):
    return len(store.received) == len(set(store.received))


def rung(outbox, ref, step):
    outbox.log_batch(ref, metrics=[("val_bpd", 10.0 - step / 10, 1_000_000 + step, step)])


def test_an_outage_costs_one_line_and_a_few_seconds_then_everything_arrives_once_in_order(tmp_path, store):
    clock, lines = Clock(), []
    box = make_outbox(tmp_path / "exp", store, clock, lines)
    key = new_key()
    box.create_run(key, experiment="vpsde-tune", name="trial", params={"lr": "0.001"})
    run_id = box.run_id(key)
    for step in (10, 20):
        rung(box, key, step)
    assert history(store, run_id) == [(10, 9.0), (20, 8.0)] and lines == []

    store.down = True
    rung(box, key, 30)  # tried three times, 1 s and 2 s apart, then kept
    assert clock.slept == [1.0, 2.0]
    assert len(lines) == 1 and URI_LABEL in lines[0] and "Connection refused" in lines[0]
    assert str(tmp_path / "exp" / OUTBOX_FILE) in lines[0]
    calls = store.calls
    for step in (40, 50):  # while it is down, records go straight to the outbox: no call, no wait
        rung(box, key, step)
    assert store.calls == calls and clock.slept == [1.0, 2.0] and box.pending == 3

    clock.now += PROBE_INTERVAL_S  # one probe when due; it fails quietly
    rung(box, key, 60)
    assert store.calls == calls + 1 and len(lines) == 1 and box.pending == 4

    store.down = False
    rung(box, key, 70)  # not due yet: kept
    assert box.pending == 5
    clock.now += PROBE_INTERVAL_S
    box.terminate(key, "FINISHED")  # due: the outbox goes first, in order, then this record
    assert box.pending == 0 and box.complete
    assert "answers again" in lines[-1] and "6 kept records" in lines[-1]  # rungs 30 to 70 and the end
    assert not (tmp_path / "exp" / OUTBOX_FILE).exists() and not (tmp_path / "exp" / STATE_FILE).exists()
    assert history(store, run_id) == [(s, 10.0 - s / 10) for s in range(10, 80, 10)] and sent_once(store)
    (run,) = all_runs(store)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001"}
    assert rung(box, key, 80) is None and history(store, run_id)[-1] == (80, 2.0)  # live again


def test_answers_lost_in_flight_duplicate_neither_runs_nor_steps(tmp_path, store):
    clock, lines = Clock(), []
    box = make_outbox(tmp_path / "exp", store, clock, lines)
    key = new_key()
    store.lose = 1  # the run is created, but the driver never hears so: the retry must find it, not make another
    box.create_run(key, experiment="vpsde-tune", name="trial", tags={"trial_id": "t1"}, params={"lr": "0.001"})
    assert lines == [] and len(all_runs(store)) == 1
    run_id = box.run_id(key)
    store.lose = 1  # the rung arrives, the answer does not: the retry checks the history before sending again
    rung(box, key, 10)
    assert history(store, run_id) == [(10, 9.0)]

    # Lost answers while going down: the point arrives, the answer is lost, the store is then down: the record
    # is kept although it arrived, and sending the outbox later must not log it twice.
    real = store.client.log_batch

    def arrive_then_die(*args, **kwargs):
        real(*args, **kwargs)
        store.received += [(args[0], m.key, m.step) for m in kwargs.get("metrics", ())]
        store.down = True
        raise MlflowException("API request failed with exception Connection reset by peer")

    store.client.log_batch = arrive_then_die
    rung(box, key, 20)
    store.client.log_batch = real
    assert box.pending == 1 and len(lines) == 1
    rung(box, key, 30)
    store.down = False
    assert box.flush() and box.pending == 0
    assert history(store, run_id) == [(10, 9.0), (20, 8.0), (30, 7.0)]
    assert sent_once(store) and len(all_runs(store)) == 1


def test_a_kill_at_any_point_of_sending_costs_nothing(tmp_path, store):
    """A process killed mid-append or mid-replay; the next process (a new Outbox) finishes the job exactly once."""
    clock, lines = Clock(), []
    folder = tmp_path / "exp"
    box = make_outbox(folder, store, clock, lines)
    key = new_key()
    store.down = True
    box.create_run(key, experiment="vpsde-tune", name="trial")  # the store is down from the start: no id yet
    assert box.run_id(key) is None and box.pending == 1
    for step in (10, 20, 30):
        rung(box, key, step)
    box.terminate(key, "FINISHED")
    with open(folder / OUTBOX_FILE, "a") as f:  # killed in the middle of appending a record
        f.write('{"uri": "http://127.0.0.1:5999", "op": "log_ba')
    assert box.pending == 5  # the partial line is not a record

    # Replay killed after sending record 3 (rung 20) but before noting it: the state still says 2 were sent.
    store.down = False
    state = {"sent": 2}
    box2 = make_outbox(folder, store, clock, lines)
    records = [json.loads(line) for line in (folder / OUTBOX_FILE).read_text().split("\n")[:-1]]
    for record in records[:3]:
        box2.ops.execute(record, dedupe=True, seen=mlflow_ops.StoreView())
    (folder / STATE_FILE).write_text(json.dumps({**state, "resolved": box2.ops.run_ids}))
    run_id = box2.run_id(key)
    assert history(store, run_id) == [(10, 9.0), (20, 8.0)]

    box3 = make_outbox(folder, store, clock, lines)  # the next process
    rung(box3, key, 40)  # appended whole after cutting the partial line, then all sent in order
    assert box3.pending == 0 and box3.complete
    assert history(store, run_id) == [(10, 9.0), (20, 8.0), (30, 7.0), (40, 6.0)] and sent_once(store)
    (run,) = all_runs(store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"


def test_a_record_the_store_refuses_is_set_aside_and_the_rest_goes_on(tmp_path, store):
    clock, lines = Clock(), []
    box = make_outbox(tmp_path / "exp", store, clock, lines)
    gone, kept = new_key(), new_key()
    box.create_run(gone, experiment="vpsde-tune", name="deleted later")
    box.create_run(kept, experiment="vpsde-tune", name="kept")
    store.client.delete_run(box.run_id(gone))
    rung(box, gone, 10)  # a 4xx answer: not worth retrying, and it must not block what follows
    rung(box, kept, 10)
    rung(box, gone, 20)  # refused too, without a second line
    assert clock.slept == [] and box.rejected == 2 and not box.complete
    assert len(lines) == 1 and "refused" in lines[0] and str(tmp_path / "exp" / REJECTED_FILE) in lines[0]
    refused = [json.loads(line) for line in (tmp_path / "exp" / REJECTED_FILE).read_text().splitlines()]
    assert [r["op"] for r in refused] == ["log_batch", "log_batch"] and refused[0]["refused"]
    assert history(store, box.run_id(kept)) == [(10, 9.0)]


def test_a_search_whose_store_was_never_up_is_backfilled_as_if_it_had_been(tmp_path, store, monkeypatch):
    """The tracker and the export: the parent and the children are created late, nested right, ids filled in."""
    from tuner.tracking import ExperimentTracker

    monkeypatch.setattr(mlflow_ops, "MlflowClient", lambda tracking_uri: store)
    monkeypatch.setattr(outbox_module, "RETRY_PAUSES_S", ())
    experiment_dir = tmp_path / "runs" / "tiny"
    store.down = True
    tracker = ExperimentTracker(URI_LABEL, experiment_dir, "tiny")
    tracker.log_experiment({"search.num_samples": 2}, {"space_sha256": "0" * 64})
    refs = {tid: tracker.child_run(tid, f"run_trial_{tid}", {"train.lr": 0.001}) for tid in ("aaa", "bbb")}
    assert all(ref.startswith("vpsde:") for ref in refs.values())  # keys: the store has not created them
    for ref in refs.values():
        tracker.log_rung(ref, {"step": 10, "val_bpd": 9.0, "train_loss": 1.0})
        tracker.finish_trial(ref, "completed")
    assert tracker.child_run_ids() == {} and tracker.parent_run_id is None
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / "trials.csv").write_text('trial_id,ch_mult,mlflow_run_id\naaa,"[1, 2, 2]",\nbbb,"[1, 2, 4]",\n')
    (experiment_dir / "best_config.yaml").write_text(
        "# header\n# second\nmodel:\n  ch: 8\nprovenance:\n  trial_id: aaa\n  mlflow_experiment_id: null\n"
        "  mlflow_parent_run_id: null\n  mlflow_run_id: ''\n"
    )
    tracker.log_summary({"trials": 2}, {"winner_trial_id": "aaa"}, [experiment_dir / "trials.csv"])
    tracker.set_experiment_tag("vpsde.latest", "tiny")
    tracker.finish("FINISHED")
    assert not tracker.flush()

    store.down = False
    later = ExperimentTracker.attach(experiment_dir)  # e.g. tune.py --resume of the finished experiment
    assert later.flush()
    state = json.loads((experiment_dir / "mlflow.json").read_text())
    parent = store.client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["search.num_samples"] == "2"
    assert parent.data.metrics["trials"] == 2 and parent.data.tags["winner_trial_id"] == "aaa"
    assert {a.path for a in store.client.list_artifacts(parent.info.run_id)} == {"trials.csv"}
    assert store.client.get_experiment_by_name("vpsde-tune").tags["vpsde.latest"] == "tiny"
    children = [r for r in all_runs(store) if r.info.run_id != parent.info.run_id]
    assert sorted(c.data.tags["trial_id"] for c in children) == ["aaa", "bbb"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "completed"
        assert history(store, child.info.run_id) == [(10, 9.0)]
    assert sent_once(store)
    ids = later.child_run_ids()
    assert ids == state["child_runs"] == {c.data.tags["trial_id"]: c.info.run_id for c in children}

    changed = fill_mlflow_ids(experiment_dir, later.experiment_id, later.parent_run_id, ids)
    assert sorted(p.name for p in changed) == ["best_config.yaml", "trials.csv"]
    assert (experiment_dir / "trials.csv").read_text() == (
        f'trial_id,ch_mult,mlflow_run_id\naaa,"[1, 2, 2]",{ids["aaa"]}\nbbb,"[1, 2, 4]",{ids["bbb"]}\n'
    )
    text = (experiment_dir / "best_config.yaml").read_text()
    assert text.startswith("# header\n# second\nmodel:\n  ch: 8\n")
    assert f"mlflow_run_id: {ids['aaa']}" in text and f"mlflow_parent_run_id: {parent.info.run_id}" in text
    assert fill_mlflow_ids(experiment_dir, later.experiment_id, later.parent_run_id, ids) == []  # nothing left


def test_a_new_sqlite_store_appears_whole_and_an_existing_one_is_left_alone(tmp_path, empty_store):
    """Readers that open the store while a search creates it must never see (and so migrate) a half-made file."""
    made = tmp_path / "runs" / "mlflow.db"
    client = mlflow_ops.mlflow_client(f"sqlite:///{made}")
    assert made.exists() and client.get_experiment_by_name("Default") is not None
    assert sorted(p.name for p in made.parent.iterdir()) == ["mlflow.db"]  # no temp file left behind
    existing = tmp_path / "existing.db"
    shutil.copy(empty_store, existing)
    before = existing.read_bytes()
    mlflow_ops._create_sqlite_store(existing)
    assert existing.read_bytes() == before


class BlockingStore(SwitchableStore):
    """A store whose calls wait until `gate` opens: a tracking server that has stopped answering quickly."""

    def __init__(self, db: Path):
        super().__init__(db)
        import threading

        self.gate = threading.Event()
        self.batches = []  # the number of metric points in each log_batch call that carried metrics

    def __getattr__(self, name):
        call = super().__getattr__(name)

        def waiting(*args, **kwargs):
            self.gate.wait()
            if name == "log_batch" and kwargs.get("metrics"):
                self.batches.append(len(kwargs["metrics"]))
            return call(*args, **kwargs)

        return waiting


def test_in_the_background_the_caller_never_waits_and_what_piled_up_goes_in_one_call_a_run(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    store = BlockingStore(tmp_path / "mlflow.db")
    store.client.create_experiment("vpsde-tune", artifact_location=(tmp_path / "artifacts").as_uri())
    lines = []
    box = Outbox(tmp_path / "exp", URI_LABEL, log=lines.append, client_factory=store, background=True)
    keys = [new_key() for _ in range(3)]
    for key in keys:  # the store answers nothing yet: every call below returns all the same
        box.create_run(key, experiment="vpsde-tune", name="trial")
    for step in range(10, 110, 10):
        for key in keys:
            rung(box, key, step)
    box.terminate(keys[0], "FINISHED")
    assert box.pending == 34 and store.received == []
    store.gate.set()
    assert box.flush() and box.pending == 0 and box.complete
    box.close()
    assert lines == [] and sent_once(store)
    for key in keys:
        assert history(store, box.run_id(key)) == [(s, 10.0 - s / 10) for s in range(10, 110, 10)]
    assert store.client.get_run(box.run_id(keys[0])).info.status == "FINISHED"
    # Two passes at most: the one the first record started (it read what the journal held then, on a loaded
    # machine anything from one rung to all of them, and waited on the store) and the one after it. Each sends
    # what it read merged, one call a run, so at most two calls a run, not one a rung (30).
    assert len(store.batches) <= 2 * len(keys) and sum(store.batches) == 30
    assert len(box.lags_ms) == 34 and not (tmp_path / "exp" / OUTBOX_FILE).exists()


def test_a_rung_the_store_already_holds_is_not_logged_again_by_a_new_process(tmp_path, store):
    """A driver killed after a rung reached MLflow but before Tune saved its state: the restored trial reports the
    rung again, with a new timestamp; the new process's outbox drops it against the store's history."""
    clock, lines = Clock(), []
    key = new_key()
    box = make_outbox(tmp_path / "exp", store, clock, lines)
    box.create_run(key, experiment="vpsde-tune", name="trial")
    run_id = box.run_id(key)
    for step in (10, 20):
        box.log_batch(run_id, metrics=[("seconds", step, 1_000 + step, step)], new_steps_of="seconds")
    again = make_outbox(tmp_path / "exp", store, clock, lines)
    for step in (20, 30):
        again.log_batch(
            run_id,
            metrics=[("seconds", step, 5_000 + step, step)],
            tags={"reason": f"rung {step}"},
            new_steps_of="seconds",
        )
    assert [(m.step, m.timestamp) for m in store.client.get_metric_history(run_id, "seconds")] == [
        (10, 1_010),
        (20, 1_020),
        (30, 5_030),
    ]
    assert store.client.get_run(run_id).data.tags["reason"] == "rung 30"
