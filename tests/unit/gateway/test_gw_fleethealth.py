"""Each device's last heartbeat as metrics by district; a drifting clock flagged in time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from gw_testkit import DISTRICTS, WINDOW_MS, Env, heartbeat, large_fleet
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from gateway.config import GatewayConfig
from gateway.fleethealth import DRIFT_CONFIRM_MS, FleetHealth
from gateway.intake import Intake
from protocol.messages import Heartbeat

FLAG_MS = WINDOW_MS // 5


def watched(env: Env, **hooks: Any) -> tuple[Intake, FleetHealth]:
    """The env's intake again (with `hooks`), telling a fleet view its heartbeats (as the
    service does)."""
    fleet = FleetHealth(
        env.metrics,
        district_of=lambda d: DISTRICTS.get(d),
        drift_flag_ms=FLAG_MS,
        clock_ms=env.clock,
    )
    return env.intake_with(on_heartbeats=fleet.heartbeats, **hooks), fleet


def gauge(env: Env, name: str, device: str = "bell-0001", **extra: str) -> float | None:
    labels = {"device": device, "district": DISTRICTS[device], **extra}
    return env.metrics.registry.get_sample_value(name, labels)


async def test_the_last_heartbeat_of_each_device_is_a_metric_with_its_district(env: Env) -> None:
    intake, fleet = watched(env)
    first = Heartbeat(uptime_s=5, power="mains", firmware="1.0", link_quality=70)
    later = Heartbeat(uptime_s=65, power="battery", battery_pct=81, firmware="1.1", outbox_depth=3)
    await intake.process([env.message(first)])
    env.clock.ms += 60_000
    await intake.process([env.message(later)])
    assert fleet.last["bell-0001"].heartbeat == later
    assert gauge(env, "ansimi_device_on_battery") == 1.0
    assert gauge(env, "ansimi_device_battery_percent") == 81.0
    assert gauge(env, "ansimi_device_link_quality_percent") == 70.0  # not in the later beat
    assert gauge(env, "ansimi_device_outbox_depth") == 3.0
    assert gauge(env, "ansimi_device_uptime_seconds") == 65.0
    # one firmware series per device: the old version's is gone
    assert gauge(env, "ansimi_device_firmware_info", firmware="1.1") == 1.0
    assert gauge(env, "ansimi_device_firmware_info", firmware="1.0") is None
    # as Prometheus reads them
    text = generate_latest(env.metrics.registry).decode()
    assert 'ansimi_device_on_battery{device="bell-0001",district="mapo"} 1.0' in text
    assert "# TYPE ansimi_device_battery_percent gauge" in text


def calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """One entry per call of `owner.name` from now on (still doing what it did)."""
    seen: list[int] = []
    original: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return seen


async def test_a_heartbeat_is_parsed_once_and_looks_up_no_labelled_series(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intake's parse is the only one, and the gauges are read when Prometheus scrapes:
    a second parse and eight `labels().set()` a heartbeat were most of what a heartbeat cost
    after its verify (docs/performance.md)."""
    intake, fleet = watched(env)
    parses = calls(monkeypatch, Heartbeat, "model_validate_json")
    lookups = calls(monkeypatch, MetricWrapperBase, "labels")
    await intake.process([env.message(heartbeat())])
    one = len(lookups)
    env.clock.ms += 10_000
    await intake.process([env.message(heartbeat()) for _ in range(20)])
    assert len(lookups) == 2 * one  # the batch's own counters, none a heartbeat
    assert parses == []
    assert fleet.last["bell-0001"].heartbeat == heartbeat()
    assert gauge(env, "ansimi_device_uptime_seconds") == 1.0
    assert gauge(env, "ansimi_device_clock_drifting") == 0.0


