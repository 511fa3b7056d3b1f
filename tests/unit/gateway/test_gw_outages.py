"""District outages on a fake clock: many bells of a district at once are one event."""

from __future__ import annotations

import json

import pytest
from gw_testkit import NOW, TIMEOUT_MS, Clock, due

from gateway.config import OutageRule
from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Device, Incoming, SqliteStore, StoreFull
from gateway.supervise import Supervisor
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64

RULE = OutageRule(
    min_devices=10, min_fraction=0.2, window_ms=30_000, restored_fraction=0.8, update_ms=5_000
)
HEARTBEAT_MS = 10_000
ROUTES = {"mapo": ("central", "mapo"), "jongno": ("central",)}


class Fleet:
    """Devices in a store and a supervisor watching them, driven as the intake would."""

    def __init__(
        self,
        sizes: dict[str, int],
        rule: OutageRule | None = RULE,
        routes: dict[str, tuple[str, ...]] = ROUTES,
        per_account: tuple[str, ...] = (),
    ) -> None:
        self.clock = Clock()
        self.store = SqliteStore(":memory:")
        key = public_key_to_b64(generate_key().public_key())
        self.districts: dict[str, list[str]] = {}
        for district, size in sizes.items():
            ids = [f"{district}-{n:04d}" for n in range(size)]
            self.districts[district] = ids
            for device_id in ids:
                self.store.database.add_device(Device(device_id, key, "bell", district), now_ms=0)
        home = {d: district for district, ids in self.districts.items() for d in ids}
        self.downlink = Downlink(
            Signer("gw-test", generate_key()), lambda t, p: None, clock_ms=self.clock
        )
        self.supervisor = Supervisor(
            self.store,
            self.downlink,
            Metrics(),
            route_of=lambda d: routes[home[d]],
            timeout_ms=TIMEOUT_MS,
            outages=rule,
            clock_ms=self.clock,
            per_account=per_account,
        )
        self._n = 0
        self.alive: set[str] = set()

    async def hear(self, device_ids: list[str]) -> None:
        """These devices are alive: heard now, and at every heartbeat from now on."""
        self.alive |= set(device_ids)
        self._n += 1
        batch = [
            Incoming(f"hb-{self._n:06d}-{d}", d, self._n, "heartbeat", NOW, "{}", "", (), False)
            for d in device_ids
        ]
        came_online = self.store.database.accept_batch(batch, self.clock.ms).came_online
        for device_id in device_ids:
            self.supervisor.heard(device_id, self.clock.ms)
        if came_online:
            await self.supervisor.came_online(came_online)

    def silence(self, device_ids: list[str]) -> None:
        self.alive -= set(device_ids)

    async def advance(self, ms: int) -> list[str]:
        """Time passes a second at a time; the living send a heartbeat every 10 s."""
        gone: list[str] = []
        for _ in range(ms // 1_000):
            self.clock.ms += 1_000
            if self.clock.ms % HEARTBEAT_MS == 0:
                await self.hear(sorted(self.alive))
            gone += await self.supervisor.tick(self.clock.ms)
        return gone

    def forwarded(self) -> list[dict[str, object]]:
        """Status bodies the centres will get, oldest first (one per event, not per centre)."""
        waiting = {d.event_id for d in due(self.store, self.clock.ms + 1, 100_000)}
        events = reversed(self.store.database.events(None, 100_000))
        return [
            json.loads(e.body_json) for e in events if e.type == "status" and e.event_id in waiting
        ]

    def kept_states(self, device_id: str) -> list[str]:
        events = [e for e in self.store.database.events(None, 100_000) if e.device_id == device_id]
        return [json.loads(e.body_json)["state"] for e in reversed(events) if e.type == "status"]


def states(bodies: list[dict[str, object]]) -> list[object]:
    return [b["state"] for b in bodies]


async def test_a_district_going_dark_is_one_outage_and_one_restoration() -> None:
    fleet = Fleet({"mapo": 30, "jongno": 5})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo + fleet.districts["jongno"])
    fleet.silence(mapo[:20])
    gone = await fleet.advance(TIMEOUT_MS + 5_000)
    assert sorted(gone) == sorted(mapo[:20])
    (outage,) = fleet.forwarded()
    assert outage == {
        "state": "district_outage",
        "district": "mapo",
        "count": 20,
        "offline": sorted(mapo[:20]),
    }
    # each bell's own state and event are kept, for the API and the history
    assert all(fleet.store.database.device(d).online is False for d in mapo[:20])  # type: ignore[union-attr]
    assert fleet.kept_states(mapo[5]) == ["offline"]
    assert fleet.supervisor.outages() == {"mapo": set(mapo[:20])}
    # 15 of 20 back: not yet most (80 %); the 16th is
    await fleet.hear(mapo[:15])
    assert states(fleet.forwarded()) == ["district_outage"]
    await fleet.hear([mapo[15]])
    bodies = fleet.forwarded()
    assert states(bodies) == ["district_outage", "district_restored"]
    assert bodies[1]["offline"] == sorted(mapo[16:20]) and bodies[1]["count"] == 20
    assert fleet.supervisor.outages() == {}
    assert fleet.kept_states(mapo[5]) == ["offline", "online"]  # kept, not forwarded
    # the stragglers were in the restored list; their return is their own news now
    await fleet.advance(1_000)
    await fleet.hear([mapo[19]])
    assert states(fleet.forwarded()) == ["district_outage", "district_restored", "online"]


