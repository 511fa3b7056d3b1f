"""The store contract: what every store engine promises, through the roles' async methods.

Parametrised by store factory: SQLite (in memory and on a file) and PostgreSQL (a real
server the session starts, a fresh database per test); every engine passes every test here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pg_testkit import PgServer

from gateway.enrolments import DuplicateEnrolment, NotEnrolled, OtherDistrict, TokenRefused
from gateway.store import (
    FOREIGN_ID,
    FOREIGN_REF,
    ConfigLayer,
    Device,
    DeviceUpdate,
    DuplicateDevice,
    Incoming,
    RolloutPhase,
    RolloutRecord,
    Store,
    UnknownEvent,
    open_store,
    sqlite_url,
)

StoreFactory = Callable[[pytest.FixtureRequest, Path], Awaitable[Store]]


async def sqlite_in_memory(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return open_store("sqlite://:memory:")


async def sqlite_on_a_file(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return open_store(sqlite_url(tmp_path / "gateway.db"))


async def postgresql(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    server: PgServer = request.getfixturevalue("postgres")
    return open_store(server.new_database())


FACTORIES: dict[str, StoreFactory] = {
    "sqlite-memory": sqlite_in_memory,
    "sqlite-file": sqlite_on_a_file,
    "postgresql": postgresql,
}


@pytest.fixture(params=sorted(FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await FACTORIES[request.param](request, tmp_path)
    for device_id, district in (("bell-0001", "mapo"), ("bell-0002", "gangnam")):
        await opened.add_device(Device(device_id, f"key-{device_id}", "bell", district), 0)
    yield opened
    await opened.close()


def item(
    event_id: str,
    device_id: str = "bell-0001",
    seq: int = 1,
    *,
    type: str = "alert",
    body: str = "{}",
    centres: tuple[str, ...] = ("central", "mapo"),
    kept: bool = True,
    power: str | None = None,
    refs: tuple[str, ...] = (),
    skew: int | None = None,
) -> Incoming:
    return Incoming(
        event_id,
        device_id,
        seq,
        type,
        1_000,
        body,
        f"jws-of-{event_id}",
        centres,
        kept,
        power,
        refs,
        skew,
    )


# ---- devices (operator API, intake, supervision) ------------------------------------------


async def test_devices_are_added_listed_and_revoked_once(store: Store) -> None:
    with pytest.raises(DuplicateDevice):
        await store.add_device(Device("bell-0001", "other", "bell", "mapo"), 5)
    assert [d.device_id for d in await store.devices()] == ["bell-0001", "bell-0002"]
    assert await store.device("bell-0009") is None
    assert await store.revoke("bell-0001", 10)
    assert await store.revoke("bell-0001", 20)  # again: still revoked, first time kept
    device = await store.device("bell-0001")
    assert device is not None and device.revoked and device.revoked_ms == 10
    assert not await store.revoke("bell-0009", 30)


# ---- intake ---------------------------------------------------------------------------------


async def test_a_batch_is_kept_once_and_a_resend_is_known(store: Store) -> None:
    done = await store.accept_batch([item("alert-0001"), item("alert-0002", seq=2)], 100)
    assert (done.fresh, done.forwarded, done.refused) == ([True, True], [True, True], [None, None])
    again = await store.accept_batch([item("alert-0001")], 200)
    assert (again.fresh, again.forwarded, again.refused) == ([False], [False], [None])
    late = await store.accept_batch([item("alert-0000", seq=0, skew=-90_000)], 200)
    assert late.fresh == [True]  # an older sequence number is kept: the mark does not go back
    (skewed,) = [d for d in await store.due_for("mapo", 200, 10) if d.event_id == "alert-0000"]
    assert skewed.clock_skew_ms == -90_000
    device = await store.device("bell-0001")
    assert device is not None
    assert (device.high_water, device.last_seen_ms, device.online) == (2, 200, True)
    event = await store.event("alert-0001")
    assert event is not None and (event.state, event.received_ms, event.waiting) == (
        "received",
        100,
        2,
    )


async def test_heartbeats_move_the_mark_only_and_a_power_change_is_kept(store: Store) -> None:
    beat = item("hb-0001", seq=5, type="heartbeat", kept=False, power="mains", centres=())
    done = await store.accept_batch([beat], 100)
    assert (done.fresh, done.forwarded) == ([True], [False])
    assert await store.event("hb-0001") is None
    device = await store.device("bell-0001")
    assert device is not None and (device.high_water, device.power) == (5, "mains")
    change = item("hb-0002", seq=6, type="heartbeat", kept=False, power="battery")
    assert (await store.accept_batch([change], 200)).forwarded == [True]
    assert await store.event("hb-0002") is not None


async def test_an_id_is_its_first_devices_own_and_named_ids_are_claimed(store: Store) -> None:
    await store.accept_batch([item("alert-mine-01")], 100)
    # a cancel that names an alert not here yet claims that id for its device
    cancel = item("cancel-0001", seq=2, type="cancel", refs=("alert-late-01",))
    assert (await store.accept_batch([cancel], 100)).refused == [None]
    stolen = item("alert-mine-01", "bell-0002", centres=("central",))
    named = item("alert-late-01", "bell-0002", 2, centres=("central",))
    naming = item("cancel-other1", "bell-0002", 3, type="cancel", refs=("alert-mine-01",))
    done = await store.accept_batch([stolen, named, naming], 200)
    assert done.refused == [FOREIGN_ID, FOREIGN_ID, FOREIGN_REF]
    assert done.fresh == [False, False, False] and done.forwarded == [False, False, False]
    event = await store.event("alert-mine-01")
    assert event is not None and event.device_id == "bell-0001"
    # the naming device's own alert arrives later under that id: its own
    assert (await store.accept_batch([item("alert-late-01", seq=3)], 300)).refused == [None]


async def test_a_batch_is_decided_in_order_as_one_message_after_another(store: Store) -> None:
    beat = item("hb-1", seq=1, type="heartbeat", kept=False, power="mains", centres=())
    await store.accept_batch([beat], 100)
    assert await store.mark_offline([item("off-1", type="status", centres=())], 100, 150) == [True]
    batch = [
        # power changes against the stored mains: kept; the next one against this one: not
        item("hb-2", seq=2, type="heartbeat", kept=False, power="battery", centres=("central",)),
        item("hb-3", seq=3, type="heartbeat", kept=False, power="battery", centres=("central",)),
        item("alert-a", seq=4),
        item("alert-a", seq=4),  # the same message twice in one batch: a resend
        # an id named by an earlier message of the batch is that device's already
        item("cancel-b", "bell-0002", 1, type="cancel", refs=("alert-x",), centres=("central",)),
        item("alert-x", seq=5),
    ]
    done = await store.accept_batch(batch, 200)
    assert done.came_online == ["bell-0001"]
    assert done.fresh == [True, True, True, False, True, False]
    assert done.forwarded == [True, False, True, False, True, False]
    assert done.refused == [None, None, None, None, None, FOREIGN_ID]
    assert await store.event("hb-2") is not None and await store.event("hb-3") is None
    first, second = await store.device("bell-0001"), await store.device("bell-0002")
    assert first is not None and (first.high_water, first.power, first.online) == (
        5,
        "battery",
        True,
    )
    assert second is not None and (second.high_water, second.last_seen_ms) == (1, 200)


# ---- supervision ----------------------------------------------------------------------------


async def test_offline_is_marked_once_unless_heard_since(store: Store) -> None:
    await store.accept_batch([item("hb-0001", type="heartbeat", kept=False)], 1_000)
    offline = item("offline-0001", type="status", centres=("central",))
    assert await store.mark_offline([offline], 500, 2_000) == [False]  # heard after 500
    assert await store.mark_offline([offline], 1_000, 2_000) == [True]
    again = item("offline-0002", type="status", centres=("central",))
    assert await store.mark_offline([again], 1_000, 3_000) == [False]  # offline already
    assert await store.event("offline-0002") is None
    device = await store.device("bell-0001")
    assert device is not None and device.online is False
    back = await store.accept_batch([item("hb-0002", seq=2, type="heartbeat", kept=False)], 4_000)
    assert back.came_online == ["bell-0001"]


async def test_a_gateway_made_event_leaves_the_mark_alone(store: Store) -> None:
    await store.add_event(item("online-0001", seq=99, type="status"), 100)
    device = await store.device("bell-0001")
    assert device is not None and device.high_water is None
    statuses = await store.events(None, 10, type="status")
    assert [e.event_id for e in statuses] == ["online-0001"]


# ---- forwarding -----------------------------------------------------------------------------


async def test_deliveries_are_due_per_centre_and_recorded_in_one_go(store: Store) -> None:
    await store.accept_batch([item("alert-0001"), item("alert-0002", seq=2)], 100)
    assert await store.due_for("central", 99, 10) == []
    due = await store.due_for("central", 100, 10)
    assert {d.event_id for d in due} == {"alert-0001", "alert-0002"}
    assert due[0].jws == f"jws-of-{due[0].event_id}" and due[0].device_id == "bell-0001"
    assert len(await store.due_for("central", 100, 1)) == 1
    firsts = await store.delivered_many(
        [("alert-0001", "central"), ("alert-0001", "mapo"), ("alert-0002", "central")], 150
    )
    assert firsts == [True, False, True]
    assert [d.event_id for d in await store.due_for("mapo", 200, 10)] == ["alert-0002"]
    assert await store.due_for("central", 200, 10) == []
    assert await store.stages("alert-0001") == [("delivered", 150, "central")]
    event = await store.event("alert-0001")
    assert event is not None and (event.state, event.waiting) == ("delivered", 0)
    assert await store.waiting_count() == 1
    assert await store.waiting_by_centre() == {"mapo": 1}


async def test_a_failure_waits_and_a_refusal_parks_until_retried(store: Store) -> None:
    await store.accept_batch(
        [item("alert-0001"), item("alert-2", "bell-0002", centres=("central",))], 100
    )
    await store.failed("alert-0001", "central", 5_000, "HTTP 503")
    assert all(d.event_id != "alert-0001" for d in await store.due_for("central", 4_999, 10))
    (retry,) = [d for d in await store.due_for("central", 5_000, 10) if d.event_id == "alert-0001"]
    assert retry.attempts == 1
    await store.refused("alert-0001", "mapo", 200, "HTTP 400: malformed")
    await store.refused("alert-2", "central", 200, "HTTP 401")
    assert await store.due_for("mapo", 10_000, 10) == []
    assert await store.refused_by_centre() == {"central": 1, "mapo": 1}
    (parked,) = await store.waiting(10, refused=True, districts=["mapo"])
    assert (parked.event_id, parked.centre, parked.district) == ("alert-0001", "mapo", "mapo")
    assert parked.refused_ms == 200 and parked.last_error == "HTTP 400: malformed"
    assert {(w.event_id, w.centre) for w in await store.waiting(10, refused=False)} == {
        ("alert-0001", "central")
    }
    assert await store.retry_refused(300, districts=["gangnam"]) == 1
    assert await store.retry_refused(300, centre="central") == 0
    assert await store.retry_refused(300, event_id="alert-0001") == 1
    assert [d.event_id for d in await store.due_for("mapo", 300, 10)] == ["alert-0001"]
    assert await store.refused_by_centre() == {}


async def test_what_no_centre_has_is_routed_again_once(store: Store) -> None:
    await store.accept_batch([item("alert-unrouted", centres=())], 100)
    await store.accept_batch([item("alert-renamed", seq=2, centres=("old",))], 100)
    await store.accept_batch([item("alert-delivered", seq=3, centres=("old",))], 100)
    await store.delivered_many([("alert-delivered", "old")], 110)
    routes = {"mapo": ("central", "mapo")}
    assert await store.reroute(lambda district: routes[district], 200) == 4
    assert {d.event_id for d in await store.due_for("central", 200, 10)} == {
        "alert-unrouted",
        "alert-renamed",
    }
    assert [d.event_id for d in await store.due_for("old", 200, 10)] == ["alert-renamed"]
    assert await store.reroute(lambda district: routes[district], 300) == 0


# ---- operator stages ------------------------------------------------------------------------


async def test_stages_only_go_forward(store: Store) -> None:
    await store.accept_batch([item("alert-0001")], 100)
    await store.accept_batch([item("alert-0002", seq=2, type="cancel")], 150)
    assert await store.set_stage("alert-0001", "dispatched", 200, "desk")
    assert not await store.set_stage("alert-0001", "acknowledged", 300, "desk")
    assert await store.stages("alert-0001") == [("dispatched", 200, "desk")]
    with pytest.raises(UnknownEvent):
        await store.set_stage("alert-none", "closed", 400, "desk")
    assert [e.event_id for e in await store.events("dispatched", 10)] == ["alert-0001"]
    assert [e.event_id for e in await store.events(None, 10, type="cancel")] == ["alert-0002"]
    await store.accept_batch([item("alert-0003", seq=3)], 500)
    assert [e.event_id for e in await store.events(None, 2)] == ["alert-0003", "alert-0002"]


# ---- privacy and retention ------------------------------------------------------------------


async def test_private_data_is_kept_resealed_and_wiped(store: Store) -> None:
    assert not await store.set_private("bell-0009", "sealed-x", 1)
    assert await store.set_private("bell-0001", "sealed-1", 1)
    assert await store.set_private("bell-0002", "sealed-2", 1)
    assert await store.private("bell-0001") == "sealed-1"
    assert await store.reseal_private(lambda device_id, sealed: f"{sealed}+{device_id}") == 2
    assert await store.private("bell-0002") == "sealed-2+bell-0002"
    await store.accept_batch([item("alert-0001")], 100)
    assert await store.decommission("bell-0001", 200)
    assert not await store.decommission("bell-0009", 200)
    device = await store.device("bell-0001")
    assert device is not None and device.revoked and device.label == ""
    assert await store.private("bell-0001") is None
    assert await store.event("alert-0001") is not None  # the anonymised history stays


async def test_only_events_closed_before_the_cutoff_are_purged(store: Store) -> None:
    await store.accept_batch([item(f"alert-{n}", seq=n) for n in range(1, 5)], 100)
    await store.set_stage("alert-1", "closed", 1_000, "desk")
    await store.set_stage("alert-2", "closed", 5_000, "desk")
    await store.set_stage("alert-3", "dispatched", 1_000, "desk")  # old, but not closed
    assert await store.purge_closed(2_000, dry_run=True) == 1
    assert await store.event("alert-1") is not None
    assert await store.purge_closed(2_000, dry_run=False) == 1
    assert await store.event("alert-1") is None and await store.stages("alert-1") == []
    assert await store.event("alert-2") is not None and await store.event("alert-3") is not None
    # a purged event's id stays its device's
    reuse = item("alert-1", "bell-0002", 9, centres=("central",))
    assert (await store.accept_batch([reuse], 6_000)).refused == [FOREIGN_ID]


# ---- enrolment ------------------------------------------------------------------------------


async def test_a_token_enrols_its_device_once(store: Store) -> None:
    token, pending = await store.issue_enrolment("bell-0003", "store", "mapo", "shop", now_ms=0)
    assert token.startswith("bell-0003.") and pending.state(1) == "pending"
    with pytest.raises(DuplicateEnrolment):  # one live token per new device
        await store.issue_enrolment("bell-0003", "store", "mapo", "", now_ms=1)
    with pytest.raises(TokenRefused) as wrong:
        await store.check_enrolment(token, "bell-0004", 1)
    assert wrong.value.reason == "wrong-device"
    with pytest.raises(TokenRefused) as unknown:
        await store.check_enrolment("bell-0003.nothing-like-it", "bell-0003", 1)
    assert unknown.value.reason == "unknown"
    assert (await store.check_enrolment(token, "bell-0003", 1)).kind == "store"
    done = await store.complete_enrolment(token, "key-3", "0A", 2)
    assert done.device_id == "bell-0003"
    device = await store.device("bell-0003")
    assert device is not None and (device.public_key, device.kind, device.label) == (
        "key-3",
        "store",
        "shop",
    )
    with pytest.raises(TokenRefused) as used:
        await store.complete_enrolment(token, "key-other", "0B", 3)
    assert used.value.reason == "used"
    (record,) = await store.enrolments("bell-0003")
    assert (record.serial, record.used_ms) == ("0A", 2)


async def test_a_rotation_rekeys_an_enrolled_device_of_the_askers_districts(store: Store) -> None:
    with pytest.raises(NotEnrolled):
        await store.issue_enrolment("bell-0009", "bell", "", "", now_ms=0, rotate=True)
    with pytest.raises(NotEnrolled):  # another district's device looks unknown
        await store.issue_enrolment(
            "bell-0002", "bell", "", "", now_ms=0, rotate=True, serves=lambda d: d == "mapo"
        )
    with pytest.raises(OtherDistrict):
        await store.issue_enrolment(
            "bell-0005", "bell", "gangnam", "", now_ms=0, serves=lambda d: d == "mapo"
        )
    with pytest.raises(DuplicateEnrolment):
        await store.issue_enrolment("bell-0001", "bell", "mapo", "", now_ms=0)
    first, _ = await store.issue_enrolment("bell-0001", "bell", "", "", now_ms=0, rotate=True)
    second, pending = await store.issue_enrolment(
        "bell-0001", "bell", "", "", now_ms=1, rotate=True
    )
    assert (pending.district, pending.rotate) == ("mapo", True)  # kept from the device
    with pytest.raises(TokenRefused) as replaced:
        await store.check_enrolment(first, "bell-0001", 2)
    assert replaced.value.reason == "cancelled"
    await store.complete_enrolment(second, "key-new", "0C", 3)
    device = await store.device("bell-0001")
    assert device is not None and device.public_key == "key-new"
    await store.revoke("bell-0001", 4)
    with pytest.raises(TokenRefused) as revoked:
        await store.issue_enrolment("bell-0001", "bell", "", "", now_ms=5, rotate=True)
    assert revoked.value.reason == "revoked"


async def test_tokens_expire_and_are_cancelled(store: Store) -> None:
    old, _ = await store.issue_enrolment("bell-0005", "bell", "mapo", "", now_ms=0, ttl_s=60)
    with pytest.raises(TokenRefused) as expired:
        await store.check_enrolment(old, "bell-0005", 60_000)
    assert expired.value.reason == "expired"
    live, _ = await store.issue_enrolment("bell-0005", "bell", "mapo", "", now_ms=60_000)
    # every unused token: the expired one too
    assert await store.cancel_enrolments("bell-0005", 61_000) == 2
    assert await store.cancel_enrolments("bell-0005", 62_000) == 0
    with pytest.raises(TokenRefused) as cancelled:
        await store.complete_enrolment(live, "key-5", "0D", 63_000)
    assert cancelled.value.reason == "cancelled"
    assert await store.device("bell-0005") is None
    records = await store.enrolments()
    assert [r.created_ms for r in records] == [60_000, 0]  # newest first


# ---- health and the gateway's own events ----------------------------------------------------


async def test_a_site_event_is_kept_and_forwarded_without_a_device(store: Store) -> None:
    body = json.dumps({"state": "disk_low"})
    await store.add_site_event(item("disk-low-0001", "gw-local", type="status", body=body), 100)
    (due,) = await store.due_for("central", 100, 10)
    assert (due.device_id, due.body_json) == ("gw-local", body)
    free = await store.free_bytes()
    assert free is None or free > 0
    await store.checkpoint()  # nothing to say, but it must not fail


# ---- incidents ------------------------------------------------------------------------------


def alert_body(trigger: str = "press", **flags: bool) -> str:
    return json.dumps({"bell": "emergency", "trigger": trigger, **flags})


async def test_a_bells_events_make_one_incident_until_it_is_closed(store: Store) -> None:
    await store.accept_batch([item("alert-0001", body=alert_body())], 100)
    heard = item("health-0001", seq=2, type="health", body='{"event":"clock_corrected"}')
    urgent = item("alert-0002", seq=3, body=alert_body("long_press"))
    other = item("alert-0003", "bell-0002", 1, body=alert_body(), centres=("central",))
    await store.accept_batch([heard, urgent, other], 200)
    (first, second) = await store.incidents("open", 10)
    # the other bell's plain press is less urgent than this bell's long press
    assert (first.device_id, second.device_id) == ("bell-0001", "bell-0002")
    assert (first.incident_id, first.first_alert_id, first.events) == ("alert-0001",) * 2 + (3,)
    assert (first.kind, first.priority, first.updated_ms) == ("stalking_urgent", 3, 200)
    assert await store.incident_of("alert-0002") == "alert-0001"
    history = await store.incident_history("alert-0001")
    assert [(h.what, h.event_id) for h in history] == [
        ("event", "alert-0001"),
        ("event", "health-0001"),
        ("event", "alert-0002"),
        ("kind", "alert-0002"),
    ]
    assert await store.incidents("open", 10, ["gangnam"]) == [second]
    assert await store.move_incident("alert-0001", "closed", 300, "desk", "false_alarm")
    for event_id in ("alert-0001", "health-0001", "alert-0002"):
        event = await store.event(event_id)
        assert event is not None and event.state == "closed"
    await store.accept_batch([item("alert-0004", seq=4, body=alert_body())], 400)
    assert await store.incident_of("alert-0004") == "alert-0004"  # a new incident
    closed = await store.incident("alert-0001")
    assert closed is not None and (closed.state, closed.outcome) == ("closed", "false_alarm")
    assert closed.stages == {"closed": (300, "desk")}


async def test_an_incident_opened_in_a_batch_is_joined_by_the_batchs_next_events(
    store: Store,
) -> None:
    pressed = item("alert-0001", body=alert_body())
    duress = item("alert-0002", seq=2, body=alert_body("duress"))
    await store.accept_batch([pressed, duress], 100)
    (incident,) = await store.incidents("open", 10)
    assert (incident.incident_id, incident.events, incident.kind) == ("alert-0001", 2, "duress")
    assert incident.first_alert_id == "alert-0001" and incident.last_alert_id == "alert-0002"
    history = await store.incident_history("alert-0001")
    assert [(h.what, h.event_id) for h in history] == [
        ("event", "alert-0001"),
        ("event", "alert-0002"),
        ("kind", "alert-0002"),
    ]
    assert history[-1].detail == {"from": "stalking", "to": "duress"}


async def test_only_incident_worthy_events_open_one_and_offline_attaches(store: Store) -> None:
    restored = item("alert-0001", body=alert_body("power_restored"))
    await store.accept_batch([restored], 100)
    assert await store.incidents(None, 10) == []
    gone = item("status-0001", seq=2, type="status", body='{"state":"offline"}')
    assert await store.mark_offline([gone], 150, 150) == [True]
    (incident,) = await store.incidents("new", 10)
    assert (incident.kind, incident.offline, incident.first_alert_id) == ("offline", True, None)
    await store.accept_batch([item("alert-0002", seq=3, body=alert_body("duress"))], 200)
    (incident,) = await store.incidents("open", 10)
    assert (incident.kind, incident.priority, incident.first_alert_id) == (
        "duress",
        1,
        "alert-0002",
    )
    assert incident.offline  # the last connection state attached; the alert is no status


async def test_an_emergency_on_an_incident_acknowledged_as_news_needs_acknowledging_again(
    store: Store,
) -> None:
    """The desk acknowledged a bell going offline; then its victim presses: the press is
    not what was acknowledged. New again (escalating from the press), and the bell is not
    told `acknowledged` for it; a second press on the emergency is caught up as before."""
    heard = item("alert-0000", body=alert_body("power_restored"))  # news: no incident
    await store.accept_batch([heard], 50)
    gone = item("status-0001", seq=2, type="status", body='{"state":"offline"}')
    assert await store.mark_offline([gone], 100, 100) == [True]
    assert await store.move_incident("status-0001", "acknowledged", 150, "desk")
    pressed = await store.accept_batch([item("alert-0001", seq=3, body=alert_body())], 200)
    assert pressed.caught_up == {}
    incident = await store.incident("status-0001")
    assert incident is not None
    assert (incident.state, incident.kind, incident.opened_ms) == ("new", "stalking", 200)
    assert (incident.escalation_level, incident.stages) == (0, {})
    assert (await store.escalation_candidates(5)) == [incident]
    assert (await store.incident_history("status-0001"))[-1].detail == {
        "from": "offline",
        "to": "stalking",
        "reopened": True,
    }
    # acknowledged as the emergency now: a further press is caught up, nothing reopens
    assert await store.move_incident("status-0001", "acknowledged", 250, "desk")
    again = await store.accept_batch([item("alert-0002", seq=4, body=alert_body("duress"))], 300)
    assert again.caught_up == {"alert-0002": "acknowledged"}
    incident = await store.incident("status-0001")
    assert incident is not None and (incident.state, incident.kind) == ("acknowledged", "duress")


async def test_bells_going_offline_in_their_districts_outage_join_its_one_incident(
    store: Store,
) -> None:
    mapo = ("bell-0001", "bell-0003", "bell-0004")
    for device_id in mapo[1:]:
        await store.add_device(Device(device_id, f"key-{device_id}", "bell", "mapo"), 0)
    beats = [item(f"hb-{d}", d, type="heartbeat") for d in (*mapo, "bell-0002")]
    await store.accept_batch(beats, 50)

    def status(event_id: str, device_id: str, seq: int, **body: object) -> Incoming:
        return item(event_id, device_id, seq, type="status", body=json.dumps(body))

    # the supervisor tells the outage (about its first bell) before the bells' own events
    told = {"district": "mapo", "count": 3, "offline": list(mapo)}
    await store.add_event(
        status("outage-0001", "bell-0001", 2, state="district_outage", **told), 100
    )
    gone = [status(f"off-{d}", d, 3, state="offline") for d in (*mapo, "bell-0002")]
    assert await store.mark_offline(gone, 100, 100) == [True] * 4
    outage, elsewhere = await store.incidents("open", 10)
    assert (outage.kind, outage.device_id, outage.offline, outage.events) == (
        "district_outage",
        "bell-0001",
        True,
        4,
    )
    assert [await store.incident_of(f"off-{d}") for d in mapo] == [outage.incident_id] * 3
    # another district's bell is its own incident; one escalation for the whole outage
    assert (elsewhere.kind, elsewhere.device_id) == ("offline", "bell-0002")
    assert len(await store.escalation_candidates(3)) == 2
    # restored: a bell going offline after it is news of its own again
    await store.add_event(status("restored-0001", "bell-0001", 4, state="district_restored"), 200)
    await store.accept_batch([item("hb-again", "bell-0003", 5, type="heartbeat")], 220)
    again = [status("off-again", "bell-0003", 6, state="offline")]
    assert await store.mark_offline(again, 250, 300) == [True]
    assert await store.incident_of("off-again") == "off-again"
    (restored,) = [i for i in await store.incidents("open", 10) if i.kind == "district_outage"]
    assert not restored.offline


async def test_a_press_from_an_outages_first_bell_is_its_own_incident_not_the_outages(
    store: Store,
) -> None:
    """The outage is told about its district's first bell, but it is the district's: that
    bell pressed (acknowledged outage or not) is a person in trouble beside it, and its
    coming back online says nothing of the district, whose later silent bells still join."""
    mapo = ("bell-0001", "bell-0003", "bell-0004")
    for device_id in mapo[1:]:
        await store.add_device(Device(device_id, f"key-{device_id}", "bell", "mapo"), 0)
    await store.accept_batch([item(f"hb-{d}", d, type="heartbeat") for d in mapo], 50)

    def status(event_id: str, device_id: str, seq: int, **body: object) -> Incoming:
        return item(event_id, device_id, seq, type="status", body=json.dumps(body))

    told = {"district": "mapo", "count": 2, "offline": list(mapo[:2])}
    await store.add_event(
        status("outage-0001", "bell-0001", 2, state="district_outage", **told), 100
    )
    gone = [status(f"off-{d}", d, 3, state="offline") for d in mapo[:2]]
    assert await store.mark_offline(gone, 100, 100) == [True, True]
    assert await store.move_incident("outage-0001", "acknowledged", 150, "desk")

    pressed = await store.accept_batch([item("alert-0001", seq=4, body=alert_body())], 200)
    assert pressed.caught_up == {}  # the bell is not told its press was acknowledged
    assert await store.incident_of("alert-0001") == "alert-0001"
    press, outage = await store.incidents("open", 10)
    assert (press.kind, press.device_id, press.state) == ("stalking", "bell-0001", "new")
    assert (outage.incident_id, outage.kind, outage.state) == (
        "outage-0001",
        "district_outage",
        "acknowledged",
    )
    assert outage.offline and outage.first_alert_id is None
    assert [i.incident_id for i in await store.escalation_candidates(3)] == ["alert-0001"]
    # its bell back online is news for its own incident; the district is still dark
    await store.add_event(status("on-0001", "bell-0001", 5, state="online"), 250)
    assert await store.incident_of("on-0001") == "alert-0001"
    later = [status("off-bell-0004", "bell-0004", 6, state="offline")]
    assert await store.mark_offline(later, 300, 300) == [True]
    assert await store.incident_of("off-bell-0004") == "outage-0001"
    # the district's statuses are the outage's, whichever incident its first bell has
    await store.add_event(status("restored-0001", "bell-0001", 7, state="district_restored"), 400)
    assert await store.incident_of("restored-0001") == "outage-0001"
    outage_now = await store.incident("outage-0001")
    assert outage_now is not None and not outage_now.offline
    assert (await store.incident("alert-0001")) == (await store.incidents("new", 10))[0]


async def test_two_writers_telling_one_districts_outage_at_once_open_one_incident(
    store: Store,
) -> None:
    """Two gateway instances each group their own bells of a district and tell its outage,
    each about its own first bell, at the same moment (on PostgreSQL, two connections
    racing): the district has one open outage incident, the second status and both
    instances' bells going offline join it. Closed, the next outage opens a new one."""
    halves = (("bell-0001", "bell-0003"), ("bell-0004", "bell-0005"))
    bells = [b for half in halves for b in half]
    for device_id in bells[1:]:
        await store.add_device(Device(device_id, f"key-{device_id}", "bell", "mapo"), 0)

    def status(event_id: str, device_id: str, seq: int, **body: object) -> Incoming:
        return item(event_id, device_id, seq, type="status", body=json.dumps(body))

    for round_ in range(5):  # bounded: a few rounds to give the race its chances
        at, seq = 1_000 * (round_ + 1), 10 * (round_ + 1)
        beats = [item(f"hb-{round_}-{b}", b, seq, type="heartbeat") for b in bells]
        await store.accept_batch(beats, at)
        told = [
            status(
                f"outage-{round_}-{n}",
                half[0],
                seq + 1,
                state="district_outage",
                district="mapo",
                count=2,
                offline=list(half),
            )
            for n, half in enumerate(halves)
        ]
        await asyncio.gather(*(store.add_event(t, at + 100) for t in told))
        gone = [
            [status(f"off-{round_}-{b}", b, seq + 2, state="offline") for b in h] for h in halves
        ]
        went = await asyncio.gather(*(store.mark_offline(g, at + 50, at + 100) for g in gone))
        assert went == [[True, True], [True, True]]
        (outage,) = await store.incidents("open", 10)
        assert (outage.kind, outage.district, outage.offline, outage.events) == (
            "district_outage",
            "mapo",
            True,
            6,
        )
        joined = [t.event_id for t in told] + [e.event_id for g in gone for e in g]
        assert {await store.incident_of(e) for e in joined} == {outage.incident_id}
        assert await store.move_incident(outage.incident_id, "closed", at + 200, "desk", "real")


