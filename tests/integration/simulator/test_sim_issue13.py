"""The fault scenarios of issue 13, shipped in simulator/scenarios/, run small in CI.

Each is the real fleet (30 agents), the gateway process, mosquitto and the centre sink,
with the scenario's own faults and thresholds; the test passes when the simulator's
verdict does (nothing lost, nothing late, no press swallowed, one offline report per
outage and none without one).

BEFORE_THE_FIXES lists the scenarios that cannot pass until the gateway and device fixes
of issue 13 are merged: they fail on purpose today, which is the proof that they catch
those bugs. They run as strict xfail (so they do run, and an unexpected pass is reported);
empty the list once the fixes are in, and every scenario must pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.disks import can_mount
from simulator.report import summarise
from simulator.run import Simulation
from simulator.scenario import load_scenario

SHIPPED = Path(__file__).parents[3] / "simulator" / "scenarios"

# flip me: scenarios that fail until the fixes of issue 13 (other branches) are merged
BEFORE_THE_FIXES: set[str] = {
    "broker-restart-after-autosave",  # #1: the gateway stays deaf after the restart
    "broker-kill-after-autosave",  # #1
    "clock-skew-10min",  # #2: skewed bells refused for good
    "outbox-damage",  # #3, #4: a lost counter mutes the bell; a damaged outbox stops it
    "bell-disk-full",  # #5: a press that cannot be stored swallows the later ones
    "gateway-disk-full",  # #6, #7: hot duplicate loop, a wedged WAL
}
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


def _case(name: str) -> object:
    marks = []
    if name in BEFORE_THE_FIXES:
        marks.append(
            pytest.mark.xfail(reason="fails until the issue 13 fixes are merged", strict=True)
        )
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_case(n) for n in ISSUE_13])
async def test_an_issue_13_scenario_passes_its_verdict(name: str, tmp_path: Path) -> None:
    if name in NEEDS_MOUNT and (why := can_mount()) is not None:
        pytest.skip(f"{name} mounts a small tmpfs for its full disk: {why}")
    scenario = load_scenario(SHIPPED / f"{name}.toml", devices=DEVICES)
    summary = summarise(await Simulation(scenario, tmp_path / "report").execute())
    assert summary["alerts"]["sent"] > 0
    assert summary["passed"], summary["failures"]
