"""The secondary path supervised with real parts: a bell with no SMS path (no modem, no
numbers) says so at start-up and in its heartbeats, and the centre gets one
`secondary_path_down`, signed by the gateway."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ansimi_testkit import centre, eventually
from gw_itkit import Fleet, agents_running, gateway_running

from ansimi.broker import Mosquitto
from protocol.envelope import open_envelope
from protocol.messages import StatusMessage


async def test_a_bell_without_an_sms_path_is_reported_once_to_its_centre(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device.sms")
    fleet = Fleet.create(tmp_path, mosquitto, 1)  # fake hardware: no modem, no numbers
    (agent,) = fleet.agents
    async with centre(tmp_path) as (receiver, url):
        config = fleet.config("gw-a", url)
        async with gateway_running(config), agents_running(fleet):

            def down() -> list[str]:
                events = receiver.events.recent(0)
                return [
                    e.event_id
                    for e in events
                    if e.type == "status" and e.body.get("state") == "secondary_path_down"
                ]

            await eventually(lambda: len(down()) == 1)
            heartbeats = agent.heartbeat()
            assert heartbeats.secondary is not None
            assert heartbeats.secondary.faults == ("no_modem", "no_numbers")
            # more heartbeats, still down: not reported again
            beats = fleet.agents[0].config.mqtt.heartbeat_s
            await eventually(lambda: agent.heartbeat().uptime_s >= 3 * beats)
            assert len(down()) == 1
        (event_id,) = down()
        event = receiver.events.get(event_id)
        assert event is not None
        opened = open_envelope(event.jws, {fleet.gateway.kid: fleet.gateway.public_key}.get)
        assert isinstance(opened.message, StatusMessage)
        assert opened.message.device == agent.device_id
    assert "ansimi device set-sms-numbers" in caplog.text
