"""The outbox: one commit per message, sequence numbers that never repeat, old files upgraded."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from device.outbox import SEQ_BLOCK, Outbox


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


def test_sequence_numbers_never_repeat_across_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    used = [box.next_seq() for _ in range(5)]
    # no close(): what a SIGKILL leaves behind
    again = Outbox(path)
    assert again.next_seq() > max(used)
    assert again.next_seq() <= max(used) + SEQ_BLOCK + 2


def test_sms_marks_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.put("alert-0001", "alert", "{}", 0, sms=True)
    box.put("ring-00001", "alert", "{}", 0)
    assert [e.id for e in box.sms_due(0)] == ["alert-0001"]
    box.sms_done("alert-0001")
    box.close()
    assert Outbox(path).sms_due(10**12) == []


def test_an_outbox_from_an_older_agent_is_upgraded_and_keeps_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE outbox (id TEXT PRIMARY KEY, type TEXT NOT NULL, body TEXT NOT NULL,"
            " created_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt_ms INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO outbox VALUES ('alert-0001', 'alert', '{}', 5, 2, 5)")
    box = Outbox(path)
    assert [e.id for e in box.pending()] == ["alert-0001"]
    assert box.sms_due(10**12) == []  # not marked for SMS: it predates the fallback
    box.put("alert-0002", "alert", "{}", 6, sms=True)
    assert [e.id for e in box.sms_due(10**12)] == ["alert-0002"]


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
