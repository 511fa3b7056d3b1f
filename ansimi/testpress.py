"""When a bell presses its own test button: one schedule the device keeps and the gateway expects.

A fleet of thousands must not test all at once (the centres would see a wave of tests every
Monday at nine) nor at night (a bell that blinks and beeps at 3 a.m. wakes the street). Each
device gets its own instant in the period, drawn from a hash of its id, inside the day window:
stable across restarts and across the fleet, so the gateway can tell a test that is late from
one that is not due yet, without the device telling it anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import zoneinfo
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DAY_S = 86_400
# a Monday at local midnight: periods start on Mondays, so a weekly test keeps its weekday
_ANCHOR = dt.date(1970, 1, 5)


class TestPressSchedule(BaseModel):
    """`[test_press]`: how often and when a bell tests the whole path on its own."""

    __test__ = False  # a config model, not a pytest class
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    every_days: Annotated[int, Field(ge=1, le=28)] = 7
    # the local hours a test may start in: [from_hour, until_hour), never at night by default
    from_hour: Annotated[int, Field(ge=0, le=23)] = 10
    until_hour: Annotated[int, Field(ge=1, le=24)] = 17
    timezone: str = "Asia/Seoul"
    # how long the whole path (gateway `received`, then centre `delivered`) may take
    complete_within_s: Annotated[float, Field(gt=0)] = 600.0

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as 'Asia/Seoul'"
            ) from None
        return value

    @model_validator(mode="after")
    def _window_not_empty(self) -> TestPressSchedule:
        if self.until_hour <= self.from_hour:
            raise ValueError(
                f"until_hour ({self.until_hour}) must be after from_hour ({self.from_hour}): "
                "the window is one stretch of the local day"
            )
        return self


def _slot(device_id: str, schedule: TestPressSchedule) -> tuple[int, int]:
    """The device's day in the period and its second inside the day window."""
    digest = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")
    window_s = (schedule.until_hour - schedule.from_hour) * 3600
    return digest % schedule.every_days, (digest // schedule.every_days) % window_s


def next_test_at_ms(device_id: str, after_ms: int, schedule: TestPressSchedule) -> int:
    """The first scheduled test of `device_id` strictly after `after_ms` (Unix milliseconds)."""
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    day, second = _slot(device_id, schedule)
    local_today = dt.datetime.fromtimestamp(after_ms / 1000, zone).date()
    period = (local_today - _ANCHOR).days // schedule.every_days

    def slot_in(index: int) -> int:
        date = _ANCHOR + dt.timedelta(days=index * schedule.every_days + day)
        # a wall time in a DST gap is read with the offset before the change (fold=0)
        at = dt.datetime.combine(date, dt.time(schedule.from_hour), zone)
        return int((at + dt.timedelta(seconds=second)).timestamp() * 1000)

    # this period's slot may be past already; the next period's starts after today, so is not
    this_period = slot_in(period)
    return this_period if this_period > after_ms else slot_in(period + 1)
