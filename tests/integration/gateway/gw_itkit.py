"""Crash tests' parts: a centre, gateway processes we can SIGKILL, real device agents.

A plain module (not conftest) so the gateway integration tests import it by a name no
other test tree uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from ansimi_testkit import SECRET, AlertsSent

from ansimi.broker import Mosquitto
from ansimi.config import load_config
from device.agent import Agent
from device.config import DeviceConfig, DeviceSection, GatewaySection, MqttSection, OutboxSection
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from gateway.config import GatewayConfig
from gateway.service import Gateway
from gateway.store import Device, SqliteDatabase, open_store
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64, save_private_key

TOKEN = "operator-token-for-tests"
WAIT_S = 60.0  # generous: two cores shared with the broker, agents and other test runs


def centre_alerts(tmp_path: Path) -> list[tuple[str, str]]:
    """(event id, device id) of every alert the centre has, each row once by its key."""
    with contextlib.closing(sqlite3.connect(tmp_path / "centre.db")) as db:
        rows = db.execute("SELECT event_id, device_id FROM events WHERE type = 'alert'")
        return [(str(a), str(b)) for a, b in rows]


@dataclass
class Fleet:
    """The site's keys and its devices, registered in the gateway's database."""

    tmp_path: Path
    broker: Mosquitto
    gateway: Signer
    agents: list[Agent]
    alerts_sent: AlertsSent
    # the gateways' store when not the SQLite file (see `move_to`)
    store_url: str | None = None

    @classmethod
    def create(cls, tmp_path: Path, broker: Mosquitto, count: int) -> Fleet:
        gateway_key = generate_key()
        (tmp_path / "gateway").mkdir(parents=True, exist_ok=True)
        save_private_key(tmp_path / "gateway" / "signing.key", gateway_key)
        gateway = Signer("gw-test", gateway_key)
        store = SqliteDatabase(tmp_path / "gateway" / "gateway.db")
        agents = []
        alerts_sent = AlertsSent()
        for n in range(count):
            device_id = f"bell-{n:04d}"
            key = generate_key()
            public = public_key_to_b64(key.public_key())
            store.add_device(Device(device_id, public, "bell", "mapo"), now_ms=0)
            config = DeviceConfig(
                device=DeviceSection(id=device_id, kind="bell", state_dir=tmp_path / device_id),
                gateway=GatewaySection(
                    id=gateway.kid, public_key=public_key_to_b64(gateway.public_key)
                ),
                mqtt=MqttSection(host=broker.host, port=broker.port, heartbeat_s=1),
                outbox=OutboxSection(resend_min_s=0.5, resend_max_s=2.0),
            )
            hardware = Hardware(FakeInputs(), FakeIndicator(), None, None)
            agents.append(
                Agent(
                    config,
                    signer=Signer(device_id, key),
                    gateway_key=gateway.public_key,
                    hardware=hardware,
                    observer=alerts_sent,
                )
            )
        store.close()
        return cls(tmp_path, broker, gateway, agents, alerts_sent)

    async def move_to(self, store_url: str) -> None:
        """Register the devices in the store at `store_url` (PostgreSQL) and have the
        gateway configs name it instead of the SQLite file."""
        database = SqliteDatabase(self.tmp_path / "gateway" / "gateway.db")
        store = open_store(store_url)
        try:
            for device in database.devices():
                await store.add_device(device, now_ms=0)
        finally:
            database.close()
            await store.close()
        self.store_url = store_url

    def write_config(self, name: str, centre_url: str, api_port: int, **mqtt: object) -> Path:
        """A gateway.toml for instance `name` (its own client id, the shared database)."""
        mqtt_lines = "".join(f"{k} = {v!r}\n" for k, v in mqtt.items())
        where = self.store_url or f"sqlite://{self.tmp_path}/gateway/gateway.db"
        path = self.tmp_path / f"{name}.toml"
        path.write_text(
            f"""id = "gw-test"
signing_key = "{self.tmp_path}/gateway/signing.key"
store = "{where}"
[mqtt]
host = "{self.broker.host}"
port = {self.broker.port}
client_id = "{name}"
{mqtt_lines}
[supervise]
heartbeat_s = 1.0
[forward]
backoff_min_s = 0.1
backoff_max_s = 1.0
[api]
enabled = true
port = {api_port}
[[api.tokens]]
name = "tests"
token = "{TOKEN}"
[[centres]]
name = "central"
url = "{centre_url}"
secret = "{SECRET}"
""".replace("'", '"')
        )
        return path

    def config(self, name: str, centre_url: str, **mqtt: object) -> GatewayConfig:
        """The gateway.toml of `write_config`, loaded, with the API on any free port."""
        return load_config(self.write_config(name, centre_url, 0, **mqtt), GatewayConfig)

    def register(self, device: Device) -> None:
        store = SqliteDatabase(self.tmp_path / "gateway" / "gateway.db")
        store.add_device(device, now_ms=0)
        store.close()

    def press_all(self, agents: list[Agent] | None = None) -> None:
        for agent in agents if agents is not None else self.agents:
            inputs = agent.hardware.inputs
            assert isinstance(inputs, FakeInputs)
            inputs.press("emergency")
            inputs.release("emergency")

    def pending(self) -> int:
        """Alerts still waiting in the devices' outboxes for a `received` ack."""
        return sum(agent.outbox.depth() for agent in self.agents)


class GatewayProcess:
    """`python -m ansimi_edge gateway run --config ...` as a child we can SIGKILL."""

    def __init__(self, config: Path, api_port: int) -> None:
        self.config = config
        self.api_port = api_port
        self.log = config.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ansimi_edge",
                    "-v",
                    "gateway",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    async def ready(self, timeout_s: float = WAIT_S) -> None:
        """Until /healthz says it is connected to the broker."""
        url = f"http://127.0.0.1:{self.api_port}/healthz"
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(f"gateway exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"gateway not ready: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)

    def metrics_text(self) -> str:
        """/metrics, read synchronously (the tests poll it between awaits)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no clean-up, no last commit, exactly what a crash looks like."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def gateway_running(config: GatewayConfig) -> AsyncIterator[Gateway]:
    """The gateway in this process, subscribed and ready, until the block ends."""
    gateway = Gateway(config)
    task = asyncio.create_task(gateway.run())
    try:
        await asyncio.wait_for(gateway.ready.wait(), WAIT_S)
        yield gateway
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def agents_running(fleet: Fleet) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(a.run(), name=a.device_id) for a in fleet.agents]
    try:
        await asyncio.wait_for(asyncio.gather(*(a.ready.wait() for a in fleet.agents)), WAIT_S)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
