"""`ansimi sim run`: the report it writes and the exit code QA gates a release on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ansimi.broker import Mosquitto
from simulator.cli import sim

TINY = """
name = "tiny"
description = "five bells, a few presses"
duration_s = 3
drain_s = 20
[fleet]
count = 5
[device]
heartbeat_s = 1
[[events]]
action = "press"
count = 4
end_s = 2
[thresholds]
delivered_p95_s = {limit}
"""


@pytest.mark.parametrize(("limit", "code"), [("30", 0), ("0.000001", 1)])
def test_run_writes_the_report_and_exits_by_the_thresholds(
    tmp_path: Path, limit: str, code: int
) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY.replace("{limit}", limit))
    report = tmp_path / "report"
    result = CliRunner().invoke(
        sim, ["run", "--scenario", str(scenario), "--report", str(report), "--no-live"]
    )
    assert result.exit_code == code, result.output
    summary = json.loads((report / "summary.json").read_text())
    assert summary["alerts"]["sent"] == 4 and summary["alerts"]["lost"] == 0
    assert summary["passed"] is (code == 0)
    if code:
        assert "press to delivered p95" in summary["failures"][0]
        assert "FAIL: press to delivered p95" in result.output
    page = (report / "index.html").read_text()
    assert "tiny" in page and ("PASSED" if code == 0 else "FAILED") in page
    assert (report / "latency.png").stat().st_size > 0


def test_list_shows_the_shipped_scenarios() -> None:
    result = CliRunner().invoke(sim, ["list"])
    assert result.exit_code == 0
    for name in ("quiet-night", "gateway-crash", "centre-down-10min", "district-outage"):
        assert name in result.output


def test_run_against_a_broker_already_running(tmp_path: Path, mosquitto: Mosquitto) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY.replace("{limit}", "30"))
    report = tmp_path / "report"
    result = CliRunner().invoke(
        sim,
        [
            "run",
            "--scenario",
            str(scenario),
            "--report",
            str(report),
            "--no-live",
            "--broker",
            f"{mosquitto.host}:{mosquitto.port}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not (report / "state" / "broker").exists()  # no mosquitto of its own
    assert json.loads((report / "summary.json").read_text())["alerts"]["lost"] == 0


def test_a_broker_restart_needs_the_simulators_own_broker(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        sim,
        [
            "run",
            "--scenario",
            "broker-restart-burst",
            "--report",
            str(tmp_path),
            "--broker",
            "127.0.0.1:1883",
        ],
    )
    assert result.exit_code == 1
    assert "run it without --broker" in result.output


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:port", "127.0.0.1:70000"])
def test_a_broker_address_that_is_not_host_port_is_refused(tmp_path: Path, address: str) -> None:
    result = CliRunner().invoke(
        sim, ["run", "--scenario", "quiet-night", "--report", str(tmp_path), "--broker", address]
    )
    assert result.exit_code == 2
    assert "--broker" in result.output
    assert repr(address) in result.output
