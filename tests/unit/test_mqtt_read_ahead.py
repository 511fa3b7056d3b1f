"""The session reads what the socket has in one call and hands paho its packets from it
(ansimi/mqtt.py `_BufferedClient`): a socket pair stands in for the broker."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from ansimi.mqtt import READ_PACKETS_PER_WAKEUP, Message, Session, Settings


class CountingSocket(socket.socket):
    """A socket that counts its recv calls (paho's only way of reading)."""

    recvs = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recvs += 1
        return super().recv(bufsize, flags)


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0 (short enough for a one-byte remaining length)."""
    name = topic.encode()
    rest = len(name).to_bytes(2, "big") + name + payload
    assert len(rest) < 128
    return bytes([0x30, len(rest)]) + rest


@pytest.fixture
def linked() -> Iterator[tuple[Session, CountingSocket, socket.socket, list[Message]]]:
    """A session whose client reads from one end of a socket pair; the test writes the
    broker's bytes to the other end."""
    got: list[Message] = []
    session = Session(
        Settings(host="127.0.0.1", port=1, client_id="read-ahead", version=311), got.append
    )
    ours, broker = socket.socketpair()
    counted = CountingSocket(fileno=ours.detach())
    counted.setblocking(False)
    session._client._sock = counted
    try:
        yield session, counted, broker, got
    finally:
        session._client._sock = None
        counted.close()
        broker.close()


def test_a_burst_of_packets_costs_one_recv_and_the_one_that_finds_nothing(
    linked: tuple[Session, CountingSocket, socket.socket, list[Message]],
) -> None:
    session, counted, broker, got = linked
    broker.sendall(b"".join(publish_packet(f"t/{i}", b"x" * 40) for i in range(10)))
    while session._client._packet_read() == 0:
        pass
    assert [m.topic for m in got] == [f"t/{i}" for i in range(10)]
    # paho alone: three recv calls a packet (type, length, the rest)
    assert counted.recvs == 2


def test_a_packet_split_across_reads_is_put_together(
    linked: tuple[Session, CountingSocket, socket.socket, list[Message]],
) -> None:
    session, _, broker, got = linked
    packet = publish_packet("t/split", b"y" * 60)
    broker.sendall(packet[:20])
    assert session._client._packet_read() != 0  # the rest is not there yet
    broker.sendall(packet[20:])
    assert session._client._packet_read() == 0
    assert [(m.topic, m.payload) for m in got] == [("t/split", b"y" * 60)]


async def test_packets_read_ahead_beyond_one_wakeups_share_are_delivered(
    linked: tuple[Session, CountingSocket, socket.socket, list[Message]],
) -> None:
    """Read from the socket but not yet handled, they would wait for more bytes to wake
    the loop: a quiet broker after a burst must not strand them."""
    session, _, broker, got = linked
    session._loop = asyncio.get_running_loop()
    session._loop_thread = threading.get_ident()
    count = 3 * READ_PACKETS_PER_WAKEUP
    broker.sendall(b"".join(publish_packet(f"t/{i}", b"z") for i in range(count)))
    session._read()  # the socket's one readable event
    assert len(got) == READ_PACKETS_PER_WAKEUP
    async with asyncio.timeout(5):
        while len(got) < count:
            await asyncio.sleep(0)
    assert [m.topic for m in got] == [f"t/{i}" for i in range(count)]


async def test_a_paused_session_keeps_what_it_read_ahead_until_resumed(
    linked: tuple[Session, CountingSocket, socket.socket, list[Message]],
) -> None:
    session, _, broker, got = linked
    session._loop = asyncio.get_running_loop()
    session._loop_thread = threading.get_ident()
    broker.sendall(b"".join(publish_packet(f"t/{i}", b"z") for i in range(10)))
    session._client._packet_read()  # one packet handled, nine read ahead
    session.pause_reading()
    session._read()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(got) == 1
    session.resume_reading()
    async with asyncio.timeout(5):
        while len(got) < 10:
            await asyncio.sleep(0)
    assert [m.topic for m in got] == [f"t/{i}" for i in range(10)]
