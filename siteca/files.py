"""Writing files so that a crash or a second reader never sees half of one.

Every file provisioning writes goes through `write_atomic` (`ansimi.files`, the suite's
one atomic write): a temporary file created with its final mode (a key is never readable by
others, not even for a moment), flushed to disk, renamed over the target, and the directory
entry flushed too. The broker re-reads the CRL
and ACL on SIGHUP at a moment we do not choose; it must only ever find a whole old file or
a whole new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

from ansimi.files import Owner, fsync_dir, write_atomic

__all__ = [
    "BROKER_USER",
    "Owner",
    "broker_owners",
    "fsync_dir",
    "locked",
    "make_dir",
    "write_atomic",
]

BROKER_USER = "mosquitto"


def make_dir(path: Path, *, mode: int, owner: Owner | None = None) -> None:
    path.mkdir(parents=False, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def broker_owners() -> tuple[Owner, Owner] | None:
    """(files, data dir) owners for the broker's files, or None when nothing needs changing.

    Started as root, mosquitto drops to user `mosquitto` before it reads its certificates,
    ACL and CRL, and re-reads the ACL and CRL as that user on every SIGHUP. So when we run as
    root the broker's files become root:mosquitto 0640 (readable, not writable, by the
    broker) and its persistence folder mosquitto:mosquitto. Run as anyone else, we cannot
    chown, and a broker started by the same user reads the files as they are.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    return Owner(0, entry.pw_gid), Owner(entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory`: two installers revoking at once must not lose
    a revocation. Locking the directory itself leaves no lock file behind."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
