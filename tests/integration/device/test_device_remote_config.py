"""Remote configuration on a real broker: a set_config is tried, proven or rolled back.

The trial's clock is injected: the test moves it past `confirm_within_s` instead of waiting.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ansimi_testkit import eventually
from device_testkit import (
    DEVICE_ID,
    Keys,
    Spy,
    down_token,
    gateway_site,
    make_agent,
    running,
    spying,
)

from ansimi.broker import Mosquitto, free_port
from ansimi.mqtt import Session
from device.agent import Agent
from protocol.clock import wall_ms
from protocol.messages import Command, HealthMessage, HeartbeatMessage
from protocol.remote_config import config_hash
from protocol.topics import down_topic

CONFIRM_S = 60.0


class Clock:
    """Starts at the wall clock (the downlink's freshness window is checked against it)."""

    def __init__(self) -> None:
        self.now = wall_ms()

    def __call__(self) -> int:
        return self.now


def rig(tmp_path: Path, mosquitto: Mosquitto, keys: Keys, clock: Clock) -> Agent:
    return make_agent(
        tmp_path,
        mosquitto,
        keys,
        clock_ms=clock,
        remote_config={"confirm_within_s": CONFIRM_S},
    )


async def send_config(
    session: Session, keys: Keys, clock: Clock, patch: dict[str, dict[str, object]], seq: int
) -> None:
    command = Command(name="set_config", config=patch)  # type: ignore[arg-type]
    token = down_token(keys.gateway, command, seq=seq)
    await session.publish(down_topic(DEVICE_ID, "command"), token)


def beats(spy: Spy) -> list[HeartbeatMessage]:
    return [m for m in spy.of_type("heartbeat") if isinstance(m, HeartbeatMessage)]


def health(spy: Spy, event: str) -> list[HealthMessage]:
    found = [m for m in spy.of_type("health") if isinstance(m, HealthMessage)]
    return [m for m in found if m.body.event == event]


async def test_a_config_is_applied_proven_by_a_heartbeat_reported_and_kept_across_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock)
    patch = {"behaviour": {"long_press_s": 2.5}, "device": {"silent": True}}
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await agent.ready.wait()
        await send_config(session, keys, clock, patch, seq=1)
        # the proof is a heartbeat under the new config, sent at once and PUBACKed
        await eventually(lambda: agent.remote.trial is None and agent.remote.good == patch)
        assert agent.config.behaviour.long_press_s == 2.5
        assert agent.behaviour.rules.long_press_s == 2.5 and agent.behaviour.silent
        assert any(b.body.config_hash == config_hash(patch) for b in beats(spy))
        # confirmed: the clock running past the window changes nothing any more
        clock.now += int(CONFIRM_S * 1000) * 2
        assert agent.check_config_trial() is None
        assert agent.remote.good == patch
    again = rig(tmp_path, mosquitto, keys, clock)
    assert again.config.behaviour.long_press_s == 2.5
    assert again.heartbeat().config_hash == config_hash(patch)


async def test_a_config_that_breaks_the_link_rolls_back_and_says_so(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock)
    good = {"behaviour": {"ring_link_s": 60.0}}
    nobody = free_port()  # no broker listens there: the new config cannot connect
    broken = {"mqtt": {"port": nobody}, "behaviour": {"ring_link_s": 30.0}}
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await agent.ready.wait()
        await send_config(session, keys, clock, good, seq=1)
        await eventually(lambda: agent.remote.good == good and agent.remote.trial is None)
        connects = agent.connects
        await send_config(session, keys, clock, broken, seq=2)
        await eventually(lambda: agent.link.session.address == (mosquitto.host, nobody))
        await eventually(lambda: agent.link.session.failed_connects > 0)
        assert agent.remote.trial is not None  # not proven: no heartbeat can get out
        assert agent.config.behaviour.ring_link_s == 30.0
        # within the window it waits; past it, back to the last good config
        clock.now += int(CONFIRM_S * 1000) - 1
        assert agent.check_config_trial() is not None
        clock.now += 1
        assert agent.check_config_trial() is None
        assert agent.remote.trial is None and agent.remote.good == good
        assert agent.config.behaviour.ring_link_s == 60.0
        await eventually(lambda: agent.connects > connects and agent.link.connected)
        assert agent.link.session.address == (mosquitto.host, mosquitto.port)
        # the gateway hears why its config is not running, and the hash it runs instead
        await eventually(lambda: len(health(spy, "config_rolled_back")) >= 1)
        assert health(spy, "config_rolled_back")[0].body.detail == f"back to {config_hash(good)}"
        await agent.send_heartbeat()
        await eventually(lambda: beats(spy)[-1].body.config_hash == config_hash(good))
        # the gateway sends a drifting bell its config again now and then: the one that
        # broke this bell's link is not tried again, and not reported again either
        await send_config(session, keys, clock, broken, seq=3)
        await send_config(session, keys, clock, {"behaviour": {"ring_link_s": 50.0}}, seq=4)
        await eventually(lambda: agent.config.behaviour.ring_link_s == 50.0)
        assert agent.link.session.address == (mosquitto.host, mosquitto.port)
        assert {m.id for m in health(spy, "config_rolled_back")} == {
            health(spy, "config_rolled_back")[0].id
        }
        assert health(spy, "config_refused") == []


