"""Test presses followed to the end: a bell whose test does not come through is found by it.

A test press (an alert with `trigger = "test"`, device/testpress.py) proves the whole path
when it comes back `delivered`. The gateway follows each one it knows of:
- one it asked for (`test_press` command): expected `received` within the deadline;
- one it kept: expected delivered to a centre within the deadline.
- every device: a test of its own at least once a period (its schedule, ansimi/testpress.py),
  counted from the last test seen, or from the gateway's start.
A test past its deadline becomes a `test_failed` status about the device, signed by the gateway
and kept for the device's centres like `offline` (gateway/supervise.py), naming the stage it
stopped at: `link` (never reached the gateway) or `centre` (reached it, not the centres).

Memory holds only the tests under way. Limit: after a gateway restart the tests under way are
forgotten (a lost test is reported by the next one, a period later).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import Counter

from gateway.api import TOKEN_KEY, ApiRoute, _error, _op, _path_param
from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Incoming, SupervisionStore
from gateway.supervise import RouteOf
from protocol.clock import wall_ms
from protocol.messages import Alert, Command, Status, TestStage

log = logging.getLogger(__name__)

TICK_S: Final = 30.0


@dataclass(slots=True)
class _Under:
    device_id: str
    due_ms: int
    event_id: str | None  # None: asked for, not yet received


class TestWatch:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        store: SupervisionStore,
        downlink: Downlink,
        metrics: Metrics,
        *,
        route_of: RouteOf,
        complete_within_ms: int,
        period_ms: int | None = None,
        devices: Callable[[], Iterable[str]] = tuple,
        clock_ms: Callable[[], int] | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._period_ms = period_ms  # None: scheduled tests are not expected
        self._devices = devices
        self._downlink = downlink
        self._route_of = route_of
        self._within_ms = complete_within_ms
        self._clock_ms = clock_ms or wall_ms
        self._on_event = on_event
        self._asked: dict[str, _Under] = {}  # device id -> a test asked for, not received
        self._kept: dict[str, _Under] = {}  # event id -> a test received, not delivered
        self._started_ms = self._clock_ms()
        self._last_test_ms: dict[str, int] = {}  # device id -> its last test seen (or missed)
        # device id -> where its last test stopped, until a test of it comes through
        self.failed: dict[str, TestStage] = {}
        self.outcomes = Counter(
            "ansimi_test_presses_total",
            "Test presses that came through (passed) or stopped at a stage (link, centre)",
            ["outcome"],
            registry=metrics.registry,
        )
        for outcome in ("passed", "link", "centre"):
            self.outcomes.labels(outcome)

    def asked(self, device_id: str) -> None:
        """A `test_press` command went to the device: its alert should come back in time."""
        self._asked[device_id] = _Under(device_id, self._clock_ms() + self._within_ms, None)

    def kept(self, items: Iterable[Incoming]) -> None:
        """Events just kept for the centres: the test presses among them are under way."""
        for item in items:
            if item.type != "alert" or item.event_id in self._kept:
                continue
            if Alert.model_validate_json(item.body_json).trigger != "test":
                continue
            self._asked.pop(item.device_id, None)
            self._last_test_ms[item.device_id] = self._clock_ms()
            due = self._clock_ms() + self._within_ms
            self._kept[item.event_id] = _Under(item.device_id, due, item.event_id)

    def delivered(self, event_id: str) -> None:
        """The first centre took the event: a test among them has proven the path."""
        test = self._kept.pop(event_id, None)
        if test is not None:
            self.failed.pop(test.device_id, None)
            self.outcomes.labels("passed").inc()
            log.info("test press of %s (%s) delivered: path proven", test.device_id, event_id)

    def routes(self) -> list[ApiRoute]:
        return [
            ApiRoute(
                "POST",
                "/admin/devices/{device_id}/test-press",
                self.ask,
                "admin",
                _op(
                    "ask the bell for a test press now; a test that does not come through in"
                    " time becomes a test_failed event for its district",
                    [200, 401, 403, 404],
                    parameters=[_path_param("device_id", "the device's id")],
                ),
            )
        ]

    async def ask(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        if not self.request(device_id):
            return _error(404, "no such device (or revoked)")
        log.warning("api: %s asked %s for a test press", request[TOKEN_KEY].name, device_id)
        return web.json_response({"device_id": device_id, "asked": True})

    def request(self, device_id: str) -> bool:
        """Send the bell a `test_press` command and follow it; False for no such bell."""
        if not self._route_of(device_id):
            return False
        # followed from now: a command the device never gets is a test stopped at the link
        self.asked(device_id)
        self._downlink.send(device_id, Command(name="test_press"))
        return True

    def under_way(self) -> int:
        return len(self._asked) + len(self._kept)

    async def tick(self) -> None:
        now = self._clock_ms()
        late: list[tuple[_Under, TestStage]] = [
            *((t, "link") for t in self._asked.values() if t.due_ms <= now),
            *((t, "centre") for t in self._kept.values() if t.due_ms <= now),
        ]
        late += ((t, "link") for t in self._missed(now))
        told = False
        for test, stage in late:
            # forgotten first: a store that fails must not report the same test every tick
            if test.event_id is None:
                self._asked.pop(test.device_id, None)
            else:
                del self._kept[test.event_id]
            told |= await self._report(test, stage)
        if told and self._on_event is not None:
            self._on_event()

    def _missed(self, now: int) -> list[_Under]:
        """Devices whose scheduled test has not come within a period and the deadline."""
        if self._period_ms is None:
            return []
        late_after = self._period_ms + self._within_ms
        missed = []
        for device_id in self._devices():
            last = self._last_test_ms.get(device_id, self._started_ms)
            if now - last >= late_after and device_id not in self._asked:
                self._last_test_ms[device_id] = now  # told once per period missed
                missed.append(_Under(device_id, now, None))
        return missed

    async def _report(self, test: _Under, stage: TestStage) -> bool:
        self.outcomes.labels(stage).inc()
        self.failed[test.device_id] = stage
        log.warning(
            "test press of %s stopped at the %s (%s): maintenance needed",
            test.device_id,
            stage,
            test.event_id or "asked, never received",
        )
        centres = self._route_of(test.device_id)
        if not centres:
            return False  # revoked or routed nowhere: nobody to tell
        status = Status(state="test_failed", stage=stage)
        event = self._downlink.event(test.device_id, status, centres)
        await self._store.add_event(event, self._clock_ms())
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception:
                log.exception("test presses: maintenance event not kept")
