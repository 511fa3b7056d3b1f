"""Supervision with real parts: an agent process SIGKILLed (its last will), frozen (its
heartbeats stop), brought back; the centre gets status events signed by the gateway."""

from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ansimi_testkit import centre, eventually
from gw_itkit import Fleet, gateway_running

from ansimi.broker import Mosquitto
from gateway.store import Device
from protocol.envelope import open_envelope
from protocol.keys import generate_key, public_key_to_b64, save_private_key
from protocol.messages import StatusMessage

DEVICE = "bell-0100"


def device_config(tmp_path: Path, fleet: Fleet) -> tuple[Path, Device]:
    """Register a bell with the gateway and write its device.toml (fake hardware)."""
    key = generate_key()
    state = tmp_path / DEVICE
    state.mkdir()
    save_private_key(state / "device.key", key)
    public = public_key_to_b64(key.public_key())
    path = tmp_path / "device.toml"
    path.write_text(
        f"""[device]
id = "{DEVICE}"
kind = "bell"
key_file = "{state}/device.key"
state_dir = "{state}"
[gateway]
id = "{fleet.gateway.kid}"
public_key = "{public_key_to_b64(fleet.gateway.public_key)}"
[mqtt]
host = "{fleet.broker.host}"
port = {fleet.broker.port}
heartbeat_s = 0.3
[hardware]
driver = "fake"
camera = "none"
"""
    )
    return path, Device(DEVICE, public, "bell", "mapo")


def spawn_device(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ansimi_edge", "device", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_last_will_silence_and_return_reach_the_centre_as_signed_status_events(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.supervise")
    fleet = Fleet.create(tmp_path, mosquitto, 0)
    config_path, device = device_config(tmp_path, fleet)
    async with centre(tmp_path) as (_receiver, url):
        fleet.register(device)
        async with gateway_running(fleet.config("gw-a", url)) as gateway:
            agent = spawn_device(config_path, tmp_path / "device.log")
            try:
                online = lambda: (gateway.store.database.device(DEVICE) or device).online  # noqa: E731
                await eventually(lambda: online() is True)

                agent.send_signal(signal.SIGKILL)  # the broker publishes its last will
                agent.wait(10)
                await eventually(lambda: states(tmp_path, fleet) == ["offline"])
                assert "bell-0100 is offline (last will)" in caplog.text

                agent = spawn_device(config_path, tmp_path / "device.log")
                await eventually(lambda: states(tmp_path, fleet) == ["offline", "online"])

                agent.send_signal(signal.SIGSTOP)  # frozen: connected, but silent
                await eventually(
                    lambda: states(tmp_path, fleet) == ["offline", "online", "offline"]
                )
                assert "bell-0100 is offline (silent)" in caplog.text
                agent.send_signal(signal.SIGCONT)
                await eventually(
                    lambda: states(tmp_path, fleet) == ["offline", "online", "offline", "online"]
                )
            finally:
                agent.kill()
                agent.wait(10)


def states(tmp_path: Path, fleet: Fleet) -> list[str]:
    """The link states (offline, online) in the centre's status events for the bell, each
    verified as signed by the gateway (kid = gateway id) about this very device. Other
    states are about other things (this bell has no modem: `secondary_path_down`)."""
    with contextlib.closing(sqlite3.connect(tmp_path / "centre.db")) as db:
        rows = db.execute(
            "SELECT jws FROM events WHERE type = 'status' AND device_id = ? ORDER BY received_ms",
            (DEVICE,),
        ).fetchall()
    out = []
    for (jws,) in rows:
        opened = open_envelope(jws, {fleet.gateway.kid: fleet.gateway.public_key}.__getitem__)
        assert isinstance(opened.message, StatusMessage) and opened.message.device == DEVICE
        if opened.message.body.state in ("offline", "online"):
            out.append(opened.message.body.state)
    return out
