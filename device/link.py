"""The device's MQTT link: signs everything that goes up, verifies everything that comes down.

A message from the gateway counts only if it carries the gateway's signature, is
addressed to this device, arrived on this device's own `down` topic and is fresher than
anything before it (`protocol.replay`, rule 4): acks and syncs must name a message this
device sent, commands and rtc must also be inside the window of the device's (corrected)
clock. A forged or replayed ack changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.logs import LogLimiter
from ansimi.mqtt import Message as MqttMessage
from ansimi.mqtt import Session, Settings, TlsFiles, Will
from device.config import DeviceConfig
from device.outbox import Outbox
from protocol.clock import Clock, wall_ms
from protocol.envelope import open_for_device, seal
from protocol.errors import ProtocolError, Replay, UnknownSigner
from protocol.jws import Signer
from protocol.messages import (
    AckMessage,
    Alert,
    Body,
    Cancel,
    Message,
    Status,
    SyncMessage,
    build_message,
)
from protocol.replay import DEFAULT_WINDOW_MS, check_sequence, check_window
from protocol.topics import down_filter, parse_topic, up_topic

log = logging.getLogger(__name__)

# A sync must name one of this many messages sent last: enough for every message of a
# long outage's resends, few enough that a sync from long ago names none of them.
RECENT_IDS = 512
# An alert or cancel sent again this many times on one connection, with nothing at all
# heard on our downlink for this long: the broker takes what we send but delivers us
# nothing (RabbitMQ 3.10 after the SIGKILL of a node kept bells' subscription queues
# without a working consumer, through reconnects to the same node and session;
# tests/cluster/test_multihost.py), so begin a new session on the next broker. The same
# silence is what gateways that are all down look like: each such reconnect that hears
# nothing after it doubles the wait before the next, up to DOWNLINK_DEAF_MAX_S. What the
# old session still held for us is lost with it, and nothing depends on it: an alert
# unacknowledged is sent again (and acknowledged again), a command unanswered is offered
# again.
DEAF_RESENDS = 3
DOWNLINK_DEAF_S = 20.0
DOWNLINK_DEAF_MAX_S = 600.0


class Link:
    def __init__(
        self,
        config: DeviceConfig,
        signer: Signer,
        gateway_key: Ed25519PublicKey,
        outbox: Outbox,
        on_down: Callable[[Message], None],
        *,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        clock_ms: Clock | None = None,
        window_ms: int = DEFAULT_WINDOW_MS,
    ) -> None:
        self._config = config
        self._device_id = config.device.id
        self._signer = signer
        self._gateway_id = config.gateway.id
        self._gateway_key = gateway_key
        self._outbox = outbox
        self._on_down = on_down
        self._on_connect_cb = on_connect
        self._clock_ms = clock_ms or wall_ms
        self._window_ms = window_ms
        self.rejected: dict[str, int] = {}
        # refusals logged once per reason a minute; `rejected` counts them all
        self._log_limit = LogLimiter(60_000, lambda: int(time.monotonic() * 1000))
        self._recent: deque[str] = deque(maxlen=RECENT_IDS)  # ids signed lately, oldest first
        self._monotonic = time.monotonic
        # on this connection: urgent resends since anything arrived on our downlink, and when
        # something last did (or the connection began)
        self._resends_unheard = 0
        self._down_heard_s = self._monotonic()
        self._deaf_after_s = DOWNLINK_DEAF_S
        self.session = Session(
            self._settings(config, Will(*self._sealed(Status(state="offline")))),
            self._on_message,
            on_connect=self._connected,
            on_disconnect=on_disconnect,
            # subscribed again by the session on every connect, before _connected runs
            subscriptions=[(down_filter(self._device_id), 1)],
        )

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def window_ms(self) -> int:
        return self._window_ms

    def _settings(self, config: DeviceConfig, will: Will | None) -> Settings:
        m = config.mqtt
        tls = TlsFiles(m.ca_file, m.cert_file, m.key_file) if m.ca_file is not None else None
        return Settings(
            host=m.host,
            port=m.port,
            client_id=self._device_id,
            version=m.version,
            # The keepalive follows the heartbeat: quiet for a heartbeat and the time its
            # PUBACK may take, the link is probed, and found dead ack_timeout_s later
            # (16 s with the defaults: within two heartbeats). Not the heartbeat alone:
            # the broker drops a client quiet for 1.5 keepalives, too tight for a 1 s
            # heartbeat on a slow link.
            keepalive_s=math.ceil(m.heartbeat_s + config.link.ack_timeout_s),
            ack_timeout_s=config.link.ack_timeout_s,
            other_addresses=config.link.other_addresses(),
            tls=tls,
            will=will,
        )

    def retarget(self, config: DeviceConfig) -> None:
        """Connect again with `config`'s broker and timings (a remote config changed them)."""
        self._config = config
        # the will made at start stays: the session's client was made with it
        self.session.retarget(self._settings(config, self.session.settings.will))

    def _sealed(self, body: Body, message_id: str | None = None) -> tuple[str, bytes]:
        """The topic and signed bytes for `body`, with the next sequence number."""
        message = build_message(
            body,
            device=self._device_id,
            seq=self._outbox.next_seq(),
            ts=self._clock_ms(),
            id=message_id,
        )
        self._recent.append(message.id)
        return up_topic(self._device_id, message.type), seal(message, self._signer).encode()

    def send(
        self,
        body: Body,
        *,
        message_id: str | None = None,
        retain: bool = False,
        resend: bool = False,
    ) -> asyncio.Future[None]:
        """Sign with a fresh sequence number and publish at QoS 1.

        A resend keeps its message id but gets a new sequence number and timestamp, so an
        alert that waited out a long outage is still fresh when it finally arrives.
        """
        topic, payload = self._sealed(body, message_id)
        # An alert (duress included) or a cancel is someone in danger: a missing PUBACK
        # makes the session test the link at once instead of waiting for the keepalive.
        urgent = isinstance(body, Alert | Cancel)
        if urgent and resend and self.session.connected:
            self._resent_urgent()
        return self.session.publish(topic, payload, retain=retain, urgent=urgent)

    def _resent_urgent(self) -> None:
        """A resend of an alert or cancel: the gateway has not answered it. If nothing at all
        has come down this connection for a while either, it is the connection (see
        DEAF_RESENDS), not the gateway: connect again."""
        self._resends_unheard += 1
        quiet_s = self._monotonic() - self._down_heard_s
        if self._resends_unheard < DEAF_RESENDS or quiet_s < self._deaf_after_s:
            return
        log.warning(
            "link %s: %d resends and nothing on our downlink for %.0f s: "
            "a new session, on the next broker",
            self._device_id,
            self._resends_unheard,
            quiet_s,
        )
        self._deaf_after_s = min(self._deaf_after_s * 2, DOWNLINK_DEAF_MAX_S)
        self._new_connection()
        self.session.start_afresh()

    def _new_connection(self) -> None:
        """A connection begins: its downlink has had no chance yet."""
        self._resends_unheard = 0
        self._down_heard_s = self._monotonic()

    def _heard_down(self) -> None:
        """Something arrived on our downlink: it works."""
        self._new_connection()
        self._deaf_after_s = DOWNLINK_DEAF_S

    async def run(self) -> None:
        await self.session.run()

    async def close(self) -> None:
        await self.session.close()

    def _connected(self, session_present: bool) -> None:
        self._new_connection()
        # The session has already sent the SUBSCRIBE for our `down` topic on this
        # connection, so no ack to what follows can overtake it.
        # Retained like the will, so the broker's retained state is the latest one, not
        # the `offline` of some earlier disconnect.
        self.send(Status(state="online"), retain=True)
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _resolve(self, kid: str) -> Ed25519PublicKey:
        if kid != self._gateway_id:
            raise UnknownSigner(f"{kid!r} is not this device's gateway ({self._gateway_id})")
        return self._gateway_key

    def _on_message(self, raw: MqttMessage) -> None:
        self._heard_down()  # even a refused message: the broker delivers to us
        try:
            topic = parse_topic(raw.topic)
            opened = open_for_device(raw.payload, self._resolve, self._device_id, topic)
            msg = opened.message
            check_sequence(self._outbox.down_high_water, msg.seq)
            if isinstance(msg, SyncMessage):
                # taken whatever our clock says, so it must answer something we sent lately
                if msg.body.ref not in self._recent:
                    raise Replay(
                        f"sync about {msg.body.ref}, not a message this device sent lately"
                    )
            elif not isinstance(msg, AckMessage):
                # an ack names a message of ours; a command names nothing: it needs the clock
                check_window(msg.ts, self._clock_ms(), self._window_ms)
        except ProtocolError as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            # a broker replaying a queue after a failover can hand us thousands of stale
            # copies: a bell's SD card must not take a line each
            quiet = self._log_limit.quiet(exc.reason)
            if quiet is not None:
                log.warning(
                    "link %s: ignored a downlink message: %s%s",
                    self._device_id,
                    exc.reason,
                    LogLimiter.more(quiet),
                )
            log.debug("link %s: ignored downlink detail: %s", self._device_id, exc)
            return
        self._outbox.set_down_high_water(msg.seq)
        self._on_down(msg)
