"""`ansimi demo` end to end, as a newcomer runs it, on both brokers it can use."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner

from ansimi.broker import free_port
from ansimi_edge.cli import cli
from ansimi_edge.demo import usable_port

T = TypeVar("T")


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_presses_arrive_at_the_centre(tmp_path: Path, broker: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ansimi_edge",
            "demo",
            "--duration",
            "5",
            "--devices",
            "2",
            "--press-every",
            "1.5",
            "--port",
            "0",  # a free one, picked by the demo
            "--broker",
            broker,
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = re.search(r"(\d+) presses, (\d+) alerts at the control centre", result.stdout)
    assert summary is not None, result.stdout
    pressed, arrived = map(int, summary.groups())
    assert pressed >= 2
    assert arrived == pressed
    assert "bell shows: delivered" in result.stdout
    # the address printed is the port the console listens on, not the 0 asked for
    shown = re.search(r"open http://127\.0\.0\.1:(\d+)/", result.stdout)
    assert shown is not None and int(shown.group(1)) > 0, result.stdout


@pytest.mark.slow  # about 40 s: the tour, then the stopped bell's silence timeout
def test_the_demos_tour_shows_every_kind_at_the_centre(tmp_path: Path) -> None:
    """What a newcomer should meet on the desk: each kind once, on its own bell."""
    state = tmp_path / "demo"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "ansimi_edge", "demo", "--duration", "20"),
            *("--devices", "9", "--press-every", "1", "--port", "0", "--broker", "mosquitto"),
            *("--state-dir", str(state)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # as the console kept them: the incident id and kind the gateway put on each delivery
    with contextlib.closing(sqlite3.connect(state / "centre.db")) as db:
        kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM events WHERE kind != ''")}
        (incidents,) = db.execute(
            "SELECT COUNT(DISTINCT incident_id) FROM events WHERE incident_id != ''"
        ).fetchone()
        (tests,) = db.execute(
            "SELECT COUNT(*) FROM events WHERE incident_id = ''"
            " AND json_extract(body, '$.trigger') = 'test'"
        ).fetchone()
    assert kinds >= {
        "stalking",
        "store_robbery",
        "doorbell_ring",
        "doorbell_emergency",
        "stalking_urgent",
        "duress",
        "tamper",
        "power_lost",
        "offline",
    }, result.stdout
    # each on its own card (one open incident a bell; the ring became the emergency)
    assert incidents >= 8
    assert tests == 1  # the test press: kept and shown, no incident
    # still those kinds at the end: the presses after the tour left those bells alone (a
    # press made the tamper and power cards emergencies, their kinds gone from the desk)
    by_kind = re.search(r"incidents at the control centre by kind: (.*)", result.stdout)
    assert by_kind is not None, result.stdout
    kinds_now = {part.rsplit(" ", 1)[0] for part in by_kind.group(1).split(", ")}
    assert {"tamper", "power_lost", "offline"} <= kinds_now, result.stdout


def test_a_taken_port_stops_the_demo_before_it_starts_naming_the_fix(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["demo", "--port", str(port), "--state-dir", str(tmp_path / "demo")]
        )
    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is taken" in result.output
    assert "--port 0" in result.output and "ss -ltnp" in result.output
    assert not (tmp_path / "demo").exists()  # nothing was started


def test_port_0_is_a_free_port_and_a_free_port_is_kept() -> None:
    port = usable_port(0)
    assert port > 0 and usable_port(port) == port


def test_demo_console_signs_in_and_acknowledge_reaches_the_bell(tmp_path: Path) -> None:
    """What a newcomer does: open the console, sign in with the printed password, and
    acknowledge an alert; the bell (in the demo's output) shows it."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ansimi_edge",
            "demo",
            "--duration",
            "20",
            "--devices",
            "3",
            "--press-every",
            "1.5",
            "--console-port",
            str(port),
            "--broker",
            "mosquitto",
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        password = _wait_for(lambda: _password_in(lines), 60, lines)
        base = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        me = _post_json(opener, f"{base}/api/login", {"name": "demo", "password": password})
        csrf = me["csrf"]

        def first_alert() -> str | None:
            with opener.open(f"{base}/api/alerts", timeout=10) as response:
                alerts = json.load(response)["alerts"]
            return next((a["event_id"] for a in alerts if a["device_id"] == "bell-0001"), None)

        event_id = _wait_for(first_alert, 30, lines)
        request = urllib.request.Request(
            f"{base}/api/alerts/{event_id}/acknowledged",
            method="POST",
            headers={"X-CSRF-Token": csrf},
        )
        with opener.open(request, timeout=10) as response:
            assert json.load(response)["stage"] == "acknowledged"
        _wait_for(
            lambda: any("[bell-0001] bell shows: acknowledged" in x for x in lines), 30, lines
        )
        # the privacy key is on: the operator sees the bell's address
        with opener.open(f"{base}/api/devices/bell-0001", timeout=10) as response:
            device = json.load(response)
        assert "demo street 1" in json.dumps(device), device
        with opener.open(f"{base}/api/audit.csv", timeout=10) as response:
            audit = response.read().decode()
        assert f"demo,acknowledged,{event_id}" in audit
    finally:
        process.terminate()
        process.wait(30)
        reader.join(10)


def _password_in(lines: list[str]) -> str | None:
    for line in list(lines):
        found = re.search(r"sign in as demo / (\S+)", line)
        if found:
            return found.group(1)
    return None


def _wait_for(check: Callable[[], T | None], timeout_s: float, lines: list[str]) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out; demo output so far:\n" + "".join(lines))


def _post_json(
    opener: urllib.request.OpenerDirector, url: str, data: dict[str, str]
) -> dict[str, str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(data).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with opener.open(request, timeout=10) as response:
        result: dict[str, str] = json.load(response)
        return result
