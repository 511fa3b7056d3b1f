"""The device's durable outbox and sequence counter: nothing is lost, nothing repeats.

Every message that needs an ack is committed here (SQLite, WAL, synchronous=FULL) before
it is published, and stays until the gateway's `received` ack verifies. The uplink
sequence counter is reserved in blocks that are committed before any number in the block
is used: after a crash the counter jumps to the next block, so a number never repeats,
and a heartbeat does not cost a disk flush.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id              TEXT PRIMARY KEY,   -- message id, kept across resends
    type            TEXT NOT NULL,
    body            TEXT NOT NULL,      -- the typed body as JSON
    created_ms      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    sms             INTEGER NOT NULL DEFAULT 0  -- SMS fallback: 0 no, 1 wanted, 2 done
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

SEQ_BLOCK = 1000


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    type: str
    body_json: str
    created_ms: int
    attempts: int
    next_attempt_ms: int


class Outbox:
    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL on a device; the simulator may pass NORMAL to fit thousands on one disk.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "sms" not in columns:
            # an outbox written by an older agent: keep its entries, add the column
            self._db.execute("ALTER TABLE outbox ADD COLUMN sms INTEGER NOT NULL DEFAULT 0")
        self._seq = self._counter("seq_reserved")
        self._reserved = self._seq

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def next_seq(self) -> int:
        """The next uplink sequence number; strictly greater than any used before."""
        if self._seq >= self._reserved:
            self._reserved = self._seq + SEQ_BLOCK
            self._set_counter("seq_reserved", self._reserved)
        self._seq += 1
        return self._seq

    @property
    def down_high_water(self) -> int | None:
        """Highest gateway-to-device sequence number accepted so far."""
        value = self._counter("down_high_water")
        return value or None

    def set_down_high_water(self, seq: int) -> None:
        self._set_counter("down_high_water", seq)

    def put(
        self,
        message_id: str,
        type: str,
        body_json: str,
        now_ms: int,
        *,
        sms: bool = False,
        resend_at_ms: int | None = None,
    ) -> None:
        """Commit a message before it is published; `sms`: it may need the SMS fallback.

        `resend_at_ms` schedules the first resend in the same commit: on an SD card each
        commit is an fsync of several milliseconds, and this one stands between a press
        and its publish.
        """
        self._db.execute(
            "INSERT OR IGNORE INTO outbox (id, type, body, created_ms, next_attempt_ms, sms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, type, body_json, now_ms, resend_at_ms or now_ms, 1 if sms else 0),
        )

    def sms_due(self, created_before_ms: int) -> list[Entry]:
        """Messages that want the SMS fallback, not yet done, older than the cut-off."""
        rows = self._db.execute(
            "SELECT id, type, body, created_ms, attempts, next_attempt_ms FROM outbox"
            " WHERE sms = 1 AND created_ms <= ? ORDER BY created_ms",
            (created_before_ms,),
        ).fetchall()
        return [Entry(*row) for row in rows]

    def sms_done(self, message_id: str) -> None:
        """The SMS fallback has had its go at this message: never again, even after a restart."""
        self._db.execute("UPDATE outbox SET sms = 2 WHERE id = ?", (message_id,))

    def pending(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT id, type, body, created_ms, attempts, next_attempt_ms FROM outbox"
            " ORDER BY created_ms"
        ).fetchall()
        return [Entry(*row) for row in rows]

    def next_attempt_ms(self) -> int | None:
        """When the earliest pending entry is next due; None when the outbox is empty."""
        row = self._db.execute("SELECT MIN(next_attempt_ms) FROM outbox").fetchone()
        return None if row[0] is None else int(row[0])

    def due(self, now_ms: int) -> list[Entry]:
        return [e for e in self.pending() if e.next_attempt_ms <= now_ms]

    def attempted(self, message_id: str, next_attempt_ms: int) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ? WHERE id = ?",
            (next_attempt_ms, message_id),
        )

    def received(self, message_id: str) -> bool:
        """The gateway has kept it: drop it. False if it was not (or no longer) here."""
        return self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,)).rowcount == 1

    def depth(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self._db.close()
