"""Remote configuration on a real broker: a set_config is tried, confirmed or rolled back.

The trial's clock is injected: the test moves it past `confirm_within_s` instead of waiting.
Where no gateway runs, the test plays its downlink (signed commands and `received` acks).
"""

from __future__ import annotations

import asyncio
import json
import signal
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
    spawn_agent,
    spying,
    stop,
    write_device_config,
)

from ansimi.broker import Mosquitto, free_port
from ansimi.mqtt import Session
from device.agent import Agent
from device.remote_config import MAX_FAILURES, STATE_FILE
from gateway.remote_config import checked_patch, seal_sms_numbers
from protocol.clock import wall_ms
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import Ack, Command, HealthMessage, HeartbeatMessage
from protocol.remote_config import config_hash
from protocol.topics import down_topic

CONFIRM_S = 60.0


class Clock:
    """Starts at the wall clock (the downlink's freshness window is checked against it)."""

    def __init__(self) -> None:
        self.now = wall_ms()

    def __call__(self) -> int:
        return self.now


def rig(
    tmp_path: Path, mosquitto: Mosquitto, keys: Keys, clock: Clock, heartbeat_s: float = 3600
) -> Agent:
    return make_agent(
        tmp_path,
        mosquitto,
        keys,
        clock_ms=clock,
        remote_config={"confirm_within_s": CONFIRM_S},
        mqtt={"host": mosquitto.host, "port": mosquitto.port, "heartbeat_s": heartbeat_s},
    )


class Downlink:
    """Plays the gateway's downlink over the spy's session: signed commands and acks."""

    def __init__(self, session: Session, keys: Keys) -> None:
        self.session, self.keys, self.seq = session, keys, 0

    async def _send(self, body: Ack | Command, type_name: str) -> None:
        self.seq += 1
        token = down_token(self.keys.gateway, body, seq=self.seq)
        await self.session.publish(down_topic(DEVICE_ID, type_name), token)

    async def set_config(self, patch: dict[str, dict[str, object]]) -> None:
        await self._send(Command(name="set_config", config=patch), "command")  # type: ignore[arg-type]

    async def received(self, message: HealthMessage) -> None:
        await self._send(Ack(ref=message.id, stage="received"), "ack")


def beats(spy: Spy) -> list[HeartbeatMessage]:
    return [m for m in spy.of_type("heartbeat") if isinstance(m, HeartbeatMessage)]


def health(spy: Spy, event: str) -> list[HealthMessage]:
    found = [m for m in spy.of_type("health") if isinstance(m, HealthMessage)]
    return [m for m in found if m.body.event == event]


def reports(spy: Spy, event: str) -> list[HealthMessage]:
    """One per report: a resend before `received` repeats its id."""
    return list({m.id: m for m in reversed(health(spy, event))}.values())[::-1]


async def confirmed(spy: Spy, gateway: Downlink, agent: Agent, patch: Patch) -> None:
    """Acknowledge the trial's `config_applied` as the gateway does, and see it confirmed."""

    def under_patch() -> list[HealthMessage]:
        return [m for m in reports(spy, APPLIED) if m.body.detail == config_hash(patch)]

    await eventually(lambda: bool(under_patch()))
    (report,) = under_patch()
    await gateway.received(report)
    await eventually(lambda: agent.remote.trial is None and agent.remote.good == patch)


APPLIED = "config_applied"
Patch = dict[str, dict[str, object]]


async def test_a_config_is_confirmed_by_the_gateway_s_received_not_by_the_broker_s_puback(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock, heartbeat_s=0.2)
    patch: Patch = {"behaviour": {"long_press_s": 2.5}, "device": {"silent": True}}
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        gateway = Downlink(session, keys)
        await agent.ready.wait()
        await gateway.set_config(patch)
        # applied at once; its report and three heartbeats under it heard by the broker
        # (the first long PUBACKed by then): the broker's PUBACKs confirm nothing
        await eventually(lambda: len(reports(spy, APPLIED)) == 1)
        new_beats = lambda: [b for b in beats(spy) if b.body.config_hash == config_hash(patch)]  # noqa: E731
        await eventually(lambda: len(new_beats()) >= 3)
        assert agent.remote.trial is not None and agent.remote.good == {}
        assert agent.config.behaviour.long_press_s == 2.5
        assert agent.behaviour.rules.long_press_s == 2.5 and agent.behaviour.silent
        # the gateway's `received` for the report does
        await confirmed(spy, gateway, agent, patch)
        # confirmed: the clock running past the window changes nothing any more
        clock.now += int(CONFIRM_S * 1000) * 2
        assert agent.check_config_trial() is None
        assert agent.remote.good == patch
    again = rig(tmp_path, mosquitto, keys, clock)
    assert again.config.behaviour.long_press_s == 2.5
    assert again.heartbeat().config_hash == config_hash(patch)


