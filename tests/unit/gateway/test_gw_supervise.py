"""Supervision on a fake clock: offline at silence or last will, online again, power changes."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import pytest
from gw_testkit import GATEWAY, GATEWAY_KEY, NOW, TIMEOUT_MS, Env, due, heartbeat, make_env

from ansimi.mqtt import Message as MqttMessage
from gateway.store import Device, Event, Incoming, SqliteDatabase, SqliteStore, StoreFull
from gateway.supervise import Supervisor
from protocol.envelope import open_envelope
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import Status, StatusMessage


def status_events(env: Env) -> list[Event]:
    return [e for e in reversed(env.store.database.events(None, 100_000)) if e.type == "status"]


def states(env: Env) -> list[str]:
    return [e.body_json.split('"')[3] for e in status_events(env)]


def another_instance(env: Env) -> Supervisor:
    """A second supervisor on the same store, as another gateway instance would run."""
    return Supervisor(
        env.store,
        env.downlink,
        env.metrics,
        route_of=lambda d: ("central",),
        timeout_ms=TIMEOUT_MS,
        clock_ms=env.clock,
    )


async def beat(env: Env, device: str = "bell-0001", power: str = "mains") -> None:
    await env.feed(env.message(heartbeat(power), device=device))


async def test_silence_for_the_timeout_makes_a_device_offline(env: Env) -> None:
    await beat(env)
    for _ in range(5):  # heartbeats every 10 s keep it online
        env.clock.ms += 10_000
        assert await env.supervisor.tick(env.clock.ms) == []
        await beat(env)
    env.clock.ms += TIMEOUT_MS - 1
    assert await env.supervisor.tick(env.clock.ms) == []
    env.clock.ms += 1
    assert await env.supervisor.tick(env.clock.ms) == ["bell-0001"]
    assert env.store.database.device("bell-0001").online is False  # type: ignore[union-attr]
    assert states(env) == ["offline"]
    # reported once, however long the silence lasts
    env.clock.ms += 10 * TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == []
    assert states(env) == ["offline"]


async def test_the_offline_event_is_signed_by_the_gateway_and_routed_like_an_alert(
    env: Env,
) -> None:
    await beat(env)
    env.clock.ms += TIMEOUT_MS
    await env.supervisor.tick(env.clock.ms)
    (event,) = status_events(env)
    (delivery_centres) = {d.centre for d in due(env.store, env.clock.ms, 10)}
    assert delivery_centres == {"central", "mapo"}  # bell-0001 is in mapo
    jws = due(env.store, env.clock.ms, 10)[0].jws
    opened = open_envelope(jws, {GATEWAY: GATEWAY_KEY.public_key()}.__getitem__)
    assert opened.kid == GATEWAY
    assert isinstance(opened.message, StatusMessage)
    assert opened.message.device == "bell-0001"
    assert opened.message.body == Status(state="offline")
    assert opened.message.id == event.event_id
    assert env.woken  # the forwarder was told


async def test_the_last_will_comes_first_and_the_timeout_adds_nothing(env: Env) -> None:
    await beat(env)
    env.clock.ms += 2_000
    await env.feed(env.message(Status(state="offline"), seq=1, ts=NOW - 60_000))
    assert states(env) == ["offline"]
    env.clock.ms += TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == []
    assert states(env) == ["offline"]


async def test_a_device_heard_again_is_online_again(env: Env) -> None:
    await beat(env)
    env.clock.ms += TIMEOUT_MS
    await env.supervisor.tick(env.clock.ms)
    env.clock.ms += 5_000
    await env.feed(env.message(Status(state="online")))
    assert states(env) == ["offline", "online"]
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]
    # and it is watched again
    env.clock.ms += TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == ["bell-0001"]
    assert states(env) == ["offline", "online", "offline"]


async def test_a_first_contact_is_not_reported_as_coming_back(env: Env) -> None:
    await beat(env)
    await beat(env, "bell-0002")
    assert status_events(env) == []


async def test_a_power_change_is_forwarded_as_the_devices_own_heartbeat(env: Env) -> None:
    await beat(env, power="mains")  # first report: nothing to compare with
    await beat(env, power="mains")
    assert env.event_count() == 0
    await beat(env, power="battery")
    (event,) = env.store.database.events(None, 10)
    assert event.type == "heartbeat" and '"power":"battery"' in event.body_json
    assert {d.centre for d in due(env.store, env.clock.ms, 10)} == {"central", "mapo"}
    await beat(env, power="battery")
    await beat(env, power="mains")
    powers = sorted(
        e.body_json.split('"power":"')[1][:4] for e in env.store.database.events(None, 10)
    )
    assert powers == ["batt", "main"]


async def test_a_broker_outage_is_not_a_fleet_outage(env: Env) -> None:
    await beat(env)
    env.supervisor.pause()
    env.clock.ms += 5 * TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == []
    env.supervisor.resume(env.clock.ms)
    env.clock.ms += TIMEOUT_MS - 1
    assert await env.supervisor.tick(env.clock.ms) == []
    await beat(env)
    env.clock.ms += TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == ["bell-0001"]


async def test_start_up_watches_online_devices_from_now(env: Env) -> None:
    await beat(env)
    restarted = another_instance(env)
    env.clock.ms += 10 * TIMEOUT_MS  # the gateway was down a while
    restarted.load(env.store.database.devices(), env.clock.ms)
    assert restarted.watched() == 1
    assert await restarted.tick(env.clock.ms + TIMEOUT_MS - 1) == []
    assert await restarted.tick(env.clock.ms + TIMEOUT_MS) == ["bell-0001"]


async def test_two_instances_on_one_store_report_an_outage_once(env: Env) -> None:
    """Instance B hears nothing from the device (the shared subscription sends its
    heartbeats to A); B must not call it offline while A still hears it."""
    await beat(env)
    b = another_instance(env)
    b.load(env.store.database.devices(), env.clock.ms)
    env.clock.ms += 20_000
    await beat(env)  # heard by A only
    env.clock.ms += 11_000
    assert await b.tick(env.clock.ms) == []  # the store knows better: re-armed
    assert b.deadline("bell-0001") == env.clock.ms - 11_000 + TIMEOUT_MS
    env.clock.ms += TIMEOUT_MS
    went = [await b.tick(env.clock.ms), await env.supervisor.tick(env.clock.ms)]
    assert sorted(went) == [[], ["bell-0001"]]
    assert states(env) == ["offline"]


class CountingStore(SqliteStore):
    calls: int = 0

    async def mark_offline(
        self, items: Sequence[Incoming], silent_since_ms: int, now_ms: int
    ) -> list[bool]:
        CountingStore.calls += 1
        return await super().mark_offline(items, silent_since_ms, now_ms)


async def test_five_thousand_devices_cost_one_entry_each_and_one_commit(env: Env) -> None:
    store = CountingStore(":memory:")
    devices = [f"bell-{n:05d}" for n in range(5_000)]
    key = public_key_to_b64(generate_key().public_key())
    for device_id in devices:
        store.database.add_device(Device(device_id, key, "bell", "mapo"), now_ms=0)
    store.database.accept_batch(
        [Incoming(f"hb-{d}", d, 1, "heartbeat", NOW, "{}", "", (), kept=False) for d in devices],
        NOW,
    )
    sup = Supervisor(
        store, env.downlink, env.metrics, route_of=lambda d: ("central",), timeout_ms=TIMEOUT_MS
    )
    for second in range(0, 60, 10):  # six rounds of heartbeats from everyone
        for device_id in devices:
            sup.heard(device_id, NOW + second * 1000)
        assert len(sup._heap) == 5_000  # one entry per device, never more
        assert await sup.tick(NOW + second * 1000) == []
    gone = await sup.tick(NOW + 50_000 + TIMEOUT_MS)
    assert len(gone) == 5_000
    assert CountingStore.calls == 1
    assert len(store.database.events(None, 10_000)) == 5_000
    assert sup.watched() == 0 and sup._heap == []


async def test_a_revoked_device_is_not_reported(env: Env) -> None:
    await beat(env, "bell-0002")
    await env.store.revoke("bell-0002", 0)
    await env.registry.reload()
    env.clock.ms += TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == []
    assert status_events(env) == []


# ---- hysteresis: one offline report per outage ---------------------------------------------

GRACE_MS = 5_000


@pytest.fixture
async def graced() -> Env:
    return await make_env(will_grace_ms=GRACE_MS)


def will(env: Env, device: str = "bell-0001") -> MqttMessage:
    """The device's last will: signed at its start, published by the broker much later."""
    return env.message(Status(state="offline"), device=device, seq=1, ts=NOW - 60_000)


