"""The store's own promises: old databases are migrated in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.store import Device, SqliteStore

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
    store = SqliteStore(path)
    assert store.device("bell-0001") == Device("bell-0001", "key", "bell", "mapo", high_water=41)
    store.close()
    again = SqliteStore(path)  # and opening it again changes nothing
    assert again.device("bell-0001") is not None
    again.close()
