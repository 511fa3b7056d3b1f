"""The site on a real RabbitMQ node, as `ansimi provision rabbitmq` provisions it.

Real agents over MQTT 3.1.1 with mutual TLS (certificates from the site's CA), the gateway
taking the uplink from the AMQP quorum queue and acking over MQTT, a receiving centre.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from ansimi_testkit import SECRET, centre, eventually, running
from rabbit_kit import RabbitNode, rabbit_cluster

from ansimi.mqtt import Message, MqttError, Session, Settings, TlsFiles
from console.receiver import Receiver
from device.agent import Agent
from device.config import DeviceConfig, DeviceSection, GatewaySection, LinkSection, MqttSection
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.hal.ports import Pattern
from gateway.config import Centre, GatewayConfig, MqttConfig, UplinkConfig
from gateway.service import Gateway
from gateway.store import Device
from gateway.uplink import AmqpUplink
from protocol.jws import Signer
from protocol.keys import generate_key, load_private_key, public_key_to_b64
from protocol.topics import down_topic, up_topic
from provisioning import pki
from provisioning.rabbitmq import rabbit_files, sync
from provisioning.revoke import revoke_certificate
from provisioning.site import Site, init_site

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

BELLS = ("bell-0001", "bell-0002", "bell-0003")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("rabbit-site")
    init_site(root / "site", site="test", listen_host="127.0.0.1", port=8883)
    return Site.open(root / "site")


@pytest.fixture(scope="module")
def node(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """One node for the module (a start costs ~10 s), users from the site's provisioning."""
    with rabbit_cluster(site, tmp_path_factory.mktemp("rmq"), 1) as nodes:
        yield nodes[0]


def tls_identity(site: Site, cn: str, where: Path) -> TlsFiles:
    """A client certificate from the site's CA, as enrolment issues a bell's."""
    key = pki.generate_key()
    cert = site.issue_client_cert(cn, key.public_key())
    where.mkdir(parents=True, exist_ok=True)
    pki.write_private_key(where / f"{cn}.key", key)
    pki.write_cert(where / f"{cn}.crt", cert)
    return TlsFiles(site.layout.ca_cert, where / f"{cn}.crt", where / f"{cn}.key")


def gateway_config(site: Site, nodes: Sequence[RabbitNode], url: str, db: Path) -> GatewayConfig:
    lay = site.layout
    first = nodes[0]
    return GatewayConfig(
        id=site.gateway_id,
        signing_key=lay.gateway_key,
        store=f"sqlite:///{db}",
        # RabbitMQ 3.10: MQTT 3.1.1, and no $share (the uplink is the AMQP queue)
        mqtt=MqttConfig(
            host="127.0.0.1",
            port=first.mqtt_port,
            version=311,
            shared_group="",
            ca_file=lay.gateway_ca,
            cert_file=lay.gateway_cert,
            key_file=lay.gateway_tls_key,
        ),
        uplink=UplinkConfig(
            kind="amqp",
            amqp_url=f"amqp://{site.gateway_id}@127.0.0.1:{first.amqp_port}/",
            password_file=rabbit_files(site).gateway_password,
        ),
        centres=[Centre(name="central", url=url, secret=SECRET)],
    )


@dataclass
class Bell:
    agent: Agent
    inputs: FakeInputs
    indicator: FakeIndicator


def make_bell(
    site: Site, device_id: str, nodes: Sequence[RabbitNode], gateway_signer: Signer, tmp: Path
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
            host="127.0.0.1",
            port=first.mqtt_port,
            version=311,
            ca_file=tls.ca_file,
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            heartbeat_s=1,
        ),
        link=LinkSection(other_brokers=[f"127.0.0.1:{n.mqtt_port}" for n in others]),
    )
    inputs, indicator = FakeInputs(), FakeIndicator()
    hardware = Hardware(inputs=inputs, indicator=indicator, camera=None, modem=None)
    agent = Agent(
        config,
        signer=Signer(device_id, key),
        gateway_key=gateway_signer.public_key,
        hardware=hardware,
    )
    device = Device(device_id, public_key_to_b64(key.public_key()), "bell", "mapo", "test bell")
    return Bell(agent, inputs, indicator), device


@dataclass
class Running:
    gateway: Gateway
    bells: dict[str, Bell]
    receiver: Receiver


