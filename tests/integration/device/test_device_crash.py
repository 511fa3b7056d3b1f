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

from device_testkit import (
    Keys,
    eventually,
    gateway_site,
    spawn_agent,
    spying,
    stop,
    write_device_config,
)

from ansimi.broker import Mosquitto
from protocol.messages import AlertMessage, StatusMessage


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
            agent.send_signal(signal.SIGUSR1)
            await eventually(lambda: len(spy.of_type("alert")) >= 1)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            # the broker tells everyone, with the will the device left: retained `offline`
            await eventually(lambda: "offline" in statuses())
        finally:
            stop(agent)
        first = spy.tokens("alert")[0]
        alert_id = first.message.id
        assert isinstance(first.message, AlertMessage)
        assert first.message.body.trigger == "press"
        # the outbox kept it through the kill
        assert outbox_ids(tmp_path / "device") == [alert_id]
        before = len(spy.of_type("alert"))

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
                await eventually(lambda: outbox_ids(tmp_path / "device") == [])

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
