"""Health without a broker: the intake probe's rules, the repair ladder, the report's rule
per path, the disk episode, the watchdog's go. A fake clock stands in for time; the real
broker and gateway process are in tests/integration/gateway/test_gw_health_live.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ansimi_testkit import notified, notify_socket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gw_testkit import ALERT, GATEWAY, GATEWAY_KEY, Clock, Env, make_env

from ansimi import sdnotify
from ansimi.mqtt import Message as MqttMessage
from gateway.downlink import Downlink
from gateway.forward import Failing
from gateway.health import STORE_DOWN_AFTER_MS, DiskState, DiskWatch, Health, IntakeProbe
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.store import Incoming, SqliteStore, StoreFull, transaction
from protocol.envelope import open_envelope
from protocol.jws import Signer
from protocol.messages import Status, StatusMessage
from protocol.probe import probe_topic, seal_probe

DEAF_MS = 10_000
EVERY_MS = 2_000


@dataclass
class Rig:
    clock: Clock
    metrics: Metrics
    probe: IntakeProbe
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    connected: list[bool] = field(default_factory=lambda: [True])

    def heard_back(self) -> None:
        """The broker delivers what we published: every probe sent comes back."""
        for topic, payload in self.sent:
            assert self.probe.offer(MqttMessage(topic, payload))
        self.sent.clear()

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def rig(instance: str = "gw-a") -> Rig:
    clock = Clock()
    metrics = Metrics()
    box: list[Rig] = []

    async def publish(topic: str, payload: bytes) -> None:
        box[0].sent.append((topic, payload))

    async def resubscribe() -> None:
        box[0].repairs.append("resubscribe")

    def reconnect() -> None:
        # as Session.reconnect: the connection drops now, and `run()` makes a new one later
        box[0].repairs.append("reconnect")
        box[0].connected[0] = False
        probe.connection_down()

    probe = IntakeProbe(
        Signer(GATEWAY, GATEWAY_KEY),
        instance,
        publish,
        metrics,
        connected=lambda: box[0].connected[0],
        resubscribe=resubscribe,
        reconnect=reconnect,
        every_ms=EVERY_MS,
        deaf_after_ms=DEAF_MS,
        clock_ms=clock,
    )
    probe.connection_up(clock.ms)
    box.append(Rig(clock, metrics, probe))
    return box[0]


def reconnected(r: Rig) -> None:
    """The session's connection is back (the gateway's on_connect hook)."""
    r.connected[0] = True
    r.probe.connection_up(r.clock.ms)


async def tick(r: Rig) -> None:
    await r.probe.tick(r.clock.ms)
    await asyncio.sleep(0)  # the publish and any repair run as tasks
    await asyncio.sleep(0)


async def hearing(r: Rig, ms: int) -> None:
    """Let `ms` pass with a healthy intake: each probe sent comes back."""
    end = r.clock.ms + ms
    while r.clock.ms < end:
        r.clock.ms = min(end, r.clock.ms + EVERY_MS)
        await tick(r)
        r.heard_back()


# ---- the probe on the intake's path --------------------------------------------------------


def intake_of(env: Env, on_probe: Callable[[MqttMessage], bool] | None = None) -> Intake:
    return env.intake_with(on_probe=on_probe)


async def test_a_probe_is_heard_back_and_is_neither_kept_nor_refused() -> None:
    env = await make_env()
    r = rig()
    intake = intake_of(env, on_probe=r.probe.offer)
    r.clock.ms = env.clock.ms
    await tick(r)
    ((topic, payload),) = r.sent
    assert topic == probe_topic(GATEWAY) == f"ansimi/v1/{GATEWAY}/up/probe"
    task = asyncio.create_task(intake.run())
    try:
        intake.submit(MqttMessage(topic, payload, 0))
        intake.submit(env.message(ALERT, id="alert-after-probe"))
        async with asyncio.timeout(10):
            while env.event_count() == 0:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # only the alert was kept; the probe was not taken for a device message (and refused)
    assert [e.event_id for e in env.store.database.events(None, 10)] == ["alert-after-probe"]
    assert env.rejected() == 0
    assert r.probe.proven(r.clock.ms)
    assert r.sample("ansimi_intake_probes_total", {"result": "own"}) == 1


@pytest.mark.parametrize(
    "forgery",
    ["device_key", "other_gateway_key", "other_topic", "garbage"],
)
async def test_a_probe_not_from_this_gateway_now_is_refused_counted_and_proves_nothing(
    forgery: str,
) -> None:
    r = rig()
    ts = r.clock.ms
    signer = Signer(GATEWAY, GATEWAY_KEY)
    topic = probe_topic(GATEWAY)
    if forgery == "device_key":
        signer = Signer("bell-0001", Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32))
        topic = probe_topic("bell-0001")  # a device may write its own up/probe
    elif forgery == "other_gateway_key":
        signer = Signer(GATEWAY, Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32))
    elif forgery == "other_topic":
        topic = probe_topic("gw-other")
    payload = b"not a jws" if forgery == "garbage" else seal_probe(signer, "gw-a", ts)
    assert r.probe.offer(MqttMessage(topic, payload))  # taken: never a device's message
    assert r.probe.heard_ms is None
    assert r.sample("ansimi_intake_probes_total", {"result": "refused"}) == 1
    assert (
        sum(
            s.value
            for m in r.metrics.registry.collect()
            if m.name == "ansimi_rejected"
            for s in m.samples
            if s.name == "ansimi_rejected_total"
        )
        == 1
    )


@pytest.mark.parametrize("state", ["disk_low", "disk_ok"])
async def test_a_device_cannot_report_the_gateways_own_states(state: DiskState) -> None:
    """disk_low/disk_ok are the gateway's, about itself: a bell's is refused, not kept."""
    env = await make_env()
    intake = intake_of(env)
    await intake.process([env.message(Status(state=state))])
    assert env.event_count() == 0
    assert env.rejected("topic_mismatch") == 1


def test_a_late_probe_of_ours_proves_nothing_and_is_not_a_refusal() -> None:
    r = rig()
    late = seal_probe(Signer(GATEWAY, GATEWAY_KEY), "gw-a", r.clock.ms - DEAF_MS - 1)
    assert r.probe.offer(MqttMessage(probe_topic(GATEWAY), late))
    assert r.probe.heard_ms is None
    assert r.sample("ansimi_intake_probes_total", {"result": "late"}) == 1
    assert r.sample("ansimi_intake_probes_total", {"result": "refused"}) == 0


def test_other_topics_are_left_to_the_intake() -> None:
    r = rig()
    for topic in ("ansimi/v1/bell-0001/up/alert", "ansimi/v1/gw-test/down/probe", "probe"):
        assert not r.probe.offer(MqttMessage(topic, b"x"))


# ---- deafness and repairs ------------------------------------------------------------------


async def test_deaf_after_the_bound_repairs_alternately_and_hears_again_by_itself() -> None:
    r = rig()
    for _ in range(3):
        await tick(r)
        r.heard_back()
        r.clock.ms += EVERY_MS
    assert r.probe.proven(r.clock.ms) and not r.probe.deaf(r.clock.ms)
    # the broker stops delivering: probes go out and nothing comes back
    silent_from = r.clock.ms - EVERY_MS
    while not r.probe.deaf(r.clock.ms):
        await tick(r)
        r.clock.ms += EVERY_MS
    assert r.clock.ms - silent_from > DEAF_MS
    assert r.repairs == []
    await tick(r)
    assert r.repairs == ["resubscribe"]
    # one repair per deafness interval, not per tick
    for _ in range(DEAF_MS // EVERY_MS - 1):
        r.clock.ms += EVERY_MS
        await tick(r)
    assert r.repairs == ["resubscribe"]
    r.clock.ms += EVERY_MS
    await tick(r)
    assert r.repairs == ["resubscribe", "reconnect"] and not r.connected[0]
    reconnected(r)
    r.clock.ms += DEAF_MS
    await tick(r)
    assert r.repairs == ["resubscribe", "reconnect", "resubscribe"]
    assert r.sample("ansimi_intake_repairs_total", {"action": "reconnect"}) == 1
    # the repair worked: the next probe comes back, and the ladder starts over
    r.sent.clear()
    await tick(r)
    r.heard_back()
    assert r.probe.proven(r.clock.ms)
    r.clock.ms += DEAF_MS + 1
    await tick(r)
    await tick(r)
    assert r.repairs == ["resubscribe", "reconnect", "resubscribe", "resubscribe"]


async def test_a_failed_probe_round_is_logged_and_the_next_one_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[str] = []

    def publish(topic: str, payload: bytes) -> asyncio.Future[None]:
        sent.append(topic)
        if len(sent) == 1:
            raise RuntimeError("a bug in the first round")
        return asyncio.get_running_loop().create_future()

    async def resubscribe() -> None:
        pass

    probe = IntakeProbe(
        Signer(GATEWAY, GATEWAY_KEY),
        "gw-a",
        publish,
        Metrics(),
        connected=lambda: True,
        resubscribe=resubscribe,
        reconnect=lambda: None,
        every_ms=10,
        deaf_after_ms=1_000,
    )
    task = asyncio.create_task(probe.run())
    try:
        async with asyncio.timeout(10):
            while len(sent) < 3:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len([m for m in caplog.messages if "probe round failed" in m]) == 1


async def test_while_disconnected_nothing_is_sent_or_repaired_but_it_is_deaf() -> None:
    r = rig()
    r.connected[0] = False
    for _ in range(10):
        await tick(r)
        r.clock.ms += EVERY_MS
    assert r.sent == [] and r.repairs == []
    assert r.probe.deaf(r.clock.ms)


async def test_a_siblings_probe_keeps_this_instance_alive() -> None:
    """Shared subscription: the broker may hand our probes to a sibling and its to us."""
    us, sibling = rig("gw-a"), rig("gw-b")
    for _ in range(10):
        await tick(sibling)
        for topic, payload in sibling.sent:
            assert us.probe.offer(MqttMessage(topic, payload))
        sibling.sent.clear()
        await tick(us)  # ours go to the sibling, and we never hear them
        for clock in (us.clock, sibling.clock):
            clock.ms += EVERY_MS
    assert not us.probe.deaf(us.clock.ms) and us.repairs == []
    assert us.sample("ansimi_intake_probes_total", {"result": "sibling"}) == 10
    assert us.sample("ansimi_intake_probes_total", {"result": "own"}) == 0


# ---- the report: one rule per path ---------------------------------------------------------


def health(
    r: Rig,
    failing: dict[str, Failing],
    disk: DiskWatch | None = None,
    store_stuck_since: list[int | None] | None = None,
) -> Health:
    stuck = store_stuck_since or [None]
    return Health(
        r.probe,
        r.metrics,
        connected=lambda: r.connected[0],
        centres=["central", "mapo"],
        failing_centres=lambda: failing,
        centre_down_after_ms=15_000,
        disk=disk,
        store_stuck_since=lambda: stuck[0],
        clock_ms=r.clock,
    )


async def test_a_store_that_keeps_nothing_is_503_naming_it_within_seconds() -> None:
    """The broker delivers, the probe is heard, but every commit fails (a full disk, the
    database gone) or hangs: nothing is kept or acked, and health must say so."""
    r = rig()
    stuck: list[int | None] = [None]
    h = health(r, {}, store_stuck_since=stuck)
    await tick(r)
    r.heard_back()
    assert h.report().status == "ok"
    stuck[0] = r.clock.ms
    r.clock.ms += STORE_DOWN_AFTER_MS - 1
    assert h.report().status == "ok"  # one slow commit is not an outage
    r.clock.ms += 1
    report = h.report()
    assert (report.http_status, report.body["failing"]) == (503, ["store"])
    assert report.summary["failing"] == ["store"]
    stuck[0] = None  # a commit went through
    assert h.report().status == "ok"


async def test_deaf_intake_is_503_naming_it() -> None:
    r = rig()
    h = health(r, {})
    await tick(r)
    assert h.report().http_status == 503  # not proven yet: no probe heard since the start
    assert h.watchdog_ok()  # but not deaf either: start-up is not a failure
    r.heard_back()
    report = h.report()
    assert (report.http_status, report.status, report.body["failing"]) == (200, "ok", [])
    r.clock.ms += DEAF_MS + 1
    report = h.report()
    assert (report.http_status, report.body["failing"]) == (503, ["intake"])
    assert report.body["ok"] is False and report.body["intake"]["ok"] is False
    assert r.sample("ansimi_health_status", {}) == 2
    # deaf, but no repair tried yet: a restart is not the next step
    assert h.watchdog_ok()


async def deaf_past_the_ladder(r: Rig, h: Health) -> None:
    """Heard, then deaf while connected: resubscribe, reconnect, connected again, and a
    deafness interval of that connection to one tick short of its end; the watchdog is
    asked at every step of the way."""
    await tick(r)
    r.heard_back()
    while r.repairs != ["resubscribe"]:
        r.clock.ms += EVERY_MS
        await tick(r)
        assert h.watchdog_ok()
    while r.repairs != ["resubscribe", "reconnect"]:
        r.clock.ms += EVERY_MS
        await tick(r)
        assert h.watchdog_ok()
    r.clock.ms += 500  # the session's backoff
    reconnected(r)
    back = r.clock.ms
    while r.clock.ms + EVERY_MS < back + DEAF_MS:
        r.clock.ms += EVERY_MS
        await tick(r)
        assert h.watchdog_ok(), r.clock.ms - back
        assert h.report().http_status == 503


async def test_the_watchdog_stops_when_connected_yet_deaf_past_the_ladder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    h = health(r, {})
    await deaf_past_the_ladder(r, h)
    r.clock.ms += EVERY_MS
    await tick(r)
    assert not h.watchdog_ok()  # a restart is the next repair: systemd's to make
    # withheld for good, not one deafness interval in two: systemd's WatchdogSec (30 s) must
    # pass without a ping; the repairs go on, but no reconnect gives us a new interval
    for _ in range(120_000 // EVERY_MS):
        r.clock.ms += EVERY_MS
        await tick(r)
        assert not h.watchdog_ok()
    assert r.repairs.count("reconnect") == 1 and r.repairs.count("resubscribe") > 2
    assert len([m for m in caplog.messages if "watchdog pings withheld" in m]) == 1
    # a probe heard again (the last resubscribe worked): pings again, before any restart
    r.sent.clear()
    await tick(r)
    r.heard_back()
    assert h.watchdog_ok() and h.report().http_status == 200


async def test_the_watchdog_keeps_pinging_while_the_broker_is_down_or_reconnecting() -> None:
    r = rig()
    h = health(r, {})
    await deaf_past_the_ladder(r, h)
    # the broker goes away just as the ladder ends: deaf and disconnected, for 10 minutes
    r.connected[0] = False
    r.probe.connection_down()
    for _ in range(600_000 // EVERY_MS):
        r.clock.ms += EVERY_MS
        await tick(r)
        assert h.watchdog_ok()
    report = h.report()
    assert (report.http_status, report.body["failing"]) == (503, ["mqtt", "intake"])
    # back: deaf since long before, but the new connection gets its own deafness interval
    reconnected(r)
    back = r.clock.ms
    while r.clock.ms + EVERY_MS < back + DEAF_MS:
        await tick(r)
        assert h.watchdog_ok(), r.clock.ms - back
        r.clock.ms += EVERY_MS
    # the session reconnecting again and again (its connections drop at once): pings go on
    for _ in range(100):
        r.connected[0] = False
        r.probe.connection_down()
        r.clock.ms += DEAF_MS
        await tick(r)
        assert h.watchdog_ok()
        reconnected(r)
        await tick(r)
        assert h.watchdog_ok()


async def test_a_centre_down_past_its_bound_is_degraded_200_and_the_watchdog_stays_green() -> None:
    r = rig()
    await tick(r)
    r.heard_back()
    since = r.clock.ms
    failing = {"mapo": Failing(since, "ClientConnectorError: Cannot connect to host x:443")}
    h = health(r, failing)
    await hearing(r, 14_999)
    assert h.report().status == "ok"  # one failure is not yet a centre down
    await hearing(r, 1)
    report = h.report()
    assert (report.http_status, report.status) == (200, "degraded")
    assert report.body["degraded"] == ["centre:mapo"]
    # which centre, since when, and the kind of error only (the route is public)
    assert report.body["centres"] == {
        "mapo": {"ok": False, "failing_since_ms": since, "error": "ClientConnectorError"}
    }
    # what anyone may read of it: the kind of path, not which centre, since when or why
    assert report.summary == {
        "ok": True,
        "status": "degraded",
        "failing": [],
        "degraded": ["centre"],
    }
    assert h.watchdog_ok()
    assert r.sample("ansimi_centre_down", {"centre": "mapo"}) == 1
    assert r.sample("ansimi_centre_down", {"centre": "central"}) == 0
    assert r.sample("ansimi_health_status", {}) == 1
    failing.clear()  # it took a delivery again
    assert h.report().status == "ok"


# ---- the disk ------------------------------------------------------------------------------


class SmallDisk(SqliteStore):
    """A real store whose free space the test sets; its site events can be made to fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.free = 100_000_000
        self.refuse_events = False
        self.checkpoints = 0

    async def free_bytes(self) -> int | None:
        return self.free

    async def add_site_event(self, item: Incoming, now_ms: int) -> None:
        if self.refuse_events:
            raise StoreFull("database or disk is full")
        await super().add_site_event(item, now_ms)

    async def checkpoint(self) -> None:
        self.checkpoints += 1
        await super().checkpoint()


