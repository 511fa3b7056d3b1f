"""Logs for people: INFO tells an alert's life one line a stage; -v adds the decisions;
media detail only under `ansimi.webrtc.wire` (ansimi/logs.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansimi_testkit import eventually
from click.testing import CliRunner
from device_testkit import (
    DEVICE_ID,
    Keys,
    down_token,
    make_agent,
    running,
    spawn_agent,
    spying,
    stop,
    write_device_config,
)

from ansimi.broker import Mosquitto
from ansimi.logs import DECISION, OWN_PACKAGES, WIRE, WIRE_LIBRARIES, configure
from ansimi_edge.cli import cli
from device.control import socket_path
from device.hal.fakes import FakeInputs
from protocol.messages import Ack
from protocol.topics import down_topic


@pytest.fixture(autouse=True)
def levels() -> Iterator[None]:
    """Give every logger this test sets its level back afterwards."""
    names = ["", *OWN_PACKAGES, WIRE, *WIRE_LIBRARIES]
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


async def _press_and_ack(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> str:
    keys = Keys.new()
    agent = make_agent(tmp_path, mosquitto, keys)
    inputs = agent.hardware.inputs
    assert isinstance(inputs, FakeInputs)
    async with spying(mosquitto, keys) as (spy, session), running(agent.run()):
        await eventually(agent.ready.is_set)
        inputs.press("emergency")
        inputs.release("emergency")
        await eventually(lambda: bool(spy.of_type("alert")))
        alert_id = spy.of_type("alert")[0].id
        for seq, stage in enumerate(("received", "delivered", "acknowledged"), start=1):
            token = down_token(keys.gateway, Ack(ref=alert_id, stage=stage), seq)  # type: ignore[arg-type]
            await session.publish(down_topic(DEVICE_ID, "ack"), token)
        await eventually(lambda: "acknowledged by an operator" in caplog.text)
    return alert_id


async def test_default_level_tells_each_stage_of_an_alert_in_one_line(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    configure(0)
    alert_id = await _press_and_ack(tmp_path, mosquitto, caplog)
    life = [r.getMessage() for r in caplog.records if alert_id in r.getMessage()]
    assert life == [
        f"device {DEVICE_ID}: alert {alert_id} sent",
        f"device {DEVICE_ID}: {alert_id} received by the gateway",
        f"device {DEVICE_ID}: {alert_id} delivered to a control centre",
        f"device {DEVICE_ID}: {alert_id} acknowledged by an operator",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if alert_id in r.getMessage())
    # decisions are for -v
    assert not [r for r in caplog.records if r.levelno < logging.INFO]


async def test_one_v_adds_the_agent_s_decisions(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    configure(1)
    await _press_and_ack(tmp_path, mosquitto, caplog)
    decisions = [r.getMessage() for r in caplog.records if r.levelno == DECISION]
    assert "behaviour: idle --alert--> sent" in decisions
    assert "behaviour: received --delivered--> delivered" in decisions
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]


def _heard(name: str, level: int) -> bool:
    return logging.getLogger(name).isEnabledFor(level)


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_rtp_and_sdp_detail_never_without_the_wire_logger(verbose: int) -> None:
    CliRunner().invoke(cli, [*(["-v"] * verbose), "device", "--help"])
    # the SDP goes to WIRE (device/video/session.py), every RTP packet to aiortc's loggers
    for name in (WIRE, "aiortc.rtcrtpsender", "aioice.ice"):
        assert not _heard(name, logging.DEBUG), name
    assert _heard("device.agent", logging.INFO)
    assert _heard("device.behaviour", DECISION) == (verbose >= 1)
    assert _heard("paho.mqtt", logging.DEBUG) == (verbose >= 2)


def test_the_wire_logger_named_opens_the_media_detail() -> None:
    CliRunner().invoke(cli, ["--debug-log", WIRE, "device", "--help"])
    assert _heard(WIRE, logging.DEBUG)
    assert _heard("aiortc.rtcrtpsender", logging.DEBUG)
    assert not _heard("device.behaviour", DECISION)  # nothing else got louder


async def test_a_start_is_told_at_info_not_as_a_warning(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # issue 19: WARNING is for what needs a person; an agent starting does not
    config = write_device_config(tmp_path, mosquitto, Keys.new())
    log = tmp_path / "agent.log"
    agent = spawn_agent(config, log, verbosity=())  # the default level
    try:
        await eventually(socket_path(tmp_path / "device").exists)
    finally:
        stop(agent)
    assert f"INFO device.cli: device {DEVICE_ID}: agent starting (bell)" in log.read_text()
