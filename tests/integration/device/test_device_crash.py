"""The agent as its own process, SIGKILLed between publish and ack: the alert survives.

`ansimi device run` with fake hardware; SIGUSR1 presses its emergency button. No gateway
runs at first, so the alert is published but never acked; the process is killed, the
gateway and the control centre start, the agent restarts and sends the alert again with
the same id, and the centre gets it exactly once.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from ansimi_testkit import eventually
from device_testkit import (
    DEVICE_ID,
    WAIT_S,
    Keys,
    gateway_site,
    running,
    spawn_agent,
    spying,
    stop,
    write_device_config,
)

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message as MqttMessage
from ansimi.mqtt import Session, Settings
from protocol.jws import verify
from protocol.messages import AlertMessage, Heartbeat, StatusMessage, parse_message
from protocol.topics import up_topic


async def retained_status(broker: Mosquitto, keys: Keys) -> str:
    """What a newcomer learns about the device: the retained status message."""
    got: list[MqttMessage] = []
    late = Session(
        Settings(host=broker.host, port=broker.port, client_id="late", persistent=False),
        got.append,
    )
    async with running(late.run()):
        await late.wait_connected(WAIT_S)
        await late.subscribe([(up_topic(DEVICE_ID, "status"), 1)])
        await eventually(lambda: bool(got))
    assert got[0].retain
    message = parse_message(verify(got[0].payload, lambda kid: keys.device.public_key).payload)
    assert isinstance(message, StatusMessage)
    return message.body.state


def outbox_ids(state: Path) -> list[str]:
    with sqlite3.connect(state / "outbox.db") as db:
        return [row[0] for row in db.execute("SELECT id FROM outbox")]


async def test_sigkill_between_publish_and_ack_then_restart_delivers_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    config = write_device_config(tmp_path, mosquitto, keys)
    log = tmp_path / "agent.log"
    async with spying(mosquitto, keys) as (spy, session):

        def statuses() -> list[str]:
            return [m.body.state for m in spy.of_type("status") if isinstance(m, StatusMessage)]

        def online() -> int:
            return statuses().count("online")

        agent = spawn_agent(config, log)
        try:
            await eventually(lambda: online() == 1)
            # `online` is retained too, so the broker's retained state is the latest one
            assert await retained_status(mosquitto, keys) == "online"
            agent.send_signal(signal.SIGUSR1)
            await eventually(lambda: len(spy.of_type("alert")) >= 1)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            # the broker tells everyone, with the will the device left: retained `offline`
            await eventually(lambda: "offline" in statuses())
            assert await retained_status(mosquitto, keys) == "offline"
        finally:
            stop(agent)
        first = spy.tokens("alert")[0]
        alert_id = first.message.id
        assert isinstance(first.message, AlertMessage)
        assert first.message.body.trigger == "press"
        # the outbox kept it through the kill
        assert outbox_ids(tmp_path / "device") == [alert_id]
        before = len(spy.of_type("alert"))
        heartbeats_before = len(spy.of_type("heartbeat"))

        def outbox_depth_reported() -> int | None:
            # a running agent holds its outbox locked: it tells its depth in its heartbeat
            beats = spy.of_type("heartbeat")[heartbeats_before:]
            body = beats[-1].body if beats else None
            return body.outbox_depth if isinstance(body, Heartbeat) else None

        async with gateway_site(tmp_path, mosquitto, keys) as (_gateway, receiver):
            agent = spawn_agent(config, log)
            try:
                await eventually(lambda: receiver.events.count() == 1)
                assert receiver.events.ids() == [alert_id]
                # sent again after the restart: same id, a fresh (higher) sequence number
                await eventually(lambda: len(spy.of_type("alert")) > before)
                again = spy.of_type("alert")[before:]
                assert again and all(m.id == alert_id for m in again)
                assert again[0].seq > first.message.seq
                await eventually(lambda: outbox_depth_reported() == 0)

                # the first copy turning up late is a duplicate: re-acked, not forwarded
                def received_acks() -> int:
                    return sum(
                        1
                        for m in spy.of_type("ack")
                        if getattr(m.body, "ref", None) == alert_id
                        and getattr(m.body, "stage", None) == "received"
                    )

                acks = received_acks()
                await session.publish(first.topic, first.token)
                await eventually(lambda: received_acks() > acks)
                assert receiver.events.count() == 1
            finally:
                stop(agent)
    assert "Traceback" not in log.read_text()
