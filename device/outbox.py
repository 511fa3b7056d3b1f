"""The device's durable outbox and sequence counter: nothing is lost, nothing repeats.

Every message that needs an ack is committed here (SQLite, WAL) before it is published,
and stays until the gateway's `received` ack verifies.

Two kinds of failure, two steps. The commit writes the row into the WAL file before the
publish: from then on it survives a crash of the agent (SIGKILL, OOM, a bug), because the
kernel holds the write. `sync()` then fsyncs the WAL, which is what survives a power cut;
it is the same fsync SQLite's synchronous=FULL takes inside every commit, only taken on
the outbox's own thread (`sync_soon()`) while the publish is on its way, so a press does
not wait for the SD card before it reaches the broker. A power cut before that fsync ends
can lose the row, exactly as it could during a FULL commit, and the alert has meanwhile
had its chance to reach the broker. Acks, resend bookkeeping and the downlink high-water
mark are not synced one by one: losing them to a power cut means at most one resend
more, which the gateway recognises by its message id.

The uplink sequence counter is reserved in blocks, committed and synced before any number
in the block is used: after a crash the counter jumps to the next block, so a number never
repeats, and a heartbeat does not cost a disk flush.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

# WITHOUT ROWID: the message id is the only key, so a commit writes one B-tree page to
# the WAL instead of a table page and an index page (half the bytes each fsync flushes).
OUTBOX_TABLE = """
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,   -- message id, kept across resends
    type            TEXT NOT NULL,
    body            TEXT NOT NULL,      -- the typed body as JSON
    created_ms      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    sms             INTEGER NOT NULL DEFAULT 0  -- SMS fallback: 0 no, 1 wanted, 2 done
) WITHOUT ROWID
"""
# moving an older agent's entries (a rowid table, with or without the sms column)
UPGRADE_COPY = {
    "with sms": "INSERT INTO outbox"
    " SELECT id, type, body, created_ms, attempts, next_attempt_ms, sms FROM outbox_old",
    "without sms": "INSERT INTO outbox"
    " SELECT id, type, body, created_ms, attempts, next_attempt_ms, 0 FROM outbox_old",
}
COUNTERS_TABLE = """
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
)
"""

SEQ_BLOCK = 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    type: str
    body_json: str
    created_ms: int
    attempts: int
    next_attempt_ms: int


class Outbox:
    def __init__(self, path: Path | str, *, power_safe: bool = True) -> None:
        """`power_safe=False` makes `sync()` do nothing: the simulator runs thousands of
        outboxes on one disk, and a power cut is not what it tests."""
        in_memory = str(path) == ":memory:"
        if not in_memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        # One agent per outbox: held for good, the lock makes a second agent on the same
        # state_dir fail at start instead of reusing sequence numbers; and a commit takes
        # no lock calls (with WAL, the index lives in memory, not in an -shm file).
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit writes the WAL but does not fsync it; sync() does (see above)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(COUNTERS_TABLE)  # the first write: takes the lock, creates the WAL
        self._create_or_upgrade_outbox()
        self._wal_fd: int | None = None
        # held while fsyncing (on the syncer thread too) and while closing the descriptor
        self._fd_lock = threading.Lock()
        # sync_soon() asks, the syncer thread answers: commit generations, not a queue
        self._sync_state = threading.Condition()
        self._sync_asked = self._sync_done = 0
        self._closing = False
        self._syncer: threading.Thread | None = None
        if power_safe and not in_memory:
            self._wal_fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            # the WAL's directory entry must itself survive a power cut
            directory = os.open(Path(path).resolve().parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            # One thread, not a pool task per commit: asking costs a press one futex wake,
            # and nothing comes back to the event loop when the fsync ends.
            self._syncer = threading.Thread(
                target=self._sync_forever, name=f"outbox-fsync {path}", daemon=True
            )
            self._syncer.start()
        self._seq = self._counter("seq_reserved")
        self._reserved = self._seq

    def _create_or_upgrade_outbox(self) -> None:
        row = self._db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"
        ).fetchone()
        if row is None:
            self._db.execute(OUTBOX_TABLE)
            return
        if "WITHOUT ROWID" in row[0].upper():
            return
        # An outbox written by an older agent: move its entries into the current layout,
        # all in one transaction.
        columns = {info[1] for info in self._db.execute("PRAGMA table_info(outbox)")}
        self._db.execute("BEGIN")
        try:
            self._db.execute("ALTER TABLE outbox RENAME TO outbox_old")
            self._db.execute(OUTBOX_TABLE)
            self._db.execute(UPGRADE_COPY["with sms" if "sms" in columns else "without sms"])
            self._db.execute("DROP TABLE outbox_old")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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
            self.sync()  # once a block: no number of it goes out before this is on disk
        self._seq += 1
        return self._seq

    def sync(self) -> None:
        """Make every commit so far survive a power cut (fsync the WAL), now, blocking."""
        with self._fd_lock:
            if self._wal_fd is not None:
                os.fsync(self._wal_fd)

    def sync_soon(self) -> None:
        """Have the syncer thread fsync every commit so far; returns at once. Commits asked
        for while an fsync runs share the next one."""
        if self._syncer is None:
            return
        with self._sync_state:
            self._sync_asked += 1
            self._sync_state.notify()

    def wait_synced(self, timeout_s: float) -> bool:
        """Block until every sync asked for so far is done; False on timeout."""
        with self._sync_state:
            target = self._sync_asked
            return self._sync_state.wait_for(
                lambda: self._sync_done >= target or self._closing, timeout_s
            )

    def _sync_forever(self) -> None:
        while True:
            with self._sync_state:
                self._sync_state.wait_for(
                    lambda: self._sync_asked > self._sync_done or self._closing
                )
                if self._closing:
                    return
                target = self._sync_asked
            try:
                self.sync()
            except OSError as exc:
                # the row is written and the publish went out; only power-cut safety is missing
                log.error("outbox: fsync failed: %s", exc)
            with self._sync_state:
                self._sync_done = target
                self._sync_state.notify_all()

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

        `resend_at_ms` schedules the first resend in the same commit, so one commit stands
        between a press and its publish. Then `sync_soon()`, for power-cut safety.
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
        """The SMS fallback has had its go at this message: never again, even after a
        restart or a power cut (an SMS takes seconds; its fsync does not matter)."""
        self._db.execute("UPDATE outbox SET sms = 2 WHERE id = ?", (message_id,))
        self.sync()

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
        if self._syncer is not None:
            with self._sync_state:
                self._closing = True
                self._sync_state.notify_all()
            self._syncer.join()
        with self._fd_lock:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        self._db.close()
