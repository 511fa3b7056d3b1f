"""The operator HTTP API against a gateway's insides (in-memory store, captured downlink)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from gw_testkit import ALERT, KEYS, Env, large_fleet, make_env
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from gateway.api import Api, ApiRoute
from gateway.config import ApiToken
from protocol.keys import public_key_to_b64
from protocol.messages import Alert

OPERATOR = "operator-token-0123456789"
ADMIN = "admin-token-0123456789abc"
GANGNAM_DESK = "gangnam-desk-token-01234"
MAPO_ADMIN = "mapo-admin-token-0123456"
TOKENS = [
    ApiToken(name="central", role="operator", token=OPERATOR),
    ApiToken(name="installer", role="admin", token=ADMIN),
    ApiToken(name="gangnam-desk", role="operator", token=GANGNAM_DESK, districts=["gangnam"]),
    ApiToken(name="mapo-installer", role="admin", token=MAPO_ADMIN, districts=["mapo"]),
]


@dataclass
class Site:
    env: Env
    api: Api
    client: TestClient[web.Request, web.Application]
    connected: list[bool]

    async def call(
        self, method: str, path: str, token: str | None = OPERATOR, **kw: object
    ) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.client.request(method, path, headers=headers, **kw) as response:  # type: ignore[arg-type]
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


def extra_route() -> ApiRoute:
    async def enrol(request: web.Request) -> web.Response:
        return web.json_response({"enrolled": True})

    return ApiRoute(
        "POST",
        "/enrol",
        enrol,
        "admin",
        {"summary": "provisioning's enrolment", "responses": {"200": {"description": "OK"}}},
    )


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    env = await make_env()
    connected = [True]
    api = Api(
        env.store,
        env.registry,
        env.downlink,
        env.metrics,
        TOKENS,
        connected=lambda: connected[0],
        clock_ms=env.clock,
    )
    api.add_routes([extra_route()])  # as provisioning will, from its own module
    async with TestClient(TestServer(api.app())) as client:
        yield Site(env, api, client, connected)


def described(api: Api) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in api.openapi()["paths"].items()
        for method in operations
    }


async def test_openapi_describes_every_route_and_nothing_else(site: Site) -> None:
    served = {
        (route.method, route.resource.canonical)
        for route in site.client.app.router.routes()  # type: ignore[union-attr]
        if route.method != "HEAD" and route.resource is not None
    }
    assert served == described(site.api)
    assert ("POST", "/enrol") in served
    status, spec = await site.call("GET", "/openapi.json", token=None)
    assert status == 200 and isinstance(spec, dict)
    assert spec["paths"]["/admin/devices"]["post"]["security"] == [{"admin": []}]
    for operations in spec["paths"].values():
        for operation in operations.values():
            assert operation["summary"] and operation["responses"]


async def test_a_test_press_is_acknowledged_but_never_dispatched(site: Site) -> None:
    env = site.env
    await env.feed(env.message(Alert(bell="emergency", trigger="test"), id="alert-test-01"))
    env.sent.clear()
    status, body = await site.call("POST", "/alerts/alert-test-01/dispatched")
    assert status == 409 and "never dispatched" in body["error"]
    refused = {"reason": "test_dispatch"}
    assert env.metrics.registry.get_sample_value("ansimi_api_refused_total", refused) == 1
    assert env.acks() == []  # the bell is told nothing
    status, body = await site.call("POST", "/alerts/alert-test-01/acknowledged")
    assert status == 200 and body["state"] == "acknowledged"
    assert env.acks() == [("bell-0001", "alert-test-01", "acknowledged")]


async def test_every_protected_route_refuses_a_missing_or_wrong_token(site: Site) -> None:
    protected = [
        (m, p.replace("{event_id}", "x").replace("{device_id}", "bell-0001"))
        for m, p in described(site.api)
        if p not in ("/healthz", "/openapi.json")
    ]
    assert len(protected) == 11
    for method, path in protected:
        for token in (None, "wrong-token-0123456789", OPERATOR[:-1]):
            async with site.client.request(
                method,
                path,
                headers={"Authorization": f"Bearer {token}"} if token else {},
            ) as response:
                assert response.status == 401, (method, path, token)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_operator_and_admin_tokens_do_not_cross(site: Site) -> None:
    assert (await site.call("POST", "/admin/devices/bell-0001/revoke"))[0] == 403
    assert (await site.call("POST", "/enrol"))[0] == 403
    assert (await site.call("GET", "/devices", token=ADMIN))[0] == 403
    assert (await site.call("POST", "/enrol", token=ADMIN)) == (200, {"enrolled": True})


async def test_healthz_is_public_and_tells_the_broker_state(site: Site) -> None:
    assert await site.call("GET", "/healthz", token=None) == (
        200,
        {"ok": True, "mqtt": "connected"},
    )
    site.connected[0] = False
    assert (await site.call("GET", "/healthz", token=None))[0] == 503


async def test_an_operator_moves_an_alert_forward_and_the_bell_is_told(site: Site) -> None:
    env = site.env
    await env.feed(env.message(ALERT, id="alert-api-01"))
    env.sent.clear()
    status, body = await site.call("POST", "/alerts/alert-api-01/acknowledged")
    assert (status, body) == (
        200,
        {"event_id": "alert-api-01", "moved": True, "state": "acknowledged"},
    )
    assert env.acks() == [("bell-0001", "alert-api-01", "acknowledged")]
    # again: nothing moves, the bell is not told twice
    status, body = await site.call("POST", "/alerts/alert-api-01/acknowledged")
    assert body == {"event_id": "alert-api-01", "moved": False, "state": "acknowledged"}
    # skipping ahead is fine; going back is not
    await site.call("POST", "/alerts/alert-api-01/closed")
    status, body = await site.call("POST", "/alerts/alert-api-01/dispatched")
    assert body == {"event_id": "alert-api-01", "moved": False, "state": "closed"}
    assert [a[2] for a in env.acks()] == ["acknowledged", "closed"]
    status, body = await site.call("GET", "/alerts/alert-api-01")
    assert isinstance(body, dict)
    assert [(s["stage"], s["actor"]) for s in body["stages"]] == [
        ("acknowledged", "central"),
        ("closed", "central"),
    ]
    assert (await site.call("POST", "/alerts/no-such-alert/closed"))[0] == 404


async def test_alerts_are_listed_by_state(site: Site) -> None:
    env = site.env
    # two bells: one bell's alerts are one incident, acknowledged together
    second = env.message(ALERT, "bell-0002", id="alert-list-2")
    await env.feed(env.message(ALERT, id="alert-list-1"), second)
    await site.call("POST", "/alerts/alert-list-2/acknowledged")
    _, received = await site.call("GET", "/alerts?state=received")
    _, everything = await site.call("GET", "/alerts")
    assert isinstance(received, dict) and isinstance(everything, dict)
    assert [a["event_id"] for a in received["alerts"]] == ["alert-list-1"]
    assert received["alerts"][0]["body"]["trigger"] == "press"
    assert {a["event_id"] for a in everything["alerts"]} == {"alert-list-1", "alert-list-2"}
    assert (await site.call("GET", "/alerts?state=lost"))[0] == 400
    assert (await site.call("GET", "/alerts?limit=many"))[0] == 400


async def test_metrics_and_devices(site: Site) -> None:
    env = site.env
    await env.feed(env.message(ALERT, device="bell-0009"))  # unknown: refused
    status, text = await site.call("GET", "/metrics")
    assert status == 200
    assert 'ansimi_rejected_total{reason="unknown_device"} 1.0' in str(text)
    _, body = await site.call("GET", "/devices")
    assert isinstance(body, dict)
    devices = {d["id"]: d for d in body["devices"]}
    assert set(devices) == {"bell-0001", "bell-0002", "bell-0003"}
    assert devices["bell-0003"]["revoked"] is True
    assert "public_key" not in devices["bell-0001"]


class _Gate:
    """A collector whose family, when its samples are read, waits (5 s at most) for the test
    to take an alert in, and notes whether it could."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.alert_taken = threading.Event()
        self.taken_while_writing: list[bool] = []

    def collect(self) -> list[Metric]:
        gate = self

        class Family(GaugeMetricFamily):
            @property
            def samples(self) -> list[Sample]:
                gate.reading.set()
                gate.taken_while_writing.append(gate.alert_taken.wait(5))
                return self._samples

            @samples.setter
            def samples(self, samples: list[Sample]) -> None:
                self._samples = samples

        family = Family("test_gate", "read last")
        family._samples = [Sample("test_gate", {}, 1)]  # not `add_metric`: it reads `samples`
        return [family]


