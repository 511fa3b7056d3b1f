"""Incidents through a gateway's insides: intake keeps signed presses, the API moves the
incident and the bell hears one ack per stage, and escalation runs on a fake clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from gw_testkit import ALERT, CENTRAL_TOML, GATEWAY, GATEWAY_KEY, KEYS, NOW, Env, make_env

from ansimi.config import ConfigError, load_config
from gateway.api import Api
from gateway.config import ApiToken, GatewayConfig, IncidentsConfig
from gateway.incident_api import IncidentRoutes
from gateway.incidents import KINDS, Escalator, kind_of
from gateway.store import Device, Incoming, SqliteStore
from gateway.transports.https import delivery_body
from gateway.transports.sia import ALERT_EVENTS, STATUS_EVENTS, sia_event
from protocol.envelope import open_envelope
from protocol.keys import public_key_to_b64
from protocol.messages import Alert, Cancel, EscalationMessage

CENTRAL = "central-token-0123456789"
GANGNAM = "gangnam-desk-token-0123"
TOKENS = [
    ApiToken(name="central", role="operator", token=CENTRAL),
    ApiToken(name="gangnam-desk", role="operator", token=GANGNAM, districts=["gangnam"]),
]
CHAIN = ("mapo", "central", "police")


@dataclass
class Desk:
    env: Env
    client: TestClient[web.Request, web.Application]
    escalator: Escalator

    async def call(
        self, method: str, path: str, token: str = CENTRAL, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        async with self.client.request(method, path, headers=headers, **kw) as response:
            return response.status, await response.json()

    def refused(self, reason: str) -> float:
        value = self.env.metrics.registry.get_sample_value(
            "ansimi_api_refused_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    env = await make_env()
    config = IncidentsConfig(escalation=list(CHAIN), escalate_after_s={"default": 60, "1": 30})
    escalator = Escalator(env.store, env.downlink, CHAIN, config.after_s, clock_ms=env.clock)
    api = Api(env.store, env.registry, env.downlink, env.metrics, TOKENS, clock_ms=env.clock)
    api.add_routes(
        IncidentRoutes(
            env.store,
            env.downlink,
            env.metrics,
            config.procedures(),
            next_escalation_ms=escalator.due_ms,
            clock_ms=env.clock,
        ).routes()
    )
    async with TestClient(TestServer(api.app())) as client:
        yield Desk(env, client, escalator)


def test_kinds_follow_the_bell_and_the_trigger() -> None:
    def kind(device: str, **alert: Any) -> str | None:
        body = {"bell": "emergency", "trigger": "press", **alert}
        return kind_of(device, "alert", body)

    assert kind("bell", trigger="duress") == "duress"
    assert kind("store", bell="store", silent=True) == "store_robbery"
    assert kind("store", bell="store") == "stalking"
    assert kind("bell", trigger="long_press") == "stalking_urgent"
    assert kind("bell", urgent=True) == "stalking_urgent"
    assert kind("doorbell", bell="doorbell", trigger="doorbell_ring") == "doorbell_ring"
    assert kind("doorbell", bell="doorbell", trigger="doorbell_ring", urgent=True) == (
        "doorbell_emergency"
    )
    assert kind("bell", trigger="tamper") == "tamper"
    assert kind("bell", trigger="power_loss") == "power_lost"
    assert kind("bell", trigger="tamper_cleared") is None
    assert kind("bell", trigger="test") is None
    assert kind_of("bell", "status", {"state": "offline"}) == "offline"
    assert kind_of("bell", "heartbeat", {"power": "battery"}) == "power_lost"
    assert kind_of("bell", "heartbeat", {"power": "mains"}) is None
    assert kind_of("bell", "cancel", {"alert_id": "x"}) is None


async def test_presses_make_one_incident_and_the_bell_one_ack_per_stage(desk: Desk) -> None:
    env = desk.env
    await env.feed(
        env.message(ALERT), env.message(Alert(bell="emergency", trigger="press", presses=3))
    )
    urgent = Alert(bell="emergency", trigger="long_press", urgent=True)
    await env.feed(env.message(urgent, id="alert-urgent-01"))
    status, listed = await desk.call("GET", "/incidents")
    assert status == 200
    (incident,) = listed["incidents"]
    first_id = incident["first_alert_id"]
    assert incident["id"] == first_id and incident["events"] == 3
    assert (incident["kind"], incident["priority"], incident["state"]) == (
        "stalking_urgent",
        3,
        "new",
    )
    assert incident["next_escalation_ms"] == NOW + 60_000
    env.sent.clear()
    path = f"/incidents/{first_id}"
    status, moved = await desk.call(
        "POST", f"{path}/acknowledged", headers={"X-Ansimi-Operator": "kim.j"}
    )
    assert status == 200 and moved["stages"]["acknowledged"]["actor"] == "central/kim.j"
    assert (await desk.call("POST", f"{path}/acknowledged"))[0] == 409
    # closing asks for an outcome
    assert (await desk.call("POST", f"{path}/closed"))[0] == 400
    assert (await desk.call("POST", f"{path}/closed", json={"outcome": "maybe"}))[0] == 400
    assert desk.refused("bad_outcome") == 2
    status, closed = await desk.call("POST", f"{path}/closed", json={"outcome": "real"})
    assert status == 200 and (closed["state"], closed["outcome"]) == ("closed", "real")
    # each stage once, to the first alert and to the newest (see the cancel test below)
    assert env.acks() == [
        ("bell-0001", first_id, "acknowledged"),
        ("bell-0001", "alert-urgent-01", "acknowledged"),
        ("bell-0001", first_id, "closed"),
        ("bell-0001", "alert-urgent-01", "closed"),
    ]
    _, alerts = await desk.call("GET", "/alerts")
    assert {a["state"] for a in alerts["alerts"]} == {"closed"}  # every press went with it
    # the same bell again: a new incident
    await env.feed(env.message(ALERT))
    _, listed = await desk.call("GET", "/incidents")
    (again,) = listed["incidents"]
    assert again["id"] != first_id and again["state"] == "new"


async def test_the_old_alert_route_moves_the_alerts_incident(desk: Desk) -> None:
    env = desk.env
    first, second = env.message(ALERT), env.message(ALERT)
    await env.feed(first, second)
    _, listed = await desk.call("GET", "/incidents")
    (incident,) = listed["incidents"]
    (later,) = [
        a["event_id"]
        for a in (await desk.call("GET", "/alerts"))[1]["alerts"]
        if a["event_id"] != incident["first_alert_id"]
    ]
    env.sent.clear()
    assert (await desk.call("POST", f"/alerts/{later}/acknowledged"))[0] == 200
    # the bell hears it about the alert it knows the incident by
    assert env.acks() == [
        ("bell-0001", incident["first_alert_id"], "acknowledged"),
        ("bell-0001", later, "acknowledged"),
    ]
    _, moved = await desk.call("GET", f"/incidents/{incident['id']}")
    assert moved["state"] == "acknowledged"


async def test_a_bell_pressed_again_after_its_own_cancel_hears_the_stage(desk: Desk) -> None:
    # the bell ended its own incident with the cancel; its new press is a new incident on
    # the bell, which knows only the new alert's id, while the desk's incident stays one
    env = desk.env
    await env.feed(env.message(ALERT, id="alert-before-1"))
    await env.feed(env.message(Cancel(alert_id="alert-before-1")))
    await env.feed(env.message(ALERT, id="alert-after-01"))
    _, listed = await desk.call("GET", "/incidents")
    (incident,) = listed["incidents"]
    assert incident["events"] == 3
    env.sent.clear()
    await desk.call("POST", f"/incidents/{incident['id']}/acknowledged")
    assert ("bell-0001", "alert-after-01", "acknowledged") in env.acks()
    # cancelled and pressed again once the desk has it: the new alert hears it at once
    await env.feed(env.message(Cancel(alert_id="alert-after-01")))
    env.sent.clear()
    await env.feed(env.message(ALERT, id="alert-later-01"))
    assert env.acks() == [
        ("bell-0001", "alert-later-01", "received"),
        ("bell-0001", "alert-later-01", "acknowledged"),
    ]


async def test_a_ring_that_becomes_an_emergency_upgrades_and_a_cancel_attaches(desk: Desk) -> None:
    env = desk.env
    ring = env.message(Alert(bell="doorbell", trigger="doorbell_ring"), "bell-0002")
    await env.feed(ring)
    _, (listed) = await desk.call("GET", "/incidents", token=GANGNAM)
    (incident,) = listed["incidents"]
    assert (incident["kind"], incident["priority"]) == ("doorbell_ring", 10)
    urgent = Alert(bell="doorbell", trigger="press", urgent=True, linked_to=incident["id"])
    await env.feed(env.message(urgent, "bell-0002"))
    await env.feed(env.message(Cancel(alert_id=incident["id"]), "bell-0002"))
    _, full = await desk.call("GET", f"/incidents/{incident['id']}", token=GANGNAM)
    assert (full["kind"], full["priority"], full["events"]) == ("doorbell_emergency", 5, 3)
    assert [(h["what"], h["detail"].get("type")) for h in full["history"]] == [
        ("event", "alert"),
        ("event", "alert"),
        ("kind", None),
        ("event", "cancel"),
    ]
    assert full["procedure"][0]["step"] == "view_camera"
    assert full["device"] == {
        "kind": "bell",
        "label": "",
        "online": True,
        "power": None,
        "last_seen_ms": NOW,
        "revoked": False,
    }


async def test_an_operator_sees_and_acts_on_their_districts_only(desk: Desk) -> None:
    env = desk.env
    await env.feed(env.message(ALERT, "bell-0001"))  # mapo
    _, listed = await desk.call("GET", "/incidents")
    (mapo,) = listed["incidents"]
    _, mine = await desk.call("GET", "/incidents", token=GANGNAM)
    assert mine["incidents"] == []
    for method, path in (
        ("GET", f"/incidents/{mapo['id']}"),
        ("POST", f"/incidents/{mapo['id']}/acknowledged"),
        ("POST", f"/incidents/{mapo['id']}/procedure/call_victim"),
    ):
        assert (await desk.call(method, path, token=GANGNAM))[0] == 404
    _, still = await desk.call("GET", f"/incidents/{mapo['id']}")
    assert still["state"] == "new" and still["procedure"][0]["done"] is None


async def test_procedure_ticks_are_audited_with_operator_and_time(desk: Desk) -> None:
    env = desk.env
    await env.feed(env.message(ALERT))
    _, listed = await desk.call("GET", "/incidents")
    path = f"/incidents/{listed['incidents'][0]['id']}/procedure"
    env.clock.ms += 5_000
    status, full = await desk.call(
        "POST", f"{path}/call_victim", headers={"X-Ansimi-Operator": "lee@desk"}
    )
    assert status == 200
    (ticked,) = [s for s in full["procedure"] if s["step"] == "call_victim"]
    assert ticked["done"] == {"at_ms": NOW + 5_000, "actor": "central/lee@desk"}
    assert full["history"][-1] == {
        "at_ms": NOW + 5_000,
        "what": "procedure",
        "actor": "central/lee@desk",
        "event_id": None,
        "detail": {"step": "call_victim", "done": True},
    }
    assert (await desk.call("POST", f"{path}/view_camera"))[0] == 404  # not a bell's step
    status, _ = await desk.call(
        "POST", f"{path}/confirm_safe", headers={"X-Ansimi-Operator": "lee\u00e9 desk"}
    )
    assert status == 400 and desk.refused("bad_operator") == 1
    assert (await desk.call("GET", "/incidents?state=shut"))[0] == 400


async def test_every_incident_route_refuses_an_unknown_incident_and_a_bad_operator(
    desk: Desk,
) -> None:
    await desk.env.feed(desk.env.message(ALERT))
    _, listed = await desk.call("GET", "/incidents")
    known = listed["incidents"][0]["id"]
    unknown = "alert-unknown-0001"
    bad_operator = {"X-Ansimi-Operator": "lee\u00e9 desk"}
    paths = [
        (r.method, r.path.replace("{step}", "call_victim"))
        for r in IncidentRoutes(desk.env.store, desk.env.downlink, desk.env.metrics, {}).routes()
        if "{incident_id}" in r.path
    ]
    assert len(paths) == 5  # one, procedure, and the three stages
    for method, path in paths:
        # the central token serves every district: the route itself says it is unknown
        status, answer = await desk.call(method, path.format(incident_id=unknown))
        assert (status, answer) == (404, {"error": "no such incident"}), path
        status, _ = await desk.call(method, path.format(incident_id=known), headers=bad_operator)
        # a read names no actor: only the routes that act check the operator's name
        assert status == (200 if method == "GET" else 400), path
    assert desk.refused("bad_operator") == 4


async def test_an_unacknowledged_incident_escalates_along_the_chain(desk: Desk) -> None:
    env = desk.env
    await env.feed(env.message(ALERT))  # stalking: priority 4, 60 s a step
    await env.feed(env.message(Alert(bell="emergency", trigger="duress"), "bell-0002"))  # 30 s
    env.clock.ms = NOW + 29_999
    assert await desk.escalator.tick() == 0
    assert desk.escalator.next_due_ms == NOW + 30_000  # the loop wakes for it, not later
    env.clock.ms = NOW + 30_000
    assert await desk.escalator.tick() == 1
    assert desk.escalator.next_due_ms == NOW + 60_000  # both: the press's, the duress's 2nd
    assert await desk.escalator.tick() == 0  # a step is taken once
    env.clock.ms = NOW + 60_000
    assert await desk.escalator.tick() == 2  # the duress's second, the press's first
    _, listed = await desk.call("GET", "/incidents")
    duress, press = listed["incidents"]
    assert (duress["escalation_level"], duress["escalated_to"]) == (2, ["mapo", "central"])
    assert (press["escalation_level"], press["escalated_to"]) == (1, ["mapo"])
    assert press["next_escalation_ms"] == NOW + 120_000
    # each step a gateway-signed event forwarded to that step's centre only
    escalations = [d for d in env.store.database.due_for("mapo", env.clock.ms, 100)]
    (step,) = [d for d in escalations if d.type == "escalation" and d.device_id == "bell-0001"]
    opened = open_envelope(step.jws, {GATEWAY: GATEWAY_KEY.public_key()}.__getitem__)
    assert isinstance(opened.message, EscalationMessage)
    assert (opened.message.body.incident, opened.message.body.to) == (press["id"], "mapo")
    body = json.loads(delivery_body(step, "mapo"))
    assert (body["incident_id"], body["kind"], body["priority"]) == (press["id"], "stalking", 4)
    _, full = await desk.call("GET", f"/incidents/{press['id']}")
    assert full["history"][-1]["what"] == "escalation"
    assert full["history"][-1]["detail"] == {"level": 1, "to": "mapo"}
    # acknowledged: no more steps
    await desk.call("POST", f"/incidents/{press['id']}/acknowledged")
    env.clock.ms = NOW + 10 * 60_000
    assert await desk.escalator.tick() == 1  # the duress's last (police); the press's none
    _, listed = await desk.call("GET", "/incidents")
    assert [i["escalation_level"] for i in listed["incidents"]] == [3, 1]


async def test_a_test_press_opens_no_incident_and_never_escalates(desk: Desk) -> None:
    env = desk.env
    await env.feed(env.message(Alert(bell="emergency", trigger="test"), id="alert-test-0001"))
    env.clock.ms = NOW + 60 * 60_000  # far past every step of the chain
    assert await desk.escalator.tick() == 0
    assert (await desk.call("GET", "/incidents"))[1]["incidents"] == []
    due = env.store.database.due_for("mapo", env.clock.ms, 100)
    assert [d for d in due if d.type == "escalation"] == []
    # kept and forwarded as any alert: the centre shows it as a test
    _, alerts = await desk.call("GET", "/alerts")
    assert [a["event_id"] for a in alerts["alerts"]] == ["alert-test-0001"]


async def test_escalation_survives_a_gateway_restart(desk: Desk) -> None:
    env = desk.env
    await env.feed(env.message(ALERT))
    env.clock.ms = NOW + 60_000
    assert await desk.escalator.tick() == 1
    # a new gateway on the same store: it continues from the store's state
    restarted = await make_env(env.clock, env.store)
    escalator = Escalator(
        restarted.store, restarted.downlink, CHAIN, lambda _p: 60.0, clock_ms=restarted.clock
    )
    assert await escalator.tick() == 0  # step 1 is not taken again
    env.clock.ms = NOW + 120_000
    assert await escalator.tick() == 1
    (incident,) = await env.store.incidents("open", 10)
    assert incident.escalated_to == ("mapo", "central")


def test_an_escalation_reaches_a_dc09_receiver_as_its_incidents_kind() -> None:
    # every kind, as pysiaalarm decodes it: tests/integration/gateway/test_gw_sia_receiver.py
    step = {"incident": "a" * 26, "level": 1, "to": "monitoring", "priority": 4}
    assert sia_event("escalation", {**step, "kind": "stalking"}) == ALERT_EVENTS["press"]
    assert sia_event("escalation", {**step, "kind": "duress"}) == ALERT_EVENTS["duress"]
    assert sia_event("escalation", {**step, "kind": "offline"}) == STATUS_EVENTS["offline"]


def test_the_escalation_chain_names_configured_centres(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[incidents]\nescalation = ["central", "polise"]\n' + CENTRAL_TOML)
    with pytest.raises(
        ConfigError, match=r"'polise', which is no \[\[centres\]\].*Fix: use one of"
    ):
        load_config(path, GatewayConfig)
    path.write_text("[incidents]\nescalate_after_s = { soon = 5.0 }\n" + CENTRAL_TOML)
    with pytest.raises(ConfigError, match="escalate_after_s keys are"):
        load_config(path, GatewayConfig)
    path.write_text(
        '[incidents]\nescalation = ["central"]\npriorities = { doorbell_ring = 1 }\n'
        + 'escalate_after_s = { default = 90.0, "1" = 15.0 }\n'
        + CENTRAL_TOML
    )
    incidents = load_config(path, GatewayConfig).incidents
    assert (incidents.after_s(1), incidents.after_s(4)) == (15.0, 90.0)
    assert incidents.priority_of_kind() == {"doorbell_ring": 1}


async def test_configured_priorities_decide_the_kind_and_the_upgrade() -> None:
    # a city that ranks a plain press above a long one (a made-up order, to see it obeyed)
    store = SqliteStore(":memory:", {"stalking": 1, "stalking_urgent": 2})
    public = public_key_to_b64(KEYS["bell-0001"].public_key())
    store.database.add_device(Device("bell-0001", public, "bell", "mapo"), 0)
    env = await make_env(store=store)
    await env.feed(env.message(Alert(bell="emergency", trigger="long_press")))
    (incident,) = await store.incidents("open", 10)
    assert (incident.kind, incident.priority) == ("stalking_urgent", 2)
    await env.feed(env.message(ALERT))
    (incident,) = await store.incidents("open", 10)
    assert (incident.kind, incident.priority) == ("stalking", 1)


async def test_an_outage_stays_the_districts_whatever_the_priorities_rank_above_it() -> None:
    # a city that ranks a bell offline above its district's outage: the bells gone silent
    # still join the one outage, which an offline bell never turns into its own incident
    store = SqliteStore(":memory:", {"offline": 1})
    mapo = ("bell-0001", "bell-0003")
    for device_id in mapo:
        store.database.add_device(Device(device_id, "key", "bell", "mapo"), 0)

    def status(event_id: str, device_id: str, **body: object) -> Incoming:
        return Incoming(event_id, device_id, 1, "status", NOW, json.dumps(body), "jws", ())

    beats = [Incoming(f"hb-{d}", d, 1, "heartbeat", NOW, "{}", "jws", (), kept=False) for d in mapo]
    await store.accept_batch(beats, 50)  # heard from: online until silent
    told = status("outage-0001", "bell-0001", state="district_outage", district="mapo", count=2)
    await store.add_event(told, 100)
    gone = [status(f"off-{d}", d, state="offline") for d in mapo]
    assert await store.mark_offline(gone, 100, 100) == [True, True]
    (outage,) = await store.incidents("open", 10)
    assert (outage.incident_id, outage.kind, outage.events) == ("outage-0001", "district_outage", 3)


def test_every_kind_has_a_checklist_in_both_languages() -> None:
    # a card without one shows the operator nothing to do (a district outage had none)
    procedures = IncidentsConfig().procedures()
    for kind in KINDS:
        assert procedures.get(kind), f"no checklist for {kind}"
        assert all(step.ko and step.en for step in procedures[kind])
