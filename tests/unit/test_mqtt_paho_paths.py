"""The four paho steps ansimi/mqtt.py `_BufferedClient` overrides, held against paho's own on
crafted bytes: whatever a broker (or something posing as one) sends, the session's short
reading of PUBLISH and PUBACK does what paho's does, and joined writes put the same bytes on
the wire in the same order, with the same callbacks, whatever `send()` returns."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from hypothesis import example, given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ansimi.mqtt import Message, Session, Settings, _BufferedClient


def remaining_length(n: int) -> bytes:
    out = b""
    while True:
        n, digit = divmod(n, 128)
        if not n:
            return out + bytes([digit])
        out += bytes([digit | 0x80])


@st.composite
def publish_packets(draw: st.DrawFn, version: int) -> bytes:
    """A PUBLISH, often not a well-formed one: any flags (QoS 3, DUP, retain), a topic
    length that lies, an empty or non-UTF-8 topic, a packet id 0, MQTT 5 properties or none."""
    flags = draw(st.integers(0, 15))
    topic = draw(st.sampled_from([b"t/a", b"", b"\xff\xfe", "\xe9/\xfc".encode(), b"a\x00b"]))
    stated = len(topic) + draw(st.sampled_from([0, 0, 0, 1, -1, 300]))
    body = max(0, stated).to_bytes(2, "big")[: draw(st.sampled_from([2, 2, 1, 0]))] + topic
    if flags & 0x06:
        body += draw(st.integers(0, 2)).to_bytes(2, "big")[: draw(st.sampled_from([2, 2, 1]))]
    if version == 5:
        body += draw(st.sampled_from([b"\x00", b"\x00", b"\x02\x01\x01", b"", b"\x05"]))
    body += draw(st.sampled_from([b"", b"payload", b"\x00\x00"]))
    return bytes([0x30 | flags]) + remaining_length(len(body)) + body


@st.composite
def puback_packets(draw: st.DrawFn) -> bytes:
    """A PUBACK for a publish in flight (mid 1) or not, with or without a reason code."""
    body = draw(st.sampled_from([b"\x00\x01", b"\x00\x00", b"\x00\x07", b"\x00", b""]))
    body += draw(st.sampled_from([b"", b"", b"\x00", b"\x10\x00"]))
    return bytes([0x40 | draw(st.sampled_from([0, 0, 2]))]) + remaining_length(len(body)) + body


def read_all(data: bytes, version: int, *, short_path: bool) -> tuple[Any, ...]:
    """What a session makes of `data` from its broker: the messages handed on, paho's
    return codes, the publishes reported done and the bytes it sends back."""
    got: list[Message] = []
    session = Session(Settings("127.0.0.1", 1, "paths", version=version), got.append)  # type: ignore[arg-type]
    client = session._client
    if not short_path:
        client.deliver = None  # paho's own path and on_message
    done: list[tuple[int, str]] = []
    client.on_publish = lambda _c, _u, mid, reason, _p: done.append((mid, str(reason)))
    client._out_messages[1] = paho.MQTTMessage(mid=1)
    client._out_messages[1].qos = 1
    client._inflight_messages = 1
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    broker.setblocking(False)
    client._sock = ours
    rcs: list[int | str] = []
    try:
        broker.sendall(data)
        for _ in range(20):
            try:
                rc = client._packet_read()
            except Exception as exc:  # the same failure either way is the same answer
                rcs.append(type(exc).__name__)
                break
            rcs.append(int(rc))
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        client._packet_write()
        try:
            sent = broker.recv(1 << 16)
        except BlockingIOError:
            sent = b""
    finally:
        client._sock = None
        ours.close()
        broker.close()
    return [(m.topic, m.payload, m.qos, m.retain) for m in got], rcs, done, sent


@given(st.sampled_from([311, 5]).flatmap(lambda v: st.tuples(st.just(v), packets_of(v))))
@example((311, b"\x32\x07\x00\x03t/a\x00\x00"))  # QoS 1, packet id 0
@example((5, b"\x30\x06\x00\x03t/a\x05"))  # MQTT 5 properties that run past the end
def test_plain_packets_are_read_as_paho_reads_them(case: tuple[int, bytes]) -> None:
    version, data = case
    assert read_all(data, version, short_path=True) == read_all(data, version, short_path=False)


def packets_of(version: int) -> st.SearchStrategy[bytes]:
    one = st.one_of(publish_packets(version), puback_packets())
    return st.lists(one, min_size=1, max_size=3).map(b"".join)


class ShortSends(socket.socket):
    """A socket whose send() refuses (EAGAIN) or takes part of what it is given, by a seed."""

    pick: random.Random

    def send(self, data: Any, flags: int = 0) -> int:
        roll = self.pick.random()
        if roll < 0.2:
            raise BlockingIOError
        taken = self.pick.randint(1, len(data)) if roll < 0.6 else len(data)
        return super().send(bytes(data[:taken]), flags)


QUEUED = {
    "puback": (paho.PUBACK, 0, b"\x40\x02\x00"),
    "pingreq": (paho.PINGREQ, 0, b"\xc0\x00"),
    "publish-qos0": (paho.PUBLISH, 0, b"\x30\x05\x00\x01tx"),
    "publish-qos1": (paho.PUBLISH | 2, 1, b"\x32\x07\x00\x01t\x00"),
    "disconnect": (paho.DISCONNECT, 0, b"\xe0\x00"),
}


def write_all(
    kinds: list[str], seed: int, write: Callable[[_BufferedClient], MQTTErrorCode]
) -> tuple[Any, ...]:
    """`kinds` queued, then written by `write` until the queue is empty or the socket closed
    (a DISCONNECT): the bytes the broker got, the QoS 0 publishes reported, the disconnects."""
    client = _BufferedClient(CallbackAPIVersion.VERSION2, client_id="joined")
    reported: list[int] = []
    client.on_publish = lambda _c, _u, mid, _r, _p: reported.append(mid)
    disconnects: list[int] = []
    client.on_disconnect = lambda *_: disconnects.append(1)
    ours, broker = socket.socketpair()
    sock = ShortSends(fileno=ours.detach())
    sock.pick = random.Random(seed)
    sock.setblocking(False)
    broker.setblocking(False)
    client._sock = sock
    for n, kind in enumerate(kinds):
        command, qos, packet = QUEUED[kind]
        packet = packet + bytes([n])  # each packet tells which it was
        client._out_packet.append(
            {
                "command": command,
                "mid": 100 + n,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": paho.MQTTMessageInfo(100 + n),
            }
        )
    received = b""
    try:
        for _ in range(1_000):
            if not client._out_packet or client._sock is None:
                break
            write(client)
            with contextlib.suppress(BlockingIOError):  # nothing more has come
                received += broker.recv(1 << 16)
        with contextlib.suppress(OSError):  # nothing more, or closed after a DISCONNECT
            received += broker.recv(1 << 16)
    finally:
        if client._sock is not None:
            client._sock.close()
        broker.close()
    return received, reported, disconnects, len(client._out_packet)


@given(st.lists(st.sampled_from(sorted(QUEUED)), min_size=1, max_size=12), st.integers(0, 999))
def test_joined_writes_leave_in_order_whatever_send_returns(kinds: list[str], seed: int) -> None:
    """paho's own write, one send() a packet, is the reference: the same sends refused or
    cut short at the same points of the byte stream may fall elsewhere in a joined one, so
    only what the broker ends up with, and what is reported, are compared."""
    joined = write_all(kinds, seed, _BufferedClient._packet_write)
    alone = write_all(kinds, seed, paho.Client._packet_write)
    assert joined == alone
