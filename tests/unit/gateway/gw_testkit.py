"""A gateway's insides on an in-memory store, a fake clock and a captured downlink.

A plain module (not conftest) so the gateway tests import it by a name no other test tree
uses. Keys are fixed, so failures reproduce byte for byte.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from ansimi_testkit import CENTRAL_TOML  # noqa: F401  (re-exported for the gateway tests)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ansimi.mqtt import Message as MqttMessage
from gateway.config import ApiToken
from gateway.downlink import Downlink
from gateway.fleethealth import FleetHealth
from gateway.intake import Intake, KeptHeartbeat, Registry
from gateway.metrics import Metrics
from gateway.store import Delivery, Device, SqliteStore
from gateway.supervise import Supervisor
from protocol.envelope import open_envelope, open_for_device, seal
from protocol.jws import Signer
from protocol.keys import public_key_to_b64
from protocol.messages import (
    AckMessage,
    Alert,
    Body,
    Heartbeat,
    Message,
    StatusMessage,
    SyncMessage,
    build_message,
)
from protocol.topics import up_topic

NOW = 1_800_000_000_000
WINDOW_MS = 300_000
TIMEOUT_MS = 30_000
GATEWAY = "gw-test"
GATEWAY_KEY = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
# two registered devices in different districts, one revoked, one never registered
KEYS = {
    name: Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)
    for n, name in enumerate(("bell-0001", "bell-0002", "bell-0003", "bell-0009"), start=1)
}
DISTRICTS = {"bell-0001": "mapo", "bell-0002": "gangnam", "bell-0003": "mapo"}
ROUTES = {"mapo": ("central", "mapo"), "gangnam": ("central",)}
ALERT = Alert(bell="emergency", trigger="press")
# API tokens for the personal-data tests: an installer, the central centre (all districts)
# and a desk that serves gangnam only
ADMIN = "admin-token-0123456789abc"
CENTRAL = "central-token-0123456789"
GANGNAM = "gangnam-desk-token-0123"
PRIVACY_TOKENS = [
    ApiToken(name="installer", role="admin", token=ADMIN),
    ApiToken(name="central", role="operator", token=CENTRAL),
    ApiToken(name="gangnam-desk", role="operator", token=GANGNAM, districts=["gangnam"]),
]


def signer(device_id: str) -> Signer:
    return Signer(device_id, KEYS[device_id])


class Clock:
    def __init__(self, ms: int = NOW) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@dataclass
class Env:
    clock: Clock
    store: SqliteStore
    registry: Registry
    metrics: Metrics
    downlink: Downlink
    supervisor: Supervisor
    intake: Intake
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    woken: list[int] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)

    def published(self) -> list[Message]:
        """Every message published to devices, checked as a device would."""
        out = []
        for topic, payload in self.sent:
            device_id = topic.split("/")[2]
            opened = open_for_device(
                payload, {GATEWAY: GATEWAY_KEY.public_key()}.__getitem__, device_id
            )
            out.append(opened.message)
        return out

    def acks(self) -> list[tuple[str, str, str]]:
        """(device, alert id, stage) of every ack published."""
        return [
            (m.device, m.body.ref, m.body.stage)
            for m in self.published()
            if isinstance(m, AckMessage)
        ]

    def syncs(self) -> list[SyncMessage]:
        return [m for m in self.published() if isinstance(m, SyncMessage)]

    def message(
        self,
        body: Body,
        device: str = "bell-0001",
        *,
        signed_by: str | None = None,
        topic_device: str | None = None,
        seq: int | None = None,
        ts: int | None = None,
        id: str | None = None,
        retain: bool = False,
    ) -> MqttMessage:
        """A message about `device`, by default well formed and fresh."""
        if seq is None:
            seq = self.seqs.get(device, 0) + 1
        self.seqs[device] = max(seq, self.seqs.get(device, 0))
        msg = build_message(
            body, device=device, seq=seq, ts=self.clock.ms if ts is None else ts, id=id
        )
        token = seal(msg, signer(signed_by or device))
        return MqttMessage(up_topic(topic_device or device, msg.type), token.encode(), 1, retain)

    async def feed(self, *messages: MqttMessage) -> None:
        await self.intake.process(list(messages))

    def rejected(self, reason: str | None = None) -> float:
        if reason is not None:
            value = self.metrics.registry.get_sample_value(
                "ansimi_rejected_total", {"reason": reason}
            )
            return value or 0.0
        return sum(
            s.value
            for m in self.metrics.registry.collect()
            if m.name == "ansimi_rejected"
            for s in m.samples
            if s.name == "ansimi_rejected_total"
        )

    def event_count(self) -> int:
        return len(self.store.database.events(None, 100_000))

    def route_of(self, device_id: str) -> tuple[str, ...] | None:
        """The centres of an enrolled, unrevoked device (as the service routes its events)."""
        return route_in(self.registry, device_id)

    def intake_with(self, **hooks: Any) -> Intake:
        """An intake on this env's store, registry and clock that tells `hooks` (a watcher's
        `on_kept`, `on_heartbeats`, `secondary`, ...) what it keeps, as the service wires it."""
        return intake_on(
            self.store, self.registry, self.downlink, self.metrics, self.clock, **hooks
        )

    def gateway_statuses(self, deliveries: Iterable[Delivery], state: str) -> list[StatusMessage]:
        """The gateway-signed status messages of `state` among `deliveries`."""
        found = []
        for delivery in deliveries:
            if delivery.type != "status":
                continue
            opened = open_envelope(delivery.jws, {GATEWAY: GATEWAY_KEY.public_key()}.__getitem__)
            message = opened.message
            if isinstance(message, StatusMessage) and message.body.state == state:
                found.append(message)
        return found


@pytest.fixture
async def env() -> Env:
    """A gateway's insides, fresh for each test (import it into the test module)."""
    return await make_env()


