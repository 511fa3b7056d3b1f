"""The fleet view: every bell in the token's districts, and why it needs a visit.

One row per device from what the gateway already knows: the registry (online, last seen,
power), the last heartbeat (gateway/fleethealth.py: battery, signal, outbox, firmware, clock
drift), the test presses (gateway/testwatch.py: where the last failed test stopped), the
certificates (gateway/certwatch.py) and the remote config (gateway/remote_config.py).
`needs_visit` lists the reasons, each a word the console translates: offline, test_failed,
cert_expiring, clock_drift, low_battery, outbox_backlog. Nothing is read from the store on
a request: the view costs the gateway nothing while nobody looks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.api import TOKEN_KEY, ApiRoute, _op
from gateway.certwatch import CertExpiry
from gateway.fleethealth import FleetHealth
from gateway.store import Device
from protocol.clock import wall_ms

REASONS = (
    "offline",
    "test_failed",
    "cert_expiring",
    "clock_drift",
    "low_battery",
    "outbox_backlog",
)


@dataclass(frozen=True, slots=True)
class VisitRules:
    cert_warn_ms: int
    low_battery_pct: int
    outbox_backlog: int


class FleetView:
    def __init__(
        self,
        *,
        devices: Callable[[], Iterable[Device]],
        supervised: Callable[[str], bool],
        health: FleetHealth,
        failed_tests: Mapping[str, str],
        certs: Callable[[], Iterable[CertExpiry]],
        config_states: Callable[[], Mapping[str, str]],
        rules: VisitRules,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._devices = devices
        self._supervised = supervised  # heard within its heartbeat timeout (supervise.py)
        self._health = health
        self._failed_tests = failed_tests
        self._certs = certs
        self._config_states = config_states
        self._rules = rules
        self._clock_ms = clock_ms or wall_ms

    def rows(self, districts: Iterable[str] = ("*",)) -> list[dict[str, Any]]:
        seen = set(districts)
        now = self._clock_ms()
        cert_of = {c.subject: c.not_after_ms for c in self._certs() if c.kind == "device"}
        configs = self._config_states()
        rows = []
        for device in self._devices():
            if "*" not in seen and device.district not in seen:
                continue
            rows.append(self._row(device, now, cert_of.get(device.device_id), configs))
        return sorted(rows, key=lambda r: r["device_id"])

    def _row(
        self, device: Device, now: int, cert_ms: int | None, configs: Mapping[str, str]
    ) -> dict[str, Any]:
        rules = self._rules
        last = self._health.last.get(device.device_id)
        beat = None if last is None else last.heartbeat
        failed = self._failed_tests.get(device.device_id)
        # online: the supervisor watches it now; offline: known once, not watched any more
        # (the registry's copy of the store's flag may be minutes old); None: never heard
        online = self._supervised(device.device_id) or (
            None if device.online is None and device.last_seen_ms is None else False
        )
        reasons = []
        if online is False:
            reasons.append("offline")
        if failed is not None:
            reasons.append("test_failed")
        if cert_ms is not None and cert_ms - now <= rules.cert_warn_ms:
            reasons.append("cert_expiring")
        if device.device_id in self._health.drifting:
            reasons.append("clock_drift")
        if beat is not None:
            # a low charge on mains is a charging battery, not a visit
            battery = beat.battery_pct
            if beat.power == "battery" and battery is not None and battery < rules.low_battery_pct:
                reasons.append("low_battery")
            if beat.outbox_depth >= rules.outbox_backlog:
                reasons.append("outbox_backlog")
        return {
            "device_id": device.device_id,
            "district": device.district,
            "kind": device.kind,
            "online": online,
            "last_seen_ms": device.last_seen_ms,
            "power": None if beat is None else beat.power,
            "battery_pct": None if beat is None else beat.battery_pct,
            "link_quality": None if beat is None else beat.link_quality,
            "outbox_depth": None if beat is None else beat.outbox_depth,
            "firmware": None if beat is None else beat.firmware,
            "clock_drift_ms": None if last is None else last.drift_ms,
            "test_failed_at": failed,
            "cert_not_after_ms": cert_ms,
            "config": configs.get(device.device_id, "unknown"),
            "needs_visit": reasons,
        }

    def routes(self) -> list[ApiRoute]:
        return [
            ApiRoute(
                "GET",
                "/fleet",
                self.listing,
                "operator",
                _op(
                    "every device of the token's districts with its health and the reasons it"
                    " needs a visit",
                    [200, 401, 403],
                ),
            )
        ]

    async def listing(self, request: web.Request) -> web.Response:
        rows = self.rows(request[TOKEN_KEY].districts)
        return web.json_response({"devices": rows, "reasons": list(REASONS)})
