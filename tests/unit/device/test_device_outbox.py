"""The outbox: one commit per message, sequence numbers that never repeat, old files upgraded."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from device.outbox import SEQ_BLOCK, Outbox, OutboxBusy


def test_put_schedules_the_first_resend_in_the_same_commit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    box.put("alert-0001", "alert", "{}", 1_000, resend_at_ms=3_000)
    assert box.due(2_999) == []
    (entry,) = box.due(3_000)
    assert (entry.id, entry.attempts, entry.created_ms) == ("alert-0001", 0, 1_000)
    # without a resend time it is due at once (the agent publishes it right away anyway)
    box.put("alert-0002", "alert", "{}", 1_000)
    assert [e.id for e in box.due(1_000)] == ["alert-0002"]


def test_next_attempt_is_the_earliest_due_time_and_none_when_empty(tmp_path: Path) -> None:
    # the agent's resend loop sleeps until this instead of polling the database
    box = Outbox(tmp_path / "outbox.db")
    assert box.next_attempt_ms() is None
    box.put("alert-0001", "alert", "{}", 1_000, resend_at_ms=9_000)
    box.put("alert-0002", "alert", "{}", 1_000, resend_at_ms=5_000)
    assert box.next_attempt_ms() == 5_000
    box.attempted("alert-0002", 12_000)
    assert box.next_attempt_ms() == 9_000
    box.received("alert-0001")
    box.received("alert-0002")
    assert box.next_attempt_ms() is None


def _killed_after(path: Path, code: str) -> None:
    """Run `code` against an outbox at `path` in a process that then SIGKILLs itself."""
    script = (
        "import os, signal, sys\n"
        "from device.outbox import Outbox\n"
        f"box = Outbox({str(path)!r})\n"
        f"{code}\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()


def test_sequence_numbers_never_repeat_across_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    _killed_after(path, "print(max(box.next_seq() for _ in range(5)), flush=True)")
    again = Outbox(path)
    # the killed process used 1..5 of a reserved block: the next number starts a new block
    assert SEQ_BLOCK + 1 <= again.next_seq() <= SEQ_BLOCK + 2


def test_a_committed_entry_survives_a_kill_before_any_sync(tmp_path: Path) -> None:
    # the row is written before the publish: a crashed agent resends it on restart
    path = tmp_path / "outbox.db"
    _killed_after(path, "box.put('alert-0001', 'alert', '{}', 5, resend_at_ms=9)")
    (entry,) = Outbox(path).pending()
    assert (entry.id, entry.created_ms, entry.next_attempt_ms) == ("alert-0001", 5, 9)


def test_sync_flushes_the_write_ahead_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # power-cut safety is an fsync of the file the commit went to, not of something else
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.put("alert-0001", "alert", "{}", 5)
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    box.sync()
    assert flushed == [f"{path}-wal"]
    assert os.path.getsize(f"{path}-wal") > 0  # the committed row is in it
    # a new block of sequence numbers is flushed before its first number is handed out
    flushed.clear()
    box.next_seq()
    assert flushed == [f"{path}-wal"]
    box.close()


def test_without_power_safety_sync_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox(tmp_path / "outbox.db", power_safe=False)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync called"))
    box.put("alert-0001", "alert", "{}", 5)
    box.sync()
    box.next_seq()
    assert box.depth() == 1


def test_a_second_agent_on_the_same_outbox_is_refused(tmp_path: Path) -> None:
    # two agents sharing a state_dir would hand out the same sequence numbers
    path = tmp_path / "outbox.db"
    first = Outbox(path)
    with pytest.raises(OutboxBusy, match="locked"):
        Outbox(path)
    first.close()
    Outbox(path).close()  # free again once the first has let go


def test_a_locked_outbox_is_refused_at_once_not_after_a_busy_wait(tmp_path: Path) -> None:
    # the lock is held for good by the other agent: waiting for it only delays the refusal
    box = Outbox(tmp_path / "outbox.db")
    assert box._db.execute("PRAGMA busy_timeout").fetchone() == (0,)
    box.close()


def test_sms_marks_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.put("alert-0001", "alert", "{}", 0, sms=True)
    box.put("ring-00001", "alert", "{}", 0)
    assert [e.id for e in box.sms_due(0)] == ["alert-0001"]
    box.sms_done("alert-0001")
    box.close()
    assert Outbox(path).sms_due(10**12) == []


@pytest.mark.parametrize("with_sms_column", [False, True])
def test_an_outbox_from_an_older_agent_is_upgraded_and_keeps_its_entries(
    tmp_path: Path, with_sms_column: bool
) -> None:
    path = tmp_path / "outbox.db"
    sms_column = ", sms INTEGER NOT NULL DEFAULT 0" if with_sms_column else ""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE outbox (id TEXT PRIMARY KEY, type TEXT NOT NULL, body TEXT NOT NULL,"
            " created_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            f" next_attempt_ms INTEGER NOT NULL{sms_column})"
        )
        db.execute(
            "INSERT INTO outbox (id, type, body, created_ms, attempts, next_attempt_ms)"
            " VALUES ('alert-0001', 'alert', '{}', 5, 2, 7)"
        )
        if with_sms_column:
            db.execute("UPDATE outbox SET sms = 1")
    box = Outbox(path)
    (entry,) = box.pending()
    assert (entry.id, entry.attempts, entry.next_attempt_ms) == ("alert-0001", 2, 7)
    # marked for SMS only if the older agent had marked it; before the column, none was
    assert [e.id for e in box.sms_due(10**12)] == (["alert-0001"] if with_sms_column else [])
    box.put("alert-0002", "alert", "{}", 6, sms=True)
    assert "alert-0002" in [e.id for e in box.sms_due(10**12)]
    box.close()
    with sqlite3.connect(path) as db:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'outbox'").fetchone()
    assert "WITHOUT ROWID" in sql


def test_the_mqtt_session_loads_without_dnspython_which_stays_importable() -> None:
    # paho pulls in dnspython (~5 MB of a device's memory) only for connect_srv, unused
    code = (
        "import sys, ansimi.mqtt\n"
        "assert 'dns' not in sys.modules, 'dnspython was imported'\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('dns') is not None:\n"
        "    import dns.resolver\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
