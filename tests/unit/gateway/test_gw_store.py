"""The store's own promises: old databases are migrated in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.store import Device, Incoming, SqliteStore

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


def test_an_outbox_from_before_refusals_were_parked_gets_its_column(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with sqlite3.connect(path) as db:
        db.executescript(BEFORE_PARKING_OUTBOX)
    store = SqliteStore(path)
    store.add_device(Device("bell-0001", "key", "bell", "mapo"), now_ms=0)
    store.add_event(press("alert-old-0001", ()), now_ms=0)
    (waiting,) = store.waiting(10)
    assert (waiting.event_id, waiting.refused_ms) == ("alert-old-0001", None)
    store.refused("alert-old-0001", "central", 5, "HTTP 400: malformed")
    assert store.due(10, 10) == [] and store.refused_by_centre() == {"central": 1}
    store.close()


def test_events_no_centre_has_yet_are_routed_by_the_routing_in_force() -> None:
    store = SqliteStore(":memory:")
    store.add_device(Device("bell-0001", "key", "bell", "mapo"), now_ms=0)
    # kept while mapo had no destination (what a gateway without centres used to do)
    store.accept_batch([press("alert-unrouted-1", ())], now_ms=0)
    # kept for a centre since renamed, and one already delivered to it
    store.accept_batch([press("alert-renamed-01", ("old-central",), 2)], now_ms=0)
    store.accept_batch([press("alert-delivered1", ("old-central",), 3)], now_ms=0)
    store.delivered("alert-delivered1", "old-central", now_ms=1)
    assert [(d.event_id, d.centre) for d in store.due(10, 10)] == [
        ("alert-renamed-01", "old-central")
    ]

    routes = {"mapo": ("central", "mapo")}
    assert store.reroute(lambda district: routes[district], now_ms=20) == 4
    due = {(d.event_id, d.centre) for d in store.due(20, 10)}
    assert due == {
        ("alert-unrouted-1", "central"),
        ("alert-unrouted-1", "mapo"),
        ("alert-renamed-01", "central"),
        ("alert-renamed-01", "mapo"),
        ("alert-renamed-01", "old-central"),  # kept: nothing is dropped
    }
    assert store.reroute(lambda district: routes[district], now_ms=30) == 0  # once is enough
    store.close()


def test_a_database_from_before_event_ids_learns_whose_ids_are_whose(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path)
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
        db.execute("DROP TABLE event_ids")  # as a gateway before this release left it
    store = SqliteStore(path)

    def reuse(event_id: str, seq: int) -> str | None:
        taken = Incoming(event_id, "bell-0002", seq, "alert", 0, "{}", "a.b.c", ())
        return store.accept_batch([taken], now_ms=1).refused[0]

    assert reuse("alert-kept-0001", 1) == "foreign_id"
    assert reuse("alert-late-0001", 2) == "foreign_id"  # named by bell-0001's cancel
    assert reuse("alert-free-0001", 3) is None
    store.close()