async def test_stages_only_go_forward_and_a_tick_is_kept_once(store: Store) -> None:
    await store.accept_batch([item("alert-0001", body=alert_body())], 100)
    assert await store.move_incident("alert-0001", "dispatched", 200, "desk")
    assert not await store.move_incident("alert-0001", "acknowledged", 300, "desk")
    # an alert joining it now is told where the incident is; other events are not
    joining = [
        item("alert-0002", seq=2, body=alert_body()),
        item("cancel-0001", seq=3, type="cancel"),
    ]
    assert (await store.accept_batch(joining, 350)).caught_up == {"alert-0002": "dispatched"}
    assert await store.tick_procedure("alert-0001", "call_victim", 400, "desk/kim")
    assert not await store.tick_procedure("alert-0001", "call_victim", 500, "desk/lee")
    assert await store.incident_ticks("alert-0001") == {"call_victim": (400, "desk/kim")}
    with pytest.raises(UnknownEvent):
        await store.move_incident("no-such-incident", "closed", 600, "desk")


async def test_an_escalation_step_is_taken_once_and_forwarded_to_its_centre(store: Store) -> None:
    await store.accept_batch([item("alert-0001", body=alert_body())], 100)
    assert [i.incident_id for i in await store.escalation_candidates(2)] == ["alert-0001"]
    step = ("esc-00000001", 7, 150, '{"level":1}', "jws-of-esc")
    assert await store.escalate("alert-0001", 1, "police", step, 160)
    # another instance that read the same level loses
    assert not await store.escalate("alert-0001", 1, "police", ("esc-00000002", *step[1:]), 170)
    incident = await store.incident("alert-0001")
    assert incident is not None
    assert (incident.escalation_level, incident.escalated_to) == (1, ("police",))
    (delivery,) = await store.due_for("police", 200, 10)
    assert (delivery.event_id, delivery.type, delivery.incident) == (
        "esc-00000001",
        "escalation",
        ("alert-0001", "stalking", 4),
    )
    (alert,) = await store.due_for("mapo", 200, 10)
    assert alert.incident == ("alert-0001", "stalking", 4)
    await store.move_incident("alert-0001", "acknowledged", 300, "desk")
    assert await store.escalation_candidates(2) == []
    assert not await store.escalate("alert-0001", 2, "police", ("esc-00000003", *step[1:]), 400)


