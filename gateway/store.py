"""The gateway's durable state, behind one interface: SQLite here, PostgreSQL in store_pg.py.

Callers see one `Protocol` per role (intake, forwarding, operator API, enrolment, privacy,
supervision, health and site events), each async: `await store.accept_batch(...)`. The
store is opened from a URL (`open_store("sqlite:///var/lib/ansimi/gateway/gateway.db")`),
migrates its schema by numbered steps (`MIGRATIONS`, recorded in `schema_version`) and
raises only `StoreError`s: a full disk (`StoreFull`), a lock held too long (`StoreLocked`)
and a lost database server (`StoreUnavailable`, PostgreSQL) stay distinguishable, a raw
engine error never reaches a caller.

`SqliteStore` is the async edge; `SqliteDatabase` beneath it is the blocking SQLite work,
run on the store's one dedicated thread (and used directly only by one-shot commands that
have no event loop). SQLite in WAL mode with `synchronous=FULL`: when `accept_batch()`
returns, the events are on disk, and only then may a `received` ack go out. One
connection, used from that one thread, so group commit is simply "one transaction per
batch".

A nearly full disk must never wedge the gateway. SQLite's automatic checkpoints copy the
WAL into the database but never shrink the WAL file, and below 1,000 pages they do not run
at all, so the data can live in a WAL that cannot grow while the checkpoint that would
empty it needs the database file to grow. So: `journal_size_limit` cuts the WAL back after
every checkpoint, `checkpoint()` (TRUNCATE, run every minute and at every look while the
disk is low: gateway/health.py) empties it, and a transaction whose COMMIT fails (disk
full) is rolled back rather than left open, where it would make every later BEGIN fail.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import (
    Any,
    Concatenate,
    Final,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    get_args,
    overload,
)

from ansimi.files import create_private
from gateway.enrolments import (
    DEFAULT_TTL_S,
    DuplicateEnrolment,
    NotEnrolled,
    OtherDistrict,
    Pending,
    TokenRefused,
    hash_token,
    new_token,
)
from gateway.errors import GatewayError
from gateway.incidents import (
    EscalationStore,
    HistoryEntry,
    Incident,
    OpenIncident,
    Priorities,
    decide_incidents,
    is_test_body,
    json_object,
)

# re-exported: the store's callers name the kind from here
from protocol.messages import DeviceKind as DeviceKind

T = TypeVar("T")
P = ParamSpec("P")

EventState = Literal["received", "delivered", "acknowledged", "dispatched", "closed"]

# The schema when versions began (migration 1); a database older than that gets what it
# lacks from migrations 2 and 3.
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    public_key  TEXT NOT NULL,          -- Ed25519, raw, base64url
    kind        TEXT NOT NULL,
    district    TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    revoked     INTEGER NOT NULL DEFAULT 0,
    revoked_ms  INTEGER,                -- gateway clock at revocation; NULL if not revoked
    high_water  INTEGER,                -- highest accepted uplink sequence number
    created_ms  INTEGER NOT NULL,
    last_seen_ms INTEGER,               -- gateway clock when last heard from (any instance)
    online      INTEGER,                -- NULL never heard from, 1 online, 0 offline
    power       TEXT                    -- last reported power source: mains or battery
);
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,       -- the device's message id
    device_id   TEXT NOT NULL REFERENCES devices(device_id),
    seq         INTEGER NOT NULL,
    type        TEXT NOT NULL,
    ts_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body        TEXT NOT NULL,          -- the typed body as JSON
    jws         TEXT NOT NULL,          -- the device's signed original, for the centres
    state       TEXT NOT NULL DEFAULT 'received',
    clock_skew_ms INTEGER                -- device clock minus ours, if outside the window
);
CREATE INDEX IF NOT EXISTS events_by_state ON events(state, received_ms);
-- whose every event id is: the device that first used it as its own message's id or named
-- it (a cancel's alert_id, an alert's linked_to), also before the named event arrived (a
-- cancel resent ahead of its alert). Kept when events are purged: an id stays its device's.
CREATE TABLE IF NOT EXISTS event_ids (
    event_id    TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    event_id        TEXT NOT NULL REFERENCES events(event_id),
    centre          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error      TEXT,
    delivered_ms    INTEGER,
    -- set when the centre refused it outright (malformed, not authorised): parked, no
    -- longer due, until an admin (or the next start) gives it another go
    refused_ms      INTEGER,
    PRIMARY KEY (event_id, centre)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt_ms) WHERE delivered_ms IS NULL;
CREATE INDEX IF NOT EXISTS outbox_due_by_centre ON outbox(centre, next_attempt_ms)
    WHERE delivered_ms IS NULL;
CREATE TABLE IF NOT EXISTS stages (
    event_id    TEXT NOT NULL REFERENCES events(event_id),
    stage       TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    PRIMARY KEY (event_id, stage)
);
-- a device's personal data (address, floor, phone numbers, notes), only ever sealed
-- (AES-GCM, ansimi/privacy.py) by the caller: this file never holds it in clear
CREATE TABLE IF NOT EXISTS device_private (
    device_id   TEXT PRIMARY KEY REFERENCES devices(device_id),
    sealed      TEXT NOT NULL,
    updated_ms  INTEGER NOT NULL
);
"""


BUSY_TIMEOUT_S = 30.0
# the WAL file is cut back to this after each checkpoint
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
# a TRUNCATE checkpoint waits this long at most for other instances' readers (and holds our
# connection meanwhile): a busy one is simply tried again at the next
CHECKPOINT_BUSY_MS = 200
# events deleted per transaction by purge_closed (see there)
PURGE_BATCH = 1_000
# revoking again keeps the first time: that is when the device stopped being trusted
_REVOKE = "UPDATE devices SET revoked = 1, revoked_ms = COALESCE(revoked_ms, ?) WHERE device_id = ?"

# Columns added after the first release, before versions began (migration 2).
_ADDED_COLUMNS = {
    "devices": {
        "revoked_ms": "INTEGER",
        "last_seen_ms": "INTEGER",
        "online": "INTEGER",
        "power": "TEXT",
    },
    "outbox": {"refused_ms": "INTEGER"},
    "events": {"clock_skew_ms": "INTEGER"},
}

# Enrolment's one-time tokens (gateway/enrol.py), kept only as their SHA-256 (migration 4;
# a database enrolment wrote before that already has the table).
# which gateway instance holds a device's live video stream (its [video] public_url), so a
# viewer reaching another instance is relayed from it
_VIDEO_STREAMS = """
CREATE TABLE IF NOT EXISTS video_streams (
    device_id   TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    session     TEXT NOT NULL,
    since_ms    INTEGER NOT NULL
);
"""

_REMOTE_CONFIG = """
-- remote configuration (gateway/remote_config.py): the layers of what devices should run,
-- scope 'site' (name ''), 'district' or 'device', each a JSON patch; and what each device
-- last said it runs (the hash in its heartbeat), written only when it changes
CREATE TABLE IF NOT EXISTS config_layers (
    scope       TEXT NOT NULL CHECK (scope IN ('site', 'district', 'device')),
    name        TEXT NOT NULL,
    patch_json  TEXT NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (scope, name)
);
CREATE TABLE IF NOT EXISTS config_reported (
    device_id    TEXT PRIMARY KEY,
    config_hash  TEXT NOT NULL,
    reported_ms  INTEGER NOT NULL
);
"""

_ROLLOUTS = """
-- staged agent rollouts (gateway/rollout.py), shared by every instance on the store: the
-- newest is the current one; at most one running or paused at a time (the partial unique
-- index: a second start loses, whichever instance made it)
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id      TEXT PRIMARY KEY,
    version         TEXT NOT NULL,       -- the release offered
    district        TEXT NOT NULL,
    percent         REAL NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('running', 'paused', 'aborted', 'done')),
    started_ms      INTEGER NOT NULL,
    paused_because  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_live ON rollouts((1))
    WHERE state IN ('running', 'paused');
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id  TEXT NOT NULL REFERENCES rollouts(rollout_id),
    device_id   TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'offered', 'installed', 'failed')),
    at_ms       INTEGER NOT NULL DEFAULT 0,
    offers      INTEGER NOT NULL DEFAULT 0,
    reason      TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
"""

# One open incident per originator: a bell's own, and beside it the district outage told
# about it as its district's first bell (gateway/incidents.py decide_incidents). The same
# statements on PostgreSQL.
OPEN_INCIDENT_INDEXES = """
DROP INDEX IF EXISTS incidents_one_open;
CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open_per_bell ON incidents(device_id)
    WHERE state != 'closed' AND kind != 'district_outage';
CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open_outage_per_opener ON incidents(device_id)
    WHERE state != 'closed' AND kind = 'district_outage';
"""

# One open outage per district, whichever instance told it (migration 10; PostgreSQL 8):
# each instance's supervisor groups its own bells and tells the outage about the first of
# them, so a unique index per first bell let two instances open two for one district. The
# outage keeps the district it opened in, and the index is on that. An outage two instances
# opened before this keeps its district if it is the district's oldest open one; the others
# stay open for an operator to close, but take no more of the district's events. The same
# statements on PostgreSQL, after the column is added (`OUTAGE_DISTRICT_COLUMN`).
OUTAGE_DISTRICT_COLUMN: Final = ("incidents", "district", "TEXT")
OPEN_OUTAGE_PER_DISTRICT = """
UPDATE incidents SET district = (
    SELECT d.district FROM devices d WHERE d.device_id = incidents.device_id
) WHERE kind = 'district_outage';
UPDATE incidents SET district = NULL
    WHERE kind = 'district_outage' AND state != 'closed' AND EXISTS (
        SELECT 1 FROM incidents o
        WHERE o.kind = 'district_outage' AND o.state != 'closed' AND o.district = incidents.district
        AND (o.opened_ms < incidents.opened_ms
             OR (o.opened_ms = incidents.opened_ms AND o.incident_id < incidents.incident_id)));
DROP INDEX IF EXISTS incidents_one_open_outage_per_opener;
CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open_outage_per_district ON incidents(district)
    WHERE state != 'closed' AND kind = 'district_outage';
"""

_ENROLMENTS = """
CREATE TABLE IF NOT EXISTS enrolments (
    token_hash   TEXT PRIMARY KEY,      -- SHA-256 of the token, hex; never the token itself
    device_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    district     TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    rotate       INTEGER NOT NULL DEFAULT 0,  -- 1: a new key for a device already enrolled
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    used_ms      INTEGER,
    cancelled_ms INTEGER,
    serial       TEXT                   -- the certificate it was traded for (hex)
);
CREATE INDEX IF NOT EXISTS enrolments_by_device ON enrolments(device_id, created_ms);
"""


# Incidents (gateway/incidents.py, docs/incidents.md; migration 5). At most one open
# incident per bell, held by a partial unique index, so two instances cannot both open one.
_INCIDENTS = """
CREATE TABLE IF NOT EXISTS incidents (
    incident_id      TEXT PRIMARY KEY,  -- the id of the event that opened it
    device_id        TEXT NOT NULL REFERENCES devices(device_id),
    kind             TEXT NOT NULL,
    priority         INTEGER NOT NULL,  -- 1 = highest
    state            TEXT NOT NULL DEFAULT 'new',
    opened_ms        INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL,
    first_alert_id   TEXT,              -- the ref of the acks its bell gets
    last_alert_id    TEXT,              -- and its newest alert's, if another (see move)
    events           INTEGER NOT NULL DEFAULT 0,
    offline          INTEGER NOT NULL DEFAULT 0,
    escalation_level INTEGER NOT NULL DEFAULT 0,
    escalated_to     TEXT NOT NULL DEFAULT '[]',  -- JSON list of centre names
    outcome          TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open ON incidents(device_id)
    WHERE state != 'closed';
CREATE INDEX IF NOT EXISTS incidents_by_state ON incidents(state, priority, opened_ms);
CREATE TABLE IF NOT EXISTS incident_events (
    event_id     TEXT PRIMARY KEY,
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id)
);
CREATE INDEX IF NOT EXISTS incident_events_by_incident ON incident_events(incident_id);
CREATE TABLE IF NOT EXISTS incident_stages (
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id),
    stage        TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    PRIMARY KEY (incident_id, stage)
);
CREATE TABLE IF NOT EXISTS incident_ticks (
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id),
    step         TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    PRIMARY KEY (incident_id, step)
);
-- the audit trail an operator reads: every event, stage, escalation, tick, kind upgrade
CREATE TABLE IF NOT EXISTS incident_history (
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id),
    at_ms        INTEGER NOT NULL,
    what         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    event_id     TEXT,
    detail       TEXT NOT NULL          -- JSON object
);
CREATE INDEX IF NOT EXISTS incident_history_by_incident ON incident_history(incident_id, at_ms);
"""
INCIDENT_COLUMNS = (
    "i.incident_id, i.device_id, d.district, i.kind, i.priority, i.state, i.opened_ms,"
    " i.updated_ms, i.first_alert_id, i.events, i.offline, i.escalation_level,"
    " i.escalated_to, i.outcome, i.last_alert_id FROM incidents i JOIN devices d USING (device_id)"
)
# the incident states an operator moves to, in order
INCIDENT_STAGE_ORDER: Final = {"new": 0, "acknowledged": 1, "dispatched": 2, "closed": 3}


