"""Small scenarios end to end: real agents in a worker process, the gateway as its own
process, mosquitto, the centre sink; every fault type at least once, and nothing lost.

Each run is at most 30 devices and a few seconds of scenario, so CI on two shared cores
stays quick; the shipped scenarios run compressed with `time_scale`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulator.report import summarise
from simulator.run import Simulation
from simulator.scenario import load_scenario

SHIPPED = Path(__file__).parents[3] / "simulator" / "scenarios"

# like every test here that needs mosquitto, these fail (not skip) where it is missing
pytestmark = pytest.mark.slow


async def simulate(path: Path, report: Path, **overrides: Any) -> dict[str, Any]:
    scenario = load_scenario(path, **overrides)
    observed = await Simulation(scenario, report).execute()
    summary = summarise(observed)
    assert summary["alerts"]["lost"] == 0, summary["alerts"]["lost_ids"]
    assert summary["alerts"]["sent"] > 0
    assert summary["alerts"]["delivered_at_centre"] == summary["alerts"]["sent"]
    assert summary["agent_errors"] == 0
    return summary


def scenario_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


NETWORK = """
name = "network-faults"
duration_s = 14
drain_s = 40
seed = 21
[fleet]
count = 30
mix = {bell = 2, doorbell = 1, store = 1}
districts = {mapo = 1, gangnam = 1}
[device]
heartbeat_s = 1
resend_max_s = 2
[[events]]
action = "press"
rate_per_min = 90
[[faults]]
type = "partition"
at_s = 2
duration_s = 5
fraction = 0.3
mode = "hold"
[[faults]]
type = "partition"
at_s = 8
duration_s = 3
fraction = 0.2
mode = "drop"
[[faults]]
type = "latency"
at_s = 1
duration_s = 6
fraction = 0.5
delay_ms = 300
loss = 0.05
[[faults]]
type = "clock_skew"
fraction = 0.2
skew_s = 40
[thresholds]
offline_detect_p95_s = 6
"""


async def test_partitions_latency_and_clock_skew_lose_nothing(tmp_path: Path) -> None:
    summary = await simulate(scenario_file(tmp_path, NETWORK), tmp_path / "report")
    assert summary["passed"], summary["failures"]
    assert summary["clock_skewed_devices"] == 6
    assert summary["links_reset_by_loss"] > 0
    # the black-holed devices fell silent: supervision told the centre about each of them
    detected, partitioned = map(int, summary["offline_detected"].split("/"))
    assert partitioned == 9 + 6 and detected >= 9
    assert summary["offline_detection_s"]["max"] < 6


PROCESSES = """
name = "process-faults"
duration_s = 18
drain_s = 60
seed = 22
[fleet]
count = 30
mix = {bell = 2, doorbell = 1, store = 1}
districts = {mapo = 1, jongno = 1}
[device]
heartbeat_s = 2
resend_max_s = 2
[gateway]
forward_backoff_max_s = 1
breaker_open_s = 1
[[events]]
action = "press"
rate_per_min = 120
[[events]]
action = "power_loss"
count = 3
restore_after_s = 2
[[faults]]
type = "gateway_kill"
at_s = 3
down_s = 1
[[faults]]
type = "broker_restart"
at_s = 8
down_s = 1
[[faults]]
type = "centre_down"
at_s = 12
duration_s = 3
mode = "refuse"
[thresholds]
reconnect_s = 30
"""


async def test_gateway_kill_broker_restart_and_a_silent_centre_lose_nothing(
    tmp_path: Path,
) -> None:
    summary = await simulate(scenario_file(tmp_path, PROCESSES), tmp_path / "report")
    assert summary["passed"], summary["failures"]
    assert len(summary["reconnect_after_broker_restart_s"]) == 1
    assert {f["label"] for f in summary["faults"]} == {
        "gateway SIGKILL",
        "broker killed",
        "centre down (refuse)",
    }
    assert summary["alerts"]["by_trigger"]["power_loss"] == 3


async def test_centre_down_ten_minutes_compressed(tmp_path: Path) -> None:
    summary = await simulate(
        SHIPPED / "centre-down-10min.toml", tmp_path / "report", devices=30, time_scale=0.0167
    )
    assert summary["passed"], summary["failures"]
    assert summary["centre"]["answered_503"] > 0
    # alerts pressed during the outage waited in the gateway's outbox, then all arrived
    assert summary["latency_s"]["press_to_delivered"]["max"] > 1


async def test_stalker_at_the_door_streams_video_and_is_acknowledged_on_the_doorbell(
    tmp_path: Path,
) -> None:
    summary = await simulate(
        SHIPPED / "stalker-at-the-door.toml", tmp_path / "report", devices=10, time_scale=0.25
    )
    assert summary["passed"], summary["failures"]
    alerts = summary["alerts"]
    assert alerts["by_trigger"].get("doorbell_ring", 0) > 0
    assert alerts["acknowledged_on_device"] == alerts["sent"]
    # every emergency at a doorbell started live video, connected at the gateway's hub
    video = summary["video"]
    assert video["offered"] > 0 and video["connected"] == video["offered"]
    assert any((tmp_path / "report" / "state" / "recordings").iterdir())


async def test_doorbells_on_a_weak_link_still_start_their_video(tmp_path: Path) -> None:
    summary = await simulate(
        SHIPPED / "doorbell-weak-lte.toml", tmp_path / "report", devices=6, time_scale=0.25
    )
    assert summary["passed"], summary["failures"]
    video = summary["video"]
    assert video["offered"] > 0 and video["connected"] == video["offered"]
    # the link was imposed: about one datagram in twenty dropped (the worker's draws are
    # seeded by the scenario)
    sent, dropped = video["datagrams_through_link"], video["datagrams_dropped"]
    assert sent > 20 and 0 < dropped < sent * 0.2, (sent, dropped)