# ---- live video streams (which instance holds a device's stream) ---------------------------


async def test_a_stream_is_its_newest_claimants_until_that_one_releases_it(store: Store) -> None:
    await store.claim_stream("bell-0001", "http://a", "s-1", 100)
    await store.claim_stream("bell-0002", "http://a", "s-2", 100)
    assert await store.stream_holder("bell-0001") == "http://a"
    await store.claim_stream("bell-0001", "http://b", "s-3", 200)  # a newer offer elsewhere
    assert not await store.release_stream("bell-0001", "http://a", "s-1")  # not the old one's
    assert await store.stream_holder("bell-0001") == "http://b"
    assert await store.release_stream("bell-0001", "http://b", "s-3")
    assert await store.stream_holder("bell-0001") is None
    # an instance starting again drops what it held before it died
    assert await store.release_streams_of("http://a") == 1
    assert await store.stream_holder("bell-0002") is None


# ---- remote configuration ----------------------------------------------------------------


async def test_config_layers_are_replaced_removed_and_kept_per_scope(store: Store) -> None:
    await store.set_config_layer("site", "", '{"mqtt":{"heartbeat_s":30.0}}', 10)
    await store.set_config_layer("district", "mapo", '{"behaviour":{"ring_link_s":60}}', 11)
    await store.set_config_layer("device", "bell-0001", '{"device":{"silent":true}}', 12)
    # the same name in another scope is another layer; a second write replaces the first
    await store.set_config_layer("device", "mapo", "{}", 13)
    await store.set_config_layer("district", "mapo", '{"behaviour":{"ring_link_s":30}}', 14)
    layers = {(x.scope, x.name): (x.patch_json, x.updated_ms) for x in await store.config_layers()}
    assert layers == {
        ("site", ""): ('{"mqtt":{"heartbeat_s":30.0}}', 10),
        ("district", "mapo"): ('{"behaviour":{"ring_link_s":30}}', 14),
        ("device", "bell-0001"): ('{"device":{"silent":true}}', 12),
        ("device", "mapo"): ("{}", 13),
    }
    await store.set_config_layer("device", "mapo", None, 15)
    assert ("device", "mapo") not in {(x.scope, x.name) for x in await store.config_layers()}


