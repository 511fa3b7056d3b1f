"""Scenario files: validation with useful errors, and plans that repeat with their seed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ansimi.config import ConfigError
from device.config import DeviceConfig
from simulator.scenario import DeviceSettings, load_scenario, plan

SHIPPED = Path(__file__).parents[3] / "simulator" / "scenarios"

BASE = """
name = "t"
duration_s = 60
[fleet]
count = 40
mix = {bell = 2, doorbell = 1, store = 1}
districts = {mapo = 3, gangnam = 1}
[[events]]
action = "press"
rate_per_min = 30
[[events]]
action = "ring"
count = 5
[[faults]]
type = "partition"
at_s = 10
duration_s = 5
fraction = 0.25
[[faults]]
type = "partition"
at_s = 20
duration_s = 5
districts = ["gangnam"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_the_same_seed_gives_the_same_plan(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    first, second = plan(load_scenario(path)), plan(load_scenario(path))
    assert first == second
    other = plan(load_scenario(path, seed=2))
    assert other.steps != first.steps


def test_the_fleet_follows_the_mix_and_the_districts(tmp_path: Path) -> None:
    p = plan(load_scenario(write(tmp_path, BASE)))
    assert Counter(d.kind for d in p.devices) == {"bell": 20, "doorbell": 10, "store": 10}
    assert Counter(d.district for d in p.devices) == {"mapo": 30, "gangnam": 10}
    assert len({d.id for d in p.devices}) == 40


def test_rings_go_to_doorbells_only_and_fault_targets_are_chosen(tmp_path: Path) -> None:
    p = plan(load_scenario(write(tmp_path, BASE)))
    kinds = {d.id: d.kind for d in p.devices}
    rings = [s for s in p.steps if s.action == "ring"]
    assert len(rings) == 5 and all(kinds[s.device] == "doorbell" for s in rings)
    assert all(0 <= s.at <= 60 for s in p.steps)
    assert len(p.targets[0]) == 10
    districts = {d.id: d.district for d in p.devices}
    assert {districts[t] for t in p.targets[1]} == {"gangnam"} and len(p.targets[1]) == 10


def test_time_scale_compresses_every_scenario_time(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, BASE), time_scale=0.1)
    assert all(s.at <= 6.0 for s in plan(scenario).steps)
    assert scenario.scaled(scenario.faults[0].at_s) == pytest.approx(1.0)


def test_devices_override_the_fleet_size(tmp_path: Path) -> None:
    assert len(plan(load_scenario(write(tmp_path, BASE), devices=7)).devices) == 7


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("[fleet]\ndistricts = {mapoo = 1}", "mapo"),
        ('[[events]]\naction = "press"', "exactly one of count and rate_per_min"),
        ('[[faults]]\ntype = "meteor"\nat_s = 1', "faults.0"),
        ("duration_s = -1", "duration_s"),
        ('[rollout]\nreleases = [{version = "2.0", steps = [50, 10]}]', "steps must grow"),
        ('[rollout]\ninstalled = "2.0"\nreleases = [{version = "1.5"}]', "newer than the one"),
        ('[rollout]\ndistrict = "mapoo"\nreleases = [{version = "2.0"}]', "mapo"),
        ("[rollout]\nreleases = []", "rollout.releases"),
    ],
)
def test_a_bad_file_names_the_key(tmp_path: Path, change: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(write(tmp_path, 'name = "bad"\n' + change + "\n"))
    assert says in str(info.value)


def test_every_shipped_scenario_loads_and_plans() -> None:
    files = sorted(SHIPPED.glob("*.toml"))
    assert len(files) >= 7
    for path in files:
        scenario = load_scenario(path)
        assert scenario.description, path
        plan(scenario)


DAMAGE = """
name = "d"
[fleet]
count = 40
[[faults]]
type = "outbox_damage"
at_s = 1
fraction = 0.1
mode = "restart"
[[faults]]
type = "outbox_damage"
at_s = 5
mode = "delete"
same_devices_as = 0
"""


def test_a_fault_can_take_the_devices_of_an_earlier_one(tmp_path: Path) -> None:
    p = plan(load_scenario(write(tmp_path, DAMAGE)))
    assert len(p.targets[0]) == 4 and p.targets[1] == p.targets[0]
    ahead = DAMAGE.replace("same_devices_as = 0", "same_devices_as = 1")
    with pytest.raises(ValueError, match="same_devices_as = 1, which is not an earlier fault"):
        plan(load_scenario(write(tmp_path, ahead)))


def test_the_disk_faults_say_they_need_a_mount(tmp_path: Path) -> None:
    text = DAMAGE + '[[faults]]\ntype = "device_disk_full"\nat_s = 2\nduration_s = 3\n'
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.needs_mount and not load_scenario(write(tmp_path, DAMAGE)).needs_mount
    assert len(plan(scenario).targets[2]) == 4


def test_the_agents_defaults_are_the_devices_own(tmp_path: Path) -> None:
    # the simulator kept copies once, and they drifted (resend_min_s 1 here, 2 on the bell)
    device = DeviceConfig.model_validate({"device": {"id": "bell-0001", "state_dir": tmp_path}})
    settings = DeviceSettings()
    assert (
        settings.heartbeat_s,
        settings.resend_min_s,
        settings.resend_max_s,
        settings.long_press_s,
        settings.cancel_hold_s,
        settings.duress_hold_s,
        settings.sms_after_s,
    ) == (
        device.mqtt.heartbeat_s,
        device.outbox.resend_min_s,
        device.outbox.resend_max_s,
        device.behaviour.long_press_s,
        device.behaviour.cancel_hold_s,
        device.behaviour.duress_hold_s,
        device.sms.after_s,
    )