async def test_a_config_that_breaks_the_link_rolls_back_twice_then_is_refused(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock)
    good: Patch = {"behaviour": {"ring_link_s": 60.0}}
    nobody = free_port()  # no broker listens there: the new config cannot connect
    broken: Patch = {"mqtt": {"port": nobody}, "behaviour": {"ring_link_s": 30.0}}
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        gateway = Downlink(session, keys)
        await agent.ready.wait()
        await gateway.set_config(good)
        await confirmed(spy, gateway, agent, good)
        for attempt in (1, 2):
            connects = agent.connects
            await gateway.set_config(broken)
            await eventually(lambda: agent.link.session.address == (mosquitto.host, nobody))
            await eventually(lambda: agent.link.session.failed_connects > 0)
            assert agent.remote.trial is not None  # not proven: no report can get out
            assert agent.config.behaviour.ring_link_s == 30.0
            # within the window it waits; past it, back to the last good config
            clock.now += int(CONFIRM_S * 1000) - 1
            assert agent.check_config_trial() is not None
            clock.now += 1
            assert agent.check_config_trial() is None
            assert agent.remote.trial is None and agent.remote.good == good
            assert agent.config.behaviour.ring_link_s == 60.0
            await eventually(lambda n=connects: agent.connects > n and agent.link.connected)
            assert agent.link.session.address == (mosquitto.host, mosquitto.port)
            # the gateway hears why its config is not running, and the hash it runs instead
            await eventually(lambda n=attempt: len(reports(spy, "config_failed")) == n)
            then = "tried again if sent" if attempt == 1 else "not tried again"
            assert reports(spy, "config_failed")[-1].body.detail == (
                f"{config_hash(broken)} not_confirmed: back to {config_hash(good)}; {then}"
            )
        await agent.send_heartbeat()
        await eventually(lambda: beats(spy)[-1].body.config_hash == config_hash(good))
        # the gateway sends a drifting bell its config again now and then: the one that
        # broke this bell's link twice is not tried a third time, nor reported again
        await gateway.set_config(broken)
        await gateway.set_config({"behaviour": {"ring_link_s": 50.0}})
        await eventually(lambda: agent.config.behaviour.ring_link_s == 50.0)
        assert agent.link.session.address == (mosquitto.host, mosquitto.port)
        assert len(reports(spy, "config_failed")) == 2
        assert health(spy, "config_refused") == []


async def test_a_config_the_device_model_refuses_is_reported_and_changes_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys, clock = Keys.new(), Clock()
    agent = rig(tmp_path, mosquitto, keys, clock)
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        gateway = Downlink(session, keys)
        await agent.ready.wait()
        # hold times must grow: the same validator as device.toml's refuses it
        await gateway.set_config({"behaviour": {"long_press_s": 20.0}})
        # a key the gateway may not set: the device's identity
        await gateway.set_config({"device": {"id": "bell-9999"}})
        # one event each (a resend before the gateway's `received` repeats its id)
        await eventually(lambda: len({m.id for m in health(spy, "config_refused")}) == 2)
        firsts = {m.id: m for m in reversed(health(spy, "config_refused"))}
        details = sorted((m.body.detail or "" for m in firsts.values()), reverse=True)
        assert "long_press_s < cancel_hold_s < duress_hold_s" in details[0]
        assert details[1] == "[device] id cannot be set remotely"
        assert agent.configs_refused == 2
        assert agent.remote.trial is None and agent.remote.good == {}
        assert agent.config.behaviour.long_press_s == 3.0


