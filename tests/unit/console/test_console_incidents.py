"""The desk's incidents (issue 17): one card per incident, in priority order, moved and
ticked through the gateway's incident routes, for the operator's districts only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from console_testkit import (
    DEVICE_KEY,
    GATEWAY_KEY,
    PRESS,
    Desk,
    FakeGateway,
    delivery,
    desk,
    now_ms,
    registry_entry,
)

from console.gateway_client import INCIDENTS_LISTED
from console.receiver import EventLog
from protocol.jws import Signer
from protocol.messages import Alert, Cancel, Heartbeat, Status

DURESS = Alert(bell="emergency", trigger="duress")
RING = Alert(bell="doorbell", trigger="doorbell_ring")
INCIDENT_A = "inc-aaaaaaaaaaaa0001"
INCIDENT_B = "inc-bbbbbbbbbbbb0002"


def two_bells() -> FakeGateway:
    return FakeGateway(
        devices=[
            registry_entry(),
            registry_entry("bell-0002"),
            registry_entry("door-0001", kind="doorbell", district="gangnam"),
        ]
    )


async def listed(d: Desk) -> dict[str, Any]:
    async with d.client.get("/api/incidents") as r:
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def post(d: Desk, path: str, body: Any = None) -> tuple[int, Any]:
    async with d.client.post(path, json=body, headers={"X-CSRF-Token": d.csrf}) as r:
        return r.status, await r.json()


async def test_events_of_one_incident_make_one_card_and_priority_orders_the_queue(
    tmp_path: Path,
) -> None:
    gateway = two_bells()
    gateway.open_incident(INCIDENT_A)
    gateway.open_incident(INCIDENT_B, "bell-0002", "duress", 1)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        incident = (INCIDENT_A, "stalking", 4)
        for seq in (1, 2, 3):
            assert (await d.deliver(delivery(PRESS, seq=seq, incident=incident)))[0] == 200
        # a later incident of another bell, more urgent: first in the queue
        duress = (INCIDENT_B, "duress", 1)
        await d.deliver(delivery(DURESS, device="bell-0002", incident=duress))
        cards = (await listed(d))["incidents"]
    assert [(c["id"], c["kind"], c["priority"], c["events"]) for c in cards] == [
        (INCIDENT_B, "duress", 1, 1),
        (INCIDENT_A, "stalking", 4, 3),
    ]
    assert cards[1]["presses"] == 3 and cards[1]["state"] == "new"


async def test_an_older_gateways_events_group_by_bell_until_closed(tmp_path: Path) -> None:
    gateway = FakeGateway(has_incidents=False)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        first = delivery(PRESS, seq=1)
        await d.deliver(first)
        await d.deliver(delivery(Alert(bell="emergency", trigger="long_press"), seq=2))
        await d.deliver(delivery(Status(state="offline"), key=GATEWAY_KEY, kid="gw-test"))
        (card,) = (await listed(d))["incidents"]
        # upgraded by the long press; offline attached, not a card of its own
        assert (card["id"], card["kind"], card["priority"]) == (
            first["event_id"],
            "stalking_urgent",
            3,
        )
        assert card["events"] == 3 and card["offline"] and card["grouped_by_console"]
        # acted on through the alert routes an older gateway has
        status, _ = await post(d, f"/api/incidents/{card['id']}/closed", {"outcome": "test"})
        assert status == 200
        assert gateway.moves == [(first["event_id"], "closed")]
        assert (await listed(d))["incidents"] == []
        # the next press after closing is a new incident
        again = delivery(PRESS, seq=4)
        await d.deliver(again)
        (card,) = (await listed(d))["incidents"]
        assert card["id"] == again["event_id"] and card["events"] == 1


async def test_a_test_press_is_a_device_event_marked_test_never_a_card(tmp_path: Path) -> None:
    # an older gateway sends no incident: the console must not make the test a stalking card
    async with desk(tmp_path, FakeGateway(has_incidents=False)) as d:
        await d.sign_in()
        test = delivery(Alert(bell="emergency", trigger="test"))
        assert (await d.deliver(test))[0] == 200
        found = await listed(d)
    assert found["incidents"] == []
    assert [(e["event_id"], e["body"]["trigger"]) for e in found["events"]] == [
        (test["event_id"], "test")
    ]
    assert not found["events"][0]["active"]


async def test_a_burst_of_card_details_reads_each_incident_not_the_whole_desk(
    tmp_path: Path,
) -> None:
    """A desk of many cards asks for every card's detail at once: each lookup regrouping
    every event and reading the gateway's whole list made that quadratic (4 s from a
    press to its card with 200 open, bench/console.py). A lookup reads its incident's own
    events; the gateway's list is never asked for it."""
    bells = [f"bell-{n:04d}" for n in range(1, 21)]
    gateway = FakeGateway(devices=[registry_entry(b) for b in bells])
    for n, bell in enumerate(bells):
        gateway.open_incident(f"inc-burst-{n:012d}", bell)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        for n, bell in enumerate(bells):
            incident = (f"inc-burst-{n:012d}", "stalking", 4)
            await d.deliver(delivery(PRESS, device=bell, incident=incident))

        async def detail(incident_id: str) -> dict[str, Any]:
            async with d.client.get(f"/api/incidents/{incident_id}") as r:
                assert r.status == 200
                found: dict[str, Any] = await r.json()
                return found

        ids = [f"inc-burst-{n:012d}" for n in range(len(bells))]
        found = await asyncio.gather(*(detail(i) for i in ids))
        assert [(f["id"], f["device_id"], f["events"]) for f in found] == [
            (i, b, 1) for i, b in zip(ids, bells, strict=True)
        ]
        # a new event shows in the next lookup
        await d.deliver(delivery(PRESS, device=bells[0], seq=2, incident=(ids[0], "stalking", 4)))
        assert (await detail(ids[0]))["presses"] == 2
        assert gateway.listings == 0


