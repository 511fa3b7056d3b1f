"""A press on a black-holed link (the simulator's proxy in hold mode, a real mosquitto):
the alert's missing PUBACK makes the link find out it is dead, and the alert still reaches
the broker once the link heals."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ansimi_testkit import eventually
from device_testkit import DEVICE_ID, WAIT_S, Keys, make_agent, running, spying

from ansimi.broker import Mosquitto
from ansimi.mqtt import LinkDead
from device.hal.fakes import FakeInputs
from simulator.proxy import FaultProxy

ACK_TIMEOUT_S = 1.0


async def test_a_press_on_a_black_holed_link_declares_it_dead_and_the_alert_arrives_later(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    proxy = FaultProxy(mosquitto.host, mosquitto.port)
    await proxy.start()
    keys = Keys.new()
    agent = make_agent(
        tmp_path,
        mosquitto,
        keys,
        # heartbeats (and so the keepalive) an hour apart: only the press can find the cut
        mqtt={"host": mosquitto.host, "port": proxy.port, "heartbeat_s": 3600},
        link={"ack_timeout_s": ACK_TIMEOUT_S},
    )
    inputs = agent.hardware.inputs
    assert isinstance(inputs, FakeInputs)
    dead: list[LinkDead] = []
    agent.link.session.add_link_dead_listener(dead.append)
    try:
        async with spying(mosquitto, keys) as (spy, _session), running(agent.run()):
            await asyncio.wait_for(agent.ready.wait(), WAIT_S)
            proxy.hold({DEVICE_ID})
            pressed_at = asyncio.get_running_loop().time()
            inputs.press("emergency")
            inputs.release("emergency")
            await eventually(lambda: bool(dead), timeout_s=15)
            assert dead[0].reason == "ack_timeout"
            # PUBACK missing for ack_timeout_s, then the probe unanswered as long again
            assert 2 * ACK_TIMEOUT_S <= dead[0].at_s - pressed_at < 2 * ACK_TIMEOUT_S + 2.0
            assert not agent.link.connected
            assert spy.of_type("alert") == []
            (pending,) = agent.outbox.pending()
            proxy.heal({DEVICE_ID})
            await eventually(lambda: pending.id in {m.id for m in spy.of_type("alert")})
    finally:
        await proxy.close()