async def test_an_agent_killed_during_a_trial_starts_on_the_good_config_and_tries_it_once_more(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    config = write_device_config(tmp_path, mosquitto, keys)  # a heartbeat every 0.5 s
    patch: Patch = {"behaviour": {"ring_link_s": 5.0}}
    log = tmp_path / "agent.log"
    async with spying(mosquitto, keys) as (spy, session):
        gateway = Downlink(session, keys)

        async def beats_after(count: int) -> None:
            """`count` more heartbeats, each from device.toml's config alone (no patch)."""
            seen = len(beats(spy))
            await eventually(lambda: len(beats(spy)) >= seen + count)
            assert {b.body.config_hash for b in beats(spy)[seen:]} == {config_hash({})}

        for start in (1, 2, 3):
            agent = spawn_agent(config, log)
            try:
                await beats_after(1)  # connected, on the last good config
                failed = reports(spy, "config_failed")
                assert len(failed) == start - 1
                if start > 1:
                    then = "tried again if sent" if start == 2 else "not tried again"
                    assert failed[-1].body.detail == (
                        f"{config_hash(patch)} restarted: back to {config_hash({})}; {then}"
                    )
                applied = len(reports(spy, APPLIED))
                await gateway.set_config(patch)
                if start < 3:
                    # tried (again): on trial, and killed before anything confirms it
                    await eventually(lambda n=applied: len(reports(spy, APPLIED)) == n + 1)
                    agent.send_signal(signal.SIGKILL)
                    agent.wait(10)
                else:
                    # killed during its trial twice: not tried a third time
                    await beats_after(3)
                    assert len(reports(spy, APPLIED)) == applied
            finally:
                stop(agent)
    state = json.loads((tmp_path / "device" / STATE_FILE).read_text())
    assert state == {
        "good": {},
        "trial": None,
        "failed": config_hash(patch),
        "failures": MAX_FAILURES,
    }


async def test_the_gateway_s_layers_reach_the_bell_its_sms_numbers_sealed_and_drift_clears(
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
    async with gateway_site(tmp_path, mosquitto, keys) as (gateway, _receiver):
        async with running(agent.run()):
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

            # the bell's own SMS numbers: sealed to its key at the gateway, opened at the bell
            numbers = ["+821012345678", "+82212345678"]
            own, sealed_to = seal_sms_numbers(
                {"sms": {"numbers": numbers}}, gateway.registry.device(DEVICE_ID)
            )
            assert await gateway.configs.set_layer(
                "device", DEVICE_ID, checked_patch(own), sealed_to
            )
            assert sealed_to is not None
            await eventually(lambda: agent.remote.trial is None and "sms" in agent.remote.good)
            assert agent.config.sms.numbers == numbers
            # the district's layer still under it
            assert agent.config.behaviour.ring_link_s == 45.0
            await eventually(lambda: state() == "in_sync")

        # `ansimi provision device rotate`: the bell gets a new key and its agent starts
        # again on it; the numbers were sealed to the old one
        new_keys = Keys(generate_key(), keys.gateway)
        token, _ = await gateway.store.issue_enrolment(
            DEVICE_ID, "bell", "", "", now_ms=wall_ms(), rotate=True
        )
        new_public = public_key_to_b64(new_keys.device_key.public_key())
        await gateway.store.complete_enrolment(token, new_public, "serial-2", wall_ms())
        await gateway.registry.reload()
        sent = gateway.configs.sent
        rotated = make_agent(
            tmp_path,
            mosquitto,
            new_keys,
            mqtt={"host": mosquitto.host, "port": mosquitto.port, "heartbeat_s": 0.5},
        )
        async with running(rotated.run()):
            await rotated.ready.wait()
            # the rest of its config runs, without the numbers, and the gateway wants the
            # same: in sync, nothing sent, and the drift asks for the numbers
            assert rotated.remote.good == wanted
            assert rotated.config.sms.numbers == []
            assert rotated.config.behaviour.ring_link_s == 45.0
            await eventually(lambda: state() == "in_sync")  # its first heartbeat says so
            (row,) = gateway.configs.drift()
            assert row.numbers_needed and row.reported_hash == config_hash(wanted)
            assert gateway.configs.sent == sent