# Refusals of `accept_batch`: an id that is another device's, as the message's own id or as
# an id it names. Also the `reason` label of the intake's refusal metric.
FOREIGN_ID = "foreign_id"
FOREIGN_REF = "foreign_ref"


class StoreError(GatewayError):
    """Root of the store's errors: no engine's own error reaches a caller."""


class StoreDown(StoreError):
    """The store as a whole cannot write now (not one bad row): every call fails alike until
    it recovers. `reason` labels what the intake could not keep because of it."""

    reason = "store_down"


class StoreFull(StoreDown, OSError):
    """The disk under the store is full: nothing was written (the transaction rolled back)."""

    reason = "store_full"


class StoreLocked(StoreDown, TimeoutError):
    """Another writer held the store longer than the store waits (`BUSY_TIMEOUT_S`)."""

    reason = "store_locked"


class StoreConflict(StoreError, TimeoutError):
    """The database server aborted this transaction for another's sake (a deadlock, a
    serialization failure, a lock not granted): this one only, not the store; the same
    work again, now, succeeds (the intake keeps such a batch message by message)."""

    reason = "store_conflict"


class StoreVersionError(StoreError, RuntimeError):
    """The database was migrated by a newer gateway than this one."""


class StoreUnavailable(StoreDown, ConnectionError):
    """No connection to the database server (lost, refused, or not the primary any more):
    nothing was kept, or a commit's outcome is unknown. Every store call is safe to repeat;
    the store reconnects by itself."""

    reason = "store_unavailable"


class BadStoreUrl(StoreError, ValueError):
    def __init__(self, url: str, why: str, *, message: str | None = None) -> None:
        super().__init__(
            message
            or f"store URL {url!r}: {why}. Fix: sqlite:///absolute/path/gateway.db "
            "(or sqlite://:memory: for a throwaway store), or "
            "postgresql://user@host:5432/database for a cluster"
        )


class DuplicateDevice(StoreError, ValueError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id} is already registered: choose another id")


class UnknownEvent(StoreError, LookupError):
    def __init__(self, event_id: str) -> None:
        super().__init__(f"no event {event_id}")


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    public_key: str
    kind: DeviceKind
    district: str
    label: str = ""
    revoked: bool = False
    high_water: int | None = None
    last_seen_ms: int | None = None
    online: bool | None = None  # None: never heard from
    power: str | None = None
    # when it was revoked (gateway clock): everything it sent before was accepted then,
    # so a centre still takes those; None if not revoked, or revoked before this was kept
    revoked_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Incoming:
    """A verified uplink message, ready to be kept."""

    event_id: str
    device_id: str
    seq: int
    type: str
    ts_ms: int
    body_json: str
    jws: str
    centres: tuple[str, ...]  # where it must be forwarded
    # Heartbeats and status only move the high-water mark: thousands a second must not
    # grow the event table. Supervision keeps their news.
    kept: bool = True
    # A heartbeat's power source: a heartbeat that changes it is kept as a power event.
    power: str | None = None
    # ids of other events this one names (a cancel's alert, an alert's `linked_to`): each
    # must be the same device's (see `accept_batch`)
    refs: tuple[str, ...] = ()
    # the device's clock minus the gateway's when outside the window: kept and forwarded
    # flagged with it (protocol.replay, rule 2); None when the clock was fine
    clock_skew_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """What one group commit did, per message and per device."""

    fresh: list[bool]  # not seen before (False: a resend, to be re-acked only)
    forwarded: list[bool]  # became a new event with deliveries waiting
    came_online: list[str]  # devices marked offline that were heard from again
    # why a message was refused (FOREIGN_ID, FOREIGN_REF), None if it was kept
    refused: list[str | None]
    # new alerts that joined an incident an operator has already moved on: alert id -> the
    # incident's stage, which the bell must hear for that alert too (docs/incidents.md)
    caught_up: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    centre: str
    attempts: int
    device_id: str
    type: str
    ts_ms: int
    body_json: str
    jws: str
    clock_skew_ms: int | None = None  # see Incoming
    # the incident it belongs to, as (id, kind, priority) now; None for an event of none
    incident: tuple[str, str, int] | None = None


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    device_id: str
    type: str
    ts_ms: int
    received_ms: int
    body_json: str
    state: EventState
    waiting: int  # deliveries not yet accepted by a centre


@dataclass(frozen=True, slots=True)
class Waiting:
    """A delivery a centre has not accepted yet, for operators: why and until when."""

    event_id: str
    centre: str
    device_id: str
    type: str
    attempts: int
    next_attempt_ms: int
    last_error: str | None
    district: str = ""
    # when the centre refused it outright; None while it is still retried
    refused_ms: int | None = None


# ---- the interface, one protocol per role ---------------------------------------------------
# Each caller is typed with the role it uses, so a second engine (PostgreSQL) knows exactly
# what each part of the gateway needs, and the contract suite (tests/unit/gateway/
# store_contract.py) checks every method for every engine.


class DeviceReader(Protocol):
    async def device(self, device_id: str) -> Device | None: ...
    async def devices(self) -> list[Device]: ...


class IntakeStore(DeviceReader, Protocol):
    """Keeping what devices send (gateway/intake.py)."""

    async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted: ...
    async def event(self, event_id: str) -> Event | None: ...


class SupervisionStore(DeviceReader, Protocol):
    """Offline, power and secondary-path events (gateway/supervise.py, secondary.py)."""

    async def add_event(self, item: Incoming, now_ms: int) -> None: ...
    async def mark_offline(
        self, items: Sequence[Incoming], silent_since_ms: int, now_ms: int
    ) -> list[bool]: ...
    async def events(
        self, state: EventState | None, limit: int, *, type: str | None = None
    ) -> list[Event]: ...


class ForwardStore(Protocol):
    """Deliveries to the centres (gateway/forward.py)."""

    async def due_for(self, centre: str, now_ms: int, limit: int) -> list[Delivery]: ...
    async def delivered_many(self, done: Sequence[tuple[str, str]], now_ms: int) -> list[bool]: ...
    async def failed(
        self, event_id: str, centre: str, next_attempt_ms: int, error: str
    ) -> None: ...
    async def refused(self, event_id: str, centre: str, now_ms: int, error: str) -> None: ...
    async def reroute(self, route: Callable[[str], Sequence[str]], now_ms: int) -> int: ...
    async def retry_refused(
        self,
        now_ms: int,
        *,
        centre: str | None = None,
        event_id: str | None = None,
        districts: Sequence[str] | None = None,
    ) -> int: ...
    async def waiting_by_centre(self) -> dict[str, int]: ...
    async def refused_by_centre(self) -> dict[str, int]: ...


class IncidentStore(DeviceReader, EscalationStore, Protocol):
    """Incidents (docs/incidents.md): the operator API's reads and moves, and escalation.
    The store opens them and attaches events itself, as it keeps each event."""

    async def event(self, event_id: str) -> Event | None: ...
    async def incidents(
        self, state: str | None, limit: int, districts: Sequence[str] | None = None
    ) -> list[Incident]: ...
    async def incident(self, incident_id: str) -> Incident | None: ...
    async def incident_of(self, event_id: str) -> str | None: ...
    async def incident_history(self, incident_id: str) -> list[HistoryEntry]: ...
    async def incident_ticks(self, incident_id: str) -> dict[str, tuple[int, str]]: ...
    async def move_incident(
        self, incident_id: str, stage: str, now_ms: int, actor: str, outcome: str | None = None
    ) -> bool: ...
    async def tick_procedure(
        self, incident_id: str, step: str, now_ms: int, actor: str
    ) -> bool: ...


class OperatorStore(IncidentStore, Protocol):
    """The operator and admin API (gateway/api.py, deliveries.py)."""

    async def add_device(self, device: Device, now_ms: int) -> None: ...
    async def revoke(self, device_id: str, now_ms: int) -> bool: ...
    async def event(self, event_id: str) -> Event | None: ...
    async def events(
        self, state: EventState | None, limit: int, *, type: str | None = None
    ) -> list[Event]: ...
    async def stages(self, event_id: str) -> list[tuple[str, int, str]]: ...
    async def set_stage(
        self, event_id: str, stage: EventState, now_ms: int, actor: str
    ) -> bool: ...
    async def waiting_count(self) -> int: ...
    async def waiting(
        self,
        limit: int,
        *,
        centre: str | None = None,
        refused: bool | None = None,
        districts: Sequence[str] | None = None,
    ) -> list[Waiting]: ...
    async def retry_refused(
        self,
        now_ms: int,
        *,
        centre: str | None = None,
        event_id: str | None = None,
        districts: Sequence[str] | None = None,
    ) -> int: ...


class EnrolmentStore(Protocol):
    """One-time enrolment tokens and the device rows they create (gateway/enrol.py)."""

    async def issue_enrolment(
        self,
        device_id: str,
        kind: DeviceKind,
        district: str,
        label: str,
        *,
        now_ms: int,
        ttl_s: int = DEFAULT_TTL_S,
        rotate: bool = False,
        serves: Callable[[str], bool] = lambda _district: True,
    ) -> tuple[str, Pending]: ...
    async def check_enrolment(self, token: str, device_id: str, now_ms: int) -> Pending: ...
    async def complete_enrolment(
        self, token: str, public_key_b64: str, serial: str, now_ms: int
    ) -> Pending: ...
    async def cancel_enrolments(self, device_id: str, now_ms: int) -> int: ...
    async def enrolments(self, device_id: str | None = None) -> list[Pending]: ...


class PrivacyStore(Protocol):
    """Sealed personal data, decommissioning, retention (gateway/private.py, cli purge).
    The store keeps and returns sealed text only, never plaintext."""

    async def device(self, device_id: str) -> Device | None: ...
    async def set_private(self, device_id: str, sealed: str, now_ms: int) -> bool: ...
    async def private(self, device_id: str) -> str | None: ...
    async def reseal_private(self, reseal: Callable[[str, str], str]) -> int: ...
    async def decommission(self, device_id: str, now_ms: int) -> bool: ...
    async def purge_closed(self, closed_before_ms: int, *, dry_run: bool) -> int: ...


class HealthStore(Protocol):
    """The disk and the gateway's own events (gateway/health.py)."""

    # the gateway's own events (disk_low): about no device
    async def add_site_event(self, item: Incoming, now_ms: int) -> None: ...
    # free bytes where the data lives; None when that is not a local file system
    async def free_bytes(self) -> int | None: ...
    async def checkpoint(self) -> None: ...


class StreamStore(Protocol):
    """Which gateway instance holds which live video stream (gateway/video/hub.py)."""

    async def claim_stream(
        self, device_id: str, holder: str, session: str, now_ms: int
    ) -> None: ...
    async def release_stream(self, device_id: str, holder: str, session: str) -> bool: ...
    async def release_streams_of(self, holder: str) -> int: ...
    async def stream_holder(self, device_id: str) -> str | None: ...


ConfigScope = Literal["site", "district", "device"]


@dataclass(frozen=True, slots=True)
class ConfigLayer:
    """One layer of remote config: the site's (name ""), a district's or a device's."""

    scope: ConfigScope
    name: str
    patch_json: str
    updated_ms: int
    # a device layer with `[sms] numbers_from_gateway`: the device public key (base64) they
    # were sealed to, so a rotated key is noticed wherever the layer is read
    sealed_to_key: str | None = None


# both engines' migration, once the column is added: layers sealed before it was there were
# sealed to the key the device has now (a device rotated since could not open them anyway)
SEALED_TO_KEY_BACKFILL: Final = (
    "UPDATE config_layers SET sealed_to_key ="
    " (SELECT d.public_key FROM devices d WHERE d.device_id = config_layers.name)"
    " WHERE scope = 'device' AND patch_json LIKE '%numbers_from_gateway%'"
)


