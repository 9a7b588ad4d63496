"""MLflow writes that never wait for the store and outlive an outage: journaled first, sent in order, exactly once.

Every MLflow write of the tuning driver (tuner/tracking.py) and of train.py's run (tuner/mlflow_runs.py) is a
*record* handed to the `Outbox` of a folder (the experiment folder, the full run's folder): create or find a run,
log a batch of metrics/params/tags, attach a file or folder, set a run's status, end a run (the records:
tuner/outbox_records.py). The record is appended to the folder's journal, `mlflow_outbox.jsonl`
(tuner/journal.py), and then sent from there, in order, by the outbox's sender (tuner/outbox_sender.py;
tuner/mlflow_ops.py says what each record means to MLflow):

  * in the foreground (the default): at once, by the caller;
  * in the background (`background=True`, the tuning driver): by a sender thread, so that the caller, Tune's
    event loop, only ever waits for a local append. A slow store makes the records arrive later, never the
    search slower.

While the store answers, a failed send is tried twice more, 1 s and 2 s later (MLflow's own HTTP retries, minutes
long, are cut to none and its timeout to 10 s in this process); then one line says which store failed, and from
then on records are only appended, and at most every PROBE_INTERVAL_S the journal is sent, which is also how the
outbox learns that the store is back. `flush()` sends it on demand (the driver calls it at the end of a search;
`python -m tuner.sync FOLDER` and the next run do it later). A record the store refuses outright (a 4xx answer)
goes to `mlflow_outbox.rejected.jsonl` with the reason.

Runs are named by *keys* the caller chooses ("vpsde:<uuid>", "vpsde:<uuid>/<trial_id>"), because a run that has
not been created yet has no MLflow id; a record names its run by id when it is known and by key otherwise.
Timestamps are those of the moment the record was made, so a backfilled run has the same metric history, in the
same order, as one sent live.

This module puts the pieces together: the outbox's files and settings, run keys and ids, and when a record is
sent (now, or by waking the sender thread).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.journal import Journal
from tuner.mlflow_ops import KEY_PREFIX, MlflowOps, is_key, mlflow_client, now_ms
from tuner.outbox_records import OutboxRecords
from tuner.outbox_sender import OutboxSender, SenderThread

JOURNAL = "mlflow_outbox"
OUTBOX_FILE = f"{JOURNAL}.jsonl"
STATE_FILE = f"{JOURNAL}.state.json"
REJECTED_FILE = f"{JOURNAL}.rejected.jsonl"
EXIT_TRACKING_INCOMPLETE = 3  # the work is done and on disk, but not everything reached MLflow yet
PROBE_INTERVAL_S = 30.0
RETRY_PAUSES_S = (1.0, 2.0)
# Brief on purpose: the outbox is the long-term retry. Set only where the user has not set them.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def new_key(*parts: str) -> str:
    return KEY_PREFIX + "/".join(parts or (uuid.uuid4().hex,))


def shorten_http_retries() -> None:
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


class Outbox(OutboxRecords):
    """The MLflow writes of one folder: journaled, then sent in order now, in the background, or when the store
    answers again. The writes it takes (create_run, log_batch, ...) are `OutboxRecords`; this class says where
    they go and when they are sent."""

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
        self.ops = MlflowOps(client_factory or mlflow_client)
        # The settings are read when an outbox is made, so a test can shorten them for the outboxes it makes.
        self.sender = OutboxSender(
            self.journal,
            self.ops,
            tracking_uri,
            rejected_path=self.rejected_path,
            log=log,
            clock=clock,
            sleep=sleep,
            probe_interval_s=PROBE_INTERVAL_S,
            retry_pauses_s=RETRY_PAUSES_S,
        )
        self._thread = SenderThread(self.sender, f"mlflow-outbox:{self.folder.name}") if background else None

    # ---- runs: keys and ids --------------------------------------------------------------------------
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

    # ---- sending -------------------------------------------------------------------------------------
    def read(self, fn: Callable[[Any], Any], default: Any = None, what: str = "a read", uri: str | None = None) -> Any:
        """fn(client) against the store, or `default` while it is down (a failed read marks it down)."""
        return self.sender.read(fn, default, what, uri)

    @property
    def pending(self) -> int:
        """Records kept and not yet sent."""
        return self.journal.pending

    @property
    def rejected(self) -> int:
        """Records the store refused in this process."""
        return self.sender.rejected

    @property
    def lags_ms(self) -> list[int]:
        """From making a record to the store having it, for those sent by this process."""
        return self.sender.lags_ms

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.rejected == 0

    def flush(self) -> bool:
        """Send every kept record now, in order, stopping at the first the store does not take.
        True when nothing is left to send."""
        return self.sender.flush()

    def close(self) -> None:
        """Stop the background sender (what it has not sent stays in the journal for flush() or a later run)."""
        if self._thread is not None:
            self._thread.stop()

    def _ref(self, ref: str | None) -> str | None:
        return None if ref is None else self.ops.run_ids.get(ref, ref)

    def _submit(self, record: dict[str, Any]) -> None:
        self.journal.append({"uri": self.tracking_uri, **record, "made": now_ms()})
        if self._thread is not None:
            self._thread.wake()
        elif self.sender.due():
            self.sender.send()
