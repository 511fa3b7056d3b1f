"""One asyncio MQTT session on top of paho, with no thread per client.

paho does the protocol; the event loop does the waiting. paho's socket callbacks register
its socket with the loop (`add_reader`/`add_writer`), and one shared ticker per loop calls
`loop_misc()` for every session, so ten thousand simulated devices cost ten thousand
sockets and one timer, not ten thousand threads (FIELD-NOTES: ~5 KB a connection).

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
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


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
# packets one session reads per readable event; the socket stays readable for the rest
READ_PACKETS_PER_WAKEUP = 64
ConnectHandler = Callable[[bool], None]


class MqttError(Exception):
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
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    tls: TlsFiles | None = None
    username: str | None = None
    will: Will | None = None
    max_inflight: int = 1000
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0


class _Ticker:
    """Calls `loop_misc()` once a second for every live session on one event loop."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticker] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clients: weakref.WeakSet[paho.Client] = weakref.WeakSet()
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> _Ticker:
        ticker = cls._by_loop.get(loop)
        if ticker is None:
            ticker = cls._by_loop[loop] = cls(loop)
        return ticker

    def add(self, client: paho.Client) -> None:
        self._clients.add(client)
        if self._handle is None:
            self._handle = self._loop.call_later(1.0, self._tick)

    def discard(self, client: paho.Client) -> None:
        self._clients.discard(client)

    def _tick(self) -> None:
        for client in list(self._clients):
            client.loop_misc()
        self._handle = self._loop.call_later(1.0, self._tick) if self._clients else None