@dataclass(frozen=True, slots=True)
class TestRecord:
    """A test press (alert, trigger test) or a failed test (status test_failed) kept in a
    period, for the monthly report (gateway/report.py)."""

    __test__ = False  # not a pytest class

    event_id: str
    device_id: str
    district: str
    type: str
    ts_ms: int  # the device's clock at the press (the gateway's for a test_failed)
    received_ms: int
    body_json: str
    delivered_ms: int | None  # when a centre first accepted it


class ReportStore(Protocol):
    async def test_records(self, start_ms: int, end_ms: int) -> list[TestRecord]: ...


# the rows a test report reads: test presses and failed tests received in [start, end);
# the LIKEs narrow the scan (any spacing), `test_records_of` checks each body exactly
TEST_RECORDS_SQL = (
    "SELECT e.event_id, e.device_id, d.district, e.type, e.ts_ms, e.received_ms, e.body,"
    " (SELECT MIN(s.at_ms) FROM stages s WHERE s.event_id = e.event_id"
    " AND s.stage = 'delivered')"
    " FROM events e JOIN devices d ON d.device_id = e.device_id"
    " WHERE e.received_ms >= {start} AND e.received_ms < {end}"
    " AND ((e.type = 'alert' AND e.body LIKE '%\"test\"%')"
    " OR (e.type = 'status' AND e.body LIKE '%\"test_failed\"%'))"
    " ORDER BY e.received_ms"
)


def test_records_of(rows: Iterable[Sequence[Any]]) -> list[TestRecord]:
    records = []
    for a, b, c, d, e, f, g, h in rows:
        body = json_object(str(g))
        if is_test_body(str(d), body) or (d == "status" and body.get("state") == "test_failed"):
            at = None if h is None else int(h)
            records.append(TestRecord(str(a), str(b), str(c), str(d), int(e), int(f), str(g), at))
    return records


SET_CONFIG_LAYER_SQL: Final = (
    "INSERT INTO config_layers (scope, name, patch_json, updated_ms, sealed_to_key)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, name)"
    " DO UPDATE SET patch_json = excluded.patch_json, updated_ms = excluded.updated_ms,"
    " sealed_to_key = excluded.sealed_to_key"
)
CONFIG_LAYERS_SQL: Final = (
    "SELECT scope, name, patch_json, updated_ms, sealed_to_key FROM config_layers"
)


def config_layer(row: Sequence[Any]) -> ConfigLayer:
    scope, name, patch_json, updated_ms, sealed_to_key = row
    key = None if sealed_to_key is None else str(sealed_to_key)
    return ConfigLayer(scope, str(name), str(patch_json), int(updated_ms), key)


class ConfigStore(Protocol):
    """Remote configuration: desired layers and what devices report (gateway/remote_config.py)."""

    async def set_config_layer(
        self,
        scope: ConfigScope,
        name: str,
        patch_json: str | None,
        now_ms: int,
        sealed_to_key: str | None = None,
    ) -> None: ...
    async def config_layers(self) -> list[ConfigLayer]: ...
    async def report_config(self, device_id: str, config_hash: str, now_ms: int) -> None: ...
    async def reported_configs(self) -> dict[str, tuple[str, int]]: ...


RolloutPhase = Literal["running", "paused", "aborted", "done"]
UpdateStep = Literal["pending", "offered", "installed", "failed"]
# what a device's report does to its step: installed; not now (pending again, unless it
# installed already); failed (with its reason)
UpdateOutcome = Literal["installed", "not_now", "failed"]


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    rollout_id: str
    version: str
    district: str
    percent: float
    state: RolloutPhase
    started_ms: int
    paused_because: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """One device's step in a rollout."""

    device_id: str
    state: UpdateStep = "pending"
    at_ms: int = 0
    offers: int = 0
    reason: str | None = None


class RolloutStore(DeviceReader, Protocol):
    """Staged agent rollouts (gateway/rollout.py): every instance on the store sees the same
    one, and each change is one transaction guarded by the state it changes from, so two
    instances never both offer a device or undo each other's step."""

    # False: another rollout is running or paused (or this id exists): nothing kept
    async def start_rollout(
        self, rollout: RolloutRecord, devices: Sequence[DeviceUpdate]
    ) -> bool: ...
    # newest first: the first is the current one
    async def rollouts(self, limit: int) -> list[RolloutRecord]: ...
    async def rollout_devices(self, rollout_id: str) -> list[DeviceUpdate]: ...
    # only from one of `from_states`; False when it was in none (changed meanwhile)
    async def move_rollout(
        self,
        rollout_id: str,
        from_states: Sequence[RolloutPhase],
        to_state: RolloutPhase,
        *,
        percent: float | None = None,
        paused_because: str | None = None,
        add_devices: Sequence[str] = (),
    ) -> bool: ...
    # claims the devices due an offer (pending, or offered `reoffer_ms` ago and silent since)
    # that have no open incident, if the rollout is running; done once none waits
    async def offer_rollout(self, rollout_id: str, now_ms: int, reoffer_ms: int) -> list[str]: ...
    # False: the device is not in the rollout, or the report changes nothing
    async def report_update(
        self,
        rollout_id: str,
        device_id: str,
        outcome: UpdateOutcome,
        reason: str | None,
        now_ms: int,
    ) -> bool: ...


# Rollout statements both engines run, in PostgreSQL's $n marks (SQLite: `sqlite_marks`).
ROLLOUT_COLUMNS = "rollout_id, version, district, percent, state, started_ms, paused_because"
START_ROLLOUT_SQL = (
    "INSERT INTO rollouts (rollout_id, version, district, percent, state, started_ms,"
    " paused_because) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
)
ADD_ROLLOUT_DEVICE_SQL = (
    "INSERT INTO rollout_devices (rollout_id, device_id, state, at_ms, offers, reason)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
)
ROLLOUT_DEVICES_SQL = (
    "SELECT device_id, state, at_ms, offers, reason FROM rollout_devices"
    " WHERE rollout_id = $1 ORDER BY device_id"
)
MOVE_ROLLOUT_SQL = (
    "UPDATE rollouts SET state = $2, percent = COALESCE($3, percent),"
    " paused_because = CASE WHEN $2 = 'running' THEN NULL ELSE COALESCE($4, paused_because) END"
    " WHERE rollout_id = $1 AND state IN ({from_states})"
)


def move_rollout_sql(from_states: Sequence[RolloutPhase]) -> str:
    """MOVE_ROLLOUT_SQL from these states (names checked here, so quoting them is safe)."""
    phases = get_args(RolloutPhase)
    if not from_states or any(state not in phases for state in from_states):
        raise ValueError(f"rollout states must be some of {phases}, not {from_states}")
    return MOVE_ROLLOUT_SQL.format(from_states=", ".join(f"'{s}'" for s in from_states))


def report_update_args(
    rollout_id: str, device_id: str, outcome: UpdateOutcome, reason: str | None, now_ms: int
) -> tuple[str, tuple[object, ...]]:
    """The statement of a device's report, and its arguments (its reason only if failed)."""
    args: tuple[object, ...] = (rollout_id, device_id, now_ms)
    return REPORT_UPDATE_SQL[outcome], (*args, reason) if outcome == "failed" else args


# A device revoked during its rollout never reports: it is offered nothing more (here), and
# the rollout is done without it (`SETTLE_ROLLOUT_SQL`), not left running for ever.
# the bell's open incident is looked at in the same statement that claims it: never offered
# during one (the device refuses one that opens after, gateway/update.py's incident_open)
OFFER_ROLLOUT_SQL = (
    "UPDATE rollout_devices SET state = 'offered', at_ms = $2, offers = offers + 1"
    " WHERE rollout_id = $1"
    " AND (state = 'pending' OR (state = 'offered' AND at_ms + $3 <= $2))"
    " AND NOT EXISTS (SELECT 1 FROM incidents i"
    " WHERE i.device_id = rollout_devices.device_id AND i.state != 'closed'"
    # a district outage is its district's, not the bell that told of it first
    " AND i.kind != 'district_outage')"
    " AND device_id IN (SELECT device_id FROM devices WHERE NOT revoked)"
    " RETURNING device_id"
)
REPORT_UPDATE_SQL: Final[dict[str, str]] = {
    # said again (to an offer made after its first report was lost) is no news
    "installed": "UPDATE rollout_devices SET state = 'installed', at_ms = $3, reason = NULL"
    " WHERE rollout_id = $1 AND device_id = $2 AND state != 'installed'",
    # a late offer crossed the device's report of having installed: it stays installed
    # (or its failure: a failed device is not offered again, and its failure keeps counting
    # towards the pause)
    "not_now": "UPDATE rollout_devices SET state = 'pending', at_ms = $3"
    " WHERE rollout_id = $1 AND device_id = $2 AND state = 'offered'",
    "failed": "UPDATE rollout_devices SET state = 'failed', at_ms = $3, reason = $4"
    " WHERE rollout_id = $1 AND device_id = $2",
}
SETTLE_ROLLOUT_SQL = (
    "UPDATE rollouts SET state = 'done' WHERE rollout_id = $1 AND state = 'running'"
    " AND NOT EXISTS (SELECT 1 FROM rollout_devices d"
    " WHERE d.rollout_id = $1 AND d.state IN ('pending', 'offered')"
    " AND d.device_id IN (SELECT device_id FROM devices WHERE NOT revoked))"
)


def sqlite_marks(sql: str) -> str:
    """A statement in PostgreSQL's marks ($1) in SQLite's numbered ones (?1)."""
    return sql.replace("$", "?")


def rollout_values(rollout: RolloutRecord) -> tuple[object, ...]:
    r = rollout
    return (r.rollout_id, r.version, r.district, r.percent, r.state, r.started_ms, r.paused_because)


def rollout_from_row(row: Sequence[Any]) -> RolloutRecord:
    rollout_id, version, district, percent, state, started_ms, because = row
    return RolloutRecord(
        str(rollout_id),
        str(version),
        str(district),
        float(percent),
        state,
        int(started_ms),
        because,
    )


def device_update_values(rollout_id: str, device: DeviceUpdate) -> tuple[object, ...]:
    d = device
    return (rollout_id, d.device_id, d.state, d.at_ms, d.offers, d.reason)


def device_update_from_row(row: Sequence[Any]) -> DeviceUpdate:
    device_id, state, at_ms, offers, reason = row
    return DeviceUpdate(str(device_id), state, int(at_ms), int(offers), reason)


class Store(
    ReportStore,
    ConfigStore,
    RolloutStore,
    IntakeStore,
    SupervisionStore,
    ForwardStore,
    OperatorStore,
    EnrolmentStore,
    PrivacyStore,
    HealthStore,
    StreamStore,
    Protocol,
):
    """Every role: what the gateway service opens and hands out by role."""

    async def close(self) -> None: ...


STAGE_ORDER: dict[str, int] = {
    s: i for i, s in enumerate(("received", "delivered", "acknowledged", "dispatched", "closed"))
}


def _foreign(db: sqlite3.Connection, event_ids: Sequence[str], device_id: str) -> bool:
    """Whether any of these ids is another device's (used or named by it first)."""
    if not event_ids:
        return False
    marks = ", ".join("?" * len(event_ids))
    # events too: an event kept by a gateway older than `event_ids` sharing this file
    owned = f" WHERE event_id IN ({marks}) AND device_id != ?"
    row = db.execute(
        f"SELECT 1 FROM event_ids{owned} UNION ALL SELECT 1 FROM events{owned} LIMIT 1",  # noqa: S608
        (*event_ids, device_id, *event_ids, device_id),
    ).fetchone()
    return row is not None


def _claim(db: sqlite3.Connection, event_ids: Iterable[str], device_id: str) -> None:
    """Make ids nobody has yet `device_id`'s (see the `event_ids` table)."""
    db.executemany(
        "INSERT OR IGNORE INTO event_ids (event_id, device_id) VALUES (?, ?)",
        [(event_id, device_id) for event_id in event_ids],
    )


# A database from before `event_ids`: each event's id is its device's, then what its cancels
# and alerts named (an event's own device wins over a device that named its id).
_BACKFILL_OWN_IDS = "INSERT OR IGNORE INTO event_ids SELECT event_id, device_id FROM events"
# CASE, not AND: one row that is not JSON must not stop the gateway from starting
_BACKFILL_NAMED_IDS = (
    "INSERT OR IGNORE INTO event_ids SELECT named, device_id FROM (SELECT device_id,"
    " json_extract(CASE WHEN json_valid(body) THEN body END, ?) AS named"
    " FROM events WHERE type = ?) WHERE named IS NOT NULL"
)
_NAMED_IDS = (("$.alert_id", "cancel"), ("$.linked_to", "alert"))


