"""systemd: the gateway's units (service, daily purge and its timer) and the broker's
drop-in verify without a word; the real gateway process says READY=1 and keeps pinging
the watchdog."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from gw_itkit import WAIT_S, Fleet, GatewayProcess

from ansimi.broker import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "systemd" / "ansimi-gateway.service"
PURGE = ROOT / "systemd" / "ansimi-purge.service"
PURGE_TIMER = ROOT / "systemd" / "ansimi-purge.timer"
DROP_IN = ROOT / "systemd" / "mosquitto-ansimi.conf"
DEBIAN_MOSQUITTO = Path("/lib/systemd/system/mosquitto.service")


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`)")
    return found


def verify(*units: Path, unit_path: Path | None = None) -> str:
    """All that `systemd-analyze verify` says; it exits 0 on warnings, so output is failure.

    It also loads the units these name (a timer's service) from their folder.
    """
    env = dict(os.environ)
    if unit_path is not None:
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"  # trailing colon: and the usual places
    result = subprocess.run(
        [analyze(), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=units[0].parent,
    )
    return f"rc={result.returncode}" * (result.returncode != 0) + result.stdout + result.stderr


def with_existing_exec_start(text: str) -> str:
    # verify needs ExecStart to name a file that exists here; everything else stays as is
    binary = Path(sys.executable).parent / "ansimi"
    assert binary.exists()
    return re.sub(r"^ExecStart=\S+", f"ExecStart={binary}", text, count=1, flags=re.MULTILINE)


HARDENED = ("User=ansimi", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes")


def installed(unit: Path, folder: Path) -> Path:
    """A copy of `unit` in `folder` that verify accepts on this machine."""
    copy = folder / unit.name
    copy.write_text(with_existing_exec_start(unit.read_text()))
    return copy


@pytest.mark.parametrize(
    ("unit", "options"),
    [
        (UNIT, ("Type=notify", "WatchdogSec=", "Restart=always", "LimitNOFILE=65536")),
        # same user and state directory as the gateway: it deletes from the same store
        (PURGE, ("Type=oneshot", "ExecStart=/opt/ansimi/.venv/bin/ansimi gateway purge ")),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_unit_is_hardened_and_verifies_without_a_single_warning(
    tmp_path: Path, unit: Path, options: tuple[str, ...]
) -> None:
    text = unit.read_text()
    for option in (*options, *HARDENED, "StateDirectory=ansimi/gateway"):
        assert re.search(f"^{re.escape(option)}", text, re.MULTILINE), option
    assert verify(installed(unit, tmp_path)) == ""


def test_purge_timer_runs_the_purge_daily_and_both_verify(tmp_path: Path) -> None:
    text = PURGE_TIMER.read_text()
    for option in ("OnCalendar=", "Persistent=true", "WantedBy=timers.target"):
        assert re.search(f"^{re.escape(option)}", text, re.MULTILINE), option
    timer = installed(PURGE_TIMER, tmp_path)
    service = installed(PURGE, tmp_path)
    assert verify(timer, service) == ""
    # the control: the timer alone loads its service, so it does name this one (verify
    # is silent about a timer whose service does not exist)
    service.write_text(service.read_text() + "Nicety=yes\n")
    assert PURGE.name in verify(timer)


def test_broker_drop_in_raises_the_open_file_limit_and_verifies(tmp_path: Path) -> None:
    assert re.search(r"^LimitNOFILE=(\d+)$", DROP_IN.read_text(), re.MULTILINE)
    broker = tmp_path / "mosquitto.service"
    if DEBIAN_MOSQUITTO.exists():
        broker.write_text(with_existing_exec_start(DEBIAN_MOSQUITTO.read_text()))
    else:  # a stand-in with the same shape
        broker.write_text(
            with_existing_exec_start("[Service]\nType=notify\nExecStart=/usr/sbin/mosquitto\n")
        )
    drop_ins = tmp_path / "mosquitto.service.d"
    drop_ins.mkdir()
    shutil.copy(DROP_IN, drop_ins / "ansimi.conf")
    assert verify(broker, unit_path=tmp_path) == ""
    # the control: verify does read the drop-in, so a broken one would have been reported
    (drop_ins / "ansimi.conf").write_text("[Service]\nLimitNOFILE=lots\n")
    assert "ansimi.conf" in verify(broker, unit_path=tmp_path)


async def test_gateway_process_sends_ready_and_watchdog_pings(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, 0)
    api_port = free_port()
    gateway = GatewayProcess(
        fleet.write_config("gw-a", "http://127.0.0.1:9/events", api_port), api_port
    )
    loop = asyncio.get_running_loop()
    # a short folder: AF_UNIX paths are limited to 107 bytes
    with (
        tempfile.TemporaryDirectory(prefix="ansimi-gw-") as folder,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(f"{folder}/notify")
        sock.setblocking(False)
        gateway.start(env={"NOTIFY_SOCKET": f"{folder}/notify", "WATCHDOG_USEC": "400000"})
        try:
            got: list[str] = []
            async with asyncio.timeout(WAIT_S):
                while got.count("WATCHDOG=1") < 3 or "READY=1" not in got:
                    got.append((await loop.sock_recv(sock, 4096)).decode())
                # systemctl stop: SIGTERM, and a clean exit that says so
                assert gateway.process is not None
                gateway.process.terminate()
                while "STOPPING=1" not in got:
                    got.append((await loop.sock_recv(sock, 4096)).decode())
            assert gateway.process.wait(WAIT_S) == 0
        finally:
            gateway.stop()
    assert "Traceback" not in gateway.log.read_text()
