"""A TCP proxy on loopback between simulated devices and the broker, for network faults.

It reads each connection's MQTT CONNECT packet to learn which device it carries (the
client id is the device id), then pipes bytes both ways. Per device it can:

- drop: reset the connection now and refuse new ones, as a router that lost its uplink
  and answers with resets;
- hold: forward nothing either way while the sockets stay open (a black hole): keepalives
  go unanswered, so the device, the broker and the gateway's supervision must notice;
- delay: add latency to every chunk, in both directions;
- lose: with a probability per chunk, reset the connection. TCP itself never loses bytes,
  so a lossy link shows MQTT what it finally shows above TCP: a dead connection.

Plain TCP only: with TLS the CONNECT packet is encrypted, and the proxy would need the
client id another way (one listening port per device group).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field

from simulator.errors import SimulatorError

log = logging.getLogger(__name__)

CONNECT = 0x10
MAX_CONNECT_BYTES = 64 * 1024


class ProxyError(SimulatorError):
    """A connection the proxy cannot carry (not MQTT, or a malformed CONNECT)."""


def parse_connect(packet: bytes) -> str:
    """The client id of an MQTT 3.1.1 or 5 CONNECT packet (fixed header included)."""
    if not packet or packet[0] != CONNECT:
        raise ProxyError("first packet is not an MQTT CONNECT")
    pos = 1
    _, pos = _varint(packet, pos)
    name_len = int.from_bytes(packet[pos : pos + 2], "big")
    pos += 2 + name_len
    level = packet[pos]
    pos += 1 + 1 + 2  # level, flags, keepalive
    if level == 5:
        props_len, pos = _varint(packet, pos)
        pos += props_len
    id_len = int.from_bytes(packet[pos : pos + 2], "big")
    if pos + 2 + id_len > len(packet):
        raise ProxyError("CONNECT packet is cut short")
    return packet[pos + 2 : pos + 2 + id_len].decode("utf-8")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(4):
        if pos >= len(data):
            raise ProxyError("MQTT length field is cut short")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ProxyError("MQTT length field is longer than 4 bytes")


async def read_connect(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(1)
    length_bytes = b""
    for _ in range(4):
        byte = await reader.readexactly(1)
        length_bytes += byte
        if not byte[0] & 0x80:
            break
    length, _ = _varint(b"\0" + length_bytes, 1)
    if length > MAX_CONNECT_BYTES:
        raise ProxyError(f"CONNECT of {length} bytes is too large")
    return header + length_bytes + await reader.readexactly(length)


MQTT_PUBLISH = 3  # the packet type, in the high nibble of the first byte


def without_publishes(buffer: bytes) -> tuple[bytes, bytes, int]:
    """The whole MQTT packets at the head of `buffer` without its PUBLISH packets; the
    bytes of a packet not complete yet, kept for the next read; how many were taken out."""
    kept = bytearray()
    pos = taken = 0
    while pos < len(buffer):
        try:
            length, body = _varint(buffer, pos + 1)
        except ProxyError:
            if len(buffer) - pos < 5:
                break  # the length field itself is not all here yet
            raise
        end = body + length
        if end > len(buffer):
            break
        if buffer[pos] >> 4 == MQTT_PUBLISH:
            taken += 1
        else:
            kept += buffer[pos:end]
        pos = end
    return bytes(kept), buffer[pos:], taken


@dataclass(eq=False)
class _Conn:
    device: str
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        host: str = "127.0.0.1",
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.dropped: set[str] = set()
        self.held: set[str] = set()
        self.delay_s: dict[str, float] = {}
        self.loss: dict[str, float] = {}
        self.lost = 0
        self.swallowed: set[str] = set()
        self.publishes_swallowed = 0
        self.closing_on_publish: set[str] = set()
        self._rng = rng or random.Random()
        self.connections = 0
        self.refused = 0
        self.holding = 0  # chunks read and kept back by a hold right now
        self._conns: set[_Conn] = set()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # ---- faults ---------------------------------------------------------------------------

    def drop(self, devices: set[str]) -> None:
        self.dropped |= devices
        for conn in list(self._conns):
            if conn.device in devices:
                conn.abort()

    def hold(self, devices: set[str]) -> None:
        self.held |= devices
        self._wake()

    def heal(self, devices: set[str]) -> None:
        self.dropped -= devices
        self.held -= devices
        self.swallowed -= devices
        self.closing_on_publish -= devices
        self._wake()

    def delay(self, devices: set[str], seconds: float) -> None:
        for device in devices:
            if seconds > 0:
                self.delay_s[device] = seconds
            else:
                self.delay_s.pop(device, None)

    def lose(self, devices: set[str], probability: float) -> None:
        """Reset a connection of these devices with `probability` per chunk forwarded."""
        for device in devices:
            if probability > 0:
                self.loss[device] = probability
            else:
                self.loss.pop(device, None)

    def swallow(self, devices: set[str]) -> None:
        """These devices' PUBLISH packets vanish on the way to the broker; everything else
        passes, so their pings are answered: a broker that keeps the link but never takes
        (nor acknowledges) a message. `heal` ends it."""
        self.swallowed |= devices

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def close_on_publish(self, devices: set[str]) -> None:
        """These devices' connections are accepted and end at their first PUBLISH, before
        the broker sees it: RabbitMQ 3.10's MQTT plugin closing every connection whose
        publish it nacked. `heal` ends it."""
        self.closing_on_publish |= devices

    async def _gate(self, device: str) -> None:
        while device in self.held:
            await self._changed.wait()

    # ---- piping ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn("?", [writer])
        try:
            first = await asyncio.wait_for(read_connect(reader), 10)
            conn.device = parse_connect(first)
            if conn.device in self.dropped:
                self.refused += 1
                return
            self._conns.add(conn)
            await self._gate(conn.device)
            if conn.device in self.dropped:
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            conn.writers.append(up_writer)
            self.connections += 1
            up_writer.write(first)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._pipe(reader, up_writer, conn, upstream=True))
                tasks.create_task(self._pipe(up_reader, writer, conn))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ProxyError, ExceptionGroup):
            pass  # a connection ending is ordinary here: faults end connections on purpose
        finally:
            self._conns.discard(conn)
            conn.abort()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        conn: _Conn,
        *,
        upstream: bool = False,
    ) -> None:
        partial = b""  # the start of a packet, while publishes are looked for
        try:
            while data := await src.read(65536):
                parsed = conn.device in self.swallowed or conn.device in self.closing_on_publish
                if upstream and (partial or parsed):
                    if parsed:
                        data, partial, taken = without_publishes(partial + data)
                        if taken and conn.device in self.closing_on_publish:
                            break
                        self.publishes_swallowed += taken
                    else:
                        data, partial = partial + data, b""
                if conn.device in self.held:
                    self.holding += 1
                    try:
                        await self._gate(conn.device)
                    finally:
                        self.holding -= 1
                if conn.device in self.dropped:
                    break
                if self._rng.random() < self.loss.get(conn.device, 0.0):
                    self.lost += 1
                    break
                delay = self.delay_s.get(conn.device)
                if delay:
                    await asyncio.sleep(delay)
                dst.write(data)
                await dst.drain()
        finally:
            # one direction ending ends the connection, as a real TCP reset would
            conn.abort()