async def site_running(
    site: Site, nodes: Sequence[RabbitNode], tmp: Path, bell_ids: Sequence[str] = BELLS
) -> AsyncIterator[Running]:
    signer = Signer(site.gateway_id, load_private_key(site.layout.gateway_key))
    made = {b: make_bell(site, b, nodes, signer, tmp) for b in bell_ids}
    # the certificates above are issued: now the broker's users, as an installer would
    await asyncio.to_thread(sync, site, nodes[0].ctl())
    async with centre(tmp) as (receiver, url):
        gateway = Gateway(gateway_config(site, nodes, url, tmp / "gateway.db"), signer=signer)
        for _bell, device in made.values():
            await gateway.store.add_device(device, now_ms=0)
        bells = {b: bell for b, (bell, _) in made.items()}
        async with running(gateway.run(), *(b.agent.run() for b in bells.values())):
            await asyncio.wait_for(gateway.ready.wait(), 30)
            for b in bells.values():
                await asyncio.wait_for(b.agent.ready.wait(), 30)
            yield Running(gateway, bells, receiver)


@pytest.fixture
async def live(site: Site, node: RabbitNode, tmp_path: Path) -> AsyncIterator[Running]:
    async for it in site_running(site, [node], tmp_path):
        yield it


async def test_alerts_through_the_quorum_queue_reach_the_centre_and_acks_reach_the_bells(
    live: Running,
) -> None:
    for bell in live.bells.values():
        bell.inputs.press("emergency")
        bell.inputs.release("emergency")
    await eventually(lambda: live.receiver.events.count() == len(BELLS), timeout_s=30)
    for bell in live.bells.values():
        # `received` (over MQTT, from the gateway) emptied the outbox; `delivered` followed
        await eventually(lambda b=bell: b.agent.outbox.depth() == 0, timeout_s=20)
        await eventually(
            lambda b=bell: any(p == Pattern.DELIVERED for p, _ in b.indicator.history),
            timeout_s=20,
        )
    # the intake probe went out over MQTT and came back through the AMQP queue
    await eventually(lambda: live.gateway.probe.heard_ms is not None, timeout_s=30)
    assert live.gateway.health.report().http_status == 200


async def test_a_revoked_bell_is_disconnected_and_cannot_log_in_again(
    site: Site, node: RabbitNode, tmp_path: Path
) -> None:
    target = "bell-0009"
    tls = tls_identity(site, target, tmp_path / "tls")
    await asyncio.to_thread(sync, site, node.ctl())
    heard: list[Message] = []
    session = Session(bell_settings(node, target, tls), heard.append)
    async with running(session.run()):
        await session.wait_connected(10)
        assert target in node.ctl().users()

        await asyncio.to_thread(
            revoke_certificate, site.layout.root, target, broker=None, kick=False
        )
        result = await asyncio.to_thread(sync, site, node.ctl())

        assert target in result.removed
        assert target not in node.ctl().users()
        # dropped by the broker, and every reconnect is refused (no user for the CN)
        await eventually(lambda: not session.connected, timeout_s=10)
        await asyncio.sleep(1.0)
        assert not session.connected


def bell_settings(node: RabbitNode, client_id: str, tls: TlsFiles) -> Settings:
    """Fast reconnects, so a refused client retries (and is refused) many times per test."""
    return Settings(
        host="127.0.0.1",
        port=node.mqtt_port,
        client_id=client_id,
        version=311,
        tls=tls,
        persistent=False,
        connect_timeout_s=2.0,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
    )


async def test_a_bell_writes_only_its_own_up_topics(
    site: Site, node: RabbitNode, tmp_path: Path
) -> None:
    """MQTT 3.1.1 has no reason codes: a refused publish closes the connection, and nothing
    reaches the uplink queue; the permitted publish before it proves the path works."""
    bell = "bell-0011"
    tls = tls_identity(site, bell, tmp_path / "tls")
    await asyncio.to_thread(sync, site, node.ctl())
    uplink: list[Message] = []
    consumer = AmqpUplink(
        f"amqp://{site.gateway_id}@127.0.0.1:{node.amqp_port}/",
        uplink.append,
        password=rabbit_files(site).gateway_password.read_text().strip(),
    )
    drops: list[int] = []
    session = Session(
        bell_settings(node, bell, tls), lambda m: None, on_disconnect=lambda: drops.append(1)
    )
    async with running(consumer.run(), session.run()):
        await asyncio.wait_for(consumer.start(), 10)
        await session.wait_connected(10)
        await session.publish(up_topic(bell, "alert"), b"own")
        await eventually(lambda: [m.payload for m in uplink] == [b"own"], timeout_s=10)
        assert not drops

        # QoS 0: a refused QoS 1 message would be sent again at each reconnect
        for n, forged in enumerate((up_topic("bell-0001", "alert"), down_topic(bell, "ack")), 1):
            await session.wait_connected(10)
            with contextlib.suppress(MqttError):
                await session.publish(forged, b"forged", qos=0)
            await eventually(lambda n=n: len(drops) >= n, timeout_s=10)
        await asyncio.sleep(0.5)
        assert [m.payload for m in uplink] == [b"own"]
