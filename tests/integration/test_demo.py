"""`ansimi demo` end to end, as a newcomer runs it, on both brokers it can use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ansimi.broker import free_port


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_presses_arrive_at_the_centre(tmp_path: Path, broker: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ansimi",
            "demo",
            "--duration",
            "5",
            "--devices",
            "2",
            "--press-every",
            "1.5",
            "--console-port",
            str(free_port()),
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
