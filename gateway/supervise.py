"""Supervision: which devices are alive, told to the control centres as events.

A device is offline when nothing has been heard from it for `missed` heartbeat intervals,
or when its last will arrived and it did not reconnect within `will_grace_ms`; heard from
again, it is online. One offline report per outage, one online report when it ends.

Why the will waits (hysteresis): the broker publishes a device's will whenever one of its
connections ends uncleanly, which includes a connection replaced by the device's own
reconnect (session takeover: a half-open socket after a partition, a stale CONNECT a
middlebox delivers late). Such a will arrives *after* the device is back; acted on at
once it reported a bell offline (and online again) that was connected all along. So a
will only schedules the offline report `will_grace_ms` later, and any word from the device
in between cancels it. The grace is short of the silence timeout, so a will still beats
the heartbeats in telling a real outage.

Thousands of devices, no per-device timers: each watched device has one deadline in a
dict and one live entry in a min-heap. A message only moves the dict's deadline (O(1));
the tick, once a second, pops only the entries that are due, and an entry whose device was
heard from since goes back at its new deadline. A will brings a deadline forward: the
new, earlier entry becomes the live one and the later one is skipped when it pops. The
clock is a parameter, so tests drive `tick()` with a fake one.

Several gateway instances each see only the messages the shared subscription hands them,
so the store is the judge: every commit marks its devices seen, whichever instance made
it, and going offline is a conditional update ("still online, not seen since the cutoff")
in one transaction with its event. The cutoff is the timeout ago for silence and the
will's arrival for a will. Exactly one instance reports it; a refused one re-arms at the
last-seen time the store knows.

Mass outages: when many devices of one district go offline together (`OutageRule`: at
least `min_devices`, or a share of the district, within `window_ms`), the centres get one
`district_outage` status event (district, count, the list) instead of one card per bell;
the ones after it in the same outage join it, and the centres get an updated
`district_outage` (the same district, a larger count) at most every `update_ms` while it
grows: a district that went dark together falls silent over one heartbeat interval.
When `restored_fraction` of its devices are back, one `district_restored` (with those
still offline) ends it. Each device's own offline and online events are still kept in
the store, unforwarded, and its state (online or not) is the store's as always: the API
shows every device. The outage is this instance's memory: after a gateway restart the
members that come back are reported one by one; with several instances each groups what
it reports.

Events: `status` events are `status` messages signed by the gateway (kid = gateway id),
so a centre checks them like device messages, with the gateway's public key; they are
routed like the device's alerts (a district event like its first device's). Power: a
heartbeat that changes the power source is kept and forwarded as it is, signed by the
device (see `Store.accept_batch`). Tamper: the device raises an alert (trigger `tamper`),
forwarded as every alert is; supervision adds nothing to it.

While the gateway's own broker connection is down it hears nobody: supervision pauses,
and on reconnect every deadline starts again from then, so a broker outage is not
reported as every device going offline.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from gateway.config import OutageRule
from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Device, Incoming, SupervisionStore
from protocol.clock import wall_ms
from protocol.errors import Oversized
from protocol.messages import MAX_LISTED_DEVICES, Status

log = logging.getLogger(__name__)

# Centres an event about this device goes to; None when the device is unknown or revoked.
RouteOf = Callable[[str], "tuple[str, ...] | None"]
# which district each device is in, re-read from the store at most this often
CENSUS_MAX_AGE_MS = 60_000


@dataclass(eq=False)
class _Outage:
    """One district's devices gone offline together, as told to the centres."""

    district: str
    opener: str  # the device whose event carries it (events are kept per device)
    members: set[str] = field(default_factory=set)  # every device in the outage
    # members the centres had an offline card for before the outage opened: their online
    # goes out on its own too, so no card stays open
    alone: set[str] = field(default_factory=set)
    offline: set[str] = field(default_factory=set)  # members not back yet
    told_count: int = 0  # members when the centres were last told
    told_ms: int = 0


