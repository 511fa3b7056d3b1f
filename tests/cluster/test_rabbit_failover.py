"""A three-node RabbitMQ cluster on this machine: SIGKILL of the bells' node while pressing.

First (the cluster still whole; the SIGKILL test leaves a node dead), the check that a
quorum queue has all its members online, on a stopped and restarted node.

Everything dials node 2 first, then 3, then 1: the bells (`[link] other_brokers`) and the
gateway (`[mqtt] other_brokers` for its acks and probes, `[uplink] other_nodes` for the
quorum queue, declared on node 2 so led from there until the kill).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import aio_pika
import pytest
from ansimi_testkit import eventually
from cluster_kit import BELLS, Running, alert_ids, press, site_running
from rabbit_kit import RabbitNode, rabbit_cluster, start_provisioned

from provisioning.rabbitmq import RabbitCtl, RabbitError
from siteca.site import Site, init_site

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("rabbit3-site")
    init_site(root / "site", site="test", listen_host="127.0.0.1", port=8883)
    return Site.open(root / "site")


@pytest.fixture(scope="module")
def nodes(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sequence[RabbitNode]]:
    with rabbit_cluster(site, tmp_path_factory.mktemp("rmq3"), 3) as started:
        yield started


@pytest.fixture
async def live(site: Site, nodes: Sequence[RabbitNode], tmp_path: Path) -> AsyncIterator[Running]:
    async for it in site_running(site, [nodes[1], nodes[2], nodes[0]], tmp_path):
        yield it


async def until(check: Callable[[], bool], timeout_s: float) -> None:
    """Poll a blocking check (rabbitmqctl: about a second of CPU a call) once a second."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"not so within {timeout_s}s"
        await asyncio.sleep(1.0)


async def declare_quorum_queue(node: RabbitNode, name: str) -> None:
    """Through a user of its own for the moment (the site's users are not imported yet)."""
    ctl = node.ctl()
    user, password = "quorum-check", secrets.token_urlsafe(16)
    await asyncio.to_thread(ctl.run, "add_user", user, password)
    try:
        only = f"^{name}$"
        await asyncio.to_thread(ctl.run, "set_permissions", "-p", "/", user, only, only, only)
        url = f"amqp://{user}:{password}@{node.host}:{node.amqp_port}/"
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        await asyncio.to_thread(ctl.delete_user, user)


def short_now(ctl: RabbitCtl) -> list[str] | None:
    """The quorum queues short of a member; None while rabbitmqctl cannot tell (a node
    leaving or joining the cluster): asked again at the next poll."""
    try:
        return ctl.quorum_queues_short()
    except RabbitError:
        return None


async def test_a_quorum_queue_is_short_while_a_member_node_is_stopped_and_whole_once_back(
    site: Site, nodes: Sequence[RabbitNode]
) -> None:
    queue = "quorum-check"
    stopped, asked = nodes[0], nodes[2]
    ctl = asked.ctl(timeout_s=30)
    await declare_quorum_queue(nodes[1], queue)
    assert await asyncio.to_thread(ctl.quorum_queues_short) == []

    await asyncio.to_thread(stopped.stop)
    try:
        await until(lambda: queue in (short_now(ctl) or []), timeout_s=30)
    finally:
        start_provisioned(site, stopped, [n.name for n in nodes])
        await asyncio.to_thread(stopped.await_startup)
    await until(lambda: short_now(ctl) == [], timeout_s=60)
    # the SIGKILL test next needs the MQTT client-ID tracker whole again too
    names = {n.name for n in nodes}
    await until(lambda: names <= ctl.mqtt_client_id_trackers(), timeout_s=60)
    await asyncio.to_thread(ctl.run, "delete_queue", queue)


async def test_sigkill_of_the_node_everyone_is_on_loses_no_alert_and_all_move_by_themselves(
    live: Running, nodes: Sequence[RabbitNode]
) -> None:
    killed = nodes[1]
    bells = list(live.bells.values())
    assert all(b.agent.link.session.address[1] == killed.mqtt_port for b in bells)
    assert live.gateway.session.address[1] == killed.mqtt_port
    for bell in bells:
        press(bell)
    await eventually(lambda: len(alert_ids(live.receiver)) == len(BELLS), timeout_s=30)

    # pressed again around the kill: before it, and while the bells are cut off
    for bell in bells[:2]:
        press(bell)
    killed.kill()
    for bell in bells[2:]:
        press(bell)

    pressed = 2 * len(BELLS)
    await eventually(lambda: len(alert_ids(live.receiver)) == pressed, timeout_s=90)
    ids = alert_ids(live.receiver)
    assert len(set(ids)) == pressed  # each accepted once
    gateway = live.gateway
    await eventually(lambda: gateway.session.connected and gateway.uplink.connected, 60)
    assert gateway.session.address[1] != killed.mqtt_port
    for bell in bells:
        await eventually(lambda b=bell: b.agent.link.connected, timeout_s=60)
        assert bell.agent.link.session.address[1] != killed.mqtt_port
        await eventually(lambda b=bell: b.agent.outbox.depth() == 0, timeout_s=30)
