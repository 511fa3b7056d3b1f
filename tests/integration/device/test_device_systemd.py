"""The systemd unit verifies cleanly; the agent speaks systemd's notify protocol.

READY=1 and WATCHDOG=1 are checked on the real `ansimi device run` process through a fake
NOTIFY_SOCKET (an AF_UNIX datagram socket); a blocked event loop is shown to miss its
watchdog pings in-process, where the test can block the loop on purpose.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from device_testkit import WAIT_S, Keys, make_agent, running, spawn_agent, stop, write_device_config

from ansimi.broker import Mosquitto

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "ansimi-device.service"


def test_unit_passes_systemd_analyze_verify_without_a_single_warning(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`)")
    text = UNIT.read_text()
    for option in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=ansimi",
        "PrivateTmp=yes",
        "SupplementaryGroups=gpio video dialout",
    ):
        assert re.search(f"^{re.escape(option)}", text, re.MULTILINE), option
    # verify needs ExecStart to name a file that exists here; everything else is checked as is
    binary = Path(sys.executable).parent / "ansimi"
    copy = tmp_path / UNIT.name
    copy.write_text(
        re.sub(r"^ExecStart=\S+", f"ExecStart={binary}", text, count=1, flags=re.MULTILINE)
    )
    assert binary.exists()
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # it exits 0 on warnings: any output at all is a failure
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # a short folder: AF_UNIX paths are limited to 107 bytes
    folder = Path(tempfile.mkdtemp(prefix="ansimi-notify-"))
    path = str(folder / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


async def receive(sock: socket.socket, want: str, timeout_s: float = WAIT_S) -> list[str]:
    """Datagrams until one equals `want`, bounded in time."""
    loop = asyncio.get_running_loop()
    got: list[str] = []
    async with asyncio.timeout(timeout_s):
        while want not in got:
            got.append((await loop.sock_recv(sock, 4096)).decode())
    return got


async def test_real_agent_process_sends_ready_and_watchdog_pings(
    tmp_path: Path, mosquitto: Mosquitto, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    config = write_device_config(tmp_path, mosquitto, Keys.new())
    agent = spawn_agent(
        config, tmp_path / "agent.log", {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    )
    try:
        got = await receive(sock, "READY=1")
        got += await receive(sock, "WATCHDOG=1")
        pings = got.count("WATCHDOG=1")
        got += await receive(sock, "WATCHDOG=1")
        assert got.count("WATCHDOG=1") > pings  # it keeps pinging
    finally:
        stop(agent)


async def test_a_blocked_event_loop_misses_its_watchdog_pings(
    tmp_path: Path,
    mosquitto: Mosquitto,
    notify_socket: tuple[socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = make_agent(tmp_path, mosquitto, Keys.new())
    async with running(agent.run()):
        await receive(sock, "READY=1")
        await receive(sock, "WATCHDOG=1")
        # drain, then block the loop for ten ping intervals without yielding to it
        while True:
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point of this test
        with pytest.raises(BlockingIOError):
            sock.recv(4096)  # not one ping while the loop was blocked: systemd would restart
        # once the loop runs again, so do the pings
        await receive(sock, "WATCHDOG=1")