async def test_a_config_the_device_model_refuses_is_reported_and_changes_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock)
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await agent.ready.wait()
        # hold times must grow: the same validator as device.toml's refuses it
        await send_config(session, keys, clock, {"behaviour": {"long_press_s": 20.0}}, seq=1)
        # a key the gateway may not set: the device's identity
        await send_config(session, keys, clock, {"device": {"id": "bell-9999"}}, seq=2)
        # one event each (a resend before the gateway's `received` repeats its id)
        await eventually(lambda: len({m.id for m in health(spy, "config_refused")}) == 2)
        firsts = {m.id: m for m in reversed(health(spy, "config_refused"))}
        details = sorted((m.body.detail or "" for m in firsts.values()), reverse=True)
        assert "long_press_s < cancel_hold_s < duress_hold_s" in details[0]
        assert details[1] == "[device] id cannot be set remotely"
        assert agent.configs_refused == 2
        assert agent.remote.trial is None and agent.remote.good == {}
        assert agent.config.behaviour.long_press_s == 3.0


async def test_an_agent_restarted_during_a_trial_starts_on_the_last_good_config(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock)
    # no broker session: the trial begins and the agent stops before any proof
    agent.set_config({"behaviour": {"ring_link_s": 5.0}})
    assert agent.remote.trial is not None
    agent.outbox.close()
    again = rig(tmp_path, mosquitto, keys, clock)
    assert again.config.behaviour.ring_link_s == 120.0
    assert again.remote.abandoned == {"behaviour": {"ring_link_s": 5.0}}
    async with spying(mosquitto, keys) as (spy, _session), running(again.run()):
        # sent before the link was up and again on connect: the same message id
        await eventually(lambda: len(health(spy, "config_rolled_back")) >= 1)
        assert {m.id for m in health(spy, "config_rolled_back")} == {
            health(spy, "config_rolled_back")[0].id
        }
    assert again.remote.abandoned is None


async def test_the_gateway_s_district_layer_reaches_the_bell_and_drift_clears(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    agent = make_agent(
        tmp_path,
        mosquitto,
        keys,
        mqtt={"host": mosquitto.host, "port": mosquitto.port, "heartbeat_s": 0.5},
    )
    wanted = {"behaviour": {"ring_link_s": 45.0}, "test_press": {"every_days": 14}}
    async with (
        gateway_site(tmp_path, mosquitto, keys) as (gateway, _receiver),
        running(agent.run()),
    ):
        await agent.ready.wait()

        def state() -> str:
            (row,) = gateway.configs.drift()
            return row.state

        await eventually(lambda: state() == "in_sync")  # nothing desired, nothing run
        assert await gateway.configs.set_layer("district", "mapo", wanted) == 1
        await eventually(lambda: agent.remote.good == wanted)
        assert agent.config.test_press.every_days == 14
        await eventually(lambda: state() == "in_sync")
        (row,) = gateway.configs.drift()
        assert row.reported_hash == config_hash(wanted)

        # kept in the store too, a moment after (written by the gateway's own task)
        async def stored() -> str | None:
            found = await gateway.store.reported_configs()
            return found[DEVICE_ID][0] if DEVICE_ID in found else None

        async with asyncio.timeout(20):
            while await stored() != config_hash(wanted):
                await asyncio.sleep(0.05)
