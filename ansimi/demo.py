"""`ansimi demo`: broker, gateway, control-centre receiver and a few bells on one machine.

Each part runs as it would in the field: the gateway and the centre as their own
processes (`ansimi gateway run`, `ansimi console`), the bells as real device agents on
fake hardware. Presses happen every few seconds; what each bell shows and what reaches
the centre is printed. Mosquitto where it is installed, else amqtt (MQTT 3.1.1 only,
no shared subscriptions, so the gateway then uses a plain subscription).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click

from ansimi.broker import Mosquitto, MosquittoConfig, free_port, mosquitto_path, wait_for_port

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def broker(state: Path, kind: str) -> AsyncIterator[tuple[int, int]]:
    """Yields (port, MQTT version the gateway should use)."""
    if kind == "mosquitto" or (kind == "auto" and mosquitto_path() is not None):
        with Mosquitto(MosquittoConfig(state_dir=state / "broker")) as mosquitto:
            click.echo(f"[demo] mosquitto on 127.0.0.1:{mosquitto.port}")
            yield mosquitto.port, 5
        return
    from amqtt.broker import Broker

    port = free_port()
    embedded = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}})
    await embedded.start()
    click.echo(
        f"[demo] embedded amqtt on 127.0.0.1:{port} (MQTT 3.1.1, plain subscription)"
        + ("; install mosquitto for the real thing" if mosquitto_path() is None else "")
    )
    try:
        yield port, 311
    finally:
        await embedded.shutdown()


def gateway_toml(state: Path, mqtt_port: int, version: int, centre_url: str, secret: str) -> str:
    shared = "gateways" if version == 5 else ""
    return f"""# written by `ansimi demo`
id = "gw-demo"
signing_key = "{state / "gateway" / "signing.key"}"
database = "{state / "gateway" / "gateway.db"}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
version = {version}
shared_group = "{shared}"

