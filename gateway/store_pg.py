"""The gateway's store on PostgreSQL, for gateways on several hosts (issue 16).

The same roles and the same contract as `SqliteStore` (tests/unit/gateway/
test_gw_store_contract.py runs both), on asyncpg:

- **Opened from a URL**, `postgresql://ansimi@db1:5432,db2:5432/ansimi?target_session_attrs=
  read-write`. The password never sits in the URL or gateway.toml: it comes from a file
  (`store_password_file`) or the systemd credential `store-password`.
- **Numbered migrations** like SQLite's (`PG_MIGRATIONS`, recorded in `schema_version`), each
  run in one transaction under an advisory lock, so gateways starting together migrate once.
- **Group commit**: `accept_batch` is one transaction per batch, as on SQLite, incidents
  opened and attached in it.
- **Shared forwarding**: `due_for` claims the rows it returns (`FOR UPDATE SKIP LOCKED`, then
  a lease of `claim_ms` recorded in the row), so gateways on several hosts forwarding the same
  outbox each get other deliveries. A claim ends with the delivery's outcome (delivered,
  failed, refused); the claim of an instance that died lapses after `claim_ms` and another
  instance sends it (a duplicate at worst, which the centres' idempotency keys absorb).
- **Failover**: a lost connection is `StoreUnavailable` (a `StoreError` and a
  `ConnectionError`: the intake retries its batch, health reports it). Every connection is then
  dropped, and the next call connects again with backoff, through the URL's hosts in order:
  with `target_session_attrs=read-write` that is whichever host is the primary now.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from ansimi.privacy import key_source
from gateway.enrolments import (
    DEFAULT_TTL_S,
    EnrolmentError,
    Pending,
    hash_token,
    new_token,
)
from gateway.incidents import (
    HistoryEntry,
    Incident,
    OpenIncident,
    Priorities,
    about_a_district,
    decide_incidents,
)
from gateway.store import (
    ADD_ROLLOUT_DEVICE_SQL,
    CONFIG_LAYERS_SQL,
    FOREIGN_ID,
    FOREIGN_REF,
    INCIDENT_COLUMNS,
    INCIDENT_STAGE_ORDER,
    NEW_DEVICE_COLUMNS,
    OFFER_ROLLOUT_SQL,
    OPEN_INCIDENT_COLUMNS,
    OPEN_INCIDENT_INDEXES,
    OPEN_OUTAGE_PER_DISTRICT,
    OUTAGE_DISTRICT_COLUMN,
    PURGE_BATCH,
    ROLLOUT_COLUMNS,
    ROLLOUT_DEVICES_SQL,
    SEALED_TO_KEY_BACKFILL,
    SET_CONFIG_LAYER_SQL,
    SETTLE_ROLLOUT_SQL,
    STAGE_ORDER,
    START_ROLLOUT_SQL,
    TEST_RECORDS_SQL,
    Accepted,
    BadStoreUrl,
    ConfigLayer,
    ConfigScope,
    Delivery,
    Device,
    DeviceKind,
    DeviceUpdate,
    DuplicateDevice,
    Event,
    EventState,
    Incoming,
    RolloutPhase,
    RolloutRecord,
    StoreConflict,
    StoreError,
    StoreFull,
    StoreUnavailable,
    StoreVersionError,
    TestRecord,
    UnknownEvent,
    UpdateOutcome,
    Waiting,
    check_completion,
    config_layer,
    delivery_filter,
    delivery_from_row,
    device_from_row,
    device_update_from_row,
    device_update_values,
    enrolled_device,
    enrolment_for,
    event_from_row,
    events_behind,
    history_detail,
    history_from_rows,
    incidents_with_stages,
    issued_enrolment,
    move_rollout_sql,
    new_device_values,
    opened_enrolment,
    pending_from_row,
    report_update_args,
    rollout_from_row,
    rollout_values,
    test_records_of,
    ticks_from_rows,
)

T = TypeVar("T")

POSTGRES_SCHEMES: Final = ("postgresql", "postgres")
# the systemd credential (LoadCredential=store-password:/etc/ansimi/credstore/store-password)
PASSWORD_CREDENTIAL: Final = "store-password"  # noqa: S105  (a name, not a password)
# how long a forwarding claim holds a delivery for its instance: longer than one attempt
# (the forwarder claims only what it starts at once; its own next round renews what is
# still in flight). It is also how long an alert claimed by an instance whose host died or
# lost its network waits for another: three default attempts (forward.timeout_s, 5 s), not
# a minute. A slower centre costs at worst a duplicate, which its idempotency key absorbs.
CLAIM_MS: Final = 15_000
# reconnecting: first wait, longest wait, and how long one call keeps trying before it
# raises StoreUnavailable (the intake then retries its batch: it never drops one)
RECONNECT_FIRST_S: Final = 0.05
RECONNECT_MAX_S: Final = 2.0
RECONNECT_BUDGET_S: Final = 5.0
# a statement that gets no answer (a black-holed link) is given up after this
COMMAND_TIMEOUT_S: Final = 30.0
# The server ends a session left in an open transaction this long: an instance whose host
# was cut off mid-transaction otherwise holds its row locks (an alert id it was inserting,
# which the bell's resend to another instance then waits on) until TCP notices, hours later.
# Our transactions only ever wait for their own statements, so 10 s idle means gone.
IDLE_IN_TRANSACTION_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 5.0
# serialises migrations of gateways starting at once (any constant, the same for all)
_MIGRATION_LOCK: Final = 0x616E73696D69  # "ansimi"
# the first key of a district's lock (pg_advisory_xact_lock(key, hashtext(district))): the
# two-key locks are apart from the one-key migration lock
_OUTAGE_LOCK: Final = 0x6F757467  # "outg"

_SCHEMA_1 = """
CREATE TABLE devices (
    device_id    TEXT PRIMARY KEY,
    public_key   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    district     TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    revoked      BOOLEAN NOT NULL DEFAULT FALSE,
    revoked_ms   BIGINT,
    high_water   BIGINT,
    created_ms   BIGINT NOT NULL,
    last_seen_ms BIGINT,
    online       BOOLEAN,
    power        TEXT
);
-- no reference to devices: the gateway's own events (disk_low) name the gateway
CREATE TABLE events (
    event_id      TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    type          TEXT NOT NULL,
    ts_ms         BIGINT NOT NULL,
    received_ms   BIGINT NOT NULL,
    body          TEXT NOT NULL,
    jws           TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'received',
    clock_skew_ms BIGINT,
    kept_order    BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX events_by_state ON events(state, received_ms);
CREATE TABLE event_ids (
    event_id  TEXT PRIMARY KEY,
    device_id TEXT NOT NULL
);
CREATE TABLE outbox (
    event_id        TEXT NOT NULL REFERENCES events(event_id),
    centre          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    last_error      TEXT,
    delivered_ms    BIGINT,
    refused_ms      BIGINT,
    kept_order      BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (event_id, centre)
);
CREATE INDEX outbox_due_by_centre ON outbox(centre, next_attempt_ms)
    WHERE delivered_ms IS NULL;
CREATE TABLE stages (
    event_id TEXT NOT NULL REFERENCES events(event_id),
    stage    TEXT NOT NULL,
    at_ms    BIGINT NOT NULL,
    actor    TEXT NOT NULL,
    PRIMARY KEY (event_id, stage)
);
CREATE TABLE device_private (
    device_id  TEXT PRIMARY KEY REFERENCES devices(device_id),
    sealed     TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE enrolments (
    token_hash   TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    district     TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    rotate       BOOLEAN NOT NULL DEFAULT FALSE,
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    used_ms      BIGINT,
    cancelled_ms BIGINT,
    serial       TEXT,
    kept_order   BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX enrolments_by_device ON enrolments(device_id, created_ms);
"""

# which instance is sending a delivery, and until when the others leave it alone
_CLAIMS = """
ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
ALTER TABLE outbox ADD COLUMN claim_until_ms BIGINT;
"""

# Incidents, as SQLite's migration 6 (gateway/incidents.py, docs/incidents.md). At most one
# open incident per bell, held by a partial unique index, so two instances cannot both open one.
_INCIDENTS = """
CREATE TABLE incidents (
    incident_id      TEXT PRIMARY KEY,
    device_id        TEXT NOT NULL REFERENCES devices(device_id),
    kind             TEXT NOT NULL,
    priority         INTEGER NOT NULL,
    state            TEXT NOT NULL DEFAULT 'new',
    opened_ms        BIGINT NOT NULL,
    updated_ms       BIGINT NOT NULL,
    first_alert_id   TEXT,
    last_alert_id    TEXT,
    events           INTEGER NOT NULL DEFAULT 0,
    offline          BOOLEAN NOT NULL DEFAULT FALSE,
    escalation_level INTEGER NOT NULL DEFAULT 0,
    escalated_to     TEXT NOT NULL DEFAULT '[]',
    outcome          TEXT
);
CREATE UNIQUE INDEX incidents_one_open ON incidents(device_id) WHERE state != 'closed';
CREATE INDEX incidents_by_state ON incidents(state, priority, opened_ms);
CREATE TABLE incident_events (
    event_id     TEXT PRIMARY KEY,
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id)
);
CREATE INDEX incident_events_by_incident ON incident_events(incident_id);
CREATE TABLE incident_stages (
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id),
    stage        TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    actor        TEXT NOT NULL,
    PRIMARY KEY (incident_id, stage)
);
CREATE TABLE incident_ticks (
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id),
    step         TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    actor        TEXT NOT NULL,
    PRIMARY KEY (incident_id, step)
);
CREATE TABLE incident_history (
    incident_id  TEXT NOT NULL REFERENCES incidents(incident_id),
    at_ms        BIGINT NOT NULL,
    what         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    event_id     TEXT,
    detail       TEXT NOT NULL,
    kept_order   BIGINT GENERATED ALWAYS AS IDENTITY  -- SQLite's rowid: entries of one ms in order
);
CREATE INDEX incident_history_by_incident ON incident_history(incident_id, at_ms);
"""

# which gateway instance holds a device's live video stream, as SQLite's migration 5
_VIDEO_STREAMS = """
CREATE TABLE video_streams (
    device_id   TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    session     TEXT NOT NULL,
    since_ms    BIGINT NOT NULL
);
"""

_REMOTE_CONFIG = """
CREATE TABLE config_layers (
    scope       TEXT NOT NULL CHECK (scope IN ('site', 'district', 'device')),
    name        TEXT NOT NULL,
    patch_json  TEXT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    PRIMARY KEY (scope, name)
);
CREATE TABLE config_reported (
    device_id    TEXT PRIMARY KEY,
    config_hash  TEXT NOT NULL,
    reported_ms  BIGINT NOT NULL
);
"""

# agent rollouts, as SQLite's migration 8; kept_order is SQLite's rowid (the newest is current)
_ROLLOUTS = """
CREATE TABLE rollouts (
    rollout_id      TEXT PRIMARY KEY,
    version         TEXT NOT NULL,
    district        TEXT NOT NULL,
    percent         DOUBLE PRECISION NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('running', 'paused', 'aborted', 'done')),
    started_ms      BIGINT NOT NULL,
    paused_because  TEXT,
    kept_order      BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE UNIQUE INDEX rollouts_one_live ON rollouts((1)) WHERE state IN ('running', 'paused');