@contextlib.contextmanager
def disk_rig(tmp_path: Path) -> Iterator[tuple[SmallDisk, DiskWatch, list[DiskState]]]:
    store = SmallDisk(tmp_path / "gateway.db")
    signer = Signer(GATEWAY, GATEWAY_KEY)
    made: list[DiskState] = []

    def unused(topic: str, payload: bytes) -> asyncio.Future[None]:
        raise AssertionError("a site event is kept, never published to a device")

    downlink = Downlink(signer, unused)

    def make_event(state: DiskState) -> Incoming:
        made.append(state)
        message, token = downlink.sealed(GATEWAY, Status(state=state))
        return Incoming(
            message.id,
            GATEWAY,
            message.seq,
            message.type,
            message.ts,
            message.body.model_dump_json(),
            token,
            ("central",),
        )

    watch = DiskWatch(store, 64_000_000, Metrics(), make_event=make_event, on_event=lambda: None)
    try:
        yield store, watch, made
    finally:
        store.database.close()


async def test_one_disk_low_event_per_episode_with_hysteresis_forwarded_signed(
    tmp_path: Path,
) -> None:
    with disk_rig(tmp_path) as (store, watch, made):
        await watch.check(1)
        assert made == [] and not watch.low
        store.free = 63_000_000
        for now in range(2, 6):
            await watch.check(now)
        assert made == ["disk_low"] and watch.low_since_ms == 2
        store.free = 70_000_000  # above the reserve, not above the hysteresis margin
        await watch.check(7)
        store.free = 63_000_000
        await watch.check(8)
        assert made == ["disk_low"]
        store.free = 80_000_000
        await watch.check(9)
        assert made == ["disk_low", "disk_ok"] and not watch.low
        # kept as events about the gateway, waiting for the centre, signed by the gateway
        (first,) = [
            d for d in store.database.due_for("central", 10**15, 10) if "disk_low" in d.body_json
        ]
        assert first.device_id == GATEWAY
        opened = open_envelope(first.jws, {GATEWAY: GATEWAY_KEY.public_key()}.__getitem__)
        assert isinstance(opened.message, StatusMessage)
        assert opened.message.body.state == "disk_low"
        assert store.database.waiting_count() == 2


