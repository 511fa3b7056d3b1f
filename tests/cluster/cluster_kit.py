"""The site running on RabbitMQ nodes: real agents, the gateway with the AMQP uplink, a centre."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ansimi_testkit import SECRET, centre, running
from rabbit_kit import RabbitNode

from ansimi.mqtt import Settings, TlsFiles
from console.receiver import Receiver
from device.agent import Agent
from device.config import (
    DeviceConfig,
    DeviceSection,
    GatewaySection,
    LinkSection,
    MqttSection,
    OutboxSection,
)
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.observer import AgentObserver
from gateway.config import Centre, GatewayConfig, MqttConfig, UplinkConfig
from gateway.service import Gateway
from gateway.store import Device
from protocol.jws import Signer
from protocol.keys import generate_key, load_private_key, public_key_to_b64
from provisioning.rabbitmq import rabbit_files, sync
from siteca import pki
from siteca.site import Site

BELLS = ("bell-0001", "bell-0002", "bell-0003")


class Broker(Protocol):
    """Where bells dial: a RabbitMQ node, or a `BrokerAt` (mosquitto)."""

    host: str
    mqtt_port: int


@dataclass
class BrokerAt:
    host: str
    mqtt_port: int


def tls_identity(site: Site, cn: str, where: Path) -> TlsFiles:
    """A client certificate from the site's CA, as enrolment issues a bell's."""
    key = pki.generate_key()
    cert = site.issue_client_cert(cn, key.public_key())
    where.mkdir(parents=True, exist_ok=True)
    pki.write_private_key(where / f"{cn}.key", key)
    pki.write_cert(where / f"{cn}.crt", cert)
    return TlsFiles(site.layout.ca_cert, where / f"{cn}.crt", where / f"{cn}.key")


def gateway_config(site: Site, nodes: Sequence[RabbitNode], url: str, db: Path) -> GatewayConfig:
    """The gateway on the first node, the others to fall back on (MQTT and AMQP)."""
    lay = site.layout
    first, *others = nodes
    return GatewayConfig(
        id=site.gateway_id,
        signing_key=lay.gateway_key,
        store=f"sqlite:///{db}",
        # RabbitMQ 3.10: MQTT 3.1.1, and no $share (the uplink is the AMQP queue)
        mqtt=MqttConfig(
            host=first.host,
            port=first.mqtt_port,
            version=311,
            shared_group="",
            ca_file=lay.gateway_ca,
            cert_file=lay.gateway_cert,
            key_file=lay.gateway_tls_key,
            other_brokers=[f"{n.host}:{n.mqtt_port}" for n in others],
        ),
        uplink=UplinkConfig(
            kind="amqp",
            amqp_url=f"amqp://{site.gateway_id}@{first.host}:{first.amqp_port}/",
            password_file=rabbit_files(site).gateway_password,
            other_nodes=[f"{n.host}:{n.amqp_port}" for n in others],
        ),
        centres=[Centre(name="central", url=url, secret=SECRET)],
    )


@dataclass
class Bell:
    agent: Agent
    inputs: FakeInputs
    indicator: FakeIndicator


def make_bell(
    site: Site,
    device_id: str,
    nodes: Sequence[Broker],
    gateway_signer: Signer,
    tmp: Path,
    observer: AgentObserver | None = None,
    version: Literal[5, 311] = 311,
) -> tuple[Bell, Device]:
    tls = tls_identity(site, device_id, tmp / "tls")
    key = generate_key()
    first, *others = nodes
    config = DeviceConfig(
        device=DeviceSection(id=device_id, kind="bell", state_dir=tmp / device_id),
        gateway=GatewaySection(
            id=gateway_signer.kid, public_key=public_key_to_b64(gateway_signer.public_key)
        ),
        mqtt=MqttSection(
            host=first.host,
            port=first.mqtt_port,
            version=version,
            ca_file=tls.ca_file,
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            heartbeat_s=1,
        ),
        link=LinkSection(other_brokers=[f"{n.host}:{n.mqtt_port}" for n in others]),
        # resends capped low: a test waits out the backoff after every fault
        outbox=OutboxSection(resend_min_s=1.0, resend_max_s=5.0),
    )
    inputs, indicator = FakeInputs(), FakeIndicator()
    hardware = Hardware(inputs=inputs, indicator=indicator, camera=None, modem=None)
    agent = Agent(
        config,
        signer=Signer(device_id, key),
        gateway_key=gateway_signer.public_key,
        hardware=hardware,
        observer=observer,
    )
    device = Device(device_id, public_key_to_b64(key.public_key()), "bell", "mapo", "test bell")
    return Bell(agent, inputs, indicator), device


def gateway_toml(
    site: Site,
    name: str,
    *,
    store: str,
    centre_url: str,
    api: tuple[str, int],
    brokers: Sequence[Broker],
    amqp: Sequence[RabbitNode] = (),
) -> str:
    """gateway.toml of instance `name` (a process): MQTT to `brokers` in turn; the uplink
    from the quorum queue on the `amqp` nodes (RabbitMQ, MQTT 3.1.1), else mosquitto's
    shared subscription (MQTT 5)."""
    lay = site.layout
    first, *others = brokers
    fallbacks = ", ".join(f'"{n.host}:{n.mqtt_port}"' for n in others)
    text = f"""id = "{site.gateway_id}"
