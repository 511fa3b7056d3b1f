"""Real parts for the trust tests: mosquitto, the gateway in-process, a real console receiver
that checks every device's own signature, and bells that publish whatever tokens a test
signs (with our code or another JOSE library).

A plain module (not conftest) so the gateway integration tests import it by a name no
other test tree uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from ansimi_testkit import SECRET
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message, Session, Settings
from console.directory import Directory
from console.receiver import EventLog, Receiver
from gateway.config import Centre, ForwardConfig, GatewayConfig, MqttConfig
from gateway.service import Gateway
from gateway.store import Device, SqliteDatabase
from protocol.clock import wall_ms
from protocol.envelope import open_for_device, seal
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import AckMessage, Alert, build_message
from protocol.topics import up_topic

WAIT_S = 30.0  # two shared cores: generous, and still bounded
GATEWAY_ID = "gw-test"


def now_ms() -> int:
    return wall_ms()


@dataclass
class Bell:
    """A device's MQTT side without the agent: publishes signed tokens, collects acks."""

    device_id: str
    gateway_key: Ed25519PublicKey
    acks: list[tuple[str, str]] = field(default_factory=list)
    # made by `bell()` with `on_message` as its handler (not patched in afterwards)
    session: Session = field(init=False)

    def on_message(self, message: Message) -> None:
        opened = open_for_device(message.payload, lambda kid: self.gateway_key, self.device_id)
        assert isinstance(opened.message, AckMessage)
        self.acks.append((opened.message.body.ref, opened.message.body.stage))

    async def publish(self, kind: str, token: str) -> None:
        await self.session.publish(up_topic(self.device_id, kind), token.encode())

    def stage(self, stage: str) -> set[str]:
        return {ref for ref, s in self.acks if s == stage}


def payload(device_id: str, seq: int, kind: str, body: dict[str, Any], message_id: str) -> bytes:
    """A message as another implementation might write it: only the fields it chose."""
    message = {
        "v": 1,
        "id": message_id,
        "device": device_id,
        "seq": seq,
        "ts": now_ms(),
        "type": kind,
        "body": body,
    }
    return json.dumps(message).encode()


@contextlib.asynccontextmanager
async def console_centre(tmp_path: Path, gateway: Gateway, port: int) -> AsyncIterator[Receiver]:
    """The reference console's receiver on `port`, checking device signatures with the
    registry the gateway really has (as `ansimi console` does over `GET /devices?keys=1`)."""

    async def fetch() -> list[dict[str, Any]]:
        # the database, not this gateway object: the console outlives a gateway restart
        store = SqliteDatabase(gateway.config.database)
        try:
            devices = store.devices()
        finally:
            store.close()
        return [
            {
                "id": d.device_id,
                "kind": d.kind,
                "district": d.district,
                "revoked": d.revoked,
                "public_key": d.public_key,
            }
            for d in devices
        ]

    directory = Directory(
        tmp_path / "directory.db",
        fetch,
        gateway_keys={gateway.signer.kid: gateway.signer.public_key},
    )
    receiver = Receiver(SECRET, EventLog(tmp_path / "centre.db"), directory=directory)
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()
        receiver.events.close()
        directory.close()


def gateway_config(
    tmp_path: Path,
    broker: Mosquitto,
    centre_port: int,
    *,
    name: str = "central",
    secret: str = SECRET,
) -> GatewayConfig:
    """A gateway config whose one centre (every district) is on `centre_port`."""
    url = f"http://127.0.0.1:{centre_port}/events"
    return GatewayConfig(
        id=GATEWAY_ID,
        database=tmp_path / "gateway" / "gateway.db",
        mqtt=MqttConfig(host=broker.host, port=broker.port),
        forward=ForwardConfig(timeout_s=2.0, backoff_min_s=0.05, backoff_max_s=0.5),
        centres=[Centre(name=name, url=url, secret=secret)],
    )


@contextlib.asynccontextmanager
async def running_gateway(gateway: Gateway) -> AsyncIterator[Gateway]:
    task = asyncio.ensure_future(gateway.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await gateway.ready.wait()
        yield gateway
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def new_gateway(config: GatewayConfig, signer: Signer | None = None) -> Gateway:
    return Gateway(config, signer=signer or Signer(GATEWAY_ID, generate_key()))


def alert(device_id: str, signer: Signer, seq: int) -> tuple[str, str]:
    """A press signed by our own code: (its id, the token)."""
    message = build_message(
        Alert(bell="emergency", trigger="press"), device=device_id, seq=seq, ts=now_ms()
    )
    return message.id, seal(message, signer)


async def register(gateway: Gateway, device_id: str, public_key: Ed25519PublicKey) -> None:
    await gateway.store.add_device(
        Device(device_id, public_key_to_b64(public_key), "bell", "mapo"), now_ms=0
    )
    await gateway.registry.reload()


@contextlib.asynccontextmanager
async def bell(
    broker: Mosquitto, device_id: str, gateway_key: Ed25519PublicKey
) -> AsyncIterator[Bell]:
    the_bell = Bell(device_id, gateway_key)
    the_bell.session = Session(
        Settings(broker.host, broker.port, client_id=device_id), the_bell.on_message
    )
    task = asyncio.ensure_future(the_bell.session.run())
    try:
        await the_bell.session.wait_connected(WAIT_S)
        await the_bell.session.subscribe([(f"ansimi/v1/{device_id}/down/#", 1)])
        yield the_bell
    finally:
        await the_bell.session.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
