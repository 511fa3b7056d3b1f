"""The shipped `dead-link-press` scenario, compressed: presses on black-holed links (#23).

Real agents with fake modems, the gateway process, mosquitto and the simulator's proxy in
`hold` mode. The SMS is counted from the press, so it leaves within `sms_after_s` + 3 s
even though the agent still believes its link is up; every alert still reaches the centre
once the link heals.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.report import summarise, write
from simulator.run import Simulation
from simulator.scenario import load_scenario

SHIPPED = Path(__file__).parents[3] / "simulator" / "scenarios"

pytestmark = pytest.mark.slow


async def test_dead_link_press_sms_from_the_press_and_nothing_lost(tmp_path: Path) -> None:
    scenario = load_scenario(SHIPPED / "dead-link-press.toml", time_scale=0.45)
    observed = await Simulation(scenario, tmp_path / "report").execute()
    summary = summarise(observed)
    write(observed, summary, tmp_path / "report")
    alerts = summary["alerts"]
    assert alerts["lost"] == 0, alerts["lost_ids"]
    assert alerts["delivered_at_centre"] == alerts["sent"] > 0
    assert alerts["duplicate_deliveries"] == 0
    # the SMS went out from the press, while the agents still believed their links up
    sms = summary["latency_s"]["press_to_sms"]
    assert sms["count"] > 0 and alerts["sms_sent"] >= sms["count"]
    assert sms["p95"] <= scenario.device.sms_after_s + 3
    # every press on a black-holed link was measured, one way or the other
    dead = summary["latency_s"]["press_to_link_dead"]
    assert dead["count"] + summary["dead_links_not_found"] > 0
    assert "press_to_sms" in (tmp_path / "report" / "index.html").read_text()
    assert summary["passed"], summary["failures"]