def delivery_filter(
    centre: str | None,
    event_id: str | None,
    districts: Sequence[str] | None,
    *,
    first: int | None = None,
) -> tuple[str, list[object]]:
    """SQL conditions on outbox `o` and devices `d` (placeholders only), with their values.
    Placeholders are SQLite's `?`, or PostgreSQL's `$n` numbered from `first`."""
    where = ""
    args: list[object] = []

    def mark() -> str:
        return "?" if first is None else f"${first + len(args) - 1}"

    if centre is not None:
        args.append(centre)
        where += f" AND o.centre = {mark()}"
    if event_id is not None:
        args.append(event_id)
        where += f" AND o.event_id = {mark()}"
    if districts is not None:
        marks = []
        for district in districts:
            args.append(district)
            marks.append(mark())
        # no district at all matches nothing (PostgreSQL has no empty IN list)
        where += f" AND d.district IN ({', '.join(marks)})" if marks else " AND 1 = 0"
    return where, args


def delivery_from_row(row: tuple[Any, ...]) -> Delivery:
    # the incident's columns come last (LEFT JOINed: NULL for an event on no incident)
    a, b, c, d, e, f, g, h, skew, incident_id, kind, priority = row
    skew_ms = None if skew is None else int(skew)
    incident = None
    if incident_id is not None and priority is not None:
        incident = (str(incident_id), str(kind), int(priority))
    return Delivery(
        str(a), str(b), int(c), str(d), str(e), int(f), str(g), str(h), skew_ms, incident
    )


def incident_from_row(row: tuple[Any, ...], stages: dict[str, tuple[int, str]]) -> Incident:
    a, b, c, d, e, f, g, h, i, j, k, level, to, outcome, last_alert = row
    return Incident(
        str(a),
        str(b),
        str(c),
        str(d),
        int(e),
        f,
        int(g),
        int(h),
        None if i is None else str(i),
        int(j),
        bool(k),
        int(level),
        tuple(json.loads(to)),
        None if outcome is None else str(outcome),
        stages,
        None if last_alert is None else str(last_alert),
    )


# what `OpenIncident` is made of, in its order, and where from (both engines)
OPEN_INCIDENT_COLUMNS: Final = (
    "i.device_id, i.incident_id, i.kind, i.priority, i.state, i.updated_ms, i.events,"
    " i.first_alert_id, i.last_alert_id, i.offline, i.district FROM incidents i"
)


def _write_incident(db: sqlite3.Connection, incident: OpenIncident, now_ms: int) -> None:
    """Keep an incident as `decide_incidents` left it: opened, or joined (and upgraded)."""
    db.execute(
        "INSERT INTO incidents (device_id, incident_id, kind, priority, state, updated_ms, events,"
        " first_alert_id, last_alert_id, offline, opened_ms, district)"
        " VALUES (?, ?, ?, ?, 'new', ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (incident_id) DO UPDATE SET"
        " kind = excluded.kind, priority = excluded.priority, updated_ms = excluded.updated_ms,"
        " events = excluded.events, first_alert_id = excluded.first_alert_id,"
        " last_alert_id = excluded.last_alert_id, offline = excluded.offline",
        (
            incident.device_id,
            incident.incident_id,
            incident.kind,
            incident.priority,
            incident.updated_ms,
            incident.events,
            incident.first_alert_id,
            incident.last_alert_id,
            int(incident.offline),
            now_ms,
            incident.district,
        ),
    )
    if incident.reopened:
        # acknowledged as something else: new again, its escalation from now
        db.execute(
            "UPDATE incidents SET state = 'new', opened_ms = ?, escalation_level = 0,"
            " escalated_to = '[]' WHERE incident_id = ?",
            (now_ms, incident.incident_id),
        )
        db.execute("DELETE FROM incident_stages WHERE incident_id = ?", (incident.incident_id,))


def _add_to_incident(db: sqlite3.Connection, event_id: str, incident_id: str) -> None:
    db.execute("INSERT OR IGNORE INTO incident_events VALUES (?, ?)", (event_id, incident_id))


def _history(
    db: sqlite3.Connection,
    incident_id: str,
    at_ms: int,
    what: str,
    actor: str,
    event_id: str | None,
    **detail: Any,
) -> None:
    db.execute(
        "INSERT INTO incident_history VALUES (?, ?, ?, ?, ?, ?)",
        (incident_id, at_ms, what, actor, event_id, history_detail(detail)),
    )


def history_detail(detail: dict[str, Any]) -> str:
    """An incident_history row's detail as stored (`from_`: a keyword Python reserves)."""
    if "from_" in detail:
        detail["from"] = detail.pop("from_")
    return json.dumps(detail, separators=(",", ":"))


@contextmanager
def transaction(
    db: sqlite3.Connection, lock: AbstractContextManager[Any]
) -> Iterator[sqlite3.Connection]:
    """One write transaction on a connection shared under `lock` (BEGIN IMMEDIATE takes
    the write lock up front, so two writers wait instead of failing half-way)."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # also when COMMIT itself failed (disk full): a transaction left open would make
            # every later BEGIN fail. SQLite may have rolled it back already (SQLITE_FULL).
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _add_missing_columns(db: sqlite3.Connection, table: str, columns: Mapping[str, str]) -> None:
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for column, kind in columns.items():
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _migrate_added_columns(db: sqlite3.Connection) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        _add_missing_columns(db, table, columns)


def _migrate_outage_district(db: sqlite3.Connection) -> None:
    # the column only if missing: a database from before versions began runs every step
    table, column, kind = OUTAGE_DISTRICT_COLUMN
    _add_missing_columns(db, table, {column: kind})
    _script(OPEN_OUTAGE_PER_DISTRICT)(db)


def _migrate_sealed_to_key(db: sqlite3.Connection) -> None:
    # a column added only if missing: a database from before versions may hold it already
    present = {row[1] for row in db.execute("PRAGMA table_info(config_layers)")}
    if "sealed_to_key" not in present:
        db.execute("ALTER TABLE config_layers ADD COLUMN sealed_to_key TEXT")
        db.execute(SEALED_TO_KEY_BACKFILL)


def _migrate_event_ids(db: sqlite3.Connection) -> None:
    # idempotent: a database from before `event_ids` learns whose ids are whose
    db.execute(_BACKFILL_OWN_IDS)
    db.executemany(_BACKFILL_NAMED_IDS, _NAMED_IDS)


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    def run(db: sqlite3.Connection) -> None:
        # statement by statement: executescript would COMMIT the migration's transaction
        bare = re.sub(r"--[^\n]*", "", sql)  # comments may hold a ';'
        for statement in bare.split(";"):
            if statement.strip():
                db.execute(statement)

    return run


# Numbered steps, each run once, in order, in one transaction with its version bump. A
# database from before versions began (version 0) may hold any of them already, so each is
# written to be a no-op there (IF NOT EXISTS, a column added only if missing, INSERT OR
# IGNORE). Never edit a step that has shipped: add the next one.
MIGRATIONS: Final[tuple[tuple[int, str, Callable[[sqlite3.Connection], None]], ...]] = (
    (1, "devices, events, event_ids, outbox, stages, device_private", _script(_SCHEMA_1)),
    (2, "columns added after the first release", _migrate_added_columns),
    (3, "event ids owned by the devices that used or named them", _migrate_event_ids),
    (4, "enrolment tokens", _script(_ENROLMENTS)),
    (5, "which instance holds which live video stream", _script(_VIDEO_STREAMS)),
    (6, "incidents, their events, stages, procedure ticks and history", _script(_INCIDENTS)),
    (7, "remote configuration: desired layers, reported hashes", _script(_REMOTE_CONFIG)),
    (8, "agent rollouts and their devices' progress", _script(_ROLLOUTS)),
    (
        9,
        "a district outage open beside its first bell's own incident",
        _script(OPEN_INCIDENT_INDEXES),
    ),
    (10, "the key a device layer's SMS numbers were sealed to", _migrate_sealed_to_key),
    (
        11,
        "one open outage per district, whichever instance told it",
        _migrate_outage_district,
    ),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]


def _sqlite_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF


_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13


def store_error(exc: sqlite3.Error, where: object) -> StoreError:
    """The store's error for an SQLite one: a full disk and a held lock by their codes (and by
    their text, for an error raised without one)."""
    text = f"{where}: {exc}"
    code = _sqlite_code(exc)
    if code == _SQLITE_FULL or "disk is full" in str(exc):
        return StoreFull(f"{text}. Fix: free space on that file system")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in str(exc):
        return StoreLocked(f"{text}: another process holds the database")
    return StoreError(text)


@contextmanager
def _translated(where: object) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise store_error(exc, where) from exc


def enrolment_for(
    device_id: str,
    device: tuple[DeviceKind, str, str, bool] | None,
    live: bool,
    asked: tuple[DeviceKind, str, str],
    *,
    rotate: bool,
    serves: Callable[[str], bool],
) -> tuple[DeviceKind, str, str]:
    """Whether a token may be issued, decided the same on every engine: the (kind, district,
    label) it enrols, or the refusal. `device`: the enrolled device's (kind, district, label,
    revoked), None if there is none; `live`: an unused, unexpired token waits for it;
    `asked`: what a new device's token asks for (a rotation keeps the device's own)."""
    if rotate:
        # another district's device is answered as an unknown one
        if device is None or not serves(device[1]):
            raise NotEnrolled(device_id)
        if device[3]:
            raise TokenRefused("revoked")
        return device[0], device[1], device[2]
    if not serves(asked[1]):
        raise OtherDistrict(asked[1])
    if device is not None:
        raise DuplicateEnrolment(device_id, "is already registered", registered=True)
    if live:
        raise DuplicateEnrolment(
            device_id,
            "already has an enrolment waiting (cancel it with "
            "`ansimi provision device revoke`, or let it expire)",
        )
    return asked


def check_completion(pending: Pending, revoked: bool | None) -> None:
    """Whether a used token's device may be registered (or re-keyed), on every engine;
    `revoked`: the device's flag, None if it is not enrolled."""
    if pending.rotate:
        if revoked is None:
            raise NotEnrolled(pending.device_id)
        if revoked:
            raise TokenRefused("revoked")
    elif revoked is not None:
        raise DuplicateEnrolment(pending.device_id, "is already registered")


# a new device, as every engine inserts it: these columns, `new_device_values` in order
NEW_DEVICE_COLUMNS: Final = "device_id, public_key, kind, district, label, revoked, created_ms"


def new_device_values(device: Device, now_ms: int) -> tuple[object, ...]:
    return (
        device.device_id,
        device.public_key,
        device.kind,
        device.district,
        device.label,
        device.revoked,
        now_ms,
    )


def enrolled_device(pending: Pending, public_key_b64: str) -> Device:
    """The device a completed (not rotating) enrolment registers."""
    return Device(pending.device_id, public_key_b64, pending.kind, pending.district, pending.label)


def opened_enrolment(row: Sequence[Any] | None, device_id: str | None, now_ms: int) -> Pending:
    """The pending enrolment a token's row opens, on every engine, or TokenRefused saying
    why not; `device_id`: the device that must be asking (None: whichever it names)."""
    if row is None:
        raise TokenRefused("unknown")
    pending = pending_from_row(tuple(row))
    if device_id is not None and pending.device_id != device_id:
        raise TokenRefused("wrong-device")
    state = pending.state(now_ms)
    if state != "pending":  # used (another request got there first), cancelled or expired
        raise TokenRefused(state)
    return pending


def issued_enrolment(
    device_id: str, chosen: tuple[DeviceKind, str, str], *, rotate: bool, now_ms: int, ttl_s: int
) -> Pending:
    """The record of a token just issued for `device_id` ((kind, district, label) as
    `enrolment_for` chose them)."""
    kind, district, label = chosen
    expires_ms = now_ms + ttl_s * 1000
    return Pending(device_id, kind, district, label, rotate, now_ms, expires_ms, None, None, None)


