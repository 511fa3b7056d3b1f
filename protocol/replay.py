"""Freshness rules: refuse old sequence numbers and timestamps far from the receiver's clock.

Pure: the caller owns the high-water mark and passes the clock in, so tests need no sleeps.
Telling an exact duplicate (re-ack it) from a replay is the caller's job, before calling this.
"""

from __future__ import annotations

from typing import Final

from protocol.errors import Replay, Stale

DEFAULT_WINDOW_MS: Final = 300_000


def check_fresh(high_water: int | None, seq: int, ts_ms: int, now_ms: int, window_ms: int) -> None:
    if high_water is not None and seq <= high_water:
        raise Replay(
            f"sequence number {seq} is not above the high-water mark {high_water}: "
            "a replay, or a device that lost its sequence counter"
        )
    skew = ts_ms - now_ms
    if abs(skew) > window_ms:
        side = "ahead of" if skew > 0 else "behind"
        raise Stale(
            f"timestamp is {abs(skew) / 1000:.1f} s {side} this clock, outside the "
            f"{window_ms / 1000:g} s window: check the device clock (NTP) and this one"
        )
