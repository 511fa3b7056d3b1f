"""Crashes with real parts: SIGKILL the gateway or the broker mid-burst; two instances.

Nothing the devices send may be lost, whoever dies: every alert a bell sent reaches the
control centre. The devices' outboxes and our acks carry it, not the broker (mosquitto's
persistence is a periodic snapshot: a SIGKILL loses what it queued since).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from ansimi_testkit import centre, eventually
from gw_itkit import Fleet, GatewayProcess, agents_running, centre_alerts, gateway_running
from pg_testkit import PgServer

from ansimi.broker import Mosquitto, free_port
from gateway.store import open_store

DEVICES = 12


def accepted(instance: GatewayProcess) -> float:
    """Messages of any type this instance has kept, from its /metrics."""
    text = instance.metrics_text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ansimi_accepted_total{")
    )


def all_arrived(tmp_path: Path, fleet: Fleet, sent: set[str]) -> Callable[[], bool]:
    def check() -> bool:
        arrived = centre_alerts(tmp_path)
        return len(sent) >= DEVICES and {e for e, _ in arrived} == sent and fleet.pending() == 0

    return check


def assert_each_once(tmp_path: Path, sent: set[str]) -> None:
    arrived = centre_alerts(tmp_path)
    ids = [e for e, _ in arrived]
    assert len(ids) == len(set(ids)) == len(sent)
    assert set(ids) == sent
    assert len({d for _, d in arrived}) == DEVICES  # one incident per bell


async def test_sigkilled_gateway_restarts_and_every_alert_arrives_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, DEVICES)
    sent = fleet.alerts_sent.ids
    async with centre(tmp_path) as (_receiver, url), agents_running(fleet):
        api_port = free_port()
        gateway = GatewayProcess(fleet.write_config("gw-a", url, api_port), api_port)
        gateway.start()
        try:
            await gateway.ready()
            half = DEVICES // 2
            fleet.press_all(fleet.agents[:half])
            await eventually(lambda: len(centre_alerts(tmp_path)) >= 1)
            fleet.press_all(fleet.agents[half:])
            # one turn of the loop: the publishes leave for the broker, and the gateway
            # dies with them on the wire, in its queue or half committed
            await asyncio.sleep(0)
            gateway.kill()
            in_flight = DEVICES - len(centre_alerts(tmp_path))
            gateway.start()
            await gateway.ready()
            await eventually(all_arrived(tmp_path, fleet, sent))
        finally:
            gateway.stop()
    assert in_flight > 0, "the kill came too late to test anything"
    assert_each_once(tmp_path, sent)


async def test_sigkilled_broker_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, DEVICES)
    sent = fleet.alerts_sent.ids
    async with (
        centre(tmp_path) as (_receiver, url),
        gateway_running(fleet.config("gw-a", url)),  # url is bound by then
        agents_running(fleet),
    ):
        fleet.press_all()
        await asyncio.sleep(0)  # the publishes leave for the broker
        mosquitto.kill()  # alerts queued in the broker die with it
        in_flight = fleet.pending()
        await asyncio.sleep(0.5)
        mosquitto.start()
        await eventually(all_arrived(tmp_path, fleet, sent))
    assert in_flight > 0, "the kill came too late to test anything"
    assert_each_once(tmp_path, sent)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_two_instances_share_the_load_and_one_carries_on_alone(
    tmp_path: Path, mosquitto: Mosquitto, engine: str, request: pytest.FixtureRequest
) -> None:
    """Two instances on one store: the SQLite file of one host, or PostgreSQL (as gateways
    on several hosts share it: their forwarders claim disjoint deliveries)."""
    fleet = Fleet.create(tmp_path, mosquitto, DEVICES)
    if engine == "postgresql":
        server: PgServer = request.getfixturevalue("postgres")
        await fleet.move_to(server.new_database())
    sent = fleet.alerts_sent.ids
    async with centre(tmp_path) as (_receiver, url), agents_running(fleet):
        instances = []
        for name in ("gw-a", "gw-b"):
            port = free_port()
            # a short session: mosquitto hands a dead instance its share until it expires
            path = fleet.write_config(name, url, port, session_expiry_s=1)
            instances.append(GatewayProcess(path, port))
        a, b = instances
        try:
            for instance in instances:
                instance.start()
            await asyncio.gather(a.ready(), b.ready())
            half = DEVICES // 2
            fleet.press_all(fleet.agents[:half])
            await eventually(lambda: len(centre_alerts(tmp_path)) >= half)
            # both instances take part: the shared subscription splits the uplink
            for instance in instances:
                await eventually(lambda i=instance: accepted(i) > 0)  # type: ignore[misc]
            fleet.press_all(fleet.agents[half:])
            await asyncio.sleep(0)
            a.kill()
            await eventually(all_arrived(tmp_path, fleet, sent))
            assert b.process is not None and b.process.poll() is None
        finally:
            for instance in instances:
                instance.stop()
    assert_each_once(tmp_path, sent)
    assert "Traceback" not in a.log.read_text() + b.log.read_text()
    if fleet.store_url is not None:  # kept there, not in the SQLite file beside it
        store = open_store(fleet.store_url)
        kept = {e.event_id for e in await store.events(None, 10 * DEVICES, type="alert")}
        await store.close()
        assert kept == sent


async def test_a_broker_outage_is_not_reported_as_every_bell_going_offline(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, 3)
    async with centre(tmp_path) as (_receiver, url):
        config = fleet.config("gw-a", url)
        # silent for two heartbeats (2 s) is offline: a short test
        supervise = config.supervise.model_copy(update={"missed": 2})
        config = config.model_copy(update={"supervise": supervise})
        async with gateway_running(config) as gateway, agents_running(fleet):
            await eventually(lambda: gateway.supervisor.watched() == 3)
            mosquitto.kill()
            await eventually(lambda: not gateway.session.connected)
            # a tick past every bell's deadline: had supervision not paused with the
            # gateway's own link, every bell would be reported offline by it
            supervisor = gateway.supervisor
            deadlines = [supervisor.deadline(agent.config.device.id) for agent in fleet.agents]
            last_deadline = max(d for d in deadlines if d is not None)
            ticked: list[int] = []
            tick = supervisor.tick

            async def recorded_tick(now_ms: int) -> list[str]:
                ticked.append(now_ms)
                return await tick(now_ms)

            supervisor.tick = recorded_tick  # type: ignore[method-assign]
            await eventually(lambda: bool(ticked) and ticked[-1] > last_deadline)
            offline = gateway.metrics.registry.get_sample_value(
                "ansimi_supervision_events_total", {"event": "offline"}
            )
            assert offline == 0
            assert all(d.online for d in gateway.store.database.devices())
            mosquitto.start()
