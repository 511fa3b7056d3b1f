"""The test-press schedule: per device, spread over the period, inside the day window."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ansimi.testpress import DAY_S, TestPressSchedule, next_test_at_ms

SEOUL = zoneinfo.ZoneInfo("Asia/Seoul")
NOW_MS = 1_764_000_000_000  # 2025-11-24, a Monday
WEEKLY = TestPressSchedule()


def local(at_ms: int, zone: zoneinfo.ZoneInfo = SEOUL) -> dt.datetime:
    return dt.datetime.fromtimestamp(at_ms / 1000, zone)


@given(
    device=st.text(min_size=1, max_size=40),
    after_ms=st.integers(min_value=0, max_value=4_000_000_000_000),
    every_days=st.integers(min_value=1, max_value=28),
    hours=st.tuples(st.integers(0, 23), st.integers(1, 24)).filter(lambda h: h[0] < h[1]),
)
def test_the_next_test_is_later_within_one_period_and_inside_the_window(
    device: str, after_ms: int, every_days: int, hours: tuple[int, int]
) -> None:
    schedule = TestPressSchedule(every_days=every_days, from_hour=hours[0], until_hour=hours[1])
    at_ms = next_test_at_ms(device, after_ms, schedule)
    assert after_ms < at_ms <= after_ms + (every_days + 1) * DAY_S * 1000
    assert hours[0] <= local(at_ms).hour < hours[1]
    # stable: asked again from just before, the same instant; from it, the next period's
    assert next_test_at_ms(device, at_ms - 1, schedule) == at_ms
    assert next_test_at_ms(device, at_ms, schedule) - at_ms == every_days * DAY_S * 1000


def test_a_fleet_is_spread_over_the_week_and_never_tested_at_night() -> None:
    at = [next_test_at_ms(f"bell-{n:05d}", NOW_MS, WEEKLY) for n in range(7000)]
    days = Counter(local(a).weekday() for a in at)
    hours = Counter(local(a).hour for a in at)
    assert set(days) == set(range(7)) and min(days.values()) > 800
    assert set(hours) == set(range(10, 17)) and min(hours.values()) > 800
    # no wave at the centres: no minute holds even 1 % of the fleet
    assert max(Counter(a // 60_000 for a in at).values()) < len(at) // 100


def test_the_window_follows_the_configured_zone() -> None:
    berlin = TestPressSchedule(timezone="Europe/Berlin", from_hour=9, until_hour=10)
    at_ms = next_test_at_ms("bell-1", NOW_MS, berlin)
    assert local(at_ms, zoneinfo.ZoneInfo("Europe/Berlin")).hour == 9


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"timezone": "Asia/Seol"}, "Asia/Seoul"),
        ({"from_hour": 18, "until_hour": 9}, "until_hour"),
    ],
)
def test_a_bad_schedule_names_the_fix(options: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        TestPressSchedule.model_validate(options)