async def test_alerts_are_taken_in_while_a_large_fleet_is_scraped(site: Site) -> None:
    """Writing the text of 10,000 devices' series takes ~0.5 s: off the loop, in a thread.
    What the scrape shows was read on the loop at one instant, before the alert."""
    env = site.env
    large_fleet(env.metrics, 10_000, env.clock)
    gate = _Gate()
    env.metrics.registry.register(gate)
    scrape = asyncio.create_task(site.call("GET", "/metrics"))
    assert await asyncio.to_thread(gate.reading.wait, 10)
    await env.feed(env.message(ALERT, id="alert-during-scrape"))
    assert ("bell-0001", "alert-during-scrape", "received") in env.acks()
    gate.alert_taken.set()
    status, text = await scrape
    assert status == 200 and gate.taken_while_writing == [True]
    assert str(text).count("ansimi_device_on_battery{") == 10_000
    assert 'ansimi_accepted_total{type="alert"}' not in str(text)  # counted after the read
    _, after = await site.call("GET", "/metrics")
    assert 'ansimi_accepted_total{type="alert"} 1.0' in str(after)


async def test_admin_registers_and_revokes_with_immediate_effect(site: Site) -> None:
    env = site.env
    new = {
        "id": "bell-0009",
        "public_key": public_key_to_b64(KEYS["bell-0009"].public_key()),
        "kind": "bell",
        "district": "gangnam",
        "label": "test",
    }
    status, body = await site.call("POST", "/admin/devices", token=ADMIN, json=new)
    assert status == 201 and isinstance(body, dict) and body["public_key"] == new["public_key"]
    await env.feed(env.message(ALERT, device="bell-0009"))
    assert env.event_count() == 1
    assert (await site.call("POST", "/admin/devices", token=ADMIN, json=new))[0] == 409
    bad = {**new, "id": "bell-0010", "public_key": "x" * 43}
    assert (await site.call("POST", "/admin/devices", token=ADMIN, json=bad))[0] == 400
    assert (await site.call("POST", "/admin/devices", token=ADMIN, data=b"{"))[0] == 400
    typo = {**new, "id": "bell-0010", "district": "gangnamm"}
    status, body = await site.call("POST", "/admin/devices", token=ADMIN, json=typo)
    assert status == 400 and 'did you mean "gangnam"' in str(body)

    status, body = await site.call("POST", "/admin/devices/bell-0009/revoke", token=ADMIN)
    assert (status, body) == (200, {"device_id": "bell-0009", "revoked": True})
    await env.feed(env.message(ALERT, device="bell-0009"))
    assert env.rejected("revoked") == 1
    assert env.event_count() == 1
    _, body = await site.call("GET", "/admin/devices/bell-0009", token=ADMIN)
    assert isinstance(body, dict) and body["revoked"] is True
    # when, so a centre can still take what the device signed before (console/directory.py)
    revoked_at = env.clock()
    assert body["revoked_ms"] == revoked_at
    env.clock.ms += 5_000
    await site.call("POST", "/admin/devices/bell-0009/revoke", token=ADMIN)  # again
    _, listed = await site.call("GET", "/devices?keys=1")
    assert isinstance(listed, dict)
    (entry,) = [d for d in listed["devices"] if d["id"] == "bell-0009"]
    assert entry["revoked_ms"] == revoked_at  # the first revocation counts
    assert entry["public_key"] == new["public_key"]  # its key too, to check old signatures
    assert (await site.call("GET", "/admin/devices/bell-0404", token=ADMIN))[0] == 404
    assert (await site.call("POST", "/admin/devices/bell-0404/revoke", token=ADMIN))[0] == 404


