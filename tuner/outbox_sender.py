"""Getting an outbox's journal to the store: in order, exactly once, through retries, outages and refusals.

The outbox (tuner/outbox.py) decides what a record says and appends it to its journal (tuner/journal.py); this
module only moves records from the journal to the store, so what the callers write and how it travels can each
be read without the other. tuner/mlflow_ops.py says what each record means to MLflow.

While the store answers, a failed send is tried again after each of the outbox's retry pauses (MLflow's own
HTTP retries, minutes long, are cut to none by the outbox); then one line says which store failed, what failed
and where the records are kept. From then on records are only appended, so the caller runs at full speed, and
at most every probe interval the journal is sent, which is also how the sender learns that the store is back.
A pass sends what has piled up in few calls: a run's pending metric records go as one log_batch.

Sending a record twice is harmless (tuner/mlflow_ops.py), and the journal remembers how far sending got and
which records may have reached the store already, so a kill at any point costs nothing and nothing arrives twice.

A record the store refuses outright (a 4xx answer: a deleted run, a param logged again with another value) is not
retried: one line, and the record goes to the rejected file with the reason. Any other failure keeps the record
for later: waiting loses nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuner.journal import Journal, Progress
from tuner.mlflow_ops import MlflowOps, Refused, StoreDown, StoreView, describe, now_ms

RECORDS_PER_CALL = 64  # a run's pending metric records merged into one log_batch, at most this many


class OutboxSender:
    """Sends one folder's journal to the store, one pass at a time, and knows whether the store is answering."""

    def __init__(
        self,
        journal: Journal,
        ops: MlflowOps,
        tracking_uri: str | None,
        *,
        rejected_path: Path,
        log: Callable[[str], None],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        probe_interval_s: float,
        retry_pauses_s: tuple[float, ...],
    ):
        self.journal, self.ops, self.tracking_uri = journal, ops, tracking_uri
        self.rejected_path, self.log = rejected_path, log
        self._clock, self._sleep = clock, sleep
        self._probe_interval_s, self._retry_pauses_s = probe_interval_s, retry_pauses_s
        self._view = StoreView()
        self._down = False
        self._next_probe = 0.0
        self._sending = threading.Lock()  # a flush from the caller and the background thread never overlap
        self.rejected = 0  # records refused in this process
        self.lags_ms: list[int] = []  # from making a record to the store having it, for those sent here

    def due(self) -> bool:
        """False while the store is down and the next probe has not come yet."""
        return not self._down or self._clock() >= self._next_probe

    def send(self) -> bool:
        """One pass, retrying failed calls only while the store is believed up. True when nothing is left."""
        return self._pass(retries=not self._down)

    def flush(self) -> bool:
        if not self.journal.path.exists():
            return True
        return self._pass(retries=False)

    def read(self, fn: Callable[[Any], Any], default: Any, what: str, uri: str | None) -> Any:
        if not self.due():
            return default
        try:
            return self.ops.call(lambda: fn(self.ops.client(uri or self.tracking_uri)))
        except StoreDown as exc:
            if self._down:
                self._next_probe = self._clock() + self._probe_interval_s
            else:
                self.went_down(uri or self.tracking_uri, what, exc)
            return default
        except Refused:
            return default

    def went_down(self, uri: str | None, what: str, exc: Exception) -> None:
        self._down = True
        self._next_probe = self._clock() + self._probe_interval_s
        self.log(
            f"MLflow: {uri} is not answering ({what}: {exc}); going on without it: unsent records are "
            f"kept in {self.journal.path} and sent when it answers again"
        )

    def _pass(self, *, retries: bool) -> bool:
        """Everything not sent yet, in order. True when nothing is left."""
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
            for group in merged_groups(records, start, count, done, self.ops.run_ids):
                batch = [records[i] for i in group]
                try:
                    self._attempt(batch, dedupe=group[0] <= may_have_arrived, retries=retries)
                except StoreDown as exc:
                    if not self._down:
                        self.went_down(batch[0]["uri"], describe(batch[0]), exc)
                    self._down, self._next_probe = True, self._clock() + self._probe_interval_s
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

    def _attempt(self, batch: list[dict[str, Any]], *, dedupe: bool, retries: bool) -> None:
        pauses = (0.0, *self._retry_pauses_s) if retries else (0.0,)
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

    def _reject(self, record: dict[str, Any], exc: Exception) -> None:
        self.rejected += 1
        with open(self.rejected_path, "a") as f:  # only the journal's reader writes here, under its lock
            f.write(json.dumps({**record, "refused": str(exc)}) + "\n")
        if self.rejected == 1:  # one line: a refused run refuses every record of it after, each kept with its reason
            self.log(
                f"MLflow: {record['uri']} refused {describe(record)} ({exc}); refused records are kept in "
                f"{self.rejected_path}"
            )


def merged_groups(
    records: list[dict[str, Any]], start: int, count: int, done: set[int], run_ids: dict[str, str]
) -> Iterator[list[int]]:
    """The records [start, count) in order, a run's metric records merged where nothing of that run comes
    between them. Yields lists of indices; read lazily, so `done` and `run_ids` (key -> run id) may grow
    between groups as the records before are sent."""
    for i in range(start, count):
        if i in done:
            continue
        record = records[i]
        if record["op"] != "log_batch":
            yield [i]
            continue
        run, group = run_ids.get(record["run"], record["run"]), [i]
        for j in range(i + 1, count):
            if len(group) == RECORDS_PER_CALL:
                break
            other = records[j]
            if j in done or run_ids.get(other.get("run"), other.get("run")) != run:
                continue
            if other["op"] != "log_batch" or other["params"]:
                break
            group.append(j)
        yield group


class SenderThread:
    """The background sender: a thread that sends whatever was appended, so its callers only ever wait for a
    local append. While the store is down it waits for the sender's next probe."""

    def __init__(self, sender: OutboxSender, name: str):
        self.sender, self.name = sender, name
        self._thread: threading.Thread | None = None
        self._wake = threading.Condition()
        self._appended = False
        self._stopping = False

    def wake(self) -> None:
        """Records were appended: the thread sends them (started by the first)."""
        with self._wake:
            self._appended = True
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
            self._thread.start()

    def stop(self) -> None:
        """What it has not sent stays in the journal."""
        if self._thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            self._thread.join()
            self._thread, self._stopping = None, False

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not self._appended and not self._stopping:
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
                due = self._appended and self.sender.due()
                if due:
                    self._appended = False
            if not due:
                continue
            try:
                self.sender.send()
            except Exception as exc:  # noqa: BLE001 - the sender must outlive a bug; the journal keeps the records
                self.sender.went_down(self.sender.tracking_uri, "sending the journal", exc)
                with self._wake:
                    self._appended = True
