"""The outbox under faults: a damaged file at start-up, a full disk, a lost counter.

Damage is made by hand on real SQLite files; a full disk is the outbox's own connection
refusing writes with SQLite's own error (SQLITE_FULL), behind the same interface.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from device_faults_kit import FullDisk

from device.outbox import (
    SEQ_BLOCK,
    Outbox,
    OutboxBusy,
    OutboxDamaged,
    OutboxError,
    OutboxFull,
    OutboxStorageFailed,
    OutboxUnwritable,
)
from protocol.messages import Alert

BODY = Alert(bell="emergency", trigger="press").model_dump_json()
PAGE = 4096
FRAME = 24 + PAGE  # the WAL's frame header and one page


def _killed_with_waiting_alert(path: Path) -> None:
    """An agent that pressed, had one alert acked, pressed again, and was killed: the
    waiting alert is only in the WAL (never checkpointed into the database file)."""
    script = (
        "import os, signal\n"
        "from device.outbox import Outbox\n"
        f"box = Outbox({str(path)!r})\n"
        "box.next_seq()\n"
        f"box.put('alert-acked1', 'alert', {BODY!r}, 5, resend_at_ms=9)\n"
        "box.received('alert-acked1')\n"
        f"box.put('alert-waits1', 'alert', {BODY!r}, 6, resend_at_ms=9, sms=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()


def _damage(path: Path, start: int, end: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))
    return bytes(data)


def _moved_aside(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if ".damaged-" in p.name)


def test_a_damaged_page_header_at_the_end_of_the_wal_loses_nothing(tmp_path: Path) -> None:
    # SQLite stops at the first frame whose checksum fails and says nothing: the frame that
    # holds the waiting alert would be skipped in silence
    path = tmp_path / "outbox.db"
    _killed_with_waiting_alert(path)
    wal = Path(f"{path}-wal")
    last_frame = wal.stat().st_size - FRAME
    damaged = _damage(wal, last_frame + 24, last_frame + 24 + 40)  # its B-tree page header
    box = Outbox(path)
    assert box.recovery is not None
    assert "write-ahead log" in box.recovery.problem
    (entry,) = box.pending()
    assert (entry.id, entry.created_ms, entry.next_attempt_ms) == ("alert-waits1", 6, 9)
    assert [e.id for e in box.sms_due(10)] == ["alert-waits1"]  # its SMS mark too
    assert box.recovery.salvaged == 1
    # the counter was readable: numbers go on from the next block, none repeats
    assert box.next_seq() == SEQ_BLOCK + 1
    # the damaged files are kept as found, for whoever looks into it
    aside = _moved_aside(path)
    assert [p.name for p in aside] == [
        box.recovery.moved_to.name,
        f"{box.recovery.moved_to.name}-wal",
    ]
    assert Path(f"{box.recovery.moved_to}-wal").read_bytes() == damaged


def test_damage_over_the_entry_itself_is_reported_not_silent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    _killed_with_waiting_alert(path)
    wal = Path(f"{path}-wal")
    _damage(wal, wal.stat().st_size - 100, wal.stat().st_size)  # the cells' end of the page
    box = Outbox(path)
    assert box.recovery is not None and box.recovery.salvaged == len(box.pending())
    assert all(e.id == "alert-waits1" for e in box.pending())
    assert box.next_seq() == SEQ_BLOCK + 1


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database, it is a text file\n" * 200)
    box = Outbox(path)
    assert box.recovery is not None and "not a database" in box.recovery.problem
    assert box.recovery.salvaged == 0
    box.put("alert-0001", "alert", BODY, 1)  # a fresh outbox that works
    assert [e.id for e in box.pending()] == ["alert-0001"]
    assert box.recovery.moved_to.read_bytes().startswith(b"this is not a database")


def test_an_empty_file_is_reported(tmp_path: Path) -> None:
    # SQLite takes an empty file for a new database; ours never leaves one behind, so an
    # empty outbox file means its contents went missing (a filesystem repair, a bad copy)
    path = tmp_path / "outbox.db"
    path.write_bytes(b"")
    box = Outbox(path)
    assert box.recovery is not None and box.recovery.problem == "empty file"
    assert [p.name for p in _moved_aside(path)] == [box.recovery.moved_to.name]


def test_a_truncated_file_gives_up_what_can_still_be_read(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    ids = [f"alert-{n:06d}" for n in range(300)]
    for n, message_id in enumerate(ids):
        box.put(message_id, "alert", BODY, n)
    box.close()  # a clean close moves everything into the database file
    assert not Path(f"{path}-wal").exists()
    size = path.stat().st_size
    assert size > 6 * PAGE
    os.truncate(path, size - 2 * PAGE)
    box = Outbox(path)
    assert box.recovery is not None
    salvaged = [e.id for e in box.pending()]
    assert box.recovery.salvaged == len(salvaged)
    assert 0 < len(salvaged) < len(ids)
    assert set(salvaged) <= set(ids)


def test_a_damaged_page_that_only_the_integrity_check_finds_is_recovered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    ids = [f"alert-{n:06d}" for n in range(300)]
    for n, message_id in enumerate(ids):
        box.put(message_id, "alert", BODY, n)
    box.close()
    # cell pointers of one leaf page pointing nowhere: the file opens, reads may not
    _damage(path, 5 * PAGE + 8, 5 * PAGE + 24)
    box = Outbox(path)
    assert box.recovery is not None
    assert box.recovery.problem.startswith("integrity check failed")
    assert "\n" not in box.recovery.problem
    salvaged = {e.id for e in box.pending()}
    assert 0 < len(salvaged) < len(ids) and salvaged <= set(ids)


def test_an_outbox_that_cannot_be_moved_aside_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"garbage" * 100)

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutboxDamaged, match=r"damaged .*not a database.* cannot be moved aside"):
        Outbox(path)


def test_a_healthy_outbox_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    _killed_with_waiting_alert(path)  # a crash leaves a WAL behind: that is not damage
    box = Outbox(path)
    assert box.recovery is None
    assert [e.id for e in box.pending()] == ["alert-waits1"]
    assert _moved_aside(path) == []


# ---- a full disk ------------------------------------------------------------------------------


def full_outbox(path: Path) -> tuple[Outbox, FullDisk, list[str | None]]:
    heard: list[str | None] = []
    box = Outbox(path, on_storage=heard.append)
    disk = FullDisk(box._db)
    box._db = disk  # type: ignore[assignment]
    return box, disk, heard


def test_what_a_full_disk_refuses_is_held_and_written_once_there_is_room(tmp_path: Path) -> None:
    box, disk, heard = full_outbox(tmp_path / "outbox.db")
    box.put("alert-ondisk", "alert", BODY, 1, resend_at_ms=5)
    disk.full = True
    assert box.put("alert-inmem1", "alert", BODY, 2, resend_at_ms=6, sms=True) is False
    assert heard == ["database or disk is full"]
    assert box.put("alert-inmem2", "alert", BODY, 3, resend_at_ms=7) is False
    assert heard == ["database or disk is full"]  # once per outage
    # held entries are pending, due, counted and wanted by the SMS fallback like any other
    assert [e.id for e in box.pending()] == ["alert-ondisk", "alert-inmem1", "alert-inmem2"]
    assert [e.id for e in box.due(6)] == ["alert-ondisk", "alert-inmem1"]
    assert box.depth() == 3
    assert [e.id for e in box.sms_due(10)] == ["alert-inmem1"]
    # resend bookkeeping the disk refuses is held too: no entry is due again at once
    box.attempted("alert-ondisk", 50)
    box.attempted("alert-inmem1", 60)
    assert box.next_attempt_ms() == 7
    assert box.received("alert-inmem2") is True
    assert box.received("alert-ondisk") is True  # hidden now, deleted later
    assert [e.id for e in box.pending()] == ["alert-inmem1"]
    disk.full = False
    box.attempted("alert-inmem1", 70)  # the resend loop's next write finds room
    assert heard == ["database or disk is full", None]
    assert not box.storage_failing
    box.close()
    (entry,) = Outbox(tmp_path / "outbox.db").pending()
    assert (entry.id, entry.attempts, entry.next_attempt_ms) == ("alert-inmem1", 2, 70)


def test_a_sequence_block_the_disk_refuses_is_used_all_the_same(tmp_path: Path) -> None:
    box, disk, heard = full_outbox(tmp_path / "outbox.db")
    disk.full = True
    assert [box.next_seq() for _ in range(3)] == [1, 2, 3]
    assert heard == ["database or disk is full"]


def test_a_raised_counter_is_on_disk_before_its_first_number_goes_out(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    assert box.next_seq() == 1
    box.raise_seq(7_001)  # the gateway's sync: its high-water mark is 7,000
    assert box.next_seq() == 7_001
    box.raise_seq(5)  # never down
    assert box.next_seq() == 7_002
    box.close()
    assert Outbox(path).next_seq() > 7_002


# ---- what the agent's command says when the outbox cannot be opened ---------------------------


def test_a_full_disk_at_start_is_not_blamed_on_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device.cli import outbox_fix

    # a real SQLITE_FULL: the new outbox may not grow past its first page
    connect = sqlite3.connect

    def one_page(path: str, **options: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = connect(path, **options)
        db.execute("PRAGMA max_page_count = 1")
        return db

    monkeypatch.setattr(sqlite3, "connect", one_page)
    with pytest.raises(OutboxFull) as full:
        Outbox(tmp_path / "outbox.db")
    assert not isinstance(full.value, sqlite3.Error)
    assert "free space" in outbox_fix(full.value)
    monkeypatch.undo()
    # damaged, and the copy of its log could not be written aside for want of room
    path = tmp_path / "damaged.db"
    path.write_bytes(b"garbage" * 100)
    monkeypatch.setattr(os, "replace", _fail_with(errno.ENOSPC))
    with pytest.raises(OutboxFull, match="damaged") as damaged_full:
        Outbox(path)
    assert "free space" in outbox_fix(damaged_full.value)
    monkeypatch.setattr(os, "replace", _fail_with(errno.EIO))
    with pytest.raises(OutboxStorageFailed) as failing:
        Outbox(path)
    assert "check it" in outbox_fix(failing.value)


def test_an_outbox_that_cannot_be_moved_aside_is_told_to_be_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device.cli import outbox_fix

    path = tmp_path / "outbox.db"
    path.write_bytes(b"garbage" * 100)
    monkeypatch.setattr(os, "replace", _fail_with(errno.EACCES))
    with pytest.raises(OutboxDamaged) as unusable:
        Outbox(path)
    fix = outbox_fix(unusable.value)
    assert "moved aside" in fix and "free space" not in fix


def test_a_state_dir_that_cannot_be_a_folder_is_unwritable(tmp_path: Path) -> None:
    from device.cli import outbox_fix

    # (a file where the folder should be: refused to root as well, unlike permissions)
    (tmp_path / "state").write_text("")
    with pytest.raises(OutboxUnwritable) as unwritable:
        Outbox(tmp_path / "state" / "outbox.db")
    assert isinstance(unwritable.value, PermissionError)
    assert not isinstance(unwritable.value.__cause__, OutboxError)
    assert "can write" in outbox_fix(unwritable.value)


def test_a_second_agent_is_told_to_stop_the_first(tmp_path: Path) -> None:
    from device.cli import outbox_fix

    first = Outbox(tmp_path / "outbox.db")
    with pytest.raises(OutboxBusy) as busy:
        Outbox(tmp_path / "outbox.db")
    first.close()
    assert not isinstance(busy.value, sqlite3.Error)
    assert "another agent" in outbox_fix(busy.value)


def test_storage_that_cannot_be_read_is_an_outbox_error(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    box.put("alert-0001", "alert", BODY, 5)
    real = box._db
    box._db = _Unreadable(real)  # type: ignore[assignment]
    for read in (box.pending, box.depth, box.next_attempt_ms, lambda: box.sms_due(10)):
        with pytest.raises(OutboxStorageFailed, match="cannot be read"):
            read()
    box._db = real
    box.close()
    assert issubclass(OutboxStorageFailed, OutboxError)


class _Unreadable:
    """The outbox's connection on storage that fails every read."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: object = ()) -> sqlite3.Cursor:
        raise sqlite3.OperationalError("disk I/O error")


def _fail_with(code: int) -> object:
    def fail(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail
