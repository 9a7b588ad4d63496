"""MLflow writes that never wait for the store and outlive an outage: journaled first, sent in order, exactly once.

Every MLflow write of the tuning driver (tuner/tracking.py) and of train.py's run (tuner/mlflow_runs.py) is a
*record* handed to the `Outbox` of a folder (the experiment folder, the full run's folder): create or find a run,
log a batch of metrics/params/tags, attach a file or folder, set a run's status, end a run. The record is appended
to the folder's journal, `mlflow_outbox.jsonl` (tuner/journal.py), and then sent from there, in order
(tuner/mlflow_ops.py says what each record means to MLflow):

  * in the foreground (the default): at once, by the caller;
  * in the background (`background=True`, the tuning driver): by a sender thread, so that the caller, Tune's
    event loop, only ever waits for a local append. A slow store makes the records arrive later, never the
    search slower. The sender sends what has piled up in few calls: a run's pending metric records go as one
    log_batch.

While the store answers, a failed send is tried twice more, 1 s and 2 s later (MLflow's own HTTP retries, minutes
long, are cut to none and its timeout to 10 s in this process); then one line says which store failed, what
failed and where the records are kept. From then on records are only appended, so the caller runs at full speed,
and at most every PROBE_INTERVAL_S the journal is sent, which is also how the outbox learns that the store is
back. `flush()` sends it on demand (the driver calls it at the end of a search; `python -m tuner.sync FOLDER`
and the next run do it later).

Runs are named by *keys* the caller chooses ("vpsde:<uuid>", "vpsde:<uuid>/<trial_id>"), because a run that has
not been created yet has no MLflow id; a record names its run by id when it is known and by key otherwise.

Sending a record twice is harmless (tuner/mlflow_ops.py), and the journal remembers how far sending got and which
records may have reached the store already, so a kill at any point costs nothing and nothing arrives twice.
Timestamps are those of the moment the record was made, so a backfilled run has the same metric history, in the
same order, as one sent live.

A record the store refuses outright (a 4xx answer: a deleted run, a param logged again with another value) is not
retried: one line, and the record goes to `mlflow_outbox.rejected.jsonl` with the reason. Any other failure keeps
the record for later: waiting loses nothing.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tuner.journal import Journal, Progress
from tuner.mlflow_ops import KEY_PREFIX, MlflowOps, Refused, StoreDown, StoreView, describe, is_key, mlflow_client

JOURNAL = "mlflow_outbox"
OUTBOX_FILE = f"{JOURNAL}.jsonl"
STATE_FILE = f"{JOURNAL}.state.json"
REJECTED_FILE = f"{JOURNAL}.rejected.jsonl"
EXIT_TRACKING_INCOMPLETE = 3  # the work is done and on disk, but not everything reached MLflow yet
PROBE_INTERVAL_S = 30.0
RETRY_PAUSES_S = (1.0, 2.0)
RECORDS_PER_CALL = 64  # a run's pending metric records merged into one log_batch, at most this many
# Brief on purpose: the outbox is the long-term retry. Set only where the user has not set them.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def new_key(*parts: str) -> str:
    return KEY_PREFIX + "/".join(parts or (uuid.uuid4().hex,))


def now_ms() -> int:
    return int(time.time() * 1000)


def shorten_http_retries() -> None:
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


class Outbox:
    """The MLflow writes of one folder: journaled, then sent in order now, in the background, or when the store
    answers again."""

    def __init__(
        self,
        folder: Path,
        tracking_uri: str | None,
        *,
        log: Log = _print,
        client_factory: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        background: bool = False,
    ):
        shorten_http_retries()
        self.folder = Path(folder)
        self.tracking_uri = tracking_uri  # where new records go; kept records carry their own
        self.journal = Journal(self.folder, JOURNAL)
        self.path = self.journal.path
        self.rejected_path = self.folder / REJECTED_FILE
        self.log = log
        self.ops = MlflowOps(client_factory or mlflow_client)
        self._clock, self._sleep = clock, sleep
        self._view = StoreView()
        self._down = False
        self._next_probe = 0.0
        self.rejected = 0  # records refused in this process
        self.lags_ms: list[int] = []  # from making a record to the store having it, for those sent here
        self._background = background
        self._sender: threading.Thread | None = None
        self._wake = threading.Condition()
        self._appended = False
        self._stopping = False
        self._sending = threading.Lock()

    # ---- what callers use ----------------------------------------------------------------------------
    def on_resolved(self, hook: Callable[[str, str, str], None]) -> None:
        """hook(key, run_id, experiment_id) is called when a run key gets its MLflow id (from the sender's thread
        when in the background)."""
        self.ops.resolved_hooks.append(hook)

    def known(self, key: str, run_id: str) -> None:
        self.ops.run_ids[key] = run_id

    def run_id(self, ref: str) -> str | None:
        return self.ops.run_ids.get(ref) if is_key(ref) else ref

    def key_of(self, ref: str) -> str | None:
        """The key a ref names (a ref is a key, or the run id a key resolved to)."""
        if is_key(ref):
            return ref
        return next((key for key, run_id in self.ops.run_ids.copy().items() if run_id == ref), None)

    def ref(self, key: str) -> str:
        """The run id when known, else the key: what a caller hands back to name the run."""
        return self.ops.run_ids.get(key, key)

    def create_run(
        self,
        key: str,
        *,
        experiment: str,
        name: str,
        tags: dict[str, str] | None = None,
        find_tags: dict[str, str] | None = None,
        parent: str | None = None,
        parent_if_exists: str | None = None,
        params: dict[str, str] | None = None,
        artifact_location: str | None = None,
        reopen: bool = False,
    ) -> None:
        """Create the run `key` in `experiment`, or find it again (by `find_tags`, else by its key tag).

        `parent`: a run ref whose id becomes mlflow.parentRunId (and part of the search); `parent_if_exists`:
        a run id used as parent only if the store has it. `reopen`: a found run is set RUNNING again.
        """
        self._submit(
            {
                "op": "create_run",
                "key": key,
                "experiment": experiment,
                "name": name,
                "tags": tags or {},
                "find_tags": find_tags or {},
                "parent": self._ref(parent),
                "parent_if_exists": parent_if_exists,
                "params": params or {},
                "artifact_location": artifact_location,
                "reopen": reopen,
                "start_time": now_ms(),
            }
        )

    def log_batch(
        self,
        ref: str,
        *,
        metrics: Iterable[tuple[str, float, int, int]] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        new_steps_of: str | None = None,
    ) -> None:
        """metrics: (key, value, timestamp ms, step); non-finite values are left out (MLflow's charts choke on them).
        `new_steps_of`: a metric name; the record is dropped if the run already holds its step for that metric
        (a rung reported again by a trial resumed from an earlier checkpoint)."""
        points = [[k, float(v), int(ts), int(step)] for k, v, ts, step in metrics if math.isfinite(float(v))]
        if points or params or tags:
            record = {
                "op": "log_batch",
                "run": self._ref(ref),
                "metrics": points,
                "params": params or {},
                "tags": tags or {},
            }
            self._submit({**record, "new_steps_of": new_steps_of} if new_steps_of else record)

    def log_artifact(self, ref: str, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file or a folder (under `artifact_path` in the run's artifacts); what is sent is what the
        path holds when the record is sent."""
        self._submit(
            {
                "op": "log_artifact",
                "run": self._ref(ref),
                "path": str(Path(path).resolve()),
                "artifact_path": artifact_path,
            }
        )

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
            return self.ops.call(lambda: fn(self.ops.client(uri or self.tracking_uri)))
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
        return self.journal.pending

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.rejected == 0

    def flush(self) -> bool:
        """Send every kept record now, in order, stopping at the first the store does not take.
        True when nothing is left to send."""
        if not self.path.exists():
            return True
        return self._send(retries=False)

    def close(self) -> None:
        """Stop the background sender (what it has not sent stays in the journal for flush() or a later run)."""
        if self._sender is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            self._sender.join()
            self._sender, self._stopping = None, False

    # ---- sending -------------------------------------------------------------------------------------
    def _ref(self, ref: str | None) -> str | None:
        return None if ref is None else self.ops.run_ids.get(ref, ref)

    def _submit(self, record: dict[str, Any]) -> None:
        self.journal.append({"uri": self.tracking_uri, **record, "made": now_ms()})
        if self._background:
            with self._wake:
                self._appended = True
                self._wake.notify()
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, daemon=True, name=f"mlflow-outbox:{self.folder.name}"
                )
                self._sender.start()
        elif not self._down or self._clock() >= self._next_probe:
            self._send(retries=not self._down)

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                if not self._appended and not self._stopping:
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
                due = self._appended and (not self._down or self._clock() >= self._next_probe)
                if due:
                    self._appended = False
            if not due:
                continue
            try:
                self._send(retries=not self._down)
            except Exception as exc:  # noqa: BLE001 - the sender must outlive a bug; the journal keeps the records
                self._went_down(self.tracking_uri, "sending the journal", exc)
                with self._wake:
                    self._appended = True

    def _send(self, *, retries: bool) -> bool:
        """One pass over the journal: everything not sent yet, in order. True when nothing is left."""
        with self._sending, self.journal.reading():
            records, progress = self.journal.records(), self.journal.progress()
            self.ops.run_ids.update(progress.notes)
            start, count = progress.sent, len(records)
            if start >= count:
                self.journal.remove_if_done(count)
                return True
            may_have_arrived = progress.tried  # records up to here may be on the store already: dedupe them
            progress.tried = count - 1
            self._save(progress)
            was_down, done = self._down, set()
            for group in self._groups(records, start, count, done):
                batch = [records[i] for i in group]
                try:
                    self._attempt(batch, dedupe=group[0] <= may_have_arrived, retries=retries)
                except StoreDown as exc:
                    if not self._down:
                        self._went_down(batch[0]["uri"], describe(batch[0]), exc)
                    self._down, self._next_probe = True, self._clock() + PROBE_INTERVAL_S
                    return False
                except Refused as exc:
                    if len(batch) == 1:
                        self._reject(batch[0], exc)
                    else:
                        self._one_by_one(batch)
                done.update(group)
                sent_at = now_ms()
                self.lags_ms += [sent_at - r["made"] for r in batch if "made" in r]
                while progress.sent in done:
                    progress.sent += 1
                self._save(progress)
            if not self.journal.remove_if_done(count):
                self._save(progress)
            if was_down:
                uris = sorted({r["uri"] for r in records[start:]})
                self.log(f"MLflow: {', '.join(uris)} answers again; sent the {count - start} kept records")
            self._down = False
            return True

    def _groups(self, records: list[dict[str, Any]], start: int, count: int, done: set[int]):
        """The records [start, count) in order, a run's metric records merged where nothing of that run comes
        between them. Yields lists of indices."""
        for i in range(start, count):
            if i in done:
                continue
            record = records[i]
            if record["op"] != "log_batch":
                yield [i]
                continue
            run, group = self._ref(record["run"]), [i]
            for j in range(i + 1, count):
                if len(group) == RECORDS_PER_CALL:
                    break
                other = records[j]
                if j in done or self._ref(other.get("run")) != run:
                    continue
                if other["op"] != "log_batch" or other["params"]:
                    break
                group.append(j)
            yield group

    def _attempt(self, batch: list[dict[str, Any]], *, dedupe: bool, retries: bool) -> None:
        pauses = (0.0, *RETRY_PAUSES_S) if retries else (0.0,)
        for attempt, pause in enumerate(pauses):
            if pause:
                self._sleep(pause)
            try:
                # After a failed attempt the record may have arrived all the same: check before sending again.
                if batch[0]["op"] == "log_batch":
                    self.ops.log_batches(batch, dedupe=dedupe or attempt > 0, seen=self._view)
                else:
                    self.ops.execute(batch[0], dedupe=dedupe or attempt > 0, seen=self._view)
                return
            except StoreDown as exc:
                self._view = StoreView()  # a failed call may have reached the store or not: forget what we knew
                last = exc
        raise last

    def _one_by_one(self, batch: list[dict[str, Any]]) -> None:
        """A merged batch the store refused: each record alone, so only the refused ones are set aside."""
        for record in batch:
            try:
                self._attempt([record], dedupe=True, retries=False)
            except Refused as exc:
                self._reject(record, exc)

    def _save(self, progress: Progress) -> None:
        progress.notes = self.ops.run_ids.copy()
        self.journal.save_progress(progress)

    # ---- telling -------------------------------------------------------------------------------------
    def _went_down(self, uri: str, what: str, exc: Exception) -> None:
        self._down = True
        self._next_probe = self._clock() + PROBE_INTERVAL_S
        self.log(
            f"MLflow: {uri} is not answering ({what}: {exc}); going on without it: unsent records are "
            f"kept in {self.path} and sent when it answers again"
        )

    def _reject(self, record: dict[str, Any], exc: Exception) -> None:
        self.rejected += 1
        with open(self.rejected_path, "a") as f:  # only the journal's reader writes here, under its lock
            f.write(json.dumps({**record, "refused": str(exc)}) + "\n")
        if self.rejected == 1:  # one line: a refused run refuses every record of it after, each kept with its reason
            self.log(
                f"MLflow: {record['uri']} refused {describe(record)} ({exc}); refused records are kept in "
                f"{self.rejected_path}"
            )
