"""The fault scenarios of issue 13, shipped in simulator/scenarios/, run small in CI.

Each is the real fleet (30 agents), the gateway process, mosquitto and the centre sink,
with the scenario's own faults and thresholds; the test passes when the simulator's
verdict does (nothing lost, nothing late, no press swallowed, one offline report per
outage and none without one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.disks import can_mount
from simulator.report import summarise
from simulator.run import Simulation
from simulator.scenario import load_scenario

SHIPPED = Path(__file__).parents[3] / "simulator" / "scenarios"

ISSUE_13 = [
    "broker-restart-after-autosave",
    "broker-kill-after-autosave",
    "gateway-disk-full",
    "bell-disk-full",
    "clock-skew-10min",
    "outbox-damage",
    "partition-flapping",
]
NEEDS_MOUNT = {"gateway-disk-full", "bell-disk-full"}
DEVICES = 30

# the longest (partition-flapping) is 85 s of scenario plus its drain
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("name", ISSUE_13)
async def test_an_issue_13_scenario_passes_its_verdict(name: str, tmp_path: Path) -> None:
    if name in NEEDS_MOUNT and (why := can_mount()) is not None:
        pytest.skip(f"{name} mounts a small tmpfs for its full disk: {why}")
    scenario = load_scenario(SHIPPED / f"{name}.toml", devices=DEVICES)
    summary = summarise(await Simulation(scenario, tmp_path / "report").execute())
    assert summary["alerts"]["sent"] > 0
    assert summary["passed"], summary["failures"]