def intake_on(
    store: SqliteStore,
    registry: Registry,
    downlink: Downlink,
    metrics: Metrics,
    clock: Clock,
    **hooks: Any,
) -> Intake:
    """The intake on these parts, routing by district, with `hooks`."""
    return Intake(
        store,
        registry,
        downlink,
        metrics,
        route=ROUTES.__getitem__,
        window_ms=WINDOW_MS,
        clock_ms=clock,
        **hooks,
    )


def route_in(registry: Registry, device_id: str) -> tuple[str, ...] | None:
    device = registry.device(device_id)
    return None if device is None or device.revoked else ROUTES[device.district]


def due(store: SqliteStore, now_ms: int, limit: int = 100_000) -> list[Delivery]:
    """Every delivery due by `now_ms`, whatever its centre (the forwarder asks per centre)."""
    centres = sorted({w.centre for w in store.database.waiting(limit)})
    return [d for c in centres for d in store.database.due_for(c, now_ms, limit)][:limit]


async def make_env(
    clock: Clock | None = None,
    store: SqliteStore | None = None,
    *,
    will_grace_ms: int = 0,
    heartbeat_flush_ms: int = 0,
) -> Env:
    """A gateway's insides; given the `store` of an earlier one, a restart of that gateway."""
    clock = clock or Clock()
    if store is None:
        store = SqliteStore(":memory:")
        for device_id, district in DISTRICTS.items():
            public = public_key_to_b64(KEYS[device_id].public_key())
            store.database.add_device(Device(device_id, public, "bell", district), now_ms=0)
        store.database.revoke("bell-0003", 0)
    registry = Registry(store)
    await registry.reload()
    metrics = Metrics()
    sent: list[tuple[str, bytes]] = []
    woken: list[int] = []

    def publish(topic: str, payload: bytes) -> asyncio.Future[None]:
        sent.append((topic, payload))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    downlink = Downlink(Signer(GATEWAY, GATEWAY_KEY), publish, clock_ms=clock)

    supervisor = Supervisor(
        store,
        downlink,
        metrics,
        route_of=functools.partial(route_in, registry),
        timeout_ms=TIMEOUT_MS,
        will_grace_ms=will_grace_ms,
        clock_ms=clock,
        on_event=lambda: woken.append(1),
    )
    intake = intake_on(
        store,
        registry,
        downlink,
        metrics,
        clock,
        on_kept=lambda items: woken.append(len(items)),
        supervisor=supervisor,
        heartbeat_flush_ms=heartbeat_flush_ms,
    )
    return Env(clock, store, registry, metrics, downlink, supervisor, intake, sent, woken)


def heartbeat(power: str = "mains") -> Heartbeat:
    return Heartbeat(uptime_s=1, power=power, firmware="1.0")  # type: ignore[arg-type]


def large_fleet(metrics: Metrics, devices: int, clock: Clock) -> FleetHealth:
    """Fleet health told one heartbeat from each of `devices` devices in two districts,
    their fields varied (battery and signal sometimes unknown, one clock in 500 drifting)."""
    fleet = FleetHealth(
        metrics,
        district_of=lambda d: "mapo" if d.endswith(("0", "2", "4", "6", "8")) else "gangnam",
        drift_flag_ms=WINDOW_MS // 5,
        clock_ms=clock,
    )
    beats = [
        KeptHeartbeat(
            f"bell-{n:05d}",
            clock.ms + (WINDOW_MS // 2 if n % 500 == 0 else n % 1000),
            Heartbeat(
                uptime_s=n,
                power="battery" if n % 3 == 0 else "mains",
                battery_pct=None if n % 5 == 0 else n % 101,
                link_quality=None if n % 4 == 0 else n % 97,
                firmware=f"1.{n % 3}",
                outbox_depth=n % 11,
            ),
        )
        for n in range(devices)
    ]
    fleet.heartbeats(beats)
    clock.ms += 60_000  # the drifting ones confirmed (DRIFT_CONFIRM_MS) by a second beat
    fleet.heartbeats(beats)
    return fleet
