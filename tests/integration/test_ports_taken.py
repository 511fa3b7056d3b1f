"""Issue 19: a port already taken stops each service with the port and what to do, never a
traceback, and never an address that leads to another program's server.

Each service runs as the installer runs it (`python -m ansimi_edge ...`), on a port held by
a listening socket of this test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from ansimi.broker import free_port, mosquitto_path
from ansimi_edge.demo import run_demo
from siteca.site import init_site

RUN_TIMEOUT_S = 60


@pytest.fixture
def held() -> Iterator[int]:
    """A port on 127.0.0.1 another program listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def ansimi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ansimi_edge", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
        check=False,
    )


def says_port_and_fix(stderr: str, port: int, setting: str) -> None:
    assert f"port {port} on 127.0.0.1 is taken" in stderr, stderr
    assert f"ss -ltnp 'sport = :{port}'" in stderr and setting in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_the_gateway_api_port_taken_names_the_port_and_the_setting(
    tmp_path: Path, held: int
) -> None:
    init_site(tmp_path / "site", listen_host="127.0.0.1", port=free_port(), api_port=held)
    config = tmp_path / "site" / "gateway" / "gateway.toml"
    done = ansimi("gateway", "run", "--config", str(config))
    assert done.returncode == 1, done.stderr
    says_port_and_fix(done.stderr, held, "[api] port")
    assert str(config) in done.stderr


def test_the_console_port_taken_names_the_port_and_the_option(tmp_path: Path, held: int) -> None:
    done = ansimi(
        "console", "--listen", f"127.0.0.1:{held}", "--db", str(tmp_path / "console.db"),
        env={**os.environ, "ANSIMI_CENTRE_SECRET": "s" * 32},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    says_port_and_fix(done.stderr, held, "--listen HOST:PORT")
    assert "[centre] console page at" not in done.stdout


def test_a_port_taken_after_the_demo_checked_it_stops_it_without_printing_the_address(
    tmp_path: Path, held: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # `ansimi demo` checks the port first (tests/integration/test_demo.py); another program
    # can still take it before the console binds: the port answers, but not as the console
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto`")
    with pytest.raises(click.ClickException) as stopped:
        asyncio.run(run_demo(tmp_path / "demo", 1, 5.0, held, 1.0, "mosquitto"))
    message = stopped.value.format_message()
    assert f"port {held} on 127.0.0.1 is taken" in message and "--port 0" in message
    assert "open http://" not in capsys.readouterr().out
