"""The SQLite store's own promises: old databases migrate in place by numbered steps, its
errors are the store's (a full disk and a held lock told apart), and it opens from a URL.
What every engine promises is in test_gw_store_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from gw_testkit import CENTRAL_TOML

from ansimi.config import ConfigError, load_config
from gateway import store as store_module
from gateway.config import GatewayConfig
from gateway.enrolments import hash_token
from gateway.store import (
    SCHEMA_VERSION,
    BadStoreUrl,
    Device,
    Incoming,
    SqliteDatabase,
    SqliteStore,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreVersionError,
    open_store,
    sqlite_path,
)

FIRST_RELEASE_DEVICES = """
CREATE TABLE devices (
    device_id   TEXT PRIMARY KEY,
    public_key  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    district    TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    revoked     INTEGER NOT NULL DEFAULT 0,
    high_water  INTEGER,
    created_ms  INTEGER NOT NULL
);
INSERT INTO devices VALUES ('bell-0001', 'key', 'bell', 'mapo', '', 0, 41, 0);
"""


def test_a_first_release_database_gets_the_supervision_columns(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_RELEASE_DEVICES)
    store = SqliteDatabase(path)
    expected = Device("bell-0001", "key", "bell", "mapo", high_water=41)
    assert store.device("bell-0001") == expected
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    again = SqliteDatabase(path)  # and opening it again changes nothing
    assert again.device("bell-0001") == expected
    again.close()


BEFORE_PARKING_OUTBOX = """
CREATE TABLE outbox (
    event_id        TEXT NOT NULL,
    centre          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error      TEXT,
    delivered_ms    INTEGER,
    PRIMARY KEY (event_id, centre)
);
INSERT INTO outbox VALUES ('alert-old-0001', 'central', 3, 0, 'HTTP 400', NULL);
"""


def press(event_id: str, centres: tuple[str, ...], seq: int = 1) -> Incoming:
    return Incoming(event_id, "bell-0001", seq, "alert", 0, "{}", "a.b.c", centres)


def test_a_database_from_before_event_ids_learns_whose_ids_are_whose(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteDatabase(path)
    for device_id in ("bell-0001", "bell-0002"):
        store.add_device(Device(device_id, "key", "bell", "mapo"), now_ms=0)
    alert = Incoming(
        "alert-kept-0001", "bell-0001", 1, "alert", 0, '{"linked_to":null}', "a.b.c", ()
    )
    named = '{"alert_id":"alert-late-0001"}'
    cancel = Incoming("cancel-early-01", "bell-0001", 2, "cancel", 0, named, "a.b.c", ())
    odd = Incoming("cancel-odd-0001", "bell-0001", 3, "cancel", 0, "not json", "a.b.c", ())
    store.accept_batch([alert, cancel, odd], now_ms=0)
    store.close()
    with sqlite3.connect(path) as db:
        # as a gateway before that release left it: no ids table, and no versions yet
        db.execute("DROP TABLE event_ids")
        db.execute("DROP TABLE schema_version")
    store = SqliteDatabase(path)

    def reuse(event_id: str, seq: int) -> str | None:
        taken = Incoming(event_id, "bell-0002", seq, "alert", 0, "{}", "a.b.c", ())
        return store.accept_batch([taken], now_ms=1).refused[0]

    assert reuse("alert-kept-0001", 1) == "foreign_id"
    assert reuse("alert-late-0001", 2) == "foreign_id"  # named by bell-0001's cancel
    assert reuse("alert-free-0001", 3) is None
    store.close()


# The schema a gateway of the main branch before versioned migrations left (store and
# enrolment tables, the latter written by enrolment's own connection then), frozen here.
MAIN_BEFORE_VERSIONS = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    public_key  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    district    TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    revoked     INTEGER NOT NULL DEFAULT 0,
    revoked_ms  INTEGER,
    high_water  INTEGER,
    created_ms  INTEGER NOT NULL,
    last_seen_ms INTEGER,
    online      INTEGER,
    power       TEXT
);
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices(device_id),
    seq         INTEGER NOT NULL,
    type        TEXT NOT NULL,
    ts_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body        TEXT NOT NULL,
    jws         TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'received',
    clock_skew_ms INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_state ON events(state, received_ms);
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
CREATE TABLE IF NOT EXISTS device_private (
    device_id   TEXT PRIMARY KEY REFERENCES devices(device_id),
    sealed      TEXT NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolments (
    token_hash   TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    district     TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    rotate       INTEGER NOT NULL DEFAULT 0,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    used_ms      INTEGER,
    cancelled_ms INTEGER,
    serial       TEXT
);
CREATE INDEX IF NOT EXISTS enrolments_by_device ON enrolments(device_id, created_ms);
"""
TOKEN = "bell-0003.a-token-issued-before-the-upgrade-0123456789"