async def test_a_device_layer_keeps_the_key_its_numbers_were_sealed_to(store: Store) -> None:
    sealed = '{"sms":{"numbers_from_gateway":"x"}}'
    await store.set_config_layer("device", "bell-0001", sealed, 10, "key-a")
    await store.set_config_layer("district", "mapo", "{}", 11)

    def keys(layers: list[ConfigLayer]) -> dict[tuple[str, str], str | None]:
        return {(x.scope, x.name): x.sealed_to_key for x in layers}

    assert keys(await store.config_layers()) == {
        ("device", "bell-0001"): "key-a",
        ("district", "mapo"): None,
    }
    # a layer written again says again what it was sealed to (nothing: no numbers now)
    await store.set_config_layer("device", "bell-0001", "{}", 12)
    assert keys(await store.config_layers())[("device", "bell-0001")] is None


async def test_reported_config_hashes_keep_the_latest_per_device(store: Store) -> None:
    assert await store.reported_configs() == {}
    await store.report_config("bell-0001", "a" * 64, 100)
    await store.report_config("bell-0002", "b" * 64, 101)
    await store.report_config("bell-0001", "c" * 64, 102)
    assert await store.reported_configs() == {
        "bell-0001": ("c" * 64, 102),
        "bell-0002": ("b" * 64, 101),
    }