async def test_stages_go_to_the_incident_routes_naming_the_operator_and_closing_needs_an_outcome(
    tmp_path: Path,
) -> None:
    gateway = FakeGateway()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        assert (await post(d, f"/api/incidents/{INCIDENT_A}/acknowledged"))[0] == 200
        status, answer = await post(d, f"/api/incidents/{INCIDENT_A}/closed", {})
        assert status == 400 and "outcome" in answer["error"]
        status, _ = await post(d, f"/api/incidents/{INCIDENT_A}/closed", {"outcome": "maybe"})
        assert status == 400
        status, _ = await post(d, f"/api/incidents/{INCIDENT_A}/closed", {"outcome": "real"})
        assert status == 200
        assert gateway.incident_calls == [
            (INCIDENT_A, "acknowledged", "kim", None),
            (INCIDENT_A, "closed", "kim", "real"),
        ]
        assert (await listed(d))["incidents"] == []
        closes = [
            json.loads(row[5])
            for row in d.console.operators.audit_rows()
            if row[3] == "closed" and row[4] == INCIDENT_A
        ]
        assert closes == [{"device": "bell-0001", "ok": True, "outcome": "real"}]


async def test_a_procedure_tick_reaches_the_gateway_and_the_audit(tmp_path: Path) -> None:
    gateway = FakeGateway()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        async with d.client.get(f"/api/incidents/{INCIDENT_A}") as r:
            detail = await r.json()
        assert [p["step"] for p in detail["procedure"]] == ["call_victim", "request_dispatch"]
        assert [h["detail"]["type"] for h in detail["history"]] == []  # the gateway's own
        gateway.incidents[INCIDENT_A]["device"] = {"online": False, "power": "battery"}
        async with d.client.get(f"/api/incidents/{INCIDENT_A}") as r:
            assert (await r.json())["device"] == {"online": False, "power": "battery"}
        status, after = await post(d, f"/api/incidents/{INCIDENT_A}/procedure/call_victim")
        assert status == 200 and after["procedure"][0]["done"]["actor"] == "kim"
        # a step the kind's procedure does not have: the gateway's 404, nothing audited as done
        assert (await post(d, f"/api/incidents/{INCIDENT_A}/procedure/dance"))[0] == 404
        # a name outside the step grammar never reaches the gateway (protocol/ids.py)
        assert (await post(d, f"/api/incidents/{INCIDENT_A}/procedure/Bad-Step"))[0] == 400
        ticks = [
            (row[2], json.loads(row[5])["step"], json.loads(row[5])["ok"])
            for row in d.console.operators.audit_rows()
            if row[3] == "procedure_step"
        ]
        assert ticks == [("kim", "call_victim", True), ("kim", "dance", False)]