def test_a_database_from_before_versions_migrates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with sqlite3.connect(path) as db:
        db.executescript(MAIN_BEFORE_VERSIONS)
        db.execute(
            "INSERT INTO devices (device_id, public_key, kind, district, created_ms, high_water)"
            " VALUES ('bell-0001', 'key', 'bell', 'mapo', 0, 7)"
        )
        db.execute(
            "INSERT INTO events (event_id, device_id, seq, type, ts_ms, received_ms, body, jws)"
            " VALUES ('alert-0001', 'bell-0001', 7, 'alert', 0, 5, '{}', 'a.b.c')"
        )
        db.execute("INSERT INTO event_ids VALUES ('alert-0001', 'bell-0001')")
        db.execute(
            "INSERT INTO outbox (event_id, centre, next_attempt_ms)"
            " VALUES ('alert-0001', 'central', 5)"
        )
        db.execute(
            "INSERT INTO enrolments (token_hash, device_id, kind, district, created_ms,"
            " expires_ms) VALUES (?, 'bell-0003', 'bell', 'mapo', 0, 10000)",
            (hash_token(TOKEN),),
        )

    async def upgraded() -> None:
        store = SqliteStore(path)
        try:
            device = await store.device("bell-0001")
            assert device is not None and device.high_water == 7
            (due,) = await store.due_for("central", 10, 10)
            assert due.event_id == "alert-0001"
            # the token issued before the upgrade still enrols, into the same store
            await store.complete_enrolment(TOKEN, "key-3", "0A", 100)
            assert await store.device("bell-0003") is not None
        finally:
            await store.close()

    asyncio.run(upgraded())
    again = SqliteDatabase(path)
    assert again.schema_version() == SCHEMA_VERSION
    assert [d.device_id for d in again.devices()] == ["bell-0001", "bell-0003"]
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_database_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    SqliteDatabase(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreVersionError, match="newer gateway"):
        SqliteDatabase(path)


# ---- errors ---------------------------------------------------------------------------------


async def test_a_full_database_is_store_full_and_nothing_half_written(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.add_device(Device("bell-0001", "key", "bell", "mapo"), 0)
    # SQLite's own "database or disk is full" (SQLITE_FULL), without filling a disk
    store.database._db.execute("PRAGMA max_page_count = 1")
    body = "x" * 100_000
    alert = Incoming("alert-big-0001", "bell-0001", 1, "alert", 0, body, "a.b.c", ("central",))
    with pytest.raises(StoreFull) as full:
        await store.accept_batch([alert], 1)
    assert not isinstance(full.value, sqlite3.Error) and isinstance(full.value, OSError)
    store.database._db.execute("PRAGMA max_page_count = 1000000")
    assert await store.event("alert-big-0001") is None  # rolled back, and the next one works
    assert (await store.accept_batch([alert], 2)).fresh == [True]
    await store.close()


async def test_a_lock_held_past_the_wait_is_store_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)  # not SQLite's seconds
    path = tmp_path / "gateway.db"
    store = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another instance in the middle of a commit
    try:
        with pytest.raises(StoreLocked) as locked:
            await store.add_device(Device("bell-0001", "key", "bell", "mapo"), 0)
        assert isinstance(locked.value, StoreError) and not isinstance(locked.value, StoreFull)
    finally:
        other.execute("ROLLBACK")
        other.close()
    await store.add_device(Device("bell-0001", "key", "bell", "mapo"), 0)
    await store.close()


async def test_no_sqlite_error_leaks_even_from_below_the_translation(tmp_path: Path) -> None:
    class Broken(SqliteDatabase):
        def devices(self) -> list[Device]:
            raise sqlite3.DatabaseError("file is not a database")

    store = SqliteStore(Broken(tmp_path / "gateway.db"))
    with pytest.raises(StoreError) as broken:
        await store.devices()
    assert not isinstance(broken.value, sqlite3.Error)
    assert str(tmp_path) in str(broken.value)  # says which file
    await store.close()


