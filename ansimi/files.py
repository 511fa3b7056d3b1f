"""Writing a file so that a crash, a power cut or a second reader never sees half of one.

`write_atomic` is the one way the suite replaces a file: a temporary file created beside
the target with its final mode (a key is never readable by others, not even for a
moment), written, flushed to disk, renamed over the target, and the directory entry
flushed too, so after a power cut the target is the whole old file or the whole new one.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Owner:
    uid: int
    gid: int


def create_private(path: Path) -> None:
    """Create `path`, empty, readable by its owner only, unless it exists (an existing file
    keeps its mode). For an SQLite database before it is opened: SQLite would create it
    0644 under the usual umask, and gives its -wal and -shm files the database's mode."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def private_database(path: Path | str) -> str:
    """`path` as sqlite3.connect takes it, the file made by create_private first (nothing
    for an in-memory database)."""
    name = str(path)
    if name != ":memory:":
        create_private(Path(name))
    return name


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries: a rename in it is only durable after this."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    owner: Owner | None = None,
    durable: bool = True,
) -> None:
    """Replace `path` with `data`, created with `mode` (and `owner`) before any byte is in it.

    `durable=False` skips both flushes (the rename stays atomic): only for a simulator's
    thousands of devices on one disk, which would spend the run waiting on fsync.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            # the umask may have narrowed the mode given to open(); the caller's mode wins
            os.fchmod(handle.fileno(), mode)
            if owner is not None:
                os.fchown(handle.fileno(), owner.uid, owner.gid)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
