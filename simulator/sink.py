"""The control-centre sink: the console's real receiver, watched, and breakable on purpose.

Deliveries go through `console.receiver.Receiver` (HMAC, idempotency, an `EventLog` in
SQLite), so the gateway talks to exactly what a centre runs. Around it the sink notes when
each event first arrived and how many times it was delivered, and can be taken down:
`503` answers every delivery with "unavailable", `refuse` stops listening altogether.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web

from ansimi.broker import free_port
from console.receiver import EventLog, ReceivedEvent, Receiver
from protocol.forwarding import IDEMPOTENCY_HEADER


@dataclass(slots=True)
class Arrival:
    device_id: str
    type: str
    body: dict[str, object]
    at: float  # wall clock, seconds
    deliveries: int = 1


@dataclass
class Sink:
    secret: str
    database: Path
    host: str = "127.0.0.1"
    port: int = 0
    arrivals: dict[str, Arrival] = field(default_factory=dict)
    # (device id, state, wall time) of every status event: supervision's online/offline;
    # a device listed in a `district_outage` counts as reported offline then, unless the
    # centre already had it offline (an earlier card, an earlier listing)
    statuses: list[tuple[str, str, float]] = field(default_factory=list)
    # (district, state, devices listed, wall time) of every district event
    district_events: list[tuple[str, str, int, float]] = field(default_factory=list)
    # district -> devices its open outage has listed so far
    _listed: dict[str, set[str]] = field(default_factory=dict)
    # devices the centre was told are offline and not told back since
    _down: set[str] = field(default_factory=set)
    answered_503: int = 0
    down: Literal["503", "refuse"] | None = None

    def __post_init__(self) -> None:
        self.receiver = Receiver(self.secret, EventLog(self.database))
        self.receiver.listeners.append(self._arrived)
        app = web.Application()
        app.add_routes([web.post("/events", self._handle)])
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/events"

    async def start(self) -> None:
        if self.port == 0:
            # a fixed port: the gateway's config names it, and `refuse` must come back on it
            self.port = free_port(self.host)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def close(self) -> None:
        await self._runner.cleanup()
        self.receiver.events.close()

    async def go_down(self, mode: Literal["503", "refuse"]) -> None:
        self.down = mode
        if mode == "refuse" and self._site is not None:
            await self._site.stop()
            self._site = None

    async def come_back(self) -> None:
        if self.down == "refuse":
            await self._listen()
        self.down = None

    def _arrived(self, event: ReceivedEvent) -> None:
        self.arrivals[event.event_id] = Arrival(
            event.device_id, event.type, event.body, time.time()
        )
        if event.type != "status":
            return
        state = str(event.body.get("state"))
        if state not in ("district_outage", "district_restored"):
            self.statuses.append((event.device_id, state, time.time()))
            (self._down.add if state == "offline" else self._down.discard)(event.device_id)
            return
        district = str(event.body.get("district"))
        offline = [str(d) for d in event.body.get("offline") or ()]
        self.district_events.append((district, state, len(offline), time.time()))
        if state == "district_restored":
            # those not listed as still offline are back (their online was the outage's)
            self._down -= self._listed.pop(district, set()) - set(offline)
            return
        listed = self._listed.setdefault(district, set())
        for device_id in offline:
            listed.add(device_id)
            if device_id not in self._down:  # an update lists again those it told
                self._down.add(device_id)
                self.statuses.append((device_id, "offline", time.time()))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.down is not None:
            self.answered_503 += 1
            return web.json_response({"error": "centre unavailable (simulated)"}, status=503)
        known = request.headers.get(IDEMPOTENCY_HEADER, "")
        seen = self.arrivals.get(known)
        response = await self.receiver.handle(request)
        if response.status == 200 and seen is not None:
            seen.deliveries += 1
        return response