def incidents_with_stages(
    rows: Sequence[Sequence[Any]], stage_rows: Iterable[Sequence[Any]]
) -> list[Incident]:
    """Incident rows (`INCIDENT_COLUMNS`) with their stages' rows (incident_id, stage,
    at_ms, actor; oldest first), on every engine."""
    stages: dict[str, dict[str, tuple[int, str]]] = {str(r[0]): {} for r in rows}
    for incident_id, stage, at_ms, actor in stage_rows:
        stages[str(incident_id)][str(stage)] = (int(at_ms), str(actor))
    return [incident_from_row(tuple(r), stages[str(r[0])]) for r in rows]


def history_from_rows(rows: Iterable[Sequence[Any]]) -> list[HistoryEntry]:
    """incident_history rows (at_ms, what, actor, event_id, detail) as entries."""
    return [HistoryEntry(int(a), w, str(who), e, json.loads(d)) for a, w, who, e, d in rows]


def ticks_from_rows(rows: Iterable[Sequence[Any]]) -> dict[str, tuple[int, str]]:
    """incident_ticks rows (step, at_ms, actor) by step."""
    return {str(s): (int(a), str(who)) for s, a, who in rows}


def events_behind(attached: Iterable[Sequence[Any]], stage: str) -> list[str]:
    """Of an incident's (event_id, state) rows, the events not yet at `stage`: they follow
    the incident there, so the per-event views (/alerts) agree with it."""
    return [str(e) for e, state in attached if STAGE_ORDER[state] < STAGE_ORDER[stage]]


