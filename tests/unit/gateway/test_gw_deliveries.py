"""Deliveries no centre has accepted: listed with the reason, refused ones sent again,
each within the token's districts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from gw_testkit import ALERT, Env, due, make_env

from gateway.api import Api
from gateway.config import ApiToken
from gateway.deliveries import DeliveryRoutes

CENTRAL = "central-token-0123456789"
MAPO = "mapo-desk-token-01234567"
ADMIN_GANGNAM = "gangnam-admin-token-0123"
TOKENS = [
    ApiToken(name="central", role="operator", token=CENTRAL),
    ApiToken(name="mapo-desk", role="operator", token=MAPO, districts=["mapo"]),
    ApiToken(name="gangnam-admin", role="admin", token=ADMIN_GANGNAM, districts=["gangnam"]),
]
REASON = "HTTP 400: delivery's body differs from the signed payload's"


@dataclass
class Desk:
    env: Env
    client: TestClient[web.Request, web.Application]
    woken: list[int]

    async def call(self, method: str, path: str, token: str, **kw: object) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.client.request(method, path, headers=headers, **kw) as response:  # type: ignore[arg-type]
            return response.status, await response.json()

    async def listed(self, token: str, query: str = "") -> list[tuple[str, str, str]]:
        status, body = await self.call("GET", f"/deliveries{query}", token)
        assert status == 200 and isinstance(body, dict)
        return sorted((d["event_id"], d["centre"], d["state"]) for d in body["deliveries"])


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    env = await make_env()
    api = Api(env.store, env.registry, env.downlink, env.metrics, TOKENS, clock_ms=env.clock)
    woken: list[int] = []
    api.add_routes(DeliveryRoutes(env.store, lambda: woken.append(1), clock_ms=env.clock).routes())
    # bell-0001 is in mapo (centres central and mapo), bell-0002 in gangnam (central)
    await env.feed(
        env.message(ALERT, "bell-0001", id="alert-mapo-01"),
        env.message(ALERT, "bell-0002", id="alert-gangnam-01"),
    )
    await env.store.refused("alert-mapo-01", "mapo", env.clock.ms, REASON)
    await env.store.refused("alert-gangnam-01", "central", env.clock.ms, REASON)
    async with TestClient(TestServer(api.app())) as client:
        yield Desk(env, client, woken)


async def test_refused_deliveries_are_listed_with_their_reason_in_the_desks_districts(
    desk: Desk,
) -> None:
    assert await desk.listed(CENTRAL, "?state=refused") == [
        ("alert-gangnam-01", "central", "refused"),
        ("alert-mapo-01", "mapo", "refused"),
    ]
    assert await desk.listed(CENTRAL, "?state=waiting") == [("alert-mapo-01", "central", "waiting")]
    # a mapo desk sees mapo's deliveries only
    assert await desk.listed(MAPO) == [
        ("alert-mapo-01", "central", "waiting"),
        ("alert-mapo-01", "mapo", "refused"),
    ]
    _, body = await desk.call("GET", "/deliveries?state=refused&centre=mapo", MAPO)
    assert isinstance(body, dict)
    (row,) = body["deliveries"]
    assert (row["last_error"], row["district"], row["attempts"]) == (REASON, "mapo", 1)
    assert (await desk.call("GET", "/deliveries?state=lost", CENTRAL))[0] == 400
    assert (await desk.call("GET", "/deliveries?centre=..%2Fx", CENTRAL))[0] == 400


async def test_an_admin_sends_refused_deliveries_again_only_in_its_districts(desk: Desk) -> None:
    status, body = await desk.call("POST", "/admin/deliveries/retry", ADMIN_GANGNAM, json={})
    assert (status, body) == (200, {"retried": 1})
    assert desk.woken == [1]  # the forwarder looks at the outbox at once
    assert await desk.listed(CENTRAL, "?state=refused") == [("alert-mapo-01", "mapo", "refused")]
    now_due = {(d.event_id, d.centre) for d in due(desk.env.store, desk.env.clock.ms, 10)}
    assert ("alert-gangnam-01", "central") in now_due
    assert ("alert-mapo-01", "mapo") not in now_due
    # mapo's is outside the token's districts: untouched, whatever it names
    status, body = await desk.call(
        "POST", "/admin/deliveries/retry", ADMIN_GANGNAM, json={"event_id": "alert-mapo-01"}
    )
    assert body == {"retried": 0}
    status, body = await desk.call("POST", "/admin/deliveries/retry", MAPO, json={})
    assert status == 403  # an operator token cannot
    status, _ = await desk.call("POST", "/admin/deliveries/retry", ADMIN_GANGNAM, json={"x": 1})
    assert status == 400
