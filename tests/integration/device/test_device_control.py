"""`ansimi device press` and `status`: the installer's commands, over the agent's control socket.

A real agent process on fake hardware, a real mosquitto, the real gateway and a receiving
centre; the CLI runs as its own process, as at the door.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ansimi_testkit import eventually
from click.testing import CliRunner
from device_testkit import (
    DEVICE_ID,
    WAIT_S,
    Keys,
    gateway_site,
    make_agent,
    spawn_agent,
    stop,
    write_device_config,
)

from ansimi.broker import Mosquitto, MosquittoConfig, free_port
from ansimi_edge.cli import cli
from device.control import ControlServer, socket_path
from device.hal.fakes import FakeInputs
from device.hal.ports import InputEvent


async def ansimi(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ansimi_edge",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_a_press_from_the_cli_prints_every_stage_back_to_acknowledged(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    config = write_device_config(tmp_path, mosquitto, keys)
    sock = socket_path(tmp_path / "device")
    async with gateway_site(tmp_path, mosquitto, keys) as (gateway, receiver):
        agent = spawn_agent(config, tmp_path / "agent.log")
        try:
            await eventually(sock.exists)
            # the service user's only: nobody else on the machine may press this bell
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            press = await ansimi("device", "press", "--config", str(config))
            assert press.stdout is not None
            lines: list[str] = []
            async with asyncio.timeout(WAIT_S):
                while not any(" delivered " in line for line in lines):
                    lines.append((await press.stdout.readline()).decode())
            sent = next(line for line in lines if " sent " in line)
            assert "alert press" in sent
            alert_id = sent.split()[-1]
            # the centre has it; an operator acknowledges it there
            assert receiver.events.get(alert_id) is not None
            await gateway.downlink.ack(DEVICE_ID, alert_id, "acknowledged")
            async with asyncio.timeout(WAIT_S):
                rest, _ = await press.communicate()
            assert press.returncode == 0, "".join(lines) + rest.decode()
            output = "".join(lines) + rest.decode()
            stages = [line.split()[2] for line in output.splitlines() if alert_id in line]
            assert stages == ["sent", "received", "delivered", "acknowledged"], output

            status = await ansimi("device", "status", "--config", str(config))
            async with asyncio.timeout(WAIT_S):
                shown, _ = await status.communicate()
            text = shown.decode()
            assert status.returncode == 0, text
            assert "link       up" in text
            assert f"acknowledged {alert_id}" in text
            assert "outbox     0 waiting" in text
            assert f"firmware   {importlib.metadata.version('ansimi-edge')}" in text
        finally:
            stop(agent)


def test_without_a_running_agent_the_cli_says_what_to_start(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = write_device_config(tmp_path, mosquitto, Keys.new())
    result = CliRunner().invoke(cli, ["device", "press", "--config", str(config)])
    assert result.exit_code == 1
    assert "no control socket" in result.output
    assert "systemctl status ansimi-device" in result.output


async def _answers(path: Path, raw: bytes) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(raw)
    await writer.drain()
    lines = []
    async with asyncio.timeout(WAIT_S):
        while line := await reader.readline():
            lines.append(json.loads(line))
    writer.close()
    return lines


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json\n", "request: Invalid JSON"),
        (b'{"op": "reboot"}\n', "op"),
        (b'{"op": "press", "gesture": "hammer"}\n', "press.gesture"),
        (b'{"op": "press", "extra": 1}\n', "press.extra"),
        (b'{"op": "status", "x": "' + b"y" * 2000 + b'"}\n', "longer than 1024 bytes"),
    ],
)
async def test_bad_requests_are_refused_with_a_reason_and_counted(
    tmp_path: Path, mosquitto: Mosquitto, raw: bytes, reason: str
) -> None:
    agent = make_agent(tmp_path, mosquitto, Keys.new())
    path = socket_path(tmp_path / "device")
    async with ControlServer(agent, agent.on_input, path) as server:
        answers = await _answers(path, raw)
        assert len(answers) == 1 and answers[0]["event"] == "error"
        assert reason in str(answers[0]["reason"])
        assert server.refused == 1
        # and the next request is served as ever
        (status,) = await _answers(path, b'{"op": "status"}\n')
        assert status["event"] == "status" and status["outbox_depth"] == 0
    agent.outbox.close()


async def test_gestures_go_in_as_input_events_with_the_device_s_hold_times(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    agent = make_agent(tmp_path, mosquitto, Keys.new())
    path = socket_path(tmp_path / "device")
    seen = []

    def sink(event: object) -> None:
        seen.append(event)
        agent.on_input(event)  # type: ignore[arg-type]

    async with ControlServer(agent, sink, path):
        # a ring on a bell, a cancel with nothing to cancel: refused, saying what to do
        (ring,) = await _answers(path, b'{"op": "press", "gesture": "ring"}\n')
        assert "--ring needs a doorbell" in str(ring["reason"])
        (cancel,) = await _answers(path, b'{"op": "press", "gesture": "cancel"}\n')
        assert "press first" in str(cancel["reason"])
        assert seen == []

        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "press", "gesture": "long"}\n')
        first = json.loads(await reader.readline())
        assert first["event"] == "sent" and first["trigger"] == "press"
        writer.close()
    assert isinstance(agent.hardware.inputs, FakeInputs)
    kinds = [(e.input, e.kind, e.held_for) for e in seen]  # type: ignore[attr-defined]
    long_press_s = agent.config.behaviour.long_press_s
    assert kinds[0] == ("emergency", "pressed", 0.0)
    assert kinds[-1] == ("emergency", "released", long_press_s)
    assert all(k[1] == "held" for k in kinds[1:-1]) and len(kinds) == 2 + int(long_press_s)
    assert agent.behaviour.incident is not None and agent.behaviour.incident.urgent
    agent.outbox.close()
    assert not os.path.exists(path)


async def test_a_client_that_hangs_up_leaves_no_watch_behind(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    agent = make_agent(tmp_path, mosquitto, Keys.new())
    path = socket_path(tmp_path / "device")
    async with ControlServer(agent, agent.on_input, path) as server:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "press"}\n')
        assert json.loads(await reader.readline())["event"] == "sent"
        assert server.watching == 1
        writer.close()  # gone before any ack: no broker here, none will come
        await eventually(lambda: server.watching == 0)
    agent.outbox.close()


async def test_a_socket_that_cannot_be_made_never_stops_the_agent(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(tmp_path, mosquitto, Keys.new())
    deep = tmp_path / ("d" * 120) / "control.sock"  # past AF_UNIX's 108 bytes
    async with ControlServer(agent, agent.on_input, deep):
        agent.on_input(InputEvent("emergency", "pressed"))  # the button works as ever
        assert agent.outbox.depth() == 1
    assert "no control socket at" in caplog.text and "shorter `device.state_dir`" in caplog.text
    agent.outbox.close()


def test_a_socket_left_by_a_killed_agent_says_to_start_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = write_device_config(tmp_path, mosquitto, Keys.new())
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(socket_path(tmp_path / "device")))
    left.close()  # the file stays, nobody listens: as after a SIGKILL
    result = CliRunner().invoke(cli, ["device", "status", "--config", str(config)])
    assert result.exit_code == 1
    assert "nobody listens on" in result.output
    assert "systemctl start ansimi-device" in result.output


async def press_on_a_running_agent(
    tmp_path: Path, config: Path, *, timeout_s: float
) -> tuple[int, str]:
    """`ansimi device press --timeout` on an agent process started for it: (exit, output)."""
    agent = spawn_agent(config, tmp_path / "agent.log")
    try:
        await eventually(socket_path(tmp_path / "device").exists)
        press = await ansimi(
            "device", "press", "--config", str(config), "--timeout", f"{timeout_s}"
        )
        async with asyncio.timeout(WAIT_S):
            output, _ = await press.communicate()
    finally:
        stop(agent)
    assert press.returncode is not None
    return press.returncode, output.decode()


async def test_a_press_that_gets_no_ack_in_time_says_where_to_look(tmp_path: Path) -> None:
    broker = Mosquitto(MosquittoConfig(state_dir=tmp_path / "broker", port=free_port()))
    config = write_device_config(tmp_path, broker, Keys.new())  # never started: link down
    code, text = await press_on_a_running_agent(tmp_path, config, timeout_s=1)
    assert code == 1, text
    assert " sent " in text and " received " not in text
    assert "not every alert reached `acknowledged` within 1 s" in text
    assert "`ansimi device status`" in text


@pytest.mark.parametrize(
    ("centre_answers", "stuck_at", "says"),
    [
        (False, "received", "no control centre took it: check the gateway's [[centres]]"),
        (True, "delivered", "no operator acknowledged it yet: acknowledge it at the console"),
    ],
    ids=["centre down", "no operator"],
)
async def test_a_press_stuck_after_the_gateway_says_where_it_stopped(
    tmp_path: Path, mosquitto: Mosquitto, centre_answers: bool, stuck_at: str, says: str
) -> None:
    # issue 19: an installer at the door learns which side to look at, not just "not in time"
    keys = Keys.new()
    config = write_device_config(tmp_path, mosquitto, keys)
    nowhere = None if centre_answers else f"http://127.0.0.1:{free_port()}/events"
    async with gateway_site(tmp_path, mosquitto, keys, centre_url=nowhere):
        code, text = await press_on_a_running_agent(tmp_path, config, timeout_s=4)
    assert code == 1, text
    stages = [line.split()[2] for line in text.splitlines() if line[:2].isdigit()]
    assert stages[-1] == stuck_at, text
    assert says in text.replace("\n", " "), text