async def test_a_route_added_behind_the_apis_back_is_closed(site: Site) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="secret")

    app = site.api.app()
    app.router.add_get("/sneaky", handler)  # allow_head: HEAD /sneaky too
    async with TestClient(TestServer(app)) as client:
        for method in ("GET", "HEAD"):
            async with client.request(method, "/sneaky") as response:
                assert response.status == 401
        async with client.get("/sneaky", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200
        async with client.request("HEAD", "/devices") as response:
            assert response.status == 405  # no HEAD route: aiohttp says so


def test_an_added_route_must_be_described(site: Site) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    with pytest.raises(ValueError, match="summary and responses"):
        site.api.add_routes([ApiRoute("GET", "/undocumented", handler, "operator")])
    with pytest.raises(ValueError, match="already a route"):
        site.api.add_routes([extra_route()])


async def test_a_desk_sees_and_moves_only_its_own_districts(site: Site) -> None:
    env = site.env
    await env.feed(
        env.message(ALERT, id="alert-mapo-01", device="bell-0001"),
        env.message(ALERT, id="alert-gangnam-1", device="bell-0002"),
    )
    env.sent.clear()
    # another district's alert does not exist for this desk: not shown, not moved
    for method, path in [
        ("GET", "/alerts/alert-mapo-01"),
        ("POST", "/alerts/alert-mapo-01/dispatched"),
        ("GET", "/alerts/no-such-alert-01"),  # the same answer: nothing to probe
    ]:
        status, body = await site.call(method, path, GANGNAM_DESK)
        assert (status, body) == (404, {"error": "not found in your districts"}), path
    assert env.acks() == []
    _, listed = await site.call("GET", "/alerts", GANGNAM_DESK)
    assert isinstance(listed, dict)
    assert [a["event_id"] for a in listed["alerts"]] == ["alert-gangnam-1"]
    _, devices = await site.call("GET", "/devices", GANGNAM_DESK)
    assert isinstance(devices, dict) and [d["id"] for d in devices["devices"]] == ["bell-0002"]
    # its own district, it moves; the central token moves any
    assert (await site.call("POST", "/alerts/alert-gangnam-1/dispatched", GANGNAM_DESK))[0] == 200
    assert (await site.call("POST", "/alerts/alert-mapo-01/dispatched"))[0] == 200
    assert env.acks() == [
        ("bell-0002", "alert-gangnam-1", "dispatched"),
        ("bell-0001", "alert-mapo-01", "dispatched"),
    ]


async def test_an_admin_registers_only_in_its_own_districts(site: Site) -> None:
    new = {
        "id": "bell-0009",
        "public_key": public_key_to_b64(KEYS["bell-0009"].public_key()),
        "kind": "bell",
        "district": "gangnam",
    }
    status, body = await site.call("POST", "/admin/devices", token=MAPO_ADMIN, json=new)
    assert status == 403 and "gangnam is not one of this token's: mapo" in str(body)
    assert site.env.store.database.device("bell-0009") is None
    status, _ = await site.call(
        "POST", "/admin/devices", token=MAPO_ADMIN, json={**new, "district": "mapo"}
    )
    assert status == 201 and site.env.store.database.device("bell-0009") is not None
    # another district's device, by its id in the path: as if it did not exist
    for method, path in [
        ("GET", "/admin/devices/bell-0002"),
        ("POST", "/admin/devices/bell-0002/revoke"),
    ]:
        assert (await site.call(method, path, token=MAPO_ADMIN))[0] == 404, path
    gangnam = site.env.store.database.device("bell-0002")
    assert gangnam is not None and gangnam.district == "gangnam" and not gangnam.revoked


@pytest.mark.parametrize(
    "path",
    ["/alerts/..%2Falerts%2Falert-api-01%2Fclosed", "/alerts/%C2%B2%C2%B2%C2%B2%C2%B2/closed",
     "/admin/devices/BELL-0001", "/alerts/" + "a" * 65],
)  # fmt: skip
async def test_ids_breaking_their_grammar_are_refused_before_any_handler(
    site: Site, path: str
) -> None:
    token = ADMIN if path.startswith("/admin") else OPERATOR
    method = "POST" if path.endswith("/closed") else "GET"
    status, body = await site.call(method, path, token)
    assert status == 400 and isinstance(body, dict) and "is invalid" in body["error"]
    assert (
        'ansimi_api_refused_total{reason="bad_id"} 1.0' in (await site.call("GET", "/metrics"))[1]
    )  # type: ignore[operator]


@pytest.mark.parametrize("limit", ["%C2%B2", "-1", "%D9%A3", "9" * 19, "1e3"])
async def test_a_limit_that_is_not_ascii_digits_is_a_400_not_a_500(site: Site, limit: str) -> None:
    for path in ("/alerts", "/devices"):
        status, body = await site.call("GET", f"{path}?limit={limit}")
        assert status == 400 and isinstance(body, dict) and "whole number" in body["error"]


def test_a_route_taking_an_id_without_a_grammar_does_not_start(site: Site) -> None:
    async def thing(request: web.Request) -> web.Response:
        return web.json_response({})

    site.api.add_routes(
        [ApiRoute("GET", "/things/{thing}", thing, "operator", {"summary": "x", "responses": {}})]
    )
    with pytest.raises(ValueError, match="thing have no grammar"):
        site.api.app()


async def test_an_id_in_the_query_is_checked_like_one_in_the_path(site: Site) -> None:
    """`GET /admin/enrolments?device_id=` (enrolment's records) hands its id to SQL."""
    asked: list[str | None] = []

    async def records(request: web.Request) -> web.Response:
        asked.append(request.query.get("device_id"))
        return web.json_response({})

    site.api.add_routes(
        [ApiRoute("GET", "/records", records, "admin", {"summary": "x", "responses": {}})]
    )
    async with TestClient(TestServer(site.api.app())) as client:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for query in ("device_id=..%2Fx", "device_id=bell-0001&device_id=%C2%B2"):
            async with client.get(f"/records?{query}", headers=headers) as response:
                assert response.status == 400 and "is invalid" in (await response.text())
        async with client.get("/records?device_id=bell-0001", headers=headers) as response:
            assert response.status == 200
    assert asked == ["bell-0001"]  # only the valid one reached the handler
