"""One asyncio MQTT session on top of paho, with no thread per client.

paho does the protocol; the event loop does the waiting. paho's socket callbacks register
its socket with the loop (`add_reader`/`add_writer`), so ten thousand simulated devices
cost ten thousand sockets, not ten thousand threads (FIELD-NOTES: ~5 KB a connection).

The session, not paho, decides when the link is dead (`LinkWatch`): paho's keepalive
notices a black-holed link only after twice the keepalive, and a publish without its
PUBACK counts for nothing there. Here an urgent publish without its PUBACK, or a quiet
link, is probed at once with a PINGREQ, and a probe left unanswered drops the connection
and moves to the next broker address. Every (re)connect subscribes again to everything the
session was asked to subscribe to, whatever `session_present` says: mosquitto 2.0.11
restores a session across its restart but stops delivering its `$share/...` filters
(FIELD-NOTES).

Business code never sees a paho object: it gets frozen `Message`s and awaits futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from ansimi.errors import AnsimiError


def _import_paho_without_dnspython() -> None:
    """paho imports dnspython, when installed, only for `connect_srv`, which we never use;
    it costs a device ~5 MB of its ~40 MB budget. Hide it while paho loads, so paho goes
    without; anything that does need dnspython (aioice) still imports it normally later."""
    if "dns" in sys.modules:
        return
    sys.modules["dns"] = None  # type: ignore[assignment]
    try:
        import paho.mqtt.client  # noqa: F401
    finally:
        del sys.modules["dns"]


_import_paho_without_dnspython()

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

log = logging.getLogger(__name__)

MessageHandler = Callable[["Message"], None]
# packets one session reads per readable event; the rest are read on the loop's next turn
READ_PACKETS_PER_WAKEUP = 64
# bytes one recv asks the socket for (see _BufferedClient)
READ_CHUNK_BYTES = 64 * 1024
# queued packets joined into one send, up to about this many bytes (see _BufferedClient)
WRITE_JOIN_BYTES = 64 * 1024
ConnectHandler = Callable[[bool], None]
LinkDeadListener = Callable[["LinkDead"], None]
# why a link was declared dead: an urgent publish's PUBACK, or a quiet link, then no PINGRESP;
# or an urgent publish without its PUBACK for `puback_give_up_s`, pings answered or not
DeadReason = Literal["ack_timeout", "idle", "puback_stuck"]


class MqttError(AnsimiError):
    """Root of this module's errors."""


class NotConnected(MqttError, ConnectionError):
    """The session has no connection to the broker right now."""