[[centres]]
name = "central"
url = "{centre_url}"
secret = "{secret}"
districts = ["*"]
"""


def spawn(args: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    handle = log_file.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ansimi", *args],
            stdout=None,  # the centre prints what arrives: let people see it
            stderr=handle,
            env={**os.environ, **env},
        )
    finally:
        handle.close()


async def run_demo(
    state: Path,
    devices: int,
    duration_s: float,
    console_port: int,
    press_every_s: float,
    broker_kind: str = "auto",
) -> int:
    from device.agent import Agent
    from device.config import DeviceConfig, DeviceSection, GatewaySection, MqttSection
    from device.hal import Hardware
    from device.hal.fakes import FakeIndicator, FakeInputs
    from gateway.store import Device, DeviceKind, SqliteStore
    from protocol.jws import Signer
    from protocol.keys import generate_key, public_key_to_b64, save_private_key

    if state.exists():
        shutil.rmtree(state)
    (state / "gateway").mkdir(parents=True)
    secret = secrets.token_urlsafe(24)
    gateway_key = generate_key()
    save_private_key(state / "gateway" / "signing.key", gateway_key)
    gateway_signer = Signer("gw-demo", gateway_key)

    async with broker(state, broker_kind) as (mqtt_port, version):
        centre_url = f"http://127.0.0.1:{console_port}/events"
        config_path = state / "gateway.toml"
        config_path.write_text(gateway_toml(state, mqtt_port, version, centre_url, secret))

        store = SqliteStore(state / "gateway" / "gateway.db")
        agents: list[Agent] = []
        districts = itertools.cycle(["mapo", "gangnam", "jongno", "songpa"])
        kinds: itertools.cycle[DeviceKind] = itertools.cycle(["bell", "store", "doorbell"])
        for n in range(devices):
            kind = next(kinds)
            device_id = f"{kind}-{n + 1:04d}"
            key = generate_key()
            store.add_device(
                Device(device_id, public_key_to_b64(key.public_key()), kind, next(districts)),
                now_ms=time.time_ns() // 1_000_000,
            )
            config = DeviceConfig(
                device=DeviceSection(id=device_id, kind=kind, state_dir=state / device_id),
                gateway=GatewaySection(
                    id="gw-demo", public_key=public_key_to_b64(gateway_signer.public_key)
                ),
                mqtt=MqttSection(port=mqtt_port, version=version),
            )
            hardware = Hardware(FakeInputs(), FakeIndicator(), None, None)
            agents.append(
                Agent(
                    config,
                    signer=Signer(device_id, key),
                    gateway_key=gateway_signer.public_key,
                    hardware=hardware,
                )
            )
        store.close()

        env = {"ANSIMI_CENTRE_SECRET": secret}
        centre_db = state / "centre.db"
        console = spawn(
            ["console", "--listen", f"127.0.0.1:{console_port}", "--db", str(centre_db)],
            state / "console.log",
            env,
        )
        gateway = spawn(
            ["-v", "gateway", "run", "--config", str(config_path)], state / "gateway.log", env
        )
        tasks = [asyncio.create_task(a.run(), name=a.device_id) for a in agents]
        pressed = 0
        try:
            await wait_for_port("127.0.0.1", console_port, 10)
            await asyncio.gather(*(asyncio.wait_for(a.ready.wait(), 10) for a in agents))
            click.echo(f"[demo] {devices} bells connected; pressing one every {press_every_s:g}s")
            deadline = time.monotonic() + duration_s if duration_s > 0 else float("inf")
            shown: dict[str, int] = {a.device_id: 0 for a in agents}
            next_press = time.monotonic() + 1.0
            for agent in itertools.cycle(agents):
                while time.monotonic() < min(next_press, deadline):
                    _print_indicators(agents, shown)
                    await asyncio.sleep(0.1)
                if time.monotonic() >= deadline:
                    break
                inputs: Any = agent.hardware.inputs
                inputs.press("emergency")
                inputs.release("emergency")
                pressed += 1
                click.echo(f"[{agent.device_id}] button pressed")
                next_press = time.monotonic() + press_every_s
            # Let the last alerts land before counting.
            settle = time.monotonic() + 10
            while time.monotonic() < settle and _count(centre_db) < pressed:
                _print_indicators(agents, shown)
                await asyncio.sleep(0.1)
            _print_indicators(agents, shown)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for process in (gateway, console):
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        arrived = _count(centre_db)
        click.echo(f"[demo] {pressed} presses, {arrived} alerts at the control centre")
        if pressed and arrived < pressed:
            click.echo(f"[demo] some alerts did not arrive: see {state}/gateway.log", err=True)
            return 1
        return 0


def _print_indicators(agents: list[Any], shown: dict[str, int]) -> None:
    for agent in agents:
        history = agent.hardware.indicator.history
        for pattern, silent in history[shown[agent.device_id] :]:
            quiet = " (silent: nothing visible)" if silent else ""
            click.echo(f"[{agent.device_id}] bell shows: {pattern}{quiet}")
        shown[agent.device_id] = len(history)


def _count(centre_db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(centre_db)) as db:
            return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return 0


@click.command()
@click.option("--devices", default=3, show_default=True, help="simulated bells")
@click.option("--duration", default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
@click.option("--press-every", default=3.0, show_default=True, help="seconds between presses")
@click.option("--console-port", default=8080, show_default=True)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="auto: mosquitto where installed, else the embedded amqtt",
)
@click.option(
    "--state-dir", type=click.Path(path_type=Path), default=Path("demo-state"), show_default=True
)
def demo(
    devices: int,
    duration: float,
    press_every: float,
    console_port: int,
    broker_kind: str,
    state_dir: Path,
) -> None:
    """Broker, gateway, control-centre receiver and simulated bells on this machine."""
    try:
        code = asyncio.run(
            run_demo(state_dir.resolve(), devices, duration, console_port, press_every, broker_kind)
        )
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