async def test_a_district_going_dark_is_one_incident_and_one_escalation() -> None:
    fleet = Fleet({"mapo": 30, "jongno": 5})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo + fleet.districts["jongno"])
    fleet.silence(mapo[:20])
    await fleet.advance(TIMEOUT_MS + 5_000)
    # the operator's desk: one incident for the district, not twenty
    (outage,) = await fleet.store.incidents("open", 100)
    assert (outage.kind, outage.offline, outage.events) == ("district_outage", True, 21)
    members = {await fleet.store.incident_of(e) for e in offline_events(fleet, mapo[:20])}
    assert members == {outage.incident_id}
    assert len(await fleet.store.escalation_candidates(3)) == 1
    # more of it later join it
    fleet.silence(mapo[20:25])
    await fleet.advance(TIMEOUT_MS + RULE.update_ms)
    (grown,) = await fleet.store.incidents("open", 100)
    assert grown.incident_id == outage.incident_id and grown.events > 21
    # restored, then a single bell going quiet is its own incident again
    await fleet.hear(mapo[:25])
    fleet.silence([mapo[29]])
    await fleet.advance(TIMEOUT_MS + 5_000)
    incidents = await fleet.store.incidents("open", 100)
    assert sorted((i.kind, i.offline) for i in incidents) == [
        ("district_outage", False),
        ("offline", True),
    ]


def offline_events(fleet: Fleet, device_ids: list[str]) -> list[str]:
    events = fleet.store.database.events(None, 100_000)
    wanted = set(device_ids)
    return [
        e.event_id
        for e in events
        if e.device_id in wanted
        and e.type == "status"
        and json.loads(e.body_json)["state"] == "offline"
    ]


async def test_a_dc09_receiver_still_gets_each_bells_offline_inside_an_outage() -> None:
    """A SIA receiver works per account and cannot read a district event: the grouping is
    for the centres that can, and the alarm receiver keeps its per-bell trouble signals."""
    routes = {"mapo": ("central", "mapo-arc")}
    fleet = Fleet({"mapo": 30}, routes=routes, per_account=("mapo-arc",))
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    fleet.silence(mapo[:20])
    await fleet.advance(TIMEOUT_MS + 5_000)

    async def states_for(centre: str) -> list[str]:
        due = await fleet.store.due_for(centre, fleet.clock.ms + 1, 100_000)
        return sorted(json.loads(d.body_json)["state"] for d in due)

    assert await states_for("central") == ["district_outage"]
    assert await states_for("mapo-arc") == ["district_outage"] + ["offline"] * 20


async def test_most_of_an_outage_back_at_once_restores_it_once() -> None:
    fleet = Fleet({"mapo": 30})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    fleet.silence(mapo[:20])
    await fleet.advance(TIMEOUT_MS + 5_000)
    await fleet.hear(mapo[:19])  # one batch: past 80 % at the 16th, and three more
    bodies = fleet.forwarded()
    assert states(bodies) == ["district_outage", "district_restored"]
    assert bodies[1]["offline"] == [mapo[19]]


async def test_a_few_bells_going_offline_are_reported_one_by_one() -> None:
    fleet = Fleet({"mapo": 100})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    fleet.silence(mapo[:9])
    await fleet.advance(2 * TIMEOUT_MS)
    assert states(fleet.forwarded()) == ["offline"] * 9  # 9 < 10 and 9 % < 20 %
    assert fleet.supervisor.outages() == {}


async def test_a_share_of_a_small_district_is_an_outage() -> None:
    fleet = Fleet({"jongno": 10, "mapo": 100})
    jongno = fleet.districts["jongno"]
    await fleet.hear(jongno + fleet.districts["mapo"])
    fleet.silence(jongno[:3])
    await fleet.advance(2 * TIMEOUT_MS)
    assert fleet.forwarded() == [
        {"state": "district_outage", "district": "jongno", "count": 3, "offline": jongno[:3]}
    ]


async def test_reports_further_apart_than_the_window_are_not_grouped() -> None:
    fleet = Fleet({"mapo": 100})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    for n in range(12):  # one bell every 5 s: 6 within any 30 s window
        fleet.silence([mapo[n]])
        await fleet.advance(5_000)
    await fleet.advance(2 * TIMEOUT_MS)
    assert states(fleet.forwarded()) == ["offline"] * 12