# ---- agent rollouts (every instance on the store sees the same one) -------------------------


def rollout(rollout_id: str, state: RolloutPhase = "running") -> RolloutRecord:
    return RolloutRecord(rollout_id, "2.0", "mapo", 50.0, state, 10)


BOTH = [DeviceUpdate("bell-0001"), DeviceUpdate("bell-0002")]


async def test_one_rollout_is_live_at_a_time_and_the_newest_is_current(store: Store) -> None:
    assert await store.rollouts(5) == []
    assert await store.start_rollout(rollout("r-1"), BOTH)
    assert not await store.start_rollout(rollout("r-2", "paused"), BOTH)  # r-1 is live
    assert not await store.start_rollout(rollout("r-1", "done"), [])  # the id is taken
    assert [r.rollout_id for r in await store.rollouts(5)] == ["r-1"]
    assert await store.move_rollout("r-1", ("running", "paused"), "paused", paused_because="2")
    assert not await store.move_rollout("r-1", ("running",), "done")  # not from paused
    assert await store.move_rollout("r-1", ("running", "paused"), "aborted")
    assert await store.start_rollout(rollout("r-2"), BOTH[:1])
    (newest, older) = await store.rollouts(5)
    assert newest == rollout("r-2")
    assert (older.rollout_id, older.state, older.paused_because) == ("r-1", "aborted", "2")
    assert await store.rollout_devices("r-2") == [DeviceUpdate("bell-0001")]
    with pytest.raises(ValueError, match="rollout states"):
        await store.move_rollout("r-2", ("gone",), "done")  # type: ignore[arg-type]


