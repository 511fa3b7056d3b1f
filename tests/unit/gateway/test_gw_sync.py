"""The clock flags, never silences; a device that lost its counter is told where it stands.

The rule is protocol/replay.py's: replay protection rests on the sequence number, a skewed
timestamp is kept and forwarded flagged, and a signed `sync` repairs the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gw_testkit import (
    ALERT,
    DISTRICTS,
    KEYS,
    NOW,
    TIMEOUT_MS,
    WINDOW_MS,
    Clock,
    Env,
    due,
    heartbeat,
    make_env,
)

from ansimi.mqtt import Message as MqttMessage
from gateway.intake import SYNC_EVERY_MS
from gateway.store import Device, SqliteStore
from gateway.transports.https import delivery_body
from protocol.envelope import seal
from protocol.jws import Signer
from protocol.keys import public_key_to_b64
from protocol.messages import Status, build_message
from protocol.topics import up_topic

TEN_MINUTES_MS = 600_000


def skew_metric(env: Env) -> float:
    return env.metrics.registry.get_sample_value("ansimi_clock_skewed_total") or 0.0


def syncs_sent(env: Env, reason: str) -> float:
    value = env.metrics.registry.get_sample_value("ansimi_syncs_total", {"reason": reason})
    return value or 0.0


@pytest.mark.parametrize("skew_ms", [TEN_MINUTES_MS, -TEN_MINUTES_MS, WINDOW_MS + 1])
async def test_a_skewed_alert_is_kept_acked_forwarded_flagged_and_answered_with_a_sync(
    env: Env, skew_ms: int
) -> None:
    message = env.message(ALERT, id="alert-skewed1", seq=7, ts=NOW + skew_ms)
    await env.feed(message)
    assert env.rejected() == 0
    assert env.acks() == [("bell-0001", "alert-skewed1", "received")]
    deliveries = due(env.store, NOW, 10)
    assert {d.centre for d in deliveries} == {"central", "mapo"}
    for delivery in deliveries:
        body = json.loads(delivery_body(delivery, "mapo"))
        assert body["clock_skew_ms"] == skew_ms
        # the signed payload goes to the centre exactly as the device signed it
        assert body["jws"] == message.payload.decode()
    (sync,) = env.syncs()
    assert (sync.body.ref, sync.body.reason, sync.body.next_seq) == ("alert-skewed1", "clock", 8)
    assert sync.ts == NOW  # the gateway's clock: what the device corrects its offset to
    assert skew_metric(env) == 1


async def test_an_alert_inside_the_window_carries_no_flag_and_gets_no_sync(env: Env) -> None:
    await env.feed(env.message(ALERT, ts=NOW - WINDOW_MS))
    (delivery, _) = due(env.store, NOW, 10)
    assert "clock_skew_ms" not in json.loads(delivery_body(delivery, "mapo"))
    assert env.syncs() == []


async def test_a_skewed_bell_is_heard_so_its_going_away_is_reported(env: Env) -> None:
    # a bell never heard from is not watched: a skewed one must not stay unheard
    assert env.supervisor.deadline("bell-0001") is None
    await env.feed(env.message(heartbeat(), ts=NOW + TEN_MINUTES_MS))
    device = env.store.database.device("bell-0001")
    assert device is not None and device.online
    assert await env.supervisor.tick(NOW + TIMEOUT_MS + 1) == ["bell-0001"]
    assert [(e.type, e.body_json) for e in env.store.database.events(None, 10)] == [
        ("status", '{"state":"offline"}')
    ]


async def test_skewed_heartbeats_get_one_sync_per_interval(env: Env) -> None:
    for _ in range(20):
        await env.feed(env.message(heartbeat(), ts=NOW + TEN_MINUTES_MS))
    assert len(env.syncs()) == 1
    assert syncs_sent(env, "limited") == 19
    env.clock.ms += SYNC_EVERY_MS
    await env.feed(env.message(heartbeat(), ts=env.clock.ms + TEN_MINUTES_MS))
    assert len(env.syncs()) == 2


async def test_a_bell_that_lost_its_counter_gets_its_alert_through_in_one_round_trip(
    env: Env,
) -> None:
    await env.feed(env.message(heartbeat(), seq=5_000))
    # the outbox was emptied: the counter starts again from 1
    lost = env.message(ALERT, id="alert-after1", seq=1)
    await env.feed(lost)
    assert env.rejected("replay") == 1
    assert env.acks() == []
    (sync,) = env.syncs()
    assert (sync.body.ref, sync.body.reason, sync.body.next_seq) == (
        "alert-after1",
        "sequence",
        5_001,
    )
    # the device raises its counter, signs the alert again and resends it
    await env.feed(env.message(ALERT, id="alert-after1", seq=sync.body.next_seq))
    assert env.acks() == [("bell-0001", "alert-after1", "received")]
    assert [e.event_id for e in env.store.database.events(None, 10)] == ["alert-after1"]


async def test_redeliveries_and_known_resends_get_no_sync(env: Env) -> None:
    original = env.message(ALERT, id="alert-once-1", seq=10)
    beat = env.message(heartbeat(), seq=11)
    await env.feed(original, beat)
    # QoS 1 redeliveries: the resend is re-acked, the newest heartbeat refused quietly
    await env.feed(original, beat)
    assert env.syncs() == []
    assert env.rejected("replay") == 1
    # a replay below the mark that is not a duplicate does get one
    await env.feed(env.message(heartbeat(), seq=3))
    assert [s.body.reason for s in env.syncs()] == ["sequence"]


async def test_a_flood_of_replays_gets_one_sync_per_interval(env: Env) -> None:
    await env.feed(env.message(heartbeat(), seq=100))
    replays = [env.message(ALERT, seq=n) for n in range(1, 51)]
    await env.feed(*replays[:25])
    await env.feed(*replays[25:])
    assert env.rejected("replay") == 50
    assert len(env.syncs()) == 1


async def _file_env(path: Path, clock: Clock) -> Env:
    store = SqliteStore(path)
    if store.database.device("bell-0001") is None:
        for device_id, district in DISTRICTS.items():
            public = public_key_to_b64(KEYS[device_id].public_key())
            store.database.add_device(Device(device_id, public, "bell", district), now_ms=0)
    return await make_env(clock, store=store)


async def test_the_counter_is_repaired_across_a_gateway_restart_and_a_key_rotation(
    tmp_path: Path,
) -> None:
    clock = Clock()
    first = await _file_env(tmp_path / "gateway.db", clock)
    await first.feed(first.message(ALERT, seq=7_000))
    # a new key on new hardware (the same device id), with a fresh outbox: seq from 1
    new_key = Ed25519PrivateKey.from_private_bytes(bytes([42]) * 32)
    store = first.store
    token, _ = await store.issue_enrolment("bell-0001", "bell", "mapo", "", now_ms=NOW, rotate=True)
    await store.complete_enrolment(token, public_key_to_b64(new_key.public_key()), "serial-2", NOW)
    await store.close()
    again = await _file_env(tmp_path / "gateway.db", clock)  # the gateway restarted

    def signed(seq: int) -> MqttMessage:
        msg = build_message(ALERT, device="bell-0001", seq=seq, ts=NOW, id="alert-newkey1")
        return MqttMessage(
            up_topic("bell-0001", "alert"), seal(msg, Signer("bell-0001", new_key)).encode(), 1
        )

    await again.feed(signed(1))
    assert again.rejected("replay") == 1  # the mark survived the restart and the rotation
    (sync,) = again.syncs()
    assert sync.body.next_seq == 7_001
    await again.feed(signed(sync.body.next_seq))
    assert again.acks() == [("bell-0001", "alert-newkey1", "received")]
    await again.store.close()


async def test_replays_of_old_captures_cannot_use_up_the_sync_a_bell_that_lost_its_counter_needs(
    env: Env,
) -> None:
    await env.feed(env.message(heartbeat(), seq=5_000))
    # an attacker with the device's broker identity replays messages captured long ago
    # (dated then, outside the window), one every interval, to keep the limiter busy
    captured = [env.message(heartbeat(), seq=n, ts=NOW - TEN_MINUTES_MS) for n in range(1, 4)]
    await env.feed(captured[0])
    # the bell lost its counter: its alert, dated now, is refused below the mark...
    await env.feed(env.message(ALERT, id="alert-lost01", seq=2))
    env.clock.ms += SYNC_EVERY_MS
    # ...and in the same batch as another old replay, it still gets its sync
    await env.feed(captured[1], env.message(ALERT, id="alert-lost01", seq=3, ts=env.clock.ms))
    refs = [s.body.ref for s in env.syncs()]
    assert refs.count("alert-lost01") == 2
    assert all(s.body.next_seq == 5_001 for s in env.syncs())


async def test_a_flood_of_replays_cannot_use_up_the_clock_sync(env: Env) -> None:
    await env.feed(env.message(heartbeat(), seq=100))
    await env.feed(env.message(heartbeat(), seq=50))  # a replay: a sequence sync
    # only the device's own new signature (a fresh number) can ask for a clock sync
    await env.feed(env.message(ALERT, id="alert-skew01", seq=101, ts=NOW + TEN_MINUTES_MS))
    assert [(s.body.ref, s.body.reason) for s in env.syncs()][-1] == ("alert-skew01", "clock")


async def test_a_retained_status_the_broker_replays_on_subscribe_gets_no_sync(env: Env) -> None:
    # the bell's `online`, retained at its last connect, then newer heartbeats
    online = env.message(Status(state="online"), seq=40, retain=True)
    await env.feed(env.message(heartbeat(), seq=100))
    # a gateway (re)subscribing gets the retained copy: history, not a lost counter
    await env.feed(online)
    assert env.rejected("replay") == 1
    assert env.syncs() == []
