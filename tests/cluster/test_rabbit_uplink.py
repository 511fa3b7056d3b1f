"""The site on a real RabbitMQ node, as `ansimi provision rabbitmq` provisions it.

Real agents over MQTT 3.1.1 with mutual TLS (certificates from the site's CA), the gateway
taking the uplink from the AMQP quorum queue and acking over MQTT, a receiving centre.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ansimi_testkit import eventually, running
from cluster_kit import BELLS, Running, alert_ids, bell_settings, press, site_running, tls_identity
from rabbit_kit import RabbitNode, rabbit_cluster

from ansimi.mqtt import Message, MqttError, Session
from device.hal.ports import Pattern
from gateway.uplink import AmqpUplink
from protocol.topics import down_topic, up_topic
from provisioning.rabbitmq import rabbit_files, sync
from provisioning.revoke import revoke_certificate
from siteca.site import Site, init_site

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


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


@pytest.fixture
async def live(site: Site, node: RabbitNode, tmp_path: Path) -> AsyncIterator[Running]:
    async for it in site_running(site, [node], tmp_path):
        yield it


async def test_alerts_through_the_quorum_queue_reach_the_centre_and_acks_reach_the_bells(
    live: Running,
) -> None:
    for bell in live.bells.values():
        press(bell)
    await eventually(lambda: len(alert_ids(live.receiver)) == len(BELLS), timeout_s=30)
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