async def test_a_wider_step_adds_devices_and_resuming_clears_the_pause(store: Store) -> None:
    await store.start_rollout(rollout("r-1"), BOTH[:1])
    await store.move_rollout("r-1", ("running",), "paused", paused_because="1 device failed")
    widened = await store.move_rollout(
        "r-1", ("paused", "done"), "running", percent=100.0, add_devices=["bell-0001", "bell-0002"]
    )
    assert widened
    (current,) = await store.rollouts(1)
    assert (current.state, current.percent, current.paused_because) == ("running", 100.0, None)
    assert [d.device_id for d in await store.rollout_devices("r-1")] == ["bell-0001", "bell-0002"]


async def test_a_due_device_is_claimed_for_one_offer_never_during_an_open_incident(
    store: Store,
) -> None:
    await store.accept_batch([item("alert-0001", body=alert_body())], 50)  # bell-0001's incident
    await store.start_rollout(rollout("r-1"), BOTH)
    assert await store.offer_rollout("r-1", 100, 1_000) == ["bell-0002"]
    assert await store.offer_rollout("r-1", 200, 1_000) == []  # offered: not again so soon
    assert await store.offer_rollout("r-1", 1_100, 1_000) == ["bell-0002"]  # silent since
    # pressed after its offer: not offered again while its incident is open either
    other = item("alert-0002", "bell-0002", body=alert_body(), centres=("central",))
    await store.accept_batch([other], 1_150)
    assert await store.offer_rollout("r-1", 2_200, 1_000) == []
    assert await store.move_incident("alert-0001", "closed", 2_300, "desk", "false_alarm")
    assert await store.move_incident("alert-0002", "closed", 2_300, "desk", "false_alarm")
    assert sorted(await store.offer_rollout("r-1", 2_400, 1_000)) == ["bell-0001", "bell-0002"]
    progress = {
        d.device_id: (d.state, d.at_ms, d.offers) for d in await store.rollout_devices("r-1")
    }
    assert progress == {"bell-0001": ("offered", 2_400, 1), "bell-0002": ("offered", 2_400, 3)}
    await store.move_rollout("r-1", ("running",), "paused", paused_because="x")
    assert await store.offer_rollout("r-1", 9_000, 1_000) == []  # nothing while paused