async def test_a_drifting_clock_is_flagged_once_before_the_window_and_cleared(env: Env) -> None:
    intake, fleet = watched(env)
    beat = Heartbeat(uptime_s=1, power="mains", firmware="1.0")

    async def at_drift(drift_ms: int) -> None:
        env.clock.ms += 10_000
        await intake.process([env.message(beat, ts=env.clock.ms + drift_ms)])

    await at_drift(FLAG_MS - 1)
    assert fleet.drifting == set() and gauge(env, "ansimi_device_clock_drifting") == 0.0
    assert gauge(env, "ansimi_device_clock_drift_ms") == FLAG_MS - 1
    await at_drift(-FLAG_MS)  # behind counts as much as ahead; still inside the window
    for _ in range(DRIFT_CONFIRM_MS // 10_000 - 1):
        await at_drift(-FLAG_MS - 5)
        assert fleet.drifting == set()  # not yet lasted
    await at_drift(-FLAG_MS - 5)
    assert fleet.drifting == {"bell-0001"} and gauge(env, "ansimi_device_clock_drifting") == 1.0
    assert env.metrics.registry.get_sample_value("ansimi_clock_drift_flags_total") == 1.0
    assert env.metrics.registry.get_sample_value("ansimi_clock_skewed_total") == 0.0
    await at_drift(FLAG_MS // 2)  # hovering near the flag is not cleared
    assert fleet.drifting == {"bell-0001"}
    await at_drift(FLAG_MS // 2 - 1)
    assert fleet.drifting == set() and gauge(env, "ansimi_device_clock_drifting") == 0.0


async def test_heartbeats_that_waited_in_a_queue_are_not_a_drifting_clock(env: Env) -> None:
    """The gateway was away a minute: the bell's heartbeats of that minute arrive together,
    each as late as its wait; the live ones after them are on time. No flag."""
    intake, fleet = watched(env)
    beat = Heartbeat(uptime_s=1, power="mains", firmware="1.0")
    env.clock.ms += 90_000
    for waited in range(90_000, 0, -10_000):  # the backlog, oldest first, in one burst
        await intake.process([env.message(beat, ts=env.clock.ms - waited)])
    for _ in range(4):  # then live, every 10 s
        env.clock.ms += 10_000
        await intake.process([env.message(beat, ts=env.clock.ms)])
    assert fleet.drifting == set()
    assert env.metrics.registry.get_sample_value("ansimi_clock_drift_flags_total") == 0.0


def test_the_drift_flag_must_sit_inside_the_replay_window() -> None:
    with pytest.raises(ValidationError, match="clock_drift_flag_s"):
        GatewayConfig.model_validate(
            {"intake": {"window_s": 60}, "fleet": {"clock_drift_flag_s": 60}}
        )


@pytest.mark.parametrize("flush_ms", [0, 60_000], ids=["kept-at-once", "held-for-a-flush"])
async def test_a_heartbeat_reusing_another_device_s_id_does_not_speak_for_that_device(
    env: Env, flush_ms: int
) -> None:
    """Message ids are the device's to choose: one bell (its key taken, say) that reuses
    another's id in the same batch or flush is refused by the store, and must not put its
    own health in the other bell's place either."""
    intake, fleet = watched(env, heartbeat_flush_ms=flush_ms)
    honest = Heartbeat(uptime_s=5, power="mains", firmware="1.0")
    reused = Heartbeat(uptime_s=9, power="battery", battery_pct=3, firmware="6.6")
    shared_id = "0123456789abcdef"
    await intake.process(
        [
            env.message(honest, "bell-0001", id=shared_id),
            env.message(reused, "bell-0002", id=shared_id),
        ]
    )
    await intake.flush_heartbeats()
    assert fleet.last["bell-0001"].heartbeat == honest
    assert gauge(env, "ansimi_device_on_battery") == 0.0


async def test_a_heartbeat_held_for_a_flush_is_timed_by_its_arrival(env: Env) -> None:
    """Heartbeats wait up to [intake] heartbeat_flush_s (10 s at most) to be kept together:
    the drift is the device's clock against the gateway's when the heartbeat came, not
    when the batch was written (a right clock read as seconds behind)."""
    intake, fleet = watched(env, heartbeat_flush_ms=10_000)
    arrived = env.clock.ms
    await intake.process([env.message(heartbeat(), ts=arrived)])  # a clock that is right
    env.clock.ms += 9_000
    await intake.flush_heartbeats()
    assert gauge(env, "ansimi_device_clock_drift_ms") == 0.0
    assert fleet.last["bell-0001"].at_ms == arrived


async def test_a_scrape_written_off_the_loop_has_every_device_as_the_table_holds_it(
    env: Env,
) -> None:
    """`Metrics.render` copies the table on the loop and makes the samples in a thread: each
    device's series as fleet health holds it, and the same text as the registry read and
    written on the loop in one go."""
    fleet = large_fleet(env.metrics, 2_000, env.clock)
    text = (await env.metrics.render()).decode()
    assert text == generate_latest(env.metrics.registry).decode()
    read = {
        (sample.name, sample.labels["device"], sample.labels.get("firmware")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("ansimi_device_")
        for sample in family.samples
    }
    expected: dict[tuple[str, str, str | None], float] = {}
    for device_id, health in fleet.last.items():
        beat = health.heartbeat
        fields = {
            "ansimi_device_on_battery": 1 if beat.power == "battery" else 0,
            "ansimi_device_battery_percent": health.battery_pct,
            "ansimi_device_link_quality_percent": health.link_quality,
            "ansimi_device_outbox_depth": beat.outbox_depth,
            "ansimi_device_uptime_seconds": beat.uptime_s,
            "ansimi_device_clock_drift_ms": health.drift_ms,
            "ansimi_device_clock_drifting": 1 if device_id in fleet.drifting else 0,
        }
        for name, value in fields.items():
            if value is not None:
                expected[name, device_id, None] = value
        expected["ansimi_device_firmware_info", device_id, beat.firmware] = 1
    assert read == expected
    assert fleet.drifting and len(fleet.last) == 2_000
