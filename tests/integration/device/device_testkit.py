"""Helpers for the device integration tests: a site (gateway + centre), agent processes, a spy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ansimi_testkit import SECRET, centre, running
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message as MqttMessage
from ansimi.mqtt import Session, Settings
from console.receiver import Receiver
from device.agent import Agent
from device.config import DeviceConfig
from device.hal import Hardware, Modem
from device.hal.fakes import FakeIndicator, FakeInputs
from gateway.config import Centre, GatewayConfig, MqttConfig
from gateway.service import Gateway
from gateway.store import Device
from protocol.clock import wall_ms
from protocol.envelope import seal
from protocol.jws import Signer, verify
from protocol.keys import generate_key, public_key_to_b64, save_private_key
from protocol.messages import Ack, Command, Message, build_message, parse_message

DEVICE_ID = "bell-0001"
WAIT_S = 20.0  # generous: two cores shared with other test runs


@dataclass
class Keys:
    device_key: Ed25519PrivateKey
    gateway: Signer

    @classmethod
    def new(cls) -> Keys:
        return cls(generate_key(), Signer("gw-test", generate_key()))

    @property
    def device(self) -> Signer:
        return Signer(DEVICE_ID, self.device_key)


def write_device_config(tmp_path: Path, broker: Mosquitto, keys: Keys, extra: str = "") -> Path:
    """A device.toml for a fake-hardware agent run as `ansimi device run`."""
    state = tmp_path / "device"
    state.mkdir(parents=True, exist_ok=True)
    key_file = state / "device.key"
    save_private_key(key_file, keys.device_key)
    path = tmp_path / "device.toml"
    path.write_text(
        f"""
[device]
id = "{DEVICE_ID}"
kind = "bell"
key_file = "{key_file}"
state_dir = "{state}"

[gateway]
id = "{keys.gateway.kid}"
public_key = "{public_key_to_b64(keys.gateway.public_key)}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
heartbeat_s = 0.5

[outbox]
resend_min_s = 0.5
resend_max_s = 1.0

[hardware]
driver = "fake"
camera = "none"
{extra}
"""
    )
    return path


def make_agent(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Keys,
    *,
    modem: Modem | None = None,
    clock_ms: Callable[[], int] | None = None,
    **sections: object,
) -> Agent:
    """An in-process agent on fake hardware; `sections` override config sections;
    `clock_ms` stands in for its system clock."""
    config = DeviceConfig.model_validate(
        {
            "device": {"id": DEVICE_ID, "kind": "bell", "state_dir": tmp_path / "device"},
            "gateway": {
                "id": keys.gateway.kid,
                "public_key": public_key_to_b64(keys.gateway.public_key),
            },
            "mqtt": {"host": broker.host, "port": broker.port, "heartbeat_s": 3600},
            "outbox": {"resend_min_s": 0.5, "resend_max_s": 1.0},
            **sections,
        }
    )
    hardware = Hardware(inputs=FakeInputs(), indicator=FakeIndicator(), camera=None, modem=modem)
    return Agent(
        config,
        signer=keys.device,
        gateway_key=keys.gateway.public_key,
        hardware=hardware,
        clock_ms=clock_ms,
        device_key=keys.device_key,
    )


def down_token(signer: Signer, body: Ack | Command, seq: int, device: str = DEVICE_ID) -> bytes:
    message = build_message(body, device=device, seq=seq, ts=wall_ms())
    return seal(message, signer).encode()


def spawn_agent(
    config_path: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    verbosity: tuple[str, ...] = ("-v",),
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ansimi_edge",
                *verbosity,
                "device",
                "run",
                "--config",
                str(config_path),
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(10)


@dataclass
class Seen:
    topic: str
    token: bytes
    message: Message


@dataclass
class Spy:
    """Sees every message to and from the device, verified with the right key."""

    keys: Keys
    seen: list[Seen] = field(default_factory=list)

    def on_message(self, raw: MqttMessage) -> None:
        signer = self.keys.gateway if "/down/" in raw.topic else self.keys.device
        verified = verify(raw.payload, lambda kid: signer.public_key)
        self.seen.append(Seen(raw.topic, raw.payload, parse_message(verified.payload)))

    def of_type(self, type_name: str) -> list[Message]:
        return [s.message for s in self.seen if s.message.type == type_name]

    def tokens(self, type_name: str) -> list[Seen]:
        return [s for s in self.seen if s.message.type == type_name]


@contextlib.asynccontextmanager
async def spying(broker: Mosquitto, keys: Keys) -> AsyncIterator[tuple[Spy, Session]]:
    spy = Spy(keys)
    session = Session(
        Settings(host=broker.host, port=broker.port, client_id="spy", persistent=False),
        spy.on_message,
    )
    async with running(session.run()):
        await session.wait_connected(WAIT_S)
        await session.subscribe([(f"ansimi/v1/{DEVICE_ID}/#", 1)])
        yield spy, session


@contextlib.asynccontextmanager
async def gateway_site(
    tmp_path: Path, broker: Mosquitto, keys: Keys, *, centre_url: str | None = None
) -> AsyncIterator[tuple[Gateway, Receiver]]:
    """The real gateway and a control-centre receiver, with the device enrolled;
    `centre_url`: the gateway forwards there instead (one that does not answer, say)."""
    async with centre(tmp_path) as (receiver, url):
        config = GatewayConfig(
            id=keys.gateway.kid,
            database=tmp_path / "gateway" / "gateway.db",
            mqtt=MqttConfig(host=broker.host, port=broker.port),
            centres=[Centre(name="central", url=centre_url or url, secret=SECRET)],
        )
        gateway = Gateway(config, signer=keys.gateway)
        await gateway.store.add_device(
            Device(DEVICE_ID, public_key_to_b64(keys.device.public_key), "bell", "mapo", "bell"),
            now_ms=0,
        )
        await gateway.registry.reload()
        async with running(gateway.run()):
            await asyncio.wait_for(gateway.ready.wait(), WAIT_S)
            yield gateway, receiver
