"""The session's own reading of plain PUBLISH and PUBACK packets (ansimi/mqtt.py
`_BufferedClient._handle_publish`, `_handle_pubackcomp`) against a real mosquitto: what it
reads itself and what it leaves to paho (QoS 2, MQTT 5 properties, a PUBACK with a reason
code) reach the handler alike, and every message is acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import paho.mqtt.client as paho
import paho.mqtt.publish as paho_publish
import pytest
from ansimi_testkit import connected, eventually
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message, Session, Settings


async def from_outside(broker: Mosquitto, messages: list[dict[str, Any]], version: int) -> None:
    """Each at its QoS from an independent paho client: at the broker when this returns."""
    await asyncio.to_thread(
        paho_publish.multiple,
        cast(Any, messages),
        hostname=broker.host,
        port=broker.port,
        client_id="outside",
        protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
    )


@contextlib.asynccontextmanager
async def subscribed(
    broker: Mosquitto, version: int, got: list[Message], handler: Any = None
) -> AsyncIterator[Session]:
    session = Session(
        Settings(broker.host, broker.port, "packets", version=version),  # type: ignore[arg-type]
        handler or got.append,
        subscriptions=[("t/p/#", 2)],
    )
    async with connected(session):
        # the SUBSCRIBE went out before this on the same connection: subscribed once acked
        await asyncio.wait_for(session.publish("t/sync", b""), 5)
        yield session


@pytest.mark.parametrize("version", [5, 311])
async def test_every_kind_of_publish_reaches_the_handler_and_is_acknowledged(
    mosquitto: Mosquitto, version: int
) -> None:
    user = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    user.UserProperty = ("k", "v")
    await from_outside(mosquitto, [{"topic": "t/p/kept", "payload": b"r", "retain": True}], 5)
    sent = [
        ("t/p/zero", b"a", 0),
        ("t/p/one", b"b", 1),
        ("t/p/two", b"c", 2),
        *((f"t/p/many/{i}", b"m%d" % i, 1) for i in range(50)),
    ]
    messages: list[dict[str, Any]] = [
        {"topic": t, "payload": p, "qos": q, "retain": False} for t, p, q in sent
    ]
    # MQTT 5 properties reach a 5 subscriber: paho decodes that one
    messages.append({"topic": "t/p/props", "payload": b"p", "qos": 1, "properties": user})
    got: list[Message] = []
    async with subscribed(mosquitto, version, got):
        await from_outside(mosquitto, messages, 5)
        await eventually(lambda: len(got) == len(sent) + 2, 10)
    expected = [
        Message("t/p/kept", b"r", 0, True),  # the retained copy, on subscribing
        *(Message(t, p, q, False) for t, p, q in sent),
        Message("t/p/props", b"p", 1, False),
    ]
    # in any order: a QoS 2 message is handed over at its PUBREL, after later ones
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    # The same persistent session again: a QoS 1 or 2 message the session had not
    # acknowledged would come back now, ahead of this one.
    again: list[Message] = []
    async with subscribed(mosquitto, version, again):
        await from_outside(mosquitto, [{"topic": "t/p/after", "payload": b"z", "qos": 1}], 5)
        await eventually(lambda: len(again) >= 1, 10)
        await asyncio.wait_for(again_sync(again), 5)
    assert [m.topic for m in again] == ["t/p/kept", "t/p/after"]


async def again_sync(got: list[Message]) -> None:
    while [m.topic for m in got][-1:] != ["t/p/after"]:
        await asyncio.sleep(0.01)


async def test_a_handler_that_raises_is_logged_and_the_link_stays(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Message] = []

    def handler(message: Message) -> None:
        if message.payload == b"bad":
            raise ValueError("a handler bug")
        got.append(message)

    caplog.set_level(logging.ERROR)
    async with subscribed(mosquitto, 5, got, handler) as session:
        await from_outside(
            mosquitto,
            [{"topic": "t/p/x", "payload": p, "qos": 1} for p in (b"bad", b"good")],
            5,
        )
        await eventually(lambda: len(got) == 1, 10)
        assert session.connected
    assert got == [Message("t/p/x", b"good", 1, False)]
    assert "message handler failed" in caplog.text and "a handler bug" in caplog.text


async def test_a_batch_of_publishes_leaves_in_one_send(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's acks of one batch: one system call (paho sends packet by packet), and
    each still reaches its subscriber whole."""
    got: list[Message] = []
    async with subscribed(mosquitto, 5, got):
        pub = Session(Settings(mosquitto.host, mosquitto.port, "batch-pub"), lambda m: None)
        async with connected(pub):
            sends: list[int] = []
            sock_send = pub._client._sock_send

            def counted(buf: bytes | bytearray) -> int:
                sends.append(len(buf))
                return sock_send(buf)

            monkeypatch.setattr(pub._client, "_sock_send", counted)
            with pub.batched_writes():
                sent = [pub.publish(f"t/p/batch/{i}", b"%d" % i) for i in range(20)]
            assert len(sends) == 1
            await asyncio.wait_for(asyncio.gather(*sent), 5)
        await eventually(lambda: len(got) == 20, 10)
    assert got == [Message(f"t/p/batch/{i}", b"%d" % i, 1, False) for i in range(20)]
