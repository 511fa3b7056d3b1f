"""The faults' small disks and damaged outboxes: real ENOSPC, real files."""

from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
from pathlib import Path

import pytest

from simulator.disks import TmpDisk, can_mount
from simulator.worker import damage_outbox


def test_a_filled_disk_refuses_writes_until_freed(tmp_path: Path) -> None:
    if (why := can_mount()) is not None:
        pytest.skip(why)
    disk = TmpDisk(tmp_path / "disk", 4)
    disk.mount()
    try:
        assert disk.fill() > 0
        with pytest.raises(OSError) as full:
            (disk.path / "alert").write_bytes(b"x" * 8192)
        assert full.value.errno == errno.ENOSPC
        disk.free()
        (disk.path / "alert").write_bytes(b"x" * 8192)
        disk.fill(free_kb=512)
        assert 500 * 1024 <= shutil.disk_usage(disk.path).free <= 520 * 1024
    finally:
        disk.unmount()
    assert not disk.mounted and not (tmp_path / "disk" / "alert").exists()


def outbox(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE t (v BLOB)")
        db.executemany("INSERT INTO t VALUES (?)", [(bytes(200),) for _ in range(200)])


def test_a_deleted_outbox_is_gone_with_its_wal_and_a_corrupted_one_is_unreadable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    outbox(path)
    (tmp_path / "outbox.db-wal").write_bytes(b"wal")
    damage_outbox(path, "restart")
    assert path.exists()
    damage_outbox(path, "delete")
    assert list(tmp_path.iterdir()) == []
    outbox(path)
    before = path.read_bytes()
    damage_outbox(path, "corrupt")
    after = path.read_bytes()
    assert len(after) == len(before) and after[:4096] == before[:4096] and after != before
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            damaged = db.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    except sqlite3.DatabaseError:
        damaged = True  # "database disk image is malformed": as the agent meets it
    assert damaged