async def test_a_will_for_a_connection_the_device_has_already_replaced_reports_nothing(
    graced: Env,
) -> None:
    """The healed-partition flap: after the outage was reported and the bell came back,
    the will of a connection its reconnect replaced (a session takeover) arrives; the bell
    reconnects again within a second. The centre must hear nothing more."""
    env = graced
    await beat(env)
    env.clock.ms += TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == ["bell-0001"]
    env.clock.ms += 20_000
    await env.feed(env.message(Status(state="online")))
    assert states(env) == ["offline", "online"]
    env.clock.ms += 500
    await env.feed(will(env))
    env.clock.ms += 800  # kicked off by the takeover, back after its reconnect backoff
    await env.feed(env.message(Status(state="online")))
    for _ in range(TIMEOUT_MS // 1000 - 1):
        env.clock.ms += 1_000
        assert await env.supervisor.tick(env.clock.ms) == []
    assert states(env) == ["offline", "online"]
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]


async def test_a_reset_the_device_recovers_from_within_the_grace_is_not_an_outage(
    graced: Env,
) -> None:
    env = graced
    await beat(env)
    env.clock.ms += 3_000
    await env.feed(will(env))
    env.clock.ms += GRACE_MS - 1
    await beat(env)
    env.clock.ms += 1
    assert await env.supervisor.tick(env.clock.ms) == []
    # and it is watched from its last word, by the heartbeat timeout as before
    assert env.supervisor.deadline("bell-0001") == env.clock.ms - 1 + TIMEOUT_MS
    env.clock.ms += TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == ["bell-0001"]
    assert states(env) == ["offline"]