async def test_cards_sent_before_the_outage_opened_are_in_it_and_closed_by_their_own_online() -> (
    None
):
    fleet = Fleet({"mapo": 100})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    await fleet.advance(5_000)
    fleet.silence(mapo[:2])  # two bells fall silent before the rest...
    await fleet.advance(10_000)
    fleet.silence(mapo[2:12])  # ...then ten more, one heartbeat later
    await fleet.advance(2 * TIMEOUT_MS)
    bodies = fleet.forwarded()
    assert states(bodies) == ["offline", "offline", "district_outage"]
    assert bodies[2]["count"] == 12 and bodies[2]["offline"] == sorted(mapo[:12])
    await fleet.hear([mapo[0], mapo[5]])
    # the early one had its own card: its online goes out; the other is the outage's
    assert states(fleet.forwarded())[3:] == ["online"]


async def test_an_outage_that_grows_is_told_again_at_most_every_update_interval() -> None:
    fleet = Fleet({"mapo": 100})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    fleet.silence(mapo[:10])
    await fleet.advance(TIMEOUT_MS + 1_000)
    assert states(fleet.forwarded()) == ["district_outage"]
    for n in range(10, 40):  # thirty more, one a second: not thirty updates
        fleet.silence([mapo[n]])
        await fleet.advance(1_000)
    await fleet.advance(TIMEOUT_MS + RULE.update_ms)
    bodies = fleet.forwarded()
    counts = [b["count"] for b in bodies]
    assert states(bodies) == ["district_outage"] * len(bodies)
    assert counts[0] == 10 and counts[-1] == 40 and counts == sorted(counts)
    assert len(bodies) <= 1 + 30 * 1_000 // RULE.update_ms + 1
    await fleet.advance(3 * RULE.window_ms)  # no growth: nothing more
    assert len(fleet.forwarded()) == len(bodies)


@pytest.mark.parametrize("rule", [None])
async def test_grouping_off_reports_every_bell(rule: OutageRule | None) -> None:
    fleet = Fleet({"mapo": 30}, rule=rule)
    await fleet.hear(fleet.districts["mapo"])
    fleet.silence(fleet.districts["mapo"])
    await fleet.advance(2 * TIMEOUT_MS)
    assert states(fleet.forwarded()) == ["offline"] * 30


def test_the_rule_needs_a_count_or_a_share_of_at_least_three() -> None:
    assert RULE.trips(10, 1_000)
    assert not RULE.trips(9, 1_000)
    assert RULE.trips(3, 15)  # 20 %
    assert not RULE.trips(2, 3)  # two of three is not yet a pattern


async def test_bells_another_instance_hears_are_no_outage() -> None:
    # With several instances each supervisor watches every bell; those heard by another
    # instance fall due here together and the shared store refuses them: no outage is told
    # and none is opened on a live bell (whose alerts would join it).
    fleet = Fleet({"mapo": 30})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    gone: list[str] = []
    for _ in range((TIMEOUT_MS + 5_000) // 1_000):
        fleet.clock.ms += 1_000
        if fleet.clock.ms % HEARTBEAT_MS == 0:  # kept by the other instance, not heard here
            fleet._n += 1
            beats = [
                Incoming(
                    f"hb-{fleet._n:06d}-{d}", d, fleet._n, "heartbeat", NOW, "{}", "", (), False
                )
                for d in mapo
            ]
            fleet.store.database.accept_batch(beats, fleet.clock.ms)
        gone += await fleet.supervisor.tick(fleet.clock.ms)
    assert gone == []
    assert fleet.forwarded() == []
    assert fleet.store.database.incidents("open", 100) == []


async def test_an_outage_whose_bells_the_store_could_not_mark_offline_ends() -> None:
    # The store fails (a full disk) as a district goes dark: the outage was told, its bells
    # not marked offline, so none of them will ever "come online"; they are back before
    # their next deadline. The outage must end, not stay open for ever.
    fleet = Fleet({"mapo": 30})
    mapo = fleet.districts["mapo"]
    await fleet.hear(mapo)
    fleet.silence(mapo[:20])
    real = fleet.store.mark_offline
    failures = [StoreFull("disk full")]

    async def failing_once(items: list[Incoming], silent_since_ms: int, now_ms: int) -> list[bool]:
        if failures:
            raise failures.pop()
        return await real(items, silent_since_ms, now_ms)

    fleet.store.mark_offline = failing_once  # type: ignore[method-assign]
    with pytest.raises(StoreFull):
        await fleet.advance(TIMEOUT_MS + 5_000)
    await fleet.hear(mapo[:20])
    assert await fleet.advance(TIMEOUT_MS * 2) == []
    assert fleet.supervisor.outages() == {}
    # told in the same millisecond: their order in the store is not theirs
    assert sorted(states(fleet.forwarded())) == ["district_outage", "district_restored"]
