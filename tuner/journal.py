"""An append-only journal of JSON records in a folder, safe against kills and shared between processes.

The journal knows nothing of what its records mean (tuner/outbox.py gives them one: MLflow writes). It keeps:

  * `<name>.jsonl`: one record a line, appended with a single write, so a kill leaves either the whole line or a
    torn tail without its newline; reading skips that tail and the next append cuts it first.
  * `<name>.state.json`: how far the reader has got: `sent` (records done, a prefix), `tried` (the last record a
    reader may have started on: those up to it may already have had their effect, those after it certainly not)
    and `notes`, a small dict the reader keeps beside them.

Appends lock the journal file itself for a moment (`flock`, which holds between processes and threads alike);
a pass over the records holds the folder's lock, so two processes never work through the same records at once
while writers go on appending without waiting for the pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trials.files import atomic_write_text


@dataclass
class Progress:
    sent: int = 0
    tried: int = -1
    notes: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self, folder: Path, name: str):
        self.folder = Path(folder)
        self.path = self.folder / f"{name}.jsonl"
        self.state_path = self.folder / f"{name}.state.json"

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:
                    continue  # removed (all done) while we waited: append to the new file instead
                _drop_partial_line(fd)
                os.write(fd, line)  # one write: a kill leaves the line whole or a torn tail that reading skips
                return
            finally:
                os.close(fd)  # closing releases the lock

    def records(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line]  # [:-1]: a torn last line

    def progress(self) -> Progress:
        try:
            state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        # No state: no reader has started on these records. A state without `tried` was written before readers
        # said: assume it tried everything.
        tried = -1 if not state else int(state.get("tried", 1 << 62))
        return Progress(int(state.get("sent", 0)), tried, dict(state.get("notes", state.get("resolved", {}))))

    def save_progress(self, progress: Progress) -> None:
        atomic_write_text(
            self.state_path, json.dumps({"sent": progress.sent, "tried": progress.tried, "notes": progress.notes})
        )

    @property
    def pending(self) -> int:
        """Records not done yet."""
        return max(0, len(self.records()) - self.progress().sent)

    def remove_if_done(self, count: int) -> bool:
        """Remove the journal when it holds exactly `count` records (all done); False when more came meanwhile."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # no append in between: one waiting on the lock sees the unlink
            if len(self.records()) != count:
                return False
            # The state first: a kill between the two unlinks leaves records to be done again, which a reader
            # must tolerate anyway; the other order could leave a count that skips the next journal's records.
            self.state_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """The lock of one pass over the records: one reader at a time, across processes and threads."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _drop_partial_line(fd: int) -> None:
    """A kill in the middle of an append leaves a line without its newline; cut it so the next line stays whole."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    block = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    os.ftruncate(fd, max(0, size - len(block)) + block.rfind(b"\n") + 1)