async def test_reports_move_devices_and_the_rollout_is_done_once_none_waits(store: Store) -> None:
    await store.start_rollout(rollout("r-1"), BOTH)
    await store.offer_rollout("r-1", 100, 1_000)
    assert await store.report_update("r-1", "bell-0001", "installed", None, 200)
    assert not await store.report_update("r-1", "bell-0001", "installed", None, 205)  # again
    # a late offer's "not now" crossed the installed report: it stays installed
    assert not await store.report_update("r-1", "bell-0001", "not_now", None, 210)
    assert await store.report_update("r-1", "bell-0002", "not_now", None, 220)
    assert not await store.report_update("r-1", "bell-0009", "installed", None, 230)  # not in it
    assert (await store.rollouts(1))[0].state == "running"  # bell-0002 waits for an offer
    assert await store.offer_rollout("r-1", 300, 1_000) == ["bell-0002"]
    assert await store.report_update("r-1", "bell-0002", "failed", "rolled_back: no ack", 400)
    assert (await store.rollouts(1))[0].state == "done"
    # a late offer's "not now" crossed the failure report: it stays failed
    assert not await store.report_update("r-1", "bell-0002", "not_now", None, 450)
    progress = {d.device_id: d for d in await store.rollout_devices("r-1")}
    assert progress["bell-0001"] == DeviceUpdate("bell-0001", "installed", 200, 1, None)
    assert progress["bell-0002"] == DeviceUpdate(
        "bell-0002", "failed", 400, 2, "rolled_back: no ack"
    )