async def test_every_store_call_runs_the_databases_method_on_the_store_thread(
    tmp_path: Path,
) -> None:
    class Recording(SqliteDatabase):
        """Records where each of its public methods ran, then runs it."""

        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.ran: dict[str, str] = {}

        def __getattribute__(self, name: str) -> Any:
            found = super().__getattribute__(name)
            if name.startswith("_") or name == "ran" or not callable(found):
                return found

            def recorded(*args: Any, **kwargs: Any) -> Any:
                self.ran[name] = threading.current_thread().name
                return found(*args, **kwargs)

            return recorded

    database = Recording(tmp_path / "gateway.db")
    store = SqliteStore(database)
    device = Device("bell-0001", "key", "bell", "mapo")
    await store.add_device(device, now_ms=1)
    found = await store.device("bell-0001")
    assert found is not None and found.device_id == "bell-0001"
    assert [d.device_id for d in await store.devices()] == ["bell-0001"]
    assert await store.revoke("bell-0001", 2) is True
    assert await store.waiting(10, centre="central") == []
    for name in ("add_device", "device", "devices", "revoke", "waiting"):
        assert database.ran[name].startswith("store"), name
    await store.close()


# ---- opened from a URL ----------------------------------------------------------------------


def test_a_store_url_names_an_sqlite_file() -> None:
    assert sqlite_path("sqlite:///var/lib/ansimi/gateway/gateway.db") == Path(
        "/var/lib/ansimi/gateway/gateway.db"
    )
    assert sqlite_path("sqlite://:memory:") == Path(":memory:")
    for bad, why in (
        ("mysql://db.example/ansimi", "'mysql' is not available"),
        ("sqlite://gateway.db", "must be absolute"),
        ("sqlite://", "no file named"),
        ("/var/lib/ansimi/gateway/gateway.db", "no engine named"),
    ):
        with pytest.raises(BadStoreUrl, match=why) as refused:
            open_store(bad)
        assert "Fix: sqlite:///" in str(refused.value)


def test_gateway_toml_names_the_store_by_url_or_by_the_older_plain_path(tmp_path: Path) -> None:
    central = CENTRAL_TOML
    older = tmp_path / "older.toml"
    older.write_text(f'database = "{tmp_path}/old.db"\n' + central)
    assert load_config(older, GatewayConfig).store_url == f"sqlite://{tmp_path}/old.db"
    newer = tmp_path / "newer.toml"
    newer.write_text(f'store = "sqlite://{tmp_path}/new.db"\n' + central)
    assert load_config(newer, GatewayConfig).store_url == f"sqlite://{tmp_path}/new.db"
    both = tmp_path / "both.toml"
    both.write_text(f'store = "sqlite://{tmp_path}/a.db"\ndatabase = "{tmp_path}/b.db"\n' + central)
    with pytest.raises(ConfigError, match="keep `store`"):
        load_config(both, GatewayConfig)
    relative = tmp_path / "relative.toml"
    relative.write_text('store = "sqlite://gateway.db"\n' + central)
    with pytest.raises(ConfigError, match="must be absolute"):
        load_config(relative, GatewayConfig)


def test_a_new_database_and_its_journal_are_readable_by_the_service_alone(
    tmp_path: Path,
) -> None:
    # issue 19: the gateway database (alerts, sealed personal data) was created 0644
    import os

    old = os.umask(0o022)
    try:
        database = store_module.SqliteDatabase(tmp_path / "state" / "gateway.db")
    finally:
        os.umask(old)
    try:
        made = sorted((tmp_path / "state").iterdir())
        assert [p.name for p in made] == ["gateway.db", "gateway.db-shm", "gateway.db-wal"]
        assert {p.name: p.stat().st_mode & 0o777 for p in made} == {p.name: 0o600 for p in made}
    finally:
        database.close()


def test_layers_sealed_before_version_10_are_taken_as_sealed_to_the_device_s_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    SqliteDatabase(path).close()
    with sqlite3.connect(path) as db:  # as a gateway of version 9 left it
        db.execute("ALTER TABLE config_layers DROP COLUMN sealed_to_key")
        db.execute("UPDATE schema_version SET version = 9")
        db.execute(
            "INSERT INTO devices (device_id, public_key, kind, district, created_ms)"
            " VALUES ('bell-0001', 'key-1', 'bell', 'mapo', 0)"
        )
        for scope, name, patch in (
            ("device", "bell-0001", '{"sms": {"numbers_from_gateway": "x"}}'),
            ("device", "bell-0002", '{"device": {"silent": true}}'),
            ("district", "mapo", "{}"),
        ):
            db.execute("INSERT INTO config_layers VALUES (?, ?, ?, 0)", (scope, name, patch))
    upgraded = SqliteDatabase(path)
    assert {(x.scope, x.name): x.sealed_to_key for x in upgraded.config_layers()} == {
        ("device", "bell-0001"): "key-1",
        ("device", "bell-0002"): None,
        ("district", "mapo"): None,
    }
    upgraded.close()
