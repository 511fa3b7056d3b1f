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
repeats, and a heartbeat does not cost a disk flush. Should the counter still go back (the
file lost, or a block that could not be written), the gateway's `sync` raises it again
(`raise_seq`; the rule is in `protocol.replay`).

Storage that fails (a full disk, an I/O error) never costs a message: what cannot be
written is held in memory, resent from there like any entry until acked, and written
out as soon as a write succeeds again. `on_storage` hears when storage fails and when it
is back, so the agent can tell the gateway.

A damaged file found at start-up (not a database, malformed, empty, or frames of its
write-ahead log that SQLite would silently skip) is moved aside under a timestamped name
with its -wal and -shm, a fresh outbox takes its place, every entry that can still be
read from the damaged copy is imported, and `recovery` says what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from ansimi.files import create_private
from device.errors import DeviceError
from protocol.ids import MESSAGE_ID_RE
from protocol.messages import Alert, Cancel, Health

# What the outbox keeps (messages that need an ack), and how their stored bodies come back.
OUTBOX_BODIES: Final[dict[str, type[Alert] | type[Cancel] | type[Health]]] = {
    "alert": Alert,
    "cancel": Cancel,
    "health": Health,
}

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
_ENTRY_COLUMNS = "id, type, body, created_ms, attempts, next_attempt_ms"
_STORE_ENTRY = (
    "INSERT OR REPLACE INTO outbox (id, type, body, created_ms, attempts, next_attempt_ms, sms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)

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


@dataclass(slots=True)
class _Held:
    """An entry the disk would not take (or not update): kept here until it can."""

    entry: Entry
    sms: int  # as the column: 0 no, 1 wanted, 2 done

    def change(self, **fields: Any) -> None:  # Entry's integer fields
        self.entry = dataclasses.replace(self.entry, **fields)

    def row(self) -> tuple[object, ...]:
        """As `_STORE_ENTRY` writes it."""
        return (*dataclasses.astuple(self.entry), self.sms)


@dataclass(frozen=True, slots=True)
class Recovery:
    """A damaged outbox found at start-up, moved aside, and what could be saved from it."""

    moved_to: Path
    problem: str  # what was wrong, as SQLite or the WAL check said it
    salvaged: int  # entries imported into the fresh outbox


class OutboxError(DeviceError, OSError):
    """The outbox cannot be opened or read. Each kind below has its own fix; SQLite's own
    error is the `__cause__`, never what a caller has to catch."""


class OutboxBusy(OutboxError):
    """Another agent holds this outbox (it keeps the lock for as long as it runs)."""


class OutboxFull(OutboxError):
    """No room on the disk for the outbox."""


class OutboxStorageFailed(OutboxError):
    """The storage under the outbox fails to read or write (an I/O error)."""


class OutboxUnwritable(OutboxError, PermissionError):
    """The outbox's folder or file cannot be created or written (permissions, read-only)."""


class OutboxDamaged(OutboxError):
    """The outbox is damaged and could not even be moved aside: a person must step in."""


def _outbox_error(
    exc: sqlite3.Error | OSError, message: str, otherwise: type[OutboxError]
) -> OutboxError:
    """`exc` as the kind of outbox error its fix depends on; `otherwise` when it is none
    of the kinds a storage error can name."""
    name = str(getattr(exc, "sqlite_errorname", ""))
    code = getattr(exc, "errno", None)
    kind = otherwise
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        kind = OutboxBusy
    elif name.startswith("SQLITE_FULL") or code == errno.ENOSPC:
        kind = OutboxFull
    elif name.startswith("SQLITE_IOERR") or code == errno.EIO:
        kind = OutboxStorageFailed
    error = kind(message)
    error.__cause__ = exc
    return error


class _Damaged(Exception):
    def __init__(self, problem: str, wal: bytes) -> None:
        super().__init__(problem)
        self.problem = problem
        # the log as found: closing the connection checkpoints and drops what it holds
        self.wal = wal


# Storage errors that mean the file itself is damaged (not locked, not unwritable).
_CORRUPTION = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    return str(getattr(exc, "sqlite_errorname", "")).startswith(_CORRUPTION)


class Outbox:
    def __init__(
        self,
        path: Path | str,
        *,
        power_safe: bool = True,
        on_storage: Callable[[str | None], None] | None = None,
    ) -> None:
        """`power_safe=False` makes `sync()` do nothing: the simulator runs thousands of
        outboxes on one disk, and a power cut is not what it tests.

        `on_storage(problem)` is called when a write first fails (with what failed) and
        `on_storage(None)` when storage works again."""
        self.on_storage = on_storage
        self.recovery: Recovery | None = None
        # entries held in memory (not written, or not updated, on disk), by id; they win
        # over what the disk says about the same id
        self._held: dict[str, _Held] = {}
        # acked entries the disk still has (their delete failed): hidden, deleted later
        self._acked: set[str] = set()
        self._failure: str | None = None  # what failed, while storage is failing
        try:
            self._open(path, power_safe=power_safe)
        except OutboxError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise _outbox_error(
                exc, f"cannot open the outbox {path}: {exc}", OutboxUnwritable
            ) from exc

    def _open(self, path: Path | str, *, power_safe: bool) -> None:
        in_memory = str(path) == ":memory:"
        if in_memory:
            self._db = self._connect(str(path))
        else:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            problem: str | None = None
            wal_found: bytes | None = None
            existed = path.exists()
            # pending alerts (and what they say about the household) live here
            create_private(path)
            try:
                self._db = self._connect(str(path), check_existing=existed)
            except _Damaged as exc:
                problem, wal_found = exc.problem, exc.wal
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise  # locked, or not writable: `__init__` says which
                problem = str(exc)
            if problem is not None:
                self.recovery = self._recover(path, problem, wal_found)
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
            _fsync_dir(Path(path).resolve().parent)
            # One thread, not a pool task per commit: asking costs a press one futex wake,
            # and nothing comes back to the event loop when the fsync ends.
            self._syncer = threading.Thread(
                target=self._sync_forever, name=f"outbox-fsync {path}", daemon=True
            )
            self._syncer.start()
        self._seq = self._counter("seq_reserved")
        self._reserved = self._seq
        self._down_high_water = self._counter("down_high_water")

    def _connect(self, path: str, *, check_existing: bool = False) -> sqlite3.Connection:
        # No busy wait: the only other holder of this file's lock is another agent, which
        # keeps it for good; waiting SQLite's default 5 s would only delay the refusal.
        db = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            # One agent per outbox: held for good, the lock makes a second agent on the same
            # state_dir fail at start instead of reusing sequence numbers; and a commit takes
            # no lock calls (with WAL, the index lives in memory, not in an -shm file).
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            # The first read takes that lock (or fails: locked, not a database). Only then
            # are the files checked: no other agent is writing them, and nothing was written
            # yet, so frames SQLite would skip are still there to be found.
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            wal = b""
            if check_existing:
                wal = _read_wal(Path(path))
                problem = _wal_damage(wal)
                if problem is None and os.path.getsize(path) == 0 and not wal:
                    # SQLite takes an empty file for a new database; ours never leaves one
                    problem = "empty file"
                if problem is not None:
                    raise _Damaged(problem, wal)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit writes the WAL but does not fsync it; sync() does (see above)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(COUNTERS_TABLE)  # the first write of a new outbox: creates the WAL
            self._db = db
            self._create_or_upgrade_outbox()
            # cheap on a file this small, and the only way to find a damaged page before
            # the entry on it is needed
            try:
                verdict = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
            except sqlite3.DatabaseError as exc:
                # the check may stop at the damage with an error instead of listing it:
                # the same finding, and the log is kept as found all the same
                if not _is_corruption(exc):
                    raise
                verdict = [str(exc)]
            if verdict != ["ok"]:
                first = " ".join(verdict[0].split())  # one line, for the log and the report
                raise _Damaged(f"integrity check failed: {first[:150]}", wal)
        except BaseException:
            db.close()
            raise
        return db

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

    # ---- a damaged file at start-up --------------------------------------------------------

    def _recover(self, path: Path, problem: str, wal_found: bytes | None = None) -> Recovery:
        """Move the damaged files aside, start afresh, import what can still be read."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        try:
            for suffix in ("", "-wal", "-shm"):
                if os.path.lexists(f"{path}{suffix}"):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            if wal_found:
                Path(f"{aside}-wal").write_bytes(wal_found)
            _fsync_dir(path.resolve().parent)
        except OSError as exc:
            raise _outbox_error(
                exc,
                f"the outbox {path} is damaged ({problem}) and cannot be moved aside: {exc}",
                OutboxDamaged,
            ) from exc
        rows, counters = _salvage(aside)
        create_private(path)
        self._db = self._connect(str(path))
        self._db.execute("BEGIN")
        self._db.executemany(_STORE_ENTRY, rows)
        for name, value in counters.items():
            self._set_counter(name, value)
        self._db.execute("COMMIT")
        log.error(
            "outbox: %s was damaged (%s): moved to %s; %d entries salvaged%s",
            path,
            problem,
            aside.name,
            len(rows),
            "" if "seq_reserved" in counters else "; sequence counter lost (the gateway resets it)",
        )
        return Recovery(aside, problem[:200], len(rows))

    # ---- storage that fails ----------------------------------------------------------------

    def _write(self, sql: str, args: tuple[object, ...]) -> int | None:
        """One statement, committed: its rowcount, or None when storage refused it."""
        try:
            count = self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:  # a full disk, an I/O error, a read-only remount
            self._failed(exc)
            return None
        if self._failure is not None:
            self._catch_up()
        return count

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of a query; storage that cannot even be read is an `OutboxError`."""
        try:
            return [tuple(row) for row in self._db.execute(sql, args).fetchall()]
        except sqlite3.Error as exc:
            raise _outbox_error(
                exc, f"the outbox cannot be read: {exc}", OutboxStorageFailed
            ) from exc

    def _failed(self, exc: sqlite3.Error) -> None:
        if self._failure is not None:
            return  # said once per outage
        self._failure = str(exc)[:200]
        log.error("outbox: storage failed (%s): holding entries in memory", exc)
        if self.on_storage is not None:
            self.on_storage(self._failure)

    def _catch_up(self) -> None:
        """Write out what was held in memory, in one transaction; storage is back if it goes."""
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(_STORE_ENTRY, [h.row() for h in self._held.values()])
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in self._acked])
            self._set_counter("seq_reserved", self._reserved)
            self._set_counter("down_high_water", self._down_high_water)
            db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            return
        log.warning("outbox: storage works again; %d held entries written", len(self._held))
        self._held.clear()
        self._acked.clear()
        self._failure = None
        self.sync_soon()
        if self.on_storage is not None:
            self.on_storage(None)

    @property
    def storage_failing(self) -> bool:
        return self._failure is not None

    def _hold_stored(self, message_id: str, **changes: int) -> None:
        """Take an entry the disk holds but cannot update into memory, with `changes`."""
        rows = self._read(
            f"SELECT {_ENTRY_COLUMNS}, sms FROM outbox WHERE id = ?",  # noqa: S608
            (message_id,),
        )
        if rows and message_id not in self._acked:
            row = rows[0]
            held = _Held(Entry(*row[:-1]), changes.pop("sms", row[-1]))
            held.change(**changes)
            self._held[message_id] = held

    # ---- counters ----------------------------------------------------------------------

    def _counter(self, name: str) -> int:
        rows = self._read("SELECT value FROM counters WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

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
            # Unwritable, the block is used all the same: a press must go out. Should the
            # agent then restart and repeat numbers, the gateway's sync raises the counter.
            if self._write_counter("seq_reserved", self._reserved):
                self.sync()  # once a block: no number of it goes out before this is on disk
        self._seq += 1
        return self._seq

    def raise_seq(self, at_least: int) -> None:
        """Make the next sequence number at least `at_least` (the gateway's sync); a new
        block is reserved, and on disk, before that number goes out."""
        if at_least - 1 > self._seq:
            log.warning("outbox: sequence counter raised from %d to %d", self._seq, at_least - 1)
            self._seq = self._reserved = at_least - 1

    def _write_counter(self, name: str, value: int) -> bool:
        return (
            self._write(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
            is not None
        )

    # ---- power-cut safety --------------------------------------------------------------

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
        return self._down_high_water or None

    def set_down_high_water(self, seq: int) -> None:
        self._down_high_water = seq  # kept in memory if the disk will not take it
        self._write_counter("down_high_water", seq)

    # ---- entries -----------------------------------------------------------------------

    def put(
        self,
        message_id: str,
        type: str,
        body_json: str,
        now_ms: int,
        *,
        sms: bool = False,
        resend_at_ms: int | None = None,
    ) -> bool:
        """Commit a message before it is published; `sms`: it may need the SMS fallback.

        `resend_at_ms` schedules the first resend in the same commit, so one commit stands
        between a press and its publish. Then `sync_soon()`, for power-cut safety.
        False: storage refused it; it is held in memory and resent from there all the same.
        """
        next_ms = resend_at_ms or now_ms
        stored = self._write(
            "INSERT OR IGNORE INTO outbox (id, type, body, created_ms, next_attempt_ms, sms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, type, body_json, now_ms, next_ms, 1 if sms else 0),
        )
        if stored is None:
            self._held[message_id] = _Held(
                Entry(message_id, type, body_json, now_ms, 0, next_ms), 1 if sms else 0
            )
        return stored is not None

    def sms_due(self, created_before_ms: int) -> list[Entry]:
        """Messages that want the SMS fallback, not yet done, older than the cut-off."""
        rows = self._read(
            f"SELECT {_ENTRY_COLUMNS} FROM outbox"  # noqa: S608
            " WHERE sms = 1 AND created_ms <= ? ORDER BY created_ms",
            (created_before_ms,),
        )
        entries = [Entry(*row) for row in rows if self._on_disk_only(row[0])]
        entries += [
            h.entry
            for h in self._held.values()
            if h.sms == 1 and h.entry.created_ms <= created_before_ms
        ]
        return sorted(entries, key=lambda e: e.created_ms)

    def sms_done(self, message_id: str) -> None:
        """The SMS fallback has had its go at this message: never again, even after a
        restart or a power cut (an SMS takes seconds; its fsync does not matter)."""
        held = self._held.get(message_id)
        if held is not None:
            held.sms = 2
            return
        if self._write("UPDATE outbox SET sms = 2 WHERE id = ?", (message_id,)) is None:
            self._hold_stored(message_id, sms=2)
            return
        self.sync()

    def _on_disk_only(self, message_id: str) -> bool:
        return message_id not in self._held and message_id not in self._acked

    def pending(self) -> list[Entry]:
        rows = self._read(f"SELECT {_ENTRY_COLUMNS} FROM outbox ORDER BY created_ms")  # noqa: S608
        if not self._held and not self._acked:
            return [Entry(*row) for row in rows]
        entries = [Entry(*row) for row in rows if self._on_disk_only(row[0])]
        entries += [h.entry for h in self._held.values()]
        return sorted(entries, key=lambda e: e.created_ms)

    def next_attempt_ms(self) -> int | None:
        """When the earliest pending entry is next due; None when the outbox is empty."""
        if self._held or self._acked:
            return min((e.next_attempt_ms for e in self.pending()), default=None)
        (earliest,) = self._read("SELECT MIN(next_attempt_ms) FROM outbox")[0]
        return None if earliest is None else int(earliest)

    def due(self, now_ms: int) -> list[Entry]:
        return [e for e in self.pending() if e.next_attempt_ms <= now_ms]

    def attempted(self, message_id: str, next_attempt_ms: int) -> None:
        held = self._held.get(message_id)
        if held is not None:
            held.change(attempts=held.entry.attempts + 1, next_attempt_ms=next_attempt_ms)
            if self._failure is not None:
                self._catch_up()  # the disk may have room again
            return
        done = self._write(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ? WHERE id = ?",
            (next_attempt_ms, message_id),
        )
        if done is None:
            # not updated on disk: held in memory, or it would be due again at once
            rows = self._read("SELECT attempts FROM outbox WHERE id = ?", (message_id,))
            if rows:
                self._hold_stored(
                    message_id, attempts=int(rows[0][0]) + 1, next_attempt_ms=next_attempt_ms
                )

    def shift_times(self, delta_ms: int) -> None:
        """The agent's clock was corrected by `delta_ms`: move every entry's times with it,
        so an entry's age (the SMS fallback counts from the press) stays what it was."""
        for held in self._held.values():
            held.change(
                created_ms=held.entry.created_ms + delta_ms,
                next_attempt_ms=held.entry.next_attempt_ms + delta_ms,
            )
        shifted = self._write(
            "UPDATE outbox SET created_ms = created_ms + ?, next_attempt_ms = next_attempt_ms + ?",
            (delta_ms, delta_ms),
        )
        if shifted is None:
            for entry in self.pending():
                if entry.id not in self._held:
                    self._hold_stored(
                        entry.id,
                        created_ms=entry.created_ms + delta_ms,
                        next_attempt_ms=entry.next_attempt_ms + delta_ms,
                    )

    def received(self, message_id: str) -> bool:
        """The gateway has kept it: drop it. False if it was not (or no longer) here."""
        held = self._held.pop(message_id, None) is not None
        if message_id in self._acked:
            return held
        deleted = self._write("DELETE FROM outbox WHERE id = ?", (message_id,))
        if deleted is None:
            # still on disk: hidden now, deleted once storage works again
            on_disk = bool(self._read("SELECT 1 FROM outbox WHERE id = ?", (message_id,)))
            if on_disk:
                self._acked.add(message_id)
            return held or on_disk
        return held or deleted == 1

    def depth(self) -> int:
        if self._held or self._acked:
            return len(self.pending())
        return int(self._read("SELECT COUNT(*) FROM outbox")[0][0])

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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- damage SQLite does not report ----------------------------------------------------------
#
# SQLite reads its write-ahead log up to the first frame whose checksum fails and silently
# ignores the rest, so a damaged frame near the end loses the commits after it without an
# error: the alert waiting in them would be gone. The WAL format is public
# (https://www.sqlite.org/fileformat.html#the_write_ahead_log): a 32-byte header with two
# salts, then frames of a 24-byte header and one page; each frame carries the salts and a
# checksum that chains over all frames before it. Frames with the current salts after the
# first bad one were written in this generation of the log and are lost; frames with other
# salts are left over from an earlier generation and mean nothing.

_WAL_MAGIC: Final = (0x377F0682, 0x377F0683)  # little- or big-endian checksums
_WAL_HEADER: Final = 32
_FRAME_HEADER: Final = 24


def _wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


@dataclass(frozen=True, slots=True)
class _WalScan:
    lost: list[int]  # offsets of frames of this generation SQLite would skip
    checksum: tuple[int, int]  # the chain up to the last good frame
    big_endian: bool
    frame_size: int


def _scan_wal(wal: bytes) -> _WalScan | None:
    """None when there is no log to speak of (or its header is not a WAL header)."""
    if len(wal) < _WAL_HEADER:
        return None
    magic, _version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", wal[:32])
    if magic not in _WAL_MAGIC:
        return None
    big_endian = magic == _WAL_MAGIC[1]
    frame_size = _FRAME_HEADER + (65536 if page_size == 1 else page_size)
    chain = _wal_checksum(wal[:24], 0, 0, big_endian)
    if chain != (c1, c2):
        return None  # a torn header: SQLite ignores the whole log, nothing was committed
    lost: list[int] = []
    offset = _WAL_HEADER
    while offset + _FRAME_HEADER <= len(wal):
        header = wal[offset : offset + _FRAME_HEADER]
        _page, _commit, fs1, fs2, fc1, fc2 = struct.unpack(">6I", header)
        if (fs1, fs2) != (salt1, salt2):
            break  # left over from an earlier generation of the log
        page = wal[offset + _FRAME_HEADER : offset + frame_size]
        if not lost and len(page) == frame_size - _FRAME_HEADER:
            following = _wal_checksum(header[:8] + page, *chain, big_endian)
            if following == (fc1, fc2):
                chain = following
                offset += frame_size
                continue
        lost.append(offset)  # bad checksum, cut short, or after one of those
        offset += frame_size
    return _WalScan(lost, chain, big_endian, frame_size)


def _read_wal(path: Path) -> bytes:
    try:
        return Path(f"{path}-wal").read_bytes()
    except FileNotFoundError:
        return b""


def _wal_damage(wal: bytes) -> str | None:
    """Frames of the outbox's log SQLite would skip in silence; None if there are none."""
    scan = _scan_wal(wal)
    if scan is not None and scan.lost:
        return f"{len(scan.lost)} write-ahead log frames damaged"
    return None


def _repair_wal(path: Path) -> None:
    """Re-chain the checksums of the damaged frames of a copy, so SQLite reads them; what
    they hold is judged entry by entry afterwards."""
    wal = bytearray(path.read_bytes())
    scan = _scan_wal(bytes(wal))
    if scan is None or not scan.lost:
        return
    chain = scan.checksum
    for offset in scan.lost:
        end = offset + scan.frame_size
        if end > len(wal):
            break  # cut short: nothing to read in it
        header = bytes(wal[offset : offset + 8])
        chain = _wal_checksum(
            header + bytes(wal[offset + _FRAME_HEADER : end]), *chain, scan.big_endian
        )
        wal[offset + 16 : offset + 24] = struct.pack(">2I", *chain)
    path.write_bytes(bytes(wal))


def _salvage(damaged: Path) -> tuple[list[tuple[object, ...]], dict[str, int]]:
    """Every readable, well-formed entry and counter of a damaged outbox (read from a copy,
    so the damaged files stay as they were found)."""
    work = damaged.with_name(damaged.name + ".salvage")
    entries: dict[str, tuple[object, ...]] = {}
    counters: dict[str, int] = {}
    try:
        if damaged.exists():
            shutil.copyfile(damaged, work)
            _pad_to_header_size(work)
        if os.path.exists(f"{damaged}-wal"):
            shutil.copyfile(f"{damaged}-wal", f"{work}-wal")
            _repair_wal(Path(f"{work}-wal"))
        if not work.exists():
            return [], {}
        db = sqlite3.connect(str(work), isolation_level=None)
        try:
            for row in _readable_rows(db):
                if _well_formed(row):
                    entries.setdefault(str(row[0]), row)
            for name in ("seq_reserved", "down_high_water"):
                with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                    found = db.execute(
                        "SELECT value FROM counters WHERE name = ?", (name,)
                    ).fetchone()
                    if found is not None:
                        counters[name] = int(found[0])
        finally:
            db.close()
    except (OSError, sqlite3.Error) as exc:
        log.error("outbox: salvage from %s stopped: %s", damaged.name, exc)
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{work}{suffix}")
    # A page SQLite refuses as a whole may still hold whole entries: look for them in the
    # frames it would have skipped (the latest writes, where the waiting alert is), never
    # in older history, which could bring back alerts acked long ago.
    for row in _entries_in_lost_frames(Path(f"{damaged}-wal")):
        entries.setdefault(str(row[0]), row)
    return list(entries.values()), counters


# An outbox row as SQLite lays it out: a record header ending in the serial types of the
# four integer columns (one byte each: 1-6 sized integers, 8 and 9 the constants 0 and 1),
# then the values: the id, the type and the JSON body, back to back, then the integers.
_RAW_ENTRY: Final = re.compile(
    rb"[\x01-\x06\x08\x09]{4}([A-Za-z0-9_-]{8,64})(alert|cancel|health)(?=\{)"
)
_INT_SIZES: Final = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 8: 0, 9: 0}


def _entries_in_lost_frames(wal_path: Path) -> list[tuple[object, ...]]:
    try:
        wal = wal_path.read_bytes()
    except FileNotFoundError:
        return []
    scan = _scan_wal(wal)
    if scan is None:
        return []
    found = []
    for offset in scan.lost:
        found += _raw_entries(wal[offset + _FRAME_HEADER : offset + scan.frame_size])
    return found


def _raw_entries(page: bytes) -> list[tuple[object, ...]]:
    """Whole, well-formed entries found in a page's bytes, whatever its B-tree says."""
    rows = []
    decoder = json.JSONDecoder()
    for match in _RAW_ENTRY.finditer(page):
        body_at = match.end()
        try:
            text = page[body_at : body_at + 4096].decode("utf-8", errors="replace")
            _, length = decoder.raw_decode(text)
        except ValueError:
            continue
        body = text[:length]
        at = body_at + len(body.encode())
        numbers = []
        for serial in page[match.start() : match.start() + 4]:
            size = _INT_SIZES.get(serial)
            if size is None or at + size > len(page):
                break
            numbers.append(
                int.from_bytes(page[at : at + size], "big", signed=True) if size else serial - 8
            )
            at += size
        row = (match.group(1).decode(), match.group(2).decode(), body, *numbers)
        if _well_formed(row):
            rows.append(row)
    return rows


def _pad_to_header_size(path: Path) -> None:
    """SQLite refuses a file shorter than its header says; zeros in place of the missing
    pages let it read every page that is still there."""
    with path.open("r+b") as file:
        header = file.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            return
        (page_size,) = struct.unpack(">H", header[16:18])
        (pages,) = struct.unpack(">I", header[28:32])
        wanted = (65536 if page_size == 1 else page_size) * pages
        if file.seek(0, os.SEEK_END) < wanted:
            file.truncate(wanted)


def _readable_rows(db: sqlite3.Connection) -> list[tuple[object, ...]]:
    """Rows read in key order from both ends, each side up to the first damaged page."""
    try:
        columns = {info[1] for info in db.execute("PRAGMA table_info(outbox)")}
    except sqlite3.Error:
        return []
    sms = "sms" if "sms" in columns else "0"
    rows: list[tuple[object, ...]] = []
    for order in ("ASC", "DESC"):
        try:
            for row in db.execute(
                f"SELECT {_ENTRY_COLUMNS}, {sms} FROM outbox ORDER BY id {order}"  # noqa: S608
            ):
                rows.append(tuple(row))
        except sqlite3.Error:
            continue
    return rows


def _well_formed(row: tuple[object, ...]) -> bool:
    """An entry the agent can send: a damaged page may hand back anything."""
    if len(row) != 7:
        return False
    message_id, type_, body, *numbers = row
    if not (isinstance(message_id, str) and MESSAGE_ID_RE.fullmatch(message_id)):
        return False
    if not all(isinstance(n, int) and 0 <= n < 2**63 for n in numbers):
        return False
    model = OUTBOX_BODIES.get(type_) if isinstance(type_, str) else None
    if model is None or not isinstance(body, str):
        return False
    try:
        model.model_validate_json(body)
    except ValidationError:
        return False
    return True