CREATE TABLE rollout_devices (
    rollout_id  TEXT NOT NULL REFERENCES rollouts(rollout_id),
    device_id   TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'offered', 'installed', 'failed')),
    at_ms       BIGINT NOT NULL DEFAULT 0,
    offers      INTEGER NOT NULL DEFAULT 0,
    reason      TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
"""

_SEALED_TO_KEY = f"""
ALTER TABLE config_layers ADD COLUMN sealed_to_key TEXT;
{SEALED_TO_KEY_BACKFILL};
"""

# Numbered like SQLite's MIGRATIONS (never edit one that has shipped: add the next). Version 1
# is SQLite's version 4 in PostgreSQL's types: no PostgreSQL store predates it.
PG_MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (1, "the schema of SQLite's version 4", _SCHEMA_1),
    (2, "forwarding claims shared by the instances", _CLAIMS),
    (3, "incidents", _INCIDENTS),
    (4, "live video stream claims", _VIDEO_STREAMS),
    (5, "remote configuration (SQLite's version 7)", _REMOTE_CONFIG),
    (6, "agent rollouts (SQLite's version 8)", _ROLLOUTS),
    (7, "a district outage open beside its first bell's own (SQLite's 9)", OPEN_INCIDENT_INDEXES),
    (8, "the key a device layer's SMS numbers were sealed to (SQLite's 10)", _SEALED_TO_KEY),
    (
        9,
        "one open outage per district, whichever instance told it (SQLite's 11)",
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {};".format(*OUTAGE_DISTRICT_COLUMN)
        + OPEN_OUTAGE_PER_DISTRICT,
    ),
)
PG_SCHEMA_VERSION: Final = PG_MIGRATIONS[-1][0]

_REVOKE = (
    "UPDATE devices SET revoked = TRUE, revoked_ms = COALESCE(revoked_ms, $1) WHERE device_id = $2"
)
_DEVICE_COLUMNS = (
    "device_id, public_key, kind, district, label, revoked, high_water,"
    " last_seen_ms, online, power, revoked_ms"
)
_ENROLMENT_COLUMNS = (
    "device_id, kind, district, label, rotate, created_ms, expires_ms, used_ms,"
    " cancelled_ms, serial"
)
_EVENT_SELECT = (
    "SELECT e.event_id, e.device_id, e.type, e.ts_ms, e.received_ms, e.body, e.state,"
    " (SELECT COUNT(*) FROM outbox o WHERE o.event_id = e.event_id"
    "  AND o.delivered_ms IS NULL) FROM events e"
)
# errors that mean "no usable connection to a primary": try again, elsewhere if need be
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # the connection was closed under us
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutdown, crash, cannot connect now
    asyncpg.ReadOnlySQLTransactionError,  # a primary demoted to a standby under us
    asyncpg.exceptions.InternalClientError,  # no host matched target_session_attrs
)


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as columns, for `unnest($1::type[], ...)`: one array a column."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


@dataclass
class _Decided:
    """What a batch does, decided in order before anything is written (see `_decide`)."""

    fresh: list[bool] = field(default_factory=list)
    refused: list[str | None] = field(default_factory=list)
    came_online: list[str] = field(default_factory=list)
    insert: list[int] = field(default_factory=list)  # positions of events to keep
    # per device: (device id, highest sequence number, last power reported), one row each
    # (an UPDATE ... FROM joining one row twice would apply only one of them)
    device_updates: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)


def _decide(
    batch: Sequence[Incoming],
    devices: dict[str, tuple[bool | None, str | None]],
    owners: dict[str, str],
    known: set[str],
) -> _Decided:
    """SqliteDatabase.accept_batch's decisions, message by message, on the rows read first:
    `devices` (online, power), `owners` (event_ids) and `known` event ids are updated as each
    message would have changed them, so a later message sees what an earlier one did."""
    decided = _Decided()
    for position, item in enumerate(batch):
        was_online, old_power = devices.get(item.device_id, (None, None))
        if item.device_id in devices:
            devices[item.device_id] = (True, old_power if item.power is None else item.power)
        _, seq, power = decided.device_updates.get(item.device_id, (item.device_id, item.seq, None))
        decided.device_updates[item.device_id] = (
            item.device_id,
            max(seq, item.seq),
            power if item.power is None else item.power,
        )
        if was_online is False and item.device_id not in decided.came_online:
            decided.came_online.append(item.device_id)
        power_changed = item.power is not None and old_power not in (None, item.power)
        if not (item.kept or power_changed):
            decided.fresh.append(True)
            decided.refused.append(None)
            continue
        foreign = {
            i
            for i in (item.event_id, *item.refs)
            if owners.get(i, item.device_id) != item.device_id
        }
        refusal = None
        if foreign & set(item.refs):
            refusal = FOREIGN_REF
        elif item.event_id in foreign:
            refusal = FOREIGN_ID
        inserted = refusal is None and item.event_id not in known
        if inserted:
            known.add(item.event_id)
            decided.insert.append(position)
            for named in (item.event_id, *item.refs):
                owners.setdefault(named, item.device_id)
        decided.fresh.append(inserted)
        decided.refused.append(refusal)
    return decided


async def _history(
    db: asyncpg.Connection,
    incident_id: str,
    at_ms: int,
    what: str,
    actor: str,
    event_id: str | None,
    **detail: object,
) -> None:
    await db.execute(
        "INSERT INTO incident_history (incident_id, at_ms, what, actor, event_id, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        incident_id,
        at_ms,
        what,
        actor,
        event_id,
        history_detail(detail),
    )


def _count(status: str) -> int:
    """The row count of a command status (`UPDATE 3`, `INSERT 0 2`)."""
    return int(status.rsplit(" ", 1)[-1])


def pg_error(exc: BaseException, where: str) -> StoreError | None:
    """The store's error for a driver or network one; None for anything else (a store or
    enrolment error raised on purpose goes through as it is)."""
    if isinstance(exc, StoreError | EnrolmentError):  # decisions, not failures
        return None
    text = f"{where}: {type(exc).__name__}: {exc}"
    if isinstance(exc, asyncpg.DiskFullError):
        return StoreFull(f"{text}. Fix: free space on the database server")
    if isinstance(
        exc,
        asyncpg.DeadlockDetectedError | asyncpg.LockNotAvailableError | asyncpg.SerializationError,
    ):
        return StoreConflict(f"{text}: another instance held the rows")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"{text}. The store reconnects by itself")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(text)
    return None


def postgres_url_problem(url: str) -> str | None:
    """Why a `postgresql://` store URL cannot be used, or None. A password in it is refused:
    gateway.toml is readable by more people than the password should be."""
    parts = urlsplit(url)
    if "@" in parts.netloc and ":" in parts.netloc.rpartition("@")[0]:
        return "it holds a password"
    if "password" in parse_qs(parts.query):
        return "it holds a password"
    if not parts.netloc.rpartition("@")[2]:
        return "no host named"
    if not parts.path.strip("/"):
        return "no database named"
    return None


def _password_hint(url: str) -> str:
    # the URL shown without its password, nor its query (which may hold one)
    parts = urlsplit(url)
    user, _, hosts = parts.netloc.rpartition("@")
    user = user.partition(":")[0]
    hidden = f"{parts.scheme}://{user}{'@' if user else ''}{hosts}{parts.path}"
    hidden += "?..." if parts.query else ""
    return (
        f"store URL {hidden!r} holds a password: gateway.toml is no place for it. Fix: remove it "
        "from `store`, and put it in a file of mode 0600 named by `store_password_file`, or in "
        f"the systemd credential `{PASSWORD_CREDENTIAL}` (LoadCredential=)"
    )


def check_postgres_url(url: str) -> None:
    problem = postgres_url_problem(url)
    if problem == "it holds a password":
        raise BadStoreUrl(url, problem, message=_password_hint(url))
    if problem is not None:
        raise BadStoreUrl(url, problem)


def read_password(password_file: Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """The store's password: the systemd credential wins over `store_password_file`; None
    when neither is given (trust, peer or a client certificate authenticates then)."""
    path, _from_credential = key_source(password_file or Path(), PASSWORD_CREDENTIAL, env)
    if path == Path():
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise StoreError(
            f"cannot read the store password {path}: {exc.strerror}. Fix: check "
            "`store_password_file` in gateway.toml, and that the service user may read it"
        ) from exc


class PostgresStore:
    """The async store on PostgreSQL (see the module's docstring). Connects on first use, so
    it is opened like the SQLite store, without an event loop."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        priorities: Mapping[str, int] | None = None,
        claim_ms: int = CLAIM_MS,
        reconnect_budget_s: float = RECONNECT_BUDGET_S,
        pool_size: int = 4,
        clock: Callable[[], float] = time.monotonic,
        idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S,
    ) -> None:
        check_postgres_url(url)
        self.url = url
        self._password = password
        self._claim_ms = claim_ms
        # an attached event upgrades its incident when its kind is more urgent by these
        self._priority = Priorities(priorities)
        self._reconnect_budget_s = reconnect_budget_s
        self._pool_size = pool_size
        self._clock = clock
        self._idle_in_transaction_ms = str(round(idle_in_transaction_s * 1000))
        # reconnecting: since when the server has been unreachable (None: it is not), when
        # the next call may try again, and the backoff's next wait
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = RECONNECT_FIRST_S
        # names this instance's forwarding claims; readable by an operator looking at them
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        # where errors say they came from: the URL with no secrets (it holds none)
        self._where = url

    # ---- connections ---------------------------------------------------------------------

    async def _ready(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                pool = asyncpg.create_pool(
                    self.url,
                    password=self._password,
                    min_size=0,  # connect on demand: open_store needs no running database
                    max_size=self._pool_size,
                    command_timeout=COMMAND_TIMEOUT_S,
                    timeout=CONNECT_TIMEOUT_S,
                    server_settings={
                        "idle_in_transaction_session_timeout": self._idle_in_transaction_ms
                    },
                )
                await pool
                try:
                    await self._with_connection(pool, self._migrate)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            return self._pool

    async def _with_connection(
        self, pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        """Run `work` on a pooled connection.

        Connecting is retried with backoff for up to `reconnect_budget_s` (nothing was sent
        yet), long enough to ride a promotion. A store that used up that budget is *down*:
        until its next try (backoff, up to RECONNECT_MAX_S) every call fails at once, so the
        intake's one-by-one fallback after a failed group commit does not wait the budget
        per message. Once `work` has begun, a lost connection is StoreUnavailable at once
        (a commit's outcome is unknown then; every caller's work is safe to do again).
        """
        now = self._clock()
        if self._down_since is not None and now < self._next_try:
            raise StoreUnavailable(
                f"{self._where}: unreachable for {now - self._down_since:.1f} s, not tried "
                f"again for {self._next_try - now:.1f} s. The store reconnects by itself"
            )
        # a store already down tries once; a healthy one rides out a short outage
        budget = 0.0 if self._down_since is not None else self._reconnect_budget_s
        waited = 0.0
        while True:
            try:
                connection = await pool.acquire()
            except Exception as exc:
                error = pg_error(exc, self._where)
                if not isinstance(error, StoreUnavailable):
                    raise error or exc from exc
                if waited + self._delay > budget:
                    self._went_down()
                    raise error from exc
                pause = self._delay * random.uniform(0.5, 1.0)
                await asyncio.sleep(pause)
                waited += pause
                self._delay = min(self._delay * 2, RECONNECT_MAX_S)
                continue
            self._down_since = None
            self._delay = RECONNECT_FIRST_S
            try:
                return await work(connection)
            except Exception as exc:
                error = pg_error(exc, self._where)
                if error is None:
                    raise
                if isinstance(error, StoreUnavailable):
                    # the other pooled connections went to the same lost (or demoted) server
                    await pool.expire_connections()
                raise error from exc
            finally:
                await pool.release(connection)

    def _went_down(self) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        self._next_try = now + self._delay
        self._delay = min(self._delay * 2, RECONNECT_MAX_S)

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        return await self._with_connection(await self._ready(), work)

    async def _tx(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`work` in one transaction."""

        async def in_transaction(connection: asyncpg.Connection) -> T:
            async with connection.transaction():
                return await work(connection)

        return await self._run(in_transaction)

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async def fetch(connection: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await connection.fetch(sql, *args)
            return rows

        return await self._run(fetch)

    async def _migrate(self, connection: asyncpg.Connection) -> None:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            found = await connection.fetchval("SELECT MAX(version) FROM schema_version") or 0
            if found > PG_SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{self._where}: schema version {found} was written by a newer gateway "
                    f"(this one knows up to {PG_SCHEMA_VERSION}). Fix: run that newer "
                    "gateway, or restore a backup"
                )
            for version, _what, sql in PG_MIGRATIONS:
                if found < version:
                    await connection.execute(sql)
            if found < PG_SCHEMA_VERSION:
                await connection.execute("DELETE FROM schema_version")
                await connection.execute(
                    "INSERT INTO schema_version VALUES ($1)", PG_SCHEMA_VERSION
                )

    async def schema_version(self) -> int:
        rows = await self._fetch("SELECT MAX(version) FROM schema_version")
        return int(rows[0][0])

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # ---- devices ---------------------------------------------------------------------------

    async def add_device(self, device: Device, now_ms: int) -> None:
        async def work(db: asyncpg.Connection) -> None:
            status = await db.execute(
                f"INSERT INTO devices ({NEW_DEVICE_COLUMNS})"  # noqa: S608
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                *new_device_values(device, now_ms),
            )
            if _count(status) == 0:
                raise DuplicateDevice(device.device_id)

        await self._tx(work)

    async def device(self, device_id: str) -> Device | None:
        rows = await self._fetch(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = $1",  # noqa: S608
            device_id,
        )
        return device_from_row(tuple(rows[0])) if rows else None

    async def devices(self) -> list[Device]:
        rows = await self._fetch(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")  # noqa: S608
        return [device_from_row(tuple(r)) for r in rows]

    async def revoke(self, device_id: str, now_ms: int) -> bool:
        async def work(db: asyncpg.Connection) -> bool:
            return _count(await db.execute(_REVOKE, now_ms, device_id)) == 1

        return await self._tx(work)

    # ---- intake and supervision --------------------------------------------------------------

    async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
        """As `SqliteDatabase.accept_batch`, in one transaction (group commit), and in four
        round trips whatever the batch's size: the rows it depends on are read (and the
        devices locked) first, the batch is decided in order here exactly as SQLite decides
        it message by message, and what it keeps is written in one statement per table."""

        async def work(db: asyncpg.Connection) -> Accepted:
            # every device row of the batch locked up front, in one order: two instances
            # taking batches of the same devices wait for each other instead of deadlocking
            # (NO KEY: see `_attach`)
            rows = await db.fetch(
                "SELECT device_id, online, power FROM devices WHERE device_id = ANY($1::text[])"
                " ORDER BY device_id FOR NO KEY UPDATE",
                sorted({item.device_id for item in batch}),
            )
            devices: dict[str, tuple[bool | None, str | None]] = {
                r["device_id"]: (r["online"], r["power"]) for r in rows
            }
            ids = sorted({i for item in batch for i in (item.event_id, *item.refs)})
            owners = {
                r["event_id"]: r["device_id"]
                for r in await db.fetch(
                    "SELECT event_id, device_id FROM event_ids WHERE event_id = ANY($1::text[])",
                    ids,
                )
            }
            known = {
                r["event_id"]
                for r in await db.fetch(
                    "SELECT event_id FROM events WHERE event_id = ANY($1::text[])",
                    [item.event_id for item in batch],
                )
            }
            decided = _decide(batch, devices, owners, known)
            caught_up: dict[str, str] = {}
            kept = await self._insert_events(
                db, [batch[i] for i in decided.insert], now_ms, caught_up
            )
            await db.execute(
                "UPDATE devices d SET high_water = GREATEST(COALESCE(d.high_water, -1), u.seq),"
                " last_seen_ms = GREATEST(COALESCE(d.last_seen_ms, 0), $4), online = TRUE,"
                " power = COALESCE(u.power, d.power)"
                " FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(device_id, seq, power)"
                " WHERE d.device_id = u.device_id",
                *_columns(list(decided.device_updates.values()), 3),
                now_ms,
            )
            inserting = set(decided.insert)
            # an event another instance kept meanwhile is a resend after all
            fresh = [
                batch[i].event_id in kept if i in inserting else new
                for i, new in enumerate(decided.fresh)
            ]
            forwarded = [
                i in inserting and fresh[i] and bool(item.centres) for i, item in enumerate(batch)
            ]
            return Accepted(fresh, forwarded, decided.came_online, decided.refused, caught_up)

        return await self._tx(work)

    async def _insert_events(
        self,
        db: asyncpg.Connection,
        items: Sequence[Incoming],
        now_ms: int,
        caught_up: dict[str, str] | None = None,
    ) -> set[str]:
        """Insert these events, their deliveries and their ids' ownership in one statement,
        then attach each one kept to its incident (`_attach`), in the same transaction; the
        ids actually inserted (another instance may have kept one meanwhile). `caught_up`
        gets the stage of an incident an alert joined that the desk has moved on."""
        if not items:
            return set()
        events = _columns(
            [
                (
                    i.event_id,
                    i.device_id,
                    i.seq,
                    i.type,
                    i.ts_ms,
                    i.body_json,
                    i.jws,
                    i.clock_skew_ms,
                )
                for i in items
            ],
            8,
        )
        deliveries = _columns([(i.event_id, c) for i in items for c in i.centres], 2)
        claims = _columns(
            [(i.event_id, named, i.device_id) for i in items for named in (i.event_id, *i.refs)],
            3,
        )
        rows = await db.fetch(
            """
            WITH kept AS (
                INSERT INTO events (event_id, device_id, seq, type, ts_ms, received_ms, body,
                                    jws, clock_skew_ms)
                SELECT e.event_id, e.device_id, e.seq, e.type, e.ts_ms, $9, e.body, e.jws, e.skew
                FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                            $6::text[], $7::text[], $8::bigint[])
                     WITH ORDINALITY AS e(event_id, device_id, seq, type, ts_ms, body, jws,
                                          skew, n)
                ORDER BY e.n
                ON CONFLICT DO NOTHING RETURNING event_id
            ), deliveries AS (
                INSERT INTO outbox (event_id, centre, next_attempt_ms)
                SELECT o.event_id, o.centre, $9
                FROM unnest($10::text[], $11::text[]) AS o(event_id, centre)
                JOIN kept USING (event_id)
            ), owned AS (
                -- in batch order: an id two of the batch's events name is the first one's
                INSERT INTO event_ids (event_id, device_id)
                SELECT DISTINCT ON (c.named) c.named, c.device_id
                FROM unnest($12::text[], $13::text[], $14::text[]) WITH ORDINALITY
                     AS c(event_id, named, device_id, n)
                JOIN kept USING (event_id)
                ORDER BY c.named, c.n
                ON CONFLICT DO NOTHING
            )
            SELECT event_id FROM kept
            """,
            *events,
            now_ms,
            *deliveries,
            *claims,
        )
        kept = {r["event_id"] for r in rows}
        await self._attach([i for i in items if i.event_id in kept], db, now_ms, caught_up)
        return kept

    # ---- incidents -------------------------------------------------------------------------

    async def _attach(
        self,
        items: Sequence[Incoming],
        db: asyncpg.Connection,
        now_ms: int,
        caught_up: dict[str, str] | None,
    ) -> None:
        """As `SqliteDatabase._attach` for each kept event in order, in the transaction that
        keeps them and in a fixed number of round trips: the bells' rows (locked, in one
        order: accept_batch holds them already) and open incidents are read first, the
        events are decided one after another (`decide_incidents`, as on SQLite), and what changed
        is written in one statement a table."""
        items = [i for i in items if i.type != "escalation"]  # attached by `escalate`
        if not items:
            return
        # Not FOR UPDATE: an incident row referring to a device (an outage, told about its
        # district's first bell) that a transaction changes a second time has its reference
        # checked again (PostgreSQL does for a row the transaction wrote itself) with a
        # key-share lock on the device's row, which FOR UPDATE blocks: two instances marking
        # their bells offline into one outage waited for each other, the one holding the
        # outage's first bell and the one holding the outage. Nothing here changes a
        # device's key, so NO KEY UPDATE serialises the same decisions.
        devices = await db.fetch(
            "SELECT device_id, kind, district FROM devices WHERE device_id = ANY($1::text[])"
            " ORDER BY device_id FOR NO KEY UPDATE",
            sorted({i.device_id for i in items}),
        )
        bells = {r["device_id"]: (str(r["kind"]), str(r["district"])) for r in devices}
        # Another instance may be telling the same district's outage now (each supervisor
        # groups its own bells, about its own first bell): the district's statuses wait for
        # each other here, so the second finds the first's outage committed and joins it
        # instead of opening one the unique index would refuse. After the bells' rows, as
        # every transaction takes them, and in one order: no deadlock.
        told = sorted(
            {
                bells[i.device_id][1]
                for i in items
                if i.device_id in bells and about_a_district(i.type, i.body_json, None)
            }
        )
        if told:
            await db.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(d))"
                " FROM (SELECT unnest($2::text[]) AS d ORDER BY 1) AS told",
                _OUTAGE_LOCK,
                told,
            )
        own = {
            r["device_id"]: OpenIncident(*r)
            for r in await db.fetch(
                f"SELECT {OPEN_INCIDENT_COLUMNS}"
                " WHERE i.device_id = ANY($1::text[]) AND i.state != 'closed'"
                " AND i.kind != 'district_outage' FOR UPDATE",
                list(bells),
            )
        }
        # the districts' open outages (one each; one still dark first), which a bell going
        # offline joins and the district's statuses attach to
        outages: dict[str, OpenIncident] = {}
        for r in await db.fetch(
            f"SELECT {OPEN_INCIDENT_COLUMNS} WHERE i.kind = 'district_outage'"
            " AND i.state != 'closed' AND i.district = ANY($1::text[]) FOR UPDATE",
            sorted({district for _, district in bells.values()}),
        ):
            outages[str(r["district"])] = OpenIncident(*r)
        decided = decide_incidents(items, bells, own, outages, self._priority, now_ms)
        if caught_up is not None:
            caught_up.update(decided.caught_up)
        touched = [i for i in (*own.values(), *outages.values()) if i.events_added]
        rows = [
            (
                i.incident_id,
                i.device_id,
                i.kind,
                i.priority,
                i.updated_ms,
                i.events,
                i.first_alert_id,
                i.last_alert_id,
                i.offline,
                i.district,
            )
            for i in touched
        ]
        await db.execute(
            "INSERT INTO incidents (incident_id, device_id, kind, priority, opened_ms,"
            " updated_ms, first_alert_id, last_alert_id, events, offline, district)"
            " SELECT u.incident_id, u.device_id, u.kind, u.priority, u.updated_ms, u.updated_ms,"
            "  u.first_alert_id, u.last_alert_id, u.events, u.offline, u.district"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],"
            "  $6::int[], $7::text[], $8::text[], $9::boolean[], $10::text[]) AS u(incident_id,"
            "  device_id, kind, priority, updated_ms, events, first_alert_id, last_alert_id,"
            "  offline, district)"
            " ON CONFLICT (incident_id) DO UPDATE SET kind = excluded.kind,"
            " priority = excluded.priority, updated_ms = excluded.updated_ms,"
            " events = excluded.events, first_alert_id = excluded.first_alert_id,"
            " last_alert_id = excluded.last_alert_id, offline = excluded.offline",
            *_columns(rows, 10),
        )
        reopened = [i.incident_id for i in touched if i.reopened]
        if reopened:
            await db.execute(
                "UPDATE incidents SET state = 'new', opened_ms = $2, escalation_level = 0,"
                " escalated_to = '[]' WHERE incident_id = ANY($1::text[])",
                reopened,
                now_ms,
            )
            await db.execute(
                "DELETE FROM incident_stages WHERE incident_id = ANY($1::text[])", reopened
            )
        await db.execute(
            "INSERT INTO incident_events SELECT * FROM unnest($1::text[], $2::text[])"
            " ON CONFLICT DO NOTHING",
            *_columns(decided.attached, 2),
        )
        await db.execute(
            "INSERT INTO incident_history (incident_id, at_ms, what, actor, event_id, detail)"
            " SELECT h.incident_id, $1, h.what, h.actor, h.event_id, h.detail"
            " FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])"
            "  WITH ORDINALITY AS h(incident_id, what, actor, event_id, detail, n)"
            " ORDER BY h.n",
            now_ms,
            *_columns([(*h[:4], history_detail(h[4])) for h in decided.history], 5),
        )

    async def incidents(
        self, state: str | None, limit: int, districts: Sequence[str] | None = None
    ) -> list[Incident]:
        """By priority then age; `state` one of the incident states, `open` (all but
        closed) or None (all); `districts`: only theirs (None: every district)."""
        conditions: list[str] = []
        args: list[object] = []
        if state == "open":
            conditions.append("i.state != 'closed'")
        elif state is not None:
            args.append(state)
            conditions.append(f"i.state = ${len(args)}")
        if districts is not None:
            args.append(list(districts))
            conditions.append(f"d.district = ANY(${len(args)}::text[])")
        args.append(limit)
        where = " AND ".join(conditions) or "TRUE"
        rows = await self._fetch(
            f"SELECT {INCIDENT_COLUMNS} WHERE {where}"
            f" ORDER BY i.priority, i.opened_ms LIMIT ${len(args)}",
            *args,
        )
        return await self._with_stages(rows)

    async def _with_stages(self, rows: Sequence[asyncpg.Record]) -> list[Incident]:
        ids = [str(r[0]) for r in rows]
        stage_rows = (
            await self._fetch(
                "SELECT incident_id, stage, at_ms, actor FROM incident_stages"
                " WHERE incident_id = ANY($1::text[]) ORDER BY at_ms",
                ids,
            )
            if ids
            else []
        )
        return incidents_with_stages(rows, stage_rows)

    async def incident(self, incident_id: str) -> Incident | None:
        rows = await self._fetch(
            f"SELECT {INCIDENT_COLUMNS} WHERE i.incident_id = $1",
            incident_id,
        )
        found = await self._with_stages(rows)
        return found[0] if found else None

    async def incident_of(self, event_id: str) -> str | None:
        rows = await self._fetch(
            "SELECT incident_id FROM incident_events WHERE event_id = $1", event_id
        )
        return str(rows[0][0]) if rows else None

    async def incident_history(self, incident_id: str) -> list[HistoryEntry]:
        rows = await self._fetch(
            "SELECT at_ms, what, actor, event_id, detail FROM incident_history"
            " WHERE incident_id = $1 ORDER BY at_ms, kept_order",
            incident_id,
        )
        return history_from_rows(rows)

    async def incident_ticks(self, incident_id: str) -> dict[str, tuple[int, str]]:
        rows = await self._fetch(
            "SELECT step, at_ms, actor FROM incident_ticks WHERE incident_id = $1", incident_id
        )
        return ticks_from_rows(rows)

    async def move_incident(
        self, incident_id: str, stage: str, now_ms: int, actor: str, outcome: str | None = None
    ) -> bool:
        """As `SqliteDatabase.move_incident`: forward to `stage` with its events, in one
        transaction; False if it is already there or beyond."""

        async def work(db: asyncpg.Connection) -> bool:
            state = await db.fetchval(
                "SELECT state FROM incidents WHERE incident_id = $1 FOR UPDATE", incident_id
            )
            if state is None:
                raise UnknownEvent(incident_id)
            if INCIDENT_STAGE_ORDER[state] >= INCIDENT_STAGE_ORDER[stage]:
                return False
            await db.execute(
                "UPDATE incidents SET state = $1, outcome = COALESCE($2, outcome),"
                " updated_ms = $3 WHERE incident_id = $4",
                stage,
                outcome,
                now_ms,
                incident_id,
            )
            await db.execute(
                "INSERT INTO incident_stages VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                incident_id,
                stage,
                now_ms,
                actor,
            )
            extra = {"outcome": outcome} if outcome is not None else {}
            await _history(db, incident_id, now_ms, "stage", actor, None, stage=stage, **extra)
            # locked in event id order, as delivered_many locks them, so neither deadlocks
            attached = await db.fetch(
                "SELECT e.event_id, e.state FROM incident_events ie JOIN events e"
                " USING (event_id) WHERE ie.incident_id = $1 ORDER BY e.event_id FOR UPDATE OF e",
                incident_id,
            )
            events = events_behind(attached, stage)
            await db.execute(
                "UPDATE events SET state = $1 WHERE event_id = ANY($2::text[])", stage, events
            )
            await db.execute(
                "INSERT INTO stages SELECT e, $2, $3, $4 FROM unnest($1::text[]) AS e"
                " ON CONFLICT DO NOTHING",
                events,
                stage,
                now_ms,
                actor,
            )
            return True

        return await self._tx(work)

    async def tick_procedure(self, incident_id: str, step: str, now_ms: int, actor: str) -> bool:
        """Tick a checklist step; False if it was ticked already (the first tick stays)."""

        async def work(db: asyncpg.Connection) -> bool:
            ticked = _count(
                await db.execute(
                    "INSERT INTO incident_ticks VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    incident_id,
                    step,
                    now_ms,
                    actor,
                )
            )
            if ticked:
                await db.execute(
                    "UPDATE incidents SET updated_ms = GREATEST(updated_ms, $1)"
                    " WHERE incident_id = $2",
                    now_ms,
                    incident_id,
                )
                await _history(
                    db, incident_id, now_ms, "procedure", actor, None, step=step, done=True
                )
            return bool(ticked)

        return await self._tx(work)

    async def escalation_candidates(self, max_level: int) -> list[Incident]:
        """Incidents nobody acknowledged whose chain is not used up."""
        rows = await self._fetch(
            f"SELECT {INCIDENT_COLUMNS} WHERE i.state = 'new' AND i.escalation_level < $1"
            " ORDER BY i.priority, i.opened_ms",
            max_level,
        )
        return await self._with_stages(rows)

    async def escalate(
        self,
        incident_id: str,
        level: int,
        to: str,
        event: tuple[str, int, int, str, str],
        now_ms: int,
    ) -> bool:
        """As `SqliteDatabase.escalate`. The step is one conditional UPDATE (still new, at
        level - 1): an instance that waited on another's step finds the row moved on and
        takes none, so with several instances one takes each step."""
        event_id, seq, ts_ms, body_json, token = event

        async def work(db: asyncpg.Connection) -> bool:
            row = await db.fetchrow(
                "UPDATE incidents SET escalation_level = $2,"
                " escalated_to = (escalated_to::jsonb || to_jsonb($3::text))::text,"
                " updated_ms = GREATEST(updated_ms, $4), events = events + 1"
                " WHERE incident_id = $1 AND state = 'new' AND escalation_level = $2 - 1"
                " RETURNING device_id",
                incident_id,
                level,
                to,
                now_ms,
            )
            if row is None:
                return False
            item = Incoming(
                event_id, str(row[0]), seq, "escalation", ts_ms, body_json, token, (to,)
            )
            await self._insert_events(db, [item], now_ms)
            await db.execute(
                "INSERT INTO incident_events VALUES ($1, $2) ON CONFLICT DO NOTHING",
                event_id,
                incident_id,
            )
            await _history(
                db, incident_id, now_ms, "escalation", "gateway", event_id, level=level, to=to
            )
            return True

        return await self._tx(work)

    async def add_event(self, item: Incoming, now_ms: int) -> None:
        async def work(db: asyncpg.Connection) -> None:
            await self._insert_events(db, [item], now_ms)

        await self._tx(work)

    async def mark_offline(
        self, items: Sequence[Incoming], silent_since_ms: int, now_ms: int
    ) -> list[bool]:
        async def work(db: asyncpg.Connection) -> list[bool]:
            went: list[bool] = []
            for item in items:
                changed = _count(
                    await db.execute(
                        "UPDATE devices SET online = FALSE WHERE device_id = $1 AND online"
                        " AND COALESCE(last_seen_ms, 0) <= $2",
                        item.device_id,
                        silent_since_ms,
                    )
                )
                if changed:
                    await self._insert_events(db, [item], now_ms)
                went.append(bool(changed))
            return went

        return await self._tx(work)

    async def add_site_event(self, item: Incoming, now_ms: int) -> None:
        # events hold no reference to devices here, so the gateway's own event needs no
        # special treatment (SQLite turns its reference off for this one insert)
        await self.add_event(item, now_ms)

    # ---- forwarding --------------------------------------------------------------------------

    async def due_for(self, centre: str, now_ms: int, limit: int) -> list[Delivery]:
        """Deliveries to `centre` due by `now_ms`, oldest first, claimed for this instance:
        rows another instance holds (locked now, or claimed and not lapsed) are skipped, so
        instances sharing the outbox send disjoint deliveries. This instance's own claims
        come again (the forwarder asks again while a send is in flight)."""
        rows = await self._fetch(
            """
            WITH due AS (
                SELECT event_id, centre FROM outbox
                WHERE centre = $1 AND delivered_ms IS NULL AND refused_ms IS NULL
                  AND next_attempt_ms <= $2
                  AND (claimed_by IS NULL OR claimed_by = $4 OR claim_until_ms <= $2)
                ORDER BY next_attempt_ms, kept_order LIMIT $3
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE outbox o SET claimed_by = $4, claim_until_ms = $2 + $5
                FROM due WHERE o.event_id = due.event_id AND o.centre = due.centre
                RETURNING o.event_id, o.centre, o.attempts, o.next_attempt_ms, o.kept_order
            )
            SELECT c.event_id, c.centre, c.attempts, e.device_id, e.type, e.ts_ms, e.body,
                   e.jws, e.clock_skew_ms, i.incident_id, i.kind, i.priority
            FROM claimed c JOIN events e USING (event_id)
            LEFT JOIN incident_events ie ON ie.event_id = c.event_id
            LEFT JOIN incidents i ON i.incident_id = ie.incident_id
            ORDER BY c.next_attempt_ms, c.kept_order
            """,
            centre,
            now_ms,
            limit,
            self.instance,
            self._claim_ms,
        )
        return [delivery_from_row(tuple(row)) for row in rows]

    async def delivered_many(self, done: Sequence[tuple[str, str]], now_ms: int) -> list[bool]:
        """Mark deliveries done in one transaction (group commit), in two round trips; per
        (event id, centre) pair, True if it is the event's first delivery (the first pair
        of an event in `done` is, as on SQLite)."""
        event_ids, centres = _columns(done, 2)

        async def work(db: asyncpg.Connection) -> list[bool]:
            # the events locked in one order: two instances recording deliveries of the
            # same events (to different centres) wait for each other, never deadlock
            await db.execute(
                "SELECT 1 FROM events WHERE event_id = ANY($1::text[]) ORDER BY event_id"
                " FOR UPDATE",
                event_ids,
            )
            rows = await db.fetch(
                """
                WITH pairs AS (
                    SELECT * FROM unnest($2::text[], $3::text[]) WITH ORDINALITY
                        AS p(event_id, centre, n)
                ), sent AS (
                    UPDATE outbox o SET delivered_ms = $1, attempts = o.attempts + 1,
                                        claimed_by = NULL
                    FROM pairs WHERE o.event_id = pairs.event_id AND o.centre = pairs.centre
                      AND o.delivered_ms IS NULL
                ), firsts AS (
                    UPDATE events e SET state = 'delivered'
                    FROM (SELECT DISTINCT ON (event_id) event_id, centre, n FROM pairs
                          ORDER BY event_id, n) AS first
                    WHERE e.event_id = first.event_id AND e.state = 'received'
                    RETURNING e.event_id, first.centre, first.n
                ), staged AS (
                    INSERT INTO stages SELECT event_id, 'delivered', $1, centre FROM firsts
                    ON CONFLICT DO NOTHING
                )
                SELECT n FROM firsts
                """,
                now_ms,
                event_ids,
                centres,
            )
            first = {int(row["n"]) for row in rows}
            return [n in first for n in range(1, len(done) + 1)]

        return await self._tx(work)

    async def failed(self, event_id: str, centre: str, next_attempt_ms: int, error: str) -> None:
        # the claim ends: whichever instance is free at next_attempt_ms sends it
        await self._execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = $1, last_error = $2,"
            " claimed_by = NULL WHERE event_id = $3 AND centre = $4",
            next_attempt_ms,
            error[:500],
            event_id,
            centre,
        )

    async def refused(self, event_id: str, centre: str, now_ms: int, error: str) -> None:
        await self._execute(
            "UPDATE outbox SET attempts = attempts + 1, refused_ms = $1, last_error = $2,"
            " claimed_by = NULL WHERE event_id = $3 AND centre = $4 AND delivered_ms IS NULL",
            now_ms,
            error[:500],
            event_id,
            centre,
        )

    async def _execute(self, sql: str, *args: object) -> int:
        async def work(db: asyncpg.Connection) -> int:
            return _count(await db.execute(sql, *args))

        return await self._run(work)

    async def reroute(self, route: Callable[[str], Sequence[str]], now_ms: int) -> int:
        async def work(db: asyncpg.Connection) -> int:
            rows = await db.fetch(
                "SELECT e.event_id, d.district FROM events e JOIN devices d USING (device_id)"
                " WHERE e.state = 'received'"
            )
            added = 0
            for event_id, district in rows:
                added += _count(
                    await db.execute(
                        "INSERT INTO outbox (event_id, centre, next_attempt_ms)"
                        " SELECT $1, unnest($2::text[]), $3 ON CONFLICT DO NOTHING",
                        event_id,
                        list(route(str(district))),
                        now_ms,
                    )
                )
            return added

        return await self._tx(work)

    async def retry_refused(
        self,
        now_ms: int,
        *,
        centre: str | None = None,
        event_id: str | None = None,
        districts: Sequence[str] | None = None,
    ) -> int:
        where, args = delivery_filter(centre, event_id, districts, first=2)
        parked = (
            "SELECT o.event_id, o.centre FROM outbox o JOIN events e USING (event_id)"
            " JOIN devices d USING (device_id)"
            " WHERE o.delivered_ms IS NULL AND o.refused_ms IS NOT NULL"
        )
        return await self._execute(
            "UPDATE outbox SET refused_ms = NULL, next_attempt_ms = $1, claimed_by = NULL"  # noqa: S608
            f" WHERE (event_id, centre) IN ({parked}{where})",
            now_ms,
            *args,
        )

    async def waiting_by_centre(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT centre, COUNT(*) FROM outbox WHERE delivered_ms IS NULL GROUP BY centre"
        )
        return {str(c): int(n) for c, n in rows}

    async def refused_by_centre(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT centre, COUNT(*) FROM outbox WHERE delivered_ms IS NULL"
            " AND refused_ms IS NOT NULL GROUP BY centre"
        )
        return {str(c): int(n) for c, n in rows}

    async def waiting_count(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) FROM outbox WHERE delivered_ms IS NULL")
        return int(rows[0][0])

    async def waiting(
        self,
        limit: int,
        *,
        centre: str | None = None,
        refused: bool | None = None,
        districts: Sequence[str] | None = None,
    ) -> list[Waiting]:
        where, args = delivery_filter(centre, None, districts, first=1)
        if refused is not None:
            where += " AND o.refused_ms IS NOT NULL" if refused else " AND o.refused_ms IS NULL"
        rows = await self._fetch(
            "SELECT o.event_id, o.centre, e.device_id, e.type, o.attempts, o.next_attempt_ms,"  # noqa: S608
            " o.last_error, d.district, o.refused_ms FROM outbox o JOIN events e"
            f" USING (event_id) JOIN devices d USING (device_id) WHERE o.delivered_ms IS NULL"
            f"{where} ORDER BY o.next_attempt_ms, o.kept_order LIMIT ${len(args) + 1}",
            *args,
            limit,
        )
        return [Waiting(*row) for row in rows]

    # ---- operator stages ---------------------------------------------------------------------

    async def set_stage(self, event_id: str, stage: EventState, now_ms: int, actor: str) -> bool:
        async def work(db: asyncpg.Connection) -> bool:
            state = await db.fetchval(
                "SELECT state FROM events WHERE event_id = $1 FOR UPDATE", event_id
            )
            if state is None:
                raise UnknownEvent(event_id)
            if STAGE_ORDER[state] >= STAGE_ORDER[stage]:
                return False
            await db.execute("UPDATE events SET state = $1 WHERE event_id = $2", stage, event_id)
            await db.execute(
                "INSERT INTO stages VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                event_id,
                stage,
                now_ms,
                actor,
            )
            return True

        return await self._tx(work)

    async def event(self, event_id: str) -> Event | None:
        rows = await self._fetch(_EVENT_SELECT + " WHERE e.event_id = $1", event_id)
        return event_from_row(tuple(rows[0])) if rows else None

    async def events(
        self, state: EventState | None, limit: int, *, type: str | None = None
    ) -> list[Event]:
        rows = await self._fetch(
            _EVENT_SELECT + " WHERE ($1::text IS NULL OR e.state = $1)"
            " AND ($2::text IS NULL OR e.type = $2)"
            " ORDER BY e.received_ms DESC, e.kept_order DESC LIMIT $3",
            state,
            type,
            limit,
        )
        return [event_from_row(tuple(r)) for r in rows]

    async def stages(self, event_id: str) -> list[tuple[str, int, str]]:
        rows = await self._fetch(
            "SELECT stage, at_ms, actor FROM stages WHERE event_id = $1 ORDER BY at_ms",
            event_id,
        )
        return [(str(a), int(b), str(c)) for a, b, c in rows]

    # ---- personal data (sealed) and retention ------------------------------------------------

    async def set_private(self, device_id: str, sealed: str, now_ms: int) -> bool:
        async def work(db: asyncpg.Connection) -> bool:
            if await db.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
                await db.execute(
                    "INSERT INTO device_private VALUES ($1, $2, $3) ON CONFLICT (device_id)"
                    " DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
                    device_id,
                    sealed,
                    now_ms,
                )
                return True
            return False

        return await self._tx(work)

    async def private(self, device_id: str) -> str | None:
        rows = await self._fetch(
            "SELECT sealed FROM device_private WHERE device_id = $1", device_id
        )
        return str(rows[0][0]) if rows else None

    async def reseal_private(self, reseal: Callable[[str, str], str]) -> int:
        async def work(db: asyncpg.Connection) -> int:
            rows = await db.fetch("SELECT device_id, sealed FROM device_private FOR UPDATE")
            await db.executemany(
                "UPDATE device_private SET sealed = $1 WHERE device_id = $2",
                [(reseal(str(d), str(v)), d) for d, v in rows],
            )
            return len(rows)

        return await self._tx(work)

    async def decommission(self, device_id: str, now_ms: int) -> bool:
        async def work(db: asyncpg.Connection) -> bool:
            found = _count(await db.execute(_REVOKE, now_ms, device_id))
            await db.execute("UPDATE devices SET label = '' WHERE device_id = $1", device_id)
            await db.execute("DELETE FROM device_private WHERE device_id = $1", device_id)
            return found == 1

        return await self._tx(work)

    async def purge_closed(self, closed_before_ms: int, *, dry_run: bool) -> int:
        # LIMIT NULL is no limit: the dry run counts them all
        chosen = (
            "SELECT e.event_id FROM events e JOIN stages s"
            " ON s.event_id = e.event_id AND s.stage = 'closed'"
            " WHERE e.state = 'closed' AND s.at_ms < $1 LIMIT $2"
        )
        if dry_run:
            return len(await self._fetch(chosen, closed_before_ms, None))

        async def one_batch(db: asyncpg.Connection) -> int:
            ids = [row[0] for row in await db.fetch(chosen, closed_before_ms, PURGE_BATCH)]
            for table in ("outbox", "stages", "events"):
                await db.execute(f"DELETE FROM {table} WHERE event_id = ANY($1::text[])", ids)  # noqa: S608
            return len(ids)

        purged = 0
        while True:  # PURGE_BATCH a transaction, as on SQLite
            count = await self._tx(one_batch)
            purged += count
            if count < PURGE_BATCH:
                return purged

    # ---- health --------------------------------------------------------------------------

    async def free_bytes(self) -> int | None:
        return None  # the disk is the database server's: its own monitoring watches it

    async def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL recycles its WAL itself."""

    # ---- enrolment -------------------------------------------------------------------------
    # As on SQLite: the token and the device row change in one transaction. Each transaction
    # takes an advisory lock on the device id first, so two requests for one device (on two
    # instances) are decided one after the other, as SQLite's single writer does.

    @staticmethod
    async def _lock_device(db: asyncpg.Connection, device_id: str) -> None:
        await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", device_id)

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
    ) -> tuple[str, Pending]:
        token = new_token(device_id)

        async def work(db: asyncpg.Connection) -> tuple[DeviceKind, str, str]:
            await self._lock_device(db, device_id)
            row = await db.fetchrow(
                "SELECT kind, district, label, revoked FROM devices WHERE device_id = $1",
                device_id,
            )
            live = await db.fetchval(
                "SELECT 1 FROM enrolments WHERE device_id = $1 AND used_ms IS NULL"
                " AND cancelled_ms IS NULL AND expires_ms > $2",
                device_id,
                now_ms,
            )
            chosen = enrolment_for(
                device_id,
                None if row is None else tuple(row),  # (kind, district, label, revoked)
                live is not None,
                (kind, district, label),
                rotate=rotate,
                serves=serves,
            )
            if rotate:
                # a fresh rotation token replaces one not yet used
                await db.execute(
                    "UPDATE enrolments SET cancelled_ms = $1 WHERE device_id = $2"
                    " AND used_ms IS NULL AND cancelled_ms IS NULL",
                    now_ms,
                    device_id,
                )
            await db.execute(
                "INSERT INTO enrolments (token_hash, device_id, kind, district, label, rotate,"
                " created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                hash_token(token),
                device_id,
                *chosen,
                rotate,
                now_ms,
                now_ms + ttl_s * 1000,
            )
            return chosen

        chosen = await self._tx(work)
        return token, issued_enrolment(device_id, chosen, rotate=rotate, now_ms=now_ms, ttl_s=ttl_s)

    async def check_enrolment(self, token: str, device_id: str, now_ms: int) -> Pending:
        rows = await self._fetch(
            f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE token_hash = $1",  # noqa: S608
            hash_token(token),
        )
        return opened_enrolment(rows[0] if rows else None, device_id, now_ms)

    async def complete_enrolment(
        self, token: str, public_key_b64: str, serial: str, now_ms: int
    ) -> Pending:
        async def work(db: asyncpg.Connection) -> Pending:
            row = await db.fetchrow(
                f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE token_hash = $1"  # noqa: S608
                " FOR UPDATE",
                hash_token(token),
            )
            pending = opened_enrolment(row, None, now_ms)
            await self._lock_device(db, pending.device_id)
            await db.execute(
                "UPDATE enrolments SET used_ms = $1, serial = $2 WHERE token_hash = $3",
                now_ms,
                serial,
                hash_token(token),
            )
            revoked = await db.fetchval(
                "SELECT revoked FROM devices WHERE device_id = $1", pending.device_id
            )
            check_completion(pending, revoked)
            if pending.rotate:
                await db.execute(
                    "UPDATE devices SET public_key = $1 WHERE device_id = $2",
                    public_key_b64,
                    pending.device_id,
                )
            else:
                await db.execute(
                    f"INSERT INTO devices ({NEW_DEVICE_COLUMNS})"  # noqa: S608
                    " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    *new_device_values(enrolled_device(pending, public_key_b64), now_ms),
                )
            return pending

        return await self._tx(work)

    async def cancel_enrolments(self, device_id: str, now_ms: int) -> int:
        return await self._execute(
            "UPDATE enrolments SET cancelled_ms = $1 WHERE device_id = $2 AND used_ms IS NULL"
            " AND cancelled_ms IS NULL",
            now_ms,
            device_id,
        )

    async def enrolments(self, device_id: str | None = None) -> list[Pending]:
        rows = await self._fetch(
            f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments"  # noqa: S608
            " WHERE ($1::text IS NULL OR device_id = $1)"
            " ORDER BY created_ms DESC, kept_order DESC",
            device_id,
        )
        return [pending_from_row(tuple(r)) for r in rows]

    # ---- live video streams: which instance holds which -----------------------------------

    async def claim_stream(self, device_id: str, holder: str, session: str, now_ms: int) -> None:
        """`holder` now holds `device_id`'s stream (a newer offer replaces any other's)."""
        await self._execute(
            "INSERT INTO video_streams VALUES ($1, $2, $3, $4) ON CONFLICT (device_id) DO UPDATE"
            " SET holder = excluded.holder, session = excluded.session,"
            " since_ms = excluded.since_ms",
            device_id,
            holder,
            session,
            now_ms,
        )

    async def release_stream(self, device_id: str, holder: str, session: str) -> bool:
        """Forget the claim if it is still this holder's and session's (not a newer one)."""
        gone = await self._execute(
            "DELETE FROM video_streams WHERE device_id = $1 AND holder = $2 AND session = $3",
            device_id,
            holder,
            session,
        )
        return gone > 0

    async def release_streams_of(self, holder: str) -> int:
        """At an instance's start: the streams it held before dying are gone with it."""
        return await self._execute("DELETE FROM video_streams WHERE holder = $1", holder)

    async def stream_holder(self, device_id: str) -> str | None:
        rows = await self._fetch("SELECT holder FROM video_streams WHERE device_id = $1", device_id)
        return str(rows[0][0]) if rows else None

    # ---- remote configuration -------------------------------------------------------------

    async def set_config_layer(
        self,
        scope: ConfigScope,
        name: str,
        patch_json: str | None,
        now_ms: int,
        sealed_to_key: str | None = None,
    ) -> None:
        async def work(db: asyncpg.Connection) -> None:
            if patch_json is None:
                await db.execute(
                    "DELETE FROM config_layers WHERE scope = $1 AND name = $2", scope, name
                )
            else:
                await db.execute(
                    SET_CONFIG_LAYER_SQL, scope, name, patch_json, now_ms, sealed_to_key
                )

        await self._tx(work)

    async def config_layers(self) -> list[ConfigLayer]:
        return [config_layer(row) for row in await self._fetch(CONFIG_LAYERS_SQL)]

    async def report_config(self, device_id: str, config_hash: str, now_ms: int) -> None:
        async def work(db: asyncpg.Connection) -> None:
            await db.execute(
                "INSERT INTO config_reported VALUES ($1, $2, $3) ON CONFLICT (device_id)"
                " DO UPDATE SET config_hash = excluded.config_hash,"
                " reported_ms = excluded.reported_ms",
                device_id,
                config_hash,
                now_ms,
            )

        await self._tx(work)

    async def reported_configs(self) -> dict[str, tuple[str, int]]:
        rows = await self._fetch("SELECT device_id, config_hash, reported_ms FROM config_reported")
        return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}

    async def test_records(self, start_ms: int, end_ms: int) -> list[TestRecord]:
        sql = TEST_RECORDS_SQL.format(start="$1", end="$2")
        return test_records_of(tuple(r) for r in await self._fetch(sql, start_ms, end_ms))

    # ---- agent rollouts (each change holds the rollout's row: one instance at a time) ---

    async def start_rollout(self, rollout: RolloutRecord, devices: Sequence[DeviceUpdate]) -> bool:
        async def work(db: asyncpg.Connection) -> bool:
            if _count(await db.execute(START_ROLLOUT_SQL, *rollout_values(rollout))) == 0:
                return False
            await db.executemany(
                ADD_ROLLOUT_DEVICE_SQL,
                [device_update_values(rollout.rollout_id, d) for d in devices],
            )
            return True

        return await self._tx(work)

    async def rollouts(self, limit: int) -> list[RolloutRecord]:
        rows = await self._fetch(
            f"SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY kept_order DESC LIMIT $1",  # noqa: S608
            limit,
        )
        return [rollout_from_row(tuple(row)) for row in rows]

    async def rollout_devices(self, rollout_id: str) -> list[DeviceUpdate]:
        rows = await self._fetch(ROLLOUT_DEVICES_SQL, rollout_id)
        return [device_update_from_row(tuple(row)) for row in rows]

    @staticmethod
    async def _hold_rollout(db: asyncpg.Connection, rollout_id: str) -> str | None:
        """Lock the rollout's row until the transaction ends; its state, None if none."""
        state = await db.fetchval(
            "SELECT state FROM rollouts WHERE rollout_id = $1 FOR UPDATE", rollout_id
        )
        return None if state is None else str(state)

    async def move_rollout(
        self,
        rollout_id: str,
        from_states: Sequence[RolloutPhase],
        to_state: RolloutPhase,
        *,
        percent: float | None = None,
        paused_because: str | None = None,
        add_devices: Sequence[str] = (),
    ) -> bool:
        sql = move_rollout_sql(from_states)

        async def work(db: asyncpg.Connection) -> bool:
            await self._hold_rollout(db, rollout_id)
            if _count(await db.execute(sql, rollout_id, to_state, percent, paused_because)) == 0:
                return False
            await db.executemany(
                ADD_ROLLOUT_DEVICE_SQL,
                [device_update_values(rollout_id, DeviceUpdate(d)) for d in add_devices],
            )
            return True

        return await self._tx(work)

    async def offer_rollout(self, rollout_id: str, now_ms: int, reoffer_ms: int) -> list[str]:
        async def work(db: asyncpg.Connection) -> list[str]:
            if await self._hold_rollout(db, rollout_id) != "running":
                return []
            rows = await db.fetch(OFFER_ROLLOUT_SQL, rollout_id, now_ms, reoffer_ms)
            await db.execute(SETTLE_ROLLOUT_SQL, rollout_id)
            return [str(row[0]) for row in rows]

        return await self._tx(work)

    async def report_update(
        self,
        rollout_id: str,
        device_id: str,
        outcome: UpdateOutcome,
        reason: str | None,
        now_ms: int,
    ) -> bool:
        sql, args = report_update_args(rollout_id, device_id, outcome, reason, now_ms)

        async def work(db: asyncpg.Connection) -> bool:
            await self._hold_rollout(db, rollout_id)
            changed = _count(await db.execute(sql, *args)) > 0
            await db.execute(SETTLE_ROLLOUT_SQL, rollout_id)
            return changed

        return await self._tx(work)