class Supervisor:
    def __init__(
        self,
        store: SupervisionStore,
        downlink: Downlink,
        metrics: Metrics,
        *,
        route_of: RouteOf,
        timeout_ms: int,
        will_grace_ms: int = 0,
        outages: OutageRule | None = None,
        tick_s: float = 1.0,
        clock_ms: Callable[[], int] | None = None,
        on_event: Callable[[], None] | None = None,
        per_account: Collection[str] = (),
    ) -> None:
        self._store = store
        self._downlink = downlink
        self._metrics = metrics
        self._route_of = route_of
        # centres that work per device account (SIA DC-09 receivers): they cannot read a
        # district event, so a bell's own offline/online still goes to them inside an outage
        self._per_account = frozenset(per_account)
        self.timeout_ms = timeout_ms
        self.will_grace_ms = will_grace_ms
        self._rule = outages
        self._tick_s = tick_s
        self._clock_ms = clock_ms or wall_ms
        self._on_event = on_event
        self._deadline: dict[str, int] = {}  # watched device -> when it is overdue
        self._heap: list[tuple[int, str]] = []
        # device -> time of its live heap entry; any other entry of it is stale
        self._queued: dict[str, int] = {}
        # device -> when its last will arrived, while the grace runs
        self._will_at: dict[str, int] = {}
        self._paused = False
        # district -> {device: when reported offline}, oldest first, within the window
        self._recent: dict[str, dict[str, int]] = {}
        self._outages: dict[str, _Outage] = {}  # open, by district
        self._census: tuple[int, dict[str, str]] | None = None  # (read at, device -> district)

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
        if self._will_at.pop(device_id, None) is not None:
            # back within the grace: the will was about a connection, not the device
            self._schedule(device_id, now_ms + self.timeout_ms)
        else:
            self._arm(device_id, now_ms + self.timeout_ms)

    def watched(self) -> int:
        return len(self._deadline)

    def deadline(self, device_id: str) -> int | None:
        return self._deadline.get(device_id)

    def outages(self) -> dict[str, set[str]]:
        """Open district outages: district -> devices in it still offline."""
        return {d: set(o.offline) for d, o in self._outages.items()}

    async def came_online(self, device_ids: list[str]) -> None:
        """Devices the store had marked offline were heard from: tell their centres."""
        now_ms = self._clock_ms()
        events: list[Incoming] = []
        ended: list[_Outage] = []
        for device_id in device_ids:
            for recent in self._recent.values():
                recent.pop(device_id, None)
            outage = self._outage_of(device_id)
            if outage is not None:
                outage.offline.discard(device_id)
                if outage not in ended and self._restored(outage):
                    ended.append(outage)
            # inside an outage the centres hear it from the outage, not card by card
            quiet = outage is not None and device_id not in outage.alone
            event = self._status_event(device_id, Status(state="online"), quiet=quiet)
            if event is not None:
                events.append(event)
        for event in events:
            await self._store.add_event(event, now_ms)
            self._metrics.supervision.labels("online").inc()
            log.info("supervise: %s is online again", event.device_id)
        for outage in ended:
            del self._outages[outage.district]
            await self._tell(outage, "district_restored", now_ms)
        if events or ended:
            self._notify()

    async def last_will(self, device_ids: list[str]) -> list[str]:
        """The broker published these devices' last wills: offline unless heard from within
        the grace; returns those reported offline now (only without a grace)."""
        now_ms = self._clock_ms()
        for device_id in device_ids:
            self._will_at[device_id] = now_ms
            deadline = now_ms + self.will_grace_ms
            current = self._deadline.get(device_id)
            self._schedule(device_id, deadline if current is None else min(current, deadline))
        if self.will_grace_ms > 0:
            return []
        return await self.tick(now_ms)

    # ---- the broker connection --------------------------------------------------------

    def pause(self) -> None:
        """Our broker connection is down: silence from devices means nothing now."""
        self._paused = True

    def resume(self, now_ms: int) -> None:
        """Connected again: give every watched device a full timeout from now."""
        self._paused = False
        floor = now_ms + self.timeout_ms
        self._deadline = {d: max(t, floor) for d, t in self._deadline.items()}
        # a will heard before the gap still stands, but a reconnect storm follows ours:
        # the silence timeout decides now
        self._will_at.clear()
        self._heap = [(t, d) for d, t in self._deadline.items()]
        heapq.heapify(self._heap)
        self._queued = dict(self._deadline)

    # ---- time passing -------------------------------------------------------------------

    async def tick(self, now_ms: int) -> list[str]:
        """Report every watched device that is overdue at `now_ms`; returns their ids."""
        if self._paused:
            return []
        # device -> the cutoff: offline only if not seen since then by any instance
        due: dict[str, int] = {}
        wills: set[str] = set()
        while self._heap and self._heap[0][0] <= now_ms:
            at, device_id = heapq.heappop(self._heap)
            if self._queued.get(device_id) != at:
                continue  # superseded by an earlier entry (a will)
            del self._queued[device_id]
            deadline = self._deadline.get(device_id)
            if deadline is None:
                continue
            if deadline > now_ms:
                self._push(device_id, deadline)  # heard from since: back in at its new time
                continue
            del self._deadline[device_id]
            will_at = self._will_at.pop(device_id, None)
            if will_at is not None:
                wills.add(device_id)
            due[device_id] = now_ms - self.timeout_ms if will_at is None else will_at
        try:
            gone = await self._mark_offline(due, wills, now_ms) if due else []
        except Exception:
            # Our store failed (a full disk, say): then the intake cannot record heartbeats
            # either, so their silence means nothing yet. As after a broker outage, each
            # gets a full timeout again; the living are heard once the store works.
            for device_id in due:
                self._arm(device_id, now_ms + self.timeout_ms)
            raise
        await self._tell_growth(now_ms)
        return gone

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
        """Watch until `deadline`, unless already watched until later."""
        current = self._deadline.get(device_id)
        if current is not None and current >= deadline:
            return
        self._schedule(device_id, deadline)

    def _schedule(self, device_id: str, deadline: int) -> None:
        """Watch until exactly `deadline`, earlier or later than before."""
        self._deadline[device_id] = deadline
        queued = self._queued.get(device_id)
        if queued is None or queued > deadline:
            self._push(device_id, deadline)

    def _push(self, device_id: str, deadline: int) -> None:
        heapq.heappush(self._heap, (deadline, device_id))
        self._queued[device_id] = deadline

    def _status_event(self, device_id: str, status: Status, *, quiet: bool) -> Incoming | None:
        """The event for `status` about `device_id`; `quiet`: inside a district outage, kept
        here and forwarded only to the per-account centres (the others get the outage)."""
        centres = self._route_of(device_id)
        if centres is None:
            return None
        if quiet:
            centres = tuple(c for c in centres if c in self._per_account)
        return self._downlink.event(device_id, status, centres)

    async def _mark_offline(
        self,
        due: dict[str, int],
        wills: set[str],
        now_ms: int,
    ) -> list[str]:
        districts = await self._districts(now_ms) if self._rule is not None else {}
        grouped = self._grouped(due, districts, now_ms)
        offline: list[str] = []
        refused: list[str] = []
        try:
            await self._report(due, districts, grouped, now_ms, offline, refused)
        except Exception:
            # The store failed (tick re-arms them all): those not marked offline are in no
            # outage, or one opened of them would wait for ever for them to come online.
            try:
                for outage in self._not_offline(set(due) - set(offline)):
                    await self._tell(outage, "district_restored", now_ms)
            except Exception:
                log.exception("supervise: cannot tell the end of an outage of no bell")
            raise
        for device_id in offline:
            self._metrics.supervision.labels("offline").inc()
            why = "last will" if device_id in wills else "silent"
            log.info("supervise: %s is offline (%s)", device_id, why)
        if self._rule is not None:
            await self._group(offline, districts, grouped, now_ms)
        # heard from after all: told as in an outage, but not in it
        for outage in self._not_offline(refused):
            await self._tell(outage, "district_restored", now_ms)
        if refused:
            await self._rearm(refused)
        if offline:
            self._notify()
        return offline

    async def _report(
        self,
        due: dict[str, int],
        districts: dict[str, str],
        grouped: set[str],
        now_ms: int,
        offline: list[str],
        refused: list[str],
    ) -> None:
        """Open the outages of `grouped` districts, then mark `due` offline in the store: those
        it marked into `offline`, those it refused into `refused`, as each is known."""
        # An outage opening now is told before its bells' own offline events are kept: the
        # store then attaches them to the outage's one incident (incidents.joins_outage),
        # not one incident (and one escalation) per bell.
        # Only bells the store still finds silent count: with several instances, those another
        # one heard are due here too (store.mark_offline refuses them), and an outage told of
        # live bells (or opened on one, whose alerts would then join it) is a false alarm.
        for district in sorted(grouped - self._outages.keys()):
            going = [
                d
                for d, cutoff in due.items()
                if districts.get(d) == district and await self._still_silent(d, cutoff)
            ]
            size = sum(1 for home in districts.values() if home == district)
            count = len(self._recent.get(district, {}).keys() | set(going))
            if going and self._rule is not None and self._rule.trips(count, size):
                await self._open_outage(district, going, now_ms)
            else:
                grouped.discard(district)
        by_cutoff: dict[int, list[Incoming]] = {}
        for device_id, cutoff in due.items():
            quiet = districts.get(device_id) in grouped
            event = self._status_event(device_id, Status(state="offline"), quiet=quiet)
            if event is not None:
                by_cutoff.setdefault(cutoff, []).append(event)
        for cutoff, events in by_cutoff.items():
            went = await self._store.mark_offline(events, cutoff, now_ms)
            for event, gone in zip(events, went, strict=True):
                (offline if gone else refused).append(event.device_id)

    def _not_offline(self, device_ids: Iterable[str]) -> list[_Outage]:
        """These were put in an outage but the store did not mark them offline: out of it.
        The outages left with none offline are over (ended here; returned, to be told)."""
        ended: list[_Outage] = []
        for device_id in device_ids:
            if (outage := self._outage_of(device_id)) is not None:
                outage.members.discard(device_id)
                outage.offline.discard(device_id)
                if not outage.offline and outage not in ended:
                    ended.append(outage)
        for outage in ended:
            del self._outages[outage.district]
        return ended

    def _grouped(self, due: dict[str, int], districts: dict[str, str], now_ms: int) -> set[str]:
        """Districts whose offline reports in this round join an outage (open or opening)."""
        if self._rule is None:
            return set()
        rule = self._rule
        sizes: dict[str, int] = {}
        for district in districts.values():
            sizes[district] = sizes.get(district, 0) + 1
        newly: dict[str, set[str]] = {}
        for device_id in due:
            if (home := districts.get(device_id)) is not None:
                newly.setdefault(home, set()).add(device_id)
        grouped: set[str] = set()
        for district, devices in newly.items():
            if district in self._outages:
                grouped.add(district)
                continue
            recent = self._recent.setdefault(district, {})
            for device_id, at in list(recent.items()):
                if at > now_ms - rule.window_ms:
                    break  # oldest first: the rest are within the window too
                del recent[device_id]
            if rule.trips(len(devices | recent.keys()), sizes.get(district, 0)):
                grouped.add(district)
        return grouped

    async def _open_outage(self, district: str, going: list[str], now_ms: int) -> None:
        """Open `district`'s outage of the bells `going` offline now (and those reported
        one by one just before: they belong to it too) and tell the centres."""
        recent = self._recent.setdefault(district, {})
        outage = _Outage(district, opener=going[0], told_ms=now_ms)
        outage.members |= recent.keys() | set(going)
        outage.offline |= recent.keys() | set(going)
        outage.alone |= recent.keys()
        recent.clear()
        self._outages[district] = outage
        log.warning("supervise: district %s outage, %d devices offline", district, len(going))
        await self._tell(outage, "district_outage", now_ms)

    async def _group(
        self,
        offline: list[str],
        districts: dict[str, str],
        grouped: set[str],
        now_ms: int,
    ) -> None:
        """Add the bells gone offline to their district's outage (opened before they were
        kept, `_open_outage`); note the others, which may open one soon."""
        for device_id in offline:
            district = districts.get(device_id)
            if district is None:
                continue
            outage = self._outages.get(district) if district in grouped else None
            if outage is None:
                self._recent.setdefault(district, {})[device_id] = now_ms
                continue
            outage.members.add(device_id)
            outage.offline.add(device_id)

    async def _tell_growth(self, now_ms: int) -> None:
        """An outage that grew since the centres last heard: at most once per `update_ms`."""
        if self._rule is None:
            return
        for outage in list(self._outages.values()):
            grew = len(outage.members) > outage.told_count
            if grew and now_ms - outage.told_ms >= self._rule.update_ms:
                await self._tell(outage, "district_outage", now_ms)

    async def _tell(
        self,
        outage: _Outage,
        state: str,
        now_ms: int,
    ) -> None:
        outage.told_count = len(outage.members)
        outage.told_ms = now_ms
        listed = sorted(outage.offline)[:MAX_LISTED_DEVICES]
        while True:
            status = Status.model_validate(
                {
                    "state": state,
                    "district": outage.district,
                    "count": len(outage.members),
                    "offline": listed,
                }
            )
            try:
                event = self._status_event(outage.opener, status, quiet=False)
                break
            except Oversized:
                # long device ids: the list is a courtesy, the count and the API are the truth
                listed = listed[: len(listed) // 2]
        if event is None:
            return  # the opener was revoked since; its district's centres are unknown
        await self._store.add_event(event, now_ms)
        self._metrics.supervision.labels(state).inc()
        self._notify()

    def _restored(self, outage: _Outage) -> bool:
        assert self._rule is not None
        back = len(outage.members) - len(outage.offline)
        return back >= self._rule.restored_fraction * len(outage.members)

    def _outage_of(self, device_id: str) -> _Outage | None:
        for outage in self._outages.values():
            if device_id in outage.members:
                return outage
        return None

    async def _districts(self, now_ms: int) -> dict[str, str]:
        """Device -> district for every device not revoked, re-read now and then."""
        if self._census is None or now_ms - self._census[0] >= CENSUS_MAX_AGE_MS:
            devices = await self._store.devices()
            districts = {d.device_id: d.district for d in devices if not d.revoked}
            self._census = (now_ms, districts)
        return self._census[1]

    async def _still_silent(self, device_id: str, cutoff: int) -> bool:
        """Whether store.mark_offline would report it now (online, not heard since `cutoff`)."""
        device = await self._store.device(device_id)
        return bool(device is not None and device.online and (device.last_seen_ms or 0) <= cutoff)

    async def _rearm(self, device_ids: list[str]) -> None:
        """Another instance heard these devices (or already reported them): watch on."""
        for device_id in device_ids:
            device = await self._store.device(device_id)
            if device is not None and device.online and device.last_seen_ms is not None:
                self._arm(device_id, device.last_seen_ms + self.timeout_ms)

    def _notify(self) -> None:
        self._metrics.devices_watched.set(len(self._deadline))
        if self._on_event is not None:
            self._on_event()