class Session:
    """An MQTT connection that keeps itself connected until closed.

    `run()` is the session's task: it connects, and after any loss waits a jittered,
    exponentially growing delay and connects again. `publish()` returns a future that
    completes when the broker has taken the message (PUBACK for QoS 1).
    """

    def __init__(
        self,
        settings: Settings,
        on_message: MessageHandler,
        *,
        on_connect: ConnectHandler | None = None,
        on_disconnect: Callable[[], None] | None = None,
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
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._closing = False
        self._reading_paused = False
        self._connect_result: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[list[int]]] = set()
        self._client = self._make_client()

    # ---- public API -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def run(self) -> None:
        """Stay connected until `close()`; never returns otherwise."""
        self._bind_loop()
        delay = self.settings.backoff_min_s
        while not self._closing:
            try:
                await self._connect_once()
                delay = self.settings.backoff_min_s
                await self._lost.wait()
            except (OSError, ssl.SSLError, MqttError) as exc:
                log.warning(
                    "mqtt %s: cannot connect to %s:%s: %s",
                    self.settings.client_id,
                    self.settings.host,
                    self.settings.port,
                    exc,
                )
            if self._closing:
                break
            # Full jitter keeps a fleet that lost the broker together from returning together.
            await asyncio.sleep(self._rng.uniform(0, delay))
            delay = min(delay * 2, self.settings.backoff_max_s)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Send now; the future completes when the broker has the message.

        A QoS 1 message published while disconnected waits in paho's queue and goes out
        on reconnect, so callers may publish at any time; their own outbox decides what
        to do if the future never completes.
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
        self._write_now()
        return done

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
            client.loop_write()

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe now and after every reconnect; returns the broker's granted QoS."""
        for entry in filters:
            if entry not in self._subscriptions:
                self._subscriptions.append(entry)
        if not self.connected:
            raise NotConnected(f"mqtt {self.settings.client_id}: not connected")
        return await self._send_subscribe(filters)

    async def close(self) -> None:
        """Disconnect cleanly (DISCONNECT sent: the broker drops our will), then let go."""
        self._closing = True
        if self._client.is_connected():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._disconnected.wait()
        self._abort_socket()
        self._lost.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()

    # ---- paho plumbing ----------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = s.version == 5
        client = paho.Client(
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
            client.tls_set_context(s.tls.context())
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
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

    async def _connect_once(self) -> None:
        loop = self._bind_loop()
        s = self.settings
        self._lost.clear()
        self._connect_result = loop.create_future()
        properties = None
        if s.version == 5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s if s.persistent else 0
        # The TCP connect and TLS handshake block, so they run on a worker thread; the
        # socket callbacks they trigger are marshalled back to the loop (`_on_loop`).
        connecting = loop.run_in_executor(None, self._blocking_connect, properties)
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The worker thread finishes its connect regardless; close what it opens.
            connecting.add_done_callback(lambda _done: self._abort_socket())
            raise
        if self._closing:
            self._abort_socket()
            return
        ticker = _Ticker.for_loop(loop)
        ticker.add(self._client)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when a
        # cancellation arrives together with it, and the cancelled session then runs on.
        try:
            async with asyncio.timeout(s.connect_timeout_s * 2):
                await asyncio.shield(self._connect_result)
        except TimeoutError:
            self._forget_socket()
            raise MqttError("no CONNACK from the broker in time") from None

    def _blocking_connect(self, properties: Properties | None) -> None:
        s = self.settings
        self._client.connect(
            s.host,
            s.port,
            keepalive=s.keepalive_s,
            clean_start=not s.persistent if s.version == 5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )

    def _forget_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._loop is not None:
            _Ticker.for_loop(self._loop).discard(self._client)

    def _abort_socket(self) -> None:
        self._forget_socket()
        # paho has no public "drop the connection now"; closing its socket is what its own
        # error paths do, and it reports through on_socket_close like any other close.
        self._client._sock_close()

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
        if sock.fileno() >= 0 and not self._reading_paused:
            self._loop.add_reader(sock, self._read)

    def _read(self) -> None:
        """paho's loop_read() reads as many packets as it has publishes awaiting a PUBACK,
        whatever happens meanwhile. A paused reader must stop after the packet it is in, or
        a gateway that acks while paused would take ever bigger gulps on each resume (its
        acks' PUBACKs are not read while paused): so the same steps, checked per packet,
        and a bounded number per wake-up so other sessions on the loop get their turn."""
        client = self._client
        for _ in range(READ_PACKETS_PER_WAKEUP):
            if self._reading_paused or client.socket() is None:
                return
            rc = client._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                client._loop_rc_handle(rc)
                return

    def pause_reading(self) -> None:
        """Read nothing more from the broker until `resume_reading()`: for a consumer that
        has fallen behind. TCP flow control then holds the rest at the broker, so memory
        stays bounded here. Writes (acks) go on. Keep pauses shorter than the keepalive:
        the broker's ping responses wait too."""
        self._reading_paused = True
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        self._reading_paused = False
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._add_reader(sock)

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and sock.fileno() >= 0:
            self._on_loop(self._loop.remove_reader, sock)

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
        if self._client.want_write():
            self._loop.add_writer(fd, self._client.loop_write)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and sock.fileno() >= 0:
            self._on_loop(self._loop.remove_writer, sock)

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        result = self._connect_result
        if reason.is_failure:
            if result is not None and not result.done():
                result.set_exception(
                    ConnectRefused(self.settings.host, self.settings.port, str(reason))
                )
            return
        self._connected.set()
        self._disconnected.clear()
        if result is not None and not result.done():
            result.set_result(None)
        session_present = bool(getattr(flags, "session_present", False))
        if self._subscriptions and not session_present:
            task = asyncio.ensure_future(self._send_subscribe(list(self._subscriptions)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if self._on_connect is not None:
            self._on_connect(session_present)

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        self._forget_socket()
        self._lost.set()
        result = self._connect_result
        if result is not None and not result.done():
            # Closed before CONNACK: retry after the backoff, not after the CONNACK timeout.
            result.set_exception(MqttError(f"connection closed before CONNACK: {reason}"))
        if was_connected and self._on_disconnect is not None:
            self._on_disconnect()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._on_message(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
        except Exception:
            # A handler bug must not take the connection down with it.
            log.exception("mqtt %s: message handler failed", self.settings.client_id)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        done = self._pending.pop(mid, None)
        if done is None or done.done():
            return
        if reason.is_failure:
            done.set_exception(MqttError(f"broker rejected publish: {reason}"))
        else:
            done.set_result(None)

    async def _send_subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        loop = self._bind_loop()
        rc, mid = self._client.subscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"subscribe failed: {paho.error_string(rc)}")
        waiter: asyncio.Future[list[int]] = loop.create_future()
        self._subscribe_waiters[mid] = waiter
        async with asyncio.timeout(self.settings.connect_timeout_s * 2):
            return await waiter

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        waiter = self._subscribe_waiters.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result([r.value for r in reasons])

    # ---- repair (used by the gateway's intake probe) ------------------------------------

    async def resubscribe(self) -> list[int]:
        """Send every subscription again now: a broker may keep a session yet forget one of
        its subscriptions (mosquitto 2.0.11, a shared one across its restart: FIELD-NOTES)."""
        if not self.connected:
            raise NotConnected(f"mqtt {self.settings.client_id}: not connected")
        return await self._send_subscribe(list(self._subscriptions))

    def reconnect(self) -> None:
        """Drop the connection now; `run()` connects again after its backoff. For a link
        that looks up but carries nothing (black-holed): keepalive would take ~2x longer."""
        was_connected = self._connected.is_set()
        self._abort_socket()
        self._connected.clear()
        self._disconnected.set()
        self._lost.set()
        if was_connected and self._on_disconnect is not None:
            self._on_disconnect()