async def test_a_device_revoked_mid_rollout_is_not_offered_and_does_not_hold_it_open(
    store: Store,
) -> None:
    await store.start_rollout(rollout("r-1"), BOTH)
    assert sorted(await store.offer_rollout("r-1", 100, 1_000)) == ["bell-0001", "bell-0002"]
    assert await store.revoke("bell-0002", 150)  # it will never report
    assert await store.report_update("r-1", "bell-0001", "installed", None, 200)
    assert (await store.rollouts(1))[0].state == "done"
    await store.move_rollout("r-1", ("done",), "running", percent=100.0)
    assert await store.offer_rollout("r-1", 2_000, 1_000) == []  # not offered again
    assert (await store.rollouts(1))[0].state == "done"


async def test_a_test_press_opens_no_incident_and_joins_none(store: Store) -> None:
    # a test is never escalated: escalation works on incidents, and a test is in none
    await store.accept_batch([item("alert-0001", body=alert_body("test"))], 100)
    assert await store.incidents(None, 10) == []
    assert await store.incident_of("alert-0001") is None
    # not even one open on its bell (a gateway's incident outlives the bell's own)
    await store.accept_batch([item("alert-0002", seq=2, body=alert_body())], 200)
    await store.accept_batch([item("alert-0003", seq=3, body=alert_body("test"))], 300)
    (incident,) = await store.incidents("open", 10)
    assert incident.events == 1 and await store.incident_of("alert-0003") is None
    assert [i.incident_id for i in await store.escalation_candidates(3)] == ["alert-0002"]


async def test_test_records_are_a_period_s_test_presses_and_failed_tests(store: Store) -> None:
    test = alert_body("test")
    failed = '{"state":"test_failed","stage":"link"}'
    await store.add_event(item("alert-0001", body=test), 1_000)
    await store.add_event(item("alert-0002", "bell-0002", body=test), 2_000)
    await store.add_event(item("alert-0003", seq=2, body=alert_body()), 2_500)  # a real press
    await store.add_event(item("status-0001", seq=3, type="status", body=failed), 3_000)
    await store.add_event(item("alert-0004", seq=4, body=test), 9_000)  # the next period
    assert await store.delivered_many([("alert-0001", "central")], 1_700) == [True]
    records = await store.test_records(1_000, 9_000)
    assert [(r.event_id, r.district, r.type, r.delivered_ms) for r in records] == [
        ("alert-0001", "mapo", "alert", 1_700),
        ("alert-0002", "gangnam", "alert", None),
        ("status-0001", "mapo", "status", None),
    ]
    assert (records[0].ts_ms, records[0].received_ms) == (1_000, 1_000)