async def test_an_operator_sees_and_acts_on_their_districts_incidents_only(
    tmp_path: Path,
) -> None:
    gateway = two_bells()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway, districts={"lee": ["gangnam"]}) as d:
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        await d.deliver(delivery(RING, device="door-0001", district="gangnam"))
        await d.sign_in("lee")
        cards = (await listed(d))["incidents"]
        assert [(c["device_id"], c["kind"]) for c in cards] == [("door-0001", "doorbell_ring")]
        async with d.client.get(f"/api/incidents/{INCIDENT_A}") as r:
            assert r.status == 404
        assert (await post(d, f"/api/incidents/{INCIDENT_A}/acknowledged"))[0] == 404
        assert gateway.incident_calls == []
        refused = [
            (row[2], row[3], row[4])
            for row in d.console.operators.audit_rows()
            if '"ok": false' in row[5]
        ]
        assert ("lee", "view_incident", INCIDENT_A) in refused
        assert ("lee", "acknowledged", INCIDENT_A) in refused


async def test_escalation_from_the_gateway_marks_the_card(tmp_path: Path) -> None:
    gateway = FakeGateway()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        assert (await listed(d))["incidents"][0]["escalation_level"] == 0
        opened_ms = (await listed(d))["incidents"][0]["opened_ms"]
        gateway.incidents[INCIDENT_A].update(
            escalation_level=1, escalated_to=["central"], opened_ms=opened_ms - 60_000
        )
        (card,) = (await listed(d))["incidents"]
        assert (card["escalation_level"], card["escalated_to"]) == (1, ["central"])
        # the timer counts from when the gateway opened it, not when this console heard
        assert card["opened_ms"] == opened_ms - 60_000


