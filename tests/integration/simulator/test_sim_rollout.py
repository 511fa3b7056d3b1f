"""The rollout scenario end to end (issue 18): bells that update themselves in a worker
process, the gateway as its own process, releases made, added and rolled out with the
installer's commands, presses throughout, and the simulator's accounting of every alert.

Six bells in CI; the issue's 200 run as `ansimi sim run --scenario rollout --devices 200`
(docs/fleet.md has the figures).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.report import summarise
from simulator.run import Simulation
from simulator.scenario import load_scenario

SHIPPED = Path(__file__).parents[3] / "simulator" / "scenarios"

pytestmark = pytest.mark.slow


async def test_a_good_release_everywhere_then_a_broken_one_rolled_back_everywhere(
    tmp_path: Path,
) -> None:
    # six bells: the 10 % step is one bell, 50 % three; both rollouts take under 20 s here
    scenario = load_scenario(SHIPPED / "rollout.toml", devices=6, duration_s=30)
    summary = summarise(await Simulation(scenario, tmp_path / "report").execute())
    assert summary["failures"] == []
    a = summary["alerts"]
    assert a["sent"] > 0 and a["lost"] == 0 and a["delivered_at_centre"] == a["sent"]
    r = summary["rollout"]
    good, broken = r["releases"]
    assert [(s["percent"], s["devices"], s["state"]) for s in good["steps"]] == [
        (10, 1, "done"),
        (50, 3, "done"),
        (100, 6, "done"),
    ]
    # paused at once: a bell busy with an incident then is never offered the broken release;
    # every bell offered it ran it and came back by itself
    offered = 6 - broken["counts"]["pending"]
    assert broken["state"] == "paused" and broken["rolled_back"] == offered >= 1
    assert r["running_at_end"] == {"2.0": 6} and r["left_midway"] == []
    # into 2.0 once each; into 3.0 and back to 2.0 each that was offered it
    assert r["agent_restarts"] == 6 + 2 * offered
    # bells pressed as each step offered them the release, and besides
    assert good["presses_during"] >= 1 and broken["presses_during"] >= 1