class ConnectRefused(MqttError, ConnectionRefusedError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"broker {host}:{port} refused the connection: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message, as business code sees it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Client side of mutual TLS: the site CA, and this client's certificate and key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    client_id: str
    version: Literal[5, 311] = 5
    # A persistent session lets the broker keep QoS 1 messages for us while we are away.
    persistent: bool = True
    session_expiry_s: int = 7 * 24 * 3600
    # Nothing heard or sent this long: probe the link (MQTT's keepalive, sent in CONNECT).
    keepalive_s: int = 30
    # An urgent publish without its PUBACK this long makes the session probe the link; a
    # probe without its PINGRESP this long declares the link dead.
    ack_timeout_s: float = 3.0
    # An urgent publish without its PUBACK this long declares the link dead even while the
    # broker answers pings: RabbitMQ 3.10 after a node was killed kept bells' connections
    # alive but never enqueued (nor acked) their alerts again (tests/cluster/test_multihost).
    # A new connection's publishes went through. Far above a working broker's PUBACK.
    puback_give_up_s: float = 15.0
    # Further brokers, tried in turn after (host, port) when a link is declared dead or a
    # connect fails; empty: always (host, port).
    other_addresses: tuple[tuple[str, int], ...] = ()
    connect_timeout_s: float = 5.0
    tls: TlsFiles | None = None
    username: str | None = None
    will: Will | None = None
    max_inflight: int = 1000
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class LinkDead:
    """The session gave up its link: what a caller measuring it needs (the simulator's
    `latency_s.press_to_link_dead`). Listeners run synchronously at the declaration,
    before the session reconnects."""

    at_s: float  # the event loop's clock (monotonic)
    wall_s: float  # time.time() at the same moment, for reports
    reason: DeadReason
    address: str  # "host:port" given up; the session reconnects to the next one


class LinkWatch:
    """When to test the link and when to give it up. A functional core: no I/O, and time
    is an argument, so the rules are tested without a broker or a sleep.

    - An urgent publish whose PUBACK is not in within `ack_timeout_s` makes the link
      suspect; so does nothing heard, or nothing sent, for `idle_s` (the keepalive).
    - A suspect link is probed with a PINGREQ. Its PINGRESP within `ack_timeout_s` clears
      it, and forgives the PUBACKs that were late (a slow broker is not a dead link).
      Otherwise the link is dead: `ack_timeout_s` after the probe, so a quiet dead link
      is found within `idle_s + ack_timeout_s` of the last packet heard.
    - Forgiven is not forgotten: an urgent publish still without its PUBACK
      `give_up_s` after it went out on this connection makes the link dead anyway (a
      broker that answers pings but never takes the alert is no use to a bell).
    """

    def __init__(self, ack_timeout_s: float, idle_s: float, give_up_s: float = 15.0) -> None:
        if ack_timeout_s <= 0 or idle_s <= 0:
            raise ValueError(f"ack_timeout_s and idle_s must be > 0: {ack_timeout_s}, {idle_s}")
        # One bound for a PUBACK and a PINGRESP, even below a short keepalive: a slow but
        # working link (300 ms a packet, queued behind others) must have time to answer.
        self.ack_timeout_s = ack_timeout_s
        self.idle_s = idle_s
        # never before a probe could have cleared it (a device's ack_timeout_s may be long)
        self.give_up_s = max(give_up_s, 2 * ack_timeout_s)
        self._expected: dict[int, float] = {}  # mid -> PUBACK due by
        self._give_up_at: dict[int, float] = {}  # mid -> the link is dead by then without it
        self._last_in = 0.0
        self._last_out = 0.0
        self._probe_due: float | None = None
        self._probe_reason: DeadReason = "idle"
        self.probes_answered = 0  # since the session began: a link tested and found alive

    @property
    def probing(self) -> bool:
        return self._probe_due is not None

    def connected(self, now: float) -> None:
        self._last_in = self._last_out = now
        self._expected.clear()
        self._give_up_at.clear()
        self._probe_due = None

    def expect(self, mid: int, now: float) -> None:
        """An urgent publish went out (or again, on a new connection): its PUBACK is due
        within the bound."""
        self._expected[mid] = now + self.ack_timeout_s
        self._give_up_at[mid] = now + self.give_up_s

    def acked(self, mid: int) -> None:
        self._expected.pop(mid, None)
        self._give_up_at.pop(mid, None)

    def heard(self, now: float) -> None:
        self._last_in = max(self._last_in, now)

    def sent(self, now: float) -> None:
        self._last_out = max(self._last_out, now)

    def probe_sent(self, now: float, reason: DeadReason) -> None:
        self._probe_due = now + self.ack_timeout_s
        self._probe_reason = reason

    def answered(self, now: float) -> None:
        """A PINGRESP: the round trip works now."""
        self._probe_due = None
        self.probes_answered += 1
        for mid in [mid for mid, due in self._expected.items() if due <= now]:
            del self._expected[mid]

    def resumed(self, now: float) -> None:
        """Reading was paused: what went unread is no evidence of a dead link."""
        self._last_in = max(self._last_in, now)
        if self._probe_due is not None:
            self._probe_due = max(self._probe_due, now + self.ack_timeout_s)
        for mid, at in self._give_up_at.items():  # a PUBACK may be among what went unread
            self._give_up_at[mid] = max(at, now + self.ack_timeout_s)

    def due(self, now: float) -> tuple[Literal["probe", "dead"], DeadReason] | None:
        if self._give_up_at and min(self._give_up_at.values()) <= now:
            return ("dead", "puback_stuck")
        if self._probe_due is not None:
            return ("dead", self._probe_reason) if now >= self._probe_due else None
        if any(due <= now for due in self._expected.values()):
            return ("probe", "ack_timeout")
        if now - self._last_in >= self.idle_s or now - self._last_out >= self.idle_s:
            return ("probe", "idle")
        return None

    def next_check(self) -> float:
        give_up = min(self._give_up_at.values(), default=float("inf"))
        if self._probe_due is not None:
            return min(self._probe_due, give_up)
        return min(
            [min(self._last_in, self._last_out) + self.idle_s, *self._expected.values(), give_up]
        )


# shared by every plain PUBACK (_BufferedClient._handle_pubackcomp); never changed
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def _unreported(packet: Any) -> bool:
    """A queued packet whose complete sending paho acts on no further (see _packet_write)."""
    kind = packet["command"] & 0xF0
    return kind != paho.DISCONNECT and not (kind == paho.PUBLISH and packet["qos"] == 0)


class _BufferedClient(paho.Client):
    """paho reads a packet in three or more `recv` calls (its type, each byte of its length,
    then the rest) and ends a burst with one more that fails: each a system call, and at
    ~1,000 packets/s each way a gateway's largest cost after the cryptography
    (bench/gateway.py). This one takes what the socket has, up to READ_CHUNK_BYTES, in one
    call and hands paho its reads from that.

    Bytes read ahead belong to the socket they came from: a read from any other socket (the
    next connection) drops them first, so nothing of a dead link is parsed on a new one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_ahead = b""
        self._read_pos = 0
        self._read_from: object = None
        # the session's handler, given each PUBLISH without paho's MQTTMessage (see
        # _handle_publish); None: paho's own path and on_message
        self.deliver: Callable[[Message], None] | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._read_from is not self._sock:
            self._read_ahead, self._read_pos, self._read_from = b"", 0, self._sock
        pos = self._read_pos
        if pos >= len(self._read_ahead):
            data = super()._sock_recv(READ_CHUNK_BYTES)
            if len(data) <= bufsize:
                return data  # also b"" (closed): nothing kept
            self._read_ahead, pos = data, 0
        self._read_pos = pos + bufsize
        return self._read_ahead[pos : pos + bufsize]

    # ---- the two packets a gateway receives by the thousand -----------------------------
    # paho decodes every PUBLISH into an MQTTMessage and every PUBACK (both MQTT versions)
    # with a new MQTT 5 `Properties` object, whose constructor builds its name and type
    # tables each time; a PUBLISH then walks the topic-callback matcher. For the plain
    # cases (QoS 0 or 1, no MQTT 5 properties, a PUBACK with no reason code) these two
    # read the few fixed fields here and hand everything else (the PUBACK sent back, the
    # in-flight window, on_publish) to paho's own steps; any other packet goes to paho.

    def _handle_publish(self) -> MQTTErrorCode:
        deliver = self.deliver
        header = self._in_packet["command"]
        packet = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        topic_end = 2 + int.from_bytes(packet[0:2], "big")
        body = topic_end + (2 if qos else 0)
        v5 = self._protocol == paho.MQTTv5
        if (
            deliver is None
            or qos > 1
            or self._manual_ack
            or topic_end == 2  # an empty topic: an alias, or malformed
            or len(packet) < body + v5
            or (v5 and packet[body] != 0)  # MQTT 5 properties follow
        ):
            return super()._handle_publish()
        try:
            topic = packet[2:topic_end].decode()
        except UnicodeDecodeError:
            return super()._handle_publish()  # paho logs it, and the topic as hex
        message = Message(topic, bytes(packet[body + v5 :]), qos, bool(header & 0x01))
        with self._in_callback_mutex:  # as paho's callbacks: _write_now waits for it
            deliver(message)
        if qos == 0:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(int.from_bytes(packet[topic_end:body], "big"))

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:  # a reason code, maybe properties: paho's
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        """paho sends each queued packet with a send() of its own: a gateway's batch of
        acks, and the PUBACK of each message it reads, a system call and a TCP segment
        each. The queued packets at its head whose sending paho reports to no one (all but
        a QoS 0 PUBLISH and DISCONNECT) are joined first, up to WRITE_JOIN_BYTES, and leave
        together. Only the head, with popleft and appendleft as paho's own writes do: a
        connect on a worker thread appends its CONNECT at the other end meanwhile."""
        queue = self._out_packet
        if len(queue) > 1 and queue[0]["pos"] == 0 and _unreported(queue[0]):
            parts: list[bytes | bytearray] = []
            size = 0
            while size < WRITE_JOIN_BYTES:
                try:
                    head = queue.popleft()
                except IndexError:
                    break
                if not _unreported(head):
                    queue.appendleft(head)
                    break
                parts.append(head["packet"])
                size += len(head["packet"])
            joined = b"".join(parts)
            queue.appendleft(
                {
                    "command": paho.PUBACK,  # a kind paho reports nothing for
                    "mid": 0,
                    "qos": 1,
                    "pos": 0,
                    "to_process": len(joined),
                    "packet": joined,
                    "info": None,
                }
            )
        return super()._packet_write()

    def unread(self, sock: Any) -> bool:
        """Bytes `sock` has given up that paho has not read yet: the socket will not say it
        is readable for them. (Not in TLS's buffer: a recv of READ_CHUNK_BYTES takes a
        whole record, at most 16 KiB.)"""
        return (
            sock is not None
            and sock is self._sock
            and self._read_from is sock
            and self._read_pos < len(self._read_ahead)
        )


class Session:
    """An MQTT connection that keeps itself connected until closed.

    `run()` is the session's task: it connects, and after any loss waits a jittered,
    exponentially growing delay and connects again (at once after a link declared dead, or
    `reconnect()`). `publish()` returns a future that completes when the broker has taken
    the message (PUBACK for QoS 1). Every filter given to `subscribe()` (or `subscriptions`)
    is subscribed again on every connect, before `on_connect` runs.
    """

    def __init__(
        self,
        settings: Settings,
        on_message: MessageHandler,
        *,
        on_connect: ConnectHandler | None = None,
        on_disconnect: Callable[[], None] | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._subscribe_waiters: dict[int, asyncio.Future[list[int]]] = {}
        self._subscriptions: list[tuple[str, int]] = []
        self._remember(subscriptions)
        self._addresses = [(settings.host, settings.port), *settings.other_addresses]
        self._address_index = 0
        # connection attempts that failed (refused, unreachable), since the session began:
        # what shows a client kept out (a revoked bell) is still trying and still refused
        self.failed_connects = 0
        self._watch = LinkWatch(
            settings.ack_timeout_s, settings.keepalive_s, settings.puback_give_up_s
        )
        self._watch_timer: asyncio.TimerHandle | None = None
        self._urgent: set[int] = set()  # mids of urgent publishes still without a PUBACK
        self._link_dead_listeners: list[LinkDeadListener] = []
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._closing = False
        self._reading_paused = False
        # inside batched_writes(): publishes queue, and go out together at its end
        self._writes_held = 0
        # the descriptor the loop watches for writability, if any (see _write_or_watch)
        self._write_watched: int | None = None
        self._connect_result: asyncio.Future[None] | None = None
        # the next connect begins a new session (start_afresh)
        self._afresh = False
        self._pubacks_here = 0  # PUBACKs on the current (or last) connection
        self._tls_context: ssl.SSLContext | None = None
        self._client = self._make_client()

    # ---- public API -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def address(self) -> tuple[str, int]:
        """The broker this session connects (or is connected) to."""
        return self._addresses[self._address_index]

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    @property
    def probes_answered(self) -> int:
        """Probes (PINGREQ) of this session's links that had their PINGRESP in time."""
        return self._watch.probes_answered

    def add_link_dead_listener(self, listener: LinkDeadListener) -> None:
        """Call `listener(LinkDead)` each time this session declares its link dead."""
        self._link_dead_listeners.append(listener)

    async def run(self) -> None:
        """Stay connected until `close()`; never returns otherwise."""
        self._bind_loop()
        delay = self.settings.backoff_min_s
        while not self._closing:
            self._retry_now.clear()
            try:
                await self._connect_once()
                await self._lost.wait()
                if self._retry_now.is_set() or self._pubacks_here or not self._pending:
                    delay = self.settings.backoff_min_s
                else:
                    # the broker takes connections but not messages (see _connect_failed)
                    self._connect_failed(
                        f"the connection ended with {len(self._pending)} publishes and no PUBACK"
                    )
            except (OSError, ssl.SSLError, MqttError) as exc:
                self._connect_failed(f"cannot connect: {exc}")
            if self._closing:
                break
            if self._retry_now.is_set():
                continue  # a link declared dead, or reconnect(): no backoff
            # Full jitter keeps a fleet that lost the broker together from returning together.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._rng.uniform(0, delay)):
                    await self._retry_now.wait()
            delay = min(delay * 2, self.settings.backoff_max_s)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        urgent: bool = False,
    ) -> asyncio.Future[None]:
        """Send now; the future completes when the broker has the message.

        A QoS 1 message published while disconnected waits in paho's queue and goes out
        on reconnect, so callers may publish at any time; their own outbox decides what
        to do if the future never completes. An `urgent` QoS 1 message without its PUBACK
        within `ack_timeout_s` makes the session test the link at once (`LinkWatch`).
        """
        loop = self._bind_loop()
        done: asyncio.Future[None] = loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            done.set_exception(
                MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            )
        elif qos == 0:
            done.set_result(None)
        else:
            self._pending[info.mid] = done
            if urgent:
                self._urgent.add(info.mid)
                # one published while disconnected is watched from the next CONNACK on
                if self.connected:
                    self._watch.expect(info.mid, loop.time())
                    self._arm_watch()
        if not self._writes_held:
            self._write_now()
        return done

    @contextlib.contextmanager
    def batched_writes(self) -> Iterator[None]:
        """Publishes made inside go out together when it ends: one write pass for a batch
        of acks instead of one per ack (paho's write path, with its lock and callbacks,
        cost a gateway more per ack than the send itself; bench/gateway.py)."""
        self._writes_held += 1
        try:
            yield
        finally:
            self._writes_held -= 1
            if not self._writes_held:
                self._write_now()

    def _write_now(self) -> None:
        """Put queued packets on the wire now, not on the loop's next turn.

        With an external loop, paho only asks for a writable-socket callback, so a publish
        would wait for everything else the loop has ready (bench/device.py: ~0.1 ms of a
        0.15 ms round trip). Like paho's own loop, do not write while paho is running one
        of our callbacks: its write path takes that same lock to report a QoS 0 publish.
        """
        client = self._client
        if threading.get_ident() != self._loop_thread or not client.want_write():
            return
        in_callback = client._in_callback_mutex
        if in_callback.acquire(blocking=False):
            in_callback.release()
            self._flush()

    def _flush(self) -> None:
        self._client.loop_write()
        if self._loop is not None:
            self._watch.sent(self._loop.time())

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe now and after every reconnect; returns the broker's granted QoS."""
        self._remember(filters)
        if not self.connected:
            raise NotConnected(f"mqtt {self.settings.client_id}: not connected")
        return await self._send_subscribe(filters)

    async def resubscribe(self) -> list[int]:
        """Subscribe again to every filter remembered, now; returns the granted QoS. For a
        caller whose own probe shows that a subscription has stopped delivering."""
        if not self.connected:
            raise NotConnected(f"mqtt {self.settings.client_id}: not connected")
        if not self._subscriptions:
            return []
        return await self._send_subscribe(list(self._subscriptions))

    def reload_tls(self) -> None:
        """Read the certificate and key files again (a renewed certificate) and connect
        again with them; the TLS context stays the one paho was given."""
        tls = self.settings.tls
        if tls is None or self._tls_context is None or tls.cert_file is None:
            return
        key = str(tls.key_file) if tls.key_file else None
        self._tls_context.load_cert_chain(str(tls.cert_file), key)
        self.reconnect()

    def retarget(self, settings: Settings) -> None:
        """Connect again at once with `settings` (another broker, keepalive or ack timeout);
        the client id, TLS files and will stay those the session was made with."""
        self._stop_watch()
        self.settings = settings
        self._addresses = [(settings.host, settings.port), *settings.other_addresses]
        self._address_index = 0
        self._watch = LinkWatch(
            settings.ack_timeout_s, settings.keepalive_s, settings.puback_give_up_s
        )
        self.reconnect()

    def reconnect(self) -> None:
        """Drop the connection and connect again at once, without the backoff delay.

        Runs on the loop's next turn: a caller may be inside one of paho's callbacks,
        whose lock paho's disconnect path takes again."""
        self._bind_loop().call_soon(self._drop_connection)

    def start_afresh(self) -> None:
        """Connect again at once, to the next broker, in a new session: the broker discards
        the one it kept for us, with its queue of messages to us. For a session whose
        messages to us stopped coming while the broker still takes ours (device/link.py).

        MQTT 5 begins the new session in the CONNECT itself (clean start). MQTT 3.1.1 has
        no such flag: a clean session there ends with its connection. So the clean
        connection is dropped at its CONNACK, before anyone uses it, and a persistent one
        follows at once."""
        self._afresh = True
        self._next_address()
        self.reconnect()

    async def close(self) -> None:
        """Disconnect cleanly (DISCONNECT sent: the broker drops our will), then let go."""
        self._closing = True
        self._stop_watch()
        if self._client.is_connected():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._disconnected.wait()
        self._abort_socket()
        self._lost.set()
        self._retry_now.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        self._urgent.clear()

    # ---- paho plumbing ----------------------------------------------------------------

    def _make_client(self) -> _BufferedClient:
        s = self.settings
        v5 = s.version == 5
        client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not s.persistent,
            reconnect_on_failure=False,
        )
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        if s.username:
            client.username_pw_set(s.username)
        if s.tls is not None:
            self._tls_context = s.tls.context()
            client.tls_set_context(self._tls_context)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.deliver = self._deliver
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        return client

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return self._loop

    def _remember(self, filters: Sequence[tuple[str, int]]) -> None:
        for entry in filters:
            if entry not in self._subscriptions:
                self._subscriptions.append(entry)

    def _connect_failed(self, why: str) -> None:
        """A connect that failed (refused, unreachable), or a connection that ended with
        publishes waiting and not one PUBACK on it. The latter is a broker that takes
        connections but not messages: RabbitMQ 3.10's MQTT plugin closed every connection
        whose publish it nacked (a partitioned cluster losing a node), and bells, their
        backoff reset by each CONNACK, came back to that node three times a second for
        minutes (tests/cluster/test_multihost.py); a link that drops now and then while
        messages get through is not this. Either way the next attempt goes to the next
        broker, if any, and the backoff keeps growing."""
        self.failed_connects += 1
        host, port = self.address
        log.warning("mqtt %s: %s:%s: %s", self.settings.client_id, host, port, why)
        self._next_address()

    def _next_address(self) -> None:
        self._address_index = (self._address_index + 1) % len(self._addresses)

    async def _connect_once(self) -> None:
        loop = self._bind_loop()
        s = self.settings
        self._lost.clear()
        # A socket left from the last attempt is closed here, on the loop thread, where it
        # can be unwatched while its descriptor is still its own; left to paho, the worker
        # thread's connect would close it.
        self._abort_socket()
        self._connect_result = loop.create_future()
        properties = None
        if s.version == 5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s if s.persistent else 0
        # The TCP connect and TLS handshake block, so they run on a worker thread; the
        # socket callbacks they trigger are marshalled back to the loop (`_on_loop`).
        connecting = loop.run_in_executor(None, self._blocking_connect, self.address, properties)
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The worker thread finishes its connect regardless; close what it opens.
            connecting.add_done_callback(lambda _done: self._abort_socket())
            raise
        if self._closing:
            self._abort_socket()
            return
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a
        # cancellation arrives together with it, and the cancelled session then runs on.
        try:
            async with asyncio.timeout(s.connect_timeout_s * 2):
                await asyncio.shield(self._connect_result)
        except TimeoutError:
            self._abort_socket()
            raise MqttError("no CONNACK from the broker in time") from None

    def _blocking_connect(self, address: tuple[str, int], properties: Properties | None) -> None:
        s = self.settings
        clean = self._afresh or not s.persistent
        if s.version != 5:
            # 3.1.1's flag is fixed at paho's construction; its CONNECT reads this attribute
            self._client._clean_session = clean
        self._client.connect(
            address[0],
            address[1],
            keepalive=s.keepalive_s,
            clean_start=clean if s.version == 5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )

    def _unwatch(self, sock: Any) -> None:
        """Stop the loop watching `sock`. Only on the loop thread, before the socket is
        closed: a closed socket has no descriptor to name (`ValueError: Invalid file
        descriptor: -1`), and its old number may already belong to the next socket."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        fd = sock.fileno()
        if fd >= 0:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        self._write_watched = None

    def _forget_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            self._unwatch(sock)

    def _abort_socket(self) -> None:
        # paho has no public "drop the connection now"; closing its socket is what its own
        # error paths do, and it reports through on_socket_close like any other close.
        if self._client.socket() is not None:
            self._forget_socket()
            self._client._sock_close()

    def _drop_connection(self) -> None:
        self._retry_now.set()
        if self._closing:
            return
        if self._client.socket() is not None:
            # paho's own path for a lost connection: closes the socket, calls on_disconnect
            self._client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        result = self._connect_result
        if result is not None and not result.done():
            result.set_exception(MqttError("connection dropped before CONNACK"))

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # a late callback from a connect that outlived its loop
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed since the check
                loop.call_soon_threadsafe(fn, *args)

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # MQTT packets are small and each is waited for: with Nagle on, one written right
        # after another (a PUBACK, then the next publish) waits for the peer's delayed ACK,
        # ~40 ms on Linux. bench/gateway.py: window-1 press-to-ack p50 58 -> 36 ms.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_loop(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        assert self._loop is not None
        # from the connect's worker thread: the socket may be closed or replaced since
        current = self._client.socket()
        if current is None or current is not sock or current.fileno() < 0:
            return
        if not self._reading_paused:
            self._loop.add_reader(current, self._read)

    def _read(self) -> None:
        """paho's loop_read() reads as many packets as it has publishes awaiting a PUBACK,
        whatever happens meanwhile. A paused reader must stop after the packet it is in, or
        a gateway that acks while paused would take ever bigger gulps on each resume (its
        acks' PUBACKs are not read while paused): so the same steps, checked per packet,
        and a bounded number per wake-up so other sessions on the loop get their turn."""
        client = self._client
        if self._loop is not None:
            self._watch.heard(self._loop.time())
        for _ in range(READ_PACKETS_PER_WAKEUP):
            if self._reading_paused or client.socket() is None:
                break
            rc = client._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                client._loop_rc_handle(rc)
                return
        self._read_soon_if_unread()
        # paho clears its ping time when a PINGRESP arrives: the probe has its answer
        if self._watch.probing and client._ping_t == 0 and self._loop is not None:
            self._watch.answered(self._loop.time())

    def pause_reading(self) -> None:
        """Read nothing more from the broker until `resume_reading()`: for a consumer that
        has fallen behind. TCP flow control then holds the rest at the broker, so memory
        stays bounded here. Writes (acks) go on; the link is not judged meanwhile, since
        the broker's answers wait unread too."""
        self._reading_paused = True
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._loop is not None:
            self._watch.resumed(self._loop.time())
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._add_reader(sock)
            self._read_soon_if_unread()

    def _read_soon_if_unread(self) -> None:
        """Packets already taken from the socket (more than one wake-up's share, or held
        while paused) are read on the loop's next turn: the socket would not wake us. The
        turn is bound to this socket: by then it may be closed and another connecting on a
        worker thread, whose socket is not ours to read until it is open (`_socket_open`)."""
        sock = self._client.socket()
        if self._loop is not None and not self._reading_paused and self._client.unread(sock):
            self._loop.call_soon(self._read_unread, sock)

    def _read_unread(self, sock: Any) -> None:
        if self._client.socket() is sock:
            self._read()

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this just before it closes `sock`. Every close happens on the loop
        # thread (see _connect_once); a removal queued from elsewhere would run after the
        # close, on a socket with no descriptor left.
        if threading.get_ident() == self._loop_thread:
            self._unwatch(sock)

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho has bytes to send. Try on the loop's next turn (publish() may have sent them
        # already): watching the socket for writability costs two epoll_ctl calls a packet,
        # and is needed only when the kernel's send buffer is full.
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread:
            loop.call_soon(self._write_or_watch, sock)
        else:
            self._on_loop(self._write_or_watch, sock)

    def _write_or_watch(self, sock: Any) -> None:
        assert self._loop is not None
        fd: int = sock.fileno()
        current = self._client.socket()
        if fd < 0 or current is None or current.fileno() != fd:
            return  # closed or replaced since
        self._write_now()
        # A failed write (the broker just reset the connection) closes the socket inside
        # _write_now, leaving its packets queued: watching the closed descriptor would
        # raise from the selector.
        if self._client.socket() is current and sock.fileno() == fd and self._client.want_write():
            self._loop.add_writer(fd, self._flush)
            self._write_watched = fd

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho says so after every write that empties its queue: only a descriptor we did
        # watch needs the selector call (a gateway's every ack paid for one otherwise)
        if self._loop is not None and threading.get_ident() == self._loop_thread:
            fd = sock.fileno()
            if fd >= 0 and fd == self._write_watched:
                self._loop.remove_writer(fd)
                self._write_watched = None

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        result = self._connect_result
        if reason.is_failure:
            if result is not None and not result.done():
                host, port = self.address
                result.set_exception(ConnectRefused(host, port, str(reason)))
            return
        if self._afresh:
            self._afresh = False
            if self.settings.version != 5 and self.settings.persistent:
                self._leave_clean_connection(result)
                return
        self._connected.set()
        self._disconnected.clear()
        if result is not None and not result.done():
            result.set_result(None)
        loop = self._bind_loop()
        now = loop.time()
        self._watch.connected(now)
        self._pubacks_here = 0
        for mid in self._urgent:  # resent by paho now: their PUBACKs are due again
            self._watch.expect(mid, now)
        self._arm_watch()
        # Every filter, whatever `session_present` says (see the module docstring). Sent
        # here, before on_connect, so the SUBSCRIBE goes ahead of anything the caller
        # publishes on connect: a reply to that cannot overtake the subscription.
        if self._subscriptions:
            filters = list(self._subscriptions)
            try:
                waiter = self._subscribe_now(filters)
            except NotConnected as exc:  # gone again already: the next connect retries
                log.warning("mqtt %s: %s", self.settings.client_id, exc)
            else:
                waiter.add_done_callback(partial(self._log_refused_subscriptions, filters))
        session_present = bool(getattr(flags, "session_present", False))
        if self._on_connect is not None:
            self._on_connect(session_present)

    def _leave_clean_connection(self, result: asyncio.Future[None] | None) -> None:
        """3.1.1's clean connection of `start_afresh` has done its work (the old session is
        gone) and would end its session with it: leave it with a DISCONNECT, so the broker
        sends no will (an `offline` that could land after the next connection's `online`),
        and connect again at once. Nobody was told of it: not connected, no on_connect."""
        log.info("mqtt %s: began a new session", self.settings.client_id)
        if result is not None and not result.done():
            result.set_result(None)
        self._retry_now.set()
        self._client.disconnect()
        # a DISCONNECT that cannot be written (the link died meanwhile) must not hold the
        # session here: nothing watches this connection
        sock = self._client.socket()
        self._bind_loop().call_later(self.settings.ack_timeout_s, self._drop_if_still_on, sock)

    def _drop_if_still_on(self, sock: Any) -> None:
        if sock is not None and self._client.socket() is sock:
            self._drop_connection()

    def _log_refused_subscriptions(
        self, filters: list[tuple[str, int]], waiter: asyncio.Future[list[int]]
    ) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            return  # the connection went again; the next connect subscribes again
        for (topic, _qos), granted in zip(filters, waiter.result(), strict=False):
            if granted >= 0x80:
                log.warning(
                    "mqtt %s: the broker refused the subscription to %s (reason code %#x)",
                    self.settings.client_id,
                    topic,
                    granted,
                )

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        self._forget_socket()
        self._stop_watch()
        self._lost.set()
        for waiter in self._subscribe_waiters.values():
            if not waiter.done():
                waiter.set_exception(NotConnected(f"connection lost before SUBACK: {reason}"))
        self._subscribe_waiters.clear()
        result = self._connect_result
        if result is not None and not result.done():
            # Closed before CONNACK: retry after the backoff, not after the CONNACK timeout.
            result.set_exception(MqttError(f"connection closed before CONNACK: {reason}"))
        if was_connected and self._on_disconnect is not None:
            self._on_disconnect()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._deliver(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _deliver(self, message: Message) -> None:
        try:
            self._on_message(message)
        except Exception:
            # A handler bug must not take the connection down with it.
            log.exception("mqtt %s: message handler failed", self.settings.client_id)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        if self._urgent:
            self._urgent.discard(mid)
            self._watch.acked(mid)
        done = self._pending.pop(mid, None)
        if done is None:
            return  # a QoS 0 publish, written
        self._pubacks_here += 1
        if done.done():
            return
        if reason.is_failure:
            done.set_exception(MqttError(f"broker rejected publish: {reason}"))
        else:
            done.set_result(None)

    def _subscribe_now(self, filters: list[tuple[str, int]]) -> asyncio.Future[list[int]]:
        loop = self._bind_loop()
        rc, mid = self._client.subscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"subscribe failed: {paho.error_string(rc)}")
        waiter: asyncio.Future[list[int]] = loop.create_future()
        self._subscribe_waiters[mid] = waiter
        self._write_now()
        return waiter

    async def _send_subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        waiter = self._subscribe_now(filters)
        async with asyncio.timeout(self.settings.connect_timeout_s * 2):
            return await waiter

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        waiter = self._subscribe_waiters.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result([r.value for r in reasons])

    # ---- the link watch (see LinkWatch) -------------------------------------------------

    def _arm_watch(self) -> None:
        """One timer per session, at the watch's next deadline. Deadlines only move later
        as packets come and go, so a timer already due earlier is kept and re-arms itself."""
        loop = self._loop
        if loop is None or not self.connected:
            return
        when = self._watch.next_check()
        timer = self._watch_timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._watch_timer = loop.call_at(when, self._check_link)

    def _stop_watch(self) -> None:
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None

    def _check_link(self) -> None:
        self._watch_timer = None
        loop = self._loop
        if loop is None or not self.connected or self._closing:
            return
        now = loop.time()
        if self._reading_paused:
            # the answers wait unread: judge nothing until reading resumes
            self._watch_timer = loop.call_at(now + self._watch.ack_timeout_s, self._check_link)
            return
        verdict = self._watch.due(now)
        if verdict is not None and verdict[0] == "dead":
            self._declare_dead(verdict[1], now)
            return
        if verdict is not None:
            if self._client._send_pingreq() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # no socket any more: the disconnect path has it
            self._watch.probe_sent(now, verdict[1])
            self._write_now()
        self._arm_watch()

    def _declare_dead(self, reason: DeadReason, now: float) -> None:
        host, port = self.address
        event = LinkDead(at_s=now, wall_s=time.time(), reason=reason, address=f"{host}:{port}")
        if reason == "puback_stuck":
            why = (
                f"an urgent publish had no PUBACK in {self._watch.give_up_s:g} s "
                "on this connection, whatever its pings"
            )
        else:
            first = "an urgent publish had no PUBACK" if reason == "ack_timeout" else "a quiet link"
            why = f"{first}, then no PINGRESP within {self._watch.ack_timeout_s:g} s"
        log.warning(
            "mqtt %s: link to %s declared dead (%s): reconnecting",
            self.settings.client_id,
            event.address,
            why,
        )
        self._next_address()
        for listener in list(self._link_dead_listeners):
            try:
                listener(event)
            except Exception:
                log.exception("mqtt %s: link-dead listener failed", self.settings.client_id)
        self._drop_connection()
