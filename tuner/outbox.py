"""MLflow writes that outlive a tracking outage: sent at once while the store answers, kept and sent later when not.

Every MLflow write of the tuning driver (tuner/tracking.py) and of train.py's run (tuner/mlflow_runs.py)
is a *record* handed to the `Outbox` of a folder (the experiment folder, the full run's folder): create or find
a run, log a batch of metrics/params/tags, attach a file or folder, set a run's status, end a run.

While the store answers, a record is sent at once. A failed send is tried twice more, 1 s and 2 s later (MLflow's
own HTTP retries, minutes long, are cut to none and its timeout to 10 s in this process); then one line says which
store failed, what failed and where the records are kept, and the record is appended to `mlflow_outbox.jsonl` in
the folder. From then on records go straight to that file, so the caller runs at full speed, and at most every
PROBE_INTERVAL_S the file is sent in order, which is also how the outbox learns that the store is back. `flush()`
sends it on demand (the driver calls it at the end of a search; `python -m tuner.sync FOLDER` and the next run do
it later).

Runs are named by *keys* the caller chooses ("vpsde:<uuid>", "vpsde:<uuid>/<trial_id>"), because a run that could
not be created yet has no MLflow id; a record names its run by id when it is known and by key otherwise. Creating
a run first looks for it (by its `vpsde.run_key` tag, or by tags the caller names, such as a trial's `trial_id`
under its parent), so a creation that reached the store but whose answer was lost never makes a second run.

Sending a record twice is harmless, which is what makes the outbox safe to replay after a kill at any point:
metric points already in the run's history on the store (same key, step, timestamp and value) are not sent again,
params the run already has are left alone (they are write-once in MLflow), tags and statuses are simply set
again, and an attached file overwrites itself. Replay progress (records sent, run ids learned) is kept in
`mlflow_outbox.state.json`, so a kill costs at most one record sent twice. Timestamps are those of the moment the
record was made, so a backfilled run has the same metric history, in the same order, as one sent live.

A record the store refuses outright (a 4xx answer: a deleted run, a param logged again with another value) is not
retried: one line, and the record goes to `mlflow_outbox.rejected.jsonl` with the reason. Any other failure keeps
the record for later: waiting loses nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trials.cli import first_line

OUTBOX_FILE = "mlflow_outbox.jsonl"
STATE_FILE = "mlflow_outbox.state.json"
REJECTED_FILE = "mlflow_outbox.rejected.jsonl"
EXIT_TRACKING_INCOMPLETE = 3  # the work is done and on disk, but not everything reached MLflow yet
PROBE_INTERVAL_S = 30.0
RETRY_PAUSES_S = (1.0, 2.0)
KEY_PREFIX = "vpsde:"
RUN_KEY_TAG = "vpsde.run_key"
# Brief on purpose: the outbox is the long-term retry. Set only where the user has not set them.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
METRICS_PER_BATCH = 1000  # MLflow's limits per log_batch call
PARAMS_PER_BATCH = 100

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


class StoreDown(Exception):
    """The store did not answer, or answered with a server-side error: try again later."""


class Refused(Exception):
    """The store answered and refused the record: sending it again would not help."""


# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, tokens); ours are model
# training runs, which it shows under this kind.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def new_key(*parts: str) -> str:
    return KEY_PREFIX + "/".join(parts or (uuid.uuid4().hex,))


def is_key(ref: str) -> bool:
    return ref.startswith(KEY_PREFIX)


def now_ms() -> int:
    return int(time.time() * 1000)


def shorten_http_retries() -> None:
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


class Outbox:
    """The MLflow writes of one folder, in order, sent now or kept until the store answers."""

    def __init__(self, folder: Path, tracking_uri: str | None, *, log: Log = _print,
                 client_factory: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        shorten_http_retries()
        self.folder = Path(folder)
        self.tracking_uri = tracking_uri  # where new records go; kept records carry their own
        self.path = self.folder / OUTBOX_FILE
        self.state_path = self.folder / STATE_FILE
        self.rejected_path = self.folder / REJECTED_FILE
        self.log = log
        self._client_factory = client_factory or mlflow_client
        self._clock, self._sleep = clock, sleep
        self._clients: dict[str, Any] = {}
        self._experiments: dict[tuple[str, str], str] = {}
        self._run_ids: dict[str, str] = {}  # key -> run id
        self._resolved_hooks: list[Callable[[str, str, str], None]] = []
        self._down = False
        self._next_probe = 0.0
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self.rejected = 0  # records refused in this process
        self.sent_late = 0  # kept records sent in this process

    # ---- what callers use ----------------------------------------------------------------------------
    def on_resolved(self, hook: Callable[[str, str, str], None]) -> None:
        """hook(key, run_id, experiment_id) is called when a run key gets its MLflow id."""
        self._resolved_hooks.append(hook)

    def known(self, key: str, run_id: str) -> None:
        self._run_ids[key] = run_id

    def run_id(self, ref: str) -> str | None:
        return self._run_ids.get(ref) if is_key(ref) else ref

    def key_of(self, ref: str) -> str | None:
        """The key a ref names (a ref is a key, or the run id a key resolved to)."""
        if is_key(ref):
            return ref
        return next((key for key, run_id in self._run_ids.items() if run_id == ref), None)

    def ref(self, key: str) -> str:
        """The run id when known, else the key: what a caller hands back to name the run."""
        return self._run_ids.get(key, key)

    def create_run(self, key: str, *, experiment: str, name: str, tags: dict[str, str] | None = None,
                   find_tags: dict[str, str] | None = None, parent: str | None = None,
                   parent_if_exists: str | None = None, params: dict[str, str] | None = None,
                   artifact_location: str | None = None, reopen: bool = False) -> None:
        """Create the run `key` in `experiment`, or find it again (by `find_tags`, else by its key tag).

        `parent`: a run ref whose id becomes mlflow.parentRunId (and part of the search); `parent_if_exists`:
        a run id used as parent only if the store has it. `reopen`: a found run is set RUNNING again.
        """
        self._submit({"op": "create_run", "key": key, "experiment": experiment, "name": name, "tags": tags or {},
                      "find_tags": find_tags or {}, "parent": self._ref(parent), "parent_if_exists": parent_if_exists,
                      "params": params or {}, "artifact_location": artifact_location, "reopen": reopen,
                      "start_time": now_ms()})

    def log_batch(self, ref: str, *, metrics: Iterable[tuple[str, float, int, int]] = (),
                  params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        """metrics: (key, value, timestamp ms, step); non-finite values are left out (MLflow's charts choke on them)."""
        points = [[k, float(v), int(ts), int(step)] for k, v, ts, step in metrics if math.isfinite(float(v))]
        if points or params or tags:
            self._submit({"op": "log_batch", "run": self._ref(ref), "metrics": points, "params": params or {},
                          "tags": tags or {}})

    def log_artifact(self, ref: str, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file or a folder (under `artifact_path` in the run's artifacts); what is sent is what the
        path holds when the record is sent."""
        self._submit({"op": "log_artifact", "run": self._ref(ref), "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})

    def set_status(self, ref: str, status: str) -> None:
        self._submit({"op": "set_status", "run": self._ref(ref), "status": status})

    def terminate(self, ref: str, status: str) -> None:
        self._submit({"op": "terminate", "run": self._ref(ref), "status": status, "end_time": now_ms()})

    def set_experiment_tag(self, experiment: str, key: str, value: str) -> None:
        self._submit({"op": "experiment_tag", "experiment": experiment, "key": key, "value": str(value)})

    def read(self, fn: Callable[[Any], Any], default: Any = None, what: str = "a read", uri: str | None = None) -> Any:
        """fn(client) against the store, or `default` while it is down (a failed read marks it down)."""
        if self._down and self._clock() < self._next_probe:
            return default
        try:
            return self._call(lambda: fn(self._client(uri or self.tracking_uri)))
        except StoreDown as exc:
            if self._down:
                self._next_probe = self._clock() + PROBE_INTERVAL_S
            else:
                self._went_down(uri or self.tracking_uri, what, exc)
            return default
        except Refused:
            return default

    @property
    def pending(self) -> int:
        """Records kept and not yet sent."""
        return max(0, len(self._records()) - self._state()["sent"])

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.rejected == 0

    def flush(self) -> bool:
        """Send every kept record now, in order, stopping at the first the store does not take.
        True when nothing is left to send."""
        if not self.path.exists():
            return True
        with self._locked():
            return self._flush_locked()

    # ---- sending -------------------------------------------------------------------------------------
    def _ref(self, ref: str | None) -> str | None:
        return None if ref is None else self._run_ids.get(ref, ref)

    def _submit(self, record: dict[str, Any]) -> None:
        record = {"uri": self.tracking_uri, **record}
        if not self._down and not self.path.exists():
            try:
                self._send_with_retries(record)
                return
            except StoreDown as exc:
                self._went_down(record["uri"], _describe(record), exc)
            except Refused as exc:
                self._reject(record, exc)
                return
        with self._locked():
            self._append(record)
            if self._clock() >= self._next_probe:
                self._flush_locked()

    def _send_with_retries(self, record: dict[str, Any]) -> None:
        for attempt, pause in enumerate((0.0, *RETRY_PAUSES_S)):
            self._sleep(pause) if pause else None
            try:
                # After a failed attempt the record may have arrived all the same: check before sending again.
                self._execute(record, dedupe=attempt > 0, history={}, fresh=set())
                return
            except StoreDown as exc:
                last = exc
        raise last

    def _flush_locked(self) -> bool:
        records, state = self._records(), self._state()
        self._run_ids.update(state["resolved"])
        start = state["sent"]
        history: dict[tuple[str, str], set] = {}  # (run id, metric key) -> points on the store, this flush
        fresh: set[str] = set()  # runs created in this flush: nothing of theirs on the store but what we sent
        for i in range(start, len(records)):
            try:
                self._execute(records[i], dedupe=True, history=history, fresh=fresh)
            except StoreDown as exc:
                self._write_state(i)
                if not self._down:
                    self._went_down(records[i]["uri"], _describe(records[i]), exc)
                self._next_probe = self._clock() + PROBE_INTERVAL_S
                return False
            except Refused as exc:
                self._reject(records[i], exc)
            self._write_state(i + 1)
        sent = len(records) - start
        # The state first: a kill between the two unlinks leaves the outbox to be sent again, which is harmless;
        # the other order could leave a count that skips the next outbox's first records.
        self.state_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self.sent_late += sent
        if sent:
            uris = sorted({r["uri"] for r in records[start:]})
            self.log(f"MLflow: {', '.join(uris)} answers again; sent the {sent} kept records")
        self._down = False
        return True

    def _call(self, fn: Callable[[], Any]) -> Any:
        """fn(), with every failure sorted into StoreDown (try later) or Refused (never)."""
        try:
            return fn()
        except (StoreDown, Refused):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted, not swallowed
            raise (StoreDown(_detail(exc)) if _unavailable(exc) else Refused(_detail(exc))) from exc

    def _execute(self, record: dict[str, Any], *, dedupe: bool, history: dict, fresh: set) -> None:
        self._call(lambda: self._execute_raw(record, dedupe=dedupe, history=history, fresh=fresh))

    def _execute_raw(self, record: dict[str, Any], *, dedupe: bool, history: dict, fresh: set) -> None:
        client = self._client(record["uri"])
        op = record["op"]
        if op == "create_run":
            self._create_run(client, record, fresh)
            return
        if op == "experiment_tag":
            experiment_id = self._experiment(client, record["uri"], record["experiment"], None)
            client.set_experiment_tag(experiment_id, record["key"], record["value"])
            return
        run_id = self._resolve(record["run"])
        if op == "log_batch":
            points = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
            if dedupe:
                points = self._unsent(client, run_id, points, history, fresh)
            self._log_params(client, run_id, record["params"], known_empty=run_id in fresh)
            tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
            for i in range(0, len(tags), PARAMS_PER_BATCH):
                client.log_batch(run_id, tags=tags[i:i + PARAMS_PER_BATCH])
            for i in range(0, len(points), METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=points[i:i + METRICS_PER_BATCH])
                for m in points[i:i + METRICS_PER_BATCH]:
                    history.setdefault((run_id, m.key), set()).add((m.step, m.timestamp, m.value))
        elif op == "log_artifact":
            path = Path(record["path"])
            if not path.exists():
                raise Refused(f"{path} no longer exists")
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
        elif op == "set_status":
            client.update_run(run_id, status=record["status"])
        elif op == "terminate":
            client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        else:
            raise Refused(f"unknown record {op!r}")

    def _create_run(self, client, record: dict[str, Any], fresh: set) -> None:
        experiment_id = self._experiment(client, record["uri"], record["experiment"], record["artifact_location"])
        tags = {**record["tags"], RUN_KEY_TAG: record["key"]}
        find = dict(record["find_tags"]) or {RUN_KEY_TAG: record["key"]}
        if record["parent"]:
            tags["mlflow.parentRunId"] = find["mlflow.parentRunId"] = self._resolve(record["parent"])
        elif record["parent_if_exists"] and _run_exists(client, record["parent_if_exists"]):
            tags["mlflow.parentRunId"] = record["parent_if_exists"]
        found = client.search_runs([experiment_id], filter_string=" and ".join(
            f"tags.`{k}` = '{_quote(v)}'" for k, v in sorted(find.items())), max_results=1)
        if found:
            run_id = found[0].info.run_id
            if record["reopen"]:
                client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, start_time=record["start_time"], tags=tags,
                                       run_name=record["name"]).info.run_id
            fresh.add(run_id)
        self._log_params(client, run_id, record["params"], known_empty=run_id in fresh)
        self._run_ids[record["key"]] = run_id
        for hook in self._resolved_hooks:
            hook(record["key"], run_id, experiment_id)

    def _experiment(self, client, uri: str, name: str, artifact_location: str | None) -> str:
        if (uri, name) not in self._experiments:
            found = client.get_experiment_by_name(name)
            if found is None:
                try:
                    client.create_experiment(name, artifact_location=artifact_location)
                except MlflowException:
                    pass  # another search created it a moment ago; the lookup below settles it
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise StoreDown(f"experiment {name!r} could not be created")
            if EXPERIMENT_KIND_TAG not in found.tags:  # unless someone already chose a kind in the UI
                client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            self._experiments[(uri, name)] = found.experiment_id
        return self._experiments[(uri, name)]

    def _log_params(self, client, run_id: str, params: dict[str, str], known_empty: bool) -> None:
        if not params:
            return
        existing = {} if known_empty else client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=new[i:i + PARAMS_PER_BATCH])

    def _unsent(self, client, run_id: str, points: list[Metric], history: dict, fresh: set) -> list[Metric]:
        out = []
        for m in points:
            seen = history.get((run_id, m.key))
            if seen is None:
                seen = set() if run_id in fresh else {
                    (h.step, h.timestamp, h.value) for h in client.get_metric_history(run_id, m.key)}
                history[(run_id, m.key)] = seen
            if (m.step, m.timestamp, m.value) not in seen:
                out.append(m)
        return out

    def _resolve(self, ref: str) -> str:
        if not is_key(ref):
            return ref
        if ref not in self._run_ids:
            raise Refused(f"run {ref} was never created")
        return self._run_ids[ref]

    def _client(self, uri: str):
        if uri not in self._clients:
            self._clients[uri] = self._client_factory(uri)
        return self._clients[uri]

    # ---- telling -------------------------------------------------------------------------------------
    def _went_down(self, uri: str, what: str, exc: Exception) -> None:
        self._down = True
        self._next_probe = self._clock() + PROBE_INTERVAL_S
        self.log(f"MLflow: {uri} is not answering ({what}: {exc}); going on without it: unsent records are "
                 f"kept in {self.path} and sent when it answers again")

    def _reject(self, record: dict[str, Any], exc: Exception) -> None:
        self.rejected += 1
        with self._locked():
            with open(self.rejected_path, "a") as f:
                f.write(json.dumps({**record, "refused": str(exc)}) + "\n")
        if self.rejected == 1:  # one line: a refused run refuses every record of it after, each kept with its reason
            self.log(f"MLflow: {record['uri']} refused {_describe(record)} ({exc}); refused records are kept in "
                     f"{self.rejected_path}")

    # ---- the files -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on the folder, so a sync command and a running search never send one record twice."""
        if self._lock_depth == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)  # closing releases the lock
                self._lock_fd = None

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _drop_partial_line(fd)
            os.write(fd, line)  # one write: a kill leaves the line whole or a partial tail that reading skips
        finally:
            os.close(fd)

    def _records(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line]  # [:-1]: a partial last line

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        return {"sent": int(state.get("sent", 0)), "resolved": dict(state.get("resolved", {}))}

    def _write_state(self, sent: int) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sent": sent, "resolved": self._run_ids}))
        tmp.replace(self.state_path)


def mlflow_client(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(uri[len("sqlite:///"):]))
    return MlflowClient(tracking_uri=uri)


def _create_sqlite_store(path: Path) -> None:
    """A new SQLite store appears whole: MLflow creates its tables in a file of this process's own, which is then
    linked into place. Two processes creating the tables of one fresh file at once (a search starting while
    `mlflow ui` or a script opens the store) can leave it unusable for good."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
    MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments(max_results=1)
    try:
        os.link(fresh, path)  # never replaces a store another process made meanwhile
    except FileExistsError:
        pass
    finally:
        fresh.unlink(missing_ok=True)


def _drop_partial_line(fd: int) -> None:
    """A kill in the middle of an append leaves a line without its newline; cut it so the next line stays whole."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    block = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    os.ftruncate(fd, max(0, size - len(block)) + block.rfind(b"\n") + 1)


def _http_status(exc: Exception) -> int | None:
    if isinstance(exc, MlflowException):
        return int(exc.get_http_status_code())
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _refused(exc: Exception) -> bool:
    """A 4xx answer: the store refusing the record, which sending it again would not change."""
    status = _http_status(exc)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _unavailable(exc: Exception) -> bool:
    """Anything but a refusal counts as the store failing (no connection, a timeout, a 5xx or 429, a database
    or migration error): the record is kept for later rather than dropped, since nothing is lost by waiting."""
    return not _refused(exc)


def _run_exists(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException as exc:
        if _refused(exc):
            return False
        raise


def _describe(record: dict[str, Any]) -> str:
    if record["op"] == "experiment_tag":
        return f"tag {record['key']} of experiment {record['experiment']}"
    target = record.get("key") or record.get("run")
    return f"{record['op']} of run {target}"


def _detail(exc: Exception) -> str:
    return first_line(exc, 240)


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")