class SqliteDatabase:
    """The blocking SQLite work beneath `SqliteStore`; one-shot commands with no event loop
    (`ansimi gateway purge`, the demo's and simulator's device registration) use it as is."""

    def __init__(self, path: Path | str, priorities: Mapping[str, int] | None = None) -> None:
        self.path = Path(path)
        # an attached event upgrades its incident when its kind is more urgent by these
        self._priority = Priorities(priorities)
        with _translated(self.path):
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                create_private(self.path)  # personal data and every alert live here
            # One connection, serialised by a lock: SQLite allows one writer anyway.
            # Several gateway instances on one machine share this file: a writer waits for
            # another's commit (an fsync, milliseconds) rather than failing after 5 s under load.
            self._db = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
            )
            self._lock = threading.Lock()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version, _what, step in MIGRATIONS:
            # the version is read again inside each step's transaction: another instance
            # opening the same file at once may have done the step first
            with self._tx() as db:
                if self._version(db) < version:
                    step(db)
                    db.execute("DELETE FROM schema_version")
                    db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        with self._lock:
            found = self._version(self._db)
        if found > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.path}: schema version {found} was written by a newer gateway (this one "
                f"knows up to {SCHEMA_VERSION}). Fix: run that newer gateway, or restore a backup"
            )

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def schema_version(self) -> int:
        with self._lock, _translated(self.path):
            return self._version(self._db)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with _translated(self.path), transaction(self._db, self._lock) as db:
            yield db

    def _query(self, sql: str, args: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock, _translated(self.path):
            return self._db.execute(sql, tuple(args)).fetchall()

    # ---- devices ------------------------------------------------------------------------

    def add_device(self, device: Device, now_ms: int) -> None:
        with self._tx() as db:
            if self._device_row(db, device.device_id) is not None:
                raise DuplicateDevice(device.device_id)
            db.execute(
                f"INSERT INTO devices ({NEW_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                new_device_values(device, now_ms),
            )

    _DEVICE_COLUMNS = (
        "device_id, public_key, kind, district, label, revoked, high_water,"
        " last_seen_ms, online, power, revoked_ms"
    )

    @staticmethod
    def _device(row: tuple[Any, ...]) -> Device:
        (
            device_id,
            key,
            kind,
            district,
            label,
            revoked,
            high_water,
            seen,
            online,
            power,
            revoked_ms,
        ) = row
        return Device(
            str(device_id),
            str(key),
            kind,
            str(district),
            str(label),
            bool(revoked),
            None if high_water is None else int(high_water),
            None if seen is None else int(seen),
            None if online is None else bool(online),
            None if power is None else str(power),
            None if revoked_ms is None else int(revoked_ms),
        )

    def device(self, device_id: str) -> Device | None:
        rows = self._query(
            f"SELECT {self._DEVICE_COLUMNS} FROM devices WHERE device_id = ?",  # noqa: S608
            (device_id,),
        )
        return self._device(rows[0]) if rows else None

    def devices(self) -> list[Device]:
        rows = self._query(f"SELECT {self._DEVICE_COLUMNS} FROM devices ORDER BY device_id")  # noqa: S608
        return [self._device(r) for r in rows]

    def revoke(self, device_id: str, now_ms: int) -> bool:
        with self._tx() as db:
            return db.execute(_REVOKE, (now_ms, device_id)).rowcount == 1

    # ---- intake -------------------------------------------------------------------------

    def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
        """Keep a batch in one transaction (group commit) and note who was heard from.

        A known event id is a resend of something already kept: nothing new is stored or
        forwarded, but the caller re-acks it, because the device evidently missed the ack.
        Every message also marks its device seen now; the supervisors of all gateway
        instances read that, so heartbeats landing on another instance still count.

        An event id belongs to one device (ids are site-wide: the API, the acks and the
        centres' idempotency keys name an event by its id alone). A message whose id is
        another device's event, or that names one (a cancel of another device's alert, an
        alert linked to another device's event), is refused here, where ownership is
        known and checked in the same transaction as the insert: nothing is kept, acked or
        forwarded for it. An id named that no event has yet is let through (the device's
        own alert may be on its way, resent or through another instance) and becomes the
        naming device's there and then: an event arriving later under that id from another
        device is refused like any other reuse.
        """
        fresh: list[bool] = []
        forwarded: list[bool] = []
        came_online: list[str] = []
        refused: list[str | None] = []
        caught_up: dict[str, str] = {}
        with self._tx() as db:
            for item in batch:
                row = db.execute(
                    "SELECT online, power, kind, district FROM devices WHERE device_id = ?",
                    (item.device_id,),
                ).fetchone()
                was_online, old_power = (None, None) if row is None else row[:2]
                # kind and district, for the event's incident: read here once, not again there
                bell = None if row is None else (str(row[2]), str(row[3]))
                db.execute(
                    "UPDATE devices SET high_water = MAX(COALESCE(high_water, -1), ?),"
                    " last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?), online = 1,"
                    " power = COALESCE(?, power) WHERE device_id = ?",
                    (item.seq, now_ms, item.power, item.device_id),
                )
                if was_online == 0 and item.device_id not in came_online:
                    came_online.append(item.device_id)
                power_changed = item.power is not None and old_power not in (None, item.power)
                if not (item.kept or power_changed):
                    fresh.append(True)
                    forwarded.append(False)
                    refused.append(None)
                    continue
                refusal = None
                inserted = False
                if _foreign(db, item.refs, item.device_id):
                    refusal = FOREIGN_REF
                elif _foreign(db, (item.event_id,), item.device_id):
                    refusal = FOREIGN_ID
                else:
                    inserted = self._insert_event(db, item, now_ms, caught_up, bell)
                fresh.append(inserted)
                forwarded.append(inserted and bool(item.centres))
                refused.append(refusal)
        return Accepted(fresh, forwarded, came_online, refused, caught_up)

    def _insert_event(
        self,
        db: sqlite3.Connection,
        item: Incoming,
        now_ms: int,
        caught_up: dict[str, str] | None = None,
        bell: tuple[str, str] | None = None,
    ) -> bool:
        """Keep one event (False: its id is kept already); `bell`: its device's (kind,
        district) if the caller has read them, else read here."""
        inserted = db.execute(
            "INSERT INTO events (event_id, device_id, seq, type, ts_ms, received_ms,"
            " body, jws, clock_skew_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                item.event_id,
                item.device_id,
                item.seq,
                item.type,
                item.ts_ms,
                now_ms,
                item.body_json,
                item.jws,
                item.clock_skew_ms,
            ),
        ).rowcount
        if inserted:
            db.executemany(
                "INSERT INTO outbox (event_id, centre, next_attempt_ms) VALUES (?, ?, ?)",
                [(item.event_id, centre, now_ms) for centre in item.centres],
            )
            _claim(db, (item.event_id, *item.refs), item.device_id)
            stage = self._attach(db, item, now_ms, bell)
            if stage is not None and caught_up is not None:
                caught_up[item.event_id] = stage
        return bool(inserted)

    # ---- incidents --------------------------------------------------------------------------

    def _attach(
        self,
        db: sqlite3.Connection,
        item: Incoming,
        now_ms: int,
        bell: tuple[str, str] | None = None,
    ) -> str | None:
        """Attach a new event to its incident, or open one if it is worth one
        (`decide_incidents`); for an alert joining an incident already acknowledged or
        dispatched, that stage.

        In the transaction that keeps the event: an event acked to its bell is always on
        its incident. The gateway's own `escalation` events are attached by `escalate`.
        """
        if bell is None:
            device = db.execute(
                "SELECT kind, district FROM devices WHERE device_id = ?", (item.device_id,)
            ).fetchone()
            if device is None:
                return None  # an event about the gateway itself (disk_low): no bell, no incident
            bell = (str(device[0]), str(device[1]))
        mine = db.execute(
            f"SELECT {OPEN_INCIDENT_COLUMNS} WHERE i.device_id = ? AND i.state != 'closed'"
            " AND i.kind != 'district_outage'",
            (item.device_id,),
        ).fetchone()
        # the write lock (BEGIN IMMEDIATE) is held: another instance on this file that told
        # the district's outage has committed it, and this event finds it
        outage = db.execute(
            f"SELECT {OPEN_INCIDENT_COLUMNS}"
            " WHERE i.kind = 'district_outage' AND i.state != 'closed' AND i.district = ?",
            (bell[1],),
        ).fetchone()
        own = {} if mine is None else {item.device_id: OpenIncident(*mine)}
        outages = {} if outage is None else {bell[1]: OpenIncident(*outage)}
        decided = decide_incidents(
            [item], {item.device_id: bell}, own, outages, self._priority, now_ms
        )
        for incident in (*own.values(), *outages.values()):
            if incident.events_added:
                _write_incident(db, incident, now_ms)
        for event_id, incident_id in decided.attached:
            _add_to_incident(db, event_id, incident_id)
        for incident_id, what, actor, event_id, detail in decided.history:
            _history(db, incident_id, now_ms, what, actor, event_id, **detail)
        return decided.caught_up.get(item.event_id)

    def incidents(
        self, state: str | None, limit: int, districts: Sequence[str] | None = None
    ) -> list[Incident]:
        """By priority then age; `state` one of the incident states, `open` (all but
        closed) or None (all); `districts`: only theirs (None: every district)."""
        where = {None: "1", "open": "i.state != 'closed'"}.get(state, "i.state = ?")
        args: list[object] = [] if state in (None, "open") else [state]
        if districts is not None:
            where += f" AND d.district IN ({', '.join('?' * len(districts))})"
            args += districts
        rows = self._query(
            f"SELECT {INCIDENT_COLUMNS} WHERE {where} ORDER BY i.priority, i.opened_ms LIMIT ?",
            (*args, limit),
        )
        return self._with_stages(rows)

    def _with_stages(self, rows: list[tuple[Any, ...]]) -> list[Incident]:
        ids = [str(r[0]) for r in rows]
        stage_rows = (
            self._query(
                "SELECT incident_id, stage, at_ms, actor FROM incident_stages"  # noqa: S608
                f" WHERE incident_id IN ({', '.join('?' * len(ids))}) ORDER BY at_ms",
                ids,
            )
            if ids
            else []
        )
        return incidents_with_stages(rows, stage_rows)

    def incident(self, incident_id: str) -> Incident | None:
        rows = self._query(f"SELECT {INCIDENT_COLUMNS} WHERE i.incident_id = ?", (incident_id,))
        found = self._with_stages(rows)
        return found[0] if found else None

    def incident_of(self, event_id: str) -> str | None:
        """The incident an event is attached to, if any."""
        rows = self._query(
            "SELECT incident_id FROM incident_events WHERE event_id = ?", (event_id,)
        )
        return str(rows[0][0]) if rows else None

    def incident_history(self, incident_id: str) -> list[HistoryEntry]:
        rows = self._query(
            "SELECT at_ms, what, actor, event_id, detail FROM incident_history"
            " WHERE incident_id = ? ORDER BY at_ms, rowid",
            (incident_id,),
        )
        return history_from_rows(rows)

    def incident_ticks(self, incident_id: str) -> dict[str, tuple[int, str]]:
        rows = self._query(
            "SELECT step, at_ms, actor FROM incident_ticks WHERE incident_id = ?", (incident_id,)
        )
        return ticks_from_rows(rows)

    def move_incident(
        self, incident_id: str, stage: str, now_ms: int, actor: str, outcome: str | None = None
    ) -> bool:
        """Move an incident forward to `stage` (closed with its outcome), and its events'
        states with it; False if it is already there or beyond."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM incidents WHERE incident_id = ?", (incident_id,)
            ).fetchone()
            if row is None:
                raise UnknownEvent(incident_id)
            if INCIDENT_STAGE_ORDER[row[0]] >= INCIDENT_STAGE_ORDER[stage]:
                return False
            db.execute(
                "UPDATE incidents SET state = ?, outcome = COALESCE(?, outcome), updated_ms = ?"
                " WHERE incident_id = ?",
                (stage, outcome, now_ms, incident_id),
            )
            db.execute(
                "INSERT OR IGNORE INTO incident_stages VALUES (?, ?, ?, ?)",
                (incident_id, stage, now_ms, actor),
            )
            extra = {"outcome": outcome} if outcome is not None else {}
            _history(db, incident_id, now_ms, "stage", actor, None, stage=stage, **extra)
            attached = db.execute(
                "SELECT e.event_id, e.state FROM incident_events ie JOIN events e"
                " USING (event_id) WHERE ie.incident_id = ?",
                (incident_id,),
            ).fetchall()
            events = events_behind(attached, stage)
            db.executemany(
                "UPDATE events SET state = ? WHERE event_id = ?", [(stage, e) for e in events]
            )
            db.executemany(
                "INSERT OR IGNORE INTO stages VALUES (?, ?, ?, ?)",
                [(e, stage, now_ms, actor) for e in events],
            )
        return True

    def tick_procedure(self, incident_id: str, step: str, now_ms: int, actor: str) -> bool:
        """Tick a checklist step; False if it was ticked already (the first tick stays)."""
        with self._tx() as db:
            ticked = db.execute(
                "INSERT OR IGNORE INTO incident_ticks VALUES (?, ?, ?, ?)",
                (incident_id, step, now_ms, actor),
            ).rowcount
            if ticked:
                db.execute(
                    "UPDATE incidents SET updated_ms = MAX(updated_ms, ?) WHERE incident_id = ?",
                    (now_ms, incident_id),
                )
                _history(db, incident_id, now_ms, "procedure", actor, None, step=step, done=True)
        return bool(ticked)

    def escalation_candidates(self, max_level: int) -> list[Incident]:
        """Incidents nobody acknowledged whose chain is not used up."""
        rows = self._query(
            f"SELECT {INCIDENT_COLUMNS} WHERE i.state = 'new' AND i.escalation_level < ?"
            " ORDER BY i.priority, i.opened_ms",
            (max_level,),
        )
        return self._with_stages(rows)

    def escalate(
        self,
        incident_id: str,
        level: int,
        to: str,
        event: tuple[str, int, int, str, str],
        now_ms: int,
    ) -> bool:
        """Take escalation step `level` to centre `to`, keeping `event` (id, seq, ts, body,
        token: the gateway-signed `escalation`) forwarded to `to` alone. Only if the incident
        is still unacknowledged at level - 1: with several instances, one takes each step."""
        event_id, seq, ts_ms, body_json, token = event
        with self._tx() as db:
            row = db.execute(
                "SELECT device_id, escalated_to FROM incidents WHERE incident_id = ?"
                " AND state = 'new' AND escalation_level = ?",
                (incident_id, level - 1),
            ).fetchone()
            if row is None:
                return False
            device_id, escalated_to = str(row[0]), [*json.loads(row[1]), to]
            db.execute(
                "UPDATE incidents SET escalation_level = ?, escalated_to = ?,"
                " updated_ms = MAX(updated_ms, ?), events = events + 1 WHERE incident_id = ?",
                (level, json.dumps(escalated_to), now_ms, incident_id),
            )
            item = Incoming(event_id, device_id, seq, "escalation", ts_ms, body_json, token, (to,))
            self._insert_event(db, item, now_ms)
            db.execute(
                "INSERT OR IGNORE INTO incident_events VALUES (?, ?)", (event_id, incident_id)
            )
            _history(db, incident_id, now_ms, "escalation", "gateway", event_id, level=level, to=to)
        return True

    # ---- supervision --------------------------------------------------------------------

    def add_event(self, item: Incoming, now_ms: int) -> None:
        """Keep an event the gateway itself made; the device's high-water mark is untouched."""
        with self._tx() as db:
            self._insert_event(db, item, now_ms)

    def mark_offline(
        self, items: Sequence[Incoming], silent_since_ms: int, now_ms: int
    ) -> list[bool]:
        """Mark each item's device offline, keeping the item as its event, if still due.

        Per item, False when the device is already offline or was heard from after
        `silent_since_ms` (by any gateway instance sharing this store): then nothing is kept.
        The check and the event are one transaction, so two instances never both report it.
        """
        went: list[bool] = []
        with self._tx() as db:
            for item in items:
                changed = db.execute(
                    "UPDATE devices SET online = 0 WHERE device_id = ? AND online = 1"
                    " AND COALESCE(last_seen_ms, 0) <= ?",
                    (item.device_id, silent_since_ms),
                ).rowcount
                if changed:
                    self._insert_event(db, item, now_ms)
                went.append(bool(changed))
        return went

    # ---- forwarding ---------------------------------------------------------------------

    def delivered_many(self, done: Sequence[tuple[str, str]], now_ms: int) -> list[bool]:
        """Mark deliveries done, in one transaction (group commit); per (event id, centre)
        pair, True if it is the event's first delivery."""
        with self._tx() as db:
            return [self._mark_delivered(db, event_id, centre, now_ms) for event_id, centre in done]

    @staticmethod
    def _mark_delivered(db: sqlite3.Connection, event_id: str, centre: str, now_ms: int) -> bool:
        db.execute(
            "UPDATE outbox SET delivered_ms = ?, attempts = attempts + 1"
            " WHERE event_id = ? AND centre = ? AND delivered_ms IS NULL",
            (now_ms, event_id, centre),
        )
        first = db.execute(
            "UPDATE events SET state = 'delivered' WHERE event_id = ? AND state = 'received'",
            (event_id,),
        ).rowcount
        if first:
            db.execute(
                "INSERT OR IGNORE INTO stages VALUES (?, 'delivered', ?, ?)",
                (event_id, now_ms, centre),
            )
        return bool(first)

    def failed(self, event_id: str, centre: str, next_attempt_ms: int, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?, last_error = ?"
                " WHERE event_id = ? AND centre = ?",
                (next_attempt_ms, error[:500], event_id, centre),
            )

    def reroute(self, route: Callable[[str], Sequence[str]], now_ms: int) -> int:
        """Give every event no centre has accepted yet a delivery to each centre its
        device's district has now (`route`); returns how many deliveries that added.

        Deliveries are made when an event is kept, by the routing of that moment: an event
        kept while its district had no centre, or whose centre has been renamed, would
        otherwise wait for nobody.
        """
        with self._tx() as db:
            rows = db.execute(
                "SELECT e.event_id, d.district FROM events e JOIN devices d USING (device_id)"
                " WHERE e.state = 'received'"
            ).fetchall()
            added = 0
            for event_id, district in rows:
                added += db.executemany(
                    "INSERT OR IGNORE INTO outbox (event_id, centre, next_attempt_ms)"
                    " VALUES (?, ?, ?)",
                    [(event_id, centre, now_ms) for centre in route(str(district))],
                ).rowcount
        return added

    def refused(self, event_id: str, centre: str, now_ms: int, error: str) -> None:
        """Park a delivery the centre refused outright: kept and listed, no longer due."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, refused_ms = ?, last_error = ?"
                " WHERE event_id = ? AND centre = ? AND delivered_ms IS NULL",
                (now_ms, error[:500], event_id, centre),
            )

    def retry_refused(
        self,
        now_ms: int,
        *,
        centre: str | None = None,
        event_id: str | None = None,
        districts: Sequence[str] | None = None,
    ) -> int:
        """Make parked deliveries due now: all, or those of one centre, one event, or
        devices in `districts`; returns how many."""
        where, args = delivery_filter(centre, event_id, districts)
        with self._tx() as db:
            parked = (
                "SELECT o.rowid FROM outbox o JOIN events e USING (event_id)"
                " JOIN devices d USING (device_id)"
                " WHERE o.delivered_ms IS NULL AND o.refused_ms IS NOT NULL"
            )
            return db.execute(
                f"UPDATE outbox SET refused_ms = NULL, next_attempt_ms = ? WHERE rowid IN ({parked}{where})",  # noqa: S608, E501
                (now_ms, *args),
            ).rowcount

    def refused_by_centre(self) -> dict[str, int]:
        rows = self._query(
            "SELECT centre, COUNT(*) FROM outbox WHERE delivered_ms IS NULL"
            " AND refused_ms IS NOT NULL GROUP BY centre"
        )
        return {str(c): int(n) for c, n in rows}

    def waiting_count(self) -> int:
        rows = self._query("SELECT COUNT(*) FROM outbox WHERE delivered_ms IS NULL")
        return int(rows[0][0])

    def due_for(self, centre: str, now_ms: int, limit: int) -> list[Delivery]:
        """Deliveries to `centre` due by `now_ms`, oldest first; asked per centre, because a
        centre that is down must not crowd out the others."""
        rows = self._query(
            "SELECT o.event_id, o.centre, o.attempts, e.device_id, e.type, e.ts_ms, e.body,"
            " e.jws, e.clock_skew_ms, i.incident_id, i.kind, i.priority"
            " FROM outbox o JOIN events e USING (event_id)"
            " LEFT JOIN incident_events ie ON ie.event_id = o.event_id"
            " LEFT JOIN incidents i ON i.incident_id = ie.incident_id"
            " WHERE o.centre = ? AND o.delivered_ms IS NULL AND o.refused_ms IS NULL"
            " AND o.next_attempt_ms <= ?"
            " ORDER BY o.next_attempt_ms LIMIT ?",
            (centre, now_ms, limit),
        )
        return [delivery_from_row(row) for row in rows]

    def waiting(
        self,
        limit: int,
        *,
        centre: str | None = None,
        refused: bool | None = None,
        districts: Sequence[str] | None = None,
    ) -> list[Waiting]:
        """Deliveries not yet accepted, oldest retry first; optionally for one centre, only
        those refused (True) or still retried (False), and for devices in `districts`."""
        where, args = delivery_filter(centre, None, districts)
        if refused is not None:
            where += " AND o.refused_ms IS NOT NULL" if refused else " AND o.refused_ms IS NULL"
        columns = (
            "o.event_id, o.centre, e.device_id, e.type, o.attempts, o.next_attempt_ms,"
            " o.last_error, d.district, o.refused_ms"
        )
        rows = self._query(
            f"SELECT {columns} FROM outbox o JOIN events e USING (event_id) JOIN devices d"  # noqa: S608
            f" USING (device_id) WHERE o.delivered_ms IS NULL{where}"
            " ORDER BY o.next_attempt_ms LIMIT ?",
            (*args, limit),
        )
        return [
            Waiting(
                str(a),
                str(b),
                str(c),
                str(d),
                int(e),
                int(f),
                None if g is None else str(g),
                str(h),
                None if i is None else int(i),
            )
            for a, b, c, d, e, f, g, h, i in rows
        ]

    def waiting_by_centre(self) -> dict[str, int]:
        rows = self._query(
            "SELECT centre, COUNT(*) FROM outbox WHERE delivered_ms IS NULL GROUP BY centre"
        )
        return {str(c): int(n) for c, n in rows}

    # ---- operator stages ---------------------------------------------------

    def set_stage(self, event_id: str, stage: EventState, now_ms: int, actor: str) -> bool:
        """Move an event forward to `stage`; False if it is already there or beyond."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM events WHERE event_id = ?", (event_id,)).fetchone()
            if row is None:
                raise UnknownEvent(event_id)
            if STAGE_ORDER[row[0]] >= STAGE_ORDER[stage]:
                return False
            db.execute("UPDATE events SET state = ? WHERE event_id = ?", (stage, event_id))
            db.execute(
                "INSERT OR IGNORE INTO stages VALUES (?, ?, ?, ?)", (event_id, stage, now_ms, actor)
            )
        return True

    _EVENT_SELECT = (
        "SELECT e.event_id, e.device_id, e.type, e.ts_ms, e.received_ms, e.body, e.state,"
        " (SELECT COUNT(*) FROM outbox o WHERE o.event_id = e.event_id"
        "  AND o.delivered_ms IS NULL) FROM events e"
    )

    @staticmethod
    def _event(row: tuple[Any, ...]) -> Event:
        a, b, c, d, e, f, g, h = row
        return Event(str(a), str(b), str(c), int(d), int(e), str(f), g, int(h))

    def event(self, event_id: str) -> Event | None:
        rows = self._query(self._EVENT_SELECT + " WHERE e.event_id = ?", (event_id,))
        return self._event(rows[0]) if rows else None

    def events(
        self, state: EventState | None, limit: int, *, type: str | None = None
    ) -> list[Event]:
        """Newest first; optionally only those in `state` and of `type`."""
        where = " WHERE (? IS NULL OR e.state = ?) AND (? IS NULL OR e.type = ?)"
        rows = self._query(
            self._EVENT_SELECT + where + " ORDER BY e.received_ms DESC LIMIT ?",
            (state, state, type, type, limit),
        )
        return [self._event(r) for r in rows]

    def stages(self, event_id: str) -> list[tuple[str, int, str]]:
        """(stage, at_ms, actor) of an event, in order."""
        rows = self._query(
            "SELECT stage, at_ms, actor FROM stages WHERE event_id = ? ORDER BY at_ms",
            (event_id,),
        )
        return [(str(a), int(b), str(c)) for a, b, c in rows]

    # ---- personal data (sealed) --------------------------------------------------------

    def set_private(self, device_id: str, sealed: str, now_ms: int) -> bool:
        """Keep a device's sealed personal data, replacing any; False if no such device."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone():
                db.execute(
                    "INSERT INTO device_private VALUES (?, ?, ?) ON CONFLICT (device_id)"
                    " DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
                    (device_id, sealed, now_ms),
                )
                return True
        return False

    def private(self, device_id: str) -> str | None:
        rows = self._query("SELECT sealed FROM device_private WHERE device_id = ?", (device_id,))
        return str(rows[0][0]) if rows else None

    def reseal_private(self, reseal: Callable[[str, str], str]) -> int:
        """Replace every sealed value by `reseal(device_id, sealed)`, all in one transaction.

        For key rotation: an error half-way rolls every row back to the old key.
        """
        with self._tx() as db:
            rows = db.execute("SELECT device_id, sealed FROM device_private").fetchall()
            db.executemany(
                "UPDATE device_private SET sealed = ? WHERE device_id = ?",
                [(reseal(str(d), str(v)), d) for d, v in rows],
            )
        return len(rows)

    def decommission(self, device_id: str, now_ms: int) -> bool:
        """Revoke a device and drop what was personal about it, in one transaction.

        Its personal data goes and its label (free text an installer may have misused) is
        emptied; its events stay under the bare device id: the anonymised history.
        False if no such device.
        """
        with self._tx() as db:
            found = db.execute(_REVOKE, (now_ms, device_id)).rowcount
            db.execute("UPDATE devices SET label = '' WHERE device_id = ?", (device_id,))
            db.execute("DELETE FROM device_private WHERE device_id = ?", (device_id,))
        return found == 1

    def purge_closed(self, closed_before_ms: int, *, dry_run: bool) -> int:
        """Delete events closed before `closed_before_ms`, with their stages and deliveries.

        Only `closed` events qualify, by when they were closed: an alert that is not
        closed is never purged, however old. `dry_run` counts and deletes nothing.
        Deleted `PURGE_BATCH` events a transaction: a first purge of a year of events
        must not hold the write lock long enough to stall the gateway's intake.
        """
        chosen = (
            "SELECT e.event_id FROM events e JOIN stages s"
            " ON s.event_id = e.event_id AND s.stage = 'closed'"
            " WHERE e.state = 'closed' AND s.at_ms < ? LIMIT ?"
        )
        if dry_run:
            return len(self._query(chosen, (closed_before_ms, -1)))  # LIMIT -1: all
        purged = 0
        while True:
            with self._tx() as db:
                ids = [row[0] for row in db.execute(chosen, (closed_before_ms, PURGE_BATCH))]
                rows = [(i,) for i in ids]
                for table in ("outbox", "stages", "events"):
                    db.executemany(f"DELETE FROM {table} WHERE event_id = ?", rows)  # noqa: S608
            purged += len(ids)
            if len(ids) < PURGE_BATCH:
                return purged

    # ---- the gateway's own events, and the disk --------------------------------------------

    def add_site_event(self, item: Incoming, now_ms: int) -> None:
        """Keep an event about the gateway itself (disk_low), forwarded like any other.

        It names the gateway as its device, and the gateway is no device: the devices
        reference is off for this one insert (a pragma that only changes between
        transactions, hence under the lock around both).
        """
        with self._lock, _translated(self.path):
            self._db.execute("PRAGMA foreign_keys=OFF")
            try:
                with transaction(self._db, nullcontext()) as db:  # the lock is held already
                    self._insert_event(db, item, now_ms)
            finally:
                self._db.execute("PRAGMA foreign_keys=ON")

    def free_bytes(self) -> int | None:
        if str(self.path) == ":memory:":
            return None
        stat = os.statvfs(self.path.parent)
        return stat.f_bavail * stat.f_frsize

    def checkpoint(self) -> None:
        """Copy the WAL into the database and cut the WAL file to nothing, if no other
        instance is reading; otherwise as much as it can, and the next call does the rest."""
        with self._lock, _translated(self.path):
            self._db.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")

    # ---- live video streams: which instance holds which -------------------------------

    def claim_stream(self, device_id: str, holder: str, session: str, now_ms: int) -> None:
        """`holder` now holds `device_id`'s stream (a newer offer replaces any other's)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO video_streams VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE"
                " SET holder = excluded.holder, session = excluded.session,"
                " since_ms = excluded.since_ms",
                (device_id, holder, session, now_ms),
            )

    def release_stream(self, device_id: str, holder: str, session: str) -> bool:
        """Forget the claim if it is still this holder's and session's (not a newer one)."""
        with self._tx() as db:
            gone = db.execute(
                "DELETE FROM video_streams WHERE device_id = ? AND holder = ? AND session = ?",
                (device_id, holder, session),
            )
            return gone.rowcount > 0

    def release_streams_of(self, holder: str) -> int:
        """At an instance's start: the streams it held before dying are gone with it."""
        with self._tx() as db:
            return db.execute("DELETE FROM video_streams WHERE holder = ?", (holder,)).rowcount

    def stream_holder(self, device_id: str) -> str | None:
        rows = self._query("SELECT holder FROM video_streams WHERE device_id = ?", (device_id,))
        return str(rows[0][0]) if rows else None

    # ---- remote configuration -------------------------------------------------------------

    def set_config_layer(
        self,
        scope: ConfigScope,
        name: str,
        patch_json: str | None,
        now_ms: int,
        sealed_to_key: str | None = None,
    ) -> None:
        """Replace a layer; None removes it."""
        with self._tx() as db:
            if patch_json is None:
                db.execute("DELETE FROM config_layers WHERE scope = ? AND name = ?", (scope, name))
            else:
                db.execute(
                    sqlite_marks(SET_CONFIG_LAYER_SQL),
                    (scope, name, patch_json, now_ms, sealed_to_key),
                )

    def config_layers(self) -> list[ConfigLayer]:
        rows = self._query(CONFIG_LAYERS_SQL, ())
        return [config_layer(row) for row in rows]

    def report_config(self, device_id: str, config_hash: str, now_ms: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO config_reported VALUES (?, ?, ?) ON CONFLICT (device_id)"
                " DO UPDATE SET config_hash = excluded.config_hash,"
                " reported_ms = excluded.reported_ms",
                (device_id, config_hash, now_ms),
            )

    def reported_configs(self) -> dict[str, tuple[str, int]]:
        rows = self._query("SELECT device_id, config_hash, reported_ms FROM config_reported", ())
        return {str(a): (str(b), int(c)) for a, b, c in rows}

    def test_records(self, start_ms: int, end_ms: int) -> list[TestRecord]:
        sql = TEST_RECORDS_SQL.format(start="?", end="?")
        return test_records_of(self._query(sql, (start_ms, end_ms)))

    # ---- agent rollouts (BEGIN IMMEDIATE: each change alone on the file) -------------------

    def start_rollout(self, rollout: RolloutRecord, devices: Sequence[DeviceUpdate]) -> bool:
        with self._tx() as db:
            if db.execute(sqlite_marks(START_ROLLOUT_SQL), rollout_values(rollout)).rowcount == 0:
                return False
            db.executemany(
                sqlite_marks(ADD_ROLLOUT_DEVICE_SQL),
                [device_update_values(rollout.rollout_id, d) for d in devices],
            )
            return True

    def rollouts(self, limit: int) -> list[RolloutRecord]:
        rows = self._query(
            f"SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY rowid DESC LIMIT ?",  # noqa: S608
            (limit,),
        )
        return [rollout_from_row(row) for row in rows]

    def rollout_devices(self, rollout_id: str) -> list[DeviceUpdate]:
        rows = self._query(sqlite_marks(ROLLOUT_DEVICES_SQL), (rollout_id,))
        return [device_update_from_row(row) for row in rows]

    def move_rollout(
        self,
        rollout_id: str,
        from_states: Sequence[RolloutPhase],
        to_state: RolloutPhase,
        *,
        percent: float | None = None,
        paused_because: str | None = None,
        add_devices: Sequence[str] = (),
    ) -> bool:
        sql = sqlite_marks(move_rollout_sql(from_states))
        with self._tx() as db:
            if db.execute(sql, (rollout_id, to_state, percent, paused_because)).rowcount == 0:
                return False
            db.executemany(
                sqlite_marks(ADD_ROLLOUT_DEVICE_SQL),
                [device_update_values(rollout_id, DeviceUpdate(d)) for d in add_devices],
            )
            return True

    def offer_rollout(self, rollout_id: str, now_ms: int, reoffer_ms: int) -> list[str]:
        with self._tx() as db:
            state = db.execute("SELECT state FROM rollouts WHERE rollout_id = ?", (rollout_id,))
            if state.fetchone() != ("running",):
                return []
            offered = db.execute(sqlite_marks(OFFER_ROLLOUT_SQL), (rollout_id, now_ms, reoffer_ms))
            device_ids = [str(row[0]) for row in offered.fetchall()]
            db.execute(sqlite_marks(SETTLE_ROLLOUT_SQL), (rollout_id,))
            return device_ids

    def report_update(
        self,
        rollout_id: str,
        device_id: str,
        outcome: UpdateOutcome,
        reason: str | None,
        now_ms: int,
    ) -> bool:
        sql, args = report_update_args(rollout_id, device_id, outcome, reason, now_ms)
        with self._tx() as db:
            changed = db.execute(sqlite_marks(sql), args).rowcount > 0
            db.execute(sqlite_marks(SETTLE_ROLLOUT_SQL), (rollout_id,))
            return changed

    def close(self) -> None:
        with self._lock, _translated(self.path):
            self._db.close()

    # ---- enrolment ----------------------------------------------------------------------
    # The token and the device row change in one transaction: a crash leaves either a used
    # token and a registered device, or neither.

    _ENROLMENT_COLUMNS = (
        "device_id, kind, district, label, rotate, created_ms, expires_ms, used_ms,"
        " cancelled_ms, serial"
    )

    @staticmethod
    def _pending(row: tuple[Any, ...]) -> Pending:
        d, kind, district, label, rotate, created, expires, used, cancelled, serial = row
        return Pending(
            str(d),
            kind,
            str(district),
            str(label),
            bool(rotate),
            int(created),
            int(expires),
            used,
            cancelled,
            serial,
        )

    @staticmethod
    def _device_row(db: sqlite3.Connection, device_id: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = db.execute(
            "SELECT device_id, kind, district, label, revoked FROM devices WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return row

    def issue_enrolment(
        self,
        device_id: str,
        kind: DeviceKind,
        district: str,
        label: str,
        *,
        now_ms: int,
        ttl_s: int = DEFAULT_TTL_S,
        rotate: bool = False,
        serves: Callable[[str], bool] = lambda _district: True,
    ) -> tuple[str, Pending]:
        """A new token for `device_id`; a new device's id must be free, a rotated one
        enrolled and not revoked. A rotation keeps the device's kind, district and label.
        `serves`: whether the asking token serves a district (ApiToken.sees)."""
        token = new_token(device_id)
        with self._tx() as db:
            row = self._device_row(db, device_id)
            live = db.execute(
                "SELECT 1 FROM enrolments WHERE device_id = ? AND used_ms IS NULL"
                " AND cancelled_ms IS NULL AND expires_ms > ?",
                (device_id, now_ms),
            ).fetchone()
            chosen = enrolment_for(
                device_id,
                None if row is None else (row[1], row[2], row[3], bool(row[4])),
                live is not None,
                (kind, district, label),
                rotate=rotate,
                serves=serves,
            )
            if rotate:
                # a fresh rotation token replaces one not yet used
                db.execute(
                    "UPDATE enrolments SET cancelled_ms = ? WHERE device_id = ?"
                    " AND used_ms IS NULL AND cancelled_ms IS NULL",
                    (now_ms, device_id),
                )
            pending = issued_enrolment(device_id, chosen, rotate=rotate, now_ms=now_ms, ttl_s=ttl_s)
            db.execute(
                "INSERT INTO enrolments (token_hash, device_id, kind, district, label, rotate,"
                " created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (hash_token(token), device_id, *chosen, int(rotate), now_ms, pending.expires_ms),
            )
        return token, pending

    def check_enrolment(self, token: str, device_id: str, now_ms: int) -> Pending:
        """The enrolment `token` opens for `device_id`, or TokenRefused saying why not."""
        rows = self._query(
            f"SELECT {self._ENROLMENT_COLUMNS} FROM enrolments WHERE token_hash = ?",  # noqa: S608
            (hash_token(token),),
        )
        return opened_enrolment(rows[0] if rows else None, device_id, now_ms)

    def complete_enrolment(
        self, token: str, public_key_b64: str, serial: str, now_ms: int
    ) -> Pending:
        """Mark the token used and register (or re-key) its device, in one transaction."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {self._ENROLMENT_COLUMNS} FROM enrolments WHERE token_hash = ?",  # noqa: S608
                (hash_token(token),),
            ).fetchone()
            pending = opened_enrolment(row, None, now_ms)
            db.execute(
                "UPDATE enrolments SET used_ms = ?, serial = ? WHERE token_hash = ?",
                (now_ms, serial, hash_token(token)),
            )
            device = self._device_row(db, pending.device_id)
            check_completion(pending, None if device is None else bool(device[4]))
            if pending.rotate:
                db.execute(
                    "UPDATE devices SET public_key = ? WHERE device_id = ?",
                    (public_key_b64, pending.device_id),
                )
            else:
                db.execute(
                    f"INSERT INTO devices ({NEW_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    new_device_values(enrolled_device(pending, public_key_b64), now_ms),
                )
        return pending

    def cancel_enrolments(self, device_id: str, now_ms: int) -> int:
        """Cancel every unused token of `device_id`; how many there were."""
        with self._tx() as db:
            return db.execute(
                "UPDATE enrolments SET cancelled_ms = ? WHERE device_id = ? AND used_ms IS NULL"
                " AND cancelled_ms IS NULL",
                (now_ms, device_id),
            ).rowcount

    def enrolments(self, device_id: str | None = None) -> list[Pending]:
        """Enrolment records, newest first (all devices, or one)."""
        rows = self._query(
            f"SELECT {self._ENROLMENT_COLUMNS} FROM enrolments"  # noqa: S608
            " WHERE (? IS NULL OR device_id = ?) ORDER BY created_ms DESC, rowid DESC",
            (device_id, device_id),
        )
        return [self._pending(r) for r in rows]


class _OnStoreThread(Generic[P, T]):
    """A `SqliteDatabase` method as a `SqliteStore` coroutine method, run on the store's one
    thread. Typed from the method it names, so mypy checks the store against the role
    protocols as if each were written out; looked up by name on the store's database at each
    call, so a database handed in (a test's that fails on purpose) is the one that runs."""

    def __init__(self, method: Callable[Concatenate[SqliteDatabase, P], T]) -> None:
        self._name = method.__name__

    @overload
    def __get__(self, store: None, owner: type[object]) -> Self: ...

    @overload
    def __get__(
        self, store: SqliteStore, owner: type[object]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, store: SqliteStore | None, owner: type[object]) -> Any:
        if store is None:
            return self
        name = self._name

        async def on_store_thread(*args: P.args, **kwargs: P.kwargs) -> T:
            method: Callable[P, T] = getattr(store.database, name)
            return await store._run(method, *args, **kwargs)

        on_store_thread.__name__ = on_store_thread.__qualname__ = name
        return on_store_thread


class SqliteStore:
    """The async store on SQLite: every call runs on the store's one dedicated thread, so the
    event loop never waits for a commit's fsync and SQLite's one connection is used from one
    thread only. Errors come out as `StoreError`s (see `store_error`)."""

    def __init__(
        self, database: SqliteDatabase | Path | str, priorities: Mapping[str, int] | None = None
    ) -> None:
        # a SqliteDatabase may be handed in (tests give one that fails on purpose)
        self.database = (
            database
            if isinstance(database, SqliteDatabase)
            else SqliteDatabase(database, priorities)
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="store")

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        call = functools.partial(fn, *args, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        except sqlite3.Error as exc:  # raised below the database's own translation
            raise store_error(exc, self.database.path) from exc

    async def close(self) -> None:
        await self._run(self.database.close)
        self._thread.shutdown(wait=False)

    # devices
    add_device = _OnStoreThread(SqliteDatabase.add_device)
    device = _OnStoreThread(SqliteDatabase.device)
    devices = _OnStoreThread(SqliteDatabase.devices)
    revoke = _OnStoreThread(SqliteDatabase.revoke)

    # intake and supervision
    accept_batch = _OnStoreThread(SqliteDatabase.accept_batch)
    add_event = _OnStoreThread(SqliteDatabase.add_event)
    mark_offline = _OnStoreThread(SqliteDatabase.mark_offline)

    # forwarding
    due_for = _OnStoreThread(SqliteDatabase.due_for)
    delivered_many = _OnStoreThread(SqliteDatabase.delivered_many)
    failed = _OnStoreThread(SqliteDatabase.failed)
    refused = _OnStoreThread(SqliteDatabase.refused)
    reroute = _OnStoreThread(SqliteDatabase.reroute)
    retry_refused = _OnStoreThread(SqliteDatabase.retry_refused)
    waiting_by_centre = _OnStoreThread(SqliteDatabase.waiting_by_centre)
    refused_by_centre = _OnStoreThread(SqliteDatabase.refused_by_centre)
    waiting_count = _OnStoreThread(SqliteDatabase.waiting_count)
    waiting = _OnStoreThread(SqliteDatabase.waiting)

    # operator stages
    event = _OnStoreThread(SqliteDatabase.event)
    events = _OnStoreThread(SqliteDatabase.events)
    stages = _OnStoreThread(SqliteDatabase.stages)
    set_stage = _OnStoreThread(SqliteDatabase.set_stage)

    # enrolment
    issue_enrolment = _OnStoreThread(SqliteDatabase.issue_enrolment)
    check_enrolment = _OnStoreThread(SqliteDatabase.check_enrolment)
    complete_enrolment = _OnStoreThread(SqliteDatabase.complete_enrolment)
    cancel_enrolments = _OnStoreThread(SqliteDatabase.cancel_enrolments)
    enrolments = _OnStoreThread(SqliteDatabase.enrolments)

    # personal data
    set_private = _OnStoreThread(SqliteDatabase.set_private)
    private = _OnStoreThread(SqliteDatabase.private)
    reseal_private = _OnStoreThread(SqliteDatabase.reseal_private)
    decommission = _OnStoreThread(SqliteDatabase.decommission)
    purge_closed = _OnStoreThread(SqliteDatabase.purge_closed)

    # health and the gateway's own events
    add_site_event = _OnStoreThread(SqliteDatabase.add_site_event)
    free_bytes = _OnStoreThread(SqliteDatabase.free_bytes)

    # incidents
    incidents = _OnStoreThread(SqliteDatabase.incidents)
    incident = _OnStoreThread(SqliteDatabase.incident)
    incident_of = _OnStoreThread(SqliteDatabase.incident_of)
    incident_history = _OnStoreThread(SqliteDatabase.incident_history)
    incident_ticks = _OnStoreThread(SqliteDatabase.incident_ticks)
    move_incident = _OnStoreThread(SqliteDatabase.move_incident)
    tick_procedure = _OnStoreThread(SqliteDatabase.tick_procedure)
    escalation_candidates = _OnStoreThread(SqliteDatabase.escalation_candidates)
    escalate = _OnStoreThread(SqliteDatabase.escalate)
    checkpoint = _OnStoreThread(SqliteDatabase.checkpoint)
    claim_stream = _OnStoreThread(SqliteDatabase.claim_stream)
    release_stream = _OnStoreThread(SqliteDatabase.release_stream)
    release_streams_of = _OnStoreThread(SqliteDatabase.release_streams_of)
    stream_holder = _OnStoreThread(SqliteDatabase.stream_holder)
    set_config_layer = _OnStoreThread(SqliteDatabase.set_config_layer)
    config_layers = _OnStoreThread(SqliteDatabase.config_layers)
    report_config = _OnStoreThread(SqliteDatabase.report_config)
    reported_configs = _OnStoreThread(SqliteDatabase.reported_configs)
    test_records = _OnStoreThread(SqliteDatabase.test_records)
    start_rollout = _OnStoreThread(SqliteDatabase.start_rollout)
    rollouts = _OnStoreThread(SqliteDatabase.rollouts)
    rollout_devices = _OnStoreThread(SqliteDatabase.rollout_devices)
    move_rollout = _OnStoreThread(SqliteDatabase.move_rollout)
    offer_rollout = _OnStoreThread(SqliteDatabase.offer_rollout)
    report_update = _OnStoreThread(SqliteDatabase.report_update)


# row shapes shared with the PostgreSQL store (gateway/store_pg.py): same columns, same order
device_from_row = SqliteDatabase._device
event_from_row = SqliteDatabase._event
pending_from_row = SqliteDatabase._pending

SQLITE_URL_PREFIX: Final = "sqlite://"


def sqlite_url(path: Path | str) -> str:
    """The store URL of an SQLite file (what a plain `database = path` in gateway.toml means)."""
    return f"{SQLITE_URL_PREFIX}{path}"


def sqlite_path(url: str) -> Path:
    """The file a `sqlite://` URL names: `sqlite:///var/lib/ansimi/gateway/gateway.db`."""
    if not url.startswith(SQLITE_URL_PREFIX):
        scheme = url.partition("://")[0] if "://" in url else ""
        why = f"engine {scheme!r} is not available" if scheme else "no engine named"
        raise BadStoreUrl(url, why)
    path = url[len(SQLITE_URL_PREFIX) :]
    if not path:
        raise BadStoreUrl(url, "no file named")
    if path != ":memory:" and not path.startswith("/"):
        raise BadStoreUrl(url, "the path must be absolute")
    return Path(path)


def _is_postgres(url: str) -> bool:
    return url.partition("://")[0] in ("postgresql", "postgres") and "://" in url


def _postgres() -> ModuleType:
    """gateway.store_pg, imported only where PostgreSQL is used: asyncpg is an extra."""
    try:
        return importlib.import_module("gateway.store_pg")
    except ModuleNotFoundError as exc:
        if exc.name != "asyncpg":
            raise
        raise StoreError(
            "a postgresql:// store needs asyncpg. Fix: pip install 'ansimi-edge[postgres]'"
        ) from exc


def check_store_url(url: str) -> None:
    """Raise BadStoreUrl (naming the fix) unless `url` names a store this gateway can open."""
    if _is_postgres(url):
        _postgres().check_postgres_url(url)
    else:
        sqlite_path(url)


def open_store(
    url: str,
    priorities: Mapping[str, int] | None = None,
    *,
    password_file: Path | None = None,
) -> Store:
    """The store a URL names: `sqlite:///path` (the default, one machine) or
    `postgresql://user@host1:5432,host2:5432/db?target_session_attrs=read-write` (gateways
    on several hosts). PostgreSQL's password comes from `password_file` or the systemd
    credential `store-password`, never from the URL. `priorities`: incident kind ->
    priority ([incidents] priorities; defaults otherwise)."""
    if _is_postgres(url):
        pg = _postgres()
        store: Store = pg.PostgresStore(
            url, password=pg.read_password(password_file), priorities=priorities
        )
        return store
    return SqliteStore(sqlite_path(url), priorities)