signing_key = "{lay.gateway_key}"
store = "{store}"
[mqtt]
host = "{first.host}"
port = {first.mqtt_port}
client_id = "{site.gateway_id}-{name}"
ca_file = "{lay.gateway_ca}"
cert_file = "{lay.gateway_cert}"
key_file = "{lay.gateway_tls_key}"
other_brokers = [{fallbacks}]
"""
    if amqp:
        head, *rest = amqp
        text += f"""version = 311
shared_group = ""
[uplink]
kind = "amqp"
amqp_url = "amqp://{site.gateway_id}@{head.host}:{head.amqp_port}/"
password_file = "{rabbit_files(site).gateway_password}"
other_nodes = [{", ".join(f'"{n.host}:{n.amqp_port}"' for n in rest)}]
"""
    return (
        text
        + f"""[forward]
backoff_min_s = 0.2
backoff_max_s = 2.0
[api]
enabled = true
host = "{api[0]}"
port = {api[1]}
[[api.tokens]]
name = "tests"
token = "operator-token-for-cluster-tests"
[[centres]]
name = "central"
url = "{centre_url}"
secret = "{SECRET}"
"""
    )


def alert_ids(receiver: Receiver) -> list[str]:
    """The alerts the centre accepted (status events, such as a bell's offline, aside)."""
    events = [receiver.events.get(i) for i in receiver.events.ids()]
    return [e.event_id for e in events if e is not None and e.type == "alert"]


def press(bell: Bell) -> None:
    bell.inputs.press("emergency")
    bell.inputs.release("emergency")


@dataclass
class Running:
    gateway: Gateway
    bells: dict[str, Bell]
    receiver: Receiver


async def site_running(
    site: Site,
    nodes: Sequence[RabbitNode],
    tmp: Path,
) -> AsyncIterator[Running]:
    """The gateway and the bells, each dialling `nodes` in turn (the first first)."""
    signer = Signer(site.gateway_id, load_private_key(site.layout.gateway_key))
    made = {b: make_bell(site, b, nodes, signer, tmp) for b in BELLS}
    # the certificates above are issued: now the broker's users, as an installer would
    await asyncio.to_thread(sync, site, nodes[0].ctl())
    async with centre(tmp) as (receiver, url):
        config = gateway_config(site, nodes, url, tmp / "gateway.db")
        gateway = Gateway(config, signer=signer)
        for _bell, device in made.values():
            await gateway.store.add_device(device, now_ms=0)
        bells = {b: bell for b, (bell, _) in made.items()}
        async with running(gateway.run(), *(b.agent.run() for b in bells.values())):
            await asyncio.wait_for(gateway.ready.wait(), 30)
            for b in bells.values():
                await asyncio.wait_for(b.agent.ready.wait(), 30)
            yield Running(gateway, bells, receiver)


def bell_settings(node: RabbitNode, client_id: str, tls: TlsFiles) -> Settings:
    """Fast reconnects, so a refused client retries (and is refused) many times per test."""
    return Settings(
        host=node.host,
        port=node.mqtt_port,
        client_id=client_id,
        version=311,
        tls=tls,
        persistent=False,
        connect_timeout_s=2.0,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
    )