async def test_an_event_the_store_cannot_keep_yet_is_tried_again_until_kept(
    tmp_path: Path,
) -> None:
    with disk_rig(tmp_path) as (store, watch, made):
        store.free = 1_000_000
        store.refuse_events = True
        await watch.check(1)
        await watch.check(2)
        assert store.database.waiting_count() == 0 and watch.low
        store.refuse_events = False
        await watch.check(3)
        await watch.check(4)
        # made anew at each try (two refused), kept once, and then no more
        assert made == ["disk_low"] * 3 and store.database.waiting_count() == 1
        # while low, every look checkpoints (gives the WAL's space back)
        assert store.checkpoints == 4


def test_a_checkpoint_truncates_the_wal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    try:
        for n in range(200):
            store.database.add_site_event(
                Incoming(f"event-{n:06d}", GATEWAY, n, "status", 0, "{}", "x" * 2000, ("c",)), 0
            )
        wal = tmp_path / "gateway.db-wal"
        assert wal.stat().st_size > 400_000
        store.database.checkpoint()
        assert wal.stat().st_size == 0
        assert store.database.waiting_count() == 200
    finally:
        store.database.close()


# ---- the watchdog --------------------------------------------------------------------------


async def test_watchdog_pings_stop_while_unhealthy_and_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    healthy = [True]
    asked = [0]  # rounds the pinger has asked about the health

    def check() -> bool:
        asked[0] += 1
        return healthy[0]

    async def rounds(count: int) -> None:
        until = asked[0] + count
        async with asyncio.timeout(10):
            while asked[0] < until:
                await asyncio.sleep(0.005)

    loop = asyncio.get_running_loop()
    with notify_socket() as (path, sock):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "20000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        task = asyncio.create_task(sdnotify.watchdog_pings(check))
        try:
            async with asyncio.timeout(10):
                assert await loop.sock_recv(sock, 64) == b"WATCHDOG=1"
            healthy[0] = False
            await rounds(1)  # a ping decided before has been sent by then
            notified(sock)
            await rounds(5)  # five rounds told "unhealthy", rather than a fixed wait
            assert notified(sock) == []
            healthy[0] = True
            async with asyncio.timeout(10):
                assert await loop.sock_recv(sock, 64) == b"WATCHDOG=1"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_a_commit_that_fails_is_rolled_back_and_the_next_transaction_works() -> None:
    """A COMMIT that fails (disk full; here a deferred foreign key) leaves SQLite's
    transaction open: left so, every later BEGIN fails and the gateway is wedged."""
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE child (id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    lock = threading.Lock()
    with pytest.raises(sqlite3.IntegrityError), transaction(db, lock) as tx:
        tx.execute("INSERT INTO child VALUES (1)")  # refused only at COMMIT
    assert not db.in_transaction
    with transaction(db, lock) as tx:
        tx.execute("INSERT INTO parent VALUES (1)")
    assert db.execute("SELECT COUNT(*) FROM parent").fetchone() == (1,)
    assert db.execute("SELECT COUNT(*) FROM child").fetchone() == (0,)


def test_free_bytes_is_the_file_systems_and_none_in_memory(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    memory = SqliteStore(":memory:")
    try:
        stat = os.statvfs(tmp_path)
        free = store.database.free_bytes()
        assert free is not None
        assert abs(free - stat.f_bavail * stat.f_frsize) < 64 * 1024 * 1024
        assert memory.database.free_bytes() is None
    finally:
        store.database.close()
        memory.database.close()
