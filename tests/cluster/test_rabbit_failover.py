"""A three-node RabbitMQ cluster on this machine: SIGKILL of the bells' node while pressing.

Everything dials node 2 first, then 3, then 1: the bells (`[link] other_brokers`) and the
gateway (`[mqtt] other_brokers` for its acks and probes, `[uplink] other_nodes` for the
quorum queue, declared on node 2 so led from there until the kill).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from ansimi_testkit import eventually
from cluster_kit import BELLS, Running, alert_ids, press, site_running
from rabbit_kit import RabbitNode, rabbit_cluster

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
