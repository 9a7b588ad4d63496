"""Writing a file so that a crash mid-write leaves the previous version, never half a file.

The one rule, for every file the project writes in place (checkpoints, exports, reports, metrics): write a
temporary file beside the target (`<name>.tmp`, on the same file system), then rename it over the target,
which is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The temporary path to write `path`'s new content to; it replaces `path` when the block ends without an
    error, and is removed when it raises (the previous `path` stays). For writers that want a file name,
    e.g. `with atomic_path(p) as tmp: torch.save(state, tmp)`."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
