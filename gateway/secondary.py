"""The devices' secondary (SMS) path, supervised from their heartbeats.

EN 50136-1 builds alarm transmission on two supervised paths: a fault of the backup must
reach the centre before anyone needs the backup. Each heartbeat carries the SMS path's
health as the device found it (`protocol.messages.SecondaryPath`: modem, SIM, network
registration, signal, how many numbers). When it turns bad, the device's centres get a
`secondary_path_down` status event; when it works again, a `secondary_path_up`: one each per
outage. The events are `status` messages about the device signed by the gateway, made and
kept the way supervision makes `offline` (gateway/supervise.py), so a centre checks them
with the gateway's key and routes them like the device's alerts.

A change counts once `confirm` heartbeats in a row agree (2 by default): a modem that
loses the network for one heartbeat while it changes cell is not an outage.

Per device, memory holds only what differs from "working": the devices whose path is down
as told to the centres, and those on their way to a change. At start-up the last secondary
events in the store say which devices were left down, so a gateway restart does not report
an outage twice. Limit: with several gateway instances, each judges the heartbeats the
shared subscription hands it, so two instances may both report the same change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Final

from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Event, SupervisionStore
from gateway.supervise import RouteOf
from protocol.clock import wall_ms
from protocol.messages import Heartbeat, Status, StatusState

log = logging.getLogger(__name__)

DOWN: Final = "secondary_path_down"
UP: Final = "secondary_path_up"
# status events read at start-up to find the devices left down
LOAD_LIMIT: Final = 100_000


class SecondaryPathWatch:
    def __init__(
        self,
        store: SupervisionStore,
        downlink: Downlink,
        metrics: Metrics,
        *,
        route_of: RouteOf,
        confirm: int = 2,
        clock_ms: Callable[[], int] | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        if confirm < 1:
            raise ValueError(f"confirm must be at least 1 heartbeat, not {confirm}")
        self._store = store
        self._downlink = downlink
        self._metrics = metrics
        self._route_of = route_of
        self._confirm = confirm
        self._clock_ms = clock_ms or wall_ms
        self._on_event = on_event
        self._down: set[str] = set()  # told to the centres as down
        self._changing: dict[str, int] = {}  # heartbeats in a row that disagree with that
        for state in (DOWN, UP):
            metrics.supervision.labels(state)

    def load(self, status_events: Iterable[Event]) -> None:
        """Remember the devices whose last secondary event (newest first) said down."""
        judged: set[str] = set()
        for event in status_events:
            if event.device_id in judged:
                continue
            state = Status.model_validate_json(event.body_json).state
            if state in (DOWN, UP):
                judged.add(event.device_id)
                if state == DOWN:
                    self._down.add(event.device_id)

    async def load_from(self, store: SupervisionStore) -> None:
        self.load(await store.events(None, LOAD_LIMIT, type="status"))

    def is_down(self, device_id: str) -> bool:
        return device_id in self._down

    async def heartbeats(self, beats: list[tuple[str, Heartbeat]]) -> None:
        """(device id, heartbeat body) of heartbeats just kept, oldest first."""
        changed = False
        for device_id, body in beats:
            health = body.secondary
            if health is None:
                continue  # an agent that predates the field: nothing to judge
            faults = health.faults
            if bool(faults) == (device_id in self._down):
                self._changing.pop(device_id, None)
                continue
            seen = self._changing.get(device_id, 0) + 1
            if seen < self._confirm:
                self._changing[device_id] = seen
                continue
            self._changing.pop(device_id, None)
            changed |= await self._report(device_id, DOWN if faults else UP, faults)
        if changed and self._on_event is not None:
            self._on_event()

    async def _report(self, device_id: str, state: StatusState, faults: tuple[str, ...]) -> bool:
        centres = self._route_of(device_id)
        if centres is None:
            return False  # revoked or gone since the heartbeat: nobody to tell
        event = self._downlink.event(device_id, Status(state=state), centres)
        await self._store.add_event(event, self._clock_ms())
        if state == DOWN:
            self._down.add(device_id)
            log.warning(
                "secondary path of %s is down (%s)", device_id, ", ".join(faults) or "unknown"
            )
        else:
            self._down.discard(device_id)
            log.info("secondary path of %s works again", device_id)
        self._metrics.supervision.labels(state).inc()
        return True
