"""Small disks that fill up on purpose: a tmpfs mounted for a run, filled and freed.

A full disk is not something to fake above the file system: SQLite, its WAL and every
`write()` must meet ENOSPC as they would on a bell's SD card or a gateway's volume. A tmpfs
of a few megabytes, mounted for the run and filled with one file, gives exactly that and
touches nothing else on the machine. Mounting needs root (CAP_SYS_ADMIN); `can_mount()`
tells, so a test can skip with the reason instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

from simulator.errors import SimulatorError

FILLER = ".filler"
CHUNK = 1024 * 1024


class DiskError(SimulatorError):
    """A tmpfs could not be mounted (not root?) or unmounted."""


def can_mount() -> str | None:
    """None if this process may mount a tmpfs; otherwise why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    with tempfile.TemporaryDirectory() as where:
        try:
            disk = TmpDisk(Path(where), 1)
            disk.mount()
        except DiskError as exc:
            return str(exc)
        disk.unmount()
    return None


class TmpDisk:
    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._run("mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs")
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            # lazy: a process that still holds a file there (a stuck agent) must not keep
            # the mount alive past the run
            self._run("umount", "-l")
            self.mounted = False

    def fill(self, free_kb: int = 0) -> int:
        """Fill the disk with one file until `free_kb` is left; returns the bytes written."""
        written = 0
        zeros = bytes(CHUNK)
        with (self.path / FILLER).open("ab", buffering=0) as out:
            while True:
                try:
                    written += out.write(zeros) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        if free_kb:
            # give some back: "almost full" is a state of its own (a WAL that cannot grow)
            size = (self.path / FILLER).stat().st_size
            os.truncate(self.path / FILLER, max(0, size - free_kb * 1024))
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / FILLER).unlink()

    def _run(self, *command: str) -> None:
        try:
            subprocess.run(
                [*command, str(self.path)], check=True, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise DiskError(
                f"{command[0]} of a tmpfs at {self.path} failed: {detail.strip()}; "
                "the disk-full faults need root (CAP_SYS_ADMIN), or drop them from the scenario"
            ) from None
