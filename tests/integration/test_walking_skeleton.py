"""Press to control centre, with real parts: mosquitto, the gateway, SQLite, HTTP, acks."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ansimi_testkit import SECRET, centre, eventually, running

from ansimi.broker import Mosquitto
from ansimi.mqtt import Session, Settings
from console.receiver import Receiver
from device.agent import Agent
from device.config import DeviceConfig, DeviceSection, GatewaySection, MqttSection
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.hal.ports import Pattern
from gateway.config import Centre, GatewayConfig, MqttConfig
from gateway.service import Gateway
from gateway.store import Device
from protocol.clock import wall_ms
from protocol.envelope import seal
from protocol.jws import Signer, verify
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import Ack, build_message
from protocol.topics import down_topic


@dataclass
class Site:
    gateway: Gateway
    agent: Agent
    inputs: FakeInputs
    indicator: FakeIndicator
    receiver: Receiver
    device_key_b64: str


def make_agent(tmp_path: Path, broker: Mosquitto, gateway_signer: Signer) -> tuple[Agent, str]:
    device_key = generate_key()
    config = DeviceConfig(
        device=DeviceSection(id="bell-0001", kind="bell", state_dir=tmp_path / "device"),
        gateway=GatewaySection(
            id=gateway_signer.kid, public_key=public_key_to_b64(gateway_signer.public_key)
        ),
        mqtt=MqttSection(host=broker.host, port=broker.port, heartbeat_s=1),
    )
    hardware = Hardware(inputs=FakeInputs(), indicator=FakeIndicator(), camera=None, modem=None)
    agent = Agent(
        config,
        signer=Signer("bell-0001", device_key),
        gateway_key=gateway_signer.public_key,
        hardware=hardware,
    )
    return agent, public_key_to_b64(device_key.public_key())


@pytest.fixture
async def site(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Site]:
    gateway_signer = Signer("gw-test", generate_key())
    async with centre(tmp_path) as (receiver, url):
        config = GatewayConfig(
            id="gw-test",
            database=tmp_path / "gateway" / "gateway.db",
            mqtt=MqttConfig(host=mosquitto.host, port=mosquitto.port),
            centres=[Centre(name="central", url=url, secret=SECRET)],
        )
        gateway = Gateway(config, signer=gateway_signer)
        agent, device_key_b64 = make_agent(tmp_path, mosquitto, gateway_signer)
        await gateway.store.add_device(
            Device("bell-0001", device_key_b64, "bell", "mapo", "test bell"), now_ms=0
        )
        await gateway.registry.reload()
        async with running(gateway.run(), agent.run()):
            await asyncio.wait_for(gateway.ready.wait(), 10)
            await asyncio.wait_for(agent.ready.wait(), 10)
            hw = agent.hardware
            assert isinstance(hw.inputs, FakeInputs) and isinstance(hw.indicator, FakeIndicator)
            yield Site(gateway, agent, hw.inputs, hw.indicator, receiver, device_key_b64)


async def test_press_reaches_the_control_centre_and_the_device_sees_the_acks(
    site: Site, tmp_path: Path
) -> None:
    site.inputs.press("emergency")
    site.inputs.release("emergency")

    await eventually(lambda: site.receiver.events.count() == 1)
    (event_id,) = site.receiver.events.ids()

    # The gateway kept it in its SQLite file before acking, with the device's own JWS.
    with sqlite3.connect(tmp_path / "gateway" / "gateway.db") as db:
        row = db.execute("SELECT device_id, type, jws FROM events WHERE event_id = ?", (event_id,))
        device_id, type_name, jws = row.fetchone()
    assert (device_id, type_name) == ("bell-0001", "alert")
    # The centre can check the device's signature itself.
    device_key = site.agent.link._signer.public_key
    assert verify(jws, lambda kid: device_key).kid == "bell-0001"

    # `received` cleared the outbox; `delivered` followed the centre's 2xx.
    await eventually(lambda: site.agent.outbox.depth() == 0)
    await eventually(lambda: any(p == Pattern.DELIVERED for p, _ in site.indicator.history))
    shown = [p for p, _ in site.indicator.history]
    assert shown.index(Pattern.SENDING) < shown.index(Pattern.RECEIVED)
    assert shown.index(Pattern.RECEIVED) < shown.index(Pattern.DELIVERED)


async def test_a_forged_ack_leaves_the_alert_in_the_outbox(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    gateway_signer = Signer("gw-test", generate_key())
    agent, _ = make_agent(tmp_path, mosquitto, gateway_signer)
    forger = Signer("gw-test", generate_key())  # right name, wrong key
    attacker = Session(
        Settings(host=mosquitto.host, port=mosquitto.port, client_id="attacker"), lambda m: None
    )
    async with running(agent.run(), attacker.run()):
        await asyncio.wait_for(agent.ready.wait(), 10)
        await attacker.wait_connected(5)
        inputs = agent.hardware.inputs
        assert isinstance(inputs, FakeInputs)
        inputs.press("emergency")
        await eventually(lambda: agent.outbox.depth() == 1)
        (entry,) = agent.outbox.pending()
        forged = build_message(
            Ack(ref=entry.id, stage="received"),
            device="bell-0001",
            seq=2**40,
            ts=wall_ms(),
        )
        await attacker.publish(down_topic("bell-0001", "ack"), seal(forged, forger).encode())
        await eventually(lambda: agent.link.rejected.get("bad_signature", 0) == 1)
        assert agent.outbox.depth() == 1
        # The genuine gateway's ack for the same alert does clear it.
        await attacker.publish(
            down_topic("bell-0001", "ack"), seal(forged, gateway_signer).encode()
        )
        await eventually(lambda: agent.outbox.depth() == 0)


async def test_a_test_press_asked_for_travels_to_the_centre_and_back_as_delivered(
    site: Site,
) -> None:
    acks: list[Ack] = []
    site.agent.on_ack.append(acks.append)
    assert site.gateway.tests.request("bell-0001")
    await eventually(lambda: site.receiver.events.count() == 1)
    (event_id,) = site.receiver.events.ids()
    received = site.receiver.events.get(event_id)
    assert received is not None and received.body["trigger"] == "test"
    # the bell got `delivered` for the very alert the centre holds
    await eventually(lambda: Ack(ref=event_id, stage="delivered") in acks)
    assert site.agent.test_presses.in_flight is None
    registry = site.gateway.metrics.registry
    passed = registry.get_sample_value("ansimi_test_presses_total", {"outcome": "passed"})
    assert passed == 1.0 and site.gateway.tests.under_way() == 0
    # nothing shown at the door (the start's "off" only): a test is not an incident
    assert {p for p, _ in site.indicator.history} <= {Pattern.OFF}
    assert site.agent.behaviour.incident is None