async def test_malformed_incident_fields_refuse_the_delivery(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        for bad in (
            {"priority": "1"},
            {"priority": 2**32},
            {"kind": "<script>"},
            {"incident_id": "../x"},
        ):
            data = delivery(PRESS, incident=(INCIDENT_A, "stalking", 4), tamper=bad)
            status, answer = await d.deliver(data)
            assert status == 400 and "malformed" in answer["error"], bad
        assert d.console.receiver.events.count() == 0


async def test_the_bells_state_now_is_on_its_card(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        async with d.client.get("/api/devices/bell-0001") as r:
            assert (await r.json())["now"] == {
                "online": None,
                "power": None,
                "last_heard_ms": None,
            }
        await d.deliver(delivery(Heartbeat(uptime_s=5, power="battery", firmware="1.0"), seq=1))
        await d.deliver(delivery(Status(state="offline"), key=GATEWAY_KEY, kid="gw-test"))
        async with d.client.get("/api/devices/bell-0001") as r:
            now = (await r.json())["now"]
        assert now["online"] is False and now["power"] == "battery"
        assert now["last_heard_ms"] is not None


async def test_an_older_console_db_gains_the_incident_columns(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.execute(
        "CREATE TABLE events (event_id TEXT PRIMARY KEY, device_id TEXT, district TEXT,"
        " type TEXT, ts_ms INTEGER, body TEXT, jws TEXT, received_ms INTEGER)"
    )
    db.execute("INSERT INTO events VALUES ('e1', 'bell-0001', 'mapo', 'alert', 1, '{}', 'j', 5)")
    db.commit()
    db.close()
    events = EventLog(tmp_path / "old.db")
    kept = events.get("e1")
    events.close()
    assert kept is not None and (kept.incident_id, kept.kind, kept.priority) == ("", "", 0)


async def test_a_cancel_marks_its_incident(tmp_path: Path) -> None:
    async with desk(tmp_path, FakeGateway(has_incidents=False)) as d:
        await d.sign_in()
        alert = delivery(PRESS, seq=1)
        await d.deliver(alert)
        await d.deliver(delivery(Cancel(alert_id=alert["event_id"]), seq=2))
        (card,) = (await listed(d))["incidents"]
        assert card["cancelled"] and card["events"] == 2


def escalation_delivery(signer_kid: str, key: Any, level: int = 1) -> dict[str, Any]:
    """A gateway's escalation step as docs/incidents.md describes it (its own message
    type, signed by the gateway), about bell-0001's incident A."""
    body = {"incident": INCIDENT_A, "level": level, "to": "central", "kind": "stalking"}
    payload = {
        "v": 1,
        "id": f"esc-{level:08d}-{signer_kid}",
        "device": "bell-0001",
        "type": "escalation",
        "ts": now_ms(),
        "seq": 0,
        "body": body,
    }
    return {
        "event_id": payload["id"],
        "device_id": "bell-0001",
        "district": "mapo",
        "type": "escalation",
        "ts_ms": payload["ts"],
        "body": body,
        "jws": Signer(signer_kid, key).sign(json.dumps(payload).encode()),
        "incident_id": INCIDENT_A,
        "kind": "stalking",
        "priority": 4,
    }


async def test_an_escalation_is_the_gateways_to_sign_and_marks_its_card(tmp_path: Path) -> None:
    gateway = FakeGateway()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        # the bell's own key: refused, whatever it claims
        status, answer = await d.deliver(escalation_delivery("bell-0001", DEVICE_KEY))
        assert status == 401 and "gateway's" in answer["error"]
        assert (await d.deliver(escalation_delivery("gw-test", GATEWAY_KEY)))[0] == 200
        (card,) = (await listed(d))["incidents"]
        assert (card["escalation_level"], card["escalated_to"]) == (1, ["central"])


async def test_an_incident_the_gateway_closed_elsewhere_leaves_the_desk(tmp_path: Path) -> None:
    gateway = FakeGateway()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        # a gateway that cannot answer closes nothing: the card stays
        gateway.listing_status = 500
        assert len((await listed(d))["incidents"]) == 1
        gateway.listing_status = 200
        # another desk closed it at the gateway: no event reaches this console for that
        gateway.incidents[INCIDENT_A].update(state="closed", outcome="false_alarm")
        assert (await listed(d))["incidents"] == []


def published(queue: asyncio.Queue[Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """The frames of `kind` published so far, each with its district."""
    frames = []
    while not queue.empty():
        district, text = queue.get_nowait()
        event, data = text.split("\n")[:2]
        if event == f"event: {kind}":
            frames.append((district, json.loads(data.removeprefix("data: "))))
    return frames


def pushed(queue: asyncio.Queue[Any]) -> list[tuple[str, dict[str, Any]]]:
    return published(queue, "incident")


async def test_an_event_pushes_its_incident_as_the_card_shows_it(tmp_path: Path) -> None:
    """The page updates the one card an event changed, from the incident pushed with it,
    instead of fetching the whole desk for each event."""
    gateway = FakeGateway()
    gateway.open_incident(INCIDENT_A)
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        queue = d.console.broadcast.open()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        await listed(d)  # the page's first look (the gateway's summary, kept)
        await d.deliver(delivery(PRESS, seq=2, incident=(INCIDENT_A, "stalking", 4)))
        await d.deliver(escalation_delivery("gw-test", GATEWAY_KEY))
        frames = pushed(queue)
        listing = (await listed(d))["incidents"]
    assert [(district, f["id"], f["presses"], f["escalation_level"]) for district, f in frames] == [
        ("mapo", INCIDENT_A, 1, 0),
        ("mapo", INCIDENT_A, 2, 0),
        ("mapo", INCIDENT_A, 2, 1),
    ]
    # the last push is the card the whole list shows
    assert frames[-1][1] == listing[0]
    assert gateway.listings == 2  # the lists above; the pushes asked the gateway nothing


async def test_the_sync_pushes_what_changed_at_the_gateway_and_wakes_for_the_next_step(
    tmp_path: Path,
) -> None:
    now = now_ms()
    gateway = two_bells()
    acked_elsewhere = gateway.open_incident(INCIDENT_A)
    closed_elsewhere = gateway.open_incident(INCIDENT_B, "bell-0002")
    async with desk(tmp_path, gateway, clock_ms=lambda: now) as d:
        await d.sign_in()
        await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
        await d.deliver(delivery(PRESS, device="bell-0002", incident=(INCIDENT_B, "stalking", 4)))
        queue = d.console.broadcast.open()
        assert await d.console.sync_gateway() == 2.0  # nothing due
        # the first look: every card with the gateway's part (opened when it opened there)
        first = [(f["id"], f["state"], f["opened_ms"]) for _, f in pushed(queue)]
        assert first == [
            (INCIDENT_A, "new", acked_elsewhere["opened_ms"]),
            (INCIDENT_B, "new", closed_elsewhere["opened_ms"]),
        ]
        # another desk acknowledged A and closed B; unchanged, nothing is pushed again
        acked_elsewhere.update(
            state="acknowledged", stages={"acknowledged": {"at_ms": now, "actor": "c2/lee"}}
        )
        closed_elsewhere.update(state="closed")
        await d.console.sync_gateway()
        assert [(f["id"], f["state"]) for _, f in pushed(queue)] == [
            (INCIDENT_A, "acknowledged"),
            (INCIDENT_B, "closed"),
        ]
        await d.console.sync_gateway()
        assert pushed(queue) == []
        # a step due in 0.5 s (to a centre other than this console): asked right after it
        acked_elsewhere.update(state="new", next_escalation_ms=now + 500)
        assert await d.console.sync_gateway() == 0.6


async def test_an_incident_a_cut_list_leaves_out_is_not_taken_for_closed(tmp_path: Path) -> None:
    """The gateway lists the most urgent open incidents up to a limit (500 unless told): a
    card pushed out of it by more urgent ones is still open, not closed elsewhere."""
    for asked in (INCIDENTS_LISTED, 2):  # the console's own limit; a list cut even so
        gateway = two_bells()
        gateway.listing_limit = 2  # what the gateway answers when not told
        gateway.open_incident(INCIDENT_A)
        gateway.open_incident(INCIDENT_B, "bell-0002", "doorbell_ring", 10)
        (tmp_path / str(asked)).mkdir()
        async with desk(tmp_path / str(asked), gateway, incidents_limit=asked) as d:
            await d.sign_in()
            await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
            await d.deliver(
                delivery(PRESS, device="bell-0002", incident=(INCIDENT_B, "stalking", 4))
            )
            queue = d.console.broadcast.open()
            await d.console.sync_gateway()
            assert {f["id"]: f["state"] for _, f in pushed(queue)} == {
                INCIDENT_A: "new",
                INCIDENT_B: "new",
            }
            # a more urgent incident opens elsewhere: B, the least urgent, drops off a list of 2
            gateway.open_incident("inc-cccccccccccc0003", "door-0001", "duress", 1)
            await d.console.sync_gateway()
            assert [f["state"] for _, f in pushed(queue)] == []
            cards = {i["id"]: i["state"] for i in (await listed(d))["incidents"]}
            assert cards[INCIDENT_B] == "new"


async def test_an_event_outside_any_incident_is_told_apart_from_an_older_gateways(
    tmp_path: Path,
) -> None:
    """A gateway with incidents puts each of an incident's events in it: one without is a
    device event the page lists (no reload of the desk). An older gateway's events all
    come without, and the page fetches the list the console groups."""
    heartbeat = Heartbeat(uptime_s=5, power="mains", firmware="1.0")

    for gateway, expected in ((FakeGateway(), True), (FakeGateway(has_incidents=False), False)):
        (tmp_path / str(expected)).mkdir()
        async with desk(tmp_path / str(expected), gateway) as d:
            await d.sign_in()
            # as while a page is open: the console learns which gateway it has
            await d.console.sync_gateway()
            queue = d.console.broadcast.open()
            await d.deliver(delivery(heartbeat))
            assert [e["loose"] for _, e in published(queue, "event")] == [expected]


async def test_a_pushed_incident_reaches_only_the_pages_of_its_district(tmp_path: Path) -> None:
    gateway = two_bells()
    gateway.open_incident(INCIDENT_A)
    gateway.open_incident(INCIDENT_B, "door-0001", "doorbell_ring", 10, district="gangnam")
    async with desk(tmp_path, gateway, districts={"lee": ["gangnam"]}) as d:
        await d.sign_in("lee")
        async with d.client.get("/api/stream") as stream:
            await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)  # hello
            await d.deliver(delivery(PRESS, incident=(INCIDENT_A, "stalking", 4)))
            ring = (INCIDENT_B, "doorbell_ring", 10)
            await d.deliver(delivery(RING, device="door-0001", district="gangnam", incident=ring))
            frames = [
                (await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)).decode()
                for _ in range(2)  # the ring's event, then its incident
            ]
    assert frames[1].startswith("event: incident\n") and INCIDENT_B in frames[1]
    assert not any(INCIDENT_A in f for f in frames)


async def test_an_outage_cards_offline_mark_is_the_newer_of_its_statuses_and_the_gateways(
    tmp_path: Path,
) -> None:
    """A district outage's card is dark from its `district_outage` and lit by its
    `district_restored`, pushed with each; the gateway's summary moves the mark only when
    it is newer (by the gateway's clock) than the status that set it, so a new outage does
    not first show lit, nor a restored one dark until the next sync."""
    told_ms = now_ms()
    gateway = FakeGateway()
    summary = gateway.open_incident(
        INCIDENT_A, kind="district_outage", priority=8, opened_ms=told_ms
    )
    summary.update(offline=True)
    outage = (INCIDENT_A, "district_outage", 8)

    def district(state: str, seq: int, at_ms: int, offline: list[str]) -> dict[str, Any]:
        status = Status(state=state, district="mapo", count=len(offline), offline=offline)
        return delivery(status, key=GATEWAY_KEY, kid="gw-test", seq=seq, ts=at_ms, incident=outage)

    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        queue = d.console.broadcast.open()
        dark = district("district_outage", 1, told_ms, ["bell-0001", "bell-0002"])
        assert (await d.deliver(dark))[0] == 200
        assert [f["offline"] for _, f in pushed(queue)] == [True]  # before any sync
        await d.console.sync_gateway()  # the gateway's summary kept: dark as of told_ms
        assert [f["offline"] for _, f in pushed(queue)] == [True]  # the first look
        assert (await d.deliver(district("district_restored", 2, told_ms + 1_000, [])))[0] == 200
        assert [f["offline"] for _, f in pushed(queue)] == [False]
        await d.console.sync_gateway()  # the summary, older than the restore, changes nothing
        assert pushed(queue) == []
        assert [c["offline"] for c in (await listed(d))["incidents"]] == [False]
        # dark again by a status not received here (yet): the gateway's newer summary wins
        summary.update(updated_ms=told_ms + 2_000)
        await d.console.sync_gateway()
        assert [f["offline"] for _, f in pushed(queue)] == [True]