async def test_a_will_not_followed_by_the_device_reports_it_after_the_grace(graced: Env) -> None:
    env = graced
    await beat(env)
    env.clock.ms += 3_000
    await env.feed(will(env))
    assert states(env) == []
    env.clock.ms += GRACE_MS - 1
    assert await env.supervisor.tick(env.clock.ms) == []
    env.clock.ms += 1
    # long before the silence timeout: the will still speeds the report up
    assert await env.supervisor.tick(env.clock.ms) == ["bell-0001"]
    env.clock.ms += 2 * TIMEOUT_MS
    assert await env.supervisor.tick(env.clock.ms) == []
    assert states(env) == ["offline"]


async def test_a_device_heard_by_another_instance_during_the_grace_stays_online(
    graced: Env,
) -> None:
    env = graced
    await beat(env)
    env.clock.ms += 1_000
    await env.feed(will(env))
    env.clock.ms += 1_000
    # its reconnect's first message went to instance B: only the store knows
    await env.store.accept_batch(
        [Incoming("hb-elsewhere-01", "bell-0001", 99, "heartbeat", NOW, "{}", "", (), kept=False)],
        env.clock.ms,
    )
    heard_at = env.clock.ms
    env.clock.ms += GRACE_MS
    assert await env.supervisor.tick(env.clock.ms) == []
    assert states(env) == []
    assert env.supervisor.deadline("bell-0001") == heard_at + TIMEOUT_MS


class FailingDatabase(SqliteDatabase):
    """The disk is full: nothing can be written until `healed` (SQLite's own error, which
    the store turns into its StoreFull)."""

    healed = False

    def mark_offline(
        self, items: Sequence[Incoming], silent_since_ms: int, now_ms: int
    ) -> list[bool]:
        if not self.healed:
            raise sqlite3.OperationalError("database or disk is full")
        return super().mark_offline(items, silent_since_ms, now_ms)


async def test_a_store_that_cannot_write_loses_no_device_and_reports_no_false_outage(
    env: Env,
) -> None:
    store = SqliteStore(FailingDatabase(":memory:"))
    key = public_key_to_b64(generate_key().public_key())
    store.database.add_device(Device("bell-0042", key, "bell", "mapo"), now_ms=0)
    store.database.accept_batch(
        [Incoming("hb-0042-0001", "bell-0042", 1, "heartbeat", NOW, "{}", "", (), kept=False)], NOW
    )
    sup = Supervisor(
        store, env.downlink, env.metrics, route_of=lambda d: ("central",), timeout_ms=TIMEOUT_MS
    )
    sup.heard("bell-0042", NOW)
    with pytest.raises(StoreFull):
        await sup.tick(NOW + TIMEOUT_MS)
    # still watched, a full timeout from the failure, not dropped and not due at once
    assert sup.deadline("bell-0042") == NOW + 2 * TIMEOUT_MS
    store.database.healed = True  # type: ignore[attr-defined]
    assert await sup.tick(NOW + TIMEOUT_MS + 1_000) == []
    # the device stayed silent after all: reported, once
    assert await sup.tick(NOW + 2 * TIMEOUT_MS) == ["bell-0042"]
