"""The MLflow meaning of an outbox record: one method per operation, each safe to repeat.

A record is a JSON dict with an `op` (create_run, log_batch, log_artifact, set_status, terminate,
experiment_tag) and the `uri` of the store it goes to. Runs are named by *keys* the caller chooses
("vpsde:<uuid>") until the store has created them; `run_ids` maps each key to the id it got.

Repeating a record is harmless, which is what lets the outbox replay its journal after a kill or a lost answer:
  * creating a run first looks for it (by its `vpsde.run_key` tag, or by tags the caller names), so a creation
    that reached the store but whose answer was lost never makes a second run;
  * with `dedupe`, metric points already in the run's history (same key, step, timestamp and value) are not sent
    again; params the run already has are left alone (they are write-once in MLflow); tags and statuses are set
    again; an attached file overwrites itself;
  * a log_batch marked `new_steps_of` (a trial's rung) is dropped when the run already holds that step, which is
    what a trial resumed from the checkpoint before a rung reports again.

Every failure comes out sorted: `StoreDown` (no answer, a 5xx or 429, a timeout: try again later, nothing is
lost by waiting) or `Refused` (a 4xx: sending it again would not help).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trials.cli import first_line

KEY_PREFIX = "vpsde:"
RUN_KEY_TAG = "vpsde.run_key"
METRICS_PER_BATCH = 1000  # MLflow's limits per log_batch call
PARAMS_PER_BATCH = 100
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, tokens); ours are model
# training runs, which it shows under this kind.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class StoreDown(Exception):
    """The store did not answer, or answered with a server-side error: try again later."""


class Refused(Exception):
    """The store answered and refused the record: sending it again would not help."""


def is_key(ref: str) -> bool:
    return ref.startswith(KEY_PREFIX)


def now_ms() -> int:
    """A timestamp as MLflow keeps them (and records carry them): milliseconds since the epoch."""
    return int(time.time() * 1000)


@dataclass
class StoreView:
    """What this process has learned of the store since its last failure, so repeated checks cost one call each.
    A failed call may have reached the store or not: after one, the caller starts a new StoreView."""

    history: dict[tuple[str, str], set] = field(default_factory=dict)  # (run, metric) -> points on the store
    fresh: set[str] = field(default_factory=set)  # runs created here: nothing on the store but what we sent
    held_steps: dict[str, int] = field(default_factory=dict)  # run -> last step it holds (new_steps_of records)


class MlflowOps:
    def __init__(self, client_factory: Callable[[str], Any]):
        self._client_factory = client_factory
        self._clients: dict[str, Any] = {}
        self._experiments: dict[tuple[str, str], str] = {}
        self.run_ids: dict[str, str] = {}  # key -> run id
        self.resolved_hooks: list[Callable[[str, str, str], None]] = []

    def client(self, uri: str):
        if uri not in self._clients:
            self._clients[uri] = self._client_factory(uri)
        return self._clients[uri]

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn(), with every failure sorted into StoreDown (try later) or Refused (never)."""
        try:
            return fn()
        except (StoreDown, Refused):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted, not swallowed
            raise (StoreDown(_detail(exc)) if _unavailable(exc) else Refused(_detail(exc))) from exc

    def resolve(self, ref: str) -> str:
        if not is_key(ref):
            return ref
        if ref not in self.run_ids:
            raise Refused(f"run {ref} was never created")
        return self.run_ids[ref]

    def execute(self, record: dict[str, Any], *, dedupe: bool, seen: StoreView) -> None:
        self.call(lambda: self._execute(record, dedupe=dedupe, seen=seen))

    def _execute(self, record: dict[str, Any], *, dedupe: bool, seen: StoreView) -> None:
        op = record["op"]
        client = self.client(record["uri"])
        if op == "create_run":
            self._create_run(client, record, seen)
        elif op == "experiment_tag":
            experiment_id = self._experiment(client, record["uri"], record["experiment"], None)
            client.set_experiment_tag(experiment_id, record["key"], record["value"])
        elif op == "log_batch":
            self._log_batches([record], dedupe=dedupe, seen=seen)
        elif op == "log_artifact":
            path = Path(record["path"])
            if not path.exists():
                raise Refused(f"{path} no longer exists")
            client.log_artifact(self.resolve(record["run"]), str(path), record.get("artifact_path"))
        elif op == "set_status":
            client.update_run(self.resolve(record["run"]), status=record["status"])
        elif op == "terminate":
            client.set_terminated(self.resolve(record["run"]), status=record["status"], end_time=record["end_time"])
        else:
            raise Refused(f"unknown record {op!r}")

    # ---- the operations ----------------------------------------------------------------------------------
    def _create_run(self, client, record: dict[str, Any], seen: StoreView) -> None:
        experiment_id = self._experiment(client, record["uri"], record["experiment"], record["artifact_location"])
        tags = {**record["tags"], RUN_KEY_TAG: record["key"]}
        find = dict(record["find_tags"]) or {RUN_KEY_TAG: record["key"]}
        if record["parent"]:
            tags["mlflow.parentRunId"] = find["mlflow.parentRunId"] = self.resolve(record["parent"])
        elif record["parent_if_exists"] and _run_exists(client, record["parent_if_exists"]):
            tags["mlflow.parentRunId"] = record["parent_if_exists"]
        found = client.search_runs(
            [experiment_id],
            filter_string=" and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in sorted(find.items())),
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            if record["reopen"]:
                client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(
                experiment_id, start_time=record["start_time"], tags=tags, run_name=record["name"]
            ).info.run_id
            seen.fresh.add(run_id)
        self._log_params(client, run_id, record["params"], known_empty=run_id in seen.fresh)
        self.run_ids[record["key"]] = run_id
        for hook in self.resolved_hooks:
            hook(record["key"], run_id, experiment_id)

    def log_batches(self, records: list[dict[str, Any]], *, dedupe: bool, seen: StoreView) -> None:
        """Log_batch records of one run in one call (their points in order, later tags winning), not one each.

        Params are write-once, so only the first record may carry them (the caller groups that way)."""
        self.call(lambda: self._log_batches(records, dedupe=dedupe, seen=seen))

    def _log_batches(self, records: list[dict[str, Any]], *, dedupe: bool, seen: StoreView) -> None:
        client = self.client(records[0]["uri"])
        run_id = self.resolve(records[0]["run"])
        points, tags = [], {}
        for record in records:
            rung = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
            if record.get("new_steps_of") and rung:
                step = max(m.step for m in rung)
                if step <= self._held_step(client, run_id, record["new_steps_of"], seen):
                    continue  # a rung the run already holds: its record is dropped whole, tags included
                seen.held_steps[run_id] = step
            points += rung
            tags.update(record["tags"])
        if dedupe:
            points = self._unsent(client, run_id, points, seen)
        self._log_params(client, run_id, records[0]["params"], known_empty=run_id in seen.fresh)
        tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(tag_list), PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=tag_list[i : i + PARAMS_PER_BATCH])
        for i in range(0, len(points), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=points[i : i + METRICS_PER_BATCH])
            for m in points[i : i + METRICS_PER_BATCH]:
                seen.history.setdefault((run_id, m.key), set()).add((m.step, m.timestamp, m.value))

    def _held_step(self, client, run_id: str, metric: str, seen: StoreView) -> int:
        if run_id not in seen.held_steps:
            seen.held_steps[run_id] = (
                -1
                if run_id in seen.fresh
                else max((m.step for m in client.get_metric_history(run_id, metric)), default=-1)
            )
        return seen.held_steps[run_id]

    def _experiment(self, client, uri: str, name: str, artifact_location: str | None) -> str:
        if (uri, name) not in self._experiments:
            self._experiments[(uri, name)] = _find_or_create_experiment(client, name, artifact_location)
        return self._experiments[(uri, name)]

    def _log_params(self, client, run_id: str, params: dict[str, str], known_empty: bool) -> None:
        if not params:
            return
        existing = {} if known_empty else client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=new[i : i + PARAMS_PER_BATCH])

    def _unsent(self, client, run_id: str, points: list[Metric], seen: StoreView) -> list[Metric]:
        out = []
        for m in points:
            held = seen.history.get((run_id, m.key))
            if held is None:
                held = (
                    set()
                    if run_id in seen.fresh
                    else {(h.step, h.timestamp, h.value) for h in client.get_metric_history(run_id, m.key)}
                )
                seen.history[(run_id, m.key)] = held
            if (m.step, m.timestamp, m.value) not in held:
                out.append(m)
        return out


def _find_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
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
    return found.experiment_id


def mlflow_client(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(uri[len("sqlite:///") :]))
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


def describe(record: dict[str, Any]) -> str:
    if record["op"] == "experiment_tag":
        return f"tag {record['key']} of experiment {record['experiment']}"
    target = record.get("key") or record.get("run")
    return f"{record['op']} of run {target}"


def _detail(exc: Exception) -> str:
    return first_line(exc, 240)


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")
