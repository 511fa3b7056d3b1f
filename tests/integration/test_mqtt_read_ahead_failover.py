"""Bytes the session read ahead of paho (ansimi/mqtt.py `_BufferedClient`) when its broker is
SIGKILLed mid-stream: what the dead link had sent is parsed whole or not at all, nothing of
it on the next broker's connection, and the subscription receives there (real mosquittos)."""

from __future__ import annotations

import asyncio
import select
from pathlib import Path

import paho.mqtt.publish as paho_publish
import pytest
from ansimi_testkit import connected, eventually

from ansimi.broker import Mosquitto, MosquittoConfig
from ansimi.mqtt import Message, Session, Settings

BURST = 400  # ~120 KB: more than one read-ahead chunk, so a packet is cut at its end
PAYLOAD_BYTES = 300


def payload(where: str, i: int) -> bytes:
    return f"{where}-{i}-".encode().ljust(PAYLOAD_BYTES, b"x")


async def publish_burst(broker: Mosquitto, where: str, count: int) -> None:
    """From an independent client (paho's blocking helper), each message at QoS 1: all of
    them are at the broker when this returns."""
    messages = [
        {"topic": f"t/ra/{where}", "payload": payload(where, i), "qos": 1} for i in range(count)
    ]
    await asyncio.to_thread(
        paho_publish.multiple, messages, hostname=broker.host, port=broker.port, client_id=where
    )


@pytest.mark.parametrize("end", ["read_to_its_end", "dropped_with_bytes_unread"])
async def test_a_broker_killed_mid_stream_leaves_nothing_for_the_next_one(
    mosquitto: Mosquitto, tmp_path: Path, end: str
) -> None:
    got: list[Message] = []
    connects: list[tuple[tuple[str, int], int]] = []  # (broker, messages got before)
    sub: Session

    def on_message(message: Message) -> None:
        got.append(message)
        if len(got) == 1:
            sub.pause_reading()  # after one packet: the rest of the chunk stays read ahead

    with Mosquitto(MosquittoConfig(state_dir=tmp_path / "second")) as second:
        sub = Session(
            Settings(
                host=mosquitto.host,
                port=mosquitto.port,
                client_id="read-ahead-failover",
                version=311,
                persistent=False,
                other_addresses=((second.host, second.port),),
                backoff_min_s=0.05,
                backoff_max_s=0.2,
            ),
            on_message,
            on_connect=lambda _present: connects.append((sub.address, len(got))),
            subscriptions=[("t/ra/#", 0)],
        )
        async with connected(sub):
            # the SUBSCRIBE went out before this on the same connection: subscribed once acked
            await asyncio.wait_for(sub.publish("t/sync", b""), 5)
            sub.pause_reading()
            await publish_burst(mosquitto, "first", BURST)
            sock = sub._client.socket()
            await eventually(lambda: bool(select.select([sock], [], [], 0)[0]), 5)
            sub.resume_reading()  # one chunk read, one packet handled, then paused again
            await eventually(lambda: len(got) == 1, 5)
            assert sub._client.unread(sock), "the case under test: bytes read ahead"

            mosquitto.kill()
            if end == "dropped_with_bytes_unread":
                sub.reconnect()  # as the intake's deaf repair does, with bytes unread
            sub.resume_reading()
            on_second = (second.host, second.port)
            await eventually(lambda: sub.connected and sub.address == on_second, 15)
            await asyncio.wait_for(sub.publish("t/sync", b""), 5)
            await publish_burst(second, "second", 20)
            await eventually(lambda: sum(m.topic == "t/ra/second" for m in got) == 20, 10)

    # one connection to each: nothing garbled on the second (a protocol error drops it)
    assert [address for address, _ in connects] == [(mosquitto.host, mosquitto.port), on_second]
    before_second = connects[1][1]
    first = [m.payload for m in got[:before_second]]
    # what the dead broker had sent: whole packets, in order, from the first on
    assert first == [payload("first", i) for i in range(len(first))]
    if end == "read_to_its_end":
        assert len(first) > 1  # the bytes read ahead were handed to paho before the end
    else:
        assert len(first) == 1  # the bytes unread went with their connection, as the kernel's
    # and nothing of the first broker's on the second's connection
    assert [(m.topic, m.payload) for m in got[before_second:]] == [
        ("t/ra/second", payload("second", i)) for i in range(20)
    ]
