"""The link on a real broker: heartbeats, commands, and forged or replayed downlink messages."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import threading
from pathlib import Path

import pytest
from ansimi_testkit import eventually
from device_testkit import DEVICE_ID, WAIT_S, Keys, Spy, down_token, make_agent, running, spying

from ansimi.broker import Mosquitto
from ansimi.mqtt import Session
from device.agent import Agent
from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem
from device.hal.ports import Pattern
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.messages import Ack, AlertMessage, Command, HeartbeatMessage
from protocol.topics import down_topic


def parts(agent: Agent) -> tuple[FakeInputs, FakeIndicator]:
    inputs, indicator = agent.hardware.inputs, agent.hardware.indicator
    assert isinstance(inputs, FakeInputs) and isinstance(indicator, FakeIndicator)
    return inputs, indicator


def heartbeats(spy: Spy) -> list[HeartbeatMessage]:
    return [m for m in spy.of_type("heartbeat") if isinstance(m, HeartbeatMessage)]


async def press_and_wait_alert(agent: Agent, spy: Spy) -> AlertMessage:
    inputs, _ = parts(agent)
    before = len(spy.of_type("alert"))
    inputs.press("emergency")
    inputs.release("emergency")
    await eventually(lambda: len(spy.of_type("alert")) > before)
    alert = spy.of_type("alert")[before]
    assert isinstance(alert, AlertMessage)
    return alert


async def test_heartbeat_carries_uptime_power_signal_firmware_and_outbox_depth(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    modem = FakeModem(signal=20)
    agent = make_agent(
        tmp_path,
        mosquitto,
        keys,
        modem=modem,
        mqtt={"host": mosquitto.host, "port": mosquitto.port, "heartbeat_s": 0.2},
    )
    inputs, _ = parts(agent)
    async with spying(mosquitto, keys) as (spy, _session), running(agent.run()):
        await eventually(lambda: len(heartbeats(spy)) >= 1)
        beat = heartbeats(spy)[0].body
        assert beat.power == "mains"
        assert beat.link_quality == round(20 * 100 / 31)
        # the installed agent's version (no update launcher here), not a config value
        assert beat.firmware == importlib.metadata.version("ansimi-edge")
        assert beat.outbox_depth == 0
        # no gateway acks: the alert stays in the outbox and the heartbeat says so
        inputs.lose_power()
        await press_and_wait_alert(agent, spy)
        seen = len(heartbeats(spy))
        await eventually(lambda: len(heartbeats(spy)) > seen + 1)
        latest = heartbeats(spy)[-1].body
        assert latest.power == "battery"
        # the alert and the power-loss event, both waiting for `received`
        assert latest.outbox_depth == 2


async def test_forged_acks_and_commands_change_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    agent = make_agent(tmp_path, mosquitto, keys)
    forger = Signer(keys.gateway.kid, generate_key())  # the gateway's name, another key
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        alert = await press_and_wait_alert(agent, spy)
        await publish_ack(session, forger, Ack(ref=alert.id, stage="received"), seq=10**15)
        await publish_command(session, forger, Command(name="set_silent", args={"silent": True}))
        await eventually(lambda: agent.link.rejected.get("bad_signature", 0) == 2)
        assert agent.outbox.depth() == 1
        assert not agent.behaviour.silent
        # another device's genuine ack is not for us either
        await session.publish(
            down_topic(DEVICE_ID, "ack"),
            down_token(keys.gateway, Ack(ref=alert.id, stage="received"), 2, device="bell-0002"),
        )
        await eventually(lambda: agent.link.rejected.get("topic_mismatch", 0) == 1)
        assert agent.outbox.depth() == 1


async def test_replayed_genuine_messages_change_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    agent = make_agent(tmp_path, mosquitto, keys)
    _, indicator = parts(agent)
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        alert = await press_and_wait_alert(agent, spy)
        received = down_token(keys.gateway, Ack(ref=alert.id, stage="received"), 1000)
        silence = down_token(keys.gateway, Command(name="set_silent", args={"silent": True}), 1001)
        speak = down_token(keys.gateway, Command(name="set_silent", args={"silent": False}), 1002)
        await session.publish(down_topic(DEVICE_ID, "ack"), received)
        await eventually(lambda: agent.outbox.depth() == 0)
        await session.publish(down_topic(DEVICE_ID, "command"), silence)
        await eventually(lambda: agent.behaviour.silent)
        await session.publish(down_topic(DEVICE_ID, "command"), speak)
        await eventually(lambda: not agent.behaviour.silent)
        shown = list(indicator.history)

        # an attacker who recorded them sends them again, with their older sequence numbers
        await session.publish(down_topic(DEVICE_ID, "command"), silence)
        await session.publish(down_topic(DEVICE_ID, "ack"), received)
        await eventually(lambda: agent.link.rejected.get("replay", 0) == 2)
        assert not agent.behaviour.silent
        assert indicator.history == shown


async def test_commands_ping_set_silent_selftest_and_video_not_yet(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys.new()
    modem = FakeModem()
    agent = make_agent(tmp_path, mosquitto, keys, modem=modem)
    _, indicator = parts(agent)
    seq = iter(range(1, 100))
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        assert heartbeats(spy) == []  # heartbeat_s is an hour: any beat now answers a command

        await publish_command(session, keys.gateway, Command(name="ping"), next(seq))
        await eventually(lambda: len(heartbeats(spy)) == 1)

        await publish_command(session, keys.gateway, Command(name="selftest"), next(seq))
        await eventually(lambda: len(heartbeats(spy)) == 2)
        assert (Pattern.SELFTEST, False) in indicator.history

        with caplog.at_level(logging.WARNING, logger="device.agent"):
            await publish_command(session, keys.gateway, Command(name="video_start"), next(seq))
            command = Command(name="set_silent", args={"silent": True})
            await publish_command(session, keys.gateway, command, next(seq))
            await eventually(lambda: agent.behaviour.silent)
        assert "video_start is not supported yet" in caplog.text

        alert = await press_and_wait_alert(agent, spy)
        assert alert.body.silent
        assert indicator.history[-1] == (Pattern.SENDING, True)
        assert not indicator.led_lit and not indicator.buzzer_sounding


async def publish_ack(session: Session, signer: Signer, ack: Ack, seq: int) -> None:
    await session.publish(down_topic(DEVICE_ID, "ack"), down_token(signer, ack, seq))


async def publish_command(
    session: Session, signer: Signer, command: Command, seq: int = 10**15
) -> None:
    await session.publish(down_topic(DEVICE_ID, "command"), down_token(signer, command, seq))


async def test_an_unacknowledged_alert_is_resent_with_its_id_until_received(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # No gateway: nobody acks. The resend loop sleeps until each entry is due (no polling)
    # and must still wake for it, again and again, then stop once `received` verifies.
    keys = Keys.new()
    agent = make_agent(tmp_path, mosquitto, keys)
    inputs, _ = parts(agent)
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        inputs.press("emergency")
        inputs.release("emergency")
        await eventually(lambda: len(spy.of_type("alert")) >= 3)
        ids = {m.id for m in spy.of_type("alert")}
        assert len(ids) == 1
        (alert_id,) = ids
        await session.publish(
            down_topic(DEVICE_ID, "ack"),
            down_token(keys.gateway, Ack(ref=alert_id, stage="received"), seq=2**40),
        )
        await eventually(lambda: agent.outbox.depth() == 0)
        sent = len(spy.of_type("alert"))
        # Not a fixed wait that proves nothing: the resend loop wakes at the entry's old due
        # time, finds nothing due, and parks with no wake time of its own (only a new entry
        # or a reconnect wakes it). Nothing can go out after that.
        await eventually(
            lambda: agent.outbox.next_attempt_ms() is None and agent._resend_wake_ms is None
        )
        assert len(spy.of_type("alert")) == sent


async def test_the_alert_goes_out_while_its_outbox_fsync_is_still_running(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # The row is written before the publish (a crash loses nothing); the fsync that makes
    # it survive a power cut overlaps the round trip instead of delaying it.
    keys = Keys.new()
    agent = make_agent(tmp_path, mosquitto, keys)
    inputs, _ = parts(agent)
    disk_busy = threading.Event()
    real_sync = agent.outbox.sync
    wal = tmp_path / "device" / "outbox.db-wal"
    synced: list[bytes] = []  # what the write-ahead log held when each fsync ran

    sync_started = threading.Event()

    def slow_sync() -> None:  # an SD card that takes its time
        sync_started.set()
        disk_busy.wait(WAIT_S)
        synced.append(wal.read_bytes())
        real_sync()

    agent.outbox.sync = slow_sync  # type: ignore[method-assign]
    async with spying(mosquitto, keys) as (spy, _session), running(agent.run()):
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        inputs.press("emergency")
        await eventually(lambda: len(spy.of_type("alert")) == 1)
        waiting = asyncio.ensure_future(agent.outbox_synced())
        # the fsync has begun and hangs on the disk: the waiter must still be waiting
        await asyncio.to_thread(sync_started.wait, WAIT_S)
        await asyncio.sleep(0)  # the waiter's thread has had its chance to return
        assert not waiting.done(), "the sync finished although the disk never answered"
        assert synced == []
        disk_busy.set()
        await asyncio.wait_for(waiting, WAIT_S)
        # the fsync covered the alert's row, written to the log before the publish
        (alert,) = spy.of_type("alert")
        assert synced and alert.id.encode() in synced[0]
