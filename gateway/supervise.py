"""Supervision: which devices are alive, told to the control centres as events.

A device is offline when nothing has been heard from it for `missed` heartbeat intervals
or its last will arrives, whichever comes first; heard from again, it is online.

Thousands of devices, no per-device timers: each watched device has one deadline in a
dict and at most one entry in a min-heap. A message only moves the dict's deadline (O(1));
the tick, once a second, pops only the entries that are due, and an entry whose device was
heard from since goes back at its new deadline. The clock is a parameter, so tests drive
`tick()` with a fake one.

Several gateway instances each see only the messages the shared subscription hands them,
so the store is the judge: every commit marks its devices seen, whichever instance made
it, and going offline is a conditional update ("still online, not seen since the cutoff")
in one transaction with its event. Exactly one instance reports it; a refused one re-arms
at the last-seen time the store knows.

Events: `status` events (online, offline) are `status` messages about the device signed by
the gateway (kid = gateway id), so a centre checks them like device messages, with the
gateway's public key; they are routed like the device's alerts. Power: a heartbeat that
changes the power source is kept and forwarded as it is, signed by the device (see
`Store.accept_batch`). Tamper: the device raises an alert (trigger `tamper`), forwarded
as every alert is; supervision adds nothing to it.

While the gateway's own broker connection is down it hears nobody: supervision pauses,
and on reconnect every deadline starts again from then, so a broker outage is not
reported as every device going offline.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Literal

from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Device, Incoming, Store
from protocol.messages import Status

log = logging.getLogger(__name__)

# Centres an event about this device goes to; None when the device is unknown or revoked.
RouteOf = Callable[[str], "tuple[str, ...] | None"]


class Supervisor:
    def __init__(
        self,
        store: Store,
        downlink: Downlink,
        metrics: Metrics,
        *,
        route_of: RouteOf,
        timeout_ms: int,
        tick_s: float = 1.0,
        clock_ms: Callable[[], int] | None = None,
        executor: Executor | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._downlink = downlink
        self._metrics = metrics
        self._route_of = route_of
        self.timeout_ms = timeout_ms
        self._tick_s = tick_s
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._executor = executor
        self._on_event = on_event
        self._deadline: dict[str, int] = {}  # watched device -> when it is overdue
        self._heap: list[tuple[int, str]] = []  # at most one entry per device
        self._queued: set[str] = set()  # devices with an entry in the heap
        self._paused = False

    # ---- what the intake tells us ---------------------------------------------------------

    def load(self, devices: Iterable[Device], now_ms: int) -> None:
        """Watch the devices the store says are online, as at start-up.

        Deadlines start no earlier than now: messages that waited in the broker while this
        gateway was down arrive first, and a gateway restart is not a fleet outage.
        """
        for device in devices:
            if device.online and not device.revoked:
                seen = max(device.last_seen_ms or 0, now_ms)
                self._arm(device.device_id, seen + self.timeout_ms)

    def heard(self, device_id: str, now_ms: int) -> None:
        self._arm(device_id, now_ms + self.timeout_ms)

    def watched(self) -> int:
        return len(self._deadline)

    def deadline(self, device_id: str) -> int | None:
        return self._deadline.get(device_id)

    async def came_online(self, device_ids: list[str]) -> None:
        """Devices the store had marked offline were heard from: tell their centres."""
        events = [e for e in (self._status_event(d, "online") for d in device_ids) if e]
        if not events:
            return
        now_ms = self._clock_ms()
        loop = asyncio.get_running_loop()
        for event in events:
            await loop.run_in_executor(self._executor, self._store.add_event, event, now_ms)
            self._metrics.supervision.labels("online").inc()
            log.info("supervise: %s is online again", event.device_id)
        self._notify()

    async def last_will(self, device_ids: list[str]) -> list[str]:
        """The broker published these devices' last wills: offline now; returns those
        that were online until now."""
        for device_id in device_ids:
            self._deadline.pop(device_id, None)
        now_ms = self._clock_ms()
        # silent since now: any device still marked online goes offline
        return await self._mark_offline(device_ids, now_ms, now_ms, "last will")

    # ---- the broker connection --------------------------------------------------------

    def pause(self) -> None:
        """Our broker connection is down: silence from devices means nothing now."""
        self._paused = True

    def resume(self, now_ms: int) -> None:
        """Connected again: give every watched device a full timeout from now."""
        self._paused = False
        floor = now_ms + self.timeout_ms
        self._deadline = {d: max(t, floor) for d, t in self._deadline.items()}
        self._heap = [(t, d) for d, t in self._deadline.items()]
        heapq.heapify(self._heap)
        self._queued = set(self._deadline)

    # ---- time passing -------------------------------------------------------------------

    async def tick(self, now_ms: int) -> list[str]:
        """Report every watched device that is overdue at `now_ms`; returns their ids."""
        if self._paused:
            return []
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now_ms:
            _, device_id = heapq.heappop(self._heap)
            self._queued.discard(device_id)
            deadline = self._deadline.get(device_id)
            if deadline is None:
                continue  # went offline another way (last will) since it was queued
            if deadline > now_ms:
                self._push(device_id, deadline)  # heard from since: back in at its new time
                continue
            del self._deadline[device_id]
            due.append(device_id)
        if not due:
            return []
        return await self._mark_offline(due, now_ms - self.timeout_ms, now_ms, "silent")

    async def run(self) -> None:
        while True:
            try:
                await self.tick(self._clock_ms())
            except Exception:
                # a failed tick (the store busy, say) is retried by the next one
                log.exception("supervise: tick failed")
            await asyncio.sleep(self._tick_s)

    # ---- inside -----------------------------------------------------------------------

    def _arm(self, device_id: str, deadline: int) -> None:
        current = self._deadline.get(device_id)
        if current is not None and current >= deadline:
            return
        self._deadline[device_id] = deadline
        if device_id not in self._queued:
            self._push(device_id, deadline)

    def _push(self, device_id: str, deadline: int) -> None:
        heapq.heappush(self._heap, (deadline, device_id))
        self._queued.add(device_id)

    def _status_event(self, device_id: str, state: Literal["online", "offline"]) -> Incoming | None:
        centres = self._route_of(device_id)
        if centres is None:
            return None
        message, token = self._downlink.sealed(device_id, Status(state=state))
        return Incoming(
            event_id=message.id,
            device_id=device_id,
            seq=message.seq,
            type=message.type,
            ts_ms=message.ts,
            body_json=message.body.model_dump_json(),
            jws=token,
            centres=centres,
            kept=True,
        )

    async def _mark_offline(
        self, device_ids: list[str], silent_since_ms: int, now_ms: int, why: str
    ) -> list[str]:
        events = [e for e in (self._status_event(d, "offline") for d in device_ids) if e]
        if not events:
            return []
        loop = asyncio.get_running_loop()
        went = await loop.run_in_executor(
            self._executor, self._store.mark_offline, events, silent_since_ms, now_ms
        )
        offline: list[str] = []
        refused: list[str] = []
        for event, gone in zip(events, went, strict=True):
            (offline if gone else refused).append(event.device_id)
        for device_id in offline:
            self._metrics.supervision.labels("offline").inc()
            log.info("supervise: %s is offline (%s)", device_id, why)
        if refused:
            await self._rearm(refused, loop)
        if offline:
            self._notify()
        return offline

    async def _rearm(self, device_ids: list[str], loop: asyncio.AbstractEventLoop) -> None:
        """Another instance heard these devices (or already reported them): watch on."""
        for device_id in device_ids:
            device = await loop.run_in_executor(self._executor, self._store.device, device_id)
            if device is not None and device.online and device.last_seen_ms is not None:
                self._arm(device_id, device.last_seen_ms + self.timeout_ms)

    def _notify(self) -> None:
        self._metrics.devices_watched.set(len(self._deadline))
        if self._on_event is not None:
            self._on_event()
