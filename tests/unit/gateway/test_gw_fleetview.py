"""The fleet view: each bell's health, and the reasons it needs a visit, per district."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from gw_testkit import CENTRAL, GANGNAM, NOW, PRIVACY_TOKENS, heartbeat, make_env

from gateway.api import Api
from gateway.certwatch import DAY_MS, CertExpiry
from gateway.fleethealth import DRIFT_CONFIRM_MS, FleetHealth
from gateway.fleetview import FleetView, VisitRules
from gateway.intake import KeptHeartbeat
from gateway.metrics import Metrics
from gateway.store import Device

DEVICES = [
    Device("bell-0001", "k", "bell", "mapo", online=True),
    # the registry still says online (read at start): the supervisor no longer watches it
    Device("bell-0002", "k", "bell", "gangnam", online=True, last_seen_ms=NOW - 60_000),
    Device("bell-0004", "k", "bell", "mapo", online=True),
    Device("bell-0005", "k", "store", "mapo"),  # never heard from
]
SUPERVISED = {"bell-0001", "bell-0004"}


def beat(device_id: str, *, drift_ms: int = 0, **fields: object) -> KeptHeartbeat:
    return KeptHeartbeat(device_id, NOW + drift_ms, heartbeat().model_copy(update=fields))


# when heartbeats arrive at the fleet health (a drift is flagged once it has lasted)
ARRIVAL = [NOW]


def make_view() -> tuple[FleetView, FleetHealth, dict[str, str]]:
    ARRIVAL[0] = NOW
    health = FleetHealth(
        Metrics(),
        district_of={d.device_id: d.district for d in DEVICES}.get,
        drift_flag_ms=60_000,
        clock_ms=lambda: ARRIVAL[0],
    )
    failed: dict[str, str] = {}
    certs = [
        CertExpiry("bell-0001", "device", "01", NOW + 10 * DAY_MS),  # within 30 days
        CertExpiry("bell-0004", "device", "02", NOW + 300 * DAY_MS),
        CertExpiry("ca", "site_ca", "03", NOW + 1 * DAY_MS),  # not a bell's
    ]
    view = FleetView(
        devices=lambda: DEVICES,
        supervised=SUPERVISED.__contains__,
        health=health,
        failed_tests=failed,
        certs=lambda: certs,
        config_states=lambda: {"bell-0001": "in_sync", "bell-0004": "drift"},
        rules=VisitRules(cert_warn_ms=30 * DAY_MS, low_battery_pct=20, outbox_backlog=5),
        clock_ms=lambda: NOW,
    )
    return view, health, failed


def test_each_reason_for_a_visit_comes_from_what_the_gateway_knows() -> None:
    view, health, failed = make_view()
    drifting = beat("bell-0004", drift_ms=90_000, power="mains", battery_pct=10)
    health.heartbeats([drifting])
    ARRIVAL[0] += DRIFT_CONFIRM_MS  # still as far off: it lasted
    health.heartbeats(
        [
            beat("bell-0001", power="battery", battery_pct=15, outbox_depth=7),
            beat("bell-0004", drift_ms=90_000 + DRIFT_CONFIRM_MS, power="mains", battery_pct=10),
        ]
    )
    failed["bell-0004"] = "centre"
    rows = {r["device_id"]: r for r in view.rows()}
    assert rows["bell-0001"]["needs_visit"] == ["cert_expiring", "low_battery", "outbox_backlog"]
    # on mains a low charge is a battery charging; the clock and the failed test are visits
    assert rows["bell-0004"]["needs_visit"] == ["test_failed", "clock_drift"]
    assert rows["bell-0004"]["test_failed_at"] == "centre"
    assert rows["bell-0004"]["config"] == "drift"
    assert rows["bell-0002"]["needs_visit"] == ["offline"]
    # never heard from: nothing known against it
    assert rows["bell-0005"]["needs_visit"] == [] and rows["bell-0005"]["online"] is None
    assert rows["bell-0005"]["config"] == "unknown"


async def test_each_desk_sees_its_own_districts_only() -> None:
    env = await make_env()
    view, _, _ = make_view()
    api = Api(
        env.store, env.registry, env.downlink, env.metrics, PRIVACY_TOKENS, connected=lambda: True
    )
    api.add_routes(view.routes())
    async with TestClient(TestServer(api.app())) as client:

        async def listed(token: str) -> list[str]:
            headers = {"Authorization": f"Bearer {token}"}
            async with client.get("/fleet", headers=headers) as response:
                assert response.status == 200
                return [r["device_id"] for r in (await response.json())["devices"]]

        assert await listed(CENTRAL) == ["bell-0001", "bell-0002", "bell-0004", "bell-0005"]
        assert await listed(GANGNAM) == ["bell-0002"]
