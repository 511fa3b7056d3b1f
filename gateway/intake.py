"""Intake: every uplink message is checked, kept, and only then acknowledged.

Checks, in order of cost: size, topic, signature against the registry, the device not
revoked, replay and time window, schema (parsed inside `open_from_device`). A refused
message is counted by reason and logged with the device id only; nothing escapes.

Messages are processed in batches: one group commit per batch, then the `received` acks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.mqtt import Message as MqttMessage
from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Device, Incoming, Store
from protocol.envelope import Opened, open_from_device
from protocol.errors import ProtocolError, UnknownSigner
from protocol.jws import MAX_TOKEN_BYTES
from protocol.keys import public_key_from_b64
from protocol.replay import check_fresh
from protocol.topics import parse_topic

log = logging.getLogger(__name__)

# Messages the device keeps in its outbox until it sees `received` for them.
ACKED_TYPES = frozenset({"alert", "cancel"})
# Messages that become events (and are forwarded); the rest only move the high-water mark.
KEPT_TYPES = frozenset({"alert", "cancel"})


class Revoked(ProtocolError, PermissionError):
    reason = "revoked"


class Registry:
    """Device keys and high-water marks, cached in memory in front of the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._devices: dict[str, Device] = {}
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.high_water: dict[str, int] = {}
        self.reload()

    def reload(self) -> None:
        devices = self._store.devices()
        self._devices = {d.device_id: d for d in devices}
        self._keys = {d.device_id: public_key_from_b64(d.public_key) for d in devices}
        for d in devices:
            if d.high_water is not None:
                self.high_water[d.device_id] = max(
                    d.high_water, self.high_water.get(d.device_id, -1)
                )

    def device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def resolve(self, kid: str) -> Ed25519PublicKey:
        key = self._keys.get(kid)
        if key is None:
            raise UnknownSigner(f"no registered device {kid!r}: enrol it with `ansimi provision`")
        return key


@dataclass(frozen=True, slots=True)
class _Checked:
    opened: Opened
    device: Device


class Intake:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        downlink: Downlink,
        metrics: Metrics,
        *,
        route: Callable[[str], tuple[str, ...]],
        window_ms: int,
        max_bytes: int = MAX_TOKEN_BYTES,
        batch_max: int = 500,
        clock_ms: Callable[[], int] | None = None,
        on_kept: Callable[[list[Incoming]], None] | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._downlink = downlink
        self._metrics = metrics
        self._route = route
        self._window_ms = window_ms
        self._max_bytes = max_bytes
        self._batch_max = batch_max
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._on_kept = on_kept
        self._queue: list[MqttMessage] = []
        self._wake = asyncio.Event()
        # SQLite commits (fsync) run here, so the loop keeps reading while a batch lands.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="intake-writer")

    def submit(self, message: MqttMessage) -> None:
        """Called for every uplink MQTT message, on the loop, without blocking."""
        self._queue.append(message)
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    batch = self._queue[: self._batch_max]
                    del self._queue[: self._batch_max]
                    await self._process(batch, loop)
        finally:
            self._writer.shutdown(wait=True)

    async def _process(self, batch: list[MqttMessage], loop: asyncio.AbstractEventLoop) -> None:
        now_ms = self._clock_ms()
        checked: list[_Checked] = []
        for message in batch:
            try:
                checked.append(self._check(message, now_ms))
            except ProtocolError as exc:
                self._reject(message, exc)
            except Exception:
                # A bug here must cost one message, never the gateway.
                self._metrics.rejected.labels("internal").inc()
                log.exception("intake: unexpected error on %s", _device_of(message.topic))
        if not checked:
            return
        incoming = [self._incoming(c) for c in checked]
        fresh = await loop.run_in_executor(self._writer, self._store.accept, incoming, now_ms)
        self._metrics.intake_batch.observe(len(incoming))
        kept: list[Incoming] = []
        for item, is_new in zip(incoming, fresh, strict=True):
            if is_new:
                self._metrics.accepted.labels(item.type).inc()
                if item.kept:
                    kept.append(item)
            else:
                self._metrics.duplicates.inc()
            if item.type in ACKED_TYPES:
                self._downlink.ack(item.device_id, item.event_id, "received")
        if kept and self._on_kept is not None:
            self._on_kept(kept)

    def _check(self, message: MqttMessage, now_ms: int) -> _Checked:
        topic = parse_topic(message.topic)
        opened = open_from_device(
            message.payload, self._registry.resolve, topic, max_bytes=self._max_bytes
        )
        msg = opened.message
        device = self._registry.device(msg.device)
        assert device is not None  # resolve() found its key
        if device.revoked:
            raise Revoked(f"device {msg.device} is revoked")
        high_water = self._registry.high_water.get(msg.device)
        try:
            check_fresh(high_water, msg.seq, msg.ts, now_ms, self._window_ms)
        except ProtocolError:
            if msg.type in ACKED_TYPES and self._is_known(msg.id):
                # The device missed our ack and resent the very same message: ack again.
                return _Checked(opened, device)
            raise
        self._registry.high_water[msg.device] = msg.seq
        return _Checked(opened, device)

    def _is_known(self, event_id: str) -> bool:
        return self._store.event(event_id) is not None

    def _incoming(self, checked: _Checked) -> Incoming:
        msg = checked.opened.message
        kept = msg.type in KEPT_TYPES
        return Incoming(
            event_id=msg.id,
            device_id=msg.device,
            seq=msg.seq,
            type=msg.type,
            ts_ms=msg.ts,
            body_json=msg.body.model_dump_json(),
            jws=checked.opened.token,
            centres=self._route(checked.device.district) if kept else (),
            kept=kept,
        )

    def _reject(self, message: MqttMessage, exc: ProtocolError) -> None:
        self._metrics.rejected.labels(exc.reason).inc()
        # Only the device id from the topic: the payload may carry personal data.
        log.warning("intake: refused a message from %s: %s", _device_of(message.topic), exc.reason)
        log.debug("intake: refusal detail for %s: %s", _device_of(message.topic), exc)


def _device_of(topic: str) -> str:
    parts = topic.split("/")
    candidate = parts[2] if len(parts) > 2 else "?"
    return candidate[:64] if candidate.replace("-", "").isalnum() else "(invalid id)"
